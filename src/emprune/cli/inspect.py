"""``emprune inspect``: what EMP would keep in a checkpoint, from magnitudes (no model class)."""
from __future__ import annotations

from ..decide.scopes import SCOPES
from ..jobs.inspect import inspect_checkpoint
from .common import beta_type, min_keep_type, regex_type, sparsity_type


def add_parser(sub) -> None:
    """The ``inspect`` sub-command's parser."""
    ins = sub.add_parser("inspect", help="per-tensor EMP table of a checkpoint (magnitude scores)",
                         description="Print, for every weight tensor (2+ dims) of a .safetensors file or a "
                                     "PyTorch state dict (loaded with weights_only=True), the N_eff, the "
                                     "number EMP keeps, the sparsity and the retained magnitude mass with "
                                     "its lower bound. Needs no model class; writes nothing.")
    ins.add_argument("checkpoint", help=".safetensors file or PyTorch state dict (.pt/.pth/.bin)")
    ins.add_argument("--beta", type=beta_type, default=1.0, help="keep floor(beta * N_eff) per unit (default 1)")
    ins.add_argument("--scope", choices=SCOPES, default="row",
                     help="row: per output row; layer: per tensor; global: one N_eff over all (default row)")
    ins.add_argument("--sparsity", type=sparsity_type, default=None,
                     help="fixed sparsity in [0, 1) instead of EMP's count")
    ins.add_argument("--min-keep", type=min_keep_type, default=None,
                     help="per-unit floor: a fraction (0.05) or a count (8)")
    ins.add_argument("--include", type=regex_type, default=None, help="regex: only tensors whose name matches")
    ins.add_argument("--exclude", type=regex_type, default=None, help="regex: skip tensors whose name matches")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    """Print the per-tensor table (or JSON) of ``args.checkpoint``."""
    rep = inspect_checkpoint(args.checkpoint, args.beta, args.scope, sparsity=args.sparsity,
                             include=args.include, exclude=args.exclude, min_keep=args.min_keep)
    print(rep.to_json() if args.json else rep.table())
    return 0
