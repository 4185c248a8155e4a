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

from contextlib import contextmanager
from functools import partial
from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..obs import HessianSum


class InputHessians:
    """``2 sum_t x_t x_t^T`` (float64) of the inputs of every hooked Linear, summed over all
    forward passes made while :meth:`observe` is active."""

    name = "hessian"

    def __init__(self) -> None:
        self.sums: dict[str, HessianSum] = {}
        # (input tensor, its version, its X^T X) of the last call: holding the tensor keeps its
        # identity unique (a freed tensor's address could be reused by the next batch's input)
        self._last: tuple[Tensor, int, Tensor] | None = None

    @contextmanager
    def observe(self, targets: Mapping[str, nn.Module]) -> Iterator[None]:
        """Hook ``targets`` (name -> Linear) for the duration of the ``with`` block."""
        for name, mod in targets.items():
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"{name}: input Hessians are gathered for Linear layers only, got {type(mod).__name__}")
        handles = [mod.register_forward_hook(partial(self._add, name)) for name, mod in targets.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._last = None

    def _add(self, name: str, module: nn.Module, inputs: tuple, _out: object) -> None:
        x = inputs[0]
        s = self.sums.get(name)
        if s is None:
            s = self.sums[name] = HessianSum(x.shape[-1], device=x.device)
        if self._last is not None and self._last[0] is x and self._last[1] == x._version:
            prod = self._last[2]  # the same input as the Linear hooked just before (q/k/v, gate/up)
        else:
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            prod = (x2.T @ x2).double()
            self._last = (x, x._version, prod)
        s.sum += prod.to(s.sum.device)
        s.tokens += x.numel() // x.shape[-1]

    def hessian(self, name: str) -> Tensor:
        """``2 X^T X`` (float64) of target ``name``."""
        if name not in self.sums:
            raise KeyError(f"no input Hessian was gathered for {name}")
        return self.sums[name].value

    def missing(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` no input was seen for."""
        return [n for n in names if n not in self.sums]

    def release(self, names: Iterable[str] | None = None) -> None:
        """Forget the Hessians of ``names`` (all when None)."""
        if names is None:
            self.sums = {}
        for n in names or ():
            self.sums.pop(n, None)
        self._last = None
