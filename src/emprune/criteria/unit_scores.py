"""Unit scores: one non-negative float64 score per structural unit.

Plain functions ``(group, stats) -> Tensor[n]``, registered by name in the one criteria registry
(:mod:`emprune.criteria`, ``level="unit"``) beside the weight criteria:

* ``magnitude``: L2 norm of every weight attached to the unit (producer rows + consumer columns);
  for KAN nodes the paper's node score (max of mean |spline coef| in / out);
* ``activation``: ``||X_unit||_2 * ||W_out[:, unit]||_2`` over the calibration tokens (Wanda-sp);
* ``fluctuation``: FLAP's ``sum_j Var(X_j) * ||W_out[:, j]||^2`` over the unit's input features of
  the consumer (how much the output moves when the unit is replaced by its mean, which the bias
  compensation adds back);
* ``taylor``: ``|sum_tokens sum_unit dL/dX_j * X_j|`` (first-order loss change, as in the paper's
  GPT-2 head experiment).

:class:`UnitStats` gathers what they need in one pass: per input feature of every consumer, the
float64 sum, sum of squares and (for Taylor) sum of gradient x activation.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..structure.units import KANGroup, UnitGroup
from . import registry


class UnitStats:
    """Input statistics of the groups' consumers, gathered by forward (and backward) hooks,
    keyed by group name (so statistics of one model serve a deep copy of it).

    Per consumer input feature (per channel for a Conv consumer): ``s1`` = sum x, ``s2`` =
    sum x^2, ``tx`` = sum dL/dx * x, over ``count`` tokens/positions; all float64."""

    def __init__(self, groups: list[UnitGroup], taylor: bool = False) -> None:
        self.groups = groups
        self.taylor = taylor
        self.s1: dict[str, Tensor] = {}
        self.s2: dict[str, Tensor] = {}
        self.tx: dict[str, Tensor] = {}
        self.count: dict[str, int] = {}
        self.frozen: set[str] = set()
        self._handles: list[Any] = []

    def __enter__(self) -> "UnitStats":
        for g in self.groups:
            self._handles.append(g.consumer.register_forward_pre_hook(self._hook(g.name, g.consumer)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, key: str, mod: nn.Module) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if key in self.frozen:
                return
            x = args[0]
            flat = _features(x.detach(), mod).double()
            if key not in self.s1:
                self.s1[key] = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
                self.s2[key] = torch.zeros_like(self.s1[key])
                self.tx[key] = torch.zeros_like(self.s1[key])
                self.count[key] = 0
            self.s1[key] += flat.sum(0)
            self.s2[key] += flat.square().sum(0)
            self.count[key] += flat.shape[0]
            if self.taylor and x.requires_grad:
                def grad_hook(g: Tensor, xd: Tensor = x.detach()) -> None:
                    self.tx[key] += _features(g.detach() * xd, mod).double().sum(0)
                x.register_hook(grad_hook)

        return hook

    def mean(self, g: UnitGroup) -> Tensor:
        k = g.name
        if k not in self.s1:
            raise RuntimeError(f"{g.name}: no calibration statistics (consumer never called)")
        return self.s1[k] / max(self.count[k], 1)

    def sq(self, g: UnitGroup) -> Tensor:
        return self.s2[g.name]

    def var(self, g: UnitGroup) -> Tensor:
        k = g.name
        n = max(self.count[k], 1)
        m = self.s1[k] / n
        return (self.s2[k] / n - m * m).clamp_min(0)


def _features(x: Tensor, mod: nn.Module) -> Tensor:
    """Inputs as ``[rows, features]``: per channel for a Conv consumer, per feature otherwise."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        return x.transpose(0, 1).reshape(x.shape[1], -1).T
    return x.reshape(-1, x.shape[-1])


def _per_unit(g: UnitGroup, v: Tensor) -> Tensor:
    """Sum a per-feature vector over each unit's ``block`` consumer columns."""
    return v.reshape(g.n, -1).sum(1)


def _need(stats: UnitStats | None, g: UnitGroup, what: str) -> UnitStats:
    if stats is None:
        raise ValueError(f"criterion {what!r} needs calibration data (calibration=...)")
    return stats


def magnitude(g: UnitGroup, stats: UnitStats | None = None) -> Tensor:
    """Norm of the unit's weights; the paper's node score for KAN nodes."""
    if isinstance(g, KANGroup):
        return g.node_scores()
    return g.weight_norms()


def activation(g: UnitGroup, stats: UnitStats | None = None) -> Tensor:
    """Wanda-sp / FLAP-style: ``||X_unit|| * ||W_out[:, unit]||``."""
    st = _need(stats, g, "activation")
    return _per_unit(g, st.sq(g)).sqrt() * g.out_norms()


def fluctuation(g: UnitGroup, stats: UnitStats | None = None) -> Tensor:
    """FLAP's fluctuation metric ``sum_j Var(X_j) ||W_out[:, j]||^2`` over the unit's features."""
    st = _need(stats, g, "fluctuation")
    w = g.consumer.weight.detach().double()
    if w.dim() == 2:
        col = w.square().sum(0)
    else:
        col = w.transpose(0, 1).reshape(w.shape[1], -1).square().sum(1)
    if isinstance(g, KANGroup):
        col = g.out_norms().square()
    return _per_unit(g, st.var(g).to(col.device) * col)


def taylor(g: UnitGroup, stats: UnitStats | None = None) -> Tensor:
    """First-order Taylor: ``|sum over tokens and the unit's features of dL/dX * X|``."""
    st = _need(stats, g, "taylor")
    if not st.taylor:
        raise ValueError("taylor scores need gradients: collect statistics with taylor=True")
    return _per_unit(g, st.tx[g.name]).abs()


def unit_scores(groups: list[UnitGroup], criterion: str, stats: UnitStats | None) -> list[Tensor]:
    """Scores of every group by the named unit criterion of the registry (validated, float64,
    CPU, finite)."""
    score = registry.get(criterion, level="unit")
    out = []
    for g in groups:
        s = score(g, stats).detach().double().cpu()
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"{g.name}: non-finite {criterion} unit scores")
        out.append(s)
    return out


def collect(model: nn.Module, groups: list[UnitGroup], batches: Iterable[Any], *, taylor: bool = False,
            loss_fn: Callable[[nn.Module, Any], Tensor] | None = None, forward: Callable | None = None) -> UnitStats:
    """Run ``batches`` through ``model`` with hooks on the groups' consumers (eval mode).

    ``forward(model, batch)`` runs one batch (default: ``model(batch)`` for a tensor, the first
    element of a tuple/list, ``model(**batch)`` for a dict). With ``taylor=True``, ``loss_fn(model,
    batch)`` must return a scalar loss; it is back-propagated and the gradients discarded."""
    if taylor and loss_fn is None:
        raise ValueError("taylor scores need loss_fn=(model, batch) -> scalar loss")
    was = model.training
    model.eval()
    stats = UnitStats(groups, taylor)
    run = forward or _default_forward
    try:
        with stats:
            for b in batches:
                if taylor:
                    with torch.enable_grad():
                        loss = loss_fn(model, b)
                        loss.backward()
                    model.zero_grad(set_to_none=True)
                else:
                    with torch.no_grad():
                        run(model, b)
    finally:
        model.train(was)
    return stats


def _default_forward(model: nn.Module, b: Any) -> Any:
    if isinstance(b, dict):
        return model(**b)
    if isinstance(b, (tuple, list)):
        return model(b[0])
    return model(b)
