"""Physical removal: smaller ``nn.Linear`` / ``nn.Conv2d`` / ``nn.BatchNorm`` modules holding only
the kept output rows or input columns, and the bias compensation of removed inputs.

Every function replaces the parameters of the module *in place* (same module object, new smaller
tensors, updated ``in_features`` / ``out_features`` / ``*_channels`` attributes), so references
held elsewhere (hooks, PEFT, a parent's attribute) stay valid. ``idx`` is a sorted 1-D LongTensor
of the kept indices.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .layouts import decoder_layers


def _param(t: Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def keep_out(mod: nn.Module, idx: Tensor) -> None:
    """Keep output rows ``idx`` of a Linear (rows of ``weight`` and ``bias``) or output channels
    of a Conv (filters), a norm layer (affine parameters and running statistics)."""
    idx = idx.to(_dev(mod))
    if isinstance(mod, nn.Linear):
        mod.weight = _param(mod.weight[idx], mod.weight)
        if mod.bias is not None:
            mod.bias = _param(mod.bias[idx], mod.bias)
        mod.out_features = int(idx.numel())
    elif isinstance(mod, nn.modules.conv._ConvNd):
        if mod.groups != 1:
            raise NotImplementedError(f"grouped convolution {mod} is not supported (use torch-pruning)")
        mod.weight = _param(mod.weight[idx], mod.weight)
        if mod.bias is not None:
            mod.bias = _param(mod.bias[idx], mod.bias)
        mod.out_channels = int(idx.numel())
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        if mod.affine:
            mod.weight = _param(mod.weight[idx], mod.weight)
            mod.bias = _param(mod.bias[idx], mod.bias)
        if mod.running_mean is not None:
            mod.running_mean = mod.running_mean[idx].clone()
            mod.running_var = mod.running_var[idx].clone()
        mod.num_features = int(idx.numel())
    else:
        raise TypeError(f"cannot remove outputs of {type(mod).__name__}")


@torch.no_grad()
def keep_in(mod: nn.Module, idx: Tensor, block: int = 1) -> None:
    """Keep input columns of a Linear (``block`` consecutive columns per kept index: an attention
    head of ``head_dim`` columns, or a flattened conv channel of ``H*W`` features) or input
    channels of a Conv."""
    idx = idx.to(_dev(mod))
    if block > 1:
        idx = (idx[:, None] * block + torch.arange(block, device=idx.device)).reshape(-1)
    if isinstance(mod, nn.Linear):
        mod.weight = _param(mod.weight[:, idx], mod.weight)
        mod.in_features = int(idx.numel())
    elif isinstance(mod, nn.modules.conv._ConvNd):
        if mod.groups != 1:
            raise NotImplementedError(f"grouped convolution {mod} is not supported (use torch-pruning)")
        mod.weight = _param(mod.weight[:, idx], mod.weight)
        mod.in_channels = int(idx.numel())
    else:
        raise TypeError(f"cannot remove inputs of {type(mod).__name__}")


@torch.no_grad()
def zero_in(mod: nn.Module, removed: Tensor, block: int = 1) -> None:
    """The masked reference of :func:`keep_in`: zero the input columns of the removed units
    (the network then computes exactly what the shrunk network computes)."""
    removed = removed.to(_dev(mod))
    if block > 1:
        removed = (removed[:, None] * block + torch.arange(block, device=removed.device)).reshape(-1)
    mod.weight[:, removed] = 0


@torch.no_grad()
def compensate(mod: nn.Linear, removed: Tensor, mean_in: Tensor, block: int = 1) -> None:
    """FLAP's bias compensation: fold the removed inputs' mean contribution
    ``W[:, removed] @ mean_in[removed]`` into ``mod.bias`` (created as zeros if absent).

    ``mean_in``: mean of every input feature of ``mod`` over the calibration tokens. Call it
    *before* the columns are removed or zeroed."""
    if not isinstance(mod, nn.Linear):
        raise TypeError(f"bias compensation needs a Linear consumer, got {type(mod).__name__}")
    removed = removed.to(_dev(mod))
    if block > 1:
        removed = (removed[:, None] * block + torch.arange(block, device=removed.device)).reshape(-1)
    w = mod.weight
    shift = (w[:, removed].double() @ mean_in.to(w.device, torch.float64)[removed]).to(w.dtype)
    if mod.bias is None:
        mod.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                requires_grad=w.requires_grad)
    mod.bias += shift


def _dev(mod: nn.Module) -> torch.device:
    return next(mod.parameters()).device


def sync_config(model: nn.Module) -> None:
    """Record per-layer widths on the config (``emprune_shrunk``) and, where every layer has the
    same width, the stock fields (``intermediate_size``, ``num_attention_heads``,
    ``num_key_value_heads``; ``head_dim`` pinned) so that a plain transformers load works."""
    config = model.config
    text = getattr(config, "get_text_config", lambda: config)()
    layers = decoder_layers(model)
    hd = None
    inter, heads, kv = [], [], []
    for block in layers:
        mlp, attn = getattr(block, "mlp", None), getattr(block, "self_attn", None)
        inter.append(int(mlp.down_proj.in_features))
        hd = int(getattr(attn, "head_dim", 0) or text.head_dim)
        heads.append(int(attn.q_proj.out_features // hd))
        kv.append(int(attn.k_proj.out_features // hd))
    text.head_dim = hd
    shrunk = {"intermediate_sizes": inter, "num_attention_heads": heads, "num_key_value_heads": kv,
              "mlp_bias": any(getattr(b.mlp.down_proj, "bias", None) is not None for b in layers),
              "o_bias": any(getattr(b.self_attn.o_proj, "bias", None) is not None for b in layers)}
    if len(set(inter)) == 1:
        _set_valid(text, intermediate_size=inter[0])
    if len(set(heads)) == 1 and len(set(kv)) == 1:
        _set_valid(text, num_attention_heads=heads[0], num_key_value_heads=kv[0])
    shrunk["uniform"] = (text.intermediate_size == inter[0] and len(set(inter)) == 1
                         and text.num_attention_heads == heads[0] and text.num_key_value_heads == kv[0]
                         and len(set(heads)) == 1 and len(set(kv)) == 1)
    text.emprune_shrunk = shrunk


def _set_valid(config: Any, **fields: Any) -> bool:
    """Set stock config fields, reverting them if the config's own validation refuses the result
    (e.g. LlamaConfig wants ``hidden_size`` divisible by ``num_attention_heads``)."""
    old = {k: getattr(config, k) for k in fields}
    for k, v in fields.items():
        setattr(config, k, v)
    try:
        if hasattr(config, "validate"):
            config.validate()
    except Exception:  # noqa: BLE001 - transformers raises several error types here
        for k, v in old.items():
            setattr(config, k, v)
        return False
    return True
