"""Jobs: what a user asks for, end to end, each built from the layers below.

* :mod:`.options`: every job's options as dataclasses (the CLI is generated from them);
* :mod:`.prune` (any model) and :mod:`.prune_lm` (decoder LMs, layer-wise): masks;
* :mod:`.shrink`, :mod:`.shrink_lm`, :mod:`.traced`: structural removal;
* :mod:`.heal`: training the survivors (masked or shrunk) back;
* :mod:`.eval`, :mod:`.zeroshot`: perplexity and zero-shot accuracy;
* :mod:`.export`: a GGUF file for llama.cpp; :mod:`.bench`: speed, size and memory where a model runs;
* :mod:`.compare`: dense vs baselines vs EMP recipes on one model load;
* :mod:`.memory`: peak memory of a run.
"""
