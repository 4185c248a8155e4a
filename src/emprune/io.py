"""Safe loading and atomic saving of weights.

Checkpoints are read with safetensors or ``torch.load(..., weights_only=True)`` (never
arbitrary pickles), and every file is written to a temporary name in the target folder and
renamed into place, so an interrupted run never leaves a half-written file that looks
complete.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn


def load_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or a PyTorch checkpoint (``weights_only=True``).

    A checkpoint that wraps its weights (``{"state_dict": ...}`` or ``{"model": ...}``) is
    unwrapped; nested dicts are flattened with dotted names; non-tensor entries are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such checkpoint: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with custom classes, or not a checkpoint at all
        raise ValueError(f"{p} is not a weights-only PyTorch checkpoint or safetensors file: {e}") from e
    if isinstance(obj, nn.Module):  # pragma: no cover - weights_only refuses modules
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        out = dict(_flatten(obj))
        if out:
            return out
    raise ValueError(f"{p} holds no tensors")


def _flatten(d: Mapping, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    for k, v in d.items():
        if isinstance(v, Tensor):
            yield prefix + str(k), v
        elif isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}.")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on
    error it is removed (the old ``path``, if any, is left untouched)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pruned_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with reversible masks folded in (``weight`` = orig * mask,
    no ``*_orig`` / ``*_mask`` entries), without changing the model."""
    sd = model.state_dict()
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.endswith("_orig") and k[:-5] + "_mask" in sd:
            out[k[:-5]] = v * sd[k[:-5] + "_mask"].to(v.dtype)
        elif k.endswith("_mask") and k[:-5] + "_orig" in sd:
            continue
        else:
            out[k] = v
    return out


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Write tensors atomically: safetensors for ``.safetensors`` paths, else ``torch.save``."""
    dest = Path(path)
    with atomic_path(dest) as tmp:
        if dest.suffix == ".safetensors":
            from safetensors.torch import save_file

            # safetensors refuses shared storage: give each tensor its own contiguous copy
            save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(tmp))
        else:
            torch.save(dict(state), tmp)
    return dest


def save_pruned(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model``'s weights with masks folded in (see :func:`pruned_state_dict`)."""
    return save_state_dict(pruned_state_dict(model), path)
