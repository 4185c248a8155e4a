"""The decoder layouts emprune can prune: where a causal LM keeps its blocks and which of their
layers are targets. This is the one place that knows model families.

Each :class:`Layout` names the path of the block list and, relative to a block, the layers of
the MLP (``--targets mlp``, the paper's protocol) and of the attention (``--targets linear``
adds them). A model gets the first layout whose block list exists and whose first block holds
all of those layers; everything else is refused with one line naming the supported layouts.

GPT-2 stores its projections as ``transformers.pytorch_utils.Conv1D``, whose weight is
``[in, out]`` (transposed). The pruning code works on output-unit rows, so :func:`linear_view`
swaps every targeted ``Conv1D`` for an equivalent ``nn.Linear`` (weight = the transposed view of
the same storage, same bias) for the duration and swaps the ``Conv1D`` back afterwards, with
the pruned weights in GPT-2's own layout: a saved folder is a stock GPT-2 checkpoint.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

#: the LLaMA family's attention projections (also OPT's, but for ``out_proj``)
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@dataclass(frozen=True)
class Layout:
    """Where one family of decoder LMs keeps its blocks and its target layers.

    ``blocks``: dotted path from the model to its ``nn.ModuleList`` of decoder blocks;
    ``mlp`` / ``attention``: the block's target layers (``nn.Linear``, or GPT-2's ``Conv1D``)
    by name relative to the block."""

    name: str
    family: str  # for messages and docs
    blocks: str
    mlp: tuple[str, ...]
    attention: tuple[str, ...]

    def names(self, targets: Literal["mlp", "linear"]) -> tuple[str, ...]:
        """The block's target layer names for ``targets`` (``mlp``, or ``linear`` = attention + mlp)."""
        return self.mlp if targets == "mlp" else self.attention + self.mlp

    def matches(self, block: nn.Module) -> bool:
        """Whether ``block`` holds every target layer of this layout."""
        return all(_is_target(_submodule(block, n)) for n in self.attention + self.mlp)


#: first match wins; LLaMA-like covers every model laid out as LLaMA (model.layers[i].self_attn.q/k/v/o_proj,
#: mlp.gate/up/down_proj), whatever its norms, biases or attention variant
LAYOUTS: tuple[Layout, ...] = (
    Layout("llama", "LLaMA-like (LLaMA, Mistral, Qwen2, Qwen3, Gemma-3, SmolLM2)", "model.layers",
           ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), (*_QKV, "self_attn.o_proj")),
    Layout("phi3", "Phi-3 (fused qkv_proj, gate_up_proj)", "model.layers",
           ("mlp.gate_up_proj", "mlp.down_proj"), ("self_attn.qkv_proj", "self_attn.o_proj")),
    Layout("gpt2", "GPT-2 (transformer.h, Conv1D)", "transformer.h",
           ("mlp.c_fc", "mlp.c_proj"), ("attn.c_attn", "attn.c_proj")),
    Layout("opt", "OPT (model.decoder.layers, fc1/fc2)", "model.decoder.layers",
           ("fc1", "fc2"), (*_QKV, "self_attn.out_proj")),
)


def supported() -> str:
    """The supported layouts, for messages: ``LLaMA-like (...), Phi-3 (...), GPT-2 (...), OPT (...)``."""
    return ", ".join(lay.family for lay in LAYOUTS)


def find_layout(model: nn.Module) -> Layout:
    """The layout of ``model``; ``NotImplementedError`` (one line naming the supported layouts)
    if it has none of them."""
    for lay in LAYOUTS:
        blocks = _submodule(model, lay.blocks)
        if isinstance(blocks, nn.ModuleList) and len(blocks) and lay.matches(blocks[0]):
            return lay
    raise NotImplementedError(
        f"unsupported architecture {type(model).__name__}: no decoder blocks of a supported layout; "
        f"emprune prunes {supported()}")


def layout_or_none(model: nn.Module) -> Layout | None:
    """The layout of ``model``, or None where it has none of them."""
    try:
        return find_layout(model)
    except NotImplementedError:
        return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of ``model`` (``model.model.layers``, ``model.transformer.h``, ...)."""
    return _submodule(model, find_layout(model).blocks)  # type: ignore[return-value]


def block_linears(block: nn.Module, targets: Literal["mlp", "linear"] = "mlp",
                  layout: Layout | None = None) -> dict[str, nn.Module]:
    """Target layers of one decoder block, by name relative to the block, in the block's order.

    ``"mlp"``: the MLP projections (gate/up/down on LLaMA), as in the paper's LLM runs;
    ``"linear"``: the attention projections too. Embeddings and ``lm_head`` live outside the
    blocks and are never returned. ``layout``: found from the block's layers if not given.
    The layers are ``nn.Linear``, or GPT-2's ``Conv1D`` outside :func:`linear_view`."""
    if targets not in ("mlp", "linear"):
        raise ValueError(f"targets must be 'mlp' or 'linear', got {targets!r}")
    lay = layout or next((x for x in LAYOUTS if x.matches(block)), None)
    if lay is None or not lay.matches(block):
        raise NotImplementedError(
            f"block {type(block).__name__} does not hold the layers of a supported layout "
            f"({supported()})")
    wanted = set(lay.names(targets))
    return {n: m for n, m in block.named_modules() if n in wanted}


def require_layout(model: nn.Module, name: str, what: str) -> Layout:
    """``model``'s layout if it is ``name``; else ``NotImplementedError`` (one line) saying that
    ``what`` supports only that layout."""
    lay = find_layout(model)
    if lay.name != name:
        want = next(x.family for x in LAYOUTS if x.name == name)
        raise NotImplementedError(f"{what} supports {want} models only; {type(model).__name__} has the "
                                  f"{lay.family} layout (emprune prune supports it)")
    return lay


# ------------------------------------------------------------------ GPT-2's Conv1D


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - without transformers there is no Conv1D to meet
        return None
    return Conv1D


def _is_target(mod: nn.Module | None) -> bool:
    conv = _conv1d_type()
    return isinstance(mod, nn.Linear) or (conv is not None and isinstance(mod, conv))


def to_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, nn.Linear]]:
    """Replace every ``Conv1D`` target layer of ``model``'s blocks by an equivalent ``nn.Linear``
    in place; returns the swaps ``(parent, attribute, conv, linear)`` for :func:`to_conv1d`.

    The Linear's weight is the transposed view of the Conv1D's storage (no copy; row = output
    unit) and its bias the Conv1D's bias ``Parameter``. Models without Conv1D: no swaps."""
    conv_t = _conv1d_type()
    if conv_t is None:
        return []
    lay = find_layout(model)
    swaps = []
    for block in _submodule(model, lay.blocks):  # type: ignore[union-attr]
        for name in lay.names("linear"):
            conv = block.get_submodule(name)
            if not isinstance(conv, conv_t):
                continue
            if hasattr(conv, "_hf_hook"):
                raise NotImplementedError(f"{name} carries an accelerate hook (offloaded or dispatched per layer): "
                                          "load GPT-2 on one device and pass device=... instead")
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            w = conv.weight
            lin = nn.Linear(w.shape[0], w.shape[1], bias=False, device="meta", dtype=w.dtype)
            lin.weight = nn.Parameter(w.data.t(), requires_grad=w.requires_grad)
            lin.bias = conv.bias
            lin.train(conv.training)
            setattr(parent, attr, lin)
            swaps.append((parent, attr, conv, lin))
    return swaps


@torch.no_grad()
def to_conv1d(swaps: list[tuple[nn.Module, str, nn.Module, nn.Linear]]) -> None:
    """Undo :func:`to_linears`: put each Conv1D back, holding the Linear's (pruned) weight
    transposed into ``[in, out]`` and the Linear's bias, on the Linear's device."""
    for parent, attr, conv, lin in reversed(swaps):
        w = lin.weight.data
        if conv.weight.data.data_ptr() != w.data_ptr() or conv.weight.device != w.device:
            conv.weight.data = w.t().contiguous()  # the view was broken (moved or replaced): copy
        conv.bias = lin.bias
        setattr(parent, attr, conv)


@contextmanager
def linear_view(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with its Conv1D target layers seen as ``nn.Linear`` (rows = output units) inside
    the ``with`` block, and as Conv1D again, pruned weights included, after it (also on error).
    A no-op for models without Conv1D."""
    swaps = to_linears(model)
    try:
        yield model
    finally:
        to_conv1d(swaps)


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root``'s submodule at dotted ``path``, or None."""
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if not isinstance(obj, nn.Module):
            return None
    return obj  # type: ignore[return-value]
