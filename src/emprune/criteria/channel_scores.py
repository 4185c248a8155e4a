"""Scores of the residual channels of a causal LM (``emprune shrink --units hidden``).

* ``activation`` (Minitron's embedding-channel importance, arXiv 2408.11796, in L2 form): for
  channel ``j``, ``sqrt(sum over the stream's norms and the calibration tokens of y_j^2)``, ``y``
  the outputs of every norm over the stream (what the projections read, and Gemma's post-norms,
  what the blocks write) and of the final norm; float64.
* ``magnitude``: the L2 norm of every weight attached to the channel (embedding and head columns,
  the columns of the projections that read the stream, the rows of those that write it).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..structure.hidden import residual
from .block_scores import run_hooked

#: channel scores ``--hidden-score`` takes
HIDDEN_SCORES = ("activation", "magnitude")


@torch.no_grad()
def channel_activation(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any]) -> Tensor:
    """``sqrt(sum y_j^2)`` over the outputs ``y`` of the norms that read the stream (every block's
    pre-norms and the final norm: the stream as the projections and the head see it) and the
    tokens of ``batches`` (run with ``forward(model, batch)``); float64 ``[hidden_size]`` on the CPU.

    Gemma-2/3's post-norms are left out: they normalise what a block writes, with gains that put
    99.9 % of the summed energy of Gemma-3-270M in their outputs, so the sum would rank channels by
    what the blocks write, not by what is read (measured: that ranking removed channels nearly as
    badly as a random choice, benchmarks/results/shrink_depth.md)."""
    r = residual(model)
    total = torch.zeros(r.d, dtype=torch.float64)
    seen = [0]

    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        y = out[0] if isinstance(out, (tuple, list)) else out
        total.add_(y.detach().double().reshape(-1, y.shape[-1]).square().sum(0).cpu())
        seen[0] += 1

    run_hooked(model, batches, forward, [m.register_forward_hook(hook) for m in r.read_norms()])
    if not seen[0]:
        raise ValueError("channel activation needs calibration tokens that reach the model's norms")
    return total.sqrt()


def channel_scores(model: nn.Module, how: str, batches: Iterable[Any] | None,
                   forward: Callable[[nn.Module, Any], Any]) -> Tensor:
    """The residual channels' scores by ``how`` (:data:`HIDDEN_SCORES`)."""
    if how == "magnitude":
        return residual(model).channel_norms()
    if how != "activation":
        raise ValueError(f"hidden score must be one of {', '.join(HIDDEN_SCORES)}, got {how!r}")
    if batches is None:
        raise ValueError("hidden score 'activation' needs calibration tokens")
    return channel_activation(model, batches, forward)
