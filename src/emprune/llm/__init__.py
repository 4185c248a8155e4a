"""LLM pipeline: load a causal LM, calibrate it block by block, prune, evaluate, save.

Needs the ``llm`` extra (transformers, accelerate, gguf, safetensors, tqdm); the submodules
import it lazily so that ``import emprune`` stays light.
"""


def __getattr__(name: str):
    """``emprune.llm.from_pretrained`` / ``load_shrunk``: load a folder written by ``emprune shrink``
    (imported lazily, like the rest of this package)."""
    if name in ("from_pretrained", "load_shrunk"):
        from . import shrink

        return getattr(shrink, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
