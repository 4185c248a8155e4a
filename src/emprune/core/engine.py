"""Exact selection engines behind :mod:`emprune.rule` (private).

* per row (``dim`` given): the rows are processed in cache-sized blocks; for each row the
  k-th largest value is bracketed, ``count(x >= lo) >= k > count(x >= hi)``, starting from a
  sorted sample of columns and narrowed by counting passes (interpolation in sample-rank
  space, then in value space, bisection of the bit pattern as a fallback), until the few
  entries left are sorted.  ``emprune.core.kernels`` replaces this on CPU when numba is there.
* global (many tensors, or one whole tensor): streamed in chunks with reused scratch
  buffers; float64 sums plus a random sample in one pass, then a pass counting at two sample
  quantiles around the threshold's expected rank while gathering the entries between them,
  then an exact selection among those.  Nothing is ever concatenated.

The engine's interface (all that :mod:`emprune.rule` calls): :func:`keep_floor` (the one
``floor(beta * N_eff)``), :func:`slice_neff` / :func:`global_neff` (N_eff per slice / over
many tensors), :func:`select` (exact per-slice masks), :func:`global_cut` +
:func:`threshold_masks` (one threshold over many tensors, then their masks) and
:func:`kept_mass`.  Which engine runs (compiled kernel, PyTorch blocks, streaming) is
decided in one place, :func:`_rows_pass`.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Literal, Sequence, Union

import torch
from torch import Tensor

from . import kernels

__all__ = ["Negative", "ScoreSource", "keep_floor", "slice_neff", "global_neff", "select",
           "global_cut", "threshold_masks", "kept_mass"]

Negative = Literal["abs", "shift"]
ScoreSource = Union[Tensor, Callable[[], Tensor]]

_BLOCK_ELEMS = 1 << 20  # elements per working block on CPU: ~4 MB of float32, cache-sized
_DEVICE_BLOCK_ELEMS = 1 << 24  # on accelerators: fewer, larger blocks (small ones are launch-bound)
_SUM_ELEMS = 1 << 18  # elements per float64 sub-block of the accurate row sums on CPU (cache-sized)
_SAMPLE = 64  # sampled columns per row used to bracket the threshold
_BAND = 64  # entries per row left in the bracket before the final small sort
_GLOBAL_BAND = 1 << 22  # entries left in the global bracket before the final sort
_GLOBAL_SAMPLE_EVERY = 1024  # global scope samples about one score in this many
# floor(beta * N_eff) is taken of N_eff * beta * _SLACK: 32 units of roundoff of slack, so that
# an N_eff that is mathematically an integer (e.g. uniform scores) is not floored one below by
# rounding; enough at any N because the sums are accurate to a few roundings (see keep_floor)
_SLACK = 1.0 + 2.0**-48


# --------------------------------------------------------------------------- the count


def keep_floor(neff: Tensor, beta: float, n: int) -> Tensor:
    """``floor(beta * N_eff)`` clamped to ``[1, n]`` (int64), with the ``2**-48`` slack of
    ``_SLACK``: the one place this rounding is written (``kernels._keep_floor`` is its
    compiled copy, tested equal).

    Why ``2**-48`` (32 units of roundoff u = 2**-53) is exact at any N: every engine's float64
    sums ``s1 = sum x``, ``s2 = sum x**2`` of the non-negative scores are within ``4u``
    (relative) of exact, however long the slice (:func:`_accurate_sums` and the streams'
    compensated chunk totals; the compiled kernel's compensated runs), where a plain running
    sum drifts by up to ``N u``; add ``u`` to ``s2`` for the rounded squares of float64 scores,
    ``u`` to ``s1`` and ``2u`` to ``s2`` for the rounded ``s - min`` of ``negative="shift"``.
    So ``N_eff = s1**2 / s2`` (two more roundings) is within ``19u`` of exact, and
    ``N_eff * beta * _SLACK`` (two more) within ``21u`` of the exact ``beta * N_eff *
    _SLACK``.  Hence: when ``beta * N_eff`` is exactly an integer j, the floor is j (the slack
    exceeds the error by 11u); when it is below j by more than ``53u`` (~``2**-47.3``,
    relative), the floor is below j: an N_eff of 2.9999 keeps 2.  Only values within that
    sliver below an integer, indistinguishable from it after rounding, count as the integer."""
    return torch.floor(neff * beta * _SLACK).clamp(1, n).to(torch.int64)


def _neff_from_sums(s1: Tensor, s2: Tensor, n: int) -> Tensor:
    """N_eff from float64 sums; all-zero slices get N (no preference)."""
    zero = s2 == 0
    neff = torch.where(zero, torch.full_like(s1, float(n)), s1 * s1 / torch.where(zero, 1.0, s2))
    return neff.clamp(1.0, float(n))  # rounding can leave it a hair outside [1, N]


def _name(where: str | None) -> str:
    return f" ({where})" if where else ""


def _check_scores(scores: Tensor, where: str | None = None) -> None:
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}{_name(where)}")
    if scores.is_complex():
        raise TypeError(f"scores must be real, got {scores.dtype}{_name(where)}")
    if scores.numel() == 0:
        raise ValueError(f"scores are empty (shape {tuple(scores.shape)}){_name(where)}")


def _raise_nonfinite(x: Tensor, where: str | None) -> None:
    bad = "NaN" if torch.isnan(x).any() else "Inf"
    n = x.numel() - int(torch.count_nonzero(torch.isfinite(x)))
    raise ValueError(f"scores contain {bad} ({n} non-finite of {x.numel()}){_name(where)}")


def _work_dtype(dtype: torch.dtype, negative: str = "abs") -> torch.dtype:
    """The dtype blocks are processed in: exact for every supported input dtype."""
    if not dtype.is_floating_point or negative == "shift":
        return torch.float64  # shifted scores s - min are exact in float64 only; integers (and bool) are exact in float64 up to 2**53
    if dtype == torch.float64:
        return dtype
    return torch.float32  # float16 / bfloat16 embed exactly (and compare much faster)


def _grid(dtype: torch.dtype, negative: str) -> torch.dtype:
    """The float grid thresholds are searched on: the scores' own (|s| is exact in it)."""
    return dtype if negative == "abs" and dtype.is_floating_point else torch.float64


def _check_negative(negative: str) -> None:
    if negative not in ("abs", "shift"):
        raise ValueError(f"negative must be 'abs' or 'shift', got {negative!r}")


def _as_rows(scores: Tensor, dim: int | None) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """View ``scores`` as a 2-D ``[slices, N]`` tensor and return the inverse reshaper."""
    if dim is None:
        rows = scores.reshape(1, -1)
        return rows, lambda r: r.reshape(scores.shape)
    d = dim % scores.dim() if scores.dim() else 0
    if scores.dim() == 0:
        raise ValueError("dim must be None for a 0-d tensor")
    moved = scores.movedim(d, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    shape = moved.shape

    def back(r: Tensor) -> Tensor:
        return r.reshape(shape).movedim(-1, d)

    return rows, back


def _block_elems(device: torch.device) -> int:
    """Elements per working block / streaming chunk on ``device``."""
    return _BLOCK_ELEMS if device.type == "cpu" else _DEVICE_BLOCK_ELEMS


def _long(n_cols: int, device: torch.device) -> bool:
    """Rows longer than a working block are streamed one at a time in chunks (the global
    engine), so that no scratch buffer of a row's size is allocated."""
    return n_cols > _block_elems(device)


def _blocks(n_rows: int, n_cols: int, device: torch.device) -> Iterator[slice]:
    step = max(1, _block_elems(device) // max(1, n_cols))
    for i in range(0, n_rows, step):
        yield slice(i, min(n_rows, i + step))


class _Work:
    """Block-sized scratch buffers, reused across blocks: fresh multi-MB allocations cost
    page faults that would dominate these cache-resident passes."""

    def __init__(self, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.x = torch.empty(rows, n, dtype=_work_dtype(dtype), device=device)
        self.d = torch.empty(rows, n, dtype=torch.float64, device=device)  # float64 copy, then squares
        self.f = torch.empty(2, rows, _folded(n), dtype=torch.float64, device=device)  # see _accurate_sums
        self.t = torch.empty_like(self.f)
        self.b = torch.empty(rows, n, dtype=torch.bool, device=device)

    @staticmethod
    def for_rows(rows: Tensor, negative: str) -> "_Work":
        step = max(1, _block_elems(rows.device) // max(1, rows.shape[1]))
        return _Work(min(step, rows.shape[0]), rows.shape[1], _work_dtype(rows.dtype, negative), rows.device)


def _prep_block(block: Tensor, negative: Negative, ws: _Work | None = None) -> Tensor:
    """Non-negative working copy of a block of score rows (into ``ws`` when given)."""
    if ws is None:
        x = block.to(_work_dtype(block.dtype, negative))
    else:
        x = ws.x[: block.shape[0]]
        x.copy_(block)
    if negative == "abs":
        return x.abs_()
    return x.sub_(x.amin(dim=-1, keepdim=True))


def _folded(n: int) -> int:
    """Length of :func:`_fold4`'s output for rows of ``n``."""
    return n // 4 + n % 4


def _fold4(d: Tensor, out: Tensor) -> Tensor:
    """Partial sums of 4 entries each over the last dim of ``d`` (its 4 contiguous quarters
    added elementwise, one pass; the < 4 columns left over copied), into ``out`` (last dim
    :func:`_folded`): each within ``3u`` of exact (u = 2**-53), whatever the order of addition."""
    n = d.shape[-1]
    m = n // 4
    if m:
        torch.sum(d[..., : 4 * m].unflatten(-1, (4, m)), -2, out=out[..., :m])
    out[..., m:].copy_(d[..., 4 * m :])
    return out


def _exact_sums(d: Tensor, tmp: Tensor) -> tuple[Tensor, Tensor]:
    """Sums over the last dim (n entries) of a non-negative float64 ``d`` (or one whose negative
    entries are tiny next to the sum, as the ``pi`` of such sums are), as ``(tau, pi)``:
    ``tau`` exact and ``tau + pi`` within ``8 n**2 u**2`` (relative) of the exact sum, whatever
    the order in which torch adds (``tmp``: scratch shaped like ``d``).

    The error-free extraction of Rump, Ogita and Oishi (2008): with ``S < 2**e`` (from a plain
    sum) and ``g = 2**(e - 50)``, ``(d + sigma) - sigma`` for ``sigma = 1.5 * 2**52 * g`` (whose
    ulp is ``g``) rounds every entry to a multiple ``q`` of ``g``, exactly; all partial sums of
    the ``q`` are multiples of ``g`` below ``2**53 g``, so their sum ``tau`` is exact in any
    order; the residuals ``p = d - q`` are exact too, ``|p| <= g / 2 <= 8u S``, so their plain
    sum ``pi`` is off by at most ``n u * n * 8u S``."""
    s0 = d.sum(-1, keepdim=True)
    g = torch.ldexp(torch.ones_like(s0), torch.frexp(s0).exponent - 50)
    sigma = g * (1.5 * 2.0**52)
    q = torch.add(d, sigma, out=tmp).sub_(sigma)
    tau = q.sum(-1)
    return tau, torch.sub(d, q, out=tmp).sum(-1)


def _accurate_sums(d: Tensor, f: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(tau, pi)``, each ``[2, ...]``: the sum and the sum of squares over the last dim of a
    non-negative float64 ``d`` (overwritten with its squares) as the unrounded ``tau + pi``,
    each within ``3u`` of exact (relative) at any length, ``4u`` once rounded: every 4 entries
    are added plainly (:func:`_fold4`, <= 3u) and those partial sums exactly
    (:func:`_exact_sums`).  (Plain float64 sums drift by up to ``(n - 1) u``, beyond
    ``keep_floor``'s slack for long rows.)  ``f``, ``t``: scratch ``[2, ..., _folded(n)]``.
    Two to three times the cost of plain sums."""
    _fold4(d, f[0])
    _fold4(d.mul_(d), f[1])
    return _exact_sums(f, t)


def _row_sums(x: Tensor, ws: _Work | None = None) -> tuple[Tensor, Tensor]:
    """float64 sum and sum of squares per row of a non-negative block, each within ``4u`` of
    exact (:func:`_accurate_sums`; plus ``u`` for the squares of float64 scores, rounded once:
    those of float32 and narrower scores are exact).  Taken a few rows at a time on CPU, so
    that their float64 copy and scratch stay in a core's cache through the passes."""
    if ws is None:
        ws = _Work(x.shape[0], x.shape[1], torch.float64, x.device)
    rows, n = x.shape
    s = torch.empty(2, rows, dtype=torch.float64, device=x.device)
    step = max(1, (_SUM_ELEMS if x.device.type == "cpu" else _DEVICE_BLOCK_ELEMS) // max(1, n))
    for i in range(0, rows, step):
        j = min(rows, i + step)
        tau, pi = _accurate_sums(ws.d[: j - i].copy_(x[i:j].detach()), ws.f[:, : j - i], ws.t[:, : j - i])
        torch.add(tau, pi, out=s[:, i:j])
    return s[0], s[1]


#: float64 sums are used as they are when ``s1 <= 2**500`` (so ``s1 * s1`` cannot overflow)
#: and ``s2 >= 2**-900`` (so the squares that underflow, below ``2**-1022``, change it by far
#: less than a rounding); other slices (float64 scores beyond ~1e150 or below ~1e-150) are
#: summed again scaled by a power of two, exactly (:func:`_pow2_scaled`; N_eff is scale-free)
_SUM_MAX, _SUM2_MIN = 2.0**500, 2.0**-900


def _safe_sums(s1: Tensor, s2: Tensor) -> Tensor:
    """Where the sums give N_eff to within rounding (all-zero slices included); False at NaN/Inf."""
    return (s1 == 0) | ((s1 <= _SUM_MAX) & (s2 >= _SUM2_MIN))


def _pow2_factors(top: Tensor) -> tuple[Tensor, Tensor]:
    """Two powers of two whose product puts ``top`` (> 0, finite) in ``[0.5, 1)``: multiplying
    by them is exact (two factors, as ``2**1073`` itself would overflow)."""
    e = torch.frexp(top).exponent
    h = -e // 2
    one = torch.ones_like(top)
    return torch.ldexp(one, h), torch.ldexp(one, -e - h)


def _pow2_scaled(x: Tensor) -> Tensor:
    """float64 copy of a non-negative block, each row scaled exactly so its max is in [0.5, 1)."""
    x64 = x.to(torch.float64, copy=True)
    f1, f2 = _pow2_factors(x64.amax(-1, keepdim=True))
    return x64.mul_(f1).mul_(f2)


def _block_sums(x: Tensor, where: str | None, ws: _Work | None = None) -> tuple[Tensor, Tensor]:
    """Row sums of a prepared block; raises on NaN/Inf; sums again, scaled exactly, the rows
    whose float64 squares overflow or underflow (:func:`_safe_sums`)."""
    s1, s2 = _row_sums(x, ws)
    bad = ~_safe_sums(s1, s2)
    if bool(bad.any()):
        _finite_or_raise(x, where)
        s1[bad], s2[bad] = _row_sums(_pow2_scaled(x[bad]))
    return s1, s2


def _as_rows_shape(scores: Tensor, dim: int) -> tuple[int, ...]:
    d = dim % scores.dim()
    return tuple(s for i, s in enumerate(scores.shape) if i != d)


def _finite_or_raise(x: Tensor, where: str | None) -> None:
    if x.is_floating_point() and not torch.isfinite(x).all():
        _raise_nonfinite(x, where)


def _count_ge(x: Tensor, t: Tensor, ws: _Work | None = None) -> Tensor:
    """Per row, how many entries are >= t (into the scratch bool buffer when given)."""
    if ws is None or x.shape[0] > ws.b.shape[0]:
        ge = x >= t.unsqueeze(-1)
    else:
        ge = torch.ge(x, t.unsqueeze(-1), out=ws.b[: x.shape[0]])
    return ge.sum(-1, dtype=torch.int32).to(torch.int64)


def _next_up(t: Tensor, grid: torch.dtype | None = None) -> Tensor:
    """Next representable value above ``t`` (in ``grid``'s precision when given)."""
    g = t if grid is None else t.to(grid)
    return torch.nextafter(g, torch.full_like(g, math.inf)).to(t.dtype)


def _rank_in(ext: Tensor, t: Tensor) -> Tensor:
    """Continuous rank of ``t`` among each row's ascending sample ``ext``."""
    j = torch.searchsorted(ext, t[:, None]).clamp(1, ext.shape[1] - 1)
    a, b = ext.gather(1, j - 1).squeeze(1), ext.gather(1, j).squeeze(1)
    frac = torch.where(b > a, (t - a) / torch.where(b > a, b - a, 1), 0).clamp(0, 1)
    return (j.squeeze(1) - 1).to(t.dtype) + frac


def _value_at(ext: Tensor, r: Tensor) -> Tensor:
    """Inverse of :func:`_rank_in`: the value at continuous rank ``r``."""
    j = torch.floor(r).long().clamp(0, ext.shape[1] - 2)
    a, b = ext.gather(1, j[:, None]).squeeze(1), ext.gather(1, j[:, None] + 1).squeeze(1)
    return a + (r - j.to(r.dtype)).clamp(0, 1) * (b - a)


def _midpoint(lo: Tensor, hi: Tensor, grid: torch.dtype) -> Tensor:
    """Midpoint of non-negative floats in the bit-pattern order of ``grid`` (the scores'
    own float dtype): halves the representable values between them, so bisection ends
    within 16, 32 or 64 steps."""
    it = {torch.float64: torch.int64, torch.float32: torch.int32}.get(grid, torch.int16)
    a, b = lo.to(grid).view(it).long(), hi.to(grid).view(it).long()
    return (a + (b - a) // 2).to(it).view(grid).to(lo.dtype)


def _rows_topk(x: Tensor, k: Tensor, grid: torch.dtype | None = None, ws: _Work | None = None) -> Tensor:
    """Exact per-row top-k mask of a non-negative block ``x`` ``[B, N]``.

    Finds per row the k-th largest value ``v`` by bracketing ``[lo, hi)`` with
    ``count(x >= lo) >= k > count(x >= hi)``: a sorted sample gives the first bracket
    (:func:`_sample_ranks`), counting passes narrow it (:func:`_narrow_brackets`), the few
    entries left are sorted (:func:`_kth_in_brackets`); then ``x > v`` plus the first
    entries equal to ``v`` (:func:`_mask_from_value`).  ``grid`` is the scores' own float
    dtype: candidate thresholds are rounded to it, so half-precision scores (few distinct
    values, many ties) converge in few steps.

    Worked example (one row, a band of 2 instead of ``_BAND`` for brevity):
    ``x = [.1 .9 .4 .7 .3 .8 .2 .6]``, ``k = 3``, so ``v = .7``.  Start with ``lo = 0``
    (``c_lo = count(x >= 0) = 8``) and ``hi`` = just above the max, ``.9+`` (``c_hi = 0``).
    ``(c_lo - k) / (c_lo - c_hi) = 5/8``: the threshold lies about 5/8 of the way up the
    bracket, so counts are taken a little below and above that estimate, say at ``.55``
    (``count = 4 >= k``: ``lo = .55, c_lo = 4``) and ``.75`` (``count = 2 < k``:
    ``hi = .75, c_hi = 2``).  Now ``c_lo - c_hi = 2`` entries lie in ``[.55, .75)``:
    ``{.7, .6}``; sorted descending, the ``(k - c_hi) = 1``-st is ``.7 = v``.  The mask is
    ``x >= .7``, which keeps exactly ``k = 3`` here (ties would be trimmed to ``k``, lowest
    index first).
    """
    rows, n = x.shape
    grid = grid if grid is not None and grid.is_floating_point else x.dtype
    full = k >= n
    if bool(full.all()):
        return torch.ones_like(x, dtype=torch.bool)
    none = k <= 0
    if bool(none.any()):  # rows keeping nothing: select 1 there, then clear them
        m = _rows_topk(x, k.clamp_min(1), grid, ws)
        m[none] = False
        return m
    if n <= 2 * _SAMPLE or x.device.type != "cpu":
        # short rows, and accelerators (where a block's sort is one fast kernel and the
        # bracketing passes would be launch- and sync-bound): the k-th value from a full sort
        v = torch.sort(x, dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1)).squeeze(1)
        return _mask_from_value(x, v, k, full)
    ext = _sample_ranks(x, grid)
    lo, hi, c_lo, c_hi = _narrow_brackets(x, k, ext, grid, ws)
    v, n_ge = _kth_in_brackets(x, k, lo, hi, c_lo, c_hi, grid)
    return _mask_from_value(x, v, k, full, n_ge)


def _sample_ranks(x: Tensor, grid: torch.dtype) -> Tensor:
    """Step 1: per row, a deterministic pseudo-random sample of ``_SAMPLE`` columns, sorted,
    between 0 and just above the row's max (``count(x >= top) == 0``): ``[B, _SAMPLE + 2]``,
    the map from sample rank to value that the first, coarse narrowing step interpolates."""
    rows, n = x.shape
    g = torch.Generator(device="cpu").manual_seed(n)
    cols = torch.randperm(n, generator=g)[:_SAMPLE].to(x.device)
    top = _next_up(x.amax(-1), grid)
    zero = torch.zeros(rows, dtype=x.dtype, device=x.device)
    return torch.cat([zero[:, None], torch.sort(x[:, cols], dim=-1).values, top[:, None]], 1)


def _narrow_brackets(
    x: Tensor, k: Tensor, ext: Tensor, grid: torch.dtype, ws: _Work | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step 2: narrow each row's bracket ``[lo, hi)``, ``count(x >= lo) = c_lo >= k > c_hi =
    count(x >= hi)``, until at most ``_BAND`` entries lie in it or it holds one value.
    Each step counts at two candidate thresholds (:func:`_candidates`) on the rows still
    open; every 4th-ish step (when the last one shrank the bracket less than 2x) bisects the
    bit pattern instead, which guarantees termination."""
    rows, n = x.shape
    lo, hi = ext[:, 0].clone(), ext[:, -1].clone()
    c_lo, c_hi = torch.full_like(k, n), torch.zeros_like(k)
    slow = torch.zeros_like(k, dtype=torch.bool)  # last step shrank the bracket < 2x
    for step in range(4 * 64 + 8):
        done = ((c_lo - c_hi) <= _BAND) | (_next_up(lo, grid) >= hi)
        if bool(done.all()):
            return lo, hi, c_lo, c_hi
        sel = (~done).nonzero().squeeze(1)
        if 2 * sel.numel() > rows:  # most rows still open: count on all, copy nothing
            sel = torch.arange(rows, device=x.device)
            xs = x
        else:
            xs = x[sel]
        ks = k[sel]
        l, h, cl, ch = lo[sel], hi[sel], c_lo[sel], c_hi[sel]
        bis = slow[sel]
        before = cl - ch
        for t in _candidates(ext[sel], ks, l, h, cl, ch, step == 0, bis, grid):
            t = t.to(grid).to(x.dtype)  # a representable threshold
            ok = (t > l) & (t < h)
            c_t = _count_ge(xs, t, ws)
            up = ok & (c_t >= ks)
            dn = ok & (c_t < ks)
            l, cl = torch.where(up, t, l), torch.where(up, c_t, cl)
            h, ch = torch.where(dn, t, h), torch.where(dn, c_t, ch)
        slow[sel] = ~bis & (2 * (cl - ch) > before)
        lo[sel], hi[sel], c_lo[sel], c_hi[sel] = l, h, cl, ch
    raise RuntimeError("emprune: threshold search did not converge")  # unreachable: <= 64 halvings


def _candidates(
    es: Tensor, ks: Tensor, l: Tensor, h: Tensor, cl: Tensor, ch: Tensor, coarse: bool, bis: Tensor,
    grid: torch.dtype,
) -> list[Tensor]:
    """The two thresholds one narrowing step counts at, per open row: where the k-th largest
    is expected, ``f = (c_lo - k) / (c_lo - c_hi)`` of the way up the bracket, minus and plus
    a margin, so that both ends move.  Coarse (first step): in sample-rank space, +-1.5
    binomial standard deviations of the sample.  Fine: in value space; a linear CDF is off
    by ~1/8 of the relative density change across the bracket, and +-2.5% of it covers
    smooth densities (a miss just costs another step).  Rows in ``bis``: the bit-pattern
    midpoint, twice."""
    m1 = es.shape[1] - 1  # sample ranks run over [0, m1]
    f = ((cl - ks).double() / (cl - ch).double()).to(l.dtype)
    mid = _midpoint(l, h, grid)
    if coarse:
        r_l, r_h = _rank_in(es, l), _rank_in(es, h)
        span = r_h - r_l
        r = r_l + f * span
        w = 1.5 * torch.sqrt(span * f * (1 - f)) + 0.5
        below, above = _value_at(es, (r - w).clamp(0, m1)), _value_at(es, (r + w).clamp(0, m1))
    else:
        below, above = l + (h - l) * (f - 0.025).clamp(0, 1), l + (h - l) * (f + 0.025).clamp(0, 1)
    return [torch.where(bis, mid, below), torch.where(bis, mid, above)]


def _kth_in_brackets(
    x: Tensor, k: Tensor, lo: Tensor, hi: Tensor, c_lo: Tensor, c_hi: Tensor, grid: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Step 3: the exact k-th largest value ``v`` per row and ``count(x >= v)``.  Rows whose
    bracket holds one representable value have ``v = lo``; the others have at most ``_BAND``
    entries in ``[lo, hi)``, which are packed into one small ``[rows, width]`` tensor
    (padded with -1) and sorted: ``v`` is the ``(k - c_hi)``-th largest of them."""
    v = lo.clone()
    n_ge = c_lo.clone()  # count(x >= v)
    small = ((c_lo - c_hi) <= _BAND) & (_next_up(lo, grid) < hi)
    if not bool(small.any()):
        return v, n_ge
    idx = small.nonzero().squeeze(1)
    xs = x if idx.numel() == x.shape[0] else x[idx]  # (all rows: no copy)
    inband = (xs >= lo[idx][:, None]) & (xs < hi[idx][:, None])
    cnt = c_lo[idx] - c_hi[idx]  # = inband.sum(-1): the bracket's counts are exact
    vals = xs[inband]  # row-major: grouped by row
    width = int(cnt.max())
    row_id = torch.repeat_interleave(torch.arange(idx.numel(), device=x.device), cnt)
    start = torch.cumsum(cnt, 0) - cnt
    pos = torch.arange(vals.numel(), device=x.device) - start[row_id]
    packed = torch.full((idx.numel(), width), -1.0, dtype=x.dtype, device=x.device)
    packed[row_id, pos] = vals
    packed = torch.sort(packed, dim=-1, descending=True).values
    r = (k[idx] - c_hi[idx] - 1).clamp(0, width - 1)
    vi = packed.gather(1, r[:, None]).squeeze(1)
    v[idx] = vi
    n_ge[idx] = c_hi[idx] + (packed >= vi[:, None]).sum(-1)
    return v, n_ge


def _mask_from_value(x: Tensor, v: Tensor, k: Tensor, full: Tensor, cnt: Tensor | None = None) -> Tensor:
    """``x >= v`` per row, trimmed to exactly ``k`` by dropping the highest-index ties
    (``cnt``: count(x >= v) per row, when already known)."""
    mask = x >= v[:, None]
    if cnt is None:
        cnt = mask.sum(-1)
    over = (cnt > k).nonzero().squeeze(1)
    if over.numel():
        xs, vs, ks = x[over], v[over], k[over]
        eq = xs == vs[:, None]
        need = ks - (xs > vs[:, None]).sum(-1)  # how many equal entries to keep
        keep_eq = eq & (torch.cumsum(eq, -1) <= need[:, None])
        mask[over] = (xs > vs[:, None]) | keep_eq
    if bool(full.any()):  # (an unconditional mask[full] = True is a full pass)
        mask[full] = True
    return mask


def _materialise(src: ScoreSource) -> Tensor:
    return src() if callable(src) else src


class _Scratch:
    """Reusable chunk-sized buffers for the streaming passes (a fresh multi-MB temporary per
    chunk would cost more in page faults than the arithmetic)."""

    def __init__(self) -> None:
        self.bufs: dict[tuple, Tensor] = {}

    def get(self, name: str, dtype: torch.dtype, n: int, device: torch.device) -> Tensor:
        key = (name, dtype, device)
        b = self.bufs.get(key)
        if b is None or b.numel() < n:
            b = self.bufs[key] = torch.empty(max(n, _block_elems(torch.device(device))), dtype=dtype, device=device)
        return b[:n]


def _nonneg_chunks(t: Tensor, negative: Negative, shift: float, sc: _Scratch | None = None) -> Iterator[Tensor]:
    """Non-negative working copies of cache-sized chunks of a flattened tensor.  With a
    scratch, each chunk lives in a reused buffer: valid until the next one is yielded."""
    flat = t.reshape(-1)
    wd = _work_dtype(t.dtype, negative)
    step = _block_elems(t.device)
    for i in range(0, flat.numel(), step):
        src = flat[i : i + step]
        c = src.to(wd) if sc is None else sc.get("x", wd, src.numel(), t.device).copy_(src)
        if sc is None and c.data_ptr() == src.data_ptr():
            c = c.clone()  # never modify the caller's scores
        yield c.abs_() if negative == "abs" else c.sub_(shift)


def _in_bracket(c: Tensor, lo: float, hi: float, sc: _Scratch) -> Tensor:
    """Bool mask ``lo <= c < hi`` in scratch buffers."""
    a = torch.ge(c, lo, out=sc.get("b1", torch.bool, c.numel(), c.device))
    return a.logical_and_(torch.lt(c, hi, out=sc.get("b2", torch.bool, c.numel(), c.device)))


def _global_shift(sources: Sequence[ScoreSource], negative: Negative) -> float:
    if negative != "shift":
        return 0.0
    return min(float(_materialise(s).amin()) for s in sources)


def _stream_sums(
    sources: Sequence[ScoreSource], negative: Negative, names: Sequence[str] | None, shift: float,
    sample_every: int = 0,
) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """float64 (sum, sum of squares, count) over all sources, chunk by chunk, and with
    ``sample_every`` a seeded random sample of about one score in that many (sorted).  Each
    source is summed to within ``3u`` (:func:`_source_sums`), as an unrounded pair, and the
    pairs are added exactly and rounded once (``math.fsum``): the sums are within ``4u`` of
    exact however many scores and sources there are.  Sums out of float64's safe range (:func:`_safe_sums`) are taken
    again with the scores scaled exactly (:func:`_rescaled_stream_sums`)."""
    pairs: list[Tensor] = []
    n = 0
    g = torch.Generator(device="cpu").manual_seed(1234)
    parts: list[Tensor] = []
    sc = _Scratch()

    def sample(src: Tensor) -> None:  # of a raw chunk: its sampled scores made non-negative
        idx = torch.randint(0, src.numel(), (src.numel() // sample_every + 1,), generator=g)
        v = src[idx.to(src.device)].double().cpu()
        parts.append(v.abs_() if negative == "abs" else v.sub_(shift))

    for i, src in enumerate(sources):
        t = _materialise(src)
        where = names[i] if names is not None else (f"tensor {i}" if len(sources) > 1 else None)
        _check_scores(t, where)
        pair = torch.stack(_source_sums(t, negative, shift, sc, sample=sample if sample_every else None)).cpu()
        if not bool(torch.isfinite(pair.sum(0)).all()):
            _finite_or_raise(t, where)  # NaN/Inf scores raise; overflowing squares are rescaled below
        pairs.append(pair)
        n += t.numel()
        del t  # a computed score tensor is freed before the next one is made
    s = _fsum_pairs(pairs)
    if not bool(_safe_sums(s[0], s[1])):
        s = _rescaled_stream_sums(sources, negative, shift, sc)
    sample_ = torch.sort(torch.cat(parts)).values if parts else None
    return s[0], s[1], n, sample_


def _fsum_pairs(pairs: list[Tensor]) -> Tensor:
    """``[sum, sum of squares]``: the exact totals of the ``[2, 2]`` pairs, rounded once
    (``math.fsum``); NaN where they are not finite."""
    p = torch.stack(pairs).double()  # [sources, 2 (tau, pi), 2 (s1, s2)]
    if not bool(torch.isfinite(p).all()):
        return torch.full((2,), math.nan, dtype=torch.float64)
    try:
        return torch.tensor([math.fsum(p[..., j].reshape(-1).tolist()) for j in (0, 1)], dtype=torch.float64)
    except OverflowError:  # finite terms, infinite total
        return torch.full((2,), math.nan, dtype=torch.float64)


def _source_sums(
    t: Tensor, negative: Negative, shift: float, sc: _Scratch, scale: tuple[float, float] | None = None,
    sample: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(tau, pi)``, each ``[sum, sum of squares]`` on ``t``'s device, whose unrounded sum is
    within ``3u`` (relative) of the sums of one tensor's scores (``|s|`` or ``s - shift``).
    Chunk by chunk: on CPU by the compiled kernel where there is one (about as fast as plain
    sums), else by :func:`_accurate_sums`; the chunks' partial sums are then added exactly
    (:func:`_exact_sums`).  ``scale``: two powers of two every score is multiplied by
    (exactly); ``sample`` sees every raw chunk."""
    flat = t.detach().reshape(-1)
    step = _block_elems(t.device)
    compiled = scale is None and kernels.flat_usable(flat)
    pieces: list[Tensor] = []
    for i in range(0, flat.numel(), step):
        src = flat[i : i + step]
        if sample is not None:
            sample(src)
        if compiled:
            pieces.append(kernels.flat_sums(src, None if negative == "abs" else shift))
            continue
        x = sc.get("x", torch.float64, src.numel(), src.device).copy_(src)  # exact
        x = x.abs_() if negative == "abs" else x.sub_(shift)
        if scale is not None:
            x.mul_(scale[0]).mul_(scale[1])  # exact: powers of two
        m = _folded(x.numel())
        f, tmp = (sc.get(name, torch.float64, 2 * m, x.device).view(2, m) for name in ("f", "t"))
        pieces += _accurate_sums(x, f, tmp)  # (squares x in place: it is scratch)
    p = torch.stack(pieces, 1)  # [2, pieces]: non-negative (or NaN/Inf)
    if p.shape[1] == 1:
        return p[:, 0], torch.zeros_like(p[:, 0])
    return _exact_sums(p, torch.empty_like(p))


def _rescaled_stream_sums(sources: Sequence[ScoreSource], negative: Negative, shift: float, sc: _Scratch) -> Tensor:
    """(sum, sum of squares) again, every score times the one power of two that puts the
    largest in [0.5, 1): exact, and N_eff is scale-free.  For float64 scores whose squares
    overflow or underflow float64 (one more pass for the max)."""
    top = max(float(c.amax()) for s in sources for c in _nonneg_chunks(_materialise(s), negative, shift, sc))
    e = math.frexp(top)[1]
    scale = (2.0 ** (-e // 2), 2.0 ** (-e - (-e // 2)))  # two factors: 2**1073 alone would overflow
    return _fsum_pairs([torch.stack(_source_sums(_materialise(s), negative, shift, sc, scale)).cpu() for s in sources])


def _pass(
    sources: Sequence[ScoreSource], ts: Tensor, negative: Negative, shift: float,
    collect: tuple[float, float] | None = None, expect: int = 0,
) -> tuple[list[int], list[Tensor] | None]:
    """One streaming pass: ``count(x >= t)`` for each threshold in ``ts`` and, with
    ``collect=(a, b)``, the entries in ``[a, b)`` of each source (on the CPU),
    gathered into one buffer sized from ``expect`` (grown if needed), so that the kept
    pieces never fragment the heap between the chunk temporaries."""
    counts = [0] * ts.numel()
    # float32 (exact for float32/half scores, half the memory), widened if float64 shows up
    buf = torch.empty(max(1024, int(1.5 * expect) + 1024) if collect is not None else 0, dtype=torch.float32)
    pos = 0
    spans = []
    sc = _Scratch()
    for src in sources:
        t = _materialise(src)
        tt = ts.to(device=t.device, dtype=_work_dtype(t.dtype, negative))
        acc = torch.zeros(ts.numel(), dtype=torch.int64, device=t.device)
        start = pos
        for c in _nonneg_chunks(t, negative, shift, sc):
            b = sc.get("b", torch.bool, c.numel(), c.device)
            for j in range(tt.numel()):
                acc[j] += torch.count_nonzero(torch.ge(c, tt[j], out=b))
            if collect is not None:
                piece = c[_in_bracket(c, collect[0], collect[1], sc)]
                if piece.dtype == torch.float64 and buf.dtype != torch.float64:
                    buf = buf.double()
                if pos + piece.numel() > buf.numel():  # rare: grow geometrically
                    buf = torch.cat([buf[:pos], torch.empty(max(buf.numel(), piece.numel()), dtype=buf.dtype)])
                buf[pos : pos + piece.numel()].copy_(piece)
                pos += piece.numel()
        counts = [x + y for x, y in zip(counts, acc.tolist())]
        spans.append((start, pos))
        del t
    return counts, ([buf[a:b] for a, b in spans] if collect is not None else None)


def _select_global(
    sources: Sequence[ScoreSource], k: int, n: int, negative: Negative, shift: float,
    sample: Tensor | None = None,
) -> tuple[float, list[int]]:
    """Exact k-th largest value over all sources, and how many of its ties each source
    keeps (lower flat index, then lower source index, first).

    Keeps a bracket ``count(x >= lo) = c_lo >= k > c_hi = count(x >= hi)``.  A round counts
    at two quantiles of a sample of the bracket (the first sample comes from the sums pass),
    3 standard errors either side of the threshold's expected rank, and in the same pass
    gathers the entries between them; when they bracket the threshold (all but ~0.3% of
    the time) those entries are all that is left to select from."""
    if k >= n:
        return -math.inf, [0] * len(sources)
    if k == 0:
        return math.inf, [0] * len(sources)
    lo, c_lo, hi, c_hi = 0.0, n, math.inf, 0
    g = torch.Generator(device="cpu").manual_seed(4321)
    sc = _Scratch()
    stalled = False
    band: list[Tensor] | None = None
    while _next_up_f(lo) < hi:
        if c_lo - c_hi <= _GLOBAL_BAND:  # few enough: gather the bracket
            band = _pass(sources, torch.empty(0, dtype=torch.float64), negative, shift, (lo, hi), c_lo - c_hi)[1]
            break
        if sample is None:  # a fresh sample of the bracket's entries
            parts = []
            for src in sources:
                for c in _nonneg_chunks(_materialise(src), negative, shift, sc):
                    inb = c[_in_bracket(c, lo, hi, sc)]
                    if inb.numel():
                        idx = torch.randint(0, inb.numel(), (inb.numel() // _GLOBAL_SAMPLE_EVERY + 1,), generator=g)
                        parts.append(inb[idx.to(inb.device)].double().cpu())
            sample = torch.sort(torch.cat(parts)).values
        ms = sample.numel()
        p = (c_lo - k) / (c_lo - c_hi)  # share of the bracket below the threshold
        sd = math.sqrt(max(p * (1 - p), 1.0 / ms) / ms)
        qa, qb = (min(ms - 1, max(0, round((p + z * sd) * ms))) for z in (-3, 3))
        ts = sample[[qa, qb]]
        if stalled:  # the sample cannot split the bracket (ties): try just above lo
            ts = torch.cat([ts, torch.tensor([_next_up_f(lo)], dtype=torch.float64)])
        ts = ts.unique()
        ts = ts[(ts > lo) & (ts < hi)]
        expected = (qb - qa + 2) / ms * (c_lo - c_hi)  # entries between the two thresholds
        collect = (float(ts[0]), float(ts[1])) if ts.numel() == 2 and 2 * expected <= _GLOBAL_BAND else None
        before = (lo, hi)
        counts, got = _pass(sources, ts, negative, shift, collect, int(expected))
        for t, c in zip(ts.tolist(), counts):  # ascending: the last valid lower end is tightest
            if c >= k:
                lo, c_lo = t, c
            elif t < hi:
                hi, c_hi = t, c
        if collect is not None and (lo, hi) == collect:
            band = got
            break
        stalled = (lo, hi) == before
        sample = None
    if band is None:  # the bracket holds a single value: it is the threshold
        value = lo
        band_eq = [sum(int(torch.count_nonzero(torch.eq(c, lo, out=sc.get("b", torch.bool, c.numel(), c.device))))
                       for c in _nonneg_chunks(_materialise(s), negative, shift, sc)) for s in sources]
    else:
        allv = torch.cat(band) if len(band) > 1 else band[0]
        value = float(torch.kthvalue(allv, allv.numel() - (k - c_hi) + 1).values)  # (k - c_hi)-th largest
        band_eq = [int(torch.count_nonzero(b == value)) for b in band]
        c_hi += sum(int(torch.count_nonzero(b > value)) for b in band)
    need = k - c_hi  # how many entries equal to value are kept, assigned in order
    keep_equal = []
    for e in band_eq:
        keep_equal.append(min(e, need))
        need -= keep_equal[-1]
    return value, keep_equal


def _next_up_f(x: float) -> float:
    return math.nextafter(x, math.inf)


# ----------------------------------------------------------------- the interface


def slice_neff(scores: Tensor, dim: int | None, negative: Negative, where: str | None) -> tuple[Tensor, int]:
    """``(N_eff per slice along dim, N)``, float64, validated; ``dim=None``: one N_eff of
    the whole tensor (0-d), streamed."""
    _check_scores(scores, where)
    _check_negative(negative)
    if dim is None:
        s1, s2, n, _ = _stream_sums([scores], negative, None if where is None else [where],
                                    _global_shift([scores], negative))
        return _neff_from_sums(s1, s2, n), n
    rows, _ = _as_rows(scores, dim)
    n = rows.shape[1]
    _, s1, s2 = _rows_pass(rows, None, 1.0, negative, where, masks=False)
    shape = _as_rows_shape(scores, dim)
    return _neff_from_sums(s1.reshape(shape), s2.reshape(shape), n), n


def select(
    scores: Tensor, dim: int | None, k: int | Tensor | None, beta: float, negative: Negative, where: str | None
) -> Tensor:
    """Exact keep mask (same shape and device as ``scores``): per slice along ``dim`` (all
    of it when None) the ``k`` largest (an int, or one count per slice), or EMP's
    ``floor(beta * N_eff)`` when ``k`` is None; ties broken by lower index."""
    _check_scores(scores, where)
    _check_negative(negative)
    rows, back = _as_rows(scores, dim)
    kk = None if k is None else _per_slice_k(k, rows, where)
    if dim is None:  # one vector: the streaming selector, without a float64 copy
        _, _, _, value, keep_equal, shift = global_cut(
            [scores], beta, None if kk is None else int(kk[0]), negative, None if where is None else [where])
        return next(threshold_masks([scores], value, keep_equal, shift, negative))
    return back(_rows_pass(rows, kk, beta, negative, where, masks=True)[0])


def _per_slice_k(k: int | Tensor, rows: Tensor, where: str | None) -> Tensor:
    """Explicit counts as int64, one per row of ``rows`` ``[slices, N]``, range-checked."""
    n_rows, n = rows.shape
    kk = torch.as_tensor(k, dtype=torch.int64, device=rows.device).reshape(-1)
    if kk.numel() == 1:
        kk = kk.expand(n_rows)
    if kk.numel() != n_rows:
        raise ValueError(f"k has {kk.numel()} counts for {n_rows} slices{_name(where)}")
    if (kk < 0).any() or (kk > n).any():
        raise ValueError(f"k must lie in [0, {n}]{_name(where)}")
    return kk


def _rows_pass(
    rows: Tensor, k: Tensor | None, beta: float, negative: Negative, where: str | None, masks: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(mask, s1, s2)`` of ``rows`` ``[slices, N]``: the float64 sums per row and, with
    ``masks``, the mask keeping ``k[r]`` per row (EMP's count when ``k`` is None).  The one
    place that picks the engine: rows longer than a working block are streamed one at a time
    (no row-sized scratch); else the compiled kernel where usable (same masks); else the
    PyTorch engine, one cache-sized block at a time.  Unused outputs may be None."""
    if _long(rows.shape[1], rows.device):
        return _rows_streamed(rows, k, beta, negative, where, masks)
    if kernels.usable(rows):
        mask, s1, s2 = kernels.rows_keep(rows, k, beta, negative == "shift", select=masks)
        if bool(torch.isfinite(s1).all() and (k is not None or _safe_sums(s1, s2).all())):
            return mask, s1, s2
        _finite_or_raise(rows, where)  # NaN/Inf: a clear error; squares out of range: the blocks rescale
    return _rows_blocks(rows, k, beta, negative, where, masks)


def _rows_streamed(
    rows: Tensor, k: Tensor | None, beta: float, negative: Negative, where: str | None, masks: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`_rows_pass` for long rows: each row is one source of the global engine."""
    names = None if where is None else [where]
    if masks:
        out = torch.empty(rows.shape, dtype=torch.bool, device=rows.device)
        sc = _Scratch()
        for r in range(rows.shape[0]):
            _, _, _, value, keep_equal, shift = global_cut(
                [rows[r]], beta, None if k is None else int(k[r]), negative, names)
            out[r] = _threshold_mask(rows[r], value, keep_equal[0] if keep_equal else 0, shift, negative, sc)
        return out, None, None
    s1 = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
    s2 = torch.empty_like(s1)
    for r in range(rows.shape[0]):
        s1[r], s2[r] = _stream_sums([rows[r]], negative, names, _global_shift([rows[r]], negative))[:2]
    return None, s1, s2


def _rows_blocks(
    rows: Tensor, k: Tensor | None, beta: float, negative: Negative, where: str | None, masks: bool
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """:func:`_rows_pass` in PyTorch: each cache-sized block of rows is made non-negative
    once, then summed (when the count is EMP's) and selected while in cache."""
    n = rows.shape[1]
    out = torch.empty(rows.shape, dtype=torch.bool, device=rows.device) if masks else None
    s1 = s2 = None
    if k is None:
        s1 = torch.empty(rows.shape[0], dtype=torch.float64, device=rows.device)
        s2 = torch.empty_like(s1)
    ws = _Work.for_rows(rows, negative)
    for blk in _blocks(*rows.shape, rows.device):
        x = _prep_block(rows[blk], negative, ws)
        if k is None:
            a, b = _block_sums(x, where, ws)
            s1[blk], s2[blk] = a, b
            kb = keep_floor(_neff_from_sums(a, b, n), beta, n) if masks else None
        else:
            if not bool(torch.isfinite(x.amax(-1)).all()):  # NaN and Inf both reach the max
                _raise_nonfinite(x, where)
            kb = k[blk]
        if masks:
            out[blk] = _rows_topk(x, kb, _grid(rows.dtype, negative), ws)
    return out, s1, s2


def global_neff(
    sources: Sequence[ScoreSource], negative: Negative, names: Sequence[str] | None, sample_every: int = 0
) -> tuple[float, int, float, Tensor | None]:
    """``(N_eff, N, shift, sample)`` of the union of ``sources``, streamed in float64
    (``sample``: with ``sample_every``, a sorted sample of about one score in that many)."""
    _check_negative(negative)
    if not len(sources):
        raise ValueError("global scope needs at least one score tensor")
    shift = _global_shift(sources, negative)
    s1, s2, n, sample = _stream_sums(sources, negative, names, shift, sample_every)
    return float(_neff_from_sums(s1, s2, n)), n, shift, sample


def global_cut(
    sources: Sequence[ScoreSource], beta: float, k: int | None, negative: Negative, names: Sequence[str] | None
) -> tuple[int, float, int, float, list[int], float]:
    """One threshold over the union of ``sources``: ``(N, N_eff, k, value, keep_equal,
    shift)``, keeping ``k`` entries (EMP's ``floor(beta * N_eff)`` when None): every score
    ``> value`` and, among those ``== value``, the first ``keep_equal[i]`` of source ``i``."""
    neff, n, shift, sample = global_neff(sources, negative, names, _GLOBAL_SAMPLE_EVERY)
    if k is None:
        kk = int(keep_floor(torch.tensor(neff, dtype=torch.float64), beta, n))
    else:
        kk = int(k)
        if not 0 <= kk <= n:
            raise ValueError(f"k must lie in [0, {n}], got {k}")
    value, keep_equal = _select_global(sources, kk, n, negative, shift, sample)
    return n, neff, kk, value, keep_equal, shift


def threshold_masks(
    sources: Sequence[ScoreSource], value: float, keep_equal: Sequence[int], shift: float, negative: Negative
) -> Iterator[Tensor]:
    """The keep mask of each source in turn (see :func:`global_cut`), built chunk by chunk
    in reused scratch buffers: the only tensor-sized allocation is the mask itself."""
    sc = _Scratch()
    for i, src in enumerate(sources):
        yield _threshold_mask(_materialise(src), value, keep_equal[i] if keep_equal else 0, shift, negative, sc)


def _threshold_mask(scores: Tensor, value: float, budget: int, shift: float, negative: Negative,
                    sc: _Scratch) -> Tensor:
    """``scores > value`` plus the first ``budget`` entries equal to it (flat order)."""
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    flat = mask.view(-1)
    pos = 0
    for c in _nonneg_chunks(scores, negative, shift, sc):
        m = flat[pos : pos + c.numel()]
        torch.gt(c, value, out=m)
        if budget:  # ties at the threshold: the first ones in flat order
            eq = (c == value).nonzero().squeeze(1)[:budget]
            m[eq] = True
            budget -= eq.numel()
        pos += c.numel()
    return mask


def kept_mass(
    scores: Tensor, mask: Tensor, dim: int | None, negative: Negative, shift: float | None = None
) -> tuple[Tensor, Tensor]:
    """float64 ``(sum of kept scores, sum of all scores)`` per slice along ``dim`` (0-d when
    None), scores made non-negative as the rule does (``|s|``, or ``s - min`` per slice;
    ``shift`` given: ``s - shift`` over the whole flattened tensor, the global scope's)."""
    _check_scores(scores)
    _check_mask(mask, scores)
    if shift is not None:
        return _masked_sums(scores, mask.reshape(-1), negative, shift)
    rows, _ = _as_rows(scores, dim)
    mrows, _ = _as_rows(mask, dim)
    kept = torch.empty(rows.shape[0], dtype=torch.float64, device=scores.device)
    total = torch.empty_like(kept)
    if _long(rows.shape[1], rows.device):  # e.g. one whole tensor: streamed in chunks, row by row
        for r in range(rows.shape[0]):
            kept[r], total[r] = _masked_sums(rows[r], mrows[r], negative, _global_shift([rows[r]], negative))
    else:
        ws = _Work.for_rows(rows, negative)
        for b in _blocks(*rows.shape, rows.device):
            x = _prep_block(rows[b], negative, ws)  # exact in its work dtype; sums in float64
            total[b] = x.sum(-1, dtype=torch.float64)
            kept[b] = x.mul_(mrows[b]).sum(-1, dtype=torch.float64)  # x >= 0 finite: exact
    shape = () if dim is None else _as_rows_shape(scores, dim)
    return kept.reshape(shape), total.reshape(shape)


def _masked_sums(scores: Tensor, flat_mask: Tensor, negative: Negative, shift: float) -> tuple[Tensor, Tensor]:
    """float64 (kept, total) of a flattened tensor, chunk by chunk (scores ``|s|`` or ``s - shift``)."""
    kept = torch.zeros((), dtype=torch.float64, device=scores.device)
    total = torch.zeros_like(kept)
    pos = 0
    for c in _nonneg_chunks(scores, negative, shift, _Scratch()):
        total += c.sum(dtype=torch.float64)
        kept += c.mul_(flat_mask[pos : pos + c.numel()]).sum(dtype=torch.float64)  # (c >= 0 finite: exact; 4x masked_fill_)
        pos += c.numel()
    return kept, total


def _check_mask(mask: Tensor, scores: Tensor) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != scores.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != scores shape {tuple(scores.shape)}")
