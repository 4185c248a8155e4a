"""Models: getting them in and out, and running them.

* :mod:`.io`: atomic writes, safetensors state dicts with masks folded in;
* :mod:`.checkpoint`: the folders emprune writes (``emprune.json``, shrunk configs), their
  output checks, :func:`~.checkpoint.from_pretrained` for a shrunk folder;
* :mod:`.loading`: a causal LM from a short name, a folder, the hub or a GGUF file;
* :mod:`.data`: calibration and evaluation tokens from text files (embedded WikiText samples
  under ``texts/``);
* :mod:`.layerwise`: SparseGPT-style block-by-block calibration with hooks;
* :mod:`.runtime`: devices and progress bars.

The heavy dependencies (transformers, accelerate) are imported lazily, inside functions.
"""
