"""``multiple_of``: every MLP width ``emprune shrink`` keeps is a multiple of ``m`` (or the layer's
full width), chosen by the allocation on that grid, with EMP's total kept as closely as the grid
allows; ``multiple_of=1`` is the decision from before the option existed, unit for unit.

The decisions before the option (``shrink_kept_multiple1.json``) were recorded with the code as it
was, on the configurations of :data:`CONFIGS` (tiny LLaMA, dry runs; regenerate with
``python tests/test_shrink_multiple.py`` only from a checkout of that code).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from emprune.decide.allocate import by_sensitivity_on_grid, grid_counts, take_steps
from emprune.structure.units import grid_widths, nearest_width

transformers = pytest.importorskip("transformers")

GOLDEN = Path(__file__).with_name("shrink_kept_multiple1.json")
CALIB = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(6))
N = 96  # the tiny model's intermediate size

#: name -> shrink options (``calibration=True``: the calibration tokens); every recipe path
#: that decides MLP widths: the sensitivity default (one kind / joint with heads), zscore,
#: mean-joint, the paper's threshold and per-layer rule, a per-layer floor, the three ``keep=`` forms
CONFIGS: dict[str, dict] = {
    "default-mlp": dict(units="mlp", calibration=True),
    "default-mlp-heads": dict(units="mlp,heads", calibration=True),
    "zscore-global": dict(units="mlp", calibration=True, recipe="zscore", scope="global"),
    "mean-joint-free": dict(units="mlp,heads", criterion="magnitude", compensate=False),
    "threshold-global": dict(units="mlp", criterion="magnitude", recipe="paper", scope="global"),
    "paper-layer": dict(units="mlp", criterion="magnitude", recipe="paper", scope="layer", beta=0.9),
    "floor-layer": dict(units="mlp", calibration=True, recipe="floor-comp", scope="layer"),
    "keep-fraction": dict(units="mlp,heads", criterion="magnitude", keep=0.4),
    "keep-count": dict(units="mlp", criterion="magnitude", keep=50),
    "keep-params": dict(units="mlp,heads", criterion="magnitude", keep={"params": 60000}),
}


def tiny_llama(layers: int = 4, seed: int = 0) -> nn.Module:
    """As ``test_shrink.tiny_llama``: 64 hidden, 96 MLP neurons, 4 heads in 2 KV groups."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=N, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m


def kept(name: str, model: nn.Module | None = None, **extra) -> dict[str, list[int]]:
    """The kept units per group of configuration ``name`` (a dry run; ``uniform``: through
    ``shrink_lm``), with ``extra`` options."""
    from emprune.jobs.shrink import shrink
    from emprune.jobs.shrink_lm import shrink_lm

    model = tiny_llama() if model is None else model
    if name == "uniform":
        rep, _ = shrink_lm(model, CALIB, units="mlp", uniform=True, progress=False, dry_run=True, **extra)
    else:
        kw = dict(CONFIGS[name])
        if kw.pop("calibration", False):
            kw["calibration"] = CALIB
        rep = shrink(model, dry_run=True, **kw, **extra)
    return {g.name: list(g.kept) for g in rep.groups}


def _reports(name: str, m: int, model: nn.Module | None = None):
    from emprune.jobs.shrink import shrink

    kw = dict(CONFIGS[name])
    if kw.pop("calibration", False):
        kw["calibration"] = CALIB
    return shrink(tiny_llama() if model is None else model, dry_run=True, multiple_of=m, **kw)


def _mlp(rep) -> list:
    return [g for g in rep.groups if g.kind == "mlp"]


# ------------------------------------------------------------------ multiple_of=1: the old decision


@pytest.mark.parametrize("name", [*CONFIGS, "uniform"])
def test_multiple_of_1_is_the_decision_from_before(name):
    """Unit for unit what the code before ``multiple_of`` kept (recorded in the golden file)."""
    assert kept(name, multiple_of=1) == json.loads(GOLDEN.read_text())[name]


# ------------------------------------------------------------------ the grid


@pytest.mark.parametrize("m", [16, 32, 40])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_mlp_width_is_on_the_grid(name, m):
    """Every kept MLP width is a multiple of m or the full width (96 is no multiple of 40: then
    40, 80 or 96), every floor holds, and the report says m."""
    rep = _reports(name, m)
    assert rep.multiple_of == m
    for g in _mlp(rep):
        assert g.units_after % m == 0 or g.units_after == N, (g.name, g.units_after)
        assert len(g.kept) == g.units_after
    if name == "floor-layer":  # floor-comp: every layer keeps >= 50 %, on the grid too
        assert all(g.units_after >= N // 2 for g in _mlp(rep))
    if name.startswith("default"):  # the sensitivity recipe's 25 % floor
        assert all(g.units_after >= N // 4 for g in _mlp(rep))


def test_which_units_stay_is_by_score():
    """The grid changes how many units a group keeps, not which: its best ones by score."""
    from emprune.jobs.shrink import score_units

    _, scores, _ = score_units(tiny_llama(), "mlp", "fluctuation", CALIB)
    rep = _reports("default-mlp", 16)
    assert any(g.units_after < N for g in rep.groups)
    for s, g in zip(scores, rep.groups):
        top = torch.sort(s, descending=True, stable=True).indices[: g.units_after]
        assert sorted(g.kept) == sorted(top.tolist())


@pytest.mark.parametrize("m", [8, 16, 32])
@pytest.mark.parametrize("name", ["default-mlp", "zscore-global"])
def test_total_is_emps_to_half_a_step(name, m):
    """The allocation steps on the grid until EMP's total: the MLP units removed differ from the
    total EMP's per-layer counts remove by at most m/2 (half a step of one layer; all MLP
    groups here have the same parameters per unit)."""
    rep = _reports(name, m)
    mlp = _mlp(rep)
    removed = sum(g.units_before - g.units_after for g in mlp)
    target = sum(g.units_before - g.emp_count for g in mlp)
    assert target > m / 2  # something to remove
    assert abs(removed - target) <= m / 2, (removed, target, [g.units_after for g in mlp])


def test_threshold_total_is_the_papers_to_half_a_step():
    """The paper's global threshold: the units it keeps in all, spread again on the grid."""
    for m in (4, 8):
        kw = dict(beta=0.5)
        any_width = sum(g.units_after for g in _mlp(_reports_kw("threshold-global", 1, **kw)))
        grid = _mlp(_reports_kw("threshold-global", m, **kw))
        assert all(g.units_after % m == 0 for g in grid)
        assert any_width < 4 * N and abs(sum(g.units_after for g in grid) - any_width) <= m / 2


def _reports_kw(name: str, m: int, **extra):
    from emprune.jobs.shrink import shrink

    kw = {**CONFIGS[name], **extra}
    return shrink(tiny_llama(), dry_run=True, multiple_of=m, **kw)


def test_layer_scope_goes_to_the_nearest_width():
    """Per layer (no allocation across layers) EMP's count goes to the nearest allowed width."""
    rep = _reports("paper-layer", 16)
    for g in rep.groups:
        assert g.units_after == nearest_width(g.emp_count, N, 16) and abs(g.units_after - g.emp_count) <= 8


def test_keep_sizes_go_to_the_grid():
    from emprune.jobs.shrink import shrink

    for keep, want in ((0.5, 64), (50, 64), (40, 32), ({"model.layers.0.mlp": 70, "model.layers.1.mlp": 10,
                                                         "model.layers.2.mlp": 95, "model.layers.3.mlp": 96}, None)):
        rep = shrink(tiny_llama(), units="mlp", criterion="magnitude", keep=keep, multiple_of=32, dry_run=True)
        got = [g.units_after for g in rep.groups]
        assert got == ([want] * 4 if want else [64, 32, 96, 96])
    budget = 60000
    rep = shrink(tiny_llama(), units="mlp", criterion="magnitude", keep={"params": budget}, multiple_of=32,
                 dry_run=True)
    assert sum(g.params_after for g in rep.groups) <= budget
    assert all(g.units_after % 32 == 0 for g in rep.groups)


def test_uniform_is_a_multiple_of_both():
    """--uniform: one width, a multiple of lcm(64, multiple_of), from a dry run at any width."""
    from emprune.jobs.shrink_lm import shrink_lm

    rep, info = shrink_lm(tiny_llama(), CALIB, units="mlp", uniform=True, progress=False, multiple_of=32,
                          dry_run=True)
    assert len({g.units_after for g in rep.groups}) == 1 and rep.groups[0].units_after % 64 == 0
    assert rep.extra["uniform_from"]["intermediate_multiple"] == 64 and info["multiple_of"] == 32


def test_other_networks_have_no_grid():
    """A plain chain's neurons are no MLP group: multiple_of changes nothing, the report says None."""
    from emprune.jobs.shrink import shrink

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 96), nn.ReLU(), nn.Linear(96, 5)).eval()
    x = torch.randn(8, 20)
    a = shrink(net, units="neurons", criterion="activation", recipe="paper", calibration=[x], dry_run=True)
    b = shrink(net, units="neurons", criterion="activation", recipe="paper", calibration=[x], dry_run=True,
               multiple_of=1)
    assert a.groups[0].kept == b.groups[0].kept and a.multiple_of is None


@pytest.mark.parametrize("bad", [0, -1, 2.5, "32", True, None])
def test_bad_multiple_of_refused(bad):
    from emprune.jobs.shrink import shrink

    with pytest.raises(ValueError, match="multiple_of must be a whole number >= 1"):
        shrink(tiny_llama(layers=1), units="mlp", criterion="magnitude", multiple_of=bad)


@pytest.mark.parametrize("value, says", [("0", "must be >= 1"), ("-1", "must be >= 1"),
                                         ("abc", "expected a whole number >= 1"), ("1.5", "expected a whole number")])
def test_cli_refuses_bad_multiple_of_in_one_line(value, says, tiny, tmp_path, no_load, capsys):
    """Refused while parsing (exit 2, one line), before any model is loaded."""
    from emprune.cli import main

    folder, _ = tiny
    try:
        code = main(["shrink", str(folder), "--out", str(tmp_path / "o"), "--multiple-of", value, "--quiet"])
    except SystemExit as e:
        code = int(e.code)
    assert code == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("emprune shrink: error: argument --multiple-of:") and says in lines[0]
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the laws of the grid functions


@given(st.integers(-5, 300), st.integers(1, 200), st.integers(1, 70))
@settings(max_examples=200, deadline=None)
def test_nearest_width_law(k, n, m):
    """The nearest allowed width (ties keep more), non-decreasing in k; m=1: the clamp."""
    ws = grid_widths(n, m)
    assert ws == sorted(set(ws)) and ws[-1] == n and all(w % m == 0 for w in ws[:-1])
    w = nearest_width(k, n, m)
    c = max(1, min(k, n))
    assert w in ws
    assert abs(w - c) == min(abs(x - c) for x in ws)
    assert not any(abs(x - c) == abs(w - c) and x > w for x in ws)
    assert nearest_width(k + 1, n, m) >= w
    if m == 1:
        assert w == c


_steps = st.lists(st.lists(st.tuples(st.floats(0, 10), st.integers(1, 50)), max_size=8), min_size=1, max_size=6)


@given(_steps, st.floats(-10, 400), st.floats(0, 100))
@settings(max_examples=200, deadline=None)
def test_take_steps_law(steps, target, more):
    """Counts within each list; the total within half the step it stopped at (or the last taken),
    or every step taken; no group's count falls as the target grows."""
    taken = take_steps(steps, target)
    assert all(0 <= c <= len(s) for c, s in zip(taken, steps))
    done = sum(size for s, c in zip(steps, taken) for _, size in s[:c])
    sizes = [size for s in steps for _, size in s]
    target = max(target, 0.0)  # nothing below zero can be removed: a negative target takes no step
    if sum(taken) == len(sizes):
        assert done - target <= max(sizes, default=0) / 2
    else:
        assert abs(done - target) <= max(sizes) / 2
    assert all(a <= b for a, b in zip(taken, take_steps(steps, target + more)))
    if target == 0.0:
        assert take_steps(steps, -1.0) == [0] * len(steps)


@dataclass
class _Group:
    """What the allocators read of a unit group."""

    n: int
    multiple: int
    ppu: int = 3

    def widths(self) -> list[int]:
        return grid_widths(self.n, self.multiple)

    def params_per_unit(self) -> int:
        return self.ppu

    def realised(self, k: int, grid: bool = True) -> int:
        return nearest_width(k, self.n, self.multiple if grid else 1)


@given(st.lists(st.floats(1e-4, 10.0), min_size=2, max_size=6), st.floats(0.0, 0.7), st.sampled_from([8, 32, 64]),
       st.sampled_from([256, 250, 1000]))
@settings(max_examples=60, deadline=None)
def test_sensitivity_on_the_grid_law(sens, share, m, n):
    """Equal groups: every width on the grid and above its floor, the removed total what was asked
    to half a step (m/2 units) unless every group is at its floor, and a more sensitive group never
    keeps fewer units than a less sensitive one."""
    groups = [_Group(n, m) for _ in sens]
    floor = n // 4
    target = share * n * 3 * len(groups)
    ks = by_sensitivity_on_grid(groups, sens, target, 0.5, [floor] * len(groups))
    low = next(w for w in grid_widths(n, m) if w >= floor)
    assert all(k in grid_widths(n, m) and k >= low for k in ks)
    removed = sum(n - k for k in ks) * 3
    assert abs(removed - target) <= m * 3 / 2 or (all(k == low for k in ks) and removed < target)
    for i in range(len(sens)):
        for j in range(len(sens)):
            if sens[i] > sens[j]:
                assert ks[i] >= ks[j]


@given(st.lists(st.integers(0, 2**31), min_size=1, max_size=5), st.floats(0.0, 0.9), st.sampled_from([1, 16, 32]))
@settings(max_examples=60, deadline=None)
def test_grid_counts_law(seeds, share, m):
    """Lowest mean key first in steps of the grid: widths on the grid, the total within half a
    step, more removed where the keys are lower."""
    n = 100
    groups = [_Group(n, m, ppu=1) for _ in seeds]
    keys = [torch.rand(n, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
    target = share * n * len(seeds)
    ws = grid_counts(groups, keys, target, [1] * len(seeds), [1.0] * len(seeds))
    assert all(w in grid_widths(n, m) for w in ws)
    assert abs(sum(n - w for w in ws) - target) <= m / 2 or sum(ws) == len(ws) * m
    lowered = grid_counts(groups, [keys[0] - 10, *keys[1:]], target, [1] * len(seeds), [1.0] * len(seeds))
    assert lowered[0] <= ws[0]


if __name__ == "__main__":  # record the decisions of the code as it is
    GOLDEN.write_text(json.dumps({name: kept(name) for name in [*CONFIGS, "uniform"]}, indent=None) + "\n")
    print(f"wrote {GOLDEN}")
