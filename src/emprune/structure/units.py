"""Structural units: groups of weights that come and go together.

A :class:`UnitGroup` is one place in a network where ``n`` units can be removed: the outputs of
one or more *producers* (Linear rows, Conv filters, the BatchNorm that follows) and the matching
input columns of one *consumer*. Removing unit ``j`` deletes all of them, so the network stays
well formed and computes exactly what it computed with the consumer's columns of ``j`` zeroed
(:meth:`UnitGroup.zero`, the masked reference every test compares against).

Kinds:

* ``mlp``: the intermediate neurons of a LLaMA-family MLP (rows of gate/up, columns of down);
* ``heads``: the query heads of an attention module, GQA-aware (see :class:`HeadGroup`);
* ``layers``: the decoder blocks of a causal LM, one group whose units are whole blocks
  (:class:`LayerGroup`; removal in :mod:`.depth`);
* ``hidden``: the channels of a causal LM's residual stream, one group (:class:`HiddenGroup`;
  removal in :mod:`.hidden`: embedding, LM head, every projection and norm);
* ``neurons``: hidden neurons between two Linears of a plain chain (MLP);
* ``channels``: Conv output channels (+ the BatchNorm after them) feeding a Conv or, through
  ``Flatten``, a Linear;
* ``kan``: hidden nodes between two B-spline KAN layers (parameters ``base [out, in]`` and
  ``coef [out, in, c]``, as in ``benchmarks/small_models/kan_nodes.py``).

Width grid: an MLP group's kept widths can be held to a grid (:attr:`MLPGroup.multiple` ``m``:
multiples of ``m`` and the full width, :func:`grid_widths`), e.g. for quantised kernels whose rows
come in blocks of 32 or 256; :meth:`UnitGroup.realised` gives the nearest allowed width and
:meth:`UnitGroup.widths` all of them, so allocators can step on the grid. Heads are whole units
already (their own rounding is the GQA structure); other kinds have no grid.

Plain chains are found by walking the leaf modules in registration order (``nn.Sequential``
stacks such as VGG or an MLP); networks with residual connections need a graph tracer (the
optional ``torch-pruning`` package), not this walk.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..core import rule
from . import depth, hidden
from . import surgery as rm
from .layouts import decoder_layers, layout_or_none, require_layout

KINDS = ("mlp", "heads", "layers", "hidden", "neurons", "channels", "kan")
#: the kinds of a decoder LM (the rest are found in plain chains)
LM_KINDS = ("mlp", "heads", "layers", "hidden")


def grid_widths(n: int, multiple: int = 1) -> list[int]:
    """The widths a group of ``n`` units may keep on a grid of ``multiple``: the multiples of
    ``multiple`` up to ``n``, and ``n`` itself (the dense width, always allowed), ascending.
    ``multiple=1``: every width ``1..n``; ``n < multiple``: ``[n]`` only (the group stays dense)."""
    if n < 1:
        return []
    m = max(1, int(multiple))
    return [*range(m, n, m), n]


def nearest_width(k: int, n: int, multiple: int = 1) -> int:
    """The width of :func:`grid_widths` ``(n, multiple)`` nearest to ``k`` (clamped to
    ``[1, n]`` first); ties keep more. Non-decreasing in ``k``; ``multiple=1``: the clamp alone."""
    k = max(1, min(int(k), n))
    m = max(1, int(multiple))
    lo = k // m * m  # the largest multiple <= k (0: none)
    if lo == k:
        return k
    hi = min(lo + m, n)  # the next allowed width above k: a multiple or n
    if lo == 0:
        return hi
    return hi if hi - k <= k - lo else lo


@dataclass(eq=False)
class UnitGroup:
    """Base class: ``n`` units whose inputs reach ``consumer`` in ``block`` consecutive columns each."""

    name: str
    kind: str
    consumer: nn.Module
    block: int = 1
    layer: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------ to override
    @property
    def n(self) -> int:
        raise NotImplementedError

    def producers(self) -> list[nn.Module]:
        """Modules whose outputs are the units (rows / filters / norm channels)."""
        raise NotImplementedError

    def _remove(self, idx: Tensor) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ shared
    def check_keep(self, keep: Tensor) -> Tensor:
        """Validate a boolean keep mask over the ``n`` units; return the sorted kept indices."""
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != (self.n,):
            raise ValueError(f"{self.name}: keep must be a bool tensor of shape ({self.n},), "
                             f"got {getattr(keep, 'dtype', type(keep).__name__)} {tuple(getattr(keep, 'shape', ()))}")
        if not bool(keep.any()):
            raise ValueError(f"{self.name}: at least one unit must be kept")
        return keep.nonzero().squeeze(1).cpu()

    def remove(self, keep: Tensor) -> None:
        """Physically remove the units where ``keep`` is False (smaller modules, in place)."""
        idx = self.check_keep(keep)
        if idx.numel() == self.n:
            return
        self._remove(idx)

    def zero(self, keep: Tensor) -> None:
        """Masked reference: zero the consumer's input columns of the removed units."""
        self.check_keep(keep)
        rm.zero_in(self.consumer, (~keep).nonzero().squeeze(1).cpu(), self.block)

    def compensate(self, keep: Tensor, mean_in: Tensor) -> None:
        """Fold the removed units' mean contribution into the consumer's bias (FLAP)."""
        self.check_keep(keep)
        rm.compensate(self.consumer, (~keep).nonzero().squeeze(1).cpu(), mean_in, self.block)

    def out_norms(self) -> Tensor:
        """L2 norm of each unit's consumer columns (float64, ``[n]``)."""
        w = self.consumer.weight.detach().double()
        if w.dim() == 2:  # Linear: [out, n*block]
            return w.reshape(w.shape[0], self.n, -1).square().sum((0, 2)).sqrt()
        return w.transpose(0, 1).reshape(self.n, -1).square().sum(1).sqrt()  # Conv: [out, n, kh, kw]

    def weight_norms(self) -> Tensor:
        """L2 norm of every weight attached to each unit: producer rows and consumer columns."""
        sq = self.out_norms().square()
        for p in self.producers():
            if isinstance(p, nn.modules.batchnorm._BatchNorm):
                continue  # scale parameters, not connections
            w = p.weight.detach().double()
            sq = sq + w.reshape(self.n, -1).square().sum(1)
        return sq.sqrt()

    def params_per_unit(self) -> int:
        """Parameters that leave with one unit (producer rows incl. bias, norm affine, consumer columns)."""
        total = 0
        for p in self.producers():
            total += sum(t.numel() for t in p.parameters(recurse=False)) // max(self._rows(p), 1)
        cw = self.consumer.weight
        total += cw.numel() // self.n
        return total

    def _rows(self, p: nn.Module) -> int:
        return self.n

    #: the grid of the kept widths (see :class:`MLPGroup`); 1 (no grid) for every other kind
    multiple = 1

    def realised(self, k: int, grid: bool = True) -> int:
        """Units actually kept when ``k`` are asked for (clamped to ``[1, n]``; heads round;
        MLP widths go to the nearest width of their grid unless ``grid=False``)."""
        return max(1, min(int(k), self.n))

    def widths(self) -> list[int]:
        """Every width :meth:`realised` can give, ascending (what an allocator steps on)."""
        return sorted({self.realised(k) for k in range(1, self.n + 1)})

    def keep_mask(self, scores: Tensor, k: int, grid: bool = True) -> Tensor:
        """The keep mask of :meth:`realised` ``(k, grid)`` units by ``scores``: the top ones, ties
        broken by lower index (heads: GQA-consistent, see :class:`HeadGroup`)."""
        return rule.topk_mask(scores, self.realised(k, grid))

    def conform(self, keep: Tensor, scores: Tensor) -> Tensor:
        """A keep mask chosen freely (a global decision) made valid for this group: at least one
        unit (the best by ``scores``); heads rounded to the GQA structure."""
        return keep if bool(keep.any()) else rule.topk_mask(scores, 1)

    def params(self) -> int:
        """Parameters attached to the group's units now."""
        return self.n * self.params_per_unit()


@dataclass(eq=False)
class MLPGroup(UnitGroup):
    """LLaMA-family MLP neurons: rows of ``gate_proj`` / ``up_proj``, columns of ``down_proj``.

    ``multiple``: the grid of the widths a decision keeps (:func:`grid_widths`: multiples of it
    and the full width; 1: any width). :meth:`realised` goes to the nearest one (ties keep more),
    :meth:`conform` moves a freely chosen mask there; :meth:`remove` itself takes any mask."""

    mlp: nn.Module | None = None
    multiple: int = 1

    @property
    def n(self) -> int:
        return self.mlp.down_proj.in_features

    def realised(self, k: int, grid: bool = True) -> int:
        return nearest_width(k, self.n, self.multiple if grid else 1)

    def widths(self) -> list[int]:
        return grid_widths(self.n, self.multiple)

    def conform(self, keep: Tensor, scores: Tensor) -> Tensor:
        """A mask chosen freely, moved to the nearest width of the grid (that many of the best
        units by ``scores``) when its count is off the grid."""
        c = int(keep.sum())
        return keep if c >= 1 and self.realised(c) == c else self.keep_mask(scores, c)

    def producers(self) -> list[nn.Module]:
        return [m for m in (getattr(self.mlp, "gate_proj", None), self.mlp.up_proj) if m is not None]

    def _remove(self, idx: Tensor) -> None:
        for p in self.producers():
            rm.keep_out(p, idx)
        rm.keep_in(self.mlp.down_proj, idx)
        if hasattr(self.mlp, "intermediate_size"):
            self.mlp.intermediate_size = int(idx.numel())


@dataclass(eq=False)
class HeadGroup(UnitGroup):
    """Query heads of one attention module (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``).

    GQA design: the unit is a query head, and every key/value group keeps the same number of
    query heads (the layer's ``num_key_value_groups`` stays one integer). A key/value head
    leaves only when all the query heads sharing it leave; every remaining group keeps the same
    count ``g'``, which may be below the original group size. :func:`head_keep_mask` builds masks of that form; anything
    else is refused. ``head_dim`` never changes."""

    attn: nn.Module | None = None
    head_dim: int = 0
    n_kv: int = 0
    mode: str = "query"  # how a count becomes a mask: see :func:`head_keep_mask`

    @property
    def n(self) -> int:
        return self.attn.o_proj.in_features // self.head_dim

    @property
    def group_size(self) -> int:
        return self.n // self.n_kv

    def producers(self) -> list[nn.Module]:
        return [self.attn.q_proj]

    def params_per_unit(self) -> int:
        q = self.attn.q_proj
        per = sum(t.numel() for t in q.parameters(recurse=False)) // self.n
        return per + self.attn.o_proj.weight.numel() // self.n

    def params(self) -> int:
        a = self.attn
        return sum(t.numel() for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj) for t in m.parameters(recurse=False))

    def kv_keep(self, keep: Tensor) -> tuple[Tensor, int]:
        """Kept key/value heads and the new group size for a query-head mask (validated)."""
        per_group = keep.reshape(self.n_kv, self.group_size).sum(1)
        kv = per_group > 0
        counts = set(per_group[kv].tolist())
        if len(counts) != 1:
            raise ValueError(f"{self.name}: every kept key/value group must keep the same number of query "
                             f"heads (num_key_value_heads consistency); got per-group counts {per_group.tolist()}")
        return kv, counts.pop()

    def _remove(self, idx: Tensor) -> None:
        keep = torch.zeros(self.n, dtype=torch.bool)
        keep[idx] = True
        kv, g_new = self.kv_keep(keep)
        kv_idx = kv.nonzero().squeeze(1)
        a = self.attn
        rm.keep_out(a.q_proj, _expand(idx, self.head_dim))
        if int(kv_idx.numel()) != self.n_kv:
            rm.keep_out(a.k_proj, _expand(kv_idx, self.head_dim))
            rm.keep_out(a.v_proj, _expand(kv_idx, self.head_dim))
        rm.keep_in(a.o_proj, idx, self.head_dim)
        self.n_kv = int(kv_idx.numel())
        a.num_key_value_groups = int(g_new)
        for attr, val in (("num_heads", int(idx.numel())), ("num_key_value_heads", self.n_kv)):
            if hasattr(a, attr):
                setattr(a, attr, val)

    def check_keep(self, keep: Tensor) -> Tensor:
        idx = super().check_keep(keep)
        self.kv_keep(keep.cpu())
        return idx

    def realised(self, k: int, grid: bool = True) -> int:
        """Query heads kept when ``k`` are asked for: ``round(k / n_kv)`` per KV group (query
        mode) or ``round(k / group size)`` whole KV groups (group mode); ``grid`` changes
        nothing (heads are whole units: no width grid applies to them)."""
        k = max(1, min(int(k), self.n))
        if self.mode == "group":
            return self.group_size * min(self.n_kv, max(1, round(k / self.group_size)))
        return self.n_kv * min(self.group_size, max(1, round(k / self.n_kv)))

    def keep_mask(self, scores: Tensor, k: int, grid: bool = True) -> Tensor:
        return head_keep_mask(scores, max(1, min(int(k), self.n)), self.n_kv, self.mode)

    def conform(self, keep: Tensor, scores: Tensor) -> Tensor:
        return self.keep_mask(scores, int(keep.sum()))

    def weight_norms(self) -> Tensor:
        q = self.attn.q_proj.weight.detach().double().reshape(self.n, -1).square().sum(1)
        return (q + self.out_norms().square()).sqrt()


@dataclass(eq=False)
class LayerGroup(UnitGroup):
    """The decoder blocks of a causal LM: one group, one unit per block (``consumer`` is the
    block list). Removing a unit deletes the whole block (:func:`.depth.keep_blocks`: the
    config's per-layer lists and the attention cache slots follow); its masked reference is
    :func:`.depth.skipped` (the block passes its input through), not a zeroing, so
    :meth:`zero` and :meth:`compensate` refuse. Blocks may differ in size (after a width
    shrink): :meth:`block_params` counts each, :meth:`params_per_unit` is their mean."""

    model: nn.Module | None = None

    @property
    def n(self) -> int:
        return len(self.consumer)

    def producers(self) -> list[nn.Module]:
        return []

    def block_params(self) -> list[int]:
        """Parameters of every block, in order."""
        return [sum(p.numel() for p in b.parameters()) for b in self.consumer]

    def params(self) -> int:
        return sum(self.block_params())

    def params_per_unit(self) -> int:
        return self.params() // max(self.n, 1)

    def weight_norms(self) -> Tensor:
        """L2 norm of every parameter of each block (the ``magnitude`` score of a block)."""
        return torch.stack([sum((p.detach().double().square().sum() for p in b.parameters()),
                                torch.zeros((), dtype=torch.float64)).sqrt().cpu() for b in self.consumer])

    def out_norms(self) -> Tensor:
        raise NotImplementedError("decoder blocks have no consumer columns: score them with "
                                  "emprune.criteria.block_scores (loss, influence) or magnitude")

    def zero(self, keep: Tensor) -> None:
        raise NotImplementedError("the masked reference of removed blocks is emprune.structure.depth.skipped")

    def compensate(self, keep: Tensor, mean_in: Tensor) -> None:
        raise NotImplementedError("bias compensation is not defined for whole decoder blocks")

    def _remove(self, idx: Tensor) -> None:
        depth.keep_blocks(self.model, idx.tolist())


@dataclass(eq=False)
class HiddenGroup(UnitGroup):
    """The channels of a causal LM's residual stream: one group, one unit per channel
    (``consumer`` is the embedding). Removing a unit removes the channel everywhere
    (:func:`.hidden.keep_channels`); the masked reference (:meth:`zero`) zeroes the channel's
    embedding column and the rows that write it, so nothing flows through it. ``multiple``: the
    grid of the kept width (transformers wants ``hidden_size`` a multiple of the head count; a
    GGUF type wants whole blocks of 32 or 256)."""

    model: nn.Module | None = None
    multiple: int = 1

    @property
    def n(self) -> int:
        return int(self.consumer.weight.shape[1])

    def producers(self) -> list[nn.Module]:
        return []

    def params_per_unit(self) -> int:
        return hidden.residual(self.model).params_per_channel()

    def weight_norms(self) -> Tensor:
        return hidden.residual(self.model).channel_norms()

    def out_norms(self) -> Tensor:
        return self.weight_norms()

    def realised(self, k: int, grid: bool = True) -> int:
        return nearest_width(k, self.n, self.multiple if grid else 1)

    def widths(self) -> list[int]:
        return grid_widths(self.n, self.multiple)

    def conform(self, keep: Tensor, scores: Tensor) -> Tensor:
        c = int(keep.sum())
        return keep if c >= 1 and self.realised(c) == c else self.keep_mask(scores, c)

    def zero(self, keep: Tensor) -> None:
        self.check_keep(keep)
        hidden.zero_channels(self.model, (~keep).nonzero().squeeze(1).tolist())

    def compensate(self, keep: Tensor, mean_in: Tensor) -> None:
        raise NotImplementedError("bias compensation is not defined for residual channels")

    def _remove(self, idx: Tensor) -> None:
        hidden.keep_channels(self.model, idx.tolist())


def _expand(idx: Tensor, block: int) -> Tensor:
    return (idx[:, None] * block + torch.arange(block)).reshape(-1)


def head_keep_mask(scores: Tensor, k: int, n_kv: int, mode: str = "query") -> Tensor:
    """A GQA-consistent mask keeping about ``k`` of ``n`` query heads by ``scores``.

    ``mode="query"``: every key/value group stays and keeps its ``g' = round(k / n_kv)``
    best query heads (``1 <= g' <= group size``); with plain multi-head attention
    (``n_kv = n``) this is an exact top-``k``. ``mode="group"``: whole key/value groups (all
    their query heads) are kept, the ``round(k / group size)`` groups with the largest score
    sum. The result is what :class:`HeadGroup` accepts."""
    n = scores.numel()
    g = n // n_kv
    s = scores.double().reshape(n_kv, g)
    keep = torch.zeros(n_kv, g, dtype=torch.bool)
    if mode == "query":
        gk = min(g, max(1, int(round(k / n_kv))))
        top = s.topk(gk, dim=1).indices
        keep.scatter_(1, top, True)
    elif mode == "group":
        kg = min(n_kv, max(1, int(round(k / g))))
        keep[s.sum(1).topk(kg).indices] = True
    else:
        raise ValueError(f"head mode must be 'query' or 'group', got {mode!r}")
    return keep.reshape(-1)


@dataclass(eq=False)
class ChainGroup(UnitGroup):
    """Hidden neurons (Linear -> Linear) or Conv channels (Conv [-> BatchNorm] -> Conv, or
    -> Flatten -> Linear with ``block = H*W``) of a plain chain."""

    producer: nn.Module | None = None
    norm: nn.Module | None = None

    @property
    def n(self) -> int:
        p = self.producer
        return p.out_features if isinstance(p, nn.Linear) else p.out_channels

    def producers(self) -> list[nn.Module]:
        return [m for m in (self.producer, self.norm) if m is not None]

    def _remove(self, idx: Tensor) -> None:
        for p in self.producers():
            rm.keep_out(p, idx)
        rm.keep_in(self.consumer, idx, self.block)


@dataclass(eq=False)
class KANGroup(UnitGroup):
    """Hidden nodes between two KAN layers: rows of the first layer's ``base``/``coef``,
    columns of the second's. A node is removed by removing its edges (an edge function at 0
    is not 0), so the masked reference zeroes the outgoing edges' ``base`` and ``coef``."""

    first: nn.Module | None = None

    @property
    def n(self) -> int:
        return self.first.base.shape[0]

    def producers(self) -> list[nn.Module]:
        return [self.first]

    def out_norms(self) -> Tensor:
        c = self.consumer
        return (c.base.detach().double().square().sum(0) + c.coef.detach().double().square().sum((0, 2))).sqrt()

    def weight_norms(self) -> Tensor:
        f = self.first
        sq = f.base.detach().double().square().sum(1) + f.coef.detach().double().square().sum((1, 2))
        return (sq + self.out_norms().square()).sqrt()

    def node_scores(self) -> Tensor:
        """The paper's KAN node score: max(mean |coef| over incoming, over outgoing edges)."""
        incoming = self.first.coef.detach().abs().mean(dim=(1, 2))
        outgoing = self.consumer.coef.detach().abs().mean(dim=(0, 2))
        return torch.maximum(incoming, outgoing).double()

    def params_per_unit(self) -> int:
        f, c = self.first, self.consumer
        return (f.base.numel() + f.coef.numel()) // self.n + (c.base.numel() + c.coef.numel()) // self.n

    @torch.no_grad()
    def zero(self, keep: Tensor) -> None:
        self.check_keep(keep)
        c = self.consumer
        c.base.mul_(keep.to(c.base.dtype))
        c.coef.mul_(keep.to(c.coef.dtype)[:, None])

    def compensate(self, keep: Tensor, mean_in: Tensor) -> None:
        raise NotImplementedError("bias compensation is not defined for KAN nodes")

    @torch.no_grad()
    def _remove(self, idx: Tensor) -> None:
        f, c = self.first, self.consumer
        f.base = nn.Parameter(f.base[idx].clone(), requires_grad=f.base.requires_grad)
        f.coef = nn.Parameter(f.coef[idx].clone(), requires_grad=f.coef.requires_grad)
        c.base = nn.Parameter(c.base[:, idx].clone(), requires_grad=c.base.requires_grad)
        c.coef = nn.Parameter(c.coef[:, idx].clone(), requires_grad=c.coef.requires_grad)
        if hasattr(f, "n_out"):
            f.n_out = int(idx.numel())
        if hasattr(c, "n_in"):
            c.n_in = int(idx.numel())


# ------------------------------------------------------------------ discovery


def llm_groups(model: nn.Module, kinds: tuple[str, ...] = ("mlp", "heads")) -> list[UnitGroup]:
    """The groups of a LLaMA-family causal LM (other layouts: ``NotImplementedError``, one
    line): one :class:`LayerGroup` over the blocks (``layers``) and one :class:`HiddenGroup` over
    the residual channels (``hidden``), first, then the attention heads and MLP neurons of every
    block."""
    require_layout(model, "llama", "emprune shrink")

    names = {m: n for n, m in model.named_modules()}
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)()
    out: list[UnitGroup] = []
    if "layers" in kinds:
        blocks = decoder_layers(model)
        out.append(LayerGroup(names[blocks], "layers", blocks, 1, None, model=model))
    if "hidden" in kinds:
        embed = model.get_input_embeddings()
        out.append(HiddenGroup("hidden_size", "hidden", embed, 1, None, model=model))
    for i, block in enumerate(decoder_layers(model)):
        if "heads" in kinds:
            attn = getattr(block, "self_attn", None)
            if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
                raise NotImplementedError(f"block {i}: no LLaMA-style self_attn with q/k/v/o_proj")
            hd = int(getattr(attn, "head_dim", 0) or getattr(config, "head_dim", 0)
                     or config.hidden_size // config.num_attention_heads)
            n_kv = attn.k_proj.out_features // hd
            out.append(HeadGroup(f"{names[attn]}", "heads", attn.o_proj, hd, i, attn=attn, head_dim=hd, n_kv=n_kv))
        if "mlp" in kinds:
            mlp = getattr(block, "mlp", None)
            if mlp is None or not hasattr(mlp, "down_proj") or not hasattr(mlp, "up_proj"):
                raise NotImplementedError(f"block {i}: no LLaMA-style mlp with up_proj/down_proj "
                                          "(fused gate_up_proj is not supported)")
            out.append(MLPGroup(f"{names[mlp]}", "mlp", mlp.down_proj, 1, i, mlp=mlp))
    return out


_PASS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Mish, nn.Hardswish,
         nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool1d,
         nn.AvgPool1d)


def chain_groups(model: nn.Module, kinds: tuple[str, ...] = ("neurons", "channels", "kan")) -> list[UnitGroup]:
    """Unit groups of a plain chain: leaf modules in registration order, each Linear / Conv2d
    followed (through element-wise modules, pooling, one BatchNorm, Flatten) by the next
    Linear / Conv2d; consecutive KAN layers. The last layer (the outputs) is never shrunk."""
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children()) and n]
    out: list[UnitGroup] = []
    for i, (name, m) in enumerate(leaves):
        if _is_kan(m):
            if "kan" in kinds and i + 1 < len(leaves) and _is_kan(leaves[i + 1][1]):
                out.append(KANGroup(name, "kan", leaves[i + 1][1], first=m))
            continue
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        kind = "neurons" if isinstance(m, nn.Linear) else "channels"
        if kind not in kinds or (isinstance(m, nn.Conv2d) and m.groups != 1):
            continue
        norm, flat, consumer = None, False, None
        for _, nxt in leaves[i + 1:]:
            if isinstance(nxt, (nn.Linear, nn.Conv2d)):
                consumer = nxt
                break
            if isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d)) and norm is None:
                norm = nxt
            elif isinstance(nxt, nn.Flatten):
                flat = True
            elif not isinstance(nxt, _PASS):
                break  # something that mixes features (LayerNorm, attention, ...): not a plain chain
        if consumer is None or (isinstance(consumer, nn.Conv2d) and (consumer.groups != 1 or kind == "neurons")):
            continue
        n = m.out_features if kind == "neurons" else m.out_channels
        width = consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels
        if width % n:
            continue
        block = width // n
        if block > 1 and not (kind == "channels" and flat and isinstance(consumer, nn.Linear)):
            continue
        out.append(ChainGroup(name, kind, consumer, block, producer=m, norm=norm))
    return out


def _is_kan(m: nn.Module) -> bool:
    base, coef = getattr(m, "base", None), getattr(m, "coef", None)
    return (isinstance(base, Tensor) and isinstance(coef, Tensor) and base.dim() == 2 and coef.dim() == 3
            and coef.shape[:2] == base.shape)


def find_groups(model: nn.Module, units: str | tuple[str, ...] | list[str] = "auto") -> list[UnitGroup]:
    """The unit groups of ``model`` for ``units`` (``"mlp,heads"``, ``("neurons",)``, ``"auto"``:
    MLP neurons and heads of a decoder LM, else every plain-chain group)."""
    is_lm = isinstance(getattr(getattr(model, "model", None), "layers", None), nn.ModuleList)
    if isinstance(units, str):
        kinds = tuple(u.strip() for u in units.split(",") if u.strip())
    else:
        kinds = tuple(units)
    if kinds == ("auto",):
        kinds = ("mlp", "heads") if is_lm else ("neurons", "channels", "kan")  # layers: asked for by name
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"units must be a comma list of {', '.join(KINDS)} (or 'auto'); got {units!r}")
    llm_kinds = tuple(k for k in kinds if k in LM_KINDS)
    groups: list[UnitGroup] = []
    if llm_kinds:
        if layout_or_none(model) is not None:  # a decoder LM emprune knows, but maybe not LLaMA-like
            require_layout(model, "llama", "emprune shrink")
        if not is_lm:
            raise ValueError(f"units {llm_kinds} need a decoder LM with model.model.layers")
        groups += llm_groups(model, llm_kinds)
    plain = tuple(k for k in kinds if k not in LM_KINDS)
    if plain:
        groups += chain_groups(model, plain)
    if not groups:
        raise ValueError(f"no removable units of kind {kinds} found in {type(model).__name__}")
    for j, g in enumerate(groups):
        if g.layer is None:
            g.layer = j
    return groups
