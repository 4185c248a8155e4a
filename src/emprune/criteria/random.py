"""Random scores: a seeded baseline (same seed and name, same scores)."""
from __future__ import annotations

import zlib

import torch
from torch import Tensor, nn

from .base import Criterion, weight_of


class Random(Criterion):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def __call__(self, name: str, module: nn.Module) -> Tensor:
        w = weight_of(module, name)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.rand(w.shape, generator=g, dtype=torch.float32).to(w.device)

    def options(self) -> dict[str, int]:
        return {"seed": self.seed}
