"""``emprune shrink`` on a model streamed from disk: the three passes, block by block.

:func:`~emprune.jobs.shrink.shrink` decides as it does in memory; only the three steps that touch
the weights run here, each reading every decoder block once (a
:class:`~emprune.models.stream.DiskModel`):

1. :func:`score_from_disk`: the dense calibration pass. Each block runs over the calibration
   inputs (``batch_size`` rows at a time, as the whole model's forward does) with the unit
   statistics' hooks on its consumers, and its groups are scored while it is in memory.
2. :func:`sensitivity_from_disk` (the ``sensitivity`` recipe): the loss increase of each group
   losing a fraction of its units, measured in one pass instead of one model forward per group.
   Beside the dense hidden states of the measurement rows, one perturbed copy per group that has
   been reached: when block ``i`` is read, each of its groups starts its copy (the block run
   masked, with the compensation) and every earlier copy goes through the dense block. At the
   end the model's own forward (embeddings and head loaded, blocks passed through) turns each
   copy into a loss. The copies take ``groups x rows x seqlen x hidden`` values; they spill to a
   memory-mapped file when large (:func:`~emprune.models.layerwise.buffer`).
3. :func:`remove_from_disk`: each block's units are removed (with the bias compensation) and the
   block is written (the ``final`` pass of :meth:`Blocks.open`).

The calls are those of the in-memory path on the same rows and batch shapes, so the statistics,
the sensitivities, the decisions and the saved tensors are the same, byte for byte.

``uniform`` (one width per model) runs the sensitivity pass for its dry-run decision, then the
removal pass at the rounded widths; the zero biases a stock config asks for are created once every
block is written and go to a shard of their own (:meth:`~emprune.models.stream.DiskModel.add`).

What is not streamed (refused by :func:`check_streamable`, one line): whole blocks (``layers``)
and residual channels (``hidden``), whose decisions need the whole model at once, the shared
``budget`` and Taylor scores (a backward pass through the whole model).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..act.remove import remove_units
from ..act.report import GroupReport
from ..criteria.unit_scores import UnitStats, unit_scores
from ..decide.scopes import Decision
from ..decide.sensitivity import masked, mean_loss, sensitivity_keep
from ..models.layerwise import block_inputs, buffer, passed_through, run_block
from ..models.stream import DiskModel
from ..structure.layouts import decoder_layers
from ..structure.units import UnitGroup

#: unit kinds a streamed shrink removes (the widths of each block)
STREAMED_UNITS = ("mlp", "heads")


def check_streamable(units: Sequence[str], *, budget: str | None = None, criterion: str | None = None) -> None:
    """Refuse, in one line (``ValueError``), what ``shrink`` cannot do on a model streamed from
    disk, before anything is loaded."""
    whole = [u for u in units if u not in STREAMED_UNITS]
    why = None
    if whole:
        why = (f"--units {','.join(whole)} decides over the whole model at once (blocks or residual channels); "
               "streamed, only mlp and heads are shrunk")
    elif budget == "shared":
        why = "--budget shared spends one budget across blocks and widths"
    elif criterion == "taylor":
        why = "--criterion taylor needs a backward pass through the whole model"
    if why is not None:
        raise ValueError(f"shrink --offload disk: {why}; load the model in memory (--offload none)")


def _by_block(groups: Sequence[UnitGroup]) -> dict[int, list[int]]:
    """Group indices per decoder block (every streamed group belongs to one block)."""
    out: dict[int, list[int]] = {}
    for j, g in enumerate(groups):
        if g.layer is None:
            raise ValueError(f"{g.name}: not a group of one decoder block; it cannot be streamed")
        out.setdefault(int(g.layer), []).append(j)
    return out


def _bar(n: int, desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, disable=not progress, unit="block")


@torch.no_grad()
def score_from_disk(disk: DiskModel, groups: list[UnitGroup], criterion: str, tokens: Tensor | None,
                    batch_size: int = 8, progress: bool = True) -> tuple[list[Tensor], UnitStats | None]:
    """Pass 1: every group's ``criterion`` scores and (with ``tokens`` ``[n, seqlen]``) the
    consumers' input statistics of the dense ``disk.model``, block by block. Without tokens the
    blocks are only read (weight scores). Returns ``(scores, stats)`` in the order of ``groups``."""
    model = disk.model
    layers = decoder_layers(model)
    where = _by_block(groups)
    scores: list[Tensor | None] = [None] * len(groups)

    def score(i: int, stats: UnitStats | None) -> None:
        idx = where.get(i, [])
        for j, s in zip(idx, unit_scores([groups[j] for j in idx], criterion, stats)):
            scores[j] = s

    if tokens is None:
        for i in _bar(len(layers), "score", progress):
            with disk.open(i, layers[i], False):
                score(i, None)
        return scores, None  # type: ignore[return-value]
    stats = UnitStats(groups)
    with stats, block_inputs(model, tokens, disk) as (inps, kwargs):
        outs = buffer(tuple(inps.shape), inps.dtype, inps.device)
        for i in _bar(len(layers), "calibrate", progress):
            with disk.open(i, layers[i], False) as block:
                run_block(block, inps, kwargs[i], batch_size, outs)
                score(i, stats)
            inps, outs = outs, inps
    return scores, stats  # type: ignore[return-value]


def _rows(batches: list[Tensor]) -> tuple[Tensor, int]:
    """The measurement rows of ``batches`` as one tensor, and their batch size (every batch but
    the last one that size, as :func:`~emprune.jobs.shrink.lm_batches` makes them)."""
    size = int(batches[0].shape[0])
    if any(int(b.shape[0]) != size for b in batches[:-1]) or int(batches[-1].shape[0]) > size:
        raise ValueError("streamed sensitivity needs batches of one size (the last may be smaller)")
    return torch.cat(list(batches)), size


@torch.no_grad()
def sensitivity_from_disk(disk: DiskModel, groups: list[UnitGroup], scores: list[Tensor], batches: list[Tensor],
                          loss_fn: Callable[[nn.Module, Tensor], Tensor], *, fraction: float = 0.5,
                          means: list[Tensor] | None = None, progress: bool = False) -> list[float]:
    """Pass 2: :func:`~emprune.decide.sensitivity.group_sensitivity` of ``disk.model``, streamed
    (the same arguments after the model), each block read once (see the module text).
    ``batches``: token ids, the measurement batches; ``loss_fn(model, batch)`` runs the model's
    own forward, whose blocks are passed through and fed the hidden states computed here."""
    if not 0 < fraction < 1:
        raise ValueError(f"sensitivity fraction must lie in (0, 1), got {fraction}")
    if not batches:
        raise ValueError("sensitivity needs at least one calibration batch")
    tokens, size = _rows(batches)
    model = disk.model
    layers = decoder_layers(model)
    where = _by_block(groups)
    with block_inputs(model, tokens, disk) as (base, kwargs):
        out = buffer(tuple(base.shape), base.dtype, base.device)
        copies = buffer((len(groups), *base.shape), base.dtype, base.device)
        reached: list[int] = []
        for i in _bar(len(layers), "sensitivity", progress):
            with disk.open(i, layers[i], False) as block:
                for j in reached:  # earlier groups' copies through the dense block, in place
                    run_block(block, copies[j], kwargs[i], size, copies[j])
                for j in where.get(i, []):
                    keep = sensitivity_keep(groups[j], scores[j], fraction)
                    with masked([groups[j]], [keep], None if means is None else [means[j]]):
                        run_block(block, base, kwargs[i], size, copies[j])
                    reached.append(j)
                run_block(block, base, kwargs[i], size, out)
            base, out = out, base
        losses = _losses(disk, batches, loss_fn, [base] + [copies[j] for j in range(len(groups))])
    return [x - losses[0] for x in losses[1:]]


def _losses(disk: DiskModel, batches: list[Tensor], loss_fn: Callable[[nn.Module, Tensor], Tensor],
            finals: list[Tensor]) -> list[float]:
    """The mean loss over ``batches`` of each of ``finals`` (hidden states after the last block),
    through the model's own final norm, head and loss, summed as the in-memory measurement sums
    (:func:`~emprune.decide.sensitivity.mean_loss`); everything outside the blocks is loaded for
    the duration."""
    model = disk.model
    sizes = [int(b.shape[0]) for b in batches]
    feed: dict[str, Tensor] = {}

    def fed(m: nn.Module, pair: tuple[Tensor, Tensor]) -> Tensor:  # block 0 returns this batch's hidden states
        feed["hidden"] = pair[1]
        return loss_fn(m, pair[0])

    disk.load_outer(head=True)
    try:
        with passed_through(decoder_layers(model), feed):
            return [mean_loss(model, list(zip(batches, hidden.split(sizes))), fed) for hidden in finals]
    finally:
        disk.release_outer()


@torch.no_grad()
def remove_from_disk(disk: DiskModel, groups: Sequence[UnitGroup], decisions: Sequence[Decision],
                     progress: bool = True, **kw: Any) -> list[GroupReport]:
    """Pass 3: :func:`~emprune.act.remove.remove_units` on ``disk.model`` block by block (the
    same keywords), each block opened for the ``final`` pass, which writes it out once its units
    are removed. Returns the group reports in the order of ``groups``."""
    layers = decoder_layers(disk.model)
    where = _by_block(groups)
    out: list[GroupReport | None] = [None] * len(groups)
    for i in _bar(len(layers), "shrink", progress):
        with disk.open(i, layers[i], True):
            idx = where.get(i, [])
            for j, r in zip(idx, remove_units([groups[j] for j in idx], [decisions[j] for j in idx], **kw)):
                out[j] = r
    return out  # type: ignore[return-value]
