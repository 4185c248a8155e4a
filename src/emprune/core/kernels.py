"""Optional compiled kernel (numba) for the per-row rule on CPU.

Installed with the ``fast`` extra.  One thread per row, three passes over the row while it
sits in L1/L2 cache:

1. float64 sums (for N_eff) and a histogram of the top 12 bits of each score's float32 bit
   pattern (monotone for non-negative floats: 8 exponent + 3 mantissa bits, so bins are
   1/8 octave wide whatever the scale or tail of the scores);
2. the entries of the one bin holding the k-th largest are gathered (a few percent of the
   row) and a quickselect finds the exact k-th value among them;
3. the mask is written: ``s > v``, plus the first entries equal to ``v`` (lower index first).

The PyTorch path in :mod:`emprune.core.engine` gives identical masks and is used wherever this
kernel does not apply (other devices, numba missing, ``EMPRUNE_NO_NUMBA=1``).
"""
from __future__ import annotations

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
            a = 0.0
            b = 0.0
            top = np.uint32(0)
            if not shift and x.itemsize == 4:  # float32 |x|: the key is in the bits already
                xb = x[r].view(np.uint32)
                for j in range(n):
                    v = abs(np.float64(x[r, j]))
                    a += v
                    b += v * v
                    key = (xb[j] & np.uint32(0x7FFFFFFF)) >> 20
                    hist[key] += 1
                    top = max(top, key)
            else:
                for j in range(n):
                    v = np.float64(x[r, j])
                    v = v - m if shift else abs(v)
                    a += v
                    b += v * v
                    key = np.float32(v).view(np.uint32) >> 20
                    hist[key] += 1
                    top = max(top, key)
            s1o[r] = a
            s2o[r] = b
            if not select:
                continue
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


def usable(x: Tensor) -> bool:
    """Whether the compiled kernel handles this 2-D tensor of score rows."""
    return AVAILABLE and x.device.type == "cpu" and x.dim() == 2 and x.numel() > 0


def rows_keep(x: Tensor, k: Tensor | None, beta: float, shift: bool,
              select: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(mask, sum, sum of squares)`` per row: exactly ``k[r]`` kept, or ``floor(beta N_eff)``
    when ``k`` is None (``select=False``: the float64 sums only, mask None).  Half precision
    and integers are widened (exactly) first."""
    rows, n = x.shape
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
