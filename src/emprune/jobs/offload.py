"""Jobs on models larger than memory: prune a checkpoint block by block from its safetensors shards
into new shards (:func:`prune_to_disk`), and measure its perplexity the same way
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
from typing import Any

import torch
from torch import Tensor

from ..models import checkpoint
from ..models.stream import DiskModel, ShardWriter, describe
from .options import PruneOptions
from .prune_lm import LMPruneResult, prune_lm


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
    save_dtype = output.save_dtype or dtype
    disk = DiskModel(folder, dtype, options.device)
    with checkpoint.writing(output.out_dir, output.overwrite) as tmp:
        shards = ShardWriter(tmp)
        cast = disk.saved_cast(save_dtype)
        disk.on_done = lambda i, block: shards.add(disk.block_tensors(i, block), cast)
        res = prune_lm(disk.model, calib_tokens, options, blocks=disk)
        disk.on_done = None
        for names in disk.outer_groups():  # read as stored, one large tensor at a time, cast while written
            shards.add(disk.shards.read(names), cast)
        shards.finish()
        _save_configs(disk, tmp, save_dtype)
        info = dict(output.info)
        res.info["calibration"].update(info.pop("calibration", {}))
        res.info.update(info, offload=describe(disk), saved_dtype=str(save_dtype).replace("torch.", ""))
        if output.started is not None:
            res.info["total_seconds"] = time.perf_counter() - output.started
        checkpoint.finish_folder(tmp, output.tokenizer, res.info)
    return res, Path(output.out_dir).expanduser().resolve()


def _save_configs(disk: DiskModel, tmp: Path, save_dtype: torch.dtype) -> None:
    """``config.json`` (its dtype the saved one) and ``generation_config.json``, as
    ``save_pretrained`` writes them."""
    config = disk.model.config
    config.dtype = str(save_dtype).replace("torch.", "")
    config.save_pretrained(tmp)
    gen = getattr(disk.model, "generation_config", None)
    if gen is not None and disk.model.can_generate():
        gen.save_pretrained(tmp)
