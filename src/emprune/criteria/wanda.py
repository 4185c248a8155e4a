"""Wanda: ``|W_ij| * ||X_j||_2``, the weight times the L2 norm of its input feature over the
calibration tokens (Sun et al., 2023).

Input norms are collected by :class:`InputNorms`: forward hooks summing the squares of every
input feature in float64. The same hooks serve :meth:`Wanda.prepare` (one pass of the
calibration batches through the model) and the layer-wise LLM loop
(:func:`emprune.llm.calibrate.prune_layerwise`, through :meth:`Wanda.observe`, block by block).
For convolutions the input feature is the input channel (norm over batch and space), mapped
through ``groups``.

Options damp input features with outlier norms (massive activations), whose Wanda scores
otherwise dominate every row they feed: ``norm="clip"`` caps each norm at ``clip`` times the
layer's median norm; ``norm="sqrt"`` uses ``sqrt(||X_j||)``.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from .base import Batch, Criterion, TargetStats, run_model, weight_of

NORMS = ("l2", "clip", "sqrt")


def _feature_sq(module: nn.Module, x: Tensor) -> Tensor:
    """Sum of squares of each input feature of ``module`` over everything else."""
    x = x.detach().double()
    if isinstance(module, nn.modules.conv._ConvNd):
        return x.transpose(0, 1).reshape(x.shape[1], -1).pow(2).sum(1)  # per channel
    return x.reshape(-1, x.shape[-1]).pow(2).sum(0)


class InputNorms(TargetStats):
    """Per-input-feature sums of squares ``sum_t x_tj^2`` (float64) of the inputs of target
    modules, accumulated over every forward pass made while :meth:`observe` is active
    (:attr:`sq`: target name -> sums)."""

    @property
    def sq(self) -> dict[str, Tensor]:
        return self.data

    def add(self, name: str, module: nn.Module, inputs: tuple, _out: object) -> None:
        s = _feature_sq(module, inputs[0])
        self.data[name] = s if name not in self.data else self.data[name] + s


class Wanda(Criterion):
    """``|W_ij| * f(||X_j||_2)``: ``f`` is the identity (``norm="l2"``, the paper's Wanda), a cap
    at ``clip`` x the layer's median norm (``"clip"``), or a square root (``"sqrt"``)."""

    name = "wanda"
    needs_calibration = True

    def __init__(self, norm: str = "l2", clip: float = 4.0) -> None:
        if norm not in NORMS:
            raise ValueError(f"wanda norm must be one of {', '.join(NORMS)}; got {norm!r}")
        if not clip > 0:
            raise ValueError(f"wanda clip must be > 0 (a multiple of the median norm); got {clip!r}")
        self.norm, self.clip = norm, float(clip)
        if norm != "l2":
            self.name = f"wanda-{norm}"
        self.stats = InputNorms()

    def options(self) -> dict[str, Any]:
        return {"norm": self.norm, "clip": self.clip} if self.norm == "clip" else {"norm": self.norm}

    @property
    def prepared(self) -> bool:
        return bool(self.stats.sq)

    def observe(self, targets: Mapping[str, nn.Module]):  # type: ignore[override]
        return self.stats.observe(targets)

    def set_norms(self, name: str, sq_sum: Tensor) -> None:
        """Provide a target's per-input-feature sum of squares directly (statistics gathered
        elsewhere, e.g. a run of your own)."""
        self.stats.sq[name] = sq_sum.detach().double()

    def prepare(self, model: nn.Module, targets: Mapping[str, nn.Module],
                calibration: Iterable[Batch] | None) -> None:
        super().prepare(model, targets, calibration)
        self.stats.drop()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.observe(targets):
                for batch in calibration:  # type: ignore[union-attr]
                    run_model(model, batch)
        finally:
            model.train(was_training)
        missing = self.stats.missing(targets)
        if missing:
            raise ValueError(f"wanda: calibration never reached {missing[:3]}{'...' if len(missing) > 3 else ''}")

    def input_norm(self, name: str, device: torch.device) -> Tensor:
        """``f(||X_j||_2)`` of target ``name`` as float32 on ``device`` (see the class)."""
        if name not in self.stats.sq:
            raise KeyError(f"wanda has no input statistics for {name}: call prepare() first")
        norm = self.stats.sq[name].sqrt().to(device=device, dtype=torch.float32)
        if self.norm == "clip":
            return norm.clamp(max=float(self.clip * norm.median()))
        if self.norm == "sqrt":
            return norm.sqrt()
        return norm

    def __call__(self, name: str, module: nn.Module) -> Tensor:
        w = weight_of(module, name)
        norm = self.input_norm(name, w.device)
        if isinstance(module, nn.modules.conv._ConvNd):
            g = module.groups
            per_group = norm.view(g, -1)  # [groups, in/groups]
            group_of_out = torch.arange(w.shape[0], device=w.device) // (w.shape[0] // g)
            scale = per_group[group_of_out].view(w.shape[0], w.shape[1], *([1] * (w.dim() - 2)))
        else:
            scale = norm.view(*([1] * (w.dim() - 1)), -1)
        return w.abs().float() * scale

    def release(self, names: Iterable[str] | None = None) -> None:
        self.stats.drop(names)
