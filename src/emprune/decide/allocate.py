"""Allocation: how a size is spread over the targets once its total is known.

EMP says *how many* (``floor(beta * N_eff)`` of every score vector). When a whole model is cut
these counts are often moved between targets; the allocators here do that, and
:func:`~.scopes.decide` applies what they return (``decide(..., allocate=...)``):

* :class:`FixedSize`: a fixed size per unit group instead of EMP (``keep=``: a fraction, a count,
  ``{group: count}`` or ``{"params": P}``), the baselines at matched size;
* :class:`BySensitivity`: EMP's total, in parameters, removed where the measured loss increase
  is smallest (:mod:`.sensitivity` measures it);
* :class:`ByNormalisedScores`: EMP's total removed in the order of scores standardised per group
  (``zscore``) or divided by the group mean (``mean``), per unit kind or jointly;
* :class:`ByThreshold`: the paper's global scope for unit groups: one N_eff and one threshold
  over the (count) scores of every unit, each group then raised to its floor.

Width grids: an MLP group with ``multiple > 1`` (``emprune shrink --multiple-of``) keeps only the
widths of its grid (:func:`~emprune.structure.units.grid_widths`: multiples of ``m`` and its full
width). The allocators then step on that grid instead of rounding afterwards: a group's width
moves from one allowed width to the next below, and :func:`take_steps` takes the cheapest steps of
all groups until EMP's total is reached as closely as the grid allows (within half a step: ``m/2``
units of one group; :func:`by_sensitivity_on_grid`, :func:`grid_counts`). ``keep=`` sizes and
EMP's per-layer counts (the layer scope) go to each group's nearest allowed width. Without a grid
(``multiple == 1`` everywhere) every allocator is exactly what it was before grids existed.

For masks (weights): :func:`owl_sparsities` (OWL's per-layer sparsities from outlier ratios),
:func:`spread` (a matrix's count over its rows), :func:`parse_nm` (N:M patterns) and
:func:`beta_for_fraction` (the beta whose EMP counts prune a given fraction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..core import rule
from ..structure.units import UnitGroup

#: OWL's constants (Yin et al., 2024): outlier threshold M (x the layer's mean Wanda score) and
#: the half-width lambda of the spread of the per-layer sparsities around the target
OWL_M = 5.0
OWL_LAMBDA = 0.08
NORMALISATIONS = ("zscore", "mean")


# ------------------------------------------------------------------ unit groups


def removed_params(groups: Sequence[UnitGroup], counts: Sequence[int]) -> int:
    """Parameters the groups lose when each keeps ``counts`` units (heads rounded as realised;
    MLP widths as counted, off their width grid: this is the total the allocators aim at)."""
    return sum((g.n - g.realised(k, grid=False)) * g.params_per_unit() for g, k in zip(groups, counts))


# ------------------------------------------------------------------ width grids


def on_grid(groups: Sequence[UnitGroup]) -> bool:
    """Whether any group keeps widths on a grid coarser than one unit (MLP ``multiple > 1``)."""
    return any(g.multiple > 1 for g in groups)


def take_steps(steps: Sequence[Sequence[tuple[float, float]]], removed: float) -> list[int]:
    """How many of each group's steps to take: cheapest first, until their sizes come closest
    to ``removed``.

    ``steps[j]``: group ``j``'s steps in the order they must be taken (a width goes down one
    allowed width at a time), each ``(cost, size)`` with ``size > 0`` (parameters or units).
    Costs along a group are made non-decreasing (a running maximum) so that the cheapest-first
    order over all groups (ties: lower group, then earlier step) takes a prefix of every
    group's list. A step is taken while the total after it minus half its size stays at or
    below ``removed``: the total then differs from ``removed`` by at most half the size of the
    step it stopped at or the last one taken (or falls short because every step was taken),
    and each group's count never decreases as ``removed`` grows."""
    flat = []
    for j, st in enumerate(steps):
        top = -math.inf
        for i, (cost, size) in enumerate(st):
            top = max(top, float(cost))
            flat.append((top, j, i, float(size)))
    flat.sort(key=lambda x: x[:3])
    taken = [0] * len(steps)
    done = 0.0
    for _, j, _, size in flat:
        if done + size / 2 > removed:  # the midpoint of this step lies past the target: stop
            break
        done += size
        taken[j] += 1
    return taken


def down_widths(g: UnitGroup, floor: int) -> list[int]:
    """The widths ``g`` may keep, from its full width down to the smallest one ``>= floor``."""
    return [w for w in g.widths() if w >= floor][::-1]


def keep_top(keys: Tensor, k: int) -> Tensor:
    """Keep mask of the ``k`` largest ``keys`` (signed; ties: the lower index is kept, as
    :func:`~emprune.core.rule.topk_mask` keeps it)."""
    n = keys.numel()
    order = n - 1 - torch.argsort(keys.double().flip(0), stable=True)  # ascending; ties: higher index first
    keep = torch.ones(n, dtype=torch.bool)
    keep[order[: n - int(k)]] = False
    return keep


def grid_counts(groups: Sequence[UnitGroup], keys: Sequence[Tensor], removed: float, floors: Sequence[int],
                weights: Sequence[float]) -> list[int]:
    """Widths when every group loses its lowest ``keys`` one step of its width grid at a time.

    A step takes a group from one of its widths (``g.widths()``) to the next below, never under
    the smallest width ``>= floors[j]``; it costs the mean key of the units it removes (so a
    group's steps cost more and more) and weighs ``weights[j]`` per unit (parameters per unit,
    or 1 to count units). :func:`take_steps` takes the cheapest steps of all groups until the
    removed weight comes closest to ``removed``: within half a step of one group (``m/2`` of
    its units on a grid of ``m``), unless the floors stop it first."""
    steps, downs = [], []
    for g, key, fl, w in zip(groups, keys, floors, weights):
        ws = down_widths(g, fl)
        srt = torch.sort(key.double()).values  # lowest first: a step removes the next lowest
        cs = torch.cat([torch.zeros(1, dtype=torch.float64), srt.cumsum(0)])
        st = []
        for a, b in zip(ws, ws[1:]):
            lo, hi = g.n - a, g.n - b
            st.append((float(cs[hi] - cs[lo]) / (hi - lo), (a - b) * float(w)))
        steps.append(st)
        downs.append(ws)
    return [ws[c] for ws, c in zip(downs, take_steps(steps, removed))]


def fixed_counts(groups: Sequence[UnitGroup], keep: Any) -> list[int]:
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
        return _fraction_for_budget(groups, float(keep["params"]))
    if isinstance(keep, dict):
        missing = [g.name for g in groups if g.name not in keep]
        if missing:
            raise ValueError(f"keep has no count for {missing[:3]}")
        return [int(keep[g.name]) for g in groups]
    raise ValueError(f"keep must be a fraction, a count, {{group: count}} or {{'params': P}}; got {keep!r}")


def _fraction_for_budget(groups: Sequence[UnitGroup], budget: float) -> list[int]:
    """The counts of the largest common fraction whose kept group parameters stay <= ``budget``."""
    ppu = [g.params_per_unit() for g in groups]
    now = [g.params() for g in groups]
    if budget >= sum(now):
        return [g.n for g in groups]

    def kept(f: float) -> tuple[list[int], int]:
        ks = [g.realised(max(1, round(f * g.n))) for g in groups]
        return ks, sum(p0 - (g.n - k) * p for g, k, p, p0 in zip(groups, ks, ppu, now))

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if kept(mid)[1] <= budget:
            lo = mid
        else:
            hi = mid
    return kept(lo)[0]


def _normalise(s: Tensor, how: str) -> Tensor:
    """A group's scores standardised (``zscore``) or divided by their mean (``mean``): an
    increasing map, so the order inside the group is the scores' own."""
    if how == "zscore":
        sd = s.std() if s.numel() > 1 else torch.tensor(1.0, dtype=torch.float64)
        return (s - s.mean()) / (sd if sd > 0 else 1.0)
    if how == "mean":
        m = s.mean()
        return s / (m if m > 0 else 1.0)
    raise ValueError(f"allocate must be threshold, zscore or mean; got {how!r}")


def by_normalised_scores(groups: Sequence[UnitGroup], scores: Sequence[Tensor], removed: float, how: str,
                         floors: Sequence[int]) -> list[Tensor]:
    """Remove ``removed`` parameters across all groups, lowest normalised score first; every
    group keeps at least its floor (its best units). Returns keep masks."""
    norm, gid, uid = [], [], []
    for j, (g, s) in enumerate(zip(groups, scores)):
        z = _normalise(s, how)
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
    n_remove = int((cum < removed).sum()) + (1 if removed > 0 else 0)
    n_remove = min(n_remove, order.numel())
    keep = [torch.ones(g.n, dtype=torch.bool) for g in groups]
    for r in order[:n_remove].tolist():
        keep[int(gi[r])][int(ui[r])] = False
    return keep


def _loss_weights(sens: Sequence[float], fraction: float) -> Tensor:
    """``a_g = max(sens_g, tiny) / fraction^2``: the modelled loss of group ``g`` losing the
    share ``f`` of its units is ``a_g f^2`` (``sens_g`` at ``f = fraction``)."""
    pos = [x for x in sens if x > 0]
    tiny = (min(pos) if pos else 1.0) * 1e-3  # a group that did not hurt is the cheapest, not free
    return torch.tensor([max(x, tiny) for x in sens], dtype=torch.float64) / fraction ** 2


def by_sensitivity(groups: Sequence[UnitGroup], sens: Sequence[float], removed: float, fraction: float,
                   max_remove: Sequence[float]) -> list[int]:
    """Units to keep per group: ``f_g = min(max_remove_g, lambda P_g / a_g)`` with
    ``a_g = max(sens_g, tiny) / fraction^2``, ``lambda`` bisected so that the removed
    parameters (``sum f_g n_g * params_per_unit``) reach ``removed``."""
    if removed <= 0:
        return [g.n for g in groups]
    size = torch.tensor([g.n * g.params_per_unit() for g in groups], dtype=torch.float64)
    a = _loss_weights(sens, fraction)
    cap = torch.tensor(list(max_remove), dtype=torch.float64).clamp(max=1.0)

    def share(lam: float) -> Tensor:
        return (lam * size / a).minimum(cap)

    if float((cap * size).sum()) <= removed:
        f = cap  # every group at its ceiling
    else:
        lo, hi = 0.0, 1.0
        while float((share(hi) * size).sum()) < removed:
            hi *= 2
        for _ in range(200):
            mid = (lo + hi) / 2
            if float((share(mid) * size).sum()) < removed:
                lo = mid
            else:
                hi = mid
        f = share(hi)
    return [max(1, g.n - int(round(float(x) * g.n))) for g, x in zip(groups, f)]


def by_sensitivity_on_grid(groups: Sequence[UnitGroup], sens: Sequence[float], removed: float, fraction: float,
                           floors: Sequence[int]) -> list[int]:
    """:func:`by_sensitivity`'s optimisation with every group on its width grid: units to keep per
    group.

    The same model (group ``g`` losing the share ``f`` of its units costs ``a_g f^2``), solved
    on the grid instead of rounded after: each group steps down its widths (``g.widths()``, to
    the smallest ``>= floors[g]``), a step from share ``f`` to ``f'`` costing
    ``a_g (f + f') / (n_g params_per_unit_g)`` per parameter it removes (increasing along the
    group: the discrete form of ``f_g = lambda P_g / a_g``), and :func:`take_steps` takes the
    cheapest steps until the removed parameters come closest to ``removed`` (within half a
    step: ``m/2`` units of one group on a grid of ``m``; less only if every group reaches its
    floor)."""
    if removed <= 0:
        return [g.n for g in groups]
    a = _loss_weights(sens, fraction).tolist()
    steps, downs = [], []
    for g, ag, fl in zip(groups, a, floors):
        ws = down_widths(g, fl)
        ppu = g.params_per_unit()
        steps.append([(ag * ((g.n - x) + (g.n - y)) / (g.n * g.n * ppu), (x - y) * ppu) for x, y in zip(ws, ws[1:])])
        downs.append(ws)
    return [ws[c] for ws, c in zip(downs, take_steps(steps, removed))]


# ------------------------------------------------------------------ the allocators decide() takes


def _groups(targets: Sequence[Any]) -> list[UnitGroup]:
    groups = [t.group for t in targets]
    if any(g is None for g in groups):
        raise ValueError("this allocation spreads parameters over unit groups: every target needs its group")
    return groups


@dataclass
class FixedSize:
    """A fixed size per group (``keep``, see :func:`fixed_counts`), not EMP's counts; a group
    with a width grid keeps the allowed width nearest to its count (``{"params": P}``: the
    largest common fraction whose widths, on the grid, keep at most ``P``)."""

    keep: Any
    emp = False

    def __call__(self, targets: Sequence[Any], scores: list[Tensor], emp_k: list[int] | None,
                 floors: list[int]) -> list[int | Tensor]:
        return list(fixed_counts(_groups(targets), self.keep))


@dataclass
class BySensitivity:
    """EMP's total (the parameters its per-group counts remove) removed where the measured loss
    increase ``sens`` is smallest; each group's floor bounds where the total goes, not the total.
    Groups on a width grid: :func:`by_sensitivity_on_grid` (the same model, stepping on the grid)."""

    sens: list[float]
    fraction: float = 0.5
    #: parameters to remove instead of EMP's total (a matched-size comparison), or None
    removed: float | None = None
    emp = True
    floors_raise_counts = False  # the floors cap where the total goes; EMP's counts stay as they are

    def __call__(self, targets: Sequence[Any], scores: list[Tensor], emp_k: list[int] | None,
                 floors: list[int]) -> list[int | Tensor]:
        groups = _groups(targets)
        removed = removed_params(groups, emp_k or []) if self.removed is None else float(self.removed)
        if on_grid(groups):
            return list(by_sensitivity_on_grid(groups, self.sens, removed, self.fraction, floors))
        ceilings = [(g.n - f) / g.n for g, f in zip(groups, floors)]
        return list(by_sensitivity(groups, self.sens, removed, self.fraction, ceilings))


@dataclass
class ByNormalisedScores:
    """EMP's total (of each unit kind, or of all kinds together with ``joint``) removed lowest
    normalised score first (``how``: ``zscore`` or ``mean``), on the selection scores or, with
    ``on_count``, on the count scores. Groups on a width grid lose their units in steps of the
    grid, the step with the lowest mean normalised score first (:func:`grid_counts`)."""

    how: str
    joint: bool = False
    on_count: bool = False
    emp = True

    def __call__(self, targets: Sequence[Any], scores: list[Tensor], emp_k: list[int] | None,
                 floors: list[int]) -> list[int | Tensor]:
        groups = _groups(targets)
        ks = [max(k, f) for k, f in zip(emp_k or [], floors)]
        on = [t.count() if self.on_count and t.count is not None else s for t, s in zip(targets, scores)]
        # one allocation per unit kind: standardised scores of heads and of neurons are not
        # comparable (measured: mixing them removes the wrong heads, x3.8 vs x2.8 perplexity)
        parts = [list(range(len(groups)))] if self.joint else [
            [j for j, g in enumerate(groups) if g.kind == kind] for kind in dict.fromkeys(g.kind for g in groups)]
        out: list[int | Tensor] = [0] * len(groups)
        for idx in parts:
            sub = [groups[j] for j in idx]
            removed = removed_params(sub, [ks[j] for j in idx])
            if on_grid(sub):  # the same order, in steps of each group's width grid
                z = [_normalise(on[j], self.how) for j in idx]
                ws = grid_counts(sub, z, removed, [floors[j] for j in idx], [g.params_per_unit() for g in sub])
                masks = [keep_top(zj, w) for zj, w in zip(z, ws)]
            else:
                masks = by_normalised_scores(sub, [on[j] for j in idx], removed, self.how, [floors[j] for j in idx])
            for j, m in zip(idx, masks):
                out[j] = m
        return out


@dataclass
class ByThreshold:
    """One N_eff and one threshold over the count scores of every unit (float32, as the paper's
    global scope), ``floor(beta * N_eff)`` kept in all; with ``reselect`` (counts from another
    criterion) each group then keeps its count of the best units by its selection scores. Every
    group keeps at least its floor. With width grids, the units that decision keeps in all are
    spread again in steps of the grids, lowest mean count score first (:func:`grid_counts`; the
    total within half a step). After the call, :attr:`neff` is the global N_eff."""

    beta: float
    reselect: bool = False
    emp = True
    neff: float | None = None

    def __call__(self, targets: Sequence[Any], scores: list[Tensor], emp_k: list[int] | None,
                 floors: list[int]) -> list[int | Tensor]:
        srcs = [(t.count() if t.count is not None else s).float() for t, s in zip(targets, scores)]
        thr = rule.global_threshold(srcs, self.beta)
        self.neff = float(thr.n_eff)
        masks = list(rule.global_masks(srcs, thr))
        if self.reselect:
            masks = [rule.topk_mask(s, max(1, int(m.sum()))) for s, m in zip(scores, masks)]
        masks = [m | rule.topk_mask(s, f) if f > 1 else m for m, s, f in zip(masks, scores, floors)]
        groups = [t.group for t in targets]
        if any(g is None for g in groups) or not on_grid(groups):
            return list(masks)
        # on the grid: that many units in all, removed lowest count score first in steps of the
        # grid; each group then keeps its best units by the selection scores (or the count scores)
        removed = sum(g.n - int(m.sum()) for g, m in zip(groups, masks))
        ws = grid_counts(groups, srcs, removed, floors, [1.0] * len(groups))
        return [keep_top(s if self.reselect else c, w) for s, c, w in zip(scores, srcs, ws)]


# ------------------------------------------------------------------ masks (weights)


def spread(k_total: int, rows: int) -> Tensor:
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


def beta_for_fraction(pruned_at: Callable[[float], int], total: int, target: float) -> tuple[float, float]:
    """The beta whose EMP counts prune the fraction of ``total`` entries closest to ``target``,
    and that fraction; ``pruned_at(beta)``: entries pruned at ``beta``. The pruned count is a
    non-increasing step function of beta (counts are ``floor(beta * N_eff)`` clipped), so
    bisection on the counts alone finds the step: no calibration is repeated."""
    goal = target * total
    lo, hi = 1e-12, 1.0
    while pruned_at(hi) > goal and hi < 1e12:
        lo, hi = hi, hi * 2
    if pruned_at(lo) < goal:  # even the smallest beta cannot reach it
        return lo, pruned_at(lo) / total
    for _ in range(200):  # pruned(lo) >= goal > pruned(hi) (or = at hi); bisect in beta
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if pruned_at(mid) >= goal:
            lo = mid
        else:
            hi = mid
    p_lo, p_hi = pruned_at(lo), pruned_at(hi)
    beta, pruned = (lo, p_lo) if abs(p_lo - goal) <= abs(p_hi - goal) else (hi, p_hi)
    return beta, pruned / total
