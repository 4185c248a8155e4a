"""Frictions of the Python API met by a new user (issue 9): ``emprune.io`` after ``import
emprune``, ``(x, y)`` calibration batches (``inputs=``), how batches reach the model, and a
second ``prune`` on a model that is masked already."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import emprune


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _masks(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight_mask.clone() for m in model.modules() if hasattr(m, "weight_mask")]


def test_io_reachable_after_import_emprune(tmp_path):
    src = str(Path(emprune.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = ("import emprune, torch\n"
            "m = torch.nn.Linear(3, 2)\n"
            f"p = emprune.io.save_pruned(m, {str(tmp_path / 'w.safetensors')!r})\n"
            "print(sorted(emprune.io.load_state_dict(p)))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['bias', 'weight']"


def test_xy_batches_need_inputs_and_the_error_says_so():
    model = _mlp()
    with pytest.raises(TypeError, match=r"inputs=lambda b: b\[0\]"):
        emprune.prune(model, criterion="wanda", calibration=_loader())
    assert _masks(model) == []  # nothing applied on failure


def test_inputs_picks_x_out_of_xy_batches():
    a, b = _mlp(), _mlp()
    rep = emprune.prune(a, criterion="wanda", calibration=_loader(), inputs=lambda batch: batch[0])
    emprune.prune(b, criterion="wanda", calibration=[x for x, _ in _loader()])
    assert all(torch.equal(p, q) for p, q in zip(_masks(a), _masks(b)))
    assert 0 < rep.sparsity < 1
    # a Wanda score differs from magnitude only through the inputs: the batches did reach the model
    c = _mlp()
    emprune.prune(c, criterion="magnitude")
    assert any(not torch.equal(p, q) for p, q in zip(_masks(a), _masks(c)))


def test_loss_fn_gets_the_whole_batch_with_inputs():
    seen = []

    def loss_fn(model, batch):
        seen.append(type(batch).__name__)
        x, y = batch
        return nn.functional.cross_entropy(model(x), y)

    rep = emprune.prune(_mlp(), criterion="taylor", calibration=_loader(), inputs=lambda b: b[0],
                        loss_fn=loss_fn)
    assert seen and set(seen) == {"list"} and rep.sparsity > 0


class _Scaled(nn.Module):
    """A model with a keyword argument, to show mapping batches reaching ``model(**batch)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls: list[float] = []

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls.append(scale)
        return self.lin(x * scale)


def test_batch_containers_reach_the_model_as_documented():
    x = torch.randn(4, 8)
    for batch, expected in ((x, 1.0), ((x, 3.0), 3.0), ([x, 2.0], 2.0), ({"x": x, "scale": 5.0}, 5.0)):
        model = _Scaled()
        emprune.prune(model, criterion="wanda", calibration=[batch])
        assert model.calls == [expected]
    model = _Scaled()  # inputs= may build any container, here a mapping from a tuple
    emprune.prune(model, criterion="wanda", calibration=[(x, "label")], inputs=lambda b: {"x": b[0], "scale": 7.0})
    assert model.calls == [7.0]


def test_bad_inputs_option():
    with pytest.raises(ValueError, match="inputs must be a function"):
        emprune.prune(_mlp(), criterion="wanda", calibration=_loader(), inputs=0)
    with pytest.raises(ValueError, match="inputs=.*calibration="):
        emprune.prune(_mlp(), inputs=lambda b: b[0])


def test_pruning_a_masked_model_warns_and_reports():
    model = _mlp()
    first = emprune.prune(model, beta=0.9)
    assert "already_masked" not in first.extra
    with pytest.warns(UserWarning, match=r"2 target\(s\) already carry a reversible mask .*restore"):
        second = emprune.prune(model, beta=0.9)
    assert second.extra["already_masked"] == ["0", "2"]
    assert second.sparsity > first.sparsity  # the masks did stack: that is what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emprune.restore(model)
        emprune.prune(model, beta=0.9)  # dense again: no warning
        emprune.make_permanent(model)
        again = emprune.prune(model, beta=0.9)  # folded in: pruning on top is the user's intent
    assert "already_masked" not in again.extra
