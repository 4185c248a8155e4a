"""The EMP rule as pure tensor functions (no ``nn.Module`` in sight).

For importance scores ``s`` over ``N`` components EMP keeps the ``floor(beta * N_eff)``
largest, where ``N_eff = (sum |s|)^2 / sum s^2`` is the inverse Simpson index of the
normalised scores.  This module holds that arithmetic and the exact selection behind it:

* :func:`effective_number`, :func:`keep_count`, :func:`keep_mask` - the rule, per slice
  along ``dim`` (one vector per output row with ``dim=1``) or over the whole tensor;
* :func:`topk_mask` - exact selection of a given number of entries per slice (used for
  fixed-sparsity baselines, floors and ``count_by``);
* :func:`global_threshold` / :func:`global_masks` - one N_eff and one threshold over many
  tensors, streamed (never concatenated; memory of the order of the largest tensor);
* :func:`mass_bound` / :func:`retained_mass` - the guarantee and what was actually kept.

Numerics: sums are accumulated in float64, block by block; selection is exact (``k``
kept, ties at the threshold broken by lower index) and never sorts whole rows.  The
selection engines live in :mod:`emprune.core.engine` (PyTorch, any device) and
:mod:`emprune.core.kernels` (optional compiled per-row kernel on CPU); they give identical
masks.  This module validates the user's arguments and holds the math (the rule, the
bound); the engine's few entry points (:mod:`emprune.core.engine`'s ``__all__``) do the passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .engine import (
    Negative,
    ScoreSource,
    global_cut,
    global_neff,
    keep_floor,
    kept_mass,
    select,
    slice_neff,
    threshold_masks,
)

__all__ = [
    "effective_number",
    "keep_count",
    "keep_mask",
    "keep_count_from_neff",
    "topk_mask",
    "mass_bound",
    "retained_mass",
    "GlobalThreshold",
    "global_threshold",
    "global_masks",
    "global_mask",
    "global_effective_number",
    "guaranteed_mass",
    "check_beta",
]


# --------------------------------------------------------------------------- checks


def check_beta(beta: float) -> float:
    """``beta`` as a float; one-line ``ValueError`` unless it is a positive finite number."""
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}") from None
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    return b


def keep_count_from_neff(neff: Tensor, beta: float, n: int) -> Tensor:
    """``floor(beta * N_eff)`` clamped to ``[1, n]`` for already computed N_eff values."""
    return keep_floor(torch.as_tensor(neff, dtype=torch.float64), check_beta(beta), n)


# ------------------------------------------------------------------- public rule


def effective_number(
    scores: Tensor, dim: int | None = None, *, negative: Negative = "abs", where: str | None = None
) -> Tensor:
    """Effective number of components ``N_eff = (sum|s|)^2 / sum s^2`` (float64).

    Reduced over ``dim`` (all elements when ``None``): ``dim=1`` on a Linear weight gives one
    N_eff per output row.  ``1 <= N_eff <= N``; an all-zero slice has no preference, so its
    N_eff is ``N``.  ``negative="shift"`` scores ``s - min(s)`` per slice instead of ``|s|``
    (for signed scores whose sign carries meaning).  ``where`` names the tensor in errors.
    """
    return slice_neff(scores, dim, negative, where)[0]


def keep_count(
    scores: Tensor, beta: float = 1.0, dim: int | None = None, *, negative: Negative = "abs",
    where: str | None = None,
) -> Tensor:
    """Number of entries EMP keeps per slice: ``floor(beta * N_eff)`` clamped to ``[1, N]``
    (int64).  A large ``beta`` simply keeps everything."""
    b = check_beta(beta)
    neff, n = slice_neff(scores, dim, negative, where)
    return keep_floor(neff, b, n)


def keep_mask(
    scores: Tensor,
    beta: float = 1.0,
    dim: int | None = None,
    *,
    negative: Negative = "abs",
    where: str | None = None,
) -> Tensor:
    """Boolean mask (same shape and device as ``scores``) keeping, in every slice along
    ``dim``, exactly ``keep_count`` entries: those with the largest ``|s|`` (or ``s - min``),
    ties broken by lower index.  ``where`` names the tensor in error messages."""
    return select(scores, dim, None, check_beta(beta), negative, where)


def topk_mask(
    scores: Tensor,
    k: int | Tensor,
    dim: int | None = None,
    *,
    negative: Negative = "abs",
    where: str | None = None,
) -> Tensor:
    """Exactly ``k`` largest entries per slice along ``dim`` (``k`` an int, or one count per
    slice with the shape of the reduced tensor), ties broken by lower index.

    Cost is a few passes over cache-sized blocks; no slice is fully sorted.
    """
    return select(scores, dim, k, 1.0, negative, where)


# ------------------------------------------------------------------ global scope


@dataclass
class GlobalThreshold:
    """One EMP decision over many tensors: keep every score ``> value``, and among scores
    ``== value`` the first ``keep_equal[i]`` (in flat index order) of tensor ``i``.

    ``n``: total scores; ``n_eff``: their effective number; ``k``: how many are kept;
    ``shift``: what was subtracted from every score with ``negative="shift"``."""

    n: int
    n_eff: float
    k: int
    value: float
    keep_equal: list[int] = field(default_factory=list)
    shift: float = 0.0


def global_threshold(
    sources: Sequence[ScoreSource],
    beta: float = 1.0,
    *,
    k: int | None = None,
    negative: Negative = "abs",
    names: Sequence[str] | None = None,
) -> GlobalThreshold:
    """EMP over the union of several score tensors, without concatenating them.

    ``sources`` are tensors or zero-argument callables returning one (called again on each
    pass, so scores such as ``|W| * ||X||`` are never all held at once).  A few streaming
    passes over cache-sized chunks: float64 sums plus a sample, counts at a handful of
    sampled thresholds, then the entries of the final narrow bracket.  Peak extra memory is
    of the order of the largest tensor.  ``k`` overrides EMP's count (fixed-sparsity
    baselines); ``names`` label the tensors in error messages."""
    return GlobalThreshold(*global_cut(sources, check_beta(beta), k, negative, names))


def global_effective_number(
    sources: Sequence[ScoreSource], *, negative: Negative = "abs", names: Sequence[str] | None = None
) -> tuple[float, int]:
    """``(N_eff, N)`` of the union of several score tensors, streamed in float64."""
    neff, n, _, _ = global_neff(sources, negative, names)
    return neff, n


def global_masks(
    sources: Sequence[ScoreSource], thr: GlobalThreshold, *, negative: Negative = "abs"
) -> Iterator[Tensor]:
    """Yield the boolean keep mask of each source in order, one at a time (so a caller can
    apply and drop each before the next is made); built chunk by chunk, so the only
    tensor-sized allocation is the mask itself."""
    return threshold_masks(sources, thr.value, thr.keep_equal, thr.shift, negative)


def global_mask(scores: Tensor, thr: GlobalThreshold, index: int, *, negative: Negative = "abs") -> Tensor:
    """The keep mask of ``scores``, source number ``index`` of the ``sources`` that ``thr``
    was computed on (the index says how many of the ties at the threshold it keeps).  For
    callers that need the scores again after the mask (one materialisation, not two)."""
    if not 0 <= index < max(1, len(thr.keep_equal)):
        raise IndexError(f"index {index} out of range for a threshold over {len(thr.keep_equal)} sources")
    return next(threshold_masks([scores], thr.value, thr.keep_equal[index:index + 1], thr.shift, negative))


def masked_mass(
    scores: Tensor, mask: Tensor, *, negative: Negative = "abs", shift: float = 0.0
) -> tuple[float, float]:
    """``(sum of kept scores, sum of all scores)`` in float64, chunk by chunk (scores made
    non-negative as the rule does: ``|s|``, or ``s - shift``)."""
    kept, total = kept_mass(scores, mask, None, negative, shift)
    return float(kept), float(total)


# ------------------------------------------------------------------ mass bound


def mass_bound(nu: int, n: int) -> float:
    """Lower bound on the retained normalised score mass when the top ``nu = floor(N_eff)``
    of ``n`` scores are kept (paper's Theorem, corrected).

    ``nu/n + ((n-nu)/n) * sqrt((n-nu-1) / ((nu+1)(n-1)))`` for ``2 <= nu < n``; ``1/2`` for
    ``nu = 1`` (the paper's formula is not valid there: ``w = (1/2+e, 1/2-e, 0, ...)`` has
    ``N_eff < 2`` and keeps just over 1/2); ``1`` for ``nu = n``.  The infimum is approached
    by "one spike plus a uniform rest" and not attained."""
    nu_i, n_i = int(nu), int(n)
    if nu_i != nu or n_i != n or n_i < 1 or not 1 <= nu_i <= n_i:
        raise ValueError(f"mass_bound needs integers 1 <= nu <= n, got nu={nu!r}, n={n!r}")
    if nu_i == n_i:
        return 1.0
    if nu_i == 1:
        return 0.5
    return nu_i / n_i + ((n_i - nu_i) / n_i) * math.sqrt((n_i - nu_i - 1) / ((nu_i + 1) * (n_i - 1)))


def mass_bound_tensor(nu: Tensor, n: int) -> Tensor:
    """Vectorised :func:`mass_bound` (float64) for a tensor of ``nu`` values."""
    nu = nu.double()
    f = nu / n + ((n - nu) / n) * torch.sqrt(((n - nu - 1) / ((nu + 1) * max(n - 1, 1))).clamp_min(0))
    f = torch.where(nu <= 1, torch.full_like(f, 0.5), f)
    return torch.where(nu >= n, torch.ones_like(f), f)


def guaranteed_mass(nu: Tensor, k: Tensor, n: int) -> Tensor:
    """What the bound guarantees when ``k`` (not necessarily ``nu``) entries are kept:
    the bound for ``nu`` if ``k >= nu``, ``(k/nu)`` times it otherwise (top-k averages
    never fall below top-nu averages)."""
    b = mass_bound_tensor(nu, n)
    return torch.where(k >= nu, b, b * k.double() / nu.double().clamp_min(1))


def retained_mass(scores: Tensor, mask: Tensor, dim: int | None = None, *, negative: Negative = "abs") -> Tensor:
    """Fraction of the score mass kept by ``mask``: ``sum_kept |s| / sum |s|`` per slice
    (float64; 1 for an all-zero slice).  This is the ``s_eff`` that :func:`mass_bound`
    bounds from below when ``mask`` is EMP's."""
    kept, total = kept_mass(scores, mask, dim, negative)
    return torch.where(total > 0, kept / torch.where(total > 0, total, 1.0), torch.ones_like(total))
