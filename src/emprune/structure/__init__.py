"""What a model is made of, before anything is decided about it.

* :mod:`.layouts`: the decoder families emprune knows (where the blocks are, which layers of a
  block are targets, GPT-2's ``Conv1D`` seen as ``nn.Linear``): the one place that knows model
  families;
* :mod:`.targets`: the one resolver from a ``targets`` option to modules;
* :mod:`.units`: unit groups, the structures whose units come and go together (MLP neurons,
  GQA heads, plain-chain neurons, Conv channels with their BatchNorm, KAN nodes);
* :mod:`.surgery`: physical removal of rows and columns of Linear / Conv / BatchNorm modules,
  and the bias compensation of removed inputs.
"""
