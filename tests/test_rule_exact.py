"""floor(beta * N_eff) is exact at any length (issue 23, item 9): scores whose N_eff is an
integer keep exactly that many, in every engine (the compiled per-row kernel, the PyTorch
per-row blocks, rows and tensors streamed in chunks, the global engine), whatever the length,
dtype and value; and an N_eff below an integer by more than rounding is still floored."""
from __future__ import annotations

import math
from contextlib import contextmanager
from fractions import Fraction
from typing import Iterator

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import emprune
from emprune.core import engine as _engine, kernels as _kernels

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
PATHS = ["kernel", "torch"]


@contextmanager
def _path(name: str, block: int | None = None) -> Iterator[None]:
    """Run on one engine: the compiled kernels ("kernel") or PyTorch only ("torch"); with
    ``block``, working blocks / stream chunks of that many elements (longer rows are streamed)."""
    old = _kernels.AVAILABLE, _engine._BLOCK_ELEMS
    _kernels.AVAILABLE = old[0] and name == "kernel"
    if block is not None:
        _engine._BLOCK_ELEMS = block
    try:
        yield
    finally:
        _kernels.AVAILABLE, _engine._BLOCK_ELEMS = old


def _skip_missing(path: str) -> None:
    if path == "kernel" and not _kernels.AVAILABLE:
        pytest.skip(f"the compiled kernel is off: {_kernels.WHY_NOT}")


# ---------------------------------------------------------------- the case of the issue


@pytest.mark.parametrize("path", PATHS)
def test_equal_scores_in_rows_of_4096_keep_every_entry(path):
    """``torch.full((3, 4096), 0.7)``: N_eff is exactly 4096 per row (12288 over the whole
    tensor); the plain running sums used to give 4095.9999999997 and keep 4095."""
    _skip_missing(path)
    x = torch.full((3, 4096), 0.7)
    with _path(path):
        assert emprune.keep_count(x, dim=1).tolist() == [4096] * 3
        assert bool(emprune.keep_mask(x, dim=1).all())
        assert int(emprune.keep_count(x)) == 3 * 4096
        assert bool(emprune.keep_mask(x).all())
        thr = emprune.global_threshold([x])
        assert thr.k == thr.n == 3 * 4096
        assert all(bool(m.all()) for m in emprune.global_masks([x, x[0]], emprune.global_threshold([x, x[0]])))
        assert emprune.global_threshold([x[0]]).k == 4096


def test_compiled_kernel_sums_equal_scores_exactly():
    if not _kernels.AVAILABLE:
        pytest.skip(f"the compiled kernel is off: {_kernels.WHY_NOT}")
    x = torch.full((3, 4096), 0.7)
    mask, s1, s2 = _kernels.rows_keep(x, None, 1.0, False)
    assert bool(mask.all())
    assert torch.equal(_engine.keep_floor(_engine._neff_from_sums(s1, s2, 4096), 1.0, 4096), torch.full((3,), 4096))
    flat = _kernels.flat_sums(x, None)
    assert int(_engine.keep_floor(_engine._neff_from_sums(flat[0], flat[1], x.numel()), 1.0, x.numel())) == x.numel()


# ------------------------------------------------- k equal scores among zeros (hypothesis)


def _values(dtype: torch.dtype) -> st.SearchStrategy[float]:
    """Finite non-zero values of ``dtype`` (as Python floats, exactly), extremes included."""
    fi = torch.finfo(dtype)
    extremes = [fi.max, fi.tiny, fi.tiny * fi.eps, 1.0, 0.7]  # largest, smallest normal and subnormal
    width = {torch.float16: 16, torch.float64: 64}.get(dtype, 32)
    floats = st.floats(allow_nan=False, allow_infinity=False, width=width)
    vals = st.sampled_from(extremes) | floats
    signed = st.tuples(vals, st.booleans()).map(lambda t: -t[0] if t[1] else t[0])
    return signed.map(lambda v: float(torch.tensor(v, dtype=torch.float64).to(dtype).double())).filter(
        lambda v: v != 0 and math.isfinite(v))


@st.composite
def equal_scores(draw) -> tuple[torch.Tensor, int]:
    """A row of N scores, k of them equal to one value v and the rest zero, as ``(row, k)``:
    N log-uniform in [1, 2**20], k in [1, N] (log-uniform or uniform), any dtype and v."""
    dtype = draw(st.sampled_from(DTYPES))
    n = max(1, int(2.0 ** draw(st.floats(0, 20))))
    k = draw(st.just(n) | st.integers(1, n) | st.floats(0, math.log2(n)).map(lambda e: max(1, min(n, int(2.0**e)))))
    v = draw(_values(dtype))
    x = torch.zeros(n, dtype=dtype)
    if draw(st.booleans()):
        x[:k] = v
    else:  # at shuffled positions
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        x[torch.randperm(n, generator=g)[:k]] = v
    return x, k


def _padded(v: float, k: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    x = torch.zeros(n, dtype=dtype)
    x[:k] = v
    return x, k


@settings(deadline=None, max_examples=30)
@given(equal_scores())
@example(_padded(0.7, 4096, 4096, torch.float32))  # the row: the kernel kept 4095
@example(_padded(3.3, 99_999, 100_000, torch.float64))  # kernel: 99_998
@example(_padded(0.1, 1 << 20, 1 << 20, torch.float32))  # streamed: 2**20 - 1
def test_k_equal_scores_among_zeros_keep_exactly_k_in_every_engine(case):
    """N_eff of k copies of v among zeros is exactly k: every engine keeps k at beta = 1 and
    floor(k / 2) (at least 1) at beta = 0.5, and the mask is the non-zero entries."""
    x, k = case
    want_half = max(1, k // 2)
    for path in PATHS if _kernels.AVAILABLE else ["torch"]:
        with _path(path):
            row = x.reshape(1, -1)
            assert int(emprune.keep_count(row, dim=1)) == k, (path, "rows")
            assert int(emprune.keep_count(row, 0.5, dim=1)) == want_half, (path, "rows, beta 0.5")
            neff = float(emprune.effective_number(row, dim=1))
            assert abs(neff / k - 1) <= 2.0**-48, (path, neff)
            assert int(emprune.keep_count(x)) == k, (path, "streamed")
            assert emprune.global_threshold([x]).k == k, (path, "global")
            assert emprune.global_threshold([x], 0.5).k == want_half, (path, "global, beta 0.5")
        with _path(path, block=1 << 12):  # many chunks per stream; rows above 4096 streamed
            assert int(emprune.keep_count(row, dim=1)) == k, (path, "long rows")
            two = emprune.global_threshold([x, x])
            assert two.k == 2 * k, (path, "two tensors")
    with _path("kernel" if _kernels.AVAILABLE else "torch"):
        assert torch.equal(emprune.keep_mask(x.reshape(1, -1), dim=1).reshape(-1), x != 0)
        assert torch.equal(emprune.keep_mask(x), x != 0)


# ------------------------------------------------------------- just below an integer


def _exact_neff(x: torch.Tensor) -> Fraction:
    """N_eff of ``x`` in exact rational arithmetic (its distinct values times their counts)."""
    vals, counts = torch.unique(x.double().abs(), return_counts=True)
    pairs = [(Fraction(v), c) for v, c in zip(vals.tolist(), counts.tolist())]
    return sum(c * v for v, c in pairs) ** 2 / sum(c * v * v for v, c in pairs)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n", [4, 4096, 100_001, 1 << 20])
def test_neff_below_an_integer_by_more_than_rounding_is_floored(path, n):
    """Half the scores 1, half ``1 - 2**-18``: N_eff = n (1 - ~2**-38), below n by far more
    than rounding (~2**-47) yet by less than 1: it keeps n - 1, not n, in every engine."""
    _skip_missing(path)
    x = torch.ones(n)
    x[n // 2 :] = 1 - 2.0**-18
    neff = _exact_neff(x)
    assert n - 1 < neff < n and (n - neff) / n > Fraction(2) ** -40
    with _path(path):
        assert int(emprune.keep_count(x.reshape(1, -1), dim=1)) == n - 1
        assert int(emprune.keep_count(x)) == n - 1
        assert emprune.global_threshold([x]).k == n - 1
    with _path(path, block=1 << 12):
        assert int(emprune.keep_count(x.reshape(1, -1), dim=1)) == n - 1
        assert emprune.global_threshold([x[: n // 2], x[n // 2 :]]).k == n - 1


@pytest.mark.parametrize("path", PATHS)
def test_neff_of_2_9999_keeps_2(path):
    _skip_missing(path)
    x = torch.tensor([1.0, 1.0, 0.99], dtype=torch.float64)
    assert 2.9999 < _exact_neff(x) < 3
    with _path(path):
        assert int(emprune.keep_count(x.reshape(1, -1), dim=1)) == 2
        assert int(emprune.keep_count(x)) == 2
        assert emprune.global_threshold([x]).k == 2


# ------------------------------------------------------------------- the sums themselves


def _rel_errors_in_u(got: torch.Tensor, x: torch.Tensor) -> list[float]:
    """Relative errors, in units of 2**-53, of ``got = [sum, sum of squares]`` of ``|x|``."""
    vals = [Fraction(v) for v in x.double().abs().reshape(-1).tolist()]
    exact = [sum(vals), sum(v * v for v in vals)]
    return [float(abs(Fraction(float(g)) - e) / e) * 2.0**53 for g, e in zip(got.tolist(), exact)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_engine_sums_within_4_roundings(dtype):
    """Heavy-tailed scores over 1e-8 .. 1e8 (lengths not a multiple of 4): the float64 sums
    of every engine are within 4u of the exact rational sums (5u for float64 squares), where
    plain running sums drift by up to n u; this is what keep_floor's 32u slack relies on."""
    g = torch.Generator().manual_seed(0)
    n = 20_003
    x = (torch.randn(2, n, generator=g, dtype=torch.float64) * torch.exp(8 * torch.randn(2, n, generator=g))).to(dtype)
    bound = 4 if dtype == torch.float32 else 5
    got = {"torch rows": torch.stack(_engine._row_sums(x.abs()), 1)}
    with _path("torch"):
        got["torch stream"] = torch.stack(_engine._stream_sums([x[0], x[1]], "abs", None, 0.0)[:2])[None]
    with _path("torch", block=1 << 12):
        got["torch stream, chunks"] = torch.stack(_engine._stream_sums([x], "abs", None, 0.0)[:2])[None]
    if _kernels.AVAILABLE:
        _, s1, s2 = _kernels.rows_keep(x, None, 1.0, False, select=False)
        got["kernel rows"] = torch.stack([s1, s2], 1)
        got["kernel flat"] = _kernels.flat_sums(x, None)[None]
        with _path("kernel", block=1 << 12):
            got["kernel stream, chunks"] = torch.stack(_engine._stream_sums([x], "abs", None, 0.0)[:2])[None]
    for name, sums in got.items():
        rows = [x[0], x[1]] if sums.shape[0] == 2 else [x]
        for r, s in zip(rows, sums):
            errs = _rel_errors_in_u(s, r)
            assert max(errs) <= bound, (name, errs)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("v", [1.7e308, 1e200, 1e-300, 5e-324])
def test_float64_scores_whose_squares_overflow_or_underflow(path, v):
    """Their sums are taken again scaled by a power of two (exactly), in every engine; the
    global engine used to refuse overflowing squares."""
    _skip_missing(path)
    x = torch.zeros(1001, dtype=torch.float64)
    x[::27] = v  # 38 entries
    big = torch.cat([x, torch.full((5,), 1.0, dtype=torch.float64)]) if v < 1 else x
    with _path(path):
        assert int(emprune.keep_count(x.reshape(1, -1), dim=1)) == 38
        assert int(emprune.keep_count(x)) == 38
        assert emprune.global_threshold([x, -x]).k == 76
        assert int(emprune.keep_count(big)) == (38 if v > 1 else 5)  # tiny entries next to 1s: N_eff 5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_inf_in_rows_raise(path, bad):
    """(The compiled kernel used to crash on a NaN row: it now leaves the row to the check.)"""
    _skip_missing(path)
    x = torch.rand(3, 9)
    x[1, 4] = bad
    with _path(path):
        for f in (lambda: emprune.keep_mask(x, dim=1), lambda: emprune.keep_count(x, dim=1),
                  lambda: emprune.topk_mask(x, 2, dim=1)):
            with pytest.raises(ValueError, match="NaN" if math.isnan(bad) else "Inf"):
                f()


@pytest.mark.parametrize("path", PATHS)
def test_scores_that_require_grad(path):
    _skip_missing(path)
    w = torch.full((4, 300), 0.5, requires_grad=True)
    with _path(path):
        assert emprune.keep_count(w, dim=1).tolist() == [300] * 4
        assert emprune.global_threshold([w, w[0]]).k == 1500
