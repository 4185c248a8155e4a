"""Depth: remove whole decoder blocks of a causal LM, or skip them for a measurement.

:func:`keep_blocks` deletes blocks from the model's block list *in place* (the same
``nn.ModuleList`` object, so references held elsewhere stay valid) and leaves a stock model:
``num_hidden_layers``, the per-layer lists of the config (``layer_types``: Gemma-3's sliding /
full pattern, Qwen2/3's sliding windows; ``no_rope_layers``; emprune's own per-layer widths) and
every attention's ``layer_idx`` (the slot of its keys and values in the KV cache) all follow the
kept blocks. A depth-only result therefore loads with a plain
``AutoModelForCausalLM.from_pretrained`` and generates with a cache.

:func:`skipped` is the masked reference: inside the ``with`` block the named blocks pass their
input through unchanged (their ``forward`` replaced by the identity, nothing deleted), which is
what the model computes once they are removed; the loss-based block scores are measured that way.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from torch import nn

from .layouts import decoder_layers

#: config fields holding one entry per decoder block (subset with the kept blocks)
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")
#: emprune's per-layer widths (``config.emprune_shrunk``), one entry per block
SHRUNK_LISTS = ("intermediate_sizes", "num_attention_heads", "num_key_value_heads")


def text_config(model: nn.Module) -> Any:
    """The config that describes the decoder (``get_text_config()`` of a multimodal config)."""
    config = model.config
    return getattr(config, "get_text_config", lambda: config)()


def check_keep_blocks(n: int, keep: Sequence[int]) -> list[int]:
    """``keep`` as sorted distinct block indices in ``[0, n)``, at least one (else ``ValueError``)."""
    idx = sorted({int(i) for i in keep})
    if not idx:
        raise ValueError("at least one decoder block must be kept")
    if idx[0] < 0 or idx[-1] >= n:
        raise ValueError(f"block indices must lie in [0, {n}), got {idx}")
    return idx


def keep_blocks(model: nn.Module, keep: Sequence[int]) -> list[int]:
    """Keep decoder blocks ``keep`` (indices into today's block list), delete the others, and
    make the config and the attention cache slots agree. Returns the removed indices."""
    layers = decoder_layers(model)
    n = len(layers)
    idx = check_keep_blocks(n, keep)
    removed = [i for i in range(n) if i not in set(idx)]
    if not removed:
        return []
    kept = [layers[i] for i in idx]
    for i in reversed(range(n)):
        del layers[i]
    layers.extend(kept)
    for j, block in enumerate(layers):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    cfg = text_config(model)
    _subset_config(cfg, idx, n)
    return removed


def _subset_config(cfg: Any, idx: list[int], n: int) -> None:
    """The config's per-layer fields after keeping blocks ``idx`` of ``n``."""
    cfg.num_hidden_layers = len(idx)
    for name in PER_LAYER_FIELDS:
        v = getattr(cfg, name, None)
        if isinstance(v, (list, tuple)) and len(v) == n:
            setattr(cfg, name, [v[i] for i in idx])
    mwl = getattr(cfg, "max_window_layers", None)
    if isinstance(mwl, int) and not isinstance(mwl, bool):  # Qwen2/3: blocks below it use full attention
        cfg.max_window_layers = sum(1 for i in idx if i < mwl)
    shr = getattr(cfg, "emprune_shrunk", None)
    if isinstance(shr, dict):
        for name in SHRUNK_LISTS:
            v = shr.get(name)
            if isinstance(v, list) and len(v) == n:
                shr[name] = [v[i] for i in idx]


def _identity(hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
    return hidden_states


@contextmanager
def skipped(model: nn.Module, blocks: Sequence[int]) -> Iterator[nn.Module]:
    """``model`` with decoder blocks ``blocks`` passing their input through unchanged inside the
    ``with`` block (restored afterwards, also on error); the block list, the config and the
    weights are never touched."""
    layers = decoder_layers(model)
    chosen = [layers[i] for i in sorted(set(blocks))]
    had = [("forward" in vars(b), vars(b).get("forward")) for b in chosen]
    try:
        for b in chosen:
            b.forward = _identity
        yield model
    finally:
        for b, (own, fwd) in zip(chosen, had):
            if own:
                b.forward = fwd
            else:
                del b.forward
