"""Jobs on models larger than memory: prune (:func:`prune_to_disk`) or shrink
(:func:`shrink_to_disk`) a checkpoint block by block from its safetensors shards into new shards,
and measure its perplexity the same way
(:func:`~emprune.jobs.eval.perplexity_streamed`).

The weights never sit in memory all at once: the model is built on ``meta``
(:class:`~emprune.models.stream.DiskModel`), the layer-wise loop materialises each block for its
turn, the finished block is written to its own output shard and released, and the tensors outside
the blocks (embeddings, final norm, output head) are copied from the input shards at the end. The
output folder is written atomically (:func:`~emprune.models.checkpoint.writing`): it appears only
when complete, and an interrupted run leaves the previous output as it was.

With the same options the saved tensors are the in-memory path's, byte for byte: the blocks hold
the same values (read as stored, cast to the compute dtype) and go through the same calls.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..models import checkpoint
from ..models.stream import DiskModel, ShardWriter, describe
from ..act.report import ShrinkReport
from .options import PruneOptions, ShrinkOptions
from .prune_lm import LMPruneResult, prune_lm
from .shrink_lm import shrink_lm


@dataclass(frozen=True)
class Output:
    """Where and how :func:`prune_to_disk` writes its result: the folder (written atomically;
    ``overwrite`` replaces an earlier emprune output), the tokenizer saved with it, the dtype of
    the saved weights (default: the compute dtype), ``info`` added to ``emprune.json`` (its
    ``calibration`` entry merged into the run's) and ``started``, a ``time.perf_counter()`` from
    which ``total_seconds`` is counted."""

    out_dir: str | os.PathLike
    tokenizer: Any = None
    save_dtype: torch.dtype | None = None
    overwrite: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    started: float | None = None


def prune_to_disk(folder: str | os.PathLike, calib_tokens: Tensor | None, options: PruneOptions, output: Output,
                  dtype: torch.dtype = torch.float32) -> tuple[LMPruneResult, Path]:
    """Prune the safetensors checkpoint ``folder`` (or ``.gguf`` file) as
    :func:`~emprune.jobs.prune_lm.prune_lm` does with ``options``, one block at a time, computing
    in ``dtype`` on ``options.device`` (CPU by default), and write the result as ``output`` says,
    with ``emprune.json``. Returns ``(result, folder written)``."""
    def job(disk: DiskModel) -> tuple[LMPruneResult, dict[str, Any]]:
        res = prune_lm(disk.model, calib_tokens, options, blocks=disk)
        return res, res.info

    res, _, saved = _to_disk(folder, output, dtype, options.device, job)
    return res, saved


def shrink_to_disk(folder: str | os.PathLike, calib_tokens: Tensor | None, options: ShrinkOptions, output: Output,
                   dtype: torch.dtype = torch.float32) -> tuple[ShrinkReport, dict[str, Any], Path]:
    """Shrink the safetensors checkpoint ``folder`` (or ``.gguf`` file) as
    :func:`~emprune.jobs.shrink_lm.shrink_lm` does with ``options`` (MLP neurons and attention
    heads: :func:`~emprune.jobs.shrink_disk.check_streamable`), one block at a time, on CPU in
    ``dtype``, and write the result as ``output`` says, with ``emprune.json``. Returns
    ``(report, emprune.json contents, folder written)``."""
    def job(disk: DiskModel) -> tuple[ShrinkReport, dict[str, Any]]:
        return shrink_lm(disk.model, calib_tokens, options, progress=options.progress, blocks=disk)

    return _to_disk(folder, output, dtype, None, job)


def _to_disk(folder: str | os.PathLike, output: Output, dtype: torch.dtype, device: Any,
             job: Callable[[DiskModel], tuple[Any, dict[str, Any]]]) -> tuple[Any, dict[str, Any], Path]:
    """Run ``job`` on ``folder`` streamed from disk (a :class:`DiskModel` whose finished blocks are
    written to their own shards), then write the tensors outside the blocks, the configs and
    ``emprune.json`` (the job's info, completed by ``output``): the folder appears only when
    complete. Returns ``(what the job returned first, emprune.json contents, folder written)``."""
    save_dtype = output.save_dtype or dtype
    disk = DiskModel(folder, dtype, device)
    with checkpoint.writing(output.out_dir, output.overwrite) as tmp:
        shards = ShardWriter(tmp)
        cast = disk.saved_cast(save_dtype)
        disk.on_done = lambda i, block: shards.add(disk.block_tensors(i, block), cast)
        disk.on_add = lambda tensors: shards.add(tensors, cast)
        res, info = job(disk)
        disk.on_done = disk.on_add = None
        for names in disk.outer_groups():  # read as stored, one large tensor at a time, cast while written
            shards.add(disk.shards.read(names), cast)
        shards.finish()
        _save_configs(disk, tmp, save_dtype)
        extra = dict(output.info)
        info.setdefault("calibration", {}).update(extra.pop("calibration", {}))
        info.update(extra, offload=describe(disk), saved_dtype=str(save_dtype).replace("torch.", ""))
        if output.started is not None:
            info["total_seconds"] = time.perf_counter() - output.started
        checkpoint.finish_folder(tmp, output.tokenizer, info)
    return res, info, Path(output.out_dir).expanduser().resolve()


def _save_configs(disk: DiskModel, tmp: Path, save_dtype: torch.dtype) -> None:
    """``config.json`` (its dtype the saved one, its ``architectures`` the model class) and
    ``generation_config.json``, as ``save_pretrained`` writes them."""
    config = disk.model.config
    config.dtype = str(save_dtype).replace("torch.", "")
    config.architectures = [type(disk.model).__name__]  # as save_pretrained sets it (a GGUF's config has none)
    config.save_pretrained(tmp)
    gen = getattr(disk.model, "generation_config", None)
    if gen is not None and disk.model.can_generate():
        gen.save_pretrained(tmp)
