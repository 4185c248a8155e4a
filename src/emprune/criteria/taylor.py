"""First-order Taylor (``|W * dL/dW|``) and gradient-saliency (``|dL/dW|``) scores.

Gradients of a user loss are accumulated over the calibration batches with
``torch.autograd.grad`` on the target weights only, with the model in eval mode: the
model's parameters, BatchNorm statistics and every ``.grad`` are left exactly as they were.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .base import Batch, Criterion, run_model, weight_of

LossFn = Callable[[nn.Module, Batch], Tensor]


def default_loss(model: nn.Module, batch: Batch) -> Tensor:
    """The model's own loss (Hugging Face models given ``labels``)."""
    out: Any = run_model(model, batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if not isinstance(loss, Tensor):
        raise ValueError("taylor/gradient criteria need loss_fn=(model, batch) -> scalar loss "
                         "(the model's output has no .loss)")
    return loss


class Taylor(Criterion):
    name = "taylor"
    needs_calibration = True

    def __init__(self, loss_fn: LossFn | None = None, *, times_weight: bool = True) -> None:
        self.loss_fn = loss_fn or default_loss
        self.times_weight = times_weight
        self.grads: dict[str, Tensor] = {}

    def prepare(self, model: nn.Module, targets: Mapping[str, nn.Module],
                calibration: Iterable[Batch] | None) -> None:
        super().prepare(model, targets, calibration)
        names = list(targets)
        weights = [targets[n].weight for n in names]
        flags = [w.requires_grad for w in weights]
        grads = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
        was_training = model.training
        model.eval()  # no BatchNorm statistics update, no dropout
        try:
            for w in weights:
                w.requires_grad_(True)
            n_batches = 0
            for batch in calibration:  # type: ignore[union-attr]
                loss = self.loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError("loss_fn must return a scalar tensor")
                gs = torch.autograd.grad(loss, weights, allow_unused=True)
                for acc, g in zip(grads, gs):
                    if g is not None:
                        acc += g.float()
                n_batches += 1
            if n_batches == 0:
                raise ValueError(f"{self.name}: calibration yielded no batches")
        finally:
            for w, f in zip(weights, flags):
                w.requires_grad_(f)
            model.train(was_training)
        self.grads = dict(zip(names, grads))

    @property
    def prepared(self) -> bool:
        return bool(self.grads)

    def __call__(self, name: str, module: nn.Module) -> Tensor:
        if name not in self.grads:
            raise KeyError(f"{self.name} has no gradient for {name}: call prepare() first")
        g = self.grads[name]
        return (weight_of(module, name).float() * g).abs() if self.times_weight else g.abs()

    def release(self, names: Iterable[str] | None = None) -> None:
        if names is None:
            self.grads = {}
        for n in names or ():
            self.grads.pop(n, None)

    def options(self) -> dict[str, Any]:
        return {"loss_fn": self.loss_fn, "times_weight": self.times_weight}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Gradient(Taylor):
    """Gradient saliency ``|dL/dW|`` (accumulated over the calibration batches)."""

    name = "gradient"

    def __init__(self, loss_fn: LossFn | None = None) -> None:
        super().__init__(loss_fn, times_weight=False)
