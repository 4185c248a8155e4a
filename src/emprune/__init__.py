"""emprune: Effective Model Pruning (EMP) for PyTorch.

EMP keeps, in every group of scores, the ``floor(beta * N_eff)`` largest, where
``N_eff = (sum|s|)^2 / sum s^2``: the scores themselves say how much to prune.

Entry points: the rule on tensors (:func:`keep_mask`, ...), models (:func:`prune`), and EMP's
decisions for your own masks or structures (:class:`Target` -> :func:`decide` ->
:class:`Decision`). Criteria live in :mod:`emprune.criteria` (one registry).
"""
from . import criteria
from .apply import apply_mask, make_permanent, prune, restore, select_targets
from .report import LayerReport, PruneReport
from . import io  # noqa: F401  (emprune.io.save_pruned / load_state_dict right after `import emprune`)
from .structured import ShrinkReport, shrink, shrink_traced
from .rule import (
    effective_number,
    global_effective_number,
    global_mask,
    global_masks,
    global_threshold,
    keep_count,
    keep_mask,
    mass_bound,
    retained_mass,
    topk_mask,
)
from .scopes import Decision, Target, decide

__version__ = "0.1.0"

__all__ = [
    "effective_number", "keep_count", "keep_mask", "topk_mask", "mass_bound", "retained_mass",
    "global_threshold", "global_masks", "global_mask", "global_effective_number",
    "prune", "make_permanent", "restore", "apply_mask", "select_targets",
    "PruneReport", "LayerReport", "Target", "decide", "Decision", "criteria", "shrink", "shrink_traced", "ShrinkReport",
    "__version__",
]
