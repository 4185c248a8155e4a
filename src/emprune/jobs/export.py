"""``emprune export``: a model (dense, pruned, shrunk with per-layer widths, healed) as a GGUF
file that llama.cpp runs, checked before the load and written atomically.

:func:`check_export` does every check that needs no weights (the type, the output file, the
model's architecture and, for a folder, its widths against the type's row blocks, read from the
safetensors headers); :func:`export` loads the model and writes the file with
:func:`emprune.models.export.write_gguf`. The tokenizer comes from a source GGUF when there is
one with the same vocabulary (the model itself when it is a GGUF or a short name, the model an
emprune folder was made from, or ``tokenizer_from``), else from the folder's transformers
tokenizer.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..models import checkpoint, loading
from ..models import export as gx
from ..models.io import check_can_write
from ..models.llamacpp import llama_cpp_module


@dataclass
class ExportPlan:
    """What :func:`check_export` found: the model's kind and place, the source of the
    tokenizer metadata (a GGUF or None), and the output path."""

    model: str
    kind: str
    where: Path | str
    source_gguf: Path | None
    out: Path
    qtype: str
    fallback: str | None


def _header_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a folder's ``*.safetensors`` files, from their JSON headers alone."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError(f"{f}: not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError(f"{f}: not a safetensors file (header of {n} bytes)")
            head = json.loads(fh.read(n))
        for k, v in head.items():
            if k != "__metadata__":
                shapes[k] = tuple(int(d) for d in v["shape"])
    return shapes


def _model_type(kind: str, where: Path | str) -> str | None:
    """The transformers model type (a folder's ``config.json``) or the GGUF architecture."""
    if kind == "folder":
        cfg = json.loads((Path(where) / "config.json").read_text())
        text = cfg.get("text_config") or cfg
        return text.get("model_type") or cfg.get("model_type")
    if kind == "gguf":
        meta = loading.gguf_metadata(Path(where), lambda k: k == "general.architecture")
        return meta.get("general.architecture")
    return None


def _source_gguf(spec: str, kind: str, where: Path | str, tokenizer_from: str | None) -> Path | None:
    """The GGUF whose tokenizer metadata the export copies (when its vocabulary matches)."""
    if tokenizer_from is not None:
        k, w = loading.locate(tokenizer_from)
        if k != "gguf":
            raise ValueError(f"--tokenizer-from {tokenizer_from}: expected a .gguf file or a short name")
        return Path(w)
    if kind == "gguf":
        return Path(where)
    if kind == "folder":  # an emprune output remembers the model it was made from
        src = (checkpoint.read_report(where) or {}).get("model")
        if isinstance(src, str):
            try:
                k, w = loading.locate(src)
            except (OSError, ValueError):
                return None
            return Path(w) if k == "gguf" else None
    return None


def check_export(model: str, out: str | os.PathLike, qtype: str, *, fallback: str | None = None,
                 overwrite: bool = False, tokenizer_from: str | None = None) -> ExportPlan:
    """Every check that needs no weights, each failing with one line: the type (and, for
    llama.cpp's own types, its binding), the fallback, the output (a ``.gguf`` name, not the
    input, an existing file only with ``overwrite``, writable), the model (found; a LLaMA-family
    architecture) and, for a folder, every matrix's rows against the type's blocks."""
    qtype = gx.type_arg(qtype)
    if fallback is not None:
        fallback = gx.type_arg(fallback)
        if fallback not in gx.NATIVE_TYPES:
            raise ValueError(f"--fallback must be one of {', '.join(gx.NATIVE_TYPES)}, got {fallback!r}")
    dest = Path(out).expanduser()
    if dest.suffix.lower() != ".gguf":
        raise ValueError(f"--gguf {out}: the file name must end in .gguf")
    kind, where = loading.locate(model)
    if kind == "gguf" and dest.resolve() == Path(where).resolve():
        raise ValueError(f"--gguf {out} is the input model itself; write to another file")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"--gguf {out} exists; pass --overwrite to replace it")
    check_can_write(dest, "--gguf")
    if qtype in gx.LLAMA_CPP_TYPES:
        llama_cpp_module(f"--type {qtype}")
    mt = _model_type(kind, where)
    if mt is not None and mt not in gx.EXPORTABLE:
        raise NotImplementedError(
            f"GGUF export supports LLaMA-family models ({', '.join(gx.EXPORTABLE)}: llama.cpp's llama for one "
            f"width, deci for per-layer widths); {model} is {mt!r}")
    if kind == "folder" and qtype in gx.NATIVE_TYPES:
        shapes = {k: v for k, v in _header_shapes(Path(where)).items() if len(v) >= 2 and "embed" not in k}
        gx.plan_types(shapes, qtype, fallback)  # a width off the type's blocks: refused now
    return ExportPlan(model, kind, where, _source_gguf(model, kind, where, tokenizer_from), dest, qtype, fallback)


def export(plan: ExportPlan, *, progress: bool = True) -> gx.ExportResult:
    """Load the model of ``plan`` (float32) and write its GGUF file; returns what was written."""
    model, tok = loading.load_causal_lm(plan.model, progress=progress)
    return gx.write_gguf(model, tok, plan.out, plan.qtype, source_gguf=plan.source_gguf, fallback=plan.fallback,
                         name=Path(str(plan.model)).name, progress=progress)


def format_result(res: gx.ExportResult, source: str) -> str:
    """The report printed after an export: architecture, widths, tensor types, size."""
    lay = res.layers
    ffn = (f"{lay.ffn[0]} in all {len(lay.ffn)} blocks" if len(set(lay.ffn)) == 1
           else f"{min(lay.ffn)}-{max(lay.ffn)} per block ({', '.join(map(str, lay.ffn))})")
    heads = (f"{lay.heads[0]} (KV {lay.kv_heads[0]})" if len(set(lay.heads)) == 1 and len(set(lay.kv_heads)) == 1
             else f"{', '.join(f'{h}/{k}' for h, k in zip(lay.heads, lay.kv_heads))} (query/KV per block)")
    types = ", ".join(f"{n} {t}" for t, n in sorted(res.type_counts.items(), key=lambda x: -x[1]))
    quant = res.qtype not in gx.FLOAT_TYPES
    lines = [f"exported {source} -> {res.path} ({res.bytes / 1e6:.1f} MB)",
             f"  llama.cpp architecture: {res.arch}"
             + ("" if res.arch == "llama" else " (per-layer widths: llama.cpp's Nemotron-NAS form)"),
             f"  MLP width: {ffn}", f"  heads: {heads}",
             f"  tensors: {types}" + (" (1-D norms and biases stay F32)" if quant else ""),
             f"  tokenizer: {res.tokenizer}"]
    if res.fallback:
        lines.append(f"  NOT quantised to {res.qtype} ({len(res.fallback)} matrices whose rows do not fit its "
                     f"blocks): {', '.join(res.fallback[:4])}{' ...' if len(res.fallback) > 4 else ''}")
    elif quant:
        lines.append(f"  every matrix quantised ({res.qtype}"
                     + (", llama.cpp's recipe mixes types" if res.qtype in gx.LLAMA_CPP_TYPES else "") + ")")
    if res.dropped_biases:
        lines.append(f"  dropped {res.dropped_biases} all-zero biases")
    return "\n".join(lines)


__all__ = ["ExportPlan", "check_export", "export", "format_result"]
