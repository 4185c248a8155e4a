"""Masks on a model: zero pruned weights, reversibly or for good.

Masks are applied with ``torch.nn.utils.prune``'s reparametrisation (``weight_orig`` +
``weight_mask``), so a pruned model keeps training with its optimizer and round-trips its
``state_dict``; :func:`make_permanent` folds the masks in, :func:`restore` undoes them.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as tprune


def apply_mask(module: nn.Module, mask: Tensor, *, permanent: bool = False, name: str = "weight") -> None:
    """Zero ``module.<name>`` where ``mask`` is False.

    Reversible by default (``torch.nn.utils.prune.custom_from_mask``: masks of successive
    calls combine); ``permanent=True`` multiplies the weight in place instead."""
    w = getattr(module, name)
    if mask.shape != w.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != {name} shape {tuple(w.shape)}")
    if permanent:
        with torch.no_grad():
            (getattr(module, name + "_orig") if tprune.is_pruned(module) and hasattr(module, name + "_orig")
             else w).masked_fill_(~mask.to(w.device), 0)
        if hasattr(module, name + "_orig"):
            make_permanent(module)
        return
    tprune.custom_from_mask(module, name, mask.to(w.device))


def masked(model: nn.Module) -> Iterable[tuple[nn.Module, str]]:
    """``(module, tensor name)`` of every reversible mask in ``model``."""
    for m in model.modules():
        for h in list(m._forward_pre_hooks.values()):
            if isinstance(h, tprune.BasePruningMethod):
                yield m, h._tensor_name


def make_permanent(model: nn.Module) -> int:
    """Fold every reversible mask into its weight (``torch.nn.utils.prune.remove``); the
    model then holds plain parameters with zeros.  Returns the number of tensors folded."""
    done = list(masked(model))
    for m, name in done:
        tprune.remove(m, name)
    return len(done)


def restore(model: nn.Module) -> int:
    """Undo every un-committed (reversible) mask: each weight gets back its original
    values, as the same ``Parameter`` object (optimizers keep working).  Returns the number
    of tensors restored."""
    done = list(masked(model))
    for m, name in done:
        orig = getattr(m, name + "_orig")
        for k, h in list(m._forward_pre_hooks.items()):
            if isinstance(h, tprune.BasePruningMethod) and h._tensor_name == name:
                del m._forward_pre_hooks[k]
        delattr(m, name)
        del m._parameters[name + "_orig"]
        del m._buffers[name + "_mask"]
        m.register_parameter(name, orig)
    return len(done)


def already_masked(model: nn.Module, mods: dict[str, nn.Module]) -> list[str]:
    """Names of the targets ``mods`` whose weight carries a reversible (``weight_mask``) mask."""
    ids = {id(m) for m, name in masked(model) if name == "weight"}
    return [n for n, m in mods.items() if id(m) in ids]
