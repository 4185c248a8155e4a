"""``emprune.shrink``: structured EMP that removes units physically.

Data flow, through the same rooms as a masking run: model -> unit groups
(:mod:`emprune.structure.units`) -> unit scores (:mod:`emprune.criteria.unit_scores`) -> one
:class:`~emprune.decide.scopes.Target` per group -> :func:`~emprune.decide.scopes.decide` (EMP's
count per group with the layer scope; with the global scope an allocator of
:mod:`emprune.decide.allocate` spreads EMP's total: one threshold, normalised scores or the
measured sensitivity; a fixed ``keep=`` size is an allocator too) -> physical removal
(:func:`emprune.act.remove.remove_units`) -> :class:`~emprune.act.report.ShrinkReport`.

Recipes (:mod:`emprune.decide.recipes`, the one table shared with masks) say where the counts
come from and how they are allocated. ``default`` is chosen by measurement on SmolLM2-135M
(``benchmarks/results/shrink_smollm2.md``): ``sensitivity`` for a decoder LM shrunk with
calibration tokens (global scope) whatever the unit kinds; otherwise ``zscore`` for one unit
kind, ``mean-joint`` for several.
"""
from __future__ import annotations

import itertools
import operator
import time
from functools import partial
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..core.checks import one_of
from .. import criteria as C
from ..act.remove import remove_units
from ..act.report import ShrinkReport
from ..core import rule
from ..criteria.unit_scores import UnitStats, collect, unit_scores
from ..decide import allocate as A
from ..decide import recipes
from ..decide.scopes import Target, decide
from ..decide.sensitivity import group_sensitivity
from ..models.stream import DiskModel
from ..structure.layouts import decoder_layers
from ..structure.surgery import sync_config
from ..structure.units import HeadGroup, MLPGroup, UnitGroup, find_groups
from .options import ShrinkOptions, build
from .shrink_disk import remove_from_disk, sensitivity_from_disk

SCOPES = ("layer", "global")
#: calibration tokens the sensitivity measurement uses (the first rows of the calibration set)
SENSITIVITY_TOKENS = 1024
DEFAULT_SCOPE = "global"
DEFAULT_CRITERION = "fluctuation"

Scored = tuple[list[UnitGroup], list[Tensor], UnitStats | None]


def is_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder LM (``model.model.layers``)."""
    return isinstance(getattr(getattr(model, "model", None), "layers", None), nn.ModuleList)


def macs_lm(model: nn.Module, seqlen: int = 512) -> int:
    """Multiply-adds per token of a decoder LM at context ``seqlen``: every Linear (the LM head
    included; the embedding lookup is free) plus the attention products ``QK^T`` and ``AV``
    averaged over a causal window of ``seqlen`` tokens."""
    total = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    ctx = (seqlen + 1) / 2
    for block in decoder_layers(model):
        attn = getattr(block, "self_attn", None)
        if attn is not None and hasattr(attn, "q_proj"):
            total += int(2 * attn.q_proj.out_features * ctx)
    return int(total)


def macs_plain(model: nn.Module, example: Tensor) -> int:
    """Multiply-adds of Linear and Conv layers for one forward pass of ``example`` (one sample)."""
    total = [0]

    def hook(mod: nn.Module, inp: tuple, out: Tensor) -> None:
        if isinstance(mod, nn.Linear):
            total[0] += mod.in_features * mod.out_features * (out.numel() // out.shape[-1]) // max(out.shape[0], 1)
        else:
            k = mod.weight[0].numel()
            total[0] += k * out[0].numel()

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hs:
            h.remove()
    return total[0]


def _embedding_params(model: nn.Module) -> int:
    emb = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    n = sum(m.weight.numel() for m in emb)
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None and all(out.weight is not m.weight for m in emb):
        n += out.weight.numel()  # an untied LM head counts as embedding too
    return n


# --------------------------------------------------------------------------- API


def lm_batches(tokens: Tensor, batch_size: int = 8) -> list[Tensor]:
    """Split calibration token ids ``[n, seqlen]`` into batches."""
    if tokens.ndim != 2:
        raise ValueError(f"calibration tokens must be [n_samples, seqlen], got shape {tuple(tokens.shape)}")
    return [tokens[i : i + batch_size] for i in range(0, tokens.shape[0], batch_size)]


def lm_forward(model: nn.Module, b: Tensor) -> Any:
    """One calibration forward pass of a decoder LM on token ids ``b`` (no KV cache)."""
    return model(b.to(next(model.parameters()).device), use_cache=False)


def lm_loss(model: nn.Module, b: Tensor) -> Tensor:
    """The next-token loss of a decoder LM on token ids ``b``."""
    b = b.to(next(model.parameters()).device)
    return model(b, labels=b, use_cache=False).loss


def loss_batches(calibration: Iterable[Any] | Tensor | None, lm: bool) -> list[Any]:
    """The batches the sensitivity is measured on: the first :data:`SENSITIVITY_TOKENS`
    calibration tokens of an LM, else the first 4 batches."""
    if calibration is None:
        return []
    if lm and isinstance(calibration, Tensor):
        rows = max(1, SENSITIVITY_TOKENS // max(int(calibration.shape[-1]), 1))
        return lm_batches(calibration[:rows])
    return list(itertools.islice(iter(calibration), 4))


def score_units(
    model: nn.Module,
    units: str | tuple[str, ...] = "auto",
    criterion: str = "magnitude",
    calibration: Iterable[Any] | Tensor | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> Scored:
    """Find the unit groups and score them (no change to the model).

    ``calibration``: batches for activation / Taylor scores; for a decoder LM a token tensor
    ``[n, seqlen]`` (run in batches of 8; Taylor uses the causal-LM loss)."""
    unit_names = C.names(level="unit")
    one_of("criterion", criterion, unit_names)
    groups = find_groups(model, units)
    need = C.entry(criterion, level="unit").options.get("needs")
    stats = None
    if need is not None or calibration is not None:
        if calibration is None:
            raise ValueError(f"criterion {criterion!r} needs calibration data (calibration=...)")
        batches = calibration
        if is_lm(model) and isinstance(calibration, Tensor):
            batches = lm_batches(calibration)
            forward = forward or lm_forward
            loss_fn = loss_fn or lm_loss
        stats = collect(model, groups, batches, taylor=need == "gradients", loss_fn=loss_fn, forward=forward)
    return groups, unit_scores(groups, criterion, stats), stats


class _Run:
    """One shrink's resolved settings (what the options and the data imply)."""

    def __init__(self, model: nn.Module, o: ShrinkOptions, calibration: Any, scored: Scored | None) -> None:
        rec = recipes.get_recipe(o.recipe, "shrink")  # validated now; default resolved once the kinds are known
        self.is_default = not isinstance(o.recipe, recipes.Recipe) and o.recipe == "default"
        self.criterion = o.criterion or (DEFAULT_CRITERION if (calibration is not None or scored is not None)
                                         else "magnitude")
        self.scope = o.scope or (DEFAULT_SCOPE if self.is_default or rec.allocate == "sensitivity" else "layer")
        one_of("scope", self.scope, SCOPES)
        self.beta = rule.check_beta(o.beta) if o.keep is None else None
        self.multiple = check_multiple(o.multiple_of)
        self.lm = is_lm(model)
        self.rec = rec

    def resolve(self, o: ShrinkOptions, groups: list[UnitGroup], stats: UnitStats | None, calibration: Any) -> None:
        """The recipe for these unit kinds, the compensation, and the sensitivity batches."""
        if self.is_default:
            self.rec = recipes.get_recipe("default", "shrink", mixed=len({g.kind for g in groups}) > 1,
                                          lm=self.lm and calibration is not None and self.scope == "global")
        rec = self.rec
        comp = (rec.compensate and o.keep is None) if o.compensate is None else bool(o.compensate)
        if comp and o.compensate is None and stats is None:
            comp = False  # the recipe's compensation, but no activations to compensate with
        self.comp = comp
        self.sens_batches: list[Any] | None = None
        self.loss_fn = o.loss_fn
        self.removed = None
        if o.keep_params is not None:
            if rec.allocate != "sensitivity" or o.keep is not None or self.scope != "global":
                raise ValueError("keep_params sets the total of the sensitivity allocation: use it with that recipe, "
                                 "the global scope and no keep=")
            self.removed = sum(g.params() for g in groups) - float(o.keep_params)
            if self.removed < 0:
                raise ValueError(f"keep_params {o.keep_params} is more than the groups hold now "
                                 f"({sum(g.params() for g in groups)})")
        if rec.allocate == "sensitivity" and o.keep is None:
            if self.scope != "global":
                raise ValueError(f"recipe {rec.name!r} allocates across layers: use scope='global'")
            self.loss_fn = o.loss_fn or (lm_loss if self.lm else None)
            self.sens_batches = loss_batches(calibration, self.lm)
            if self.loss_fn is None or not self.sens_batches:
                raise ValueError(f"recipe {rec.name!r} measures the loss: it needs calibration data and, "
                                 "for a model other than a decoder LM, loss_fn=(model, batch) -> loss")
        if comp and stats is None:
            raise ValueError("bias compensation needs calibration data (calibration=...)")

    def allocator(self, o: ShrinkOptions, sens: list[float] | None) -> A.Allocator | None:
        """What spreads the counts over the groups (None: EMP per group, the layer scope)."""
        rec = self.rec
        if o.keep is not None:
            return A.FixedSize(o.keep)
        if self.scope == "layer":
            return None
        if rec.allocate == "threshold":
            return A.ByThreshold(self.beta, reselect=o.count_by not in (None, self.criterion))
        if rec.allocate == "sensitivity":
            return A.BySensitivity(list(sens or []), rec.sens_fraction, removed=self.removed)
        return A.ByNormalisedScores(rec.allocate, joint=rec.joint, on_count=rec.allocate_on == "count")


def check_multiple(m: Any) -> int:
    """``multiple_of`` as a whole number >= 1 (else ``ValueError``, one line)."""
    try:
        v = operator.index(m)
    except TypeError:
        v = 0
    if isinstance(m, bool) or v < 1:
        raise ValueError(f"multiple_of must be a whole number >= 1, got {m!r}")
    return int(v)


def _set_grids(groups: list[UnitGroup], o: ShrinkOptions, multiple: int) -> None:
    """Per-run settings of the groups: the heads' keep mode, the MLP widths' grid."""
    for g in groups:
        if isinstance(g, HeadGroup):
            g.mode = o.head_mode
        elif isinstance(g, MLPGroup):
            g.multiple = multiple


def unit_targets(groups: list[UnitGroup], scores: list[Tensor], counts: list[Tensor], transform: str) -> list[Target]:
    same = counts is scores and transform in ("none", "score")
    return [Target(g.name, torch.Size([g.n]), (lambda s=s: s),
                   None if same else (lambda c=c: recipes.count_scores(c, transform)), group=g)
            for g, s, c in zip(groups, scores, counts)]


@torch.no_grad()
def shrink(model: nn.Module, *, calibration: Iterable[Any] | Tensor | None = None, scored: Scored | None = None,
           options: ShrinkOptions | None = None, blocks: DiskModel | None = None, **fields: Any) -> ShrinkReport:
    """Score structural units, let EMP decide how many to keep, remove the rest physically.

    Options (:class:`~emprune.jobs.options.ShrinkOptions`, or its fields as keywords): ``units``
    (``mlp``, ``heads`` on decoder LMs of the LLaMA family; ``neurons``, ``channels``, ``kan`` on
    plain chains; comma-joined, or ``auto``), ``criterion`` (a unit score; default ``fluctuation``
    with calibration data, else ``magnitude``), ``scope`` (``layer``: ``floor(beta * N_eff)`` per
    group; ``global``: one decision over all groups, as the recipe says), ``keep`` (a fixed size
    instead of EMP: a fraction or count per group, ``{group: count}`` or ``{"params": P}``),
    ``recipe`` (``default``, ``paper`` or another shrink recipe of
    :data:`~emprune.decide.recipes.RECIPES`), ``count_by``, ``head_mode`` (``query``: every KV
    group keeps the same number of query heads; ``group``: whole KV groups), ``compensate``
    (FLAP bias compensation; default the recipe's for EMP counts, off for ``keep=``),
    ``multiple_of`` (every kept MLP width a multiple of it or the full width, chosen on that grid
    by the allocation, see :mod:`emprune.decide.allocate`; 1: any width; heads and the units of
    other networks have no grid), ``dry_run`` (decide and report only, ``params_after`` computed), ``progress``.

    ``calibration``: batches, or token ids ``[n, seqlen]`` for an LM (the ``sensitivity`` recipe
    measures the loss on its first :data:`SENSITIVITY_TOKENS` tokens; other models on the first
    batches with ``loss_fn``). ``scored``: reuse :func:`score_units`'s output (same model, not yet
    changed). The model is changed in place. Returns a :class:`ShrinkReport`.

    ``blocks``: the model is streamed from disk (:class:`~emprune.models.stream.DiskModel`, through
    :func:`~emprune.jobs.shrink_lm.shrink_lm`, which scores it first): the same decisions, with the
    sensitivity measured and the units removed block by block (:mod:`emprune.jobs.shrink_disk`),
    each block written out as it is done."""
    o = build(ShrinkOptions, options, fields)
    if blocks is not None and scored is None:
        raise ValueError("a model streamed from disk is scored first: emprune.shrink_lm(model, tokens, blocks=...)")
    if scored is None and "layers" in (o.units.split(",") if isinstance(o.units, str) else o.units):
        raise ValueError("units 'layers' (whole decoder blocks) is a causal-LM job: "
                         "emprune.shrink_lm(model, calibration_tokens, units=...)")
    t0 = time.perf_counter()
    run = _Run(model, o, calibration, scored)
    if scored is None:
        scored = score_units(model, o.units, run.criterion, calibration, o.loss_fn, o.forward)
    groups, scores, stats = scored
    run.resolve(o, groups, stats, calibration)
    _set_grids(groups, o, run.multiple)
    counts = scores if o.count_by in (None, run.criterion) else unit_scores(groups, o.count_by, stats)
    before = measure_sizes(model, o, run.lm)

    sens = None
    if run.sens_batches is not None:
        measure = partial(group_sensitivity, model) if blocks is None else partial(sensitivity_from_disk, blocks)
        sens = measure(groups, scores, run.sens_batches, run.loss_fn, fraction=run.rec.sens_fraction,
                       means=[stats.mean(g) for g in groups] if run.comp else None, progress=o.progress)
    allocator = run.allocator(o, sens)
    decisions = list(decide(unit_targets(groups, scores, counts, run.rec.transform), "layer" if allocator is None
                            else "global", run.beta or 1.0, min_keep=run.rec.min_keep, allocate=allocator))
    report = ShrinkReport(criterion=run.criterion, scope=run.scope, beta=run.beta,
                          recipe={**run.rec.to_dict(), "compensate": run.comp, "count_by": o.count_by or run.criterion,
                                  "head_mode": o.head_mode}, keep=o.keep,
                          multiple_of=run.multiple if any(isinstance(g, MLPGroup) for g in groups) else None)
    exact = (run.scope == "layer" and o.keep is None and o.count_by in (None, run.criterion)
             and run.rec.transform == "none")
    remove = (remove_units if blocks is None or o.dry_run
              else partial(remove_from_disk, blocks, progress=o.progress))
    report.groups = remove(groups, decisions, stats=stats, compensate=run.comp, exact_bound=exact, dry_run=o.dry_run)
    for gr, x in zip(report.groups, sens or []):
        gr.sensitivity = x
    if run.lm and not o.dry_run:
        sync_config(model)
    finish_sizes(report, model, o, run.lm, before)
    report.global_neff = getattr(allocator, "neff", None)
    report.seconds = time.perf_counter() - t0
    return report


def measure_sizes(model: nn.Module, o: ShrinkOptions, lm: bool) -> tuple[int, int, int | None]:
    """Parameters, embedding parameters and MACs of ``model`` now."""
    macs = (macs_lm(model, o.macs_seqlen) if lm
            else macs_plain(model, o.example_input) if o.example_input is not None else None)
    return sum(p.numel() for p in model.parameters()), _embedding_params(model), macs


def finish_sizes(report: ShrinkReport, model: nn.Module, o: ShrinkOptions, lm: bool,
            before: tuple[int, int, int | None]) -> None:
    """Sizes before and after (computed for a dry run, measured otherwise)."""
    report.params_before, report.embedding_params, report.macs_before = before
    report.params_after = (report.params_before - sum(g.params_before - g.params_after for g in report.groups)
                           if o.dry_run else sum(p.numel() for p in model.parameters()))
    report.macs_after = None if o.dry_run else measure_sizes(model, o, lm)[2]
    report.macs_note = (f"per token at context {o.macs_seqlen}: every Linear incl. the LM head, plus QK^T and AV"
                        if lm else "per example_input forward: Linear and Conv multiply-adds")
