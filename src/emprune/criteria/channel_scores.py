"""Scores of the residual channels of a causal LM (``emprune shrink --units hidden``).

* ``activation-magnitude`` (the default): ``sqrt(activation_j * magnitude_j)``, the geometric
  mean of the two below. A channel matters when the stream carries signal in it *and* the weights
  that embed, read and write it are large; either alone misleads. Gemma-3-270M, perplexity on
  WikiText-2 / python-docs / GPL-3 (2,048 tokens each; dense 50 / 28 / 38) with 608 of 640
  channels kept: 53 / 34 / 43 against 100 / 56 / 76 (``activation``) and 72 / 37 / 44
  (``magnitude``); with 544 kept: 236 / 113 / 115 against 313 / 151 / 201 and 501 / 351 / 332
  (a first comparison; benchmarks/results/shrink_depth.md has the rows at 544 on 4,096 tokens).
  Its scores are not heavy-tailed (``N_eff`` 529 of 640 on Gemma-3-270M, 509 of 576 on
  SmolLM2-135M), so EMP's raw count applies.
* ``activation`` (Minitron's embedding-channel importance, arXiv 2408.11796, in L2 form): for
  channel ``j``, ``sqrt(sum over the norms that read the stream and the calibration tokens of
  y_j^2)``, ``y`` the outputs of every block's pre-norms and of the final norm; float64. Heavy-tailed
  (massive-activation channels): ``N_eff`` 377 of 640 on Gemma-3-270M, 274 of 576 on SmolLM2-135M.
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
HIDDEN_SCORES = ("activation-magnitude", "activation", "magnitude")
#: the scores that read calibration activations
NEEDS_TOKENS = ("activation-magnitude", "activation")


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
    if how not in NEEDS_TOKENS:
        raise ValueError(f"hidden score must be one of {', '.join(HIDDEN_SCORES)}, got {how!r}")
    if batches is None:
        raise ValueError(f"hidden score {how!r} needs calibration tokens")
    act = channel_activation(model, batches, forward)
    if how == "activation":
        return act
    return (act * residual(model).channel_norms()).sqrt()
