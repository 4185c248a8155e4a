"""Act: carry decisions out on a model.

* :mod:`.masks`: zero pruned weights (reversible masks, or folded in), undo them;
* :mod:`.update`: SparseGPT's OBS update and N:M patterns applied to a decided Linear;
* :mod:`.remove`: structural removal of the units a decision did not keep (with FLAP's bias
  compensation);
* :mod:`.report`: what was done, per target and overall (:class:`PruneReport`,
  :class:`ShrinkReport`).
"""
