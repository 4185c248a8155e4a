"""Magnitude: ``|W|`` (the classic criterion; EMP's paper default for MLPs and CNNs)."""
from __future__ import annotations

from torch import Tensor, nn

from .base import Criterion, weight_of


class Magnitude(Criterion):
    name = "magnitude"

    def __call__(self, name: str, module: nn.Module) -> Tensor:
        return weight_of(module, name).abs()
