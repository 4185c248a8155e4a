"""Scopes: how scores are grouped into the vectors EMP is applied to.

* ``row``: one vector per output unit (a Linear row, a Conv filter flattened);
* ``layer``: one vector per weight tensor;
* ``global``: one vector over every targeted tensor, streamed (never concatenated).

:func:`decide` turns targets (lazy score sources) into one :class:`Decision` per target:
how many entries each unit keeps (from the ``count`` scores' N_eff, or a fixed sparsity,
raised to an optional floor), which ones (the largest ``score`` entries), and what share of
the score mass that keeps together with the bound guaranteeing it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor

from . import rule

Scope = Literal["row", "layer", "global"]
SCOPES = ("row", "layer", "global")


@dataclass
class Target:
    """A tensor to prune: ``score()`` gives the selection scores (shaped like the weight);
    ``count()`` the scores whose N_eff sets how many are kept (``None``: the same); or ``k``
    says how many outright, e.g. to match another run's counts exactly: one count per row
    with the row scope; with the layer scope the tensor keeps the total of the counts given
    (one, or e.g. per-row counts of another run), with the global scope all targets together
    keep the total of all."""

    name: str
    shape: torch.Size
    score: Callable[[], Tensor]
    count: Callable[[], Tensor] | None = None
    k: Tensor | None = None

    def __post_init__(self) -> None:
        if self.count is not None and self.k is not None:
            raise ValueError(f"target {self.name}: give count scores or explicit counts k, not both")


@dataclass
class Decision:
    """What EMP decided for one target (per-unit tensors are float64 / int64)."""

    name: str
    shape: tuple[int, ...]
    unit: str  # "row", "layer" or "global"
    n_per_unit: int
    neff: Tensor  # N_eff of the count scores per unit (global: the model's, once)
    k: Tensor  # entries kept per unit
    raised: int  # units whose count was raised by the floor
    mass: Tensor  # retained share of the selection-score mass per unit
    guaranteed: Tensor  # the bound's guarantee per unit (global: the model's)
    mask: Tensor  # bool, shaped like the weight
    score_sum: float = float("nan")  # total selection-score mass (global scope)

    @property
    def kept(self) -> int:
        return int(self.k.sum())

    @property
    def total(self) -> int:
        return math.prod(self.shape)


def check_options(scope: str, beta: float, sparsity: float | None, min_keep: float | int | None) -> None:
    """Validate the how-many options once, with messages naming the option."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    rule._check_beta(beta)
    if sparsity is not None:
        p = float(sparsity)
        if not (0.0 <= p < 1.0) or not math.isfinite(p):
            raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r}")
    if min_keep is not None:
        if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)):
            raise ValueError(f"min_keep must be a fraction in (0, 1] or a count >= 1, got {min_keep!r}")
        if isinstance(min_keep, float) and not 0.0 < min_keep <= 1.0:
            raise ValueError(f"min_keep as a fraction must lie in (0, 1], got {min_keep!r}")
        if isinstance(min_keep, int) and min_keep < 1:
            raise ValueError(f"min_keep as a count must be >= 1, got {min_keep!r}")


def floor_count(min_keep: float | int | None, n: int) -> int:
    """Entries a unit of ``n`` keeps at least (0 when there is no floor)."""
    if min_keep is None:
        return 0
    if isinstance(min_keep, float):
        return min(n, max(1, math.ceil(min_keep * n - 1e-9)))
    return min(n, int(min_keep))


def fixed_count(sparsity: float, n: int) -> int:
    """Entries kept at a fixed sparsity: ``n - floor(p n)`` (Wanda's convention), >= 1."""
    return max(1, n - math.floor(sparsity * n))


def _unit_view(t: Tensor, unit: str) -> tuple[Tensor, int | None]:
    """Scores as ``[units, N]`` with the reduction dim (rows) or flat (layer)."""
    if unit == "row" and t.dim() >= 2:
        return t.flatten(1), 1  # (not reshape(rows, -1): ambiguous for 0 rows)
    return t.reshape(-1), None


def decide(
    targets: Sequence[Target],
    scope: Scope = "row",
    beta: float = 1.0,
    *,
    sparsity: float | None = None,
    min_keep: float | int | None = None,
    negative: rule.Negative = "abs",
) -> Iterator[Decision]:
    """Yield one :class:`Decision` per target, in order (masks made one at a time)."""
    check_options(scope, beta, sparsity, min_keep)
    explicit = [t.k is not None for t in targets]
    if any(explicit) and (sparsity is not None or not all(explicit)):
        raise ValueError("explicit counts k must be given for every target, and without sparsity")
    if scope == "global":
        yield from _decide_global(targets, beta, sparsity, min_keep, negative)
        return
    for t in targets:
        yield _decide_local(t, scope, beta, sparsity, min_keep, negative)


def _decide_local(t: Target, scope: str, beta: float, sparsity: float | None,
                  min_keep: float | int | None, negative: rule.Negative) -> Decision:
    sel = t.score()
    unit = "row" if (scope == "row" and sel.dim() >= 2) else "layer"
    s2d, dim = _unit_view(sel, unit)
    n = s2d.shape[-1]
    units = s2d.shape[0] if dim is not None else 1
    cnt = s2d if t.count is None else _unit_view(t.count(), unit)[0]
    if cnt.shape != s2d.shape:
        raise ValueError(f"count_by scores of {t.name} have shape {tuple(cnt.shape)}, expected {tuple(s2d.shape)}")
    neff = rule.effective_number(cnt, dim, negative=negative, where=t.name).reshape(units)
    if t.k is not None:  # per row: one each; per layer: the total of those given
        k = _explicit_k(t, units, n) if unit == "row" else _explicit_k(t, None, n).sum().reshape(1)
    elif sparsity is not None:
        k = torch.full((units,), fixed_count(sparsity, n), dtype=torch.int64)
    else:
        k = rule.keep_count_from_neff(neff, beta, n).reshape(units)
    fl = floor_count(min_keep, n)
    raised = int((k < fl).sum())
    k = k.clamp_min(fl)
    mask = rule.topk_mask(s2d, k.to(s2d.device) if dim is not None else int(k[0]), dim,
                          negative=negative, where=t.name)
    mass = rule.retained_mass(s2d, mask, dim, negative=negative).reshape(units)
    sel_neff = neff if t.count is None else rule.effective_number(s2d, dim, negative=negative, where=t.name).reshape(units)
    nu = rule.keep_count_from_neff(sel_neff, 1.0, n)  # floor(N_eff)
    guaranteed = rule.guaranteed_mass(nu.cpu(), k.cpu(), n)
    return Decision(t.name, tuple(sel.shape), unit, n, neff.cpu(), k.cpu(), raised, mass.cpu(),
                    guaranteed, mask.reshape(sel.shape))


def _explicit_k(t: Target, units: int | None, n: int) -> Tensor:
    """A target's explicit counts as int64 ``[units]``, checked against its shape (``units``
    None: any number, whose total must lie in ``[0, n]``; the global scope)."""
    k = torch.as_tensor(t.k).reshape(-1)
    if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
        raise TypeError(f"explicit counts of {t.name} must be integers, got {k.dtype}")
    k = k.to(device="cpu", dtype=torch.int64)
    if units is not None and k.numel() != units:
        raise ValueError(f"explicit counts of {t.name}: {k.numel()} given, expected {units} (one per unit)")
    if bool((k < 0).any()) or bool((k > n).any()) or (units is None and int(k.sum()) > n):
        raise ValueError(f"explicit counts of {t.name} must lie in [0, {n}]")
    return k


def _decide_global(targets: Sequence[Target], beta: float, sparsity: float | None,
                   min_keep: float | int | None, negative: rule.Negative) -> Iterator[Decision]:
    names = [t.name for t in targets]
    sel_src = [t.score for t in targets]
    if targets and targets[0].k is not None:  # explicit counts: their total, over all targets
        k = sum(int(_explicit_k(t, None, math.prod(t.shape)).sum()) for t in targets)
        thr = rule.global_threshold(sel_src, k=k, negative=negative, names=names)
        neff, n = thr.n_eff, thr.n
    elif any(t.count is not None for t in targets):  # count on other scores: one more pass
        cnt_src = [t.count or t.score for t in targets]
        neff, n = rule.global_effective_number(cnt_src, negative=negative, names=names)
        k = fixed_count(sparsity, n) if sparsity is not None else int(rule.keep_count_from_neff(neff, beta, n))
        thr = rule.global_threshold(sel_src, k=k, negative=negative, names=names)
    else:
        n = sum(math.prod(t.shape) for t in targets)
        thr = rule.global_threshold(sel_src, beta, k=None if sparsity is None else fixed_count(sparsity, n),
                                    negative=negative, names=names)
        neff = thr.n_eff
    nu = int(rule.keep_count_from_neff(thr.n_eff, 1.0, n))  # floor(N_eff)
    guaranteed = rule.guaranteed_mass(torch.tensor([nu]), torch.tensor([thr.k]), n)
    for i, t in enumerate(targets):
        s = t.score()  # materialised once per target: mask and mass both come from it
        mask = rule.global_mask(s, thr, i, negative=negative)
        fl = floor_count(min_keep, s.numel())
        raised = 0
        kept = int(torch.count_nonzero(mask))
        if kept < fl:  # the floor overrides the global threshold for this layer: exactly fl kept
            mask = rule.topk_mask(s, fl, None, negative=negative, where=t.name)
            raised, kept = 1, fl
        kept_sum, total = rule.masked_mass(s, mask, negative=negative, shift=thr.shift)
        mass = torch.tensor([kept_sum / total if total > 0 else 1.0], dtype=torch.float64)
        shape = tuple(s.shape)
        del s  # not held across the yield: the next target's scores are made after it
        yield Decision(t.name, shape, "global", math.prod(shape), torch.tensor([neff], dtype=torch.float64),
                       torch.tensor([kept]), raised, mass.cpu(), guaranteed, mask, total)
        del mask
