"""Targets: the one place that turns a description of "what to prune" into modules.

A *target* is a module whose ``weight`` is pruned (masks) or held at zero (healing). Every job
resolves its ``targets`` option here, with one reading of it:

* ``None``: every ``nn.Linear`` and convolution of the model;
* ``"mlp"`` / ``"linear"`` (:data:`TARGET_SETS`) on a decoder LM of a known layout
  (:mod:`.layouts`): the MLP projections (the paper's protocol), or every projection of every
  decoder block, in block order; embeddings and the LM head never;
* any other string: a regular expression searched in the module names (modules without a
  ``weight`` tensor are passed over);
* a sequence of names: exactly those modules (each must exist and have a weight);
* a callable ``(name, module) -> bool``: those it accepts.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence, Union

from torch import Tensor, nn

from ..core.checks import one_of
from .layouts import block_linears, decoder_layers, find_layout, layout_or_none

TargetSpec = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]
#: the decoder target sets: the MLP projections of every block, or every projection (attention too)
TARGET_SETS = ("mlp", "linear")
PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def select_targets(model: nn.Module, targets: TargetSpec = None) -> dict[str, nn.Module]:
    """Modules whose ``weight`` is pruned, by full name, for ``targets`` (see the module doc).

    Raises ``ValueError`` (one line) for names not in the model, a target without a weight, or
    a description that matches nothing."""
    named = dict(model.named_modules())
    if targets is None:
        out = {n: m for n, m in named.items() if isinstance(m, PRUNABLE)}
    elif isinstance(targets, str) and targets in TARGET_SETS and layout_or_none(model) is not None:
        out = block_targets(model, targets)
    elif isinstance(targets, str):
        pat = re.compile(targets)
        out = {n: m for n, m in named.items() if n and pat.search(n) and has_weight(m)}
    elif callable(targets):
        out = {n: m for n, m in named.items() if n and targets(n, m)}
    else:
        missing = [n for n in targets if n not in named]
        if missing:
            raise ValueError(f"targets not found in the model: {missing[:5]}")
        out = {n: named[n] for n in targets}
    for n, m in out.items():
        if not has_weight(m):
            raise ValueError(f"target {n} ({type(m).__name__}) has no weight tensor")
    if not out:
        raise ValueError(f"no target modules matched {targets!r}")
    return out


def block_targets(model: nn.Module, targets: str = "mlp") -> dict[str, nn.Module]:
    """Full name -> target layer for every decoder block, in block order (``"mlp"`` or
    ``"linear"``; GPT-2's ``Conv1D`` layers outside :func:`~.layouts.linear_view`)."""
    one_of("targets", targets, TARGET_SETS)
    layout = find_layout(model)
    names = {mod: name for name, mod in model.named_modules()}
    out: dict[str, nn.Module] = {}
    for block in decoder_layers(model):
        for mod in block_linears(block, targets, layout).values():  # type: ignore[arg-type]
            out[names[mod]] = mod
    return out


def has_weight(m: nn.Module) -> bool:
    """Whether ``m`` holds a ``weight`` tensor (a target needs one)."""
    return isinstance(getattr(m, "weight", None), Tensor)
