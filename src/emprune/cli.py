"""The ``emprune`` command line."""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Sequence

from . import __version__
from .io import load_state_dict
from .report import PruneReport
from .scopes import SCOPES, Target, decide


def inspect_checkpoint(path: str, beta: float = 1.0, scope: str = "row", *, sparsity: float | None = None,
                       include: str | None = None, exclude: str | None = None,
                       min_keep: float | int | None = None) -> PruneReport:
    """EMP on the magnitudes of a checkpoint's weight tensors (2-D and up, floating point):
    what would be kept, without needing the model's class.  Nothing is written."""
    import time

    start = time.perf_counter()
    sd = load_state_dict(path)
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    tensors = {k: v for k, v in sd.items() if v.dim() >= 2 and v.is_floating_point()
               and (inc is None or inc.search(k)) and (exc is None or not exc.search(k))}
    if not tensors:
        raise ValueError(f"{path}: no floating-point tensors with 2 or more dims matched")
    targets = [Target(k, v.shape, (lambda v=v: v)) for k, v in tensors.items()]
    report = PruneReport(criterion="magnitude", count_by="magnitude", scope=scope,
                         beta=None if sparsity is not None else beta, target_sparsity=sparsity,
                         min_keep=min_keep)
    for d in decide(targets, scope, beta, sparsity=sparsity, min_keep=min_keep):  # type: ignore[arg-type]
        report.add(d, int((~d.mask | (tensors[d.name] == 0)).sum()))
    report.seconds = time.perf_counter() - start
    return report


def _min_keep(s: str | None) -> float | int | None:
    if s is None:
        return None
    return float(s) if any(c in s for c in ".eE") else int(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="emprune",
        description="Effective Model Pruning: keep floor(beta * N_eff) of every group of scores, "
                    "N_eff = (sum|s|)^2 / sum s^2. Commands:\n"
                    "  inspect   what EMP would keep in a checkpoint (magnitude scores)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"emprune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    ins = sub.add_parser("inspect", help="per-tensor EMP table of a checkpoint (magnitude scores)",
                         description="Print, for every weight tensor (2+ dims) of a .safetensors file or a "
                                     "PyTorch state dict (loaded with weights_only=True), the N_eff, the "
                                     "number EMP keeps, the sparsity and the retained magnitude mass with "
                                     "its lower bound. Needs no model class; writes nothing.")
    ins.add_argument("checkpoint", help=".safetensors file or PyTorch state dict (.pt/.pth/.bin)")
    ins.add_argument("--beta", type=float, default=1.0, help="keep floor(beta * N_eff) per unit (default 1)")
    ins.add_argument("--scope", choices=SCOPES, default="row",
                     help="row: per output row; layer: per tensor; global: one N_eff over all (default row)")
    ins.add_argument("--sparsity", type=float, default=None, help="fixed sparsity instead of EMP's count")
    ins.add_argument("--min-keep", default=None, help="per-unit floor: a fraction (0.05) or a count (8)")
    ins.add_argument("--include", default=None, help="regex: only tensors whose name matches")
    ins.add_argument("--exclude", default=None, help="regex: skip tensors whose name matches")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "inspect":
            rep = inspect_checkpoint(args.checkpoint, args.beta, args.scope, sparsity=args.sparsity,
                                     include=args.include, exclude=args.exclude, min_keep=_min_keep(args.min_keep))
            print(rep.to_json() if args.json else rep.table())
            return 0
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"emprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
