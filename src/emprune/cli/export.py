"""``emprune export``: a model as a GGUF file that llama.cpp runs (per-layer widths as llama.cpp's
``deci``, one width as ``llama``), quantised. The work is :mod:`emprune.jobs.export`."""
from __future__ import annotations

import argparse
import json

from ..jobs.export import check_export, export, format_result
from ..models.export import NATIVE_TYPES, TYPES
from ..models.io import atomic_path, check_can_write
from .common import MODEL_HELP

HELP = "write a model (dense, pruned, shrunk, healed) as a GGUF file that llama.cpp runs"


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``export`` sub-command's parser."""
    p = sub.add_parser(
        "export", help=HELP,
        description="Write MODEL as one GGUF file for llama.cpp (and the tools built on it). A model whose blocks "
                    "all have the same widths is written as llama.cpp's 'llama' architecture; per-layer widths "
                    "(the default of emprune shrink) as 'deci' (Nemotron-NAS), which builds every block with its "
                    "own MLP width and head counts. Every matrix gets --type (norms and biases stay float32); a "
                    "matrix whose rows are not a multiple of the type's block (32 for q8_0/q4_0) is refused "
                    "unless --fallback names a type for it: shrink with --multiple-of to avoid it. K-quants (block "
                    "256) go through llama.cpp's quantiser, which gives rows off 256 a 32-block type of its own "
                    "choice; a matrix it would leave in a float type is refused the same way. The tokenizer is copied from the source GGUF when there is one (the model itself, "
                    "or the model an emprune folder was made from), else built from the folder's tokenizer. The "
                    "file is written beside its destination and renamed into place when complete. LLaMA-family "
                    "models only (llama, mistral; SmolLM2 is one).")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP + ", or a folder written by emprune")
    p.add_argument("--gguf", required=True, metavar="OUT", help="the GGUF file to write (a name ending in .gguf)")
    p.add_argument("--type", dest="qtype", default="f16", metavar="TYPE",
                   help=f"tensor type of the matrices (default f16): {', '.join(TYPES)}; "
                        f"{', '.join(t for t in TYPES if t not in NATIVE_TYPES)} go through llama.cpp's own "
                        "quantiser (pip install 'emprune[deploy]')")
    p.add_argument("--fallback", default=None, metavar="TYPE",
                   help="type for matrices whose rows do not fit --type's blocks (default: refuse them), e.g. "
                        "f16 or q8_0; with llama.cpp's types: accept the float matrices its quantiser leaves")
    p.add_argument("--tokenizer-from", default=None, metavar="GGUF",
                   help="copy the tokenizer metadata from this GGUF file or short name (it must have the same "
                        "vocabulary)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT file")
    p.add_argument("--json", default=None, metavar="FILE", help="also write what was written as JSON to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``emprune export`` for parsed ``args``; returns 0 on success."""
    if args.json:
        check_can_write(args.json, "--json", parent_must_exist=True)
    plan = check_export(args.model, args.gguf, args.qtype, fallback=args.fallback, overwrite=args.overwrite,
                        tokenizer_from=args.tokenizer_from)
    res = export(plan, progress=not args.quiet)
    print(format_result(res, args.model))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"model": args.model, **res.to_dict()}, indent=2) + "\n")
    return 0
