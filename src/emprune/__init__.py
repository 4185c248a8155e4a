"""emprune: Effective Model Pruning (EMP) for PyTorch.

EMP keeps, in every group of scores, the ``floor(beta * N_eff)`` largest, where
``N_eff = (sum|s|)^2 / sum s^2``: the scores themselves say how much to prune.

Entry points: the rule on tensors (:func:`keep_mask`, ...), masks on any model (:func:`prune`),
structural removal (:func:`shrink`; :func:`shrink_lm` for causal LMs, whole decoder blocks
included; :func:`shrink_traced`), a GGUF file for llama.cpp
(:func:`write_gguf`), and EMP's decisions for your own
masks or structures (:class:`Target` -> :func:`decide` -> :class:`Decision`). Criteria live in
:mod:`emprune.criteria` (one registry). The layers, bottom up: :mod:`.core`, :mod:`.structure`,
:mod:`.criteria`, :mod:`.decide`, :mod:`.act`, :mod:`.models`, :mod:`.jobs`, :mod:`.cli`
(see ``docs/architecture.md``).
"""
import sys

from . import _compat, criteria
from ._version import __version__
from .act.masks import apply_mask, make_permanent, restore
from .act.report import LayerReport, PruneReport, ShrinkReport
from .core.rule import (
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
from .decide.scopes import Decision, Target, decide
from .jobs.prune import prune
from .jobs.shrink import shrink
from .jobs.shrink_lm import shrink_lm
from .jobs.traced import shrink_traced
from .models import io  # noqa: F401  (emprune.io.save_pruned / load_state_dict right after `import emprune`)
from .models.checkpoint import from_pretrained
from .models.export import write_gguf
from .structure.targets import select_targets

_compat.install()
sys.modules.setdefault(__name__ + ".io", io)  # `import emprune.io` without a warning: still the public name


__all__ = [
    "effective_number", "keep_count", "keep_mask", "topk_mask", "mass_bound", "retained_mass",
    "global_threshold", "global_masks", "global_mask", "global_effective_number",
    "prune", "make_permanent", "restore", "apply_mask", "select_targets",
    "PruneReport", "LayerReport", "Target", "decide", "Decision", "criteria", "shrink", "shrink_lm", "shrink_traced", "ShrinkReport",
    "from_pretrained", "write_gguf", "__version__",
]
