"""Input Hessians ``H = 2 X^T X`` of target Linears, gathered by forward hooks (beside
:class:`~emprune.criteria.wanda.InputNorms`, which gathers only the diagonal's square roots).

The OBS update (:func:`emprune.obs.obs_prune`, SparseGPT's reconstruction) needs the full
``in_features x in_features`` matrix of each pruned Linear. The layer-wise LLM loop attaches
:meth:`InputHessians.observe` to the targets of one decoder block at a time and
:meth:`InputHessians.release` drops them once the block is pruned, so only one block's
Hessians are held (one ``in^2`` float64 matrix per Linear).

Linears fed the same input tensor in one forward call (q/k/v, gate/up) share the product
``X^T X`` of that call: it is computed once and added to each of their sums.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from torch import Tensor, nn

from ..core.obs import HessianSum
from .base import TargetStats


class InputHessians(TargetStats):
    """``2 sum_t x_t x_t^T`` (float64) of the inputs of every hooked Linear, summed over all
    forward passes made while :meth:`observe` is active (:attr:`sums`: target name -> sum)."""

    name = "hessian"

    def __init__(self) -> None:
        super().__init__()
        # (input tensor, its version, its X^T X) of the last call: holding the tensor keeps its
        # identity unique (a freed tensor's address could be reused by the next batch's input)
        self._last: tuple[Tensor, int, Tensor] | None = None

    @property
    def sums(self) -> dict[str, HessianSum]:
        return self.data

    def check_targets(self, targets: Mapping[str, nn.Module]) -> None:
        for name, mod in targets.items():
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"{name}: input Hessians are gathered for Linear layers only, got {type(mod).__name__}")

    def after_observe(self) -> None:
        self._last = None

    def add(self, name: str, module: nn.Module, inputs: tuple, _out: object) -> None:
        x = inputs[0]
        s = self.data.get(name)
        if s is None:
            s = self.data[name] = HessianSum(x.shape[-1], device=x.device)
        if self._last is not None and self._last[0] is x and self._last[1] == x._version:
            prod = self._last[2]  # the same input as the Linear hooked just before (q/k/v, gate/up)
        else:
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            prod = x2.T @ x2  # float32; added to the float64 sum in place (each entry widened exactly)
            self._last = (x, x._version, prod)
        step = max(1, (1 << 23) // max(1, prod.shape[1]))  # rows widened at once: 64 MB of float64
        for r in range(0, prod.shape[0], step):  # a float64 copy of a whole 11,008-wide product would be 1 GB
            s.sum[r : r + step] += prod[r : r + step].to(s.sum.device)
        s.tokens += x.numel() // x.shape[-1]

    def hessian(self, name: str) -> Tensor:
        """``2 X^T X`` (float64) of target ``name``."""
        if name not in self.data:
            raise KeyError(f"no input Hessian was gathered for {name}")
        return self.data[name].value

    def take(self, name: str) -> Tensor:
        """``2 X^T X`` (float64) of target ``name``, handed over: scaled in place and forgotten
        here, so the caller owns the only copy (and may overwrite it)."""
        if name not in self.data:
            raise KeyError(f"no input Hessian was gathered for {name}")
        return self.data.pop(name).sum.mul_(2.0)

    def release(self, names: Iterable[str] | None = None) -> None:
        """Forget the Hessians of ``names`` (all when None)."""
        self.drop(names)
        self._last = None
