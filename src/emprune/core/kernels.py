"""Optional compiled kernel (numba) for the per-row rule on CPU.

Installed with the ``fast`` extra.  One thread per row, three passes over the row while it
sits in L1/L2 cache:

1. float64 sums (for N_eff; compensated, so within a few roundings of exact at any row length:
   see :func:`_sums_and_hist`) and a histogram of the top 12 bits of each score's float32 bit
   pattern (monotone for non-negative floats: 8 exponent + 3 mantissa bits, so bins are
   1/8 octave wide whatever the scale or tail of the scores);
2. the entries of the one bin holding the k-th largest are gathered (a few percent of the
   row) and a quickselect finds the exact k-th value among them;
3. the mask is written: ``s > v``, plus the first entries equal to ``v`` (lower index first).

The PyTorch path in :mod:`emprune.core.engine` gives identical masks and is used wherever this
kernel does not apply (other devices, numba missing, ``EMPRUNE_NO_NUMBA=1``).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

AVAILABLE = False
WHY_NOT: str | None = "EMPRUNE_NO_NUMBA is set"  # why the kernel is off (None when on)
if not os.environ.get("EMPRUNE_NO_NUMBA"):
    try:
        from numba import njit, prange

        AVAILABLE, WHY_NOT = True, None
    except ImportError:  # the PyTorch path is used
        WHY_NOT = "numba is not installed"

if AVAILABLE:  # pragma: no branch

    @njit(cache=True, nogil=True)
    def _kth_largest(a, t):  # t-th largest (1-based) of a, in place (quickselect)
        want = a.shape[0] - t  # as a 0-based index into ascending order
        lo, hi = 0, a.shape[0] - 1
        while hi > lo:
            mid = (lo + hi) >> 1
            if a[mid] < a[lo]:
                a[mid], a[lo] = a[lo], a[mid]
            if a[hi] < a[lo]:
                a[hi], a[lo] = a[lo], a[hi]
            if a[hi] < a[mid]:
                a[hi], a[mid] = a[mid], a[hi]
            p = a[mid]
            i, j = lo, hi
            while i <= j:
                while a[i] < p:
                    i += 1
                while a[j] > p:
                    j -= 1
                if i <= j:
                    a[i], a[j] = a[j], a[i]
                    i += 1
                    j -= 1
            if want <= j:
                hi = j
            elif want >= i:
                lo = i
            else:
                return a[want]
        return a[want]

    # compiled copies of emprune.core.engine._neff_from_sums and keep_floor (a numba kernel cannot
    # call those); tests/test_engine.py checks that they agree, at and around integers

    @njit(cache=True, nogil=True)
    def _neff(a, b, n):  # N_eff from float64 sums, in [1, n]; an all-zero row has N
        return float(n) if b == 0.0 else min(max(a * a / b, 1.0), float(n))

    @njit(cache=True, nogil=True)
    def _keep_floor(neff, beta, n):  # floor(beta * N_eff) clamped to [1, n], with engine._SLACK
        return max(1, min(n, np.int64(np.floor(neff * beta * (1.0 + 2.0**-48)))))

    @njit(inline="always", nogil=True)
    def _fast_two_sum(a, v, c):  # a, v >= 0: (a + v rounded, c + the exact rounding error)
        hi, lo = (v, a) if v > a else (a, v)  # Fast2Sum needs |hi| >= |lo|: then lo - (t - hi)
        t = hi + lo  # is exact.  (Not max/min: they would drop a NaN, which must reach the sum.)
        return t, c + (lo - (t - hi))

    @njit(inline="always", nogil=True)
    def _score(x, xb, r, j, m, shift, fast):  # (score as float64: |x| or x - m, its histogram key)
        if fast:  # float32 |x|: the key is in the bits already
            return abs(np.float64(x[r, j])), (xb[j] & np.uint32(0x7FFFFFFF)) >> 20
        v = np.float64(x[r, j])
        v = v - m if shift else abs(v)
        return v, np.float32(v).view(np.uint32) >> 20

    @njit(inline="always", nogil=True)
    def _sums_and_hist(x, r, m, shift, hist):
        """Pass 1 over row ``r``: ``(sum, sum of squares, top key)`` of its scores, counting
        their keys into ``hist``.  The float64 sums are compensated, as cheaply as the plain
        ones were: runs of 4 scores are added pairwise (rounding error <= 2u of the run,
        u = 2**-53), and the runs go into a sum whose every rounding error is kept exactly
        (:func:`_fast_two_sum`) and added back at the end.  So each sum is within 3u
        (relative, plus one u per rounded input: float64 squares, ``x - m``) of exact at
        any length, where a plain running sum drifts by up to n*u: the bound
        ``engine.keep_floor``'s slack is sized for."""
        n = x.shape[1]
        fast = not shift and x.itemsize == 4
        xb = x[r].view(np.uint32)
        a, ca, b, cb = 0.0, 0.0, 0.0, 0.0  # the sums and their compensations
        top = np.uint32(0)
        full = n - n % 4
        for j in range(0, full, 4):
            v0, k0 = _score(x, xb, r, j, m, shift, fast)
            v1, k1 = _score(x, xb, r, j + 1, m, shift, fast)
            v2, k2 = _score(x, xb, r, j + 2, m, shift, fast)
            v3, k3 = _score(x, xb, r, j + 3, m, shift, fast)
            hist[k0] += 1
            hist[k1] += 1
            hist[k2] += 1
            hist[k3] += 1
            top = max(top, max(max(k0, k1), max(k2, k3)))
            a, ca = _fast_two_sum(a, (v0 + v1) + (v2 + v3), ca)
            b, cb = _fast_two_sum(b, (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3), cb)
        for j in range(full, n):
            v, k = _score(x, xb, r, j, m, shift, fast)
            hist[k] += 1
            top = max(top, k)
            a, ca = _fast_two_sum(a, v, ca)
            b, cb = _fast_two_sum(b, v * v, cb)
        return a + ca, b + cb, top

    @njit(parallel=True, cache=True, nogil=True)
    def _rows(x, kin, beta, shift, select, out, s1o, s2o):
        """Per row: sums into s1o/s2o; then (if select) the mask keeping kin[r] entries
        (kin[r] >= 0) or floor(beta N_eff), computed exactly as emprune.core.engine does.

        The row's passes share its histogram, min and candidate buffer while they sit in cache,
        inside one prange iteration (the helpers are inlined into it)."""
        rows, n = x.shape
        for r in prange(rows):
            m = 0.0
            if shift:
                m = np.float64(x[r, 0])
                for j in range(n):
                    if x[r, j] < m:
                        m = np.float64(x[r, j])
            hist = np.zeros(4096, np.int64)
            a, b, top = _sums_and_hist(x, r, m, shift, hist)
            s1o[r] = a
            s2o[r] = b
            if not select or not np.isfinite(a):  # NaN/Inf scores: the caller raises (the
                continue  # selection below would index out of bounds on a NaN count or key)
            k = kin[r] if kin[r] >= 0 else _keep_floor(_neff(a, b, n), beta, n)
            if k >= n:
                out[r, :] = True
                continue
            if k <= 0:
                out[r, :] = False
                continue
            above = 0
            bin_ = np.int64(top)  # scan down from the row's highest bin
            while above + hist[bin_] < k:
                above += hist[bin_]
                bin_ -= 1
            size = hist[bin_]
            cand = _bin_members(x, r, m, shift, bin_, size)
            t = _kth_largest(cand, k - above)
            gt = above
            for i in range(size):
                gt += cand[i] > t
            _write_mask(x, r, m, shift, t, k - gt, out)

    @njit(inline="always", nogil=True)
    def _bin_members(x, r, m, shift, bin_, size):
        """The scores of row ``r`` whose histogram key is ``bin_`` (``size`` of them)."""
        n = x.shape[1]
        cand = np.empty(size + 1, np.float64)  # one spare slot: the stores are branch-free
        c = 0
        if not shift and x.itemsize == 4:  # float32 |x|: the key is in the bits already
            xb = x[r].view(np.uint32)
            for j in range(n):
                cand[min(c, size)] = abs(np.float64(x[r, j]))
                c += ((xb[j] & np.uint32(0x7FFFFFFF)) >> 20) == bin_
        else:
            for j in range(n):
                v = np.float64(x[r, j])
                v = v - m if shift else abs(v)
                cand[min(c, size)] = v
                c += (np.float32(v).view(np.uint32) >> 20) == bin_
        return cand[:size]

    @njit(inline="always", nogil=True)
    def _write_mask(x, r, m, shift, t, need, out):
        """Row ``r`` of the mask: scores > t (a branch-free pass), then the first ``need``
        entries equal to t (lowest index first)."""
        n = x.shape[1]
        if shift:
            for j in range(n):
                out[r, j] = np.float64(x[r, j]) - m > t
        else:
            for j in range(n):
                out[r, j] = abs(np.float64(x[r, j])) > t
        j = 0
        while need > 0:
            v = np.float64(x[r, j])
            v = v - m if shift else abs(v)
            if v == t:
                out[r, j] = True
                need -= 1
            j += 1


if AVAILABLE:  # pragma: no branch

    @njit(inline="always", nogil=True)
    def _flat_part(x, lo, hi, shift, use_shift):
        """``(sum, its compensation, sum of squares, its compensation)`` of the scores
        ``x[lo:hi]`` (``|x|``, or ``x - shift``), as in :func:`_sums_and_hist`."""
        a, ca, b, cb = 0.0, 0.0, 0.0, 0.0
        full = hi - (hi - lo) % 4
        for j in range(lo, full, 4):
            v0, v1 = _flat_score(x, j, shift, use_shift), _flat_score(x, j + 1, shift, use_shift)
            v2, v3 = _flat_score(x, j + 2, shift, use_shift), _flat_score(x, j + 3, shift, use_shift)
            a, ca = _fast_two_sum(a, (v0 + v1) + (v2 + v3), ca)
            b, cb = _fast_two_sum(b, (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3), cb)
        for j in range(full, hi):
            v = _flat_score(x, j, shift, use_shift)
            a, ca = _fast_two_sum(a, v, ca)
            b, cb = _fast_two_sum(b, v * v, cb)
        return a, ca, b, cb

    @njit(inline="always", nogil=True)
    def _flat_score(x, j, shift, use_shift):
        v = np.float64(x[j])
        return v - shift if use_shift else abs(v)

    @njit(parallel=True, cache=True, nogil=True)
    def _flat(x, shift, use_shift, out):  # _flat_part of each of out.shape[0] parts of x, in parallel
        n, parts = x.shape[0], out.shape[0]
        for p in prange(parts):
            out[p, 0], out[p, 1], out[p, 2], out[p, 3] = _flat_part(
                x, n * p // parts, n * (p + 1) // parts, shift, use_shift)

    @njit(cache=True, nogil=True)
    def _flat1(x, shift, use_shift, out):  # the same in one part (small x: no thread start-up)
        out[0, 0], out[0, 1], out[0, 2], out[0, 3] = _flat_part(x, 0, x.shape[0], shift, use_shift)


_FLAT_PARTS = 16  # parts of a chunk summed in parallel (fixed: the sums do not depend on the threads)
_FLAT_SMALL = 1 << 16  # below this many scores, one part in the calling thread


def flat_usable(x: Tensor) -> bool:
    """Whether :func:`flat_sums` handles this tensor."""
    return AVAILABLE and x.device.type == "cpu" and x.numel() > 0


def flat_sums(x: Tensor, shift: float | None) -> Tensor:
    """float64 ``[sum, sum of squares]`` of the scores of a CPU tensor, ``|x|`` (``shift``
    None) or ``x - shift``, each within ``3u`` of exact (u = 2**-53; plus ``u`` per rounded
    input: float64 squares, ``x - shift``): compensated parts (:func:`_sums_and_hist`'s
    scheme), added exactly (``math.fsum``).  NaN where a sum is not finite."""
    flat = x.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):  # widened exactly
        flat = flat.to(torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) else torch.float64)
    small = flat.numel() < _FLAT_SMALL
    out = np.zeros((1 if small else _FLAT_PARTS, 4), np.float64)
    (_flat1 if small else _flat)(flat.contiguous().numpy(), float(shift or 0.0), shift is not None, out)
    if not np.isfinite(out).all():  # NaN/Inf scores, or float64 overflow: the caller sorts it out
        return torch.full((2,), math.nan, dtype=torch.float64)
    try:
        return torch.tensor([math.fsum(out[:, :2].ravel()), math.fsum(out[:, 2:].ravel())], dtype=torch.float64)
    except OverflowError:  # the parts are finite, their total is not
        return torch.full((2,), math.nan, dtype=torch.float64)


def usable(x: Tensor) -> bool:
    """Whether the compiled kernel handles this 2-D tensor of score rows."""
    return AVAILABLE and x.device.type == "cpu" and x.dim() == 2 and x.numel() > 0


def rows_keep(x: Tensor, k: Tensor | None, beta: float, shift: bool,
              select: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(mask, sum, sum of squares)`` per row: exactly ``k[r]`` kept, or ``floor(beta N_eff)``
    when ``k`` is None (``select=False``: the float64 sums only, mask None).  Half precision
    and integers are widened (exactly) first."""
    rows, n = x.shape
    x = x.detach()  # (scores computed from parameters may require grad: numpy() refuses those)
    kin = np.full(rows, -1, np.int64) if k is None else k.to(torch.int64).contiguous().numpy()
    out = np.empty((rows, n) if select else (1, 1), np.bool_)
    s1 = np.empty(rows, np.float64)
    s2 = np.empty(rows, np.float64)
    if x.dtype in (torch.float32, torch.float64):
        _rows(x.contiguous().numpy(), kin, float(beta), bool(shift), bool(select), out, s1, s2)
    else:  # half precision / integers: widened exactly, a block of rows at a time (no full copy)
        wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else torch.float64
        step = max(1, (1 << 22) // max(1, n))
        buf = torch.empty(min(step, rows), n, dtype=wide)
        for i in range(0, rows, step):
            j = min(rows, i + step)
            xb = buf[: j - i]
            xb.copy_(x[i:j])
            _rows(xb.numpy(), kin[i:j], float(beta), bool(shift), bool(select),
                  out[i:j] if select else out, s1[i:j], s2[i:j])
    return (torch.from_numpy(out) if select else None), torch.from_numpy(s1), torch.from_numpy(s2)
