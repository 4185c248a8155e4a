"""``emprune compare`` and ``emprune demo``: dense vs baselines vs EMP recipes on one model load."""
from __future__ import annotations

import sys
from pathlib import Path

from ..decide.recipes import names
from ..decide.scopes import SCOPES
from ..models.io import check_can_write
from .common import (MODEL_HELP, add_calib_args, add_model_args, beta_type, check_device, check_positions,
                     command_line, esc, int_at_least, list_type, positive_int, read_text, sparsity_type, torch_dtype)


HELP = "dense vs magnitude/Wanda vs EMP recipes (incl. matched sparsity): table + JSON + plot"
DESCRIPTION = ("Load MODEL once and evaluate: dense; magnitude and Wanda at --sparsity per row; EMP-magnitude and "
               "EMP-Wanda at --beta (paper recipe); the default recipe (and --recipes); magnitude/Wanda keeping each "
               "EMP run's per-unit counts (matched); and the EMP runs' criterion at their overall sparsity in every "
               "row (uniform). Same calibration and evaluation tokens for all. Writes OUT.md, OUT.json, OUT.png.")


def add_parser(sub) -> None:
    """The ``compare`` sub-command's parser."""
    cp = sub.add_parser("compare", help=HELP, description=DESCRIPTION)
    cp.add_argument("model", help=MODEL_HELP)
    cp.add_argument("--out", default="emprune-compare", help="output path prefix (default emprune-compare)")
    cp.add_argument("--targets", type=list_type, default="mlp",
                    help="comma-separated target sets: mlp, linear, or mlp,linear (default mlp)")
    cp.add_argument("--scope", choices=SCOPES, default="row", help="EMP scope (default row)")
    cp.add_argument("--beta", type=beta_type, default=1.0, help="EMP beta (default 1)")
    cp.add_argument("--sparsity", type=sparsity_type, default=0.5, help="fixed sparsity of the baselines (default 0.5)")
    cp.add_argument("--recipes", type=list_type, default="", help=esc("extra EMP-Wanda recipes, comma-separated: "
                                                       + ", ".join(names("prune"))))
    cp.add_argument("--no-uniform", action="store_true", help="skip the uniform equal-sparsity baselines")
    cp.add_argument("--no-matched", action="store_true", help="skip the matched-count baselines")
    cp.add_argument("--eval-tokens", type=positive_int, default=32768, help="evaluation tokens (default 32768)")
    cp.add_argument("--eval-seqlen", type=int_at_least(2), default=None, help="evaluation window (default: --seqlen)")
    cp.add_argument("--eval-text", default=None, help="evaluation text (default WikiText-2 test)")
    cp.add_argument("--other-text", default="python-docs",
                    help="second evaluation text, not WikiText (default python-docs: the Python Language "
                         "Reference shipped with Python); 'none' to skip")
    cp.add_argument("--other-tokens", type=positive_int, default=16384, help="tokens of the other text (default 16384)")
    cp.add_argument("--other-for", choices=("all", "emp", "none"), default="all",
                    help="rows evaluated on the other text: all, emp (dense and the EMP rows), none (default all)")
    add_calib_args(cp, 32, 512)
    add_model_args(cp)


def add_demo_parser(sub) -> None:
    """The ``demo`` sub-command's parser."""
    de = sub.add_parser("demo", help="a small but real compare on SmolLM2-135M (CPU, < ~15 min)",
                        description="emprune compare on smollm2-135m with small sizes (MLP targets, per row): "
                                    "dense, magnitude/Wanda 50%, EMP-magnitude, EMP-Wanda (paper), the default "
                                    "recipe and the matched baselines. Writes OUT.md/.json/.png.")
    de.add_argument("--model", default="smollm2-135m", help="model to use (default smollm2-135m)")
    de.add_argument("--out", default="emprune-demo/demo", help="output prefix (default emprune-demo/demo)")
    de.add_argument("--calib-samples", type=positive_int, default=16, help="calibration windows (default 16)")
    de.add_argument("--seqlen", type=int_at_least(2), default=256, help="calibration/evaluation window (default 256)")
    de.add_argument("--eval-tokens", type=positive_int, default=4096, help="evaluation tokens (default 4096)")
    de.add_argument("--other-tokens", type=positive_int, default=4096, help="tokens of python-docs text (default 4096)")
    de.add_argument("--calib-text", default=None, help="calibration text (default WikiText-2 validation)")
    de.add_argument("--eval-text", default=None, help="evaluation text (default WikiText-2 test)")
    de.add_argument("--quiet", action="store_true", help="no progress bar")


def _precheck_compare(args, other_text: str | None) -> None:
    """compare/demo: fail on the model's path, the windows, the texts and the output prefix
    before the model is loaded."""
    from ..models.loading import locate

    locate(args.model)
    read_text(args.calib_text, "calib")
    read_text(args.eval_text, "eval")
    if other_text is not None and not Path(other_text).is_file():
        from ..models.data import BUILTIN_NAMES, HUB_NAMES

        if other_text not in BUILTIN_NAMES + HUB_NAMES:
            raise FileNotFoundError(f"--other-text {other_text!r} is neither a file nor one of the text names "
                                    f"{list(BUILTIN_NAMES + HUB_NAMES)} (or 'none')")
    check_positions(args.model, args.seqlen)
    if getattr(args, "eval_seqlen", None):
        check_positions(args.model, args.eval_seqlen, "--eval-seqlen")
    check_can_write(Path(args.out).with_suffix(".json"), "--out")  # its folders are created (results/run1)


def run(args) -> int:
    """Run ``emprune compare``; returns 0 on success."""
    from ..jobs.compare import run_compare

    check_device(args.device)
    _precheck_compare(args, None if args.other_text == "none" else args.other_text)
    targets, recipes = list(args.targets), list(args.recipes)
    doc = run_compare(
        args.model, targets=targets, scope=args.scope, beta=args.beta, sparsity=args.sparsity,
        calib_samples=args.calib_samples, seqlen=args.seqlen, calib_text=args.calib_text,
        eval_tokens=args.eval_tokens, eval_seqlen=args.eval_seqlen, eval_text=args.eval_text,
        other_text=None if args.other_text == "none" else args.other_text, other_tokens=args.other_tokens,
        other_for=args.other_for, extra_recipes=recipes, uniform=not args.no_uniform,
        matched=not args.no_matched, seed=args.seed, batch_size=args.batch_size, out=args.out,
        command=command_line(args), progress=not args.quiet,
        device=None if args.device in (None, "cpu") else args.device, dtype=torch_dtype(args.dtype))
    _print_compare(doc, args.out)
    return 0


def _print_compare(doc: dict, out: str) -> None:
    from ..jobs.compare import markdown

    print(markdown(doc))
    print(f"results: {Path(out).with_suffix('.md')}, {Path(out).with_suffix('.json')}, "
          f"{Path(out).with_suffix('.png')} ({doc.get('wall_seconds', 0) / 60:.1f} min)")


def run_demo(args) -> int:
    """Run ``emprune demo``; returns 0 on success."""
    from ..jobs.compare import run_compare

    _precheck_compare(args, "python-docs")
    print(f"emprune demo: compare on {args.model} (MLP targets, per row; calibration {args.calib_samples} x "
          f"{args.seqlen} tokens, perplexity on {args.eval_tokens} WikiText-2 + {args.other_tokens} python-docs "
          f"tokens). Results go to {args.out}.md/.json/.png", file=sys.stderr)
    doc = run_compare(args.model, targets=("mlp",), calib_samples=args.calib_samples, seqlen=args.seqlen,
                      calib_text=args.calib_text, eval_text=args.eval_text,
                      eval_tokens=args.eval_tokens, other_tokens=args.other_tokens, other_for="emp",
                      uniform=True, matched=True, out=args.out, command=command_line(args),
                      progress=not args.quiet)
    _print_compare(doc, args.out)
    return 0
