"""Hidden channels: remove channels of the residual stream of a causal LM (``hidden_size``).

A residual channel ``j`` lives in the embedding (column ``j``), the LM head (column ``j``, tied to
the embedding or not), every projection that reads the stream (input column ``j`` of q/k/v and
gate/up), every projection that writes it (output row ``j`` of o_proj and down_proj, with its
bias) and every norm over the stream (entry ``j`` of its gain). :func:`keep_channels` keeps the
channels ``idx`` of all of them, in place, and sets ``hidden_size``.

The norms: an RMSNorm divides by the root mean square over the ``d`` channels; with ``d'`` channels
the mean is over ``d'``. Where the removed channels were zero that makes every normalised output
``sqrt(d / d')`` too small, so each gain is multiplied by ``sqrt(d / d')`` (for Gemma's
``1 + w`` gains, ``1 + w``) and the norms' ``eps`` by ``d / d'`` (:func:`_scale_eps`). Gemma also scales the embedding by ``sqrt(hidden_size)``: the kept
embedding columns are multiplied by ``sqrt(d / d')`` so that the reloaded model (which scales by
``sqrt(d')``) embeds as before; with a tied LM head the final norm's gain is divided by the same
factor. The result: a model whose removed channels were zero everywhere computes what it
computed (to float rounding), and reloads from its config alone (one ``hidden_size``,
``head_dim`` pinned). :func:`zero_channels` makes such a model (the masked reference).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from . import surgery as rm
from .depth import text_config
from .layouts import decoder_layers

#: projections that read the stream (input columns) and that write it (output rows), per block
READS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITES = ("self_attn.o_proj", "mlp.down_proj")


#: in a block with ``pre_feedforward_layernorm`` (Gemma-2/3), these norms sit on the write path
WRITE_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")

@dataclass
class Residual:
    """Every module that touches the residual stream of one causal LM."""

    embed: nn.Embedding
    head: nn.Linear | None  # None: tied to the embedding
    reads: list[nn.Linear] = field(default_factory=list)
    writes: list[nn.Linear] = field(default_factory=list)
    norms: list[nn.Module] = field(default_factory=list)  # the block norms over the stream
    final_norm: nn.Module | None = None
    #: the norms on the write path (Gemma-2/3's post-attention / post-feedforward norms normalise a
    #: block's output before it is added to the stream); the others read the stream
    write_norms: list[nn.Module] = field(default_factory=list)

    def read_norms(self) -> list[nn.Module]:
        """The norms whose outputs are the stream as the projections (and the head) read it."""
        return [n for n in self.norms if not any(n is w for w in self.write_norms)] + [self.final_norm]

    @property
    def d(self) -> int:
        return int(self.embed.weight.shape[1])

    def params_per_channel(self) -> int:
        """Parameters that leave with one channel."""
        n = self.embed.weight.shape[0]
        if self.head is not None:
            n += self.head.weight.shape[0]
        n += sum(m.weight.shape[0] for m in self.reads)
        n += sum(m.weight.shape[1] + (1 if m.bias is not None else 0) for m in self.writes)
        n += len(self.norms) + (1 if self.final_norm is not None else 0)
        return int(n)

    def channel_norms(self) -> Tensor:
        """L2 norm of every weight attached to each channel (float64 ``[d]``): the ``magnitude``
        score of a channel (norm gains excluded: scales, not connections)."""
        sq = self.embed.weight.detach().double().square().sum(0)
        if self.head is not None:
            sq = sq + self.head.weight.detach().double().square().sum(0)
        for m in self.reads:
            sq = sq + m.weight.detach().double().square().sum(0)
        for m in self.writes:
            sq = sq + m.weight.detach().double().square().sum(1)
        return sq.sqrt().cpu()


def _submodule(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def residual(model: nn.Module) -> Residual:
    """The modules of ``model``'s residual stream (LLaMA-family layouts; ``NotImplementedError``,
    one line, for anything it cannot account for)."""
    embed = model.get_input_embeddings()
    d = int(embed.weight.shape[1])
    head = model.get_output_embeddings()
    tied = head is None or head.weight is embed.weight
    out = Residual(embed, None if tied else head)
    for i, block in enumerate(decoder_layers(model)):
        for path in READS + WRITES:
            mod = _submodule(block, path)
            if not isinstance(mod, nn.Linear):
                raise NotImplementedError(f"block {i}: no Linear {path} (hidden channels need the LLaMA layout)")
            (out.reads if path in READS else out.writes).append(mod)
        sandwich = hasattr(block, "pre_feedforward_layernorm")  # Gemma-2/3: pre- and post-norms
        for name, mod in block.named_children():  # the norms over the stream sit on the block itself
            w = getattr(mod, "weight", None)
            if name not in ("self_attn", "mlp") and isinstance(w, Tensor) and w.dim() == 1 and w.numel() == d:
                out.norms.append(mod)
                if sandwich and name in WRITE_NORMS:
                    out.write_norms.append(mod)
    base = getattr(model, "model", None)
    out.final_norm = getattr(base, "norm", None)
    if out.final_norm is None or getattr(out.final_norm, "weight", None) is None:
        raise NotImplementedError("no final norm with a gain at model.model.norm")
    if any(m.in_features != d for m in out.reads) or any(m.out_features != d for m in out.writes):
        raise NotImplementedError("projections whose widths do not match hidden_size")
    return out


@torch.no_grad()
def gain_offset(norm: nn.Module) -> float:
    """1.0 for a norm whose gain is ``1 + weight`` (Gemma), 0.0 for ``weight`` (LLaMA), found by
    running it on a probe."""
    w = norm.weight
    x = torch.linspace(-1.0, 1.0, w.numel(), dtype=torch.float32, device=w.device)[None].to(w.dtype)
    y = norm(x).double()
    rms = x.double().square().mean().add(float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))).sqrt()
    base = (x.double() / rms)[0]
    plain = base * w.double()
    return 0.0 if torch.allclose(y[0], plain, atol=1e-3, rtol=1e-3) else 1.0


def _scale_gain(norm: nn.Module, idx: Tensor, factor: float) -> None:
    off = gain_offset(norm)
    w = norm.weight
    new = (w.detach().double()[idx.to(w.device)] + off) * factor - off
    norm.weight = nn.Parameter(new.to(w.dtype).contiguous(), requires_grad=w.requires_grad)
    for attr in ("hidden_size", "normalized_shape", "dim"):
        if isinstance(getattr(norm, attr, None), int):
            setattr(norm, attr, int(idx.numel()))


def embed_scale(embed: nn.Module) -> float:
    """The factor the embedding multiplies its rows by (Gemma: ``sqrt(hidden_size)``; else 1)."""
    s = getattr(embed, "embed_scale", None)
    return float(s) if s is not None else 1.0


@torch.no_grad()
def keep_channels(model: nn.Module, keep: Sequence[int]) -> list[int]:
    """Keep residual channels ``keep`` (sorted distinct indices), remove the others everywhere,
    fold the norms' and the embedding scale's change (see the module docstring) and set
    ``hidden_size`` (``head_dim`` pinned). Returns the removed indices."""
    r = residual(model)
    d = r.d
    idx = sorted({int(i) for i in keep})
    if not idx or idx[0] < 0 or idx[-1] >= d:
        raise ValueError(f"keep at least one channel index in [0, {d}), got {list(keep)[:8]}")
    removed = [i for i in range(d) if i not in set(idx)]
    if not removed:
        return []
    ix = torch.tensor(idx, dtype=torch.long)
    d2 = len(idx)
    factor = math.sqrt(d / d2)
    scaled = embed_scale(r.embed) != 1.0
    c_e = factor if scaled else 1.0
    ew = r.embed.weight
    r.embed.weight = nn.Parameter((ew.detach()[:, ix.to(ew.device)] * c_e).contiguous(), requires_grad=ew.requires_grad)
    r.embed.embedding_dim = d2
    if scaled:  # what the reloaded config gives: sqrt(new hidden_size)
        r.embed.embed_scale.fill_(math.sqrt(d2))
        if hasattr(r.embed, "scalar_embed_scale"):
            r.embed.scalar_embed_scale = math.sqrt(d2)
    head = model.get_output_embeddings()
    if r.head is not None:
        rm.keep_in(r.head, ix)
    elif head is not None:  # tied: the same Parameter, re-pointed at the new embedding weight
        head.weight = r.embed.weight
        head.in_features = d2
    for m in r.reads:
        rm.keep_in(m, ix)
    for m in r.writes:
        rm.keep_out(m, ix)
    for norm in r.norms:
        _scale_gain(norm, ix, factor)
    _scale_gain(r.final_norm, ix, factor / c_e if r.head is None else factor)
    cfg = text_config(model)
    hd = int(getattr(cfg, "head_dim", 0) or cfg.hidden_size // cfg.num_attention_heads)
    cfg.head_dim = hd
    cfg.hidden_size = d2
    _scale_eps(model, cfg, d / d2)
    for block in decoder_layers(model):
        for mod in block.modules():
            if isinstance(getattr(mod, "hidden_size", None), int) and getattr(mod, "hidden_size") == d:
                mod.hidden_size = d2
    return removed


def _scale_eps(model: nn.Module, cfg: Any, ratio: float) -> None:
    """``rms_norm_eps`` times ``d / d'`` in the config and in every norm: with the gains'
    ``sqrt(d / d')`` this makes a stream norm over ``d'`` channels compute exactly what it computed
    over ``d`` when the removed channels were zero. The per-head norms (q_norm / k_norm, over
    ``head_dim``) share the config's eps and get it too: a change of ~1e-7 relative on inputs of
    unit scale, so that the model in memory and the reloaded one agree."""
    old = getattr(cfg, "rms_norm_eps", None)
    if not isinstance(old, float):
        return
    cfg.rms_norm_eps = old * ratio
    for mod in model.modules():
        for attr in ("eps", "variance_epsilon"):
            v = getattr(mod, attr, None)
            if isinstance(v, float) and v == old:
                setattr(mod, attr, old * ratio)


@torch.no_grad()
def zero_channels(model: nn.Module, removed: Sequence[int]) -> None:
    """The masked reference of :func:`keep_channels`: channels ``removed`` of the stream made zero
    everywhere (embedding columns and the rows of every projection that writes the stream), so
    nothing flows through them; the model still has every channel."""
    r = residual(model)
    ix = torch.tensor(sorted(set(int(i) for i in removed)), dtype=torch.long)
    r.embed.weight[:, ix.to(r.embed.weight.device)] = 0
    for m in r.writes:
        m.weight[ix.to(m.weight.device)] = 0
        if m.bias is not None:
            m.bias[ix.to(m.bias.device)] = 0


def describe(r: Residual) -> dict[str, Any]:
    """Counts of the modules found (for reports and tests)."""
    return {"hidden_size": r.d, "tied_head": r.head is None, "reads": len(r.reads), "writes": len(r.writes),
            "norms": len(r.norms) + 1}
