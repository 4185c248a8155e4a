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
    kind = _sniff(p)
    if kind == "safetensors" or p.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors(p)
        return load_file(str(p))
    if kind is None:
        raise ValueError(f"{p} is not a PyTorch checkpoint or safetensors file "
                         f"(it starts with {_head(p)!r})")
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


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise a one-line ``ValueError`` unless ``path`` is a complete safetensors file.

    ``safe_open`` reads the header and checks that the tensors cover the file exactly, so a
    truncated download or a file of another format is caught before anything is loaded
    (the raw ``SafetensorError`` says neither which file nor what to do)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # SafetensorError has no stable import path across versions
        raise ValueError(f"{path} is not a complete safetensors file (truncated or another format?): {e}") from None


def _head(p: Path, n: int = 16) -> bytes:
    with open(p, "rb") as f:
        return f.read(n)


def _sniff(p: Path) -> str | None:
    """``"safetensors"``, ``"torch"`` (zip or legacy pickle) or ``None`` from a file's first bytes."""
    head = _head(p)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save zip / pickle protocol >= 2
        return "torch"
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 32:
        return "safetensors"  # u64 header length, then the JSON header
    return None


def _flatten(d: Mapping, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    for k, v in d.items():
        if isinstance(v, Tensor):
            yield prefix + str(k), v
        elif isinstance(v, Mapping):
            yield from _flatten(v, f"{prefix}{k}.")


def usual_mode(folder: bool = False) -> int:
    """The mode a new file (``0o666``) or folder (``0o777``) gets under the current umask.

    Temporary files and folders are created private (0600 / 0700); what is renamed into place
    gets this mode instead, like any file the user writes."""
    umask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def check_can_write(path: str | os.PathLike, option: str | None = None, folder: bool = False,
                    parent_must_exist: bool = False) -> Path:
    """Raise one clear line unless ``path`` (a file, or a folder with ``folder=True``) can be
    created or replaced, so that a run fails before its work rather than at the end.

    The nearest existing ancestor of ``path``'s parent must be a folder where an entry can
    really be created (a probe folder is made and removed: ``os.access`` misses read-only
    file systems and ACLs). ``option`` names the command-line option in the message.
    ``parent_must_exist``: the parent folder must exist already (a results file)."""
    dest = Path(path).expanduser()
    name = f"{option} {dest}" if option else str(dest)
    if not folder and dest.is_dir():
        raise IsADirectoryError(f"{name}: is a folder, expected a file name")
    base = dest.resolve().parent
    if parent_must_exist and not base.is_dir():  # a typo must not create folders, least of all at /
        raise FileNotFoundError(f"{name}: the folder {dest.parent} does not exist")
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise NotADirectoryError(f"{name}: cannot be created, {base} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".emprune-probe-", dir=base))
    except OSError as e:
        raise PermissionError(f"{name}: cannot write in {base} ({e.strerror or e})") from None
    return dest


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
        os.chmod(tmp, usual_mode())  # mkstemp makes 0600; give the file the usual mode
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
