"""Perplexity of a causal LM over non-overlapping windows (the WikiText-2 protocol of Wanda/SparseGPT)."""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .models import input_device


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """``exp`` of the mean next-token NLL over all predicted tokens of ``tokens // seqlen`` windows.

    Windows do not overlap and each starts without context, so every window predicts
    ``seqlen - 1`` tokens; a trailing partial window is dropped (the standard protocol).
    Works for models on one device and for accelerate-dispatched models (inputs go to the
    embedding's device). Returns ``ppl``, ``nll`` (mean), ``tokens_evaluated``, ``windows``, ``seconds``.
    """
    from tqdm.auto import tqdm

    tokens = tokens.reshape(-1)
    n_windows = tokens.numel() // seqlen
    if seqlen < 2 or n_windows == 0:
        raise ValueError(f"need seqlen >= 2 and at least one window: {tokens.numel()} tokens, seqlen={seqlen}")
    windows = tokens[: n_windows * seqlen].reshape(n_windows, seqlen)
    dev = input_device(model)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nll_sum = 0.0
    try:
        for i in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress, unit="batch"):
            batch = windows[i : i + batch_size].to(dev)
            logits = model(batch, use_cache=False).logits
            # float32 loss even for half-precision models; summed, then divided once at the end
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                batch[:, 1:].reshape(-1).to(logits.device),
                reduction="sum",
            )
            nll_sum += loss.item()
    finally:
        model.train(was_training)
    n_pred = n_windows * (seqlen - 1)
    nll = nll_sum / n_pred
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "tokens_evaluated": n_pred,
        "windows": n_windows,
        "seqlen": seqlen,
        "seconds": time.perf_counter() - start,
    }
