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
selection engines live in :mod:`emprune._select` (PyTorch, any device) and
:mod:`emprune._kernels` (optional compiled per-row kernel on CPU); they give identical
masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor

from . import _kernels
from ._select import (
    Negative,
    ScoreSource,
    _name,
    _check_scores,
    _raise_nonfinite,
    _grid,
    _check_negative,
    _as_rows,
    _blocks,
    _long,
    _Work,
    _prep_block,
    _block_sums,
    _as_rows_shape,
    _finite_or_raise,
    _rows_topk,
    _materialise,
    _Scratch,
    _nonneg_chunks,
    _global_shift,
    _stream_sums,
    _select_global,
    _GLOBAL_SAMPLE_EVERY,
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
]


# --------------------------------------------------------------------------- checks


def _check_beta(beta: float) -> float:
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}") from None
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    return b


def _neff_from_sums(s1: Tensor, s2: Tensor, n: int) -> Tensor:
    """N_eff from float64 sums; all-zero slices get N (no preference)."""
    zero = s2 == 0
    neff = torch.where(zero, torch.full_like(s1, float(n)), s1 * s1 / torch.where(zero, 1.0, s2))
    return neff.clamp(1.0, float(n))  # rounding can leave it a hair outside [1, N]


def keep_count_from_neff(neff: Tensor, beta: float, n: int) -> Tensor:
    """``floor(beta * N_eff)`` clamped to ``[1, n]`` for already computed N_eff values."""
    return _counts_from_neff(torch.as_tensor(neff, dtype=torch.float64), _check_beta(beta), n)


def _counts_from_neff(neff: Tensor, beta: float, n: int) -> Tensor:
    """floor(beta * N_eff) clamped to [1, N]; a few ulps of slack so that an N_eff that is
    mathematically an integer (e.g. uniform scores) is not floored one below by rounding."""
    k = torch.floor(neff * beta * (1.0 + 2.0**-48))
    return k.clamp(1, n).to(torch.int64)


def _stats(scores: Tensor, dim: int | None, negative: Negative, where: str | None):
    """Per-slice (s1, s2, N) with validation; block-wise, float64 accumulation."""
    _check_scores(scores, where)
    _check_negative(negative)
    if dim is None:
        shift = _global_shift([scores], negative)
        return _stream_sums([scores], negative, None if where is None else [where], shift)[:3]
    rows, _ = _as_rows(scores, dim)
    n = rows.shape[1]
    shape = _as_rows_shape(scores, dim)
    if _kernels.usable(rows):
        _, s1, s2 = _kernels.rows_keep(rows, None, 1.0, negative == "shift", select=False)
        if bool(torch.isfinite(s1).all() and torch.isfinite(s2).all()):
            return s1.reshape(shape), s2.reshape(shape), n
    s1 = torch.empty(rows.shape[0], dtype=torch.float64, device=scores.device)
    s2 = torch.empty_like(s1)
    if _long(n, rows.device):  # streamed row by row
        names = None if where is None else [where]
        for r in range(rows.shape[0]):
            s1[r], s2[r] = _stream_sums([rows[r]], negative, names, _global_shift([rows[r]], negative))[:2]
        return s1.reshape(shape), s2.reshape(shape), n
    ws = _Work.for_rows(rows, negative)
    for b in _blocks(*rows.shape, rows.device):
        s1[b], s2[b] = _block_sums(_prep_block(rows[b], negative, ws), where, ws)
    return s1.reshape(shape), s2.reshape(shape), n


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
    s1, s2, n = _stats(scores, dim, negative, where)
    return _neff_from_sums(s1, s2, n)


def keep_count(
    scores: Tensor, beta: float = 1.0, dim: int | None = None, *, negative: Negative = "abs",
    where: str | None = None,
) -> Tensor:
    """Number of entries EMP keeps per slice: ``floor(beta * N_eff)`` clamped to ``[1, N]``
    (int64).  A large ``beta`` simply keeps everything."""
    b = _check_beta(beta)
    s1, s2, n = _stats(scores, dim, negative, where)
    return _counts_from_neff(_neff_from_sums(s1, s2, n), b, n)


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
    b = _check_beta(beta)
    if dim is None:  # one vector: the streaming selector
        _check_scores(scores, where)
        thr = global_threshold([scores], b, negative=negative, names=None if where is None else [where])
        return _global_mask(scores, thr, 0, negative, _Scratch())
    _check_scores(scores, where)
    _check_negative(negative)
    rows, back = _as_rows(scores, dim)
    return back(_select_rows(rows, None, b, negative, where))


def _select_rows(rows: Tensor, k: Tensor | None, beta: float, negative: Negative, where: str | None) -> Tensor:
    """Mask of ``rows`` ``[slices, N]`` keeping ``k[r]`` per row, or EMP's ``floor(beta N_eff)``
    when ``k`` is None: the compiled kernel where usable, else the PyTorch engine, one
    cache-sized block at a time (each block summed and selected while in cache)."""
    n = rows.shape[1]
    if _long(n, rows.device):  # each long row streamed in chunks (no row-sized scratch, kernel or not)
        out = torch.empty(rows.shape, dtype=torch.bool, device=rows.device)
        names = None if where is None else [where]
        sc = _Scratch()
        for r in range(rows.shape[0]):
            thr = global_threshold([rows[r]], beta, k=None if k is None else int(k[r]), negative=negative, names=names)
            out[r] = _global_mask(rows[r], thr, 0, negative, sc)
        return out
    if _kernels.usable(rows):  # compiled path (CPU, numba installed): same masks
        mask, s1, s2 = _kernels.rows_keep(rows, k, beta, negative == "shift")
        if bool(torch.isfinite(s1).all() and (k is not None or torch.isfinite(s2).all())):
            return mask
        _finite_or_raise(rows, where)  # NaN/Inf: a clear error; overflowing squares: below
    out = torch.empty(rows.shape, dtype=torch.bool, device=rows.device)
    ws = _Work.for_rows(rows, negative)
    for blk in _blocks(*rows.shape, rows.device):
        x = _prep_block(rows[blk], negative, ws)
        if k is None:
            s1, s2 = _block_sums(x, where, ws)
            kb = _counts_from_neff(_neff_from_sums(s1, s2, n), beta, n)
        else:
            if not bool(torch.isfinite(x.amax(-1)).all()):  # NaN and Inf both reach the max
                _raise_nonfinite(x, where)
            kb = k[blk]
        out[blk] = _rows_topk(x, kb, _grid(rows.dtype, negative), ws)
    return out


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
    _check_scores(scores, where)
    _check_negative(negative)
    rows, back = _as_rows(scores, dim)
    n_rows, n = rows.shape
    kk = torch.as_tensor(k, dtype=torch.int64, device=scores.device).reshape(-1)
    if kk.numel() == 1:
        kk = kk.expand(n_rows)
    if kk.numel() != n_rows:
        raise ValueError(f"k has {kk.numel()} counts for {n_rows} slices{_name(where)}")
    if (kk < 0).any() or (kk > n).any():
        raise ValueError(f"k must lie in [0, {n}]{_name(where)}")
    if dim is None:  # one vector: the streaming selector, without a float64 copy
        thr = global_threshold([scores], k=int(kk[0]), negative=negative,
                               names=None if where is None else [where])
        return _global_mask(scores, thr, 0, negative, _Scratch())
    return back(_select_rows(rows, kk, 1.0, negative, where))


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
    b = _check_beta(beta)
    neff, n, shift, sample = _global_neff(sources, negative, names, _GLOBAL_SAMPLE_EVERY)
    if k is None:
        kk = int(_counts_from_neff(torch.tensor(neff, dtype=torch.float64), b, n))
    else:
        kk = int(k)
        if not 0 <= kk <= n:
            raise ValueError(f"k must lie in [0, {n}], got {k}")
    value, keep_equal = _select_global(sources, kk, n, negative, shift, sample)
    return GlobalThreshold(n, neff, kk, value, keep_equal, shift)


def _global_neff(
    sources: Sequence[ScoreSource], negative: Negative, names: Sequence[str] | None, sample_every: int = 0
) -> tuple[float, int, float, Tensor | None]:
    _check_negative(negative)
    if not len(sources):
        raise ValueError("global scope needs at least one score tensor")
    shift = _global_shift(sources, negative)
    s1, s2, n, sample = _stream_sums(sources, negative, names, shift, sample_every)
    return float(_neff_from_sums(s1, s2, n)), n, shift, sample


def global_effective_number(
    sources: Sequence[ScoreSource], *, negative: Negative = "abs", names: Sequence[str] | None = None
) -> tuple[float, int]:
    """``(N_eff, N)`` of the union of several score tensors, streamed in float64."""
    neff, n, _, _ = _global_neff(sources, negative, names)
    return neff, n


def global_masks(
    sources: Sequence[ScoreSource], thr: GlobalThreshold, *, negative: Negative = "abs"
) -> Iterator[Tensor]:
    """Yield the boolean keep mask of each source in order, one at a time (so a caller can
    apply and drop each before the next is made); built chunk by chunk, so the only
    tensor-sized allocation is the mask itself."""
    sc = _Scratch()
    for i, src in enumerate(sources):
        yield _global_mask(_materialise(src), thr, i, negative, sc)


def global_mask(scores: Tensor, thr: GlobalThreshold, index: int, *, negative: Negative = "abs") -> Tensor:
    """The keep mask of ``scores``, source number ``index`` of the ``sources`` that ``thr``
    was computed on (the index says how many of the ties at the threshold it keeps).  For
    callers that need the scores again after the mask (one materialisation, not two)."""
    if not 0 <= index < max(1, len(thr.keep_equal)):
        raise IndexError(f"index {index} out of range for a threshold over {len(thr.keep_equal)} sources")
    return _global_mask(scores, thr, index, negative, _Scratch())


def _global_mask(scores: Tensor, thr: GlobalThreshold, index: int, negative: Negative, sc: _Scratch) -> Tensor:
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    flat = mask.view(-1)
    budget = thr.keep_equal[index] if thr.keep_equal else 0
    pos = 0
    for c in _nonneg_chunks(scores, negative, thr.shift, sc):
        m = flat[pos : pos + c.numel()]
        torch.gt(c, thr.value, out=m)
        if budget:  # ties at the threshold: the first ones in flat order
            eq = (c == thr.value).nonzero().squeeze(1)[:budget]
            m[eq] = True
            budget -= eq.numel()
        pos += c.numel()
    return mask


def _check_mask(mask: Tensor, scores: Tensor) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != scores.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != scores shape {tuple(scores.shape)}")


def masked_mass(
    scores: Tensor, mask: Tensor, *, negative: Negative = "abs", shift: float = 0.0
) -> tuple[float, float]:
    """``(sum of kept scores, sum of all scores)`` in float64, chunk by chunk (scores made
    non-negative as the rule does: ``|s|``, or ``s - shift``)."""
    _check_mask(mask, scores)
    kept = torch.zeros((), dtype=torch.float64, device=scores.device)
    total = torch.zeros_like(kept)
    flat = mask.reshape(-1)
    pos = 0
    sc = _Scratch()
    for c in _nonneg_chunks(scores, negative, shift, sc):
        total += c.sum(dtype=torch.float64)
        kept += c.mul_(flat[pos : pos + c.numel()]).sum(dtype=torch.float64)  # (c >= 0 finite: exact; 4x masked_fill_)
        pos += c.numel()
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
    _check_scores(scores)
    _check_mask(mask, scores)
    rows, back = _as_rows(scores, dim)
    mrows, _ = _as_rows(mask, dim)
    kept = torch.empty(rows.shape[0], dtype=torch.float64, device=scores.device)
    total = torch.empty_like(kept)
    if _long(rows.shape[1], rows.device):  # e.g. one whole tensor: streamed in chunks, row by row
        for r in range(rows.shape[0]):
            shift = _global_shift([rows[r]], negative)
            kept[r], total[r] = masked_mass(rows[r], mrows[r], negative=negative, shift=shift)
    else:
        ws = _Work.for_rows(rows, negative)
        for b in _blocks(*rows.shape, rows.device):
            x = _prep_block(rows[b], negative, ws)  # exact in its work dtype; sums in float64
            total[b] = x.sum(-1, dtype=torch.float64)
            kept[b] = x.mul_(mrows[b]).sum(-1, dtype=torch.float64)  # x >= 0 finite: exact
    frac = torch.where(total > 0, kept / torch.where(total > 0, total, 1.0), torch.ones_like(total))
    if dim is None:
        return frac.reshape(())
    return frac.reshape(_as_rows_shape(scores, dim))
