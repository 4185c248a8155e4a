"""``emprune bench``: is the pruned / shrunk / exported model faster and smaller where it runs?

Tokens per second of prompt processing (pp) and batch-1 generation (tg) in llama.cpp (a GGUF)
or PyTorch (a folder), size on disk and peak memory, paired with a baseline (``--vs``). The work
is :func:`emprune.jobs.bench.bench`; the options are the fields of
:class:`emprune.jobs.bench.BenchOptions`."""
from __future__ import annotations

import argparse
import dataclasses
import json

from ..jobs.bench import BenchOptions, bench, format_table
from ..models.io import atomic_path, check_can_write
from .common import MODEL_HELP, argument_type, command_line

HELP = "speed (pp and tg tok/s), size and peak memory of a model where it runs, vs a baseline"


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``bench`` sub-command's parser (its options: the fields of :class:`BenchOptions`)."""
    p = sub.add_parser(
        "bench", help=HELP,
        description="Tokens per second of prompt processing (pp: one batch of --prompt-tokens) and of batch-1 "
                    "generation (tg: --gen-tokens single-token decodes after the prompt), size on disk and peak "
                    "memory of MODEL, in llama.cpp for a .gguf file or short name (pip install 'emprune[deploy]') "
                    "and in PyTorch (CPU, float32) for a model folder. With --vs, the baseline is timed in "
                    "alternation with the model (A B, B A, ...), after one warm-up pass each, and the ratios "
                    "model / baseline are the medians of the per-pair ratios with their min-max range as the "
                    "noise. Medians over --repeats. Peak memory: a fresh child process per model loads it and "
                    "runs pp + tg once. One thread by default: see --threads.")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP + ", or a folder written by emprune")
    p.add_argument("--vs", default=None, metavar="BASELINE",
                   help="the baseline to compare with (a model as for MODEL; the same one gives the noise floor)")
    for f in dataclasses.fields(BenchOptions):
        meta = f.metadata
        if meta.get("cli") is False:
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        kw = {k: meta[k] for k in ("choices", "metavar", "action") if k in meta}
        if "type" in meta:
            kw["type"] = argument_type(meta["type"])
        p.add_argument(flag, dest=f.name, default=f.default, help=meta["help"], **kw)
    p.add_argument("--json", default=None, metavar="OUT",
                   help="also write everything (every raw timing included) as JSON to OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no notes on stderr")
    return p


def run(args) -> int:
    """Run ``emprune bench`` for parsed ``args``; returns 0 on success."""
    if args.json:
        check_can_write(args.json, "--json", parent_must_exist=True)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions) if hasattr(args, f.name)}
    res = bench(args.model, args.vs, BenchOptions(**fields, progress=not args.quiet))
    res["command"] = command_line(args)
    print(format_table(res))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
