"""``emprune.shrink``: structured EMP that removes units physically, and its report.

Data flow: model -> unit groups (:mod:`.units`) -> unit scores (:mod:`.scores`) -> how many per
group (EMP, a recipe, or a fixed ``keep=``) -> which (top-k by score, GQA-consistent for heads)
-> physical removal (:mod:`.remove`) -> :class:`ShrinkReport`.

Recipes say where EMP's counts come from and how units are allocated:

* ``paper``: the paper's rule on the criterion's own scores: ``floor(beta * N_eff)`` per group
  (``scope="layer"``) or one N_eff and one threshold over every unit (``scope="global"``); no
  floor, no bias compensation.
* ``sensitivity``: EMP decides how many parameters go (per-layer N_eff of ``sqrt(score)``,
  summed); the loss increase measured when each layer alone loses half its units decides where
  (:mod:`.sensitivity`); bias compensation, a 25 % per-group floor.
* ``default``: chosen by measurement on SmolLM2-135M (``benchmarks/results/shrink_smollm2.md``):
  for a decoder LM shrunk with calibration tokens (global scope), :data:`DEFAULT_RECIPE_LM`
  whatever the unit kinds; otherwise :data:`DEFAULT_RECIPE` for one unit kind,
  :data:`DEFAULT_RECIPE_MIXED` for several.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from .. import rule
from .scores import NEEDS, UNIT_SCORES, UnitStats, collect, unit_scores
from .sensitivity import allocate_by_sensitivity, group_sensitivity
from .units import HeadGroup, UnitGroup, find_groups, head_keep_mask

SCOPES = ("layer", "global")


@dataclass(frozen=True)
class Recipe:
    """How many units to keep and where.

    ``count``: scores whose N_eff sets the per-group count (``score`` = the criterion's own;
    ``sqrt`` / ``log1p`` = damped versions: ``sqrt(s)``, ``log1p(s / median)``).
    ``allocate`` (with ``scope="global"``): ``threshold`` = one N_eff and one threshold over the
    raw scores of every unit (the paper's global scope); ``zscore`` / ``mean`` = the total that the
    per-group counts of one unit kind remove (in parameters) is removed again across the layers,
    separately for each kind, in the order of the scores standardised per group
    (``(s - mean) / std``) or divided by the group mean; ``joint=True``: one allocation over all
    kinds at once (normalised scores of heads and neurons compared directly). ``allocate_on``:
    ``score`` (the criterion's scores) or ``count`` (the count scores, e.g. ``sqrt(score)``) are
    normalised for the allocation; ``sensitivity`` = EMP's total is removed where the measured loss
    increase is smallest (:mod:`.sensitivity`; one allocation over all kinds; ``sens_fraction``: the
    share of each group removed to measure it). ``min_keep``: per-group floor (a fraction of the
    group). ``compensate``: fold removed units' mean contribution into the consumer's bias (FLAP;
    needs activations)."""

    name: str
    count: str = "score"
    allocate: str = "threshold"
    min_keep: float | None = None
    compensate: bool = False
    summary: str = ""
    joint: bool = False
    allocate_on: str = "score"
    sens_fraction: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES: dict[str, Recipe] = {
    "paper": Recipe("paper", summary="the paper's rule on the criterion's own scores; no floor, no compensation"),
    "zscore": Recipe("zscore", "sqrt", "zscore", None, True,
                     "per-layer EMP counts from sqrt(score) (for fluctuation: std x ||W_out||, an amplitude) set "
                     "the total; removal across layers and unit kinds by per-layer z-scores; bias compensation"),
    "mean": Recipe("mean", "sqrt", "mean", None, True,
                   "as zscore, but sqrt(score) divided by its layer's mean instead of standardised scores",
                   allocate_on="count"),
    "sqrt": Recipe("sqrt", "sqrt", "threshold", None, True,
                   "per-layer EMP counts from sqrt(score), used per layer with --scope layer; bias compensation"),
    "floor": Recipe("floor", "score", "threshold", 0.5, True,
                    "the paper's rule with a 50 % per-layer floor; bias compensation"),
    "mean-joint": Recipe("mean-joint", "sqrt", "mean", None, True,
                         "as mean, with one allocation over heads and neurons together (sqrt(score) / layer mean)",
                         joint=True, allocate_on="count"),
    "sensitivity": Recipe("sensitivity", "sqrt", "sensitivity", 0.25, True,
                          "per-layer EMP counts from sqrt(score) set the total; removal where the measured loss "
                          "increase (each layer alone losing half its units) is smallest; bias compensation; "
                          "25 % floor per group", joint=True),
}
#: the defaults where no loss is measured (models other than decoder LMs, no calibration data,
#: ``scope="layer"``), chosen by measurement on SmolLM2-135M (benchmarks/results/shrink_smollm2.md):
#: ``zscore`` for one unit kind, ``mean-joint`` when several kinds are shrunk together
DEFAULT_RECIPE = "zscore"
DEFAULT_RECIPE_MIXED = "mean-joint"
#: the default for a decoder LM with calibration tokens (measured on SmolLM2-135M, see the results
#: table: 11-23 % lower held-out perplexity than uniform removal at equal size for --units mlp, and
#: far lower than mean-joint for mlp,heads); the two above remain for other models and no data
DEFAULT_RECIPE_LM = "sensitivity"
#: calibration tokens the sensitivity measurement uses (the first rows of the calibration set)
SENSITIVITY_TOKENS = 1024
DEFAULT_SCOPE = "global"
DEFAULT_CRITERION = "fluctuation"
RECIPE_CHOICES = ("default", *RECIPES)


def get_recipe(recipe: str | Recipe = "default", mixed: bool = False, lm: bool = False) -> Recipe:
    """A named recipe (``default`` = :data:`DEFAULT_RECIPE_LM` for a decoder LM whose loss can be
    measured, ``lm``; else :data:`DEFAULT_RECIPE_MIXED` when ``mixed``: several unit kinds at once;
    else :data:`DEFAULT_RECIPE`)."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe == "default":
        key = DEFAULT_RECIPE_LM if lm else DEFAULT_RECIPE_MIXED if mixed else DEFAULT_RECIPE
    else:
        key = recipe
    if key not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPE_CHOICES)}; got {recipe!r}")
    return RECIPES[key]


# --------------------------------------------------------------------------- report


@dataclass
class GroupReport:
    """One unit group: units and parameters before/after, N_eff and retained score mass."""

    name: str
    kind: str
    layer: int | None
    units_before: int
    units_after: int
    params_before: int
    params_after: int
    neff: float | None = None
    emp_count: int | None = None
    retained_mass: float | None = None
    bound: float | None = None
    kv_heads_after: int | None = None
    kept: list[int] = field(default_factory=list)
    sensitivity: float | None = None

    @property
    def bound_ok(self) -> bool | None:
        if self.bound is None or self.retained_mass is None:
            return None
        return self.retained_mass >= self.bound - 1e-9


@dataclass
class ShrinkReport:
    """What :func:`shrink` did, per group and in total (parameters counted on the real model)."""

    criterion: str
    scope: str
    beta: float | None
    recipe: dict[str, Any]
    keep: Any
    groups: list[GroupReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    embedding_params: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    macs_note: str = ""
    global_neff: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def removed_fraction(self) -> float:
        """Removed share of all parameters."""
        return 1 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def removed_fraction_non_embedding(self) -> float:
        """Removed share of the non-embedding parameters (the usual LLM measure)."""
        dense = self.params_before - self.embedding_params
        return (self.params_before - self.params_after) / dense if dense else 0.0

    @property
    def bound_ok(self) -> bool:
        return all(g.bound_ok is not False for g in self.groups)

    def widths(self) -> dict[str, list[int]]:
        """Units kept per layer, by kind."""
        out: dict[str, list[int]] = {}
        for g in self.groups:
            out.setdefault(g.kind, []).append(g.units_after)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["removed_fraction"] = self.removed_fraction
        d["removed_fraction_non_embedding"] = self.removed_fraction_non_embedding
        d["bound_ok"] = self.bound_ok
        if self.macs_before and self.macs_after:
            d["mac_ratio"] = self.macs_before / self.macs_after
        return d

    def summary(self) -> str:
        """One line: parameters and MACs before/after."""
        s = (f"shrunk {self.params_before:,} -> {self.params_after:,} parameters "
             f"({100 * self.removed_fraction:.2f}% removed; {100 * self.removed_fraction_non_embedding:.2f}% "
             f"of the non-embedding parameters)")
        if self.macs_before and self.macs_after:
            s += f"; MACs {self.macs_before:,} -> {self.macs_after:,} (x{self.macs_before / self.macs_after:.3f} fewer)"
        return s

    def __str__(self) -> str:
        sens = any(g.sensitivity is not None for g in self.groups)
        head = (f"{'group':<34} {'kind':<8} {'units':>12} {'N_eff':>9} {'params':>21} {'mass':>7} {'bound':>7}"
                + (f" {'loss+':>8}" if sens else ""))
        lines = [f"criterion={self.criterion} scope={self.scope} beta={self.beta} recipe={self.recipe.get('name')} "
                 f"keep={self.keep}", head, "-" * len(head)]
        for g in self.groups:
            ne = f"{g.neff:9.1f}" if g.neff is not None else f"{'-':>9}"
            ma = f"{g.retained_mass:7.3f}" if g.retained_mass is not None else f"{'-':>7}"
            bo = f"{g.bound:7.3f}" if g.bound is not None else f"{'-':>7}"
            lines.append(f"{g.name[-34:]:<34} {g.kind:<8} {g.units_before:>5} -> {g.units_after:<4} {ne} "
                         f"{g.params_before:>9,} -> {g.params_after:<9,} {ma} {bo}"
                         + (f" {g.sensitivity:8.4f}" if g.sensitivity is not None else f" {'-':>8}" if sens else ""))
        if sens:
            lines.append(f"loss+: calibration loss increase when that group alone loses "
                         f"{100 * self.recipe.get('sens_fraction', 0.5):.0f}% of its units (where EMP's total goes)")
        lines.append(self.summary())
        return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


def _is_lm(model: nn.Module) -> bool:
    return isinstance(getattr(getattr(model, "model", None), "layers", None), nn.ModuleList)


def _realised(g: UnitGroup, k: int, head_mode: str) -> int:
    """Units actually kept when ``k`` are asked for (heads round to the GQA structure)."""
    k = max(1, min(int(k), g.n))
    if isinstance(g, HeadGroup):
        if head_mode == "group":
            return g.group_size * min(g.n_kv, max(1, round(k / g.group_size)))
        return g.n_kv * min(g.group_size, max(1, round(k / g.n_kv)))
    return k


def _removed_params(groups: list[UnitGroup], counts: list[int], head_mode: str) -> int:
    """Parameters the groups lose when each keeps ``counts`` units (heads rounded as realised)."""
    return sum((g.n - _realised(g, k, head_mode)) * g.params_per_unit() for g, k in zip(groups, counts))


def _select(g: UnitGroup, s: Tensor, k: int, head_mode: str) -> Tensor:
    """Top-``k`` mask by ``s`` (GQA-consistent for heads)."""
    k = max(1, min(int(k), g.n))
    if isinstance(g, HeadGroup):
        return head_keep_mask(s, k, g.n_kv, head_mode)
    return rule.topk_mask(s, k)


def _count_scores(s: Tensor, how: str) -> Tensor:
    if how == "score":
        return s
    if how == "sqrt":
        return s.sqrt()
    if how == "log1p":
        med = s.median().clamp_min(1e-300)
        return torch.log1p(s / med)
    raise ValueError(f"recipe count must be score, sqrt or log1p; got {how!r}")


def _fixed_counts(groups: list[UnitGroup], keep: Any, head_mode: str) -> list[int]:
    """Per-group counts for ``keep=``: a fraction, a count, ``{group name: count}`` or
    ``{"params": P}`` (the same fraction in every group, the largest whose kept group
    parameters do not exceed ``P``)."""
    if isinstance(keep, bool):
        raise ValueError(f"keep must be a fraction, a count or a dict, got {keep!r}")
    if isinstance(keep, float):
        if not 0 < keep <= 1:
            raise ValueError(f"keep as a fraction must lie in (0, 1], got {keep}")
        return [max(1, round(keep * g.n)) for g in groups]
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"keep as a count must be >= 1, got {keep}")
        return [min(keep, g.n) for g in groups]
    if isinstance(keep, dict) and set(keep) == {"params"}:
        budget = float(keep["params"])
        ppu = [g.params_per_unit() for g in groups]
        now = [g.params() for g in groups]
        if budget >= sum(now):
            return [g.n for g in groups]

        def kept(f: float) -> tuple[list[int], int]:
            ks = [_realised(g, max(1, round(f * g.n)), head_mode) for g in groups]
            return ks, sum(p0 - (g.n - k) * p for g, k, p, p0 in zip(groups, ks, ppu, now))

        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if kept(mid)[1] <= budget:
                lo = mid
            else:
                hi = mid
        return kept(lo)[0]
    if isinstance(keep, dict):
        missing = [g.name for g in groups if g.name not in keep]
        if missing:
            raise ValueError(f"keep has no count for {missing[:3]}")
        return [int(keep[g.name]) for g in groups]
    raise ValueError(f"keep must be a fraction, a count, {{group: count}} or {{'params': P}}; got {keep!r}")


def _allocate_global(groups: list[UnitGroup], scores: list[Tensor], removed_params: float, how: str,
                     floors: list[int]) -> list[Tensor]:
    """Remove ``removed_params`` parameters across all groups, lowest normalised score first;
    every group keeps at least its floor (its best units). Returns keep masks."""
    norm, gid, uid = [], [], []
    for j, (g, s) in enumerate(zip(groups, scores)):
        if how == "zscore":
            sd = s.std() if s.numel() > 1 else torch.tensor(1.0, dtype=torch.float64)
            z = (s - s.mean()) / (sd if sd > 0 else 1.0)
        elif how == "mean":
            m = s.mean()
            z = s / (m if m > 0 else 1.0)
        else:
            raise ValueError(f"allocate must be threshold, zscore or mean; got {how!r}")
        protected = torch.zeros(g.n, dtype=torch.bool)
        protected[s.topk(max(1, floors[j])).indices] = True
        cand = (~protected).nonzero().squeeze(1)
        norm.append(z[cand])
        gid.append(torch.full((cand.numel(),), j, dtype=torch.int64))
        uid.append(cand)
    z, gi, ui = torch.cat(norm), torch.cat(gid), torch.cat(uid)
    order = torch.argsort(z, stable=True)
    ppu = torch.tensor([g.params_per_unit() for g in groups], dtype=torch.float64)
    cum = ppu[gi[order]].cumsum(0)
    n_remove = int((cum < removed_params).sum()) + (1 if removed_params > 0 else 0)
    n_remove = min(n_remove, order.numel())
    keep = [torch.ones(g.n, dtype=torch.bool) for g in groups]
    for r in order[:n_remove].tolist():
        keep[int(gi[r])][int(ui[r])] = False
    return keep


def _consistent_heads(groups: list[UnitGroup], scores: list[Tensor], keep: list[Tensor], head_mode: str) -> list[Tensor]:
    """Round head masks chosen freely (global decisions) to the GQA structure."""
    out = []
    for g, s, m in zip(groups, scores, keep):
        if isinstance(g, HeadGroup):
            m = head_keep_mask(s, max(1, int(m.sum())), g.n_kv, head_mode)
        elif not bool(m.any()):
            m = rule.topk_mask(s, 1)
        out.append(m)
    return out


def macs_lm(model: nn.Module, seqlen: int = 512) -> int:
    """Multiply-adds per token of a decoder LM at context ``seqlen``: every Linear (the LM head
    included; the embedding lookup is free) plus the attention products ``QK^T`` and ``AV``
    averaged over a causal window of ``seqlen`` tokens."""
    from ..llm.models import decoder_layers

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


def _lm_forward(model: nn.Module, b: Tensor) -> Any:
    return model(b.to(next(model.parameters()).device), use_cache=False)


def _loss_batches(calibration: Iterable[Any] | Tensor | None, lm: bool) -> list[Any]:
    """The batches the sensitivity is measured on: the first :data:`SENSITIVITY_TOKENS`
    calibration tokens of an LM, else the first 4 batches."""
    if calibration is None:
        return []
    if lm and isinstance(calibration, Tensor):
        rows = max(1, SENSITIVITY_TOKENS // max(int(calibration.shape[-1]), 1))
        return lm_batches(calibration[:rows])
    return list(itertools.islice(iter(calibration), 4))


def _lm_loss(model: nn.Module, b: Tensor) -> Tensor:
    b = b.to(next(model.parameters()).device)
    return model(b, labels=b, use_cache=False).loss


def score_units(
    model: nn.Module,
    units: str | tuple[str, ...] = "auto",
    criterion: str = "magnitude",
    calibration: Iterable[Any] | Tensor | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> tuple[list[UnitGroup], list[Tensor], UnitStats | None]:
    """Find the unit groups and score them (no change to the model).

    ``calibration``: batches for activation / Taylor scores; for a decoder LM a token tensor
    ``[n, seqlen]`` (run in batches of 8; Taylor uses the causal-LM loss)."""
    if criterion not in UNIT_SCORES:
        raise ValueError(f"criterion must be one of {', '.join(UNIT_SCORES)}; got {criterion!r}")
    groups = find_groups(model, units)
    need = NEEDS[criterion]
    stats = None
    if need is not None or calibration is not None:
        if calibration is None:
            raise ValueError(f"criterion {criterion!r} needs calibration data (calibration=...)")
        batches = calibration
        if _is_lm(model) and isinstance(calibration, Tensor):
            batches = lm_batches(calibration)
            forward = forward or _lm_forward
            loss_fn = loss_fn or _lm_loss
        stats = collect(model, groups, batches, taylor=need == "gradients", loss_fn=loss_fn, forward=forward)
    return groups, unit_scores(groups, criterion, stats), stats


@torch.no_grad()
def shrink(
    model: nn.Module,
    units: str | tuple[str, ...] = "auto",
    criterion: str | None = None,
    scope: str | None = None,
    beta: float = 1.0,
    calibration: Iterable[Any] | Tensor | None = None,
    keep: float | int | dict | None = None,
    *,
    recipe: str | Recipe = "default",
    count_by: str | None = None,
    head_mode: str = "query",
    compensate: bool | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    example_input: Tensor | None = None,
    macs_seqlen: int = 512,
    scored: tuple[list[UnitGroup], list[Tensor], UnitStats | None] | None = None,
    dry_run: bool = False,
    progress: bool = False,
) -> ShrinkReport:
    """Score structural units, let EMP decide how many to keep, remove the rest physically.

    ``units``: ``mlp``, ``heads`` (decoder LMs, LLaMA family), ``neurons``, ``channels``, ``kan``
    (plain chains), comma-joined, or ``auto``. ``criterion``: a unit score of
    :data:`~emprune.structured.scores.UNIT_SCORES` (default: the recipe's; ``magnitude`` without
    calibration data). ``scope``: ``layer`` (``floor(beta * N_eff)`` per group) or ``global`` (one
    decision over all groups; how, the recipe says). ``keep``: fixed-size baselines instead of
    EMP: a fraction or a count per group, ``{group name: count}``, or ``{"params": P}`` (the
    same fraction everywhere, kept group parameters <= P). ``recipe``: ``default`` or ``paper``
    (the paper's exact rule) or another of :data:`RECIPES`. ``count_by``: criterion whose N_eff
    sets how many (default: ``criterion``). ``head_mode``: ``query`` (every KV group keeps the
    same number of query heads) or ``group`` (whole KV groups). ``compensate``: FLAP bias
    compensation (default: the recipe's for EMP counts, off for ``keep=`` baselines). ``calibration``: batches, or token ids
    ``[n, seqlen]`` for an LM (the ``sensitivity`` recipe measures the loss on its first
    :data:`SENSITIVITY_TOKENS` tokens; for other models on the first batches with ``loss_fn``).
    ``scored``: reuse :func:`score_units`'s output (same model, not yet changed). The model is
    changed in place (``dry_run=True``: only decided and reported, with ``params_after``
    computed, not measured); ``progress``: a bar over the sensitivity measurement. Returns a
    :class:`ShrinkReport`."""
    t0 = time.perf_counter()
    rec = get_recipe(recipe)  # validated now; the default is resolved once the unit kinds are known
    is_default = not isinstance(recipe, Recipe) and recipe == "default"
    if criterion is None:
        criterion = DEFAULT_CRITERION if (calibration is not None or scored is not None) else "magnitude"
    if scope is None:
        scope = DEFAULT_SCOPE if is_default or rec.allocate == "sensitivity" else "layer"
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    b = rule._check_beta(beta) if keep is None else None
    if scored is None:
        scored = score_units(model, units, criterion, calibration, loss_fn, forward)
    groups, scores, stats = scored
    lm = _is_lm(model)
    if is_default:  # resolved now that the unit kinds are known
        rec = get_recipe("default", mixed=len({g.kind for g in groups}) > 1,
                         lm=lm and calibration is not None and scope == "global")
    comp = (rec.compensate and keep is None) if compensate is None else bool(compensate)
    if comp and compensate is None and stats is None:
        comp = False  # the recipe's compensation, but no activations to compensate with
    sens_batches = None
    if rec.allocate == "sensitivity" and keep is None:
        if scope != "global":
            raise ValueError(f"recipe {rec.name!r} allocates across layers: use scope='global'")
        loss_fn = loss_fn or (_lm_loss if lm else None)
        sens_batches = _loss_batches(calibration, lm)
        if loss_fn is None or not sens_batches:
            raise ValueError(f"recipe {rec.name!r} measures the loss: it needs calibration data and, "
                             "for a model other than a decoder LM, loss_fn=(model, batch) -> loss")
    if comp and stats is None:
        raise ValueError("bias compensation needs calibration data (calibration=...)")
    count_scores = scores
    if count_by is not None and count_by != criterion:
        count_scores = unit_scores(groups, count_by, stats)

    params_before = sum(p.numel() for p in model.parameters())
    emb = _embedding_params(model)
    macs_before = macs_lm(model, macs_seqlen) if lm else (macs_plain(model, example_input) if example_input is not None else None)

    sens = None
    if sens_batches is not None:
        sens = group_sensitivity(model, groups, scores, sens_batches, loss_fn, fraction=rec.sens_fraction,
                                 compensate=comp, means=[stats.mean(g) for g in groups] if comp else None,
                                 select=lambda g, s, k: _select(g, s, k, head_mode), progress=progress)
    masks, neffs, emp_k, global_neff = _decide(groups, scores, count_scores, rec, b, scope, keep, head_mode, sens)

    report = ShrinkReport(criterion=criterion, scope=scope, beta=None if keep is not None else b,
                          recipe={**rec.to_dict(), "compensate": comp, "count_by": count_by or criterion,
                                  "head_mode": head_mode},
                          keep=keep)
    _remove_and_report(report, groups, scores, masks, neffs, emp_k, dry_run=dry_run, comp=comp, stats=stats,
                       exact_bound=scope == "layer" and count_by in (None, criterion) and rec.count == "score")
    if sens is not None:
        for gr, x in zip(report.groups, sens):
            gr.sensitivity = x
    if lm and not dry_run:
        _sync_config(model, groups)
    report.params_before = params_before
    report.params_after = (params_before - sum(g.params_before - g.params_after for g in report.groups) if dry_run
                           else sum(p.numel() for p in model.parameters()))
    report.embedding_params = emb
    report.macs_before = macs_before
    report.macs_after = None if dry_run else macs_lm(model, macs_seqlen) if lm else (macs_plain(model, example_input) if example_input is not None else None)
    report.macs_note = (f"per token at context {macs_seqlen}: every Linear incl. the LM head, plus QK^T and AV"
                        if lm else "per example_input forward: Linear and Conv multiply-adds")
    report.global_neff = global_neff
    report.seconds = time.perf_counter() - t0
    return report


def _decide(groups: list[UnitGroup], scores: list[Tensor], count_scores: list[Tensor], rec: Recipe,
            b: float | None, scope: str, keep: float | int | dict | None, head_mode: str,
            sens: list[float] | None = None
            ) -> tuple[list[Tensor], list[float | None], list[int | None], float | None]:
    """The keep mask of every group: fixed sizes (``keep``), per-layer EMP counts (``scope``
    layer), or one global decision (threshold, allocation of EMP's total by measured
    sensitivity ``sens``, or per-kind allocation by normalised scores).
    Returns ``(masks, N_eff per group, EMP count per group, global N_eff)``."""
    neffs: list[float | None] = [None] * len(groups)
    emp_k: list[int | None] = [None] * len(groups)
    global_neff = None
    if keep is not None:
        ks = _fixed_counts(groups, keep, head_mode)
        masks = [_select(g, s, k, head_mode) for g, s, k in zip(groups, scores, ks)]
    else:
        floors = [max(1, math.ceil(rec.min_keep * g.n)) if rec.min_keep else 1 for g in groups]
        sens_alloc = scope == "global" and rec.allocate == "sensitivity"
        for j, (g, c) in enumerate(zip(groups, count_scores)):
            cs = _count_scores(c, rec.count)
            neffs[j] = float(rule.effective_number(cs))
            emp_k[j] = int(rule.keep_count_from_neff(torch.tensor(neffs[j]), b, g.n))
            if not sens_alloc:  # there the floor bounds where EMP's total goes, not the total
                emp_k[j] = max(emp_k[j], floors[j])
        if scope == "layer":
            masks = [_select(g, s, k, head_mode) for g, s, k in zip(groups, scores, emp_k)]
        elif rec.allocate == "threshold":
            srcs = [_count_scores(c, rec.count).float() for c in count_scores]
            thr = rule.global_threshold(srcs, b)
            global_neff = thr.n_eff
            raw = list(rule.global_masks(srcs, thr))
            if count_scores is not scores:  # counts from one score, selection by another
                raw = [rule.topk_mask(s, max(1, int(m.sum()))) for s, m in zip(scores, raw)]
            raw = [m | rule.topk_mask(s, f) if f > 1 else m for m, s, f in zip(raw, scores, floors)]
            masks = _consistent_heads(groups, scores, raw, head_mode)
        elif rec.allocate == "sensitivity":
            ks = allocate_by_sensitivity(groups, sens, _removed_params(groups, emp_k, head_mode), rec.sens_fraction,
                                         [(g.n - f) / g.n for g, f in zip(groups, floors)])
            masks = [_select(g, s, k, head_mode) for g, s, k in zip(groups, scores, ks)]
        else:
            # one allocation per unit kind: standardised scores of heads and of neurons are not
            # comparable (measured: mixing them removes the wrong heads, x3.8 vs x2.8 perplexity)
            raw: list[Tensor | None] = [None] * len(groups)
            parts = [list(range(len(groups)))] if rec.joint else [
                [j for j, g in enumerate(groups) if g.kind == kind] for kind in dict.fromkeys(g.kind for g in groups)]
            for idx in parts:
                removed = _removed_params([groups[j] for j in idx], [emp_k[j] for j in idx], head_mode)
                on = [scores[j] if rec.allocate_on == "score" else _count_scores(count_scores[j], rec.count)
                      for j in idx]
                sub = _allocate_global([groups[j] for j in idx], on, removed, rec.allocate, [floors[j] for j in idx])
                for j, m in zip(idx, sub):
                    raw[j] = m
            masks = _consistent_heads(groups, scores, raw, head_mode)

    return masks, neffs, emp_k, global_neff


def _remove_and_report(report: "ShrinkReport", groups: list[UnitGroup], scores: list[Tensor], masks: list[Tensor],
                       neffs: list[float | None], emp_k: list[int | None], *, dry_run: bool, comp: bool,
                       stats: UnitStats | None, exact_bound: bool) -> None:
    """Remove the unkept units of every group (after folding their mean output into a bias if
    ``comp``) and record each group in ``report`` (``dry_run``: record only). ``exact_bound``:
    the counts are the paper's per-layer rule on the selection scores, so the mass bound holds."""
    for j, (g, s, m) in enumerate(zip(groups, scores, masks)):
        n_before, p_before = g.n, g.params()
        mass = float(rule.retained_mass(s.float(), m)) if s.numel() else None
        if dry_run:
            k = int(m.sum())
            report.groups.append(GroupReport(g.name, g.kind, g.layer, n_before, k, p_before,
                                             p_before - (n_before - k) * g.params_per_unit(), neffs[j], emp_k[j],
                                             mass, None, None, m.nonzero().squeeze(1).tolist()))
            continue
        if comp:
            g.compensate(m, stats.mean(g))
        g.remove(m)
        bound = None
        if neffs[j] is not None and exact_bound:
            nu = max(1, min(int(math.floor(neffs[j])), n_before))
            bound = float(rule.guaranteed_mass(torch.tensor([float(nu)]), torch.tensor([int(m.sum())]), n_before)[0])
        report.groups.append(GroupReport(g.name, g.kind, g.layer, n_before, g.n, p_before, g.params(),
                                         neffs[j], emp_k[j], mass, bound,
                                         g.n_kv if isinstance(g, HeadGroup) else None,
                                         m.nonzero().squeeze(1).tolist()))


def _sync_config(model: nn.Module, groups: list[UnitGroup]) -> None:
    """Record per-layer widths on the config (``emprune_shrunk``) and, where every layer has the
    same width, the stock fields (``intermediate_size``, ``num_attention_heads``,
    ``num_key_value_heads``; ``head_dim`` pinned) so that a plain transformers load works."""
    from ..llm.models import decoder_layers

    config = model.config
    text = getattr(config, "get_text_config", lambda: config)()
    layers = decoder_layers(model)
    hd = None
    inter, heads, kv = [], [], []
    for block in layers:
        mlp, attn = getattr(block, "mlp", None), getattr(block, "self_attn", None)
        inter.append(int(mlp.down_proj.in_features))
        hd = int(getattr(attn, "head_dim", 0) or text.head_dim)
        heads.append(int(attn.q_proj.out_features // hd))
        kv.append(int(attn.k_proj.out_features // hd))
    text.head_dim = hd
    shrunk = {"intermediate_sizes": inter, "num_attention_heads": heads, "num_key_value_heads": kv,
              "mlp_bias": any(getattr(b.mlp.down_proj, "bias", None) is not None for b in layers),
              "o_bias": any(getattr(b.self_attn.o_proj, "bias", None) is not None for b in layers)}
    if len(set(inter)) == 1:
        _set_valid(text, intermediate_size=inter[0])
    if len(set(heads)) == 1 and len(set(kv)) == 1:
        _set_valid(text, num_attention_heads=heads[0], num_key_value_heads=kv[0])
    shrunk["uniform"] = (text.intermediate_size == inter[0] and len(set(inter)) == 1
                         and text.num_attention_heads == heads[0] and text.num_key_value_heads == kv[0]
                         and len(set(heads)) == 1 and len(set(kv)) == 1)
    text.emprune_shrunk = shrunk


def _set_valid(config: Any, **fields: Any) -> bool:
    """Set stock config fields, reverting them if the config's own validation refuses the result
    (e.g. LlamaConfig wants ``hidden_size`` divisible by ``num_attention_heads``)."""
    old = {k: getattr(config, k) for k in fields}
    for k, v in fields.items():
        setattr(config, k, v)
    try:
        if hasattr(config, "validate"):
            config.validate()
    except Exception:  # noqa: BLE001 - transformers raises several error types here
        for k, v in old.items():
            setattr(config, k, v)
        return False
    return True
