"""The OBS reconstruction (emprune.obs, SparseGPT's algorithm): exact counts, N:M patterns,
reconstruction error against plain masking and Wanda, determinism, errors; the Hessian observer."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from emprune.criteria.hessian import InputHessians
from emprune.core.obs import HessianSum, hessian, nm_mask, obs_prune
from emprune.core.rule import topk_mask


def _problem(seed: int = 0, rows: int = 48, cols: int = 96, tokens: int = 1024):
    """Correlated inputs with features of unequal scale (as in LLM activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = (torch.randn(tokens, cols, generator=g) * (0.2 + 3 * torch.rand(cols, generator=g))) @ mix
    w = torch.randn(rows, cols, generator=g)
    return w, x


def _err(w: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - w2).double() @ x.double().T).norm())


@pytest.mark.parametrize("quota", ["lookahead", "even"])
def test_exact_counts_per_row_and_zeros_off_mask(quota):
    w, x = _problem()
    k = torch.randint(1, w.shape[1], (w.shape[0],), generator=torch.Generator().manual_seed(3))
    res = obs_prune(w, hessian(x), k=k, blocksize=32, quota=quota)
    assert torch.equal(res.mask.sum(1), k)
    assert torch.equal(res.kept, k)
    assert bool((res.weight[~res.mask] == 0).all())
    assert res.weight.dtype == w.dtype and res.weight.shape == w.shape


def test_reconstruction_beats_plain_masking_and_wanda_at_the_same_counts():
    w, x = _problem(1)
    h = hessian(x)
    k = torch.full((w.shape[0],), w.shape[1] // 2) + torch.arange(w.shape[0]) % 7 - 3
    res = obs_prune(w, h, k=k, blocksize=32)
    plain = _err(w, w * res.mask, x)
    wanda_mask = topk_mask(w.abs() * x.norm(dim=0), k, 1)
    wanda = _err(w, w * wanda_mask, x)
    ours = _err(w, res.weight, x)
    assert ours < 0.9 * plain
    assert ours < 0.9 * wanda


def test_nm_pattern_exact_and_better_than_wanda_nm():
    w, x = _problem(2)
    res = obs_prune(w, hessian(x), nm=(2, 4), blocksize=30)  # blocksize rounded to a multiple of 4
    groups = res.mask.reshape(w.shape[0], -1, 4).sum(-1)
    assert bool((groups == 2).all())
    wanda = w * nm_mask(w.abs() * x.norm(dim=0), 2, 4)
    assert _err(w, res.weight, x) < _err(w, wanda, x)


def test_fixed_sparsity_is_sparsegpt_per_block_choice():
    w, x = _problem(3)
    res = obs_prune(w, hessian(x), sparsity=0.5, blocksize=32)
    assert int(res.mask.sum()) == w.numel() // 2  # 50 % of every block, rows differ
    assert len(set(res.kept.tolist())) > 1


def test_deterministic_and_input_untouched():
    w, x = _problem(4)
    w0 = w.clone()
    a = obs_prune(w, hessian(x), k=40)
    b = obs_prune(w, hessian(x), k=40)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
    assert torch.equal(w, w0)


def test_dead_inputs_pruned_first_and_no_error():
    w, x = _problem(5)
    x[:, :5] = 0  # five features never active
    res = obs_prune(w, hessian(x), k=w.shape[1] - 5)
    assert not bool(res.mask[:, :5].any())
    assert bool(res.mask[:, 5:].all())


def test_singular_hessian_without_damping_is_one_clear_error():
    w, x = _problem(6, cols=32, tokens=8)  # rank 8 < 32
    with pytest.raises(ValueError, match="not positive definite.*larger damp"):
        obs_prune(w, hessian(x), k=10, damp=0.0)
    obs_prune(w, hessian(x), k=10, damp=0.01)  # dampening makes it definite


@pytest.mark.parametrize("kwargs, msg", [
    ({}, "exactly one of"),
    ({"k": 3, "sparsity": 0.5}, "exactly one of"),
    ({"k": torch.tensor([1.0] * 48)}, "integers"),
    ({"k": torch.tensor([200] * 48)}, r"\[0, 96\]"),
    ({"sparsity": 1.0}, r"\[0, 1\)"),
    ({"nm": (2, 5)}, "multiple of m=5"),
    ({"k": 3, "damp": -1.0}, "damp"),
    ({"k": 3, "quota": "nope"}, "quota"),
])
def test_bad_options(kwargs, msg):
    w, x = _problem(7)
    with pytest.raises((ValueError, TypeError), match=msg):
        obs_prune(w, hessian(x), **kwargs)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 9), st.integers(3, 40), st.integers(1, 16), st.integers(0, 2 ** 16), st.sampled_from(["lookahead", "even"]))
def test_count_law_property(rows, cols, blocksize, seed, quota):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(max(4, cols // 2), cols, generator=g)
    k = torch.randint(0, cols + 1, (rows,), generator=g)
    res = obs_prune(w, hessian(x), k=k, blocksize=blocksize, quota=quota)
    assert torch.equal(res.mask.sum(1), k)
    assert bool((res.weight[~res.mask] == 0).all())


def test_hessian_sum_matches_closed_form():
    _, x = _problem(8, tokens=300)
    hs = HessianSum(x.shape[1])
    hs.add(x[:100])
    hs.add(x[100:])
    assert torch.allclose(hs.value, hessian(x), rtol=1e-5, atol=1e-3)
    assert hs.tokens == 300


def test_observer_shares_inputs_and_releases():
    torch.manual_seed(0)
    a, b, c = nn.Linear(8, 4), nn.Linear(8, 3), nn.Linear(4, 2)
    obs = InputHessians()
    xs = [torch.randn(5, 8) for _ in range(3)]
    with obs.observe({"a": a, "b": b, "c": c}):
        for x in xs:
            y = a(x)
            b(x)
            c(y)
    xa = torch.cat(xs)
    assert torch.allclose(obs.hessian("a"), hessian(xa), rtol=1e-5, atol=1e-4)
    assert torch.allclose(obs.hessian("b"), hessian(xa), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(obs.hessian("c"), hessian(a(xa)), rtol=1e-4, atol=1e-3)
    obs.release(["a"])
    assert obs.missing(["a", "b"]) == ["a"]
    obs.release()
    assert obs.missing(["b", "c"]) == ["b", "c"]


def test_diag_dampening_moves_from_obs_towards_wanda():
    w, x = _problem(9)
    h = hessian(x)
    k = torch.full((w.shape[0],), w.shape[1] // 2)
    far = obs_prune(w, h, k=k, damp=1e6, damp_kind="diag")
    wanda = topk_mask(w.abs() * x.double().norm(dim=0).float(), k, 1)
    assert (far.mask == wanda).float().mean() > 0.99  # saliency -> w^2 H_jj: Wanda's choice
    assert float((far.weight - w * far.mask).abs().max()) < 1e-3  # and (almost) no update
    near = obs_prune(w, h, k=k, damp=0.01, damp_kind="diag")
    assert _err(w, near.weight, x) < _err(w, far.weight, x)
