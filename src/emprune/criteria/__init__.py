"""Importance criteria: one small module each (see :mod:`.base` for the protocol)."""
from __future__ import annotations

from typing import Callable, Union

from torch import Tensor, nn

from .base import Criterion, Custom, run_model
from .magnitude import Magnitude
from .random import Random
from .taylor import Gradient, Taylor
from .wanda import Wanda

CriterionLike = Union[str, Criterion, Callable[[str, nn.Module], Tensor]]
NAMES = ("magnitude", "wanda", "taylor", "gradient", "random")

__all__ = ["Criterion", "Custom", "Magnitude", "Wanda", "Taylor", "Gradient", "Random",
           "get", "NAMES", "CriterionLike", "run_model"]


def get(spec: CriterionLike, *, loss_fn=None, seed: int = 0) -> Criterion:
    """A :class:`Criterion` from a name, an instance or a ``(name, module) -> scores`` callable."""
    if isinstance(spec, Criterion):
        return spec
    if isinstance(spec, str):
        key = spec.lower()
        if key == "magnitude":
            return Magnitude()
        if key == "wanda":
            return Wanda()
        if key == "taylor":
            return Taylor(loss_fn)
        if key == "gradient":
            return Gradient(loss_fn)
        if key == "random":
            return Random(seed)
        raise ValueError(f"unknown criterion {spec!r}; choose from {', '.join(NAMES)} or pass a callable")
    if callable(spec):
        return Custom(spec)
    raise TypeError(f"criterion must be a name, a Criterion or a callable, got {type(spec).__name__}")
