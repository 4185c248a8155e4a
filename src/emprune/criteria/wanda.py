"""Wanda: ``|W_ij| * ||X_j||_2``, the weight times the L2 norm of its input feature over the
calibration tokens (Sun et al., 2023).

Input norms are collected with forward hooks during :meth:`Wanda.prepare` (float64 sums of
squares).  For convolutions the input feature is the input channel (norm over batch and
space), mapped through ``groups``.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from .base import Batch, Criterion, run_model, weight_of


def _feature_sq(module: nn.Module, x: Tensor) -> Tensor:
    """Sum of squares of each input feature of ``module`` over everything else."""
    x = x.detach().double()
    if isinstance(module, nn.modules.conv._ConvNd):
        return x.transpose(0, 1).reshape(x.shape[1], -1).pow(2).sum(1)  # per channel
    return x.reshape(-1, x.shape[-1]).pow(2).sum(0)


class Wanda(Criterion):
    name = "wanda"
    needs_calibration = True

    def __init__(self) -> None:
        self.sq: dict[str, Tensor] = {}

    @property
    def prepared(self) -> bool:
        return bool(self.sq)

    def set_norms(self, name: str, sq_sum: Tensor) -> None:
        """Provide a target's per-input-feature sum of squares directly (used by layer-wise
        LLM calibration, which collects it block by block)."""
        self.sq[name] = sq_sum.detach().double()

    def prepare(self, model: nn.Module, targets: Mapping[str, nn.Module],
                calibration: Iterable[Batch] | None) -> None:
        super().prepare(model, targets, calibration)
        self.sq = {}
        handles = []
        for name, mod in targets.items():
            def hook(m: nn.Module, inputs: tuple, _out: object, name: str = name) -> None:
                s = _feature_sq(m, inputs[0])
                self.sq[name] = s if name not in self.sq else self.sq[name] + s
            handles.append(mod.register_forward_hook(hook))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in calibration:  # type: ignore[union-attr]
                    run_model(model, batch)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        missing = [n for n in targets if n not in self.sq]
        if missing:
            raise ValueError(f"wanda: calibration never reached {missing[:3]}{'...' if len(missing) > 3 else ''}")

    def __call__(self, name: str, module: nn.Module) -> Tensor:
        w = weight_of(module, name)
        if name not in self.sq:
            raise KeyError(f"wanda has no input statistics for {name}: call prepare() first")
        norm = self.sq[name].sqrt().to(device=w.device, dtype=torch.float32)
        if isinstance(module, nn.modules.conv._ConvNd):
            g = module.groups
            per_group = norm.view(g, -1)  # [groups, in/groups]
            group_of_out = torch.arange(w.shape[0], device=w.device) // (w.shape[0] // g)
            scale = per_group[group_of_out].view(w.shape[0], w.shape[1], *([1] * (w.dim() - 2)))
        else:
            scale = norm.view(*([1] * (w.dim() - 1)), -1)
        return w.abs().float() * scale

    def release(self) -> None:
        self.sq = {}
