"""The ``emprune shrink`` command: structured EMP on a causal LM, saved as a smaller model.

``cli.py`` wires it in with :func:`add_parser` (on its sub-parsers) and :func:`run` (returns an
exit code; bad input raises ``ValueError`` / ``FileExistsError`` / ``FileNotFoundError``, which the
main entry point prints as one line). ``python -m emprune.llm.shrink_cli ...`` runs it alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time

from ..jobs.options import keep_size
from ..jobs import options as O
from .common import (add_calib_args, beta_type, calibration_ids, check_seqlen, claim_out, offload_mode,
                     positive_int, torch_dtype, units_type)

_FIELDS = {f.name: f for f in dataclasses.fields(O.ShrinkOptions)}
HELP = "remove MLP neurons / attention heads / whole decoder blocks physically with EMP and save a smaller model"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``shrink`` sub-command to ``subparsers`` (an ``argparse`` sub-parsers object)."""
    from .. import criteria as C
    from ..models.stream import FIT_FRACTION
    from ..decide.recipes import (DEFAULT_SHRINK as DEFAULT_RECIPE, DEFAULT_SHRINK_LM as DEFAULT_RECIPE_LM,
                                  DEFAULT_SHRINK_MIXED as DEFAULT_RECIPE_MIXED, RECIPES, choices, names)
    from ..jobs.shrink import DEFAULT_CRITERION, DEFAULT_SCOPE

    p = subparsers.add_parser(
        "shrink", help=HELP,
        description="Score the MLP neurons and/or attention heads of every decoder block (or the blocks "
                    "themselves, --units layers), let EMP decide how "
                    "many to keep, and remove the rest physically (smaller Linear layers, fewer heads; "
                    "head_dim unchanged, GQA-consistent; fewer blocks, a stock config). Saves safetensors + config + tokenizer + emprune.json. "
                    "Per-layer widths load with emprune.from_pretrained(DIR) (and emprune eval DIR); "
                    "--uniform gives one width per model that plain transformers loads. Default: "
                    f"--units mlp --criterion {DEFAULT_CRITERION} --scope {DEFAULT_SCOPE} --recipe "
                    f"{DEFAULT_RECIPE_LM} ({RECIPES[DEFAULT_RECIPE_LM].summary}); without calibration data "
                    f"(--criterion magnitude --no-compensate) or with --scope layer, {DEFAULT_RECIPE} for one unit "
                    f"kind and {DEFAULT_RECIPE_MIXED} for several; "
                    "--recipe paper --scope layer is the paper's exact rule.")
    p.add_argument("model", help="causal LM: a transformers folder, a .gguf file, a hub id (online) or smollm2-135m")
    p.add_argument("--out", required=True, help="output folder (created; see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an earlier emprune output (holds emprune.json)")
    p.add_argument("--units", type=units_type, default="mlp",
                   help="mlp, heads, layers (whole decoder blocks), hidden (residual channels) or a comma list "
                        "(layers,hidden,mlp: blocks, then channels, then widths; see --budget; default mlp: at equal size it kept lower perplexity than mlp,heads on "
                        "SmolLM2-135M, see benchmarks/results/shrink_smollm2.md)")
    for name in ("layer_score", "hidden_score", "layer_select", "budget"):  # described once, in ShrinkOptions
        meta = _FIELDS[name].metadata
        p.add_argument("--" + name.replace("_", "-"), choices=meta["choices"], default=None,
                       help=meta["help"].replace("%", "%%"))
    p.add_argument("--criterion", choices=C.names(level="unit"), default=None,
                   help=f"unit score (default {DEFAULT_CRITERION}): magnitude (weight norms), activation "
                        "(||X|| * ||W_out||), fluctuation (FLAP: Var(X) * ||W_out||^2), taylor (|dL/dX * X|)")
    p.add_argument("--scope", choices=("layer", "global"), default=None,
                   help=f"layer: EMP per layer; global: one decision over all layers and unit kinds "
                        f"(default {DEFAULT_SCOPE} with the default recipe, layer otherwise)")
    p.add_argument("--recipe", choices=choices("shrink"), default="default",
                   help="; ".join(f"{k}: {RECIPES[k].summary}" for k in names("shrink")).replace("%", "%%"))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--beta", type=beta_type, default=None, help="keep floor(beta * N_eff) (default 1)")
    size.add_argument("--keep", default=None,
                      help="fixed size instead of EMP: a fraction (0.75) or a count (1024) of units per layer")
    p.add_argument("--uniform", action="store_true",
                   help="one width per model (intermediate size a multiple of 64, heads a multiple of the "
                        "KV-group count) so that plain AutoModelForCausalLM.from_pretrained loads the folder")
    p.add_argument("--head-mode", choices=("query", "group"), default="query",
                   help="query: every KV group keeps the same number of query heads; group: whole KV groups")
    p.add_argument("--multiple-of", type=positive_int, default=O.DEFAULT_MULTIPLE_OF, metavar="N",
                   help=f"every kept MLP width a multiple of N, or the layer's full width (default "
                        f"{O.DEFAULT_MULTIPLE_OF}: GGUF Q8_0/Q4_0 rows; 256 for K-quants; 1: any width). The "
                        "allocation chooses the widths on that grid, EMP's total kept to within N/2 neurons of "
                        "one layer; --keep sizes and per-layer counts go to the nearest multiple; with --uniform "
                        "the width is a multiple of lcm(64, N). MLP neurons only: heads are whole units already")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--compensate", dest="compensate", action="store_true", default=None,
                      help="fold removed units' mean output into a bias (FLAP; default: the recipe's)")
    comp.add_argument("--no-compensate", dest="compensate", action="store_false", help="no bias compensation")
    add_calib_args(p, 32, 512, "calibration (activation, fluctuation and Taylor scores)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weights dtype (default float32)")
    p.add_argument("--offload", choices=("disk", "none"), default=None,
                   help="disk: leave the weights in the model folder's safetensors shards (or the .gguf file) and "
                        "score, measure and shrink one decoder block at a time, each written as it is done (models "
                        "larger than memory; --units mlp and/or heads; the same result as in memory); the default, "
                        "said on stderr, for a local folder whose weights would take more than "
                        f"{int(100 * FIT_FRACTION)}%% of the available memory. none: load the whole model in memory "
                        "even then. See docs/llm.md")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``emprune shrink`` for parsed ``args``; returns 0 on success."""
    from .. import criteria as C
    from ..jobs.budget import check_budget
    from ..decide.recipes import get_recipe
    from ..jobs.shrink import DEFAULT_CRITERION
    from ..jobs.shrink_disk import check_streamable
    from ..jobs.shrink_lm import shrink_lm
    from ..models import checkpoint, data, loading

    t0 = time.perf_counter()
    units = O.lm_units(args.units)  # a parse-time check; again for callers of run() with their own args
    if args.beta is not None and (args.beta <= 0 or args.beta != args.beta or args.beta == float("inf")):
        raise ValueError(f"--beta must be a positive finite number, got {args.beta}")
    if args.calib_samples < 1 or args.seqlen < 2:
        raise ValueError("--calib-samples must be >= 1 and --seqlen >= 2")
    try:
        keep = keep_size(args.keep)
    except ValueError as e:
        raise ValueError(f"--keep {e}") from None
    multiple_of = getattr(args, "multiple_of", O.DEFAULT_MULTIPLE_OF)
    try:  # a parse-time check too; again for callers of run() with their own args
        multiple_of = O.positive_int(multiple_of)
    except ValueError as e:
        raise ValueError(f"--multiple-of {e}") from None
    rec = get_recipe(args.recipe, "shrink")
    check_budget(units.split(","), getattr(args, "budget", None), uniform=args.uniform, keep=keep, recipe=args.recipe)
    # the same output-folder rules as `emprune prune` (never the current folder or a parent, only
    # an earlier emprune output is replaced, symlinks followed, writability probed), before loading
    # a missing path, or the hub while offline, fails here at once (loading.locate)
    stream = offload_mode(args.model, getattr(args, "offload", None), args.dtype, None)
    if stream:
        check_streamable(units.split(","), budget=getattr(args, "budget", None), criterion=args.criterion)
    out = claim_out(args.out, args.overwrite, [args.model])
    criterion = args.criterion or DEFAULT_CRITERION
    comp = args.compensate if args.compensate is not None else (rec.compensate and keep is None)
    needs_data = C.entry(criterion, level="unit").needs_calibration or comp or rec.allocate == "sensitivity"
    if "layers" in units.split(","):
        needs_data = needs_data or getattr(args, "layer_score", None) != "magnitude" or (
            getattr(args, "layer_select", None) == "greedy")
    if "hidden" in units.split(","):
        needs_data = needs_data or getattr(args, "hidden_score", None) != "magnitude"
    src = tok = ids = None
    if needs_data:  # the text, the windows and the tokens are checked before the (slow) model load
        src, tok, ids = calibration_ids(args.model, args.calib_text, args.seqlen)
    dtype = torch_dtype(args.dtype)
    options = O.ShrinkOptions(units=units, criterion=criterion, scope=args.scope,
                              beta=1.0 if args.beta is None else args.beta, keep=keep, recipe=args.recipe,
                              head_mode=args.head_mode, compensate=args.compensate,
                              layer_score=getattr(args, "layer_score", None),
                              layer_select=getattr(args, "layer_select", None), budget=getattr(args, "budget", None),
                              hidden_score=getattr(args, "hidden_score", None), multiple_of=multiple_of,
                              uniform=args.uniform, batch_size=args.batch_size, progress=not args.quiet)
    command = "emprune " + " ".join(shlex.quote(a) for a in getattr(args, "_argv", []))
    if stream:
        return _run_streamed(args, options, out, (src, tok, ids), command, t0)
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tok = loading.load_causal_lm(args.model, dtype=dtype, progress=not args.quiet, tokenizer=tok)
    calib = None
    if ids is not None:
        check_seqlen(model, args.seqlen)
        calib = data.calibration_windows(ids, args.calib_samples, args.seqlen, args.seed)
    report, info = shrink_lm(model, calib, options)
    info["model"] = args.model
    info["command"] = command
    info["calibration"].update(text=src, seed=args.seed)
    info["total_seconds"] = time.perf_counter() - t0
    saved = checkpoint.save_shrunk(model, tok, out, info, overwrite=args.overwrite, progress=not args.quiet)
    _print_result(report, info, saved, args.uniform)
    return 0


def _run_streamed(args: argparse.Namespace, options, out, calibration: tuple, command: str, t0: float) -> int:
    """``emprune shrink --offload disk``: scored, measured and shrunk block by block from the
    folder's shards (or the GGUF file) into new shards."""
    from ..jobs.offload import Output, shrink_to_disk
    from ..models import data, loading

    src, tok, ids = calibration
    if tok is None:
        tok = loading.load_tokenizer(args.model)
    calib = data.calibration_windows(ids, args.calib_samples, args.seqlen, args.seed) if ids is not None else None
    print(f"streaming {args.model} from disk, one block at a time ...", file=sys.stderr)
    dtype = torch_dtype(args.dtype)
    output = Output(out, tok, dtype, args.overwrite, {"model": args.model, "command": command,
                                                       "calibration": {"text": src, "seed": args.seed}}, t0)
    report, info, saved = shrink_to_disk(loading.locate(args.model)[1], calib, options, output, dtype)
    _print_result(report, info, saved, args.uniform)
    return 0


def _print_result(report, info: dict, saved, uniform: bool) -> None:
    """The table (shortened for many groups), where the folder is and how it loads."""
    from ..models import checkpoint

    lines = str(report).split("\n")
    if len(lines) > 40:
        lines = lines[:20] + [f"... ({len(lines) - 36} more rows in emprune.json) ..."] + lines[-16:]
    print("\n".join(lines))
    how = ("AutoModelForCausalLM.from_pretrained(DIR) or emprune.from_pretrained(DIR)"
           if info["layout"] == "uniform" else "emprune.from_pretrained(DIR) (per-layer widths)")
    if uniform and info["layout"] != "uniform":
        print("WARNING: --uniform could not give a stock config for this model (see emprune.json); "
              "load it with emprune.from_pretrained(DIR)")
    print(f"saved to {saved}; load with {how}; report: {saved / checkpoint.REPORT_NAME}")
