"""The rule: N_eff, keep counts, exact masks, the mass bound, bad input."""
import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import emprune
from emprune.core import rule
from reference import ref_neff, ref_topk_mask

@pytest.fixture(params=["kernel", "torch"], autouse=True)
def selection_path(request, monkeypatch):
    """Run every rule test on both selection paths: the compiled per-row kernel (numba) and
    the pure PyTorch one; they must agree exactly."""
    from emprune.core import kernels as _kernels
    if request.param == "kernel":
        if not _kernels.AVAILABLE:
            pytest.skip(f"the compiled kernel is off: {_kernels.WHY_NOT}")
    else:
        monkeypatch.setattr(_kernels, "AVAILABLE", False)
    return request.param


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
vectors = hnp.arrays(np.float32, st.integers(1, 300), elements=finite)
matrices = hnp.arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 400)), elements=finite)


# ---------------------------------------------------------------- laws (hypothesis)

@given(vectors)
def test_neff_between_1_and_n(v):
    x = torch.from_numpy(v)
    n = emprune.effective_number(x)
    assert 1.0 <= float(n) <= x.numel()


@given(vectors, st.floats(1e-3, 1e3))
def test_scale_invariance(v, c):
    x = torch.from_numpy(v).double()
    assert math.isclose(float(emprune.effective_number(x)), float(emprune.effective_number(x * c)), rel_tol=1e-9)
    if x.abs().max() > 0:  # the count is an integer: equal unless N_eff sits on an integer boundary
        a, b = int(emprune.keep_count(x)), int(emprune.keep_count(x * c))
        assert abs(a - b) <= 1


@given(vectors, st.randoms())
def test_permutation_equivariance(v, rnd):
    x = torch.from_numpy(v)
    perm = list(range(x.numel()))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    m = emprune.keep_mask(x)
    mp = emprune.keep_mask(x[perm])
    assert int(m.sum()) == int(mp.sum())
    # the kept multiset of |s| is the same (ties may pick other positions)
    assert torch.equal(torch.sort(x.abs()[m]).values, torch.sort(x[perm].abs()[mp]).values)


@given(matrices, st.floats(0.05, 5.0))
def test_exact_counts_and_reference_agreement(w, beta):
    x = torch.from_numpy(w)
    k = emprune.keep_count(x, beta, dim=1)
    n = x.shape[1]
    expect = torch.floor(ref_neff(x, 1) * beta * (1 + 2.0**-48)).clamp(1, n).long()
    assert torch.equal(k, expect)
    m = emprune.keep_mask(x, beta, dim=1)
    assert torch.equal(m.sum(1), k)
    assert torch.equal(m, ref_topk_mask(x, k))  # including deterministic tie-breaking


@given(matrices, st.floats(0.05, 5.0))
def test_streamed_long_rows_agree_with_reference(w, beta):
    """The same law when every row is longer than a working block (the streaming engine)."""
    from emprune.core import engine as _select
    x = torch.from_numpy(w)
    old, _select._BLOCK_ELEMS = _select._BLOCK_ELEMS, 16
    try:
        k = emprune.keep_count(x, beta, dim=1)
        m = emprune.keep_mask(x, beta, dim=1)
        mass = emprune.retained_mass(x, m, dim=1)
    finally:
        _select._BLOCK_ELEMS = old
    n = x.shape[1]
    assert torch.equal(k, torch.floor(ref_neff(x, 1) * beta * (1 + 2.0**-48)).clamp(1, n).long())
    assert torch.equal(m, ref_topk_mask(x, k))
    assert torch.allclose(mass, emprune.retained_mass(x, m, dim=1), rtol=1e-12, atol=0)


@given(vectors)
def test_mass_bound_holds(v):
    x = torch.from_numpy(v)
    m = emprune.keep_mask(x)
    nu = int(math.floor(float(emprune.effective_number(x)) * (1 + 2.0**-48)))
    mass = float(emprune.retained_mass(x, m))
    assert mass >= emprune.mass_bound(max(1, nu), x.numel()) - 1e-9


@given(st.integers(2, 60), st.integers(1, 59), st.integers(0, 2**31 - 1))
def test_mass_bound_tight_on_spike_plus_uniform(n, nu, seed):
    """One spike plus a uniform rest with N_eff = nu + 1 - eps approaches the bound."""
    if not 2 <= nu < n - 1:
        return
    # w = (a, b, ..., b): solve N_eff(a) = nu + 1 for the spike a in (b, 1)
    def neff(a):
        b = (1 - a) / (n - 1)
        return 1.0 / (a * a + (n - 1) * b * b)
    lo, hi = 1.0 / n, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if neff(mid) > nu + 1 - 1e-9 else (lo, mid)
    a = lo
    w = torch.full((n,), (1 - a) / (n - 1), dtype=torch.float64)
    w[0] = a
    kept = float(w[0] + (nu - 1) * w[1])  # the top nu entries
    assert kept >= emprune.mass_bound(nu, n) - 1e-6
    assert kept - emprune.mass_bound(nu, n) < 1e-3  # tight


def test_mass_bound_nu1_correction():
    # the paper's formula gives less than 1/2 for nu = 1; the true infimum is 1/2
    assert emprune.mass_bound(1, 10) == 0.5
    eps = 1e-4
    w = torch.tensor([0.5 + eps, 0.5 - eps] + [0.0] * 8, dtype=torch.float64)
    assert float(emprune.effective_number(w)) < 2
    m = emprune.keep_mask(w)
    assert int(m.sum()) == 1
    assert float(emprune.retained_mass(w, m)) >= 0.5
    assert emprune.mass_bound(10, 10) == 1.0
    with pytest.raises(ValueError):
        emprune.mass_bound(0, 10)
    with pytest.raises(ValueError):
        emprune.mass_bound(11, 10)


def test_gaussian_ratio_two_over_pi():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 20000, generator=g)
    r = emprune.effective_number(x, dim=1) / x.shape[1]
    assert abs(float(r.mean()) - 2 / math.pi) < 0.005


# ---------------------------------------------------------------- semantics

def test_dims_and_shapes():
    x = torch.randn(5, 7, 9)
    assert emprune.effective_number(x).shape == ()
    assert emprune.effective_number(x, dim=1).shape == (5, 9)
    m = emprune.keep_mask(x, dim=1)
    assert m.shape == x.shape and m.dtype == torch.bool
    assert torch.equal(m.sum(1), emprune.keep_count(x, dim=1))
    m2 = emprune.keep_mask(x, dim=-1)
    assert torch.equal(m2.sum(-1), emprune.keep_count(x, dim=-1))


def test_all_zero_keeps_all():
    z = torch.zeros(3, 8)
    assert torch.equal(emprune.effective_number(z, dim=1), torch.full((3,), 8.0, dtype=torch.float64))
    assert bool(emprune.keep_mask(z, dim=1).all())
    assert bool(emprune.keep_mask(z).all())


def test_uniform_keeps_all_and_large_beta_clamps():
    x = torch.ones(1000) * 0.37
    assert int(emprune.keep_count(x)) == 1000  # N_eff == N exactly, no floor-by-rounding
    y = torch.randn(100)
    assert int(emprune.keep_count(y, beta=1e9)) == 100
    assert int(emprune.keep_count(torch.tensor([1.0, 0, 0, 0]), beta=1e-9)) == 1  # at least 1


def test_ties_lower_index_first():
    x = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    m = emprune.topk_mask(x, 2, dim=1)
    assert m.tolist() == [[False, True, True, False, False]]
    m = emprune.topk_mask(torch.ones(10), 3)
    assert m.tolist() == [True] * 3 + [False] * 7


def test_negative_abs_and_shift():
    x = torch.tensor([-5.0, 1.0, 2.0, 0.0])
    assert emprune.keep_mask(x, negative="abs")[0]
    s = x - x.min()
    assert math.isclose(float(emprune.effective_number(x, negative="shift")),
                        float(emprune.effective_number(s)), rel_tol=1e-12)
    ms = emprune.keep_mask(x, negative="shift")
    assert not ms[0]  # the most negative score is the least important when shifted
    rows = torch.tensor([[-3.0, -1.0, -2.0], [4.0, 5.0, 6.0]])
    assert torch.equal(emprune.keep_mask(rows, dim=1, negative="shift"),
                       emprune.keep_mask(rows - rows.min(1, keepdim=True).values, dim=1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8])
def test_dtypes(dtype):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 700, generator=g)
    x = (base * 20).round().to(dtype) if not dtype.is_floating_point else base.to(dtype)
    if dtype == torch.uint8:
        x = (base.abs() * 30).to(dtype)
    k = emprune.keep_count(x, dim=1)
    assert torch.equal(k, torch.floor(ref_neff(x, 1) * (1 + 2.0**-48)).clamp(1, 700).long())
    m = emprune.keep_mask(x, dim=1)
    assert torch.equal(m, ref_topk_mask(x, k))
    mg = emprune.keep_mask(x)
    kg = int(emprune.keep_count(x))
    assert torch.equal(mg, ref_topk_mask(x.reshape(1, -1), torch.tensor([kg])).reshape(x.shape))


def test_heavy_tailed_and_tied_rows_agree_with_reference():
    g = torch.Generator().manual_seed(2)
    cases = [
        torch.randn(64, 3000, generator=g).abs() * torch.rand(3000, generator=g) ** 8,  # wanda-like
        torch.randn(64, 3000, generator=g).exp() ** 4,  # log-normal
        torch.randint(0, 3, (64, 3000), generator=g).float(),  # massive ties
        torch.cat([torch.zeros(64, 2990), torch.rand(64, 10, generator=g)], 1),  # mostly zeros
        torch.randn(64, 3000, generator=g).bfloat16(),
    ]
    for x in cases:
        for k in (emprune.keep_count(x, dim=1), torch.full((64,), 1), torch.full((64,), 2999),
                  torch.randint(1, 3001, (64,), generator=g),
                  torch.randint(0, 3001, (64,), generator=g).index_fill_(0, torch.tensor([3, 40]), 3000)
                  .index_fill_(0, torch.tensor([5]), 0)):  # full and empty rows among the others
            m = emprune.topk_mask(x, k, dim=1)
            assert torch.equal(m.sum(1), k)
            assert torch.equal(m, ref_topk_mask(x, k))


def test_topk_mask_bounds_and_zero():
    x = torch.randn(4, 10)
    assert int(emprune.topk_mask(x, 0, dim=1).sum()) == 0
    assert bool(emprune.topk_mask(x, 10, dim=1).all())
    with pytest.raises(ValueError, match="k must lie"):
        emprune.topk_mask(x, 11, dim=1)
    with pytest.raises(ValueError, match="counts for"):
        emprune.topk_mask(x, torch.tensor([1, 2]), dim=1)


# ---------------------------------------------------------------- global scope

def test_global_matches_concatenation():
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(30, 40, generator=g), torch.randn(500, generator=g) * 3, torch.randn(7, 3, 3, generator=g)]
    thr = emprune.global_threshold(ts)
    cat = torch.cat([t.reshape(-1) for t in ts])
    assert thr.k == int(emprune.keep_count(cat))
    assert math.isclose(thr.n_eff, float(emprune.effective_number(cat)), rel_tol=1e-12)
    masks = list(emprune.global_masks(ts, thr))
    got = torch.cat([m.reshape(-1) for m in masks])
    assert torch.equal(got, emprune.keep_mask(cat))


def test_global_ties_across_tensors_and_lazy_sources():
    ts = [torch.ones(10), torch.ones(10) * 2, torch.ones(10)]
    calls = []

    def src(i):
        def f():
            calls.append(i)
            return ts[i]
        return f
    thr = emprune.global_threshold([src(0), src(1), src(2)], k=15)
    masks = list(emprune.global_masks([src(0), src(1), src(2)], thr))
    assert [int(m.sum()) for m in masks] == [5, 10, 0]  # ties: earlier tensor, lower index first
    assert masks[0].tolist() == [True] * 5 + [False] * 5
    assert len(calls) > 3  # sources were recomputed, never stored
    # one source's mask on its own (index = its position) equals the streamed one
    for i, m in enumerate(masks):
        assert torch.equal(emprune.global_mask(ts[i], thr, i), m)
    with pytest.raises(IndexError):
        emprune.global_mask(ts[0], thr, 3)


def test_global_large_beyond_quantile_limit():
    # more than 2**24 scores across tensors: no torch.quantile, no concatenation needed
    g = torch.Generator().manual_seed(4)
    ts = [torch.randn(3000, 3000, generator=g), torch.randn(2000, 4000, generator=g)]
    thr = emprune.global_threshold(ts)
    assert thr.n == 17_000_000 > 2**24
    masks = list(emprune.global_masks(ts, thr))
    assert sum(int(m.sum()) for m in masks) == thr.k
    kept_min = min(float(t.abs()[m].min()) for t, m in zip(ts, masks))
    dropped_max = max(float(t.abs()[~m].max()) for t, m in zip(ts, masks))
    assert kept_min >= dropped_max


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("fn", [emprune.effective_number, emprune.keep_count, emprune.keep_mask])
def test_bad_scores(fn):
    with pytest.raises(ValueError, match="NaN"):
        fn(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="Inf"):
        fn(torch.tensor([[1.0, float("inf")]]), dim=1)
    with pytest.raises(ValueError, match="empty"):
        fn(torch.tensor([]))
    with pytest.raises(TypeError):
        fn([1.0, 2.0])


@pytest.mark.parametrize("beta", [0, -1, float("nan"), float("inf"), "x"])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        emprune.keep_mask(torch.randn(10), beta)


def test_bad_names_the_tensor():
    with pytest.raises(ValueError, match="layer3.weight"):
        emprune.keep_mask(torch.tensor([1.0, float("nan")]), where="layer3.weight")
    with pytest.raises(ValueError, match="negative"):
        emprune.keep_mask(torch.randn(3), negative="clip")


def test_float64_overflowing_squares():
    x = torch.tensor([1e200, 2e200, 3e200], dtype=torch.float64)
    assert math.isclose(float(emprune.effective_number(x.reshape(1, -1), dim=1)), 36 / 14, rel_tol=1e-9)


@pytest.mark.parametrize("selection_path", ["both"])  # runs once: it switches paths itself
def test_kernel_and_torch_paths_agree(monkeypatch, selection_path):
    from emprune.core import kernels as _kernels
    if not _kernels.AVAILABLE:
        pytest.skip(f"the compiled kernel is off: {_kernels.WHY_NOT}")
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(50, 3000, generator=g), torch.randn(50, 3000, generator=g).bfloat16(),
          torch.randn(50, 3000, generator=g).half(), torch.randn(50, 3000, generator=g).double() * 1e-30,
          torch.randint(-3, 4, (50, 3000), generator=g), torch.randn(50, 3000, generator=g).exp() ** 6]
    for x in xs:
        for neg in ("abs", "shift"):
            a = (emprune.keep_mask(x, 0.8, dim=1, negative=neg), emprune.effective_number(x, dim=1, negative=neg),
                 emprune.topk_mask(x, torch.arange(50) * 60, dim=1, negative=neg))
            monkeypatch.setattr(_kernels, "AVAILABLE", False)
            b = (emprune.keep_mask(x, 0.8, dim=1, negative=neg), emprune.effective_number(x, dim=1, negative=neg),
                 emprune.topk_mask(x, torch.arange(50) * 60, dim=1, negative=neg))
            monkeypatch.setattr(_kernels, "AVAILABLE", True)
            assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
            assert torch.allclose(a[1], b[1], rtol=1e-12, atol=0)


def test_long_rows_are_streamed_with_the_same_answers(monkeypatch):
    """Rows longer than a working block go through the streaming engine (no row-sized
    scratch); their counts, masks and masses equal the block path's and the reference's."""
    from emprune.core import engine as _select
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(5, 3000, generator=g), torch.randint(-2, 3, (5, 3000), generator=g).float(),
          torch.randn(5, 3000, generator=g).bfloat16()]
    for x in xs:
        for neg in ("abs", "shift"):
            k = torch.tensor([0, 1, 1500, 2999, 3000])

            def answers():
                m = emprune.keep_mask(x, 0.9, dim=1, negative=neg)
                return (emprune.effective_number(x, dim=1, negative=neg), emprune.keep_count(x, 0.9, dim=1, negative=neg),
                        m, emprune.topk_mask(x, k, dim=1, negative=neg),
                        emprune.retained_mass(x, m, dim=1, negative=neg),
                        emprune.retained_mass(x, m, None, negative=neg), emprune.topk_mask(x, 7000, None, negative=neg))
            block = answers()
            with monkeypatch.context() as mp:  # (keeps the selection-path fixture's patch)
                mp.setattr(_select, "_BLOCK_ELEMS", 256)
                assert _select._long(3000, torch.device("cpu"))
                streamed = answers()
            assert torch.allclose(block[0], streamed[0], rtol=1e-12, atol=0)
            for a, b in zip(block[1:4] + block[6:], streamed[1:4] + streamed[6:]):
                assert torch.equal(a, b)
            assert torch.allclose(block[4], streamed[4], rtol=1e-12) and torch.allclose(block[5], streamed[5], rtol=1e-12)
            if neg == "abs":
                assert torch.equal(streamed[3], ref_topk_mask(x, k))
                assert torch.equal(streamed[2], ref_topk_mask(x, streamed[1]))


def test_retained_mass_bad_masks():
    x = torch.randn(4, 10)
    m = emprune.keep_mask(x, dim=1)
    with pytest.raises(TypeError, match="bool"):
        emprune.retained_mass(x, m.float(), dim=1)
    with pytest.raises(ValueError, match="shape"):
        emprune.retained_mass(x, m[:, :5], dim=1)
    with pytest.raises(ValueError, match="shape"):
        rule.masked_mass(x, m.reshape(-1)[:20])
