"""The core: pure tensor math, no ``nn.Module`` in sight.

* :mod:`.rule`: EMP's rule (N_eff, counts, exact masks, the global threshold, the mass bound);
* :mod:`.engine` and :mod:`.kernels`: the exact selection engines behind it (PyTorch on any
  device; an optional numba kernel on CPU that gives the same masks);
* :mod:`.obs`: SparseGPT's second-order reconstruction (OBS) given a Hessian and the counts.

Nothing here imports any other part of emprune: every layer above builds on these functions.
"""
