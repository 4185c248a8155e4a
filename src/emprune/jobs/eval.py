"""Perplexity of a causal LM over non-overlapping windows (the WikiText-2 protocol of Wanda/SparseGPT).

The loss is computed without ever holding the logits of a whole batch: the base model runs to
hidden states, and the output head plus cross-entropy run over chunks of positions
(:data:`LOGITS_CHUNK` logits at a time), so memory stays near the model's own size even for
large vocabularies (SmolLM2: 49,152 entries per position, 1.6 GB of float32 logits for one
batch of 8 x 1024 tokens). Models whose forward does more than ``head(base(x))`` (logit
soft-capping, scaling, ...) are detected on a short probe and evaluated whole, as before.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.runtime import input_device

#: logits materialised at once in the chunked loss, in entries (positions x vocabulary):
#: 2**24 float32 entries = 64 MB
LOGITS_CHUNK = 1 << 24


class NonFiniteLossError(ValueError):
    """The model's loss is NaN or infinite: its outputs (usually its weights) are not finite."""


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    progress: bool = True,
    chunk_entries: int = LOGITS_CHUNK,
) -> dict[str, Any]:
    """``exp`` of the mean next-token NLL over all predicted tokens of ``tokens // seqlen`` windows.

    Windows do not overlap and each starts without context, so every window predicts
    ``seqlen - 1`` tokens; a trailing partial window is dropped (the standard protocol).
    Works for models on one device and for accelerate-dispatched models (inputs go to the
    embedding's device). ``chunk_entries`` bounds the logits held at once (see module doc).
    A non-finite loss raises :class:`NonFiniteLossError` (naming the windows and any
    non-finite weights) rather than reporting a perplexity of nan.
    Returns ``ppl``, ``nll`` (mean), ``tokens_evaluated``, ``windows``, ``seqlen``, ``seconds``,
    ``loss`` (``chunked`` or ``full``: how the loss was computed).
    """
    from tqdm.auto import tqdm

    tokens = tokens.reshape(-1)
    n_windows = tokens.numel() // seqlen
    if seqlen < 2 or n_windows == 0:
        raise ValueError(f"need seqlen >= 2 and at least one window: {tokens.numel()} tokens, seqlen={seqlen}")
    if batch_size < 1 or chunk_entries < 1:
        raise ValueError(f"batch_size and chunk_entries must be >= 1, got {batch_size}, {chunk_entries}")
    windows = tokens[: n_windows * seqlen].reshape(n_windows, seqlen)
    dev = input_device(model)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    nll_sum = 0.0
    try:
        loss_fn, how = _loss_function(model, windows[0, : min(seqlen, 32)].to(dev), chunk_entries)
        for i in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress, unit="batch"):
            batch = windows[i : i + batch_size].to(dev)
            loss = loss_fn(batch)
            if not math.isfinite(loss):
                raise NonFiniteLossError(_non_finite_message(model, loss, i, i + batch.shape[0] - 1))
            nll_sum += loss
    finally:
        model.train(was_training)
    n_pred = n_windows * (seqlen - 1)
    nll = nll_sum / n_pred
    return {
        "ppl": math.exp(nll) if nll < 700 else math.inf,
        "nll": nll,
        "tokens_evaluated": n_pred,
        "windows": n_windows,
        "seqlen": seqlen,
        "seconds": time.perf_counter() - start,
        "loss": how,
    }


def _full_loss(model: nn.Module) -> Callable[[Tensor], float]:
    """Summed next-token NLL of a batch from the model's full logits (all positions at once)."""
    def loss(batch: Tensor) -> float:
        logits = model(batch, use_cache=False).logits
        # float32 loss even for half-precision models; summed, divided once at the end
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               batch[:, 1:].reshape(-1).to(logits.device), reduction="sum").item()
    return loss


def _base_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(base model, output head)`` of a transformers causal LM, or ``None`` if it has no such split."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(base, nn.Module) or base is model or not isinstance(head, nn.Module):
        return None
    return base, head


def _hidden(base: nn.Module, batch: Tensor) -> Tensor:
    out = base(input_ids=batch, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _loss_function(model: nn.Module, probe: Tensor, chunk_entries: int) -> tuple[Callable[[Tensor], float], str]:
    """The chunked loss where ``head(base(x))`` reproduces the model's logits on ``probe``
    (a few tokens), else the full-logits loss."""
    split = _base_and_head(model)
    if split is None or probe.numel() < 2:
        return _full_loss(model), "full"
    base, head = split
    try:
        full = model(probe[None], use_cache=False).logits.float()
        mine = head(_hidden(base, probe[None])).float()
    except (TypeError, AttributeError, ValueError):  # a base that takes other arguments
        return _full_loss(model), "full"
    scale = float(full.abs().nan_to_num(0.0, 0.0, 0.0).max()) + 1.0
    if mine.shape != full.shape or not torch.allclose(mine, full.to(mine.device), rtol=1e-4, atol=1e-4 * scale,
                                                      equal_nan=True):
        return _full_loss(model), "full"

    def loss(batch: Tensor) -> float:
        return _chunked_nll(head, _hidden(base, batch), batch, chunk_entries)

    return loss, "chunked"


def _chunked_nll(head: nn.Module, hidden: Tensor, batch: Tensor, chunk_entries: int) -> float:
    """Summed next-token NLL of ``batch`` from its final hidden states, the output head run over
    chunks of positions (at most ``chunk_entries`` logits at once), the loss in float32."""
    h = hidden[:, :-1]  # positions that predict a next token
    h = h.reshape(-1, h.shape[-1])
    targets = batch[:, 1:].reshape(-1)
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    rows = max(1, chunk_entries // vocab)
    total = 0.0
    for s in range(0, h.shape[0], rows):
        logits = head(h[s : s + rows]).float()
        total += F.cross_entropy(logits, targets[s : s + rows].to(logits.device), reduction="sum").item()
    return total


#: config fields that make a model's logits more than ``head(base(x))``: a model streamed from
#: disk, never whole in memory, cannot be checked on a probe, so these are refused
_LOGIT_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


@torch.no_grad()
def perplexity_streamed(disk: Any, tokens: Tensor, seqlen: int, batch_size: int = 1, progress: bool = True,
                        chunk_entries: int = LOGITS_CHUNK) -> dict[str, Any]:
    """:func:`perplexity` of a model streamed from disk (:class:`~emprune.models.stream.DiskModel`),
    block by block: every window runs through block 0, then every window through block 1, ...
    (each block read once; the hidden states of all windows are held, or spill to disk:
    :func:`~emprune.models.layerwise.buffer`), then the final norm and the chunked loss per batch
    of ``batch_size`` windows. The same calls as the in-memory path over batches of
    ``batch_size``: the same perplexity. Models whose logits are more than ``head(norm(h))``
    (soft-capping, scaling) are refused (``NotImplementedError``)."""
    from tqdm.auto import tqdm

    from ..models.layerwise import passed_through, run_blocks

    model = disk.model
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    extra = [k for k in _LOGIT_EXTRAS if getattr(text, k, None) not in (None, 1, 1.0)]
    split = _base_and_head(model)
    if extra or split is None:
        raise NotImplementedError(f"perplexity from disk needs logits = head(norm(h)); this model has "
                                  f"{', '.join(extra) or 'no base/head split'}: load it in memory")
    tokens = tokens.reshape(-1)
    n_windows = tokens.numel() // seqlen
    if seqlen < 2 or n_windows == 0:
        raise ValueError(f"need seqlen >= 2 and at least one window: {tokens.numel()} tokens, seqlen={seqlen}")
    windows = tokens[: n_windows * seqlen].reshape(n_windows, seqlen)
    start = time.perf_counter()
    hidden = run_blocks(model, windows, disk, batch_size, progress)
    disk.load_outer(head=True)
    base, head = split
    feed: dict[str, Tensor] = {}
    nll_sum = 0.0
    with passed_through(disk.layers, feed):
        for i in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress, unit="batch"):
            batch = windows[i : i + batch_size].to(disk.device)
            feed["hidden"] = hidden[i : i + batch_size]
            loss = _chunked_nll(head, _hidden(base, batch), batch, chunk_entries)
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"the loss is {loss} on windows {i}-{i + batch.shape[0] - 1}: the model's "
                                         "outputs are not finite")
            nll_sum += loss
    disk.release_outer()
    n_pred = n_windows * (seqlen - 1)
    nll = nll_sum / n_pred
    return {"ppl": math.exp(nll) if nll < 700 else math.inf, "nll": nll, "tokens_evaluated": n_pred,
            "windows": n_windows, "seqlen": seqlen, "seconds": time.perf_counter() - start, "loss": "chunked",
            "offload": "disk"}


def _non_finite_message(model: nn.Module, loss: float, first: int, last: int) -> str:
    """Say which windows gave a non-finite loss and which weights (if any) are not finite."""
    bad = [n for n, p in model.named_parameters()
           if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all())]
    where = (f"; non-finite weights in {', '.join(bad[:3])}" + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
             if bad else "; all weights are finite (overflow in the forward pass? try --dtype float32)")
    return f"the loss is {loss} on windows {first}-{last}: the model's outputs are not finite{where}"
