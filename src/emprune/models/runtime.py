"""Where a model runs and what it prints while loading: device placement (one device, or
accelerate's dispatch) and a switch for the loading / saving progress bars of transformers."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def quiet_progress(quiet: bool = True) -> Iterator[None]:
    """Silence the progress bars of transformers and huggingface_hub ("Loading weights",
    "Writing model shards", downloads) and the GGUF de-quantisation bar, restoring the previous
    state afterwards. Does nothing for ``quiet=False``."""
    if not quiet:
        yield
        return
    from functools import partial

    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # also huggingface_hub's bars
    gguf_mod = None
    try:  # the GGUF loader uses tqdm directly rather than transformers' switchable wrapper
        import transformers.modeling_gguf_pytorch_utils as gguf_mod
    except ImportError:  # pragma: no cover - without the gguf package
        pass
    saved_tqdm = getattr(gguf_mod, "tqdm", None)
    if saved_tqdm is not None:
        gguf_mod.tqdm = partial(saved_tqdm, disable=True)
    try:
        yield
    finally:
        if saved_tqdm is not None:
            gguf_mod.tqdm = saved_tqdm
        if was_on:
            hf_logging.enable_progress_bar()


def place(model: nn.Module, device_map: str | dict | torch.device) -> nn.Module:
    """Move a CPU model to one device, or dispatch it with accelerate (``"auto"`` or a dict)."""
    if isinstance(device_map, torch.device) or (
        isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential")
    ):
        return model.to(device_map)
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules)
    return dispatch_model(model, device_map=device_map)

def input_device(model: nn.Module) -> torch.device:
    """Device that token ids must be on: that of the input embedding.

    For accelerate-dispatched models the embedding may be offloaded (weights on ``meta``); its
    hook then moves inputs itself, and the device in ``hf_device_map`` (or CPU) is used.
    """
    emb = model.get_input_embeddings()
    dev = emb.weight.device
    if dev.type != "meta":
        return dev
    device_map = getattr(model, "hf_device_map", None) or {}
    for name, where in device_map.items():
        if "embed" in name and where not in ("cpu", "disk"):
            return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
    return torch.device("cpu")
