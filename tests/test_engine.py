"""The engine behind emprune.rule: its narrow interface, the one floor(beta * N_eff) and its
compiled copy, the bracket search of the PyTorch selector, and empty tensors."""
import ast
import math
import warnings
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import emprune
from emprune.core import kernels as _kernels, engine as _select, rule
from reference import ref_topk_mask

SRC = Path(emprune.__file__).resolve().parent


def _imported_from_engine(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in ("engine", "kernels"):
            names |= {a.name for a in node.names}
        if isinstance(node, ast.ImportFrom) and node.module is None and node.level == 1:
            names |= {a.name for a in node.names if a.name in ("engine", "kernels")}
    return names


def test_rule_uses_only_the_engine_interface():
    """rule.py imports the engine's public names only (its __all__), and only a handful."""
    names = _imported_from_engine(SRC / "core" / "rule.py")
    assert names <= set(_select.__all__), names - set(_select.__all__)
    assert len([n for n in names if n not in ("Negative", "ScoreSource")]) <= 7


# ------------------------------------------------------------ floor(beta * N_eff)


def _near_integers() -> list[float]:
    vals = []
    for i in [1, 2, 3, 7, 10, 99, 100, 1000, 4095, 4096, 123456, 2**20, 2**30]:
        x = float(i)
        down, up = x, x
        vals.append(x)
        for _ in range(40):  # the slack is 2**-48: a few dozen ulps either side
            down, up = math.nextafter(down, 0.0), math.nextafter(up, math.inf)
            vals += [down, up]
        vals += [x * (1 - 2.0**-47), x * (1 - 2.0**-49), x * (1 + 2.0**-49), x - 1e-9, x + 1e-9]
    return vals


@pytest.mark.skipif(not _kernels.AVAILABLE, reason=f"the compiled kernel is off: {_kernels.WHY_NOT}")
def test_compiled_floor_equals_the_helper():
    g = np.random.default_rng(0)
    neffs = _near_integers() + list(g.uniform(1, 5000, 2000)) + list(g.uniform(1, 10, 2000))
    for beta in [1.0, 0.5, 0.3, 0.7, 1.1, 2.5, 1 / 3, 0.1, 10.0]:
        for n in [1, 5, 4096, 2**31]:
            # for this beta, values of N_eff that put beta * N_eff just around an integer
            around = [math.nextafter(j / beta, d) for j in (3, 7, 100, 4095) for d in (0.0, math.inf)]
            vals = torch.tensor(neffs + around + [j / beta for j in (3, 7, 100, 4095)], dtype=torch.float64)
            want = _select.keep_floor(vals, beta, n)
            got = torch.tensor([_kernels._keep_floor(float(v), beta, n) for v in vals])
            assert torch.equal(got, want), (beta, n)


@pytest.mark.skipif(not _kernels.AVAILABLE, reason=f"the compiled kernel is off: {_kernels.WHY_NOT}")
def test_compiled_neff_equals_the_helper():
    g = np.random.default_rng(1)
    s1 = g.uniform(0, 1e3, 500)
    s2 = s1 * s1 / g.uniform(0.5, 600, 500)  # N_eff in [0.5, 600]: clamped at both ends for n = 300
    s1, s2 = np.append(s1, [0.0, 5.0, 1e-300]), np.append(s2, [0.0, 25.0, 1e-300])
    for n in (1, 300, 10**6):
        want = _select._neff_from_sums(torch.from_numpy(s1), torch.from_numpy(s2), n)
        got = torch.tensor([_kernels._neff(a, b, n) for a, b in zip(s1, s2)], dtype=torch.float64)
        assert torch.equal(got, want)


def test_uniform_scores_keep_everything_at_beta_1():
    """The slack: an N_eff that is mathematically an integer (here with exact sums) is not
    floored one below."""
    for n in (3, 7, 10, 1000, 4097):
        x = torch.full((2, n), 0.75)
        assert torch.equal(emprune.keep_count(x, 1.0, dim=1), torch.tensor([n, n]))
        assert int(emprune.keep_count(x.reshape(-1), 0.5)) == n


# ------------------------------------------------------- the per-row bracket search


def test_worked_example_of_the_bracket(monkeypatch):
    """The example in _rows_topk's docstring, with the bracket search forced on a short row."""
    monkeypatch.setattr(_select, "_SAMPLE", 2)
    monkeypatch.setattr(_select, "_BAND", 2)
    x = torch.tensor([[0.1, 0.9, 0.4, 0.7, 0.3, 0.8, 0.2, 0.6]])
    m = _select._rows_topk(x, torch.tensor([3]), torch.float32)
    assert m.tolist() == [[False, True, False, True, False, True, False, False]]
    lo, hi, c_lo, c_hi = _select._narrow_brackets(x, torch.tensor([3]), _select._sample_ranks(x, torch.float32),
                                                  torch.float32, None)
    assert int(c_lo) >= 3 > int(c_hi) and int(c_lo - c_hi) <= 2  # the invariant and the band
    assert int((x >= lo).sum()) == int(c_lo) and int((x >= hi).sum()) == int(c_hi)


small_rows = hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(9, 200)),
                        elements=st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0]) | st.floats(0, 1e3, width=32))


@settings(deadline=None, max_examples=150)
@given(small_rows, st.data())
def test_bracket_search_is_exact_on_small_rows(w, data):
    """With a tiny sample and band the search runs all its steps (coarse, fine, bisection)
    on short rows full of ties; it must still give the sort reference's mask."""
    x = torch.from_numpy(w)
    k = torch.tensor(data.draw(st.lists(st.integers(0, x.shape[1]), min_size=x.shape[0], max_size=x.shape[0])))
    old = _select._SAMPLE, _select._BAND
    _select._SAMPLE, _select._BAND = 2, 1
    try:
        for grid in (torch.float32, torch.bfloat16):
            xg = x.to(grid).float()  # scores on that grid, searched in float32
            assert torch.equal(_select._rows_topk(xg, k, grid), ref_topk_mask(xg, k))
    finally:
        _select._SAMPLE, _select._BAND = old


# ------------------------------------------------------------------ empty tensors


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,), (0, 0), (3, 0, 4)])
@pytest.mark.parametrize("dim", [None, 1, 0])
def test_empty_scores_raise_a_value_error_naming_the_tensor(shape, dim):
    x = torch.empty(shape)
    if dim is not None and dim >= x.dim():
        return
    for f in (lambda: emprune.keep_mask(x, dim=dim, where="layer.w"),
              lambda: emprune.keep_count(x, dim=dim, where="layer.w"),
              lambda: emprune.effective_number(x, dim=dim, where="layer.w"),
              lambda: emprune.topk_mask(x, 0, dim=dim, where="layer.w")):
        with pytest.raises(ValueError, match=r"empty.*layer\.w"):
            f()


@pytest.mark.parametrize("scope", ["row", "layer", "global"])
@pytest.mark.parametrize("features", [(5, 0), (0, 5)])
def test_prune_a_layer_with_no_weights_raises_a_value_error(scope, features):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that initialising zero elements is a no-op
        net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(*features))
    with pytest.raises(ValueError, match=r"empty.*\b1\b"):  # names the empty layer ("1...")
        emprune.prune(net, "magnitude", scope)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sort_path_of_accelerators_equals_the_bracket_search(monkeypatch, dtype):
    """On CUDA the per-row selector takes the k-th value from one sort; on CPU it brackets.
    Both must give the same masks (ties by lower index): force the sort path on CPU (rows
    count as short when the sample is as wide as the row) and compare."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(40, 700, generator=g).abs(),
                   torch.randint(0, 5, (40, 700), generator=g).float()]).to(dtype)
    k = torch.randint(0, 701, (80,), generator=g)
    monkeypatch.setattr(_kernels, "AVAILABLE", False)  # the PyTorch engine on both sides
    bracket = rule.topk_mask(x, k, dim=1)
    emp_bracket = rule.keep_mask(x, dim=1)
    monkeypatch.setattr(_select, "_SAMPLE", 1000)
    assert torch.equal(rule.topk_mask(x, k, dim=1), bracket)
    assert torch.equal(rule.keep_mask(x, dim=1), emp_bracket)
    assert torch.equal(bracket.sum(1), k)
