"""LLM pipeline: load a causal LM, calibrate it block by block, prune, evaluate, save.

Needs the ``llm`` extra (transformers, accelerate, gguf, safetensors, tqdm); the submodules
import it lazily so that ``import emprune`` stays light.
"""
