"""Checkpoints emprune writes and reads: the output folder (safetensors + config + tokenizer +
``emprune.json``), written atomically, and the shrunk folders with per-layer widths.

* :func:`save_pruned` / :func:`save_shrunk`: write a model folder atomically (a hidden marked
  temporary folder renamed into place; :func:`check_out_dir` refuses to destroy what is not ours,
  :func:`clean_stale_temporaries` deals with the leftovers of killed runs).
* :func:`read_report`: ``emprune.json`` of a folder; :func:`versions`: what shaped a result.
* :func:`from_pretrained` / :func:`load_shrunk`: a shrunk folder (``"kind": "shrunk"``, per-layer
  widths recorded in ``config.json`` as ``emprune_shrunk``) as a normal transformers model with
  the right per-layer shapes (``generate``, perplexity, PEFT work as usual). A uniform folder also
  loads with plain ``AutoModelForCausalLM.from_pretrained(DIR)``.
"""
from __future__ import annotations

import atexit
import json
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..structure.layouts import decoder_layers
from .io import check_can_write, usual_mode
from .runtime import place, quiet_progress

REPORT_NAME = "emprune.json"

#: written into a temporary output folder while it is being filled (pid and host of the writer),
#: removed just before the folder is renamed into place; lets a later run recognise the
#: leftovers of a killed run as ours and dead
WRITING_MARK = ".emprune-writing.json"
SHRUNK_KIND = "shrunk"


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


def versions() -> dict[str, str]:
    """Versions of everything that shapes a result."""
    from .._version import __version__

    out = {"emprune": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "platform": platform.platform()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


#: what ``save_pretrained`` of a model and a tokenizer writes (the files an emprune output of a
#: version that did not list its files in ``emprune.json`` may hold)
_SAVED_NAMES = re.compile(r"(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                          r"model\.safetensors\.index\.json|tokenizer(_config)?\.json|tokenizer\.model|"
                          r"special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt|"
                          r"chat_template\.(jinja|json)|" + re.escape(REPORT_NAME) + ")")


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """Files and folders inside an earlier emprune output that emprune did not write there
    (what ``--overwrite`` must never delete): everything not in the ``files`` list of its
    ``emprune.json`` (or, for outputs that predate that list, not named as ``save_pretrained``
    names its files)."""
    out = Path(folder)
    rep = read_report(out) or {}
    listed = rep.get("files")
    ours = set(listed) | {REPORT_NAME} if isinstance(listed, list) else None
    found = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_dir() and not p.is_symlink():
            continue
        if (rel not in ours) if ours is not None else not _SAVED_NAMES.fullmatch(rel):
            found.append(rel)
    return found


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool = False,
                  inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """The folder :func:`save_pruned` will write for ``out_dir`` (symlinks resolved), after
    checking, before any work is done, that writing it destroys nothing that is not ours.

    Refused: an existing file; the current folder or one of its parents; an input (``inputs``:
    the local file or folder of the model, of a teacher), a folder that contains it or lies inside it; a
    non-empty folder without ``overwrite``; with ``overwrite``, a non-empty folder that is not
    an earlier emprune output (it has no ``emprune.json``) or that holds files emprune did not
    write (:func:`foreign_files`: they are listed, never deleted); a place that cannot be
    written. A symlinked ``out_dir`` is followed: the folder it points to is written (or
    replaced) and the link kept. Raises ``FileExistsError``, ``ValueError`` or
    ``PermissionError`` with one line."""
    given = Path(out_dir).expanduser()
    out = given.resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{given} exists and is not a folder")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ValueError(f"{given} is the current folder or one of its parents; choose a new folder to write to")
    for given_input in inputs:
        src = Path(given_input).expanduser().resolve()
        if src == out or out in src.parents or src in out.parents:
            how = "is" if src == out else "contains" if out in src.parents else "lies inside"
            raise ValueError(f"{given} {how} the input {given_input}; write the output to a new folder beside it")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{given} exists and is not empty; pass overwrite=True (--overwrite) to "
                                  "replace an earlier emprune output")
        if not (out / REPORT_NAME).is_file():
            raise FileExistsError(f"{given} is not an earlier emprune output (it holds no {REPORT_NAME}); "
                                  "--overwrite replaces only those: choose another folder")
        _refuse_foreign(out, given)
    check_can_write(out, folder=True)
    return out


def _refuse_foreign(out: Path, given: Path) -> None:
    extra = foreign_files(out)
    if extra:
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        raise FileExistsError(f"{given} holds files emprune did not write ({', '.join(extra[:5])}{more}); "
                              "--overwrite never deletes them: move them away or choose another folder")


# ------------------------------------------------------------------ one writer per output


#: the outputs this process has claimed (released when the command ends, or at exit)
_CLAIMS: set[Path] = set()


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.emprune-lock"


def claim_output(out_dir: str | os.PathLike) -> list[str]:
    """Claim ``out_dir`` for this process before any work (a lock file ``.NAME.emprune-lock``
    beside it, created exclusively): a second run writing the same output is refused at once
    instead of at its save. A claim left by a killed run on this host is taken over (the note
    returned says so); the claim is released by :func:`save_pruned`, by :func:`release_claims`
    (the command line calls it when a command ends, however it ends) and at exit. Creates
    ``out_dir``'s parent folders. ``FileExistsError`` (one line) while another live run holds it."""
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(out)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    notes: list[str] = []
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
                pid, host = int(owner["pid"]), str(owner["host"])
            except (OSError, ValueError, KeyError, TypeError):
                pid, host = -1, ""  # unreadable: half-written by a run killed at that moment
            if pid == me["pid"] and host == me["host"]:
                return notes
            if pid > 0 and (host != me["host"] or _alive(pid)):
                raise FileExistsError(f"{out} is being written by another emprune run (process {pid} on {host}); "
                                      f"wait for it or choose another folder (remove {lock} if that run is gone)")
            lock.unlink(missing_ok=True)
            notes.append(f"note: took over {lock}, left by an emprune run that was killed")
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        if not _CLAIMS:
            atexit.register(release_claims)
        _CLAIMS.add(out)
        return notes
    raise FileExistsError(f"could not claim {out}: {lock} keeps reappearing")


def release_claims() -> None:
    """Drop every claim this process holds (a command that ends, however it ends; and at exit)."""
    for out in list(_CLAIMS):
        release_output(out)


def release_output(out_dir: str | os.PathLike) -> None:
    """Drop this process's claim on ``out_dir`` (nothing if the claim is not ours)."""
    _CLAIMS.discard(Path(out_dir).expanduser().resolve())
    lock = _lock_path(Path(out_dir).expanduser().resolve())
    try:
        owner = json.loads(lock.read_text())
        if int(owner["pid"]) == os.getpid() and owner["host"] == socket.gethostname():
            lock.unlink(missing_ok=True)
    except (OSError, ValueError, KeyError, TypeError):
        pass

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
    folder is complete; files emprune did not write there are never deleted: the run is refused)
    and leftovers of killed runs through :func:`clean_stale_temporaries`. The output is claimed
    (:func:`claim_output`) while it is written. Before the rename the folder is checked complete
    (config, every weights shard, every tokenizer file): it is complete or absent. The report
    lists the files written (``files``). ``dtype`` casts the model in place before saving (``None``: as it is). Files get the usual modes (umask), not the
    private ones of temporary files. Returns the folder written (symlinks resolved).
    """
    with writing(out_dir, overwrite) as tmp:
        if dtype is not None:
            model.to(dtype=dtype)
        with quiet_progress(not progress):
            model.save_pretrained(tmp)
        finish_folder(tmp, tokenizer, report_json)
    return Path(out_dir).expanduser().resolve()


@contextmanager
def writing(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A hidden, marked temporary folder beside ``out_dir`` to fill in the ``with`` body, renamed
    into place when the body ends without error (removed, with the previous ``out_dir`` left
    intact, when it raises or is interrupted). ``out_dir`` is checked (:func:`check_out_dir`)
    and claimed (:func:`claim_output`) first; leftovers of killed runs are dealt with
    (:func:`clean_stale_temporaries`). The body must end with :func:`finish_folder`."""
    out = check_out_dir(out_dir, overwrite)
    claim_output(out)
    try:
        clean_stale_temporaries(out)
        tmp = _our_tmp_dir(out, "tmp")
        try:
            yield tmp
            if (tmp / WRITING_MARK).exists():
                raise RuntimeError("internal: the output folder was not finished (finish_folder)")
            if out.is_dir() and any(out.iterdir()):  # files put there while we worked are not ours either
                _refuse_foreign(out, out)
            _swap_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        release_output(out)


def finish_folder(tmp: Path, tokenizer: Any, report_json: dict) -> None:
    """Complete a folder whose weights and config are written: mark per-layer widths in its
    config, write the tokenizer and, last, the report (listing every file), after checking
    that the folder is complete; files get the usual modes."""
    _mark_per_layer(tmp / "config.json")
    tok_files = [Path(f) for f in tokenizer.save_pretrained(tmp)] if tokenizer is not None else []
    _check_complete(tmp, tok_files)
    files = sorted(q.relative_to(tmp).as_posix() for q in tmp.rglob("*") if q.is_file() and q.name != WRITING_MARK)
    # the report goes last: its presence marks a finished folder
    report = {**report_json, "files": files}
    (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, default=json_default) + "\n")
    (tmp / WRITING_MARK).unlink()
    for path in [tmp, *tmp.rglob("*")]:  # mkdtemp (0700) and some writers (0600) are private
        if not path.is_symlink():
            os.chmod(path, usual_mode(path.is_dir()))


#: prefixed to ``architectures`` in the ``config.json`` of a folder with per-layer widths
SHRUNK_ARCH_PREFIX = "EmpruneShrunk"


def _mark_per_layer(config_json: Path) -> None:
    """A folder with per-layer widths (``emprune_shrunk.uniform`` false) has a ``config.json``
    whose stock widths (``intermediate_size``, head counts) are the source model's, which no
    block has any more: its ``architectures`` are renamed (``EmpruneShrunkLlamaForCausalLM``)
    so that tools that build from them (llama.cpp's ``convert_hf_to_gguf.py``, vLLM) refuse the
    folder instead of writing stale widths. Plain transformers refuses it too (size mismatch);
    emprune's loader builds from ``model_type`` and the recorded widths; ``emprune export``
    writes the GGUF."""
    cfg = json.loads(config_json.read_text())
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    shr = text.get("emprune_shrunk") or cfg.get("emprune_shrunk")
    if not isinstance(shr, dict) or shr.get("uniform", True) or not cfg.get("architectures"):
        return
    cfg["architectures"] = [a if a.startswith(SHRUNK_ARCH_PREFIX) else SHRUNK_ARCH_PREFIX + a
                            for a in cfg["architectures"]]
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _check_complete(tmp: Path, tok_files: list[Path]) -> None:
    """Refuse (``OSError``, one line) a folder that lacks what a loader needs: ``config.json``,
    every weights shard (an index's too), each file the tokenizer said it wrote (and its config)."""
    need = [tmp / "config.json"]
    index = tmp / "model.safetensors.index.json"
    if index.is_file():
        need += [tmp / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        need.append(tmp / "model.safetensors")
    if tok_files:
        need += [f if f.is_absolute() else tmp / f for f in tok_files] + [tmp / "tokenizer_config.json"]
    missing = [f.name for f in need if not f.is_file() or f.stat().st_size == 0]
    if missing:
        raise OSError(f"the output folder came out incomplete (missing or empty: {', '.join(missing)}); "
                      "nothing was written")

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

def json_default(obj: Any) -> Any:
    """Make tensors, numpy scalars, paths and dtypes JSON-serialisable in reports."""
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def save_shrunk(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, report_json: dict,
                overwrite: bool = False, progress: bool = True) -> Path:
    """Write the shrunk model like ``emprune prune`` does (atomic; see
    :func:`emprune.llm.models.save_pruned`). ``overwrite`` replaces only a folder that holds an
    ``emprune.json`` (an earlier emprune output), never an arbitrary non-empty folder."""
    return save_pruned(model, tokenizer, out_dir, report_json, overwrite=overwrite, progress=progress)

def is_shrunk(folder: str | os.PathLike) -> bool:
    """Whether ``folder/emprune.json`` says ``"kind": "shrunk"``."""
    return (read_report(folder) or {}).get("kind") == SHRUNK_KIND

def _state_dict(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, Tensor] = {}
        for f in files:
            sd.update(load_file(str(folder / f)))
        return sd
    raise FileNotFoundError(f"{folder}: no model.safetensors (or index) to load")

def fit_shapes(model: nn.Module, text: Any, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
               device: str = "cpu") -> None:
    """Resize every decoder block's projections of ``model`` to the stored ``shapes`` (tensor
    name -> shape) where they differ (a shrunk folder's per-layer widths), in place: new Linears
    on ``device`` (``meta`` for a model streamed from disk), each attention's
    ``num_key_value_groups`` and each MLP's ``intermediate_size`` set to match."""
    names = {m: n for n, m in model.named_modules()}
    for block in decoder_layers(model):
        for parent_name in ("mlp", "self_attn"):
            parent = getattr(block, parent_name)
            prefix = names[parent]
            for child, mod in list(parent.named_children()):
                key = f"{prefix}.{child}.weight"
                if isinstance(mod, nn.Linear) and key in shapes:
                    w, bias = shapes[key], f"{prefix}.{child}.bias" in shapes
                    if tuple(w) != tuple(mod.weight.shape) or bias != (mod.bias is not None):
                        lin = nn.Linear(w[1], w[0], bias=bias, device="meta", dtype=dtype)
                        setattr(parent, child, lin if device == "meta" else lin.to_empty(device=device))
        attn = block.self_attn
        hd = int(getattr(attn, "head_dim", 0) or text.head_dim)
        n_q, n_kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        attn.num_key_value_groups = n_q // n_kv
        if hasattr(block.mlp, "intermediate_size"):
            block.mlp.intermediate_size = block.mlp.down_proj.in_features

@torch.no_grad()
def from_pretrained(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device_map: str | dict | torch.device | None = None) -> nn.Module:
    """Load a shrunk folder as a normal transformers model with the saved per-layer shapes.

    Builds the model from ``config.json``, resizes every decoder block's projections to the
    shapes in the safetensors file (``config.emprune_shrunk`` says which widths;
    :func:`fit_shapes`), and loads the weights (every tensor must fit: a missing or unexpected
    one raises). Folders without ``emprune_shrunk`` load as usual."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json (not a model folder)")
    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    shr = getattr(text, "emprune_shrunk", None)
    if not shr:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
        return model.eval()
    sd = _state_dict(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fit_shapes(model, text, {k: tuple(v.shape) for k, v in sd.items()}, dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set()
    if getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False):
        tied = {n for n in missing if n.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{path}: weights do not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    model.eval()
    if device_map is not None:
        model = place(model, device_map)
    return model

def load_shrunk(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                device_map: str | dict | torch.device | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a shrunk folder: the hook for ``models.load_causal_lm`` when
    ``DIR/emprune.json`` says ``"kind": "shrunk"``."""
    from transformers import AutoTokenizer

    return from_pretrained(folder, dtype, device_map), AutoTokenizer.from_pretrained(folder)
