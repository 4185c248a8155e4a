"""Scores of whole decoder blocks (``emprune shrink --units layers``).

* ``influence``: ShortGPT's block influence (Men et al., 2024, arXiv 2403.03853),
  ``BI = 1 - mean over tokens of cos(x_in, x_out)``, one calibration pass with a hook on every
  block (float64 accumulation). A block that barely turns the residual stream scores near 0.
* ``loss``: the measured calibration-loss increase when the block alone is skipped (the
  sensitivity the width default already measures for neurons; :func:`~emprune.decide.sensitivity.block_sensitivity`).
* ``magnitude``: the L2 norm of the block's parameters (no data; a weak score, for comparison).

:data:`LAYER_SCORES` names them for the options; the loss lives in ``decide`` because it runs the
model with blocks skipped, as the neuron sensitivity does.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..structure.layouts import decoder_layers

#: block scores ``--layer-score`` takes (``loss``: see the module docstring)
LAYER_SCORES = ("loss", "influence", "magnitude")


def _hidden_in(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_hooked(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any],
               handles: list[Any]) -> None:
    """Run ``batches`` through ``model`` in eval mode (``forward(model, batch)``) with the hooks
    ``handles`` were registered for, then remove them and restore the mode, also on error."""
    was = model.training
    model.eval()
    try:
        for b in batches:
            forward(model, b)
    finally:
        model.train(was)
        for h in handles:
            h.remove()


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any]) -> Tensor:
    """ShortGPT's block influence of every decoder block, ``1 - mean cos(x_in, x_out)`` over the
    tokens of ``batches`` (run with ``forward(model, batch)``); float64 ``[n_blocks]`` on the CPU."""
    layers = decoder_layers(model)
    total = torch.zeros(len(layers), dtype=torch.float64)
    count = [0] * len(layers)

    def hook(i: int) -> Callable:
        def run(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x, y = _hidden_in(args, kwargs).double(), _hidden_out(out).double()
            c = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
            total[i] += float(c.sum())
            count[i] += c.numel()
        return run

    run_hooked(model, batches, forward, [b.register_forward_hook(hook(i), with_kwargs=True)
                                         for i, b in enumerate(layers)])
    if min(count, default=0) == 0:
        raise ValueError("block influence needs calibration tokens that reach every block")
    return 1.0 - total / torch.tensor(count, dtype=torch.float64)
