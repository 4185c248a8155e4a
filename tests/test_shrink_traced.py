"""emprune.jobs.traced: EMP on a residual CNN through Torch-Pruning's dependency graph."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

tp = pytest.importorskip("torch_pruning")

from emprune.jobs.traced import shrink_traced  # noqa: E402


class Block(nn.Module):
    """A residual block: conv-ReLU-conv added to its input (ties the outer channels together)."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, hidden, 3, padding=1)
        self.c2 = nn.Conv2d(hidden, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(torch.relu(self.c1(x)))


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), Block(8, 12), Block(8, 12), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 3)).eval()


X = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))


def test_dead_channels_go_and_nothing_changes():
    """Channels whose weights are all zero contribute nothing: EMP removes them first and the
    smaller network computes exactly what the network computed (residual couplings respected)."""
    model = resnet()
    dead_hidden = [1, 5, 7, 9, 10, 11]
    with torch.no_grad():
        for blk in (model[2], model[3]):
            blk.c1.weight[dead_hidden] = 0
            blk.c1.bias[dead_hidden] = 0
    ref = model(X)
    before = sum(p.numel() for p in model.parameters())
    small = model
    rep = shrink_traced(small, X[:1], keep=6, ignored_layers=[small[0], small[5]])
    with torch.no_grad():
        assert torch.allclose(small(X), ref, atol=1e-5)
    assert [blk.c1.out_channels for blk in (small[2], small[3])] == [6, 6]
    assert small[0].out_channels == 8  # the residual stream's root is ignored, so its group stays
    assert rep.params_after == sum(p.numel() for p in small.parameters()) < before


def test_counts_are_emps_and_the_report_adds_up():
    model = resnet(3)
    before = sum(p.numel() for p in model.parameters())
    rep = shrink_traced(model, X[:1], beta=1.0)
    assert rep.groups and rep.params_before == before
    for g in rep.groups:
        assert g.units_after == g.emp_count == max(1, min(g.units_before, int(math.floor(g.neff))))
        assert g.retained_mass >= g.bound - 1e-9  # the paper's bound, exact rule
    removed = sum(g.params_before - g.params_after for g in rep.groups)
    assert removed == before - rep.params_after  # per-group parameters add up to what really went
    assert rep.macs_after < rep.macs_before
    assert model(X).shape == (4, 3)


def test_shape_estimate_matches_measured_parameters():
    """A group that loses nothing reports parameters estimated from shapes; the first group (pruned
    before any other changes its shapes) must lose exactly that many per channel when pruned."""
    est = shrink_traced(resnet(5), X[:1], keep=1.0)  # nothing removed: every figure estimated
    meas = shrink_traced(resnet(5), X[:1], keep=0.5)  # everything pruned: every figure measured
    assert [g.name for g in est.groups] == [g.name for g in meas.groups]
    assert est.groups[0].params_before == meas.groups[0].params_before > 0


def test_bad_input():
    with pytest.raises(ValueError, match="keep must be"):
        shrink_traced(resnet(), X[:1], keep=1.5)
    with pytest.raises(ValueError, match="beta must be"):
        shrink_traced(resnet(), X[:1], beta=0)
