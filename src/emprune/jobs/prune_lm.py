"""Prune a causal LM with EMP (or a fixed-sparsity baseline), through the one decision engine.

Every mask comes from :func:`emprune.decide.scopes.decide`; this module only supplies the score
tensors (``Target.score``: what to keep) and the count tensors (``Target.count``: how many)
and applies the masks in place with :func:`emprune.act.masks.apply_mask` (or rewrites the
Linear with the OBS update first: :mod:`emprune.act.update`).

Calibration (criteria or counts that need activations, i.e. Wanda):

* ``scope="row"`` / ``"layer"``: layer-wise, as in Wanda/SparseGPT
  (:func:`~emprune.models.layerwise.prune_layerwise`): block ``i`` is calibrated on the outputs of
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

Recipes (:mod:`emprune.decide.recipes`) say where EMP's counts come from. ``paper`` is the
paper's exact rule (per-unit EMP on the criterion's own scores, no floor); ``default`` is the
best recipe measured on SmolLM2-135M (see ``benchmarks/results/llm_reconstruction.md``).

The options are one object, :class:`~emprune.jobs.options.PruneOptions`; :func:`plan` checks and
resolves them without a model (the CLI calls it before loading one).

Matched runs (``counts=...``) keep exactly the per-unit counts of a reference run. They go
through ``decide`` too, as explicit counts (``Target.k``); with the global scope their total
is kept over all targets.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..core.checks import one_of
from .. import criteria as C
from ..act.masks import apply_mask
from ..act.report import WARN_UNIT_SPARSITY, PruneReport, count_zeros
from ..act.update import Update, apply_update
from ..core import rule
from ..criteria import Criterion
from ..criteria.hessian import InputHessians
from ..core.obs import DAMP_KINDS, QUOTAS
from ..decide.allocate import beta_for_fraction, outlier_ratio, owl_sparsities, parse_nm, spread, OWL_LAMBDA, OWL_M
from ..decide.recipes import Recipe, get_recipe
from ..decide.scopes import Decision, Target, check_options, decide, floor_count
from ..models.checkpoint import versions
from ..models.layerwise import Blocks, prune_layerwise, reading
from ..structure.layouts import decoder_layers, linear_view
from ..structure.targets import TARGET_SETS, block_targets
from .memory import PeakMemory, fmt_bytes
from .options import PruneOptions, build

UPDATES = ("obs",)
#: ``update="auto"`` (the default): the recipe's update (:attr:`Recipe.update`; OBS for the default
#: recipe) where EMP decides the counts from the recipe, layer-wise, with an activation-aware
#: criterion (the calibration data is there anyway); no update for fixed-sparsity, matched and N:M
#: baselines, data-free criteria and the global scope. ``"none"`` (or None) never updates.
AUTO = "auto"
UPDATE_CHOICES = (AUTO, *UPDATES, "none")
ALLOCATIONS = ("uniform", "owl")
#: the default dampening of the OBS update in the LLM pipeline: ``damp * H_jj`` added to each
#: diagonal entry (``DEFAULT_DAMP_KIND = "diag"``). Chosen on the text nobody calibrated on
#: (SmolLM2-135M, EMP's counts, 16 x 256 WikiText-2 calibration tokens, perplexity on python-docs):
#: diag 1.0 -> x1.230 of dense, diag 0.1 x1.278, diag 10 x1.231; SparseGPT's mean-relative
#: 0.01 x1.363, 0.1 x1.274, 0.3 x1.245, 1.0 x1.242, 3 x1.312; EMP + Wanda without update x1.251
#: (benchmarks/results/llm_reconstruction_probe.md). :func:`emprune.core.obs.obs_prune` itself keeps
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


def layerwise_criterion(spec: str | Criterion, option: str = "criterion") -> Criterion:
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


# ------------------------------------------------------------------------ the plan


@dataclass
class Plan:
    """:class:`PruneOptions` checked and resolved before the model is touched."""

    options: PruneOptions
    label: str  # the criterion's name in reports
    criterion: Criterion  # which entries to keep
    count: Criterion | None  # whose N_eff sets how many (None: the criterion's own scores)
    recipe: Recipe
    beta: float
    count_label: str  # where the counts come from, for the report
    update: Update = field(default_factory=Update)
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
        """Whether the layer-wise loop gathers statistics: for the criterion's scores, for EMP
        counts from scores that need them (e.g. Wanda's) or for the OBS update (input Hessians)."""
        return bool(self.observers)

    @property
    def needs_data(self) -> bool:
        """Whether calibration tokens are needed: to calibrate, or for OWL's allocation (Wanda
        scores of the dense model)."""
        return self.calibrate or self.options.allocation != "uniform"

    def sparsity_of(self, block: int | None) -> float | None:
        """The fixed sparsity of a block's targets (OWL: per block), or None (EMP counts)."""
        if self.update.nm is not None:
            return 1.0 - self.update.nm[0] / self.update.nm[1]
        if self.layer_sparsity is not None and block is not None:
            return self.layer_sparsity[block]
        return self.options.sparsity


def _check_values(o: PruneOptions) -> None:
    """The options that need nothing but themselves."""
    one_of("targets", o.targets, TARGET_SETS)
    check_options(o.scope, o.beta, o.sparsity, o.min_keep)
    if o.sparsity is not None and o.counts is not None:
        raise ValueError("pass either sparsity or counts, not both")
    fixed = [n for n, v in (("sparsity", o.sparsity), ("counts", o.counts), ("nm", o.nm),
                            ("target_sparsity", o.target_sparsity)) if v is not None]
    if float(o.beta) != 1.0 and fixed:  # silently ignored before: the run recorded beta null
        raise ValueError(f"beta scales EMP's counts; {fixed[0]} decides them instead: pass one or the other")
    one_of("update", o.update, UPDATE_CHOICES, none_ok=True)
    damp = o.damp
    if damp is not None and not (isinstance(damp, (int, float)) and not isinstance(damp, bool)
                                 and damp == damp and damp >= 0 and damp != float("inf")):
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if not (isinstance(o.blocksize, int) and o.blocksize >= 1):
        raise ValueError(f"blocksize must be an integer >= 1, got {o.blocksize!r}")
    one_of("quota", o.quota, QUOTAS)
    one_of("damp_kind", o.damp_kind, DAMP_KINDS)
    one_of("allocation", o.allocation, ALLOCATIONS)
    if o.allocation == "owl" and o.sparsity is None:
        raise ValueError("allocation 'owl' spreads a fixed sparsity over the layers: give sparsity too")


def _check_target_sparsity(o: PruneOptions, nm: tuple[int, int] | None) -> None:
    if o.target_sparsity is None:
        return
    p = float(o.target_sparsity)
    if not (0.0 < p < 1.0) or p != p:
        raise ValueError(f"target_sparsity must lie in (0, 1), got {o.target_sparsity!r}")
    if o.sparsity is not None or o.counts is not None or nm is not None:
        raise ValueError("target_sparsity sets EMP's beta: it excludes sparsity, counts and nm")
    if o.scope not in ("row", "layer"):
        raise ValueError("target_sparsity needs scope row or layer")


def _resolve_update(o: PruneOptions, rec: Recipe, crit: Criterion, nm: tuple[int, int] | None) -> Update:
    emp = o.sparsity is None and o.counts is None and nm is None
    method = o.update
    if method == AUTO:
        method = auto_update(rec, crit, o.scope, emp_counts=emp)
    elif method == "none":
        method = None
    if (method is not None or nm is not None or o.allocation != "uniform") and o.scope == "global":
        raise ValueError("update, nm and allocation work layer-wise: scope must be row or layer, not global")
    if o.damp is not None and method is None:
        raise ValueError("damp sets the OBS update's dampening, and this run has no update: give update obs "
                         "(update auto adds it only where EMP decides the counts with an activation-aware criterion)")
    return Update(method, nm, fixed=o.sparsity is not None, damp=DEFAULT_DAMP if o.damp is None else float(o.damp),
                  damp_kind=o.damp_kind, blocksize=o.blocksize, quota=o.quota)


def _count_label(o: PruneOptions, label: str, rec: Recipe, nm: tuple[int, int] | None) -> str:
    if o.counts is not None:
        return f"matched to {o.counts_from or 'a reference run'}"
    if nm is not None:
        return f"{nm[0]}:{nm[1]}"
    if o.sparsity is not None:
        return "fixed" + (" (OWL per layer)" if o.allocation == "owl" else "")
    src = label if rec.count_by == "same" else rec.count_by
    return src + (" (per layer)" if rec.count_unit == "layer" else "")


def plan(options: PruneOptions | None = None, **fields: Any) -> Plan:
    """Check :func:`prune_lm`'s options without a model (the CLI calls it before loading one)
    and resolve the recipe, the criteria (from the registry) and the update; raises a one-line
    ``ValueError`` naming the option."""
    o = build(PruneOptions, options, fields)
    crit = layerwise_criterion(o.criterion)
    _check_values(o)
    nm = parse_nm(o.nm)
    if nm is not None and (o.sparsity is not None or o.counts is not None or o.allocation != "uniform"):
        raise ValueError("nm (N:M) fixes the count of every group of M weights: it excludes sparsity, counts "
                         "and allocation")
    if o.sparsity is not None and (o.count_by is not None or o.count_unit is not None):
        raise ValueError("count_by/count_unit shape EMP's counts; they have no meaning with sparsity")
    rec = get_recipe(o.recipe, "prune", count_by=o.count_by, min_keep=o.min_keep, count_unit=o.count_unit)
    update = _resolve_update(o, rec, crit, nm)
    if o.sparsity is not None or o.counts is not None or nm is not None:  # the recipe only shapes EMP counts
        kind = "fixed" if o.sparsity is not None else "matched" if o.counts is not None else f"{nm[0]}:{nm[1]}"  # type: ignore[index]
        rec = Recipe(kind, jobs=("prune",), min_keep=o.min_keep)
    if rec.count_unit == "layer" and o.scope != "row":
        raise ValueError("count_unit='layer' spreads a layer's count over its rows: it needs scope='row'")
    _check_target_sparsity(o, nm)
    label = o.criterion if isinstance(o.criterion, str) else crit.name
    count = None if rec.count_by == "same" else layerwise_criterion(rec.count_by, "count_by")
    if count is not None and count.same_as(crit):
        count = None  # the same scores: computed once
    return Plan(o, label, crit, count, rec, float(o.beta), _count_label(o, label, rec, nm), update,
                InputHessians() if update.method == "obs" else None)


# ------------------------------------------------------------------------ deciding one group


class Record:
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


def _target(plan: Plan, name: str, mod: nn.Linear, extra: dict[str, dict[str, Any]]) -> Target:
    """The target handed to ``decide``: selection scores, plus where the counts come from
    (count scores, or explicit counts, whose N_eff columns then show the selection scores')."""
    o = plan.options
    shape = mod.weight.shape
    score = lambda: plan.criterion(name, mod)  # noqa: E731 - a lazy score source
    if o.counts is not None:
        return Target(name, shape, score, k=o.counts[name])
    if o.sparsity is not None or plan.update.nm is not None:
        return Target(name, shape, score)
    count = None if plan.count is None else (lambda: plan.count(name, mod))  # type: ignore[misc]
    if plan.recipe.count_unit == "layer":  # one count per matrix, spread over its rows
        s = (count or score)()
        layer_neff = float(rule.effective_number(s, None))
        k_layer = int(rule.keep_count_from_neff(torch.tensor(layer_neff), plan.beta, s.numel()))
        extra[name]["layer_neff"] = layer_neff
        return Target(name, shape, score, k=spread(k_layer, shape[0]))
    return Target(name, shape, score, count)


def _finish(plan: Plan, d: Decision, mod: nn.Linear, record: Record) -> None:
    """Apply one decision: as it is, or as the plan's update rewrites it (OBS, N:M)."""
    if not plan.update.active:
        record.apply(d, mod)
        return
    scores = plan.criterion(d.name, mod)  # on the weights as decided (before any update)
    dense_zeros = count_zeros(mod.weight)
    t0 = time.perf_counter()
    h = plan.hessians.take(d.name) if plan.hessians is not None else None  # decided once: handed over
    applied = apply_update(d, mod, scores, plan.update, h, overwrite_hessian=True)
    del h
    if plan.update.method is not None:
        record.update_seconds += time.perf_counter() - t0
    record.apply(applied, mod, dense_zeros)


def _decide_group(plan: Plan, group: dict[str, nn.Linear], record: Record, block: int | None = None) -> None:
    """Decide and prune one group of targets (a block, or all of them for the global scope),
    then release the statistics of that group (not needed again)."""
    tb = time.perf_counter()
    if plan.hessians is not None:
        missing = plan.hessians.missing(group)
        if missing:
            raise RuntimeError(f"no input Hessian for {missing[:3]}: the calibration never reached them")
    targets = [_target(plan, n, m, record.extra) for n, m in group.items()]
    for d in decide(targets, plan.options.scope, plan.beta, sparsity=plan.sparsity_of(block),  # type: ignore[arg-type]
                    min_keep=plan.recipe.min_keep):
        _finish(plan, d, group[d.name], record)
    for c in plan.observers:
        c.release(group)
    record.decide_seconds += time.perf_counter() - tb


# ------------------------------------------------------------------------ passes over the model


def _dense_pass(model: nn.Module, calib_tokens: Tensor, targets: str, observers: list[Any],
                on_block: Callable[[int, dict[str, nn.Linear]], Any], **loop: Any) -> dict[str, Any]:
    """The layer-wise loop with nothing pruned: ``on_block`` reads each block's statistics
    (then released) on the dense model's activations."""
    def visit(i: int, lin: dict[str, nn.Linear]) -> None:
        on_block(i, lin)
        for c in observers:
            c.release(lin)

    loop = dict(loop, device=reading(loop.get("device")))  # a streamed model writes nothing on this pass
    return prune_layerwise(model, calib_tokens, targets, visit, observers, **loop)  # type: ignore[arg-type]


def owl_ratios(model: nn.Module, calib_tokens: Tensor, targets: str, m: float = OWL_M,
               **loop: Any) -> list[float]:
    """OWL's outlier ratio of every decoder block (the Wanda scores of its targeted Linears,
    all together; see :func:`~emprune.decide.allocate.outlier_ratio`), from one pass over the
    dense model."""
    wanda = C.get("wanda")
    ratios: list[float] = []

    def on_block(i: int, lin: dict[str, nn.Linear]) -> None:
        ratios.append(outlier_ratio([wanda(n, mod) for n, mod in lin.items()], m))

    try:
        _dense_pass(model, calib_tokens, targets, [wanda], on_block, **loop)
    finally:
        wanda.release()
    return ratios


def _count_neffs(plan: Plan, model: nn.Module, mods: dict[str, nn.Linear], calib_tokens: Tensor | None,
                 **loop: Any) -> dict[str, Tensor]:
    """N_eff of the count scores of every target, per unit (row scope: per row; layer scope or
    ``count_unit='layer'``: one per matrix), on the dense model (a dense pass if they need data)."""
    src = plan.count or plan.criterion
    per_matrix = plan.options.scope == "layer" or plan.recipe.count_unit == "layer"
    out: dict[str, Tensor] = {}

    def visit(_i: int, lin: dict[str, nn.Linear]) -> None:
        for n, mod in lin.items():
            s = src(n, mod)
            out[n] = rule.effective_number(s, None if per_matrix else 1).reshape(-1).cpu()

    if src.needs_calibration:
        if calib_tokens is None:
            raise ValueError("target_sparsity with counts from data-driven scores needs calibration tokens")
        try:
            _dense_pass(model, calib_tokens, plan.options.targets, [src], visit, **loop)
        finally:
            src.release()
    else:
        _each_block(model, mods, visit, False, loop.get("device"))
    return out


def _pruned_at(beta: float, neffs: dict[str, Tensor], mods: dict[str, nn.Linear], plan: Plan) -> int:
    """Weights EMP prunes at ``beta`` (exactly as :func:`decide` counts them)."""
    pruned = 0
    min_keep = plan.recipe.min_keep
    for n, neff in neffs.items():
        rows, cols = mods[n].weight.shape
        if plan.options.scope == "layer":
            k = rule.keep_count_from_neff(neff, beta, rows * cols).clamp_min(floor_count(min_keep, rows * cols))
        elif plan.recipe.count_unit == "layer":
            k_layer = int(rule.keep_count_from_neff(neff, beta, rows * cols))
            k = spread(k_layer, rows).clamp_min(floor_count(min_keep, cols))
        else:
            k = rule.keep_count_from_neff(neff, beta, cols).clamp_min(floor_count(min_keep, cols))
        pruned += rows * cols - int(k.sum())
    return pruned


def beta_for_sparsity(neffs: dict[str, Tensor], mods: dict[str, nn.Linear], plan: Plan,
                      target: float) -> tuple[float, float]:
    """The beta whose EMP counts prune the fraction of the targets closest to ``target``, and
    that fraction (bisection on the counts alone: :func:`~emprune.decide.allocate.beta_for_fraction`)."""
    total = sum(mods[n].weight.numel() for n in neffs)
    return beta_for_fraction(lambda b: _pruned_at(b, neffs, mods, plan), total, target)


def _group_by_block(model: nn.Module, mods: dict[str, nn.Linear]) -> list[dict[str, nn.Linear]]:
    ids = {id(m): n for n, m in mods.items()}
    return [{ids[id(m)]: m for m in block.modules() if id(m) in ids} for block in decoder_layers(model)]


def _run(plan: Plan, model: nn.Module, mods: dict[str, nn.Linear], calib_tokens: Tensor | None,
         record: Record, **loop: Any) -> tuple[str, dict[str, Any]]:
    """Gather statistics where needed, then decide and prune; returns the calibration mode and
    the loop's timings."""
    targets = plan.options.targets
    if plan.options.scope == "global":  # one decision over every target: statistics of all blocks first
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
    _each_block(model, mods, lambda i, group: _decide_group(plan, group, record, i), True, loop["device"],
                loop["progress"])
    return MODE_NONE, {}


def _each_block(model: nn.Module, mods: dict[str, nn.Linear], visit: Callable[[int, dict[str, nn.Linear]], Any],
                final: bool, device: Any, progress: bool = False) -> None:
    """``visit(i, targets of block i)`` for every block, without data (each block opened for its
    turn when ``device`` is a :class:`Blocks`, e.g. a model streamed from disk)."""
    from tqdm.auto import tqdm

    blocks = device if isinstance(device, Blocks) else None
    layers = decoder_layers(model)
    for i, group in enumerate(tqdm(_group_by_block(model, mods), desc="prune", disable=not progress, unit="block")):
        if blocks is None:
            visit(i, group)
            continue
        with blocks.open(i, layers[i], final):
            visit(i, group)


# ------------------------------------------------------------------------ the job


@torch.no_grad()
def prune_lm(model: nn.Module, calib_tokens: Tensor | None, options: PruneOptions | None = None,
             blocks: Blocks | None = None, **fields: Any) -> LMPruneResult:
    """Prune ``model``'s targeted Linears in place; embeddings and ``lm_head`` are never touched.

    The options are the fields of :class:`~emprune.jobs.options.PruneOptions`, given as
    ``options=`` or as keywords. ``criterion`` selects which entries to keep: a registered
    criterion usable layer-wise (:func:`criterion_choices`: ``magnitude`` |W|, ``wanda``
    |W| * ||X_j||_2 over the calibration tokens ``calib_tokens`` ``[n, seqlen]``, ...) or such a
    Criterion instance (whose statistics are then gathered afresh and released at the end). How
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
    (:func:`emprune.core.obs.obs_prune`) chooses which weights of each row go (exactly the decided
    count per row) and rewrites the others to preserve the layer's outputs on the calibration
    inputs, which are the outputs of the already-pruned blocks; ``damp`` is its dampening
    (default :data:`DEFAULT_DAMP`), ``blocksize`` its column block, ``quota`` how a row's count is
    spread over the blocks, ``damp_kind`` whether ``damp`` scales the mean diagonal (SparseGPT) or
    each diagonal entry. With a fixed ``sparsity`` this is SparseGPT itself (its per-block choice
    over all rows). ``allocation="owl"`` (with ``sparsity``): OWL's per-layer sparsities
    (:func:`~emprune.decide.allocate.owl_sparsities`, from the outlier ratios of the dense model's
    Wanda scores).

    The steps: (1) :func:`plan` checks the options and builds the criteria from the registry;
    (2) the targets are listed and explicit counts checked against them; (3) :func:`_run`
    gathers the criteria's statistics (layer-wise, one dense pass for the global scope, or none)
    and decides and prunes each group of targets (:func:`_decide_group`), releasing the
    statistics of each group once decided; (4) :func:`summary` writes the JSON summary.

    Layouts: see :mod:`emprune.structure.layouts` (LLaMA-like, Phi-3, GPT-2, OPT; anything else is
    refused with ``NotImplementedError``). GPT-2's ``Conv1D`` layers are pruned as ``nn.Linear``
    views (a row, a unit, is an output feature, as everywhere) and given back as ``Conv1D``
    holding the pruned weights in their own ``[in, out]`` layout.

    ``blocks``: the model is streamed from disk (:class:`~emprune.models.stream.DiskModel`: its
    blocks' weights on ``meta`` between their turns); every pass opens each block for its turn and
    the final pass hands each finished block to the stream (which writes it). The global scope,
    one decision over every weight at once, is refused there.
    """
    p = plan(options, **fields)
    if p.needs_data and calib_tokens is None:
        raise ValueError(f"criterion {p.label!r} with count_by {p.recipe.count_by!r}"
                         + (f" and update {p.update.method!r}" if p.update.method else "") + " needs calibration tokens")
    if blocks is not None and p.options.scope == "global":
        raise ValueError("scope 'global' decides over every weight at once, which a model streamed from disk "
                         "never holds; use scope 'row' or 'layer', or load the model in memory")
    with linear_view(model):  # GPT-2: Conv1D seen as Linear (rows = output units) until the end
        return _prune_lm(p, model, calib_tokens, blocks)


def _prepare(p: Plan, model: nn.Module, mods: dict[str, nn.Linear], calib_tokens: Tensor | None,
             **loop: Any) -> dict[str, Any]:
    """Before the run: the beta of a target sparsity, OWL's per-layer sparsities (both from the
    dense model); returns what they found, for the summary."""
    o = p.options
    pre: dict[str, Any] = {}
    if o.target_sparsity is not None:
        tp = time.perf_counter()
        neffs = _count_neffs(p, model, mods, calib_tokens, **loop)
        p.beta, est = beta_for_sparsity(neffs, mods, p, float(o.target_sparsity))
        pre["beta_for_target"] = {"requested": float(o.target_sparsity), "beta": p.beta,
                                  "dense_estimate": est, "seconds": time.perf_counter() - tp,
                                  "note": "beta found by bisection on the EMP counts of the dense model"}
    if o.allocation == "owl":
        tp = time.perf_counter()
        ratios = owl_ratios(model, calib_tokens, o.targets, **loop)  # type: ignore[arg-type]
        p.layer_sparsity = owl_sparsities(ratios, float(o.sparsity))  # type: ignore[arg-type]
        pre["owl"] = {"M": OWL_M, "lambda": OWL_LAMBDA, "outlier_ratios": ratios,
                      "layer_sparsity": p.layer_sparsity, "seconds": time.perf_counter() - tp}
    return pre


def _prune_lm(p: Plan, model: nn.Module, calib_tokens: Tensor | None, blocks: Blocks | None) -> LMPruneResult:
    """Steps 2-4 of :func:`prune_lm`, on a model whose targets are all ``nn.Linear``."""
    o = p.options
    mods = block_targets(model, o.targets)
    missing = [n for n in mods if o.counts is not None and n not in o.counts]
    if missing:
        raise ValueError(f"counts has no entry for {missing[:3]} (reference run on other targets?)")
    loop = dict(progress=o.progress, device=blocks if blocks is not None else o.device, batch_size=o.batch_size)
    start = time.perf_counter()
    with PeakMemory(o.device if o.device is not None else next(model.parameters()).device) as mem:
        try:
            for c in p.observers:  # statistics are gathered afresh, on this model's blocks
                c.release()
            pre = _prepare(p, model, mods, calib_tokens, **loop)
            record = Record(PruneReport.for_run(p.label, p.count_label, o.scope, beta=p.beta, sparsity=o.sparsity,
                                                min_keep=p.recipe.min_keep,
                                                explicit_counts=o.counts is not None or p.update.nm is not None))
            mode, timing = _run(p, model, mods, calib_tokens, record, **loop)
        finally:
            for c in p.observers:
                c.release()
    record.report.seconds = time.perf_counter() - start
    record.report.extra.update(recipe=p.recipe.to_dict())
    info = summary(model, record, p)
    used = calib_tokens if p.calibrate else None
    info["calibration"] = {
        "mode": mode,
        "n_samples": int(used.shape[0]) if used is not None else 0,
        "seqlen": int(used.shape[1]) if used is not None else 0,
        "tokens": int(used.numel()) if used is not None else 0,
        "batch_size": o.batch_size,
        "seconds": timing.get("seconds", 0.0),
    }
    info.update(pre)
    info.update(seconds=record.report.seconds, decide_seconds=record.decide_seconds, peak_memory=mem.result)
    return LMPruneResult(record.report, record.kept, info)


# ------------------------------------------------------------------------ the record


def summary(model: nn.Module, record: Record, p: Plan) -> dict[str, Any]:
    """The JSON summary (``emprune.json``): settings, overall counts (against the dense model)
    and per-layer rows."""
    report, layer_extra, o, rec = record.report, record.extra, p.options, p.recipe
    total, n_kept, zeros = report.total, report.kept, report.zeros
    dense_zeros = sum(e.get("dense_zeros", 0) for e in layer_extra.values())
    all_params = sum(q.numel() for q in model.parameters())
    layers = []
    for lay in report.to_dict()["layers"]:
        ex = layer_extra.get(lay["name"], {})
        lay.pop("sparsity", None)  # emprune.json's layers never had it: zeros_fraction / pruned_fraction
        lay["dense_zeros"] = ex.get("dense_zeros", 0)
        if "layer_neff" in ex:
            lay["layer_neff"] = ex["layer_neff"]
        layers.append(lay)
    upd = p.update
    return {
        "versions": versions(),
        "criterion": p.label,
        "scope": o.scope,
        "beta": report.beta,
        "target_sparsity": o.sparsity,
        "targets": o.targets,
        "recipe": rec.to_dict(),
        "count_by": report.count_by,
        "counts_from": o.counts_from if o.counts is not None else None,
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
        "layers_with_units_over_95pct": [lay["name"] for lay in layers
                                         if lay["max_unit_pruned_fraction"] > WARN_UNIT_SPARSITY],
        "warnings": report.warnings,
        "layers": layers,
        "update": None if upd.method is None else {
            "method": upd.method, "damp": upd.damp, "damp_kind": upd.damp_kind, "blocksize": upd.blocksize,
            "quota": upd.quota, "seconds": record.update_seconds,
            "note": "SparseGPT's OBS reconstruction on the outputs of the already-pruned blocks; with EMP or "
                    "matched counts every row keeps exactly its decided count, with a fixed sparsity each "
                    "column block prunes that fraction over all rows (SparseGPT's rule)"},
        "nm": None if upd.nm is None else f"{upd.nm[0]}:{upd.nm[1]}",
        "allocation": o.allocation,
    }


def summary_line(result: LMPruneResult) -> str:
    """One human line: sparsity against the dense model, zeros, time, memory, warnings."""
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
