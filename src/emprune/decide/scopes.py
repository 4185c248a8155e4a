"""The decision funnel: every mask and every structural cut in emprune is decided here.

Scopes say how scores are grouped into the vectors EMP is applied to:

* ``row``: one vector per output unit (a Linear row, a Conv filter flattened);
* ``layer``: one vector per target (a weight tensor, or the units of one unit group);
* ``global``: one vector over every target, streamed (never concatenated).

:func:`decide` turns targets (lazy score sources) into one :class:`Decision` per target:
how many entries each unit keeps (from the ``count`` scores' N_eff, a fixed sparsity or
explicit counts, raised to an optional floor), which ones (the largest ``score`` entries; for a
target that is a unit group, the group's own keep rule, e.g. GQA-consistent heads or MLP widths
on a grid), and what
share of the score mass that keeps together with the bound guaranteeing it. With ``allocate=``
an allocator (:mod:`.allocate`: a fixed size per group, a parameter total spread by measured
sensitivity or by normalised scores) sets the counts of all targets together, starting from
EMP's per-target counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence

import torch
from torch import Tensor

from ..core.checks import one_of
from ..core import rule

Scope = Literal["row", "layer", "global"]
SCOPES = ("row", "layer", "global")


@dataclass
class Target:
    """A tensor to prune: ``score()`` gives the selection scores (shaped like the weight);
    ``count()`` the scores whose N_eff sets how many are kept (``None``: the same); or ``k``
    says how many outright, e.g. to match another run's counts exactly: one count per row
    with the row scope; with the layer scope the tensor keeps the total of the counts given
    (one, or e.g. per-row counts of another run), with the global scope all targets together
    keep the total of all. ``group``: the unit group (:mod:`emprune.structure.units`) whose
    units the 1-D scores stand for; its ``keep_mask`` chooses which units (e.g. whole GQA
    groups), its parameters per unit weigh allocations."""

    name: str
    shape: torch.Size
    score: Callable[[], Tensor]
    count: Callable[[], Tensor] | None = None
    k: Tensor | None = None
    group: Any = None

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
    emp_k: int | None = None  # EMP's count for the target before an allocator moved it

    @property
    def kept(self) -> int:
        return int(self.k.sum())

    @property
    def total(self) -> int:
        return math.prod(self.shape)


def check_options(scope: str, beta: float, sparsity: float | None, min_keep: float | int | None) -> None:
    """Validate the how-many options once, with messages naming the option."""
    one_of("scope", scope, SCOPES)
    rule.check_beta(beta)
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


class Allocator(Protocol):
    """Sets the counts of all targets together (see :mod:`.allocate`). ``emp`` says whether it
    starts from EMP's per-target counts; called with the targets, their selection scores,
    those counts (None without ``emp``) and each target's floor, it returns per target a count
    to keep or a keep mask (then rounded to the target's group, e.g. GQA-consistent heads)."""

    emp: bool

    def __call__(self, targets: Sequence[Target], scores: list[Tensor], emp_k: list[int] | None,
                 floors: list[int]) -> list[int | Tensor]: ...


def decide(
    targets: Sequence[Target],
    scope: Scope = "row",
    beta: float = 1.0,
    *,
    sparsity: float | None = None,
    min_keep: float | int | None = None,
    negative: rule.Negative = "abs",
    allocate: Allocator | None = None,
) -> Iterator[Decision]:
    """Yield one :class:`Decision` per target, in order (masks made one at a time).

    ``allocate``: an allocator sets the counts of all targets together (unit groups: fixed
    sizes, EMP's total spread by measured sensitivity or by normalised scores); ``scope`` then
    only names how EMP's per-target counts were formed (per target)."""
    check_options(scope, beta, sparsity, min_keep)
    explicit = [t.k is not None for t in targets]
    if any(explicit) and (sparsity is not None or not all(explicit)):
        raise ValueError("explicit counts k must be given for every target, and without sparsity")
    if allocate is not None:
        yield from _decide_allocated(targets, beta, min_keep, negative, allocate)
        return
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
    emp_k = int(k.sum())
    if t.group is not None:  # one count; the group's own keep rule (e.g. GQA-consistent heads)
        mask = t.group.keep_mask(s2d, _on_grid_above(t.group, emp_k, fl))
        k = mask.sum().reshape(1).to("cpu", torch.int64)
    else:
        mask = rule.topk_mask(s2d, k.to(s2d.device) if dim is not None else int(k[0]), dim,
                              negative=negative, where=t.name)
    mass = rule.retained_mass(s2d, mask, dim, negative=negative).reshape(units)
    sel_neff = neff if t.count is None else rule.effective_number(s2d, dim, negative=negative, where=t.name).reshape(units)
    nu = rule.keep_count_from_neff(sel_neff, 1.0, n)  # floor(N_eff)
    guaranteed = rule.guaranteed_mass(nu.cpu(), k.cpu(), n)
    return Decision(t.name, tuple(sel.shape), unit, n, neff.cpu(), k.cpu(), raised, mass.cpu(),
                    guaranteed, mask.reshape(sel.shape), emp_k=emp_k)


def _on_grid_above(group: Any, k: int, floor: int) -> int:
    """``k`` for the group's keep rule; on a width grid (``group.multiple > 1``) whose nearest
    width to ``k`` falls under the floor, the smallest width ``>= floor`` instead."""
    if getattr(group, "multiple", 1) > 1 and group.realised(k) < floor:
        return next(w for w in group.widths() if w >= floor)
    return k


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
        if t.group is not None:  # valid for the group (at least one unit; GQA-consistent heads)
            mask = t.group.conform(mask, s)
            kept = int(mask.sum())
        kept_sum, total = rule.masked_mass(s, mask, negative=negative, shift=thr.shift)
        mass = torch.tensor([kept_sum / total if total > 0 else 1.0], dtype=torch.float64)
        shape = tuple(s.shape)
        del s  # not held across the yield: the next target's scores are made after it
        yield Decision(t.name, shape, "global", math.prod(shape), torch.tensor([neff], dtype=torch.float64),
                       torch.tensor([kept]), raised, mass.cpu(), guaranteed, mask, total)
        del mask


def _decide_allocated(targets: Sequence[Target], beta: float, min_keep: float | int | None,
                      negative: rule.Negative, allocate: Allocator) -> Iterator[Decision]:
    """Counts of all targets set together by ``allocate`` (from EMP's per-target counts when it
    asks for them, ``allocate.emp``), then the selection of each target and its decision. The
    reported EMP count is raised to the target's floor unless the allocator says the floors only
    bound where its total goes (``floors_raise_counts = False``)."""
    scores = [t.score() for t in targets]
    neffs: list[Tensor] = []
    emp: list[int] = []
    for t, s in zip(targets, scores):
        if not allocate.emp:  # a fixed size: no N_eff is involved
            neffs.append(torch.tensor([float("nan")], dtype=torch.float64))
            emp.append(0)
            continue
        cnt = s if t.count is None else t.count()
        neffs.append(rule.effective_number(cnt, None, negative=negative, where=t.name).reshape(1).cpu())
        emp.append(int(rule.keep_count_from_neff(neffs[-1], beta, s.numel())))
    floors = [max(1, floor_count(min_keep, s.numel())) for s in scores]
    chosen = allocate(targets, scores, emp if allocate.emp else None, floors)
    raise_counts = getattr(allocate, "floors_raise_counts", True)
    for t, s, got, neff, k_emp, fl in zip(targets, scores, chosen, neffs, emp, floors):
        if isinstance(got, Tensor):  # a mask chosen freely: made valid for the group
            mask = t.group.conform(got, s) if t.group is not None else got
        elif t.group is not None:
            mask = t.group.keep_mask(s, int(got))
        else:
            mask = rule.topk_mask(s, max(1, min(int(got), s.numel())), None, negative=negative, where=t.name)
        kept = mask.sum().reshape(1).to("cpu", torch.int64)
        n = s.numel()
        mass = rule.retained_mass(s, mask, None, negative=negative).reshape(1).cpu()
        nu = rule.keep_count_from_neff(rule.effective_number(s, None, negative=negative), 1.0, n).reshape(1)
        reported = (max(k_emp, fl) if raise_counts else k_emp) if allocate.emp else None
        yield Decision(t.name, tuple(s.shape), "layer", n, neff, kept, 0, mass,
                       rule.guaranteed_mass(nu.cpu(), kept, n), mask, emp_k=reported)
