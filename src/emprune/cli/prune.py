"""``emprune prune``: masks on a causal LM, saved as a transformers folder with ``emprune.json``."""
from __future__ import annotations

import argparse
import sys

from ..act.report import PruneReport
from ..decide.scopes import SCOPES
from .common import (MODEL_HELP, add_calib_args, add_model_args, beta_type, calibration_ids, check_device,
                     check_seqlen, claim_out, cli_names, command_line, offload_mode, damp_type, device_map, esc, min_keep_type,
                     nm_type, open_fraction_type, sparsity_type, torch_dtype)


def add_parser(sub) -> None:
    """The ``prune`` sub-command's parser."""
    from ..models.stream import FIT_FRACTION
    from ..decide.recipes import DEFAULT_PRUNE as DEFAULT_RECIPE, RECIPES, choices, names
    from ..jobs.prune_lm import DEFAULT_DAMP, DEFAULT_DAMP_KIND, count_by_choices, criterion_choices

    pr = sub.add_parser(
        "prune", help="prune a causal LM with EMP and save it (transformers folder + emprune.json)",
        description="Prune the MLP (or all) Linears of every decoder block of a causal LM, in place, "
                    "calibrating block by block on the outputs of the already-pruned blocks (Wanda-style), "
                    "and save a folder that plain transformers loads (from_pretrained(DIR)) plus "
                    "DIR/emprune.json. Embeddings and lm_head are never pruned. Default recipe: "
                    f"{DEFAULT_RECIPE} ({RECIPES[DEFAULT_RECIPE].summary}); --recipe paper is the paper's "
                    "exact rule. Options and texts are checked before the model is loaded.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("model", help=MODEL_HELP)
    pr.add_argument("--out", required=True,
                    help="output folder (created; never the current folder or one of its parents; a symlink "
                         "is followed and kept)")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace --out if it is an earlier emprune output (holds emprune.json); any other "
                         "non-empty folder is refused")
    pr.add_argument("--criterion", choices=criterion_choices(), default="wanda",
                    help="which entries to keep: |W| or Wanda |W|*||X|| (default wanda)")
    pr.add_argument("--scope", choices=SCOPES, default="row",
                    help="row: per output row (paper); layer: per matrix; global: one decision over all "
                         "targeted weights (Wanda norms then come from one dense pass). Default row")
    pr.add_argument("--beta", type=beta_type, default=1.0, help="keep floor(beta * N_eff) per unit (default 1)")
    pr.add_argument("--sparsity", type=sparsity_type, default=None,
                    help="fixed sparsity in [0, 1) per unit instead of EMP (the magnitude/Wanda baselines)")
    pr.add_argument("--targets", choices=("mlp", "linear"), default="mlp",
                    help="mlp: gate/up/down of every block (paper); linear: also q/k/v/o (default mlp)")
    pr.add_argument("--recipe", choices=choices("prune"), default="default",
                    help=esc(f"where EMP's counts come from; default = {DEFAULT_RECIPE}; paper = the "
                              "criterion's own scores per unit, no floor. "
                              + "; ".join(f"{k}: {RECIPES[k].summary}" for k in names("prune"))))
    pr.add_argument("--count-by", choices=count_by_choices(), default=None,
                    help="override the recipe: scores whose N_eff sets the count (same = the criterion's)")
    pr.add_argument("--min-keep", type=min_keep_type, default=None,
                    help="override the recipe: per-unit floor, a fraction (0.3) or a count (64)")
    pr.add_argument("--count-unit", choices=("unit", "layer"), default=None,
                    help="override the recipe: one count per unit, or per layer spread over its rows")
    g = pr.add_argument_group("reconstruction and allocation")
    g.add_argument("--update", choices=("auto", "obs", "none"), default="auto",
                   help="obs: after the counts are decided, SparseGPT's second-order reconstruction chooses which "
                        "weights of each row go (exactly the decided count per row) and updates the others, "
                        "layer-wise on the outputs of the already-pruned blocks; with --sparsity this is SparseGPT. "
                        "none: the criterion chooses, nothing is rewritten. auto (default): the recipe's (obs for "
                        "the default recipe) when EMP decides the counts with an activation-aware criterion such "
                        "as wanda; none for --sparsity/--nm baselines, data-free criteria and --scope global")
    g.add_argument("--damp", type=damp_type, default=None,
                   help="dampening of the OBS update: the fraction of the Hessian's diagonal added to it (see "
                        f"--damp-kind; default {DEFAULT_DAMP:g}, chosen on text nobody calibrated on; larger values "
                        "fit the calibration text less)")
    g.add_argument("--damp-kind", choices=("mean", "diag"), default=DEFAULT_DAMP_KIND,
                   help="mean: --damp x the mean Hessian diagonal is added to every diagonal entry (SparseGPT, "
                        "whose default is --damp 0.01); diag: --damp x each entry itself (large values move OBS "
                        f"towards Wanda). Default {DEFAULT_DAMP_KIND}")
    g.add_argument("--nm", type=nm_type, default=None, metavar="N:M",
                   help="semi-structured N:M: keep N of every M consecutive weights of a row (e.g. 2:4), chosen "
                        "by the criterion, or by OBS with --update obs")
    g.add_argument("--target-sparsity", type=open_fraction_type, default=None, metavar="P",
                   help="EMP with the beta whose counts prune the fraction P of the targets (bisection on the "
                        "counts of the dense model; the achieved fraction is reported)")
    g.add_argument("--allocation", choices=("uniform", "owl"), default="uniform",
                   help="with --sparsity: uniform (every layer the same) or owl (outlier-weighted per-layer "
                        "sparsities, Yin et al. 2024: M=5, lambda=0.08, mean = --sparsity). Default uniform")
    add_calib_args(pr, 128, 512)
    add_model_args(pr)
    pr.add_argument("--offload", nargs="?", const="cpu", choices=("cpu", "disk", "none"), default=None,
                    help="cpu (the value when none is given): keep the model in CPU memory and move one decoder "
                         "block at a time to --device cuda (models larger than the GPU). disk: leave the weights in "
                         "the model folder's safetensors shards and read, prune and write one block at a time "
                         "(models larger than memory; peak memory is one block plus the embeddings); the default, "
                         "said on stderr, for a local folder whose weights would take more than "
                         f"{int(100 * FIT_FRACTION)}%% of the available memory. none: load the whole model in memory "
                         "even then. See docs/llm.md")
    pr.add_argument("--save-dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="dtype of the saved weights (default: the --dtype the model was loaded in); pruned "
                         "zeros stay exact zeros. bfloat16 halves the folder of a float32 run")


def run(args) -> int:
    """Run ``emprune prune`` for parsed ``args``; returns 0 on success."""
    import time

    from ..jobs.options import PruneOptions
    from ..jobs.prune_lm import plan, prune_lm
    from ..models import checkpoint, data, loading
    from ..structure.layouts import find_layout

    t0 = time.perf_counter()
    mk = args.min_keep
    # everything that does not need the model is checked before the (slow) load
    if args.sparsity is not None and (args.count_by or mk is not None or args.count_unit):
        raise ValueError("--count-by/--min-keep/--count-unit shape EMP's counts; they have no meaning with --sparsity")
    if args.offload == "cpu" and args.device in (None, "cpu", "auto"):
        raise ValueError("--offload needs an execution device: --device cuda (or cuda:N)")
    check_device(args.device)
    stream = offload_mode(args.model, args.offload, args.dtype, args.device)
    if stream and args.scope == "global":
        raise ValueError("--scope global decides over every weight at once, which --offload disk never holds; "
                         "use --scope row or layer")
    options = PruneOptions(criterion=args.criterion, scope=args.scope, beta=args.beta, sparsity=args.sparsity,
                           targets=args.targets, recipe=args.recipe, count_by=args.count_by, min_keep=mk,
                           count_unit=args.count_unit, update=args.update, damp=args.damp, damp_kind=args.damp_kind,
                           nm=args.nm, target_sparsity=args.target_sparsity, allocation=args.allocation,
                           progress=not args.quiet, batch_size=args.batch_size,
                           device=None if args.device in (None, "cpu", "auto") else args.device)
    try:
        p = plan(options)
    except ValueError as e:  # name the options as the command line spells them
        raise ValueError(cli_names(str(e))) from None
    # a missing path, or the hub while offline, fails here at once (loading.locate)
    out = claim_out(args.out, args.overwrite, [args.model])
    calib_src = tok = ids = None
    if p.needs_data:
        calib_src, tok, ids = calibration_ids(args.model, args.calib_text, args.seqlen)
    if stream:
        return _run_streamed(args, options, out, calib_src, tok, ids, t0)
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tok = loading.load_causal_lm(args.model, dtype=torch_dtype(args.dtype),
                                       device_map=None if args.offload == "cpu" else device_map(args.device),
                                       progress=not args.quiet, tokenizer=tok)
    find_layout(model)  # an unsupported layout is refused now, before any calibration
    calib = None
    if ids is not None:
        check_seqlen(model, args.seqlen)  # where the positions could not be read before the load
        calib = data.calibration_windows(ids, args.calib_samples, args.seqlen, args.seed)
    res = prune_lm(model, calib, options)
    info = dict(res.info)
    info["model"] = args.model
    info["command"] = command_line(args)
    info["calibration"].update(text=calib_src, seed=args.seed)
    save_dtype = torch_dtype(args.save_dtype or args.dtype)  # default: the dtype it was loaded in
    info["saved_dtype"] = str(save_dtype).replace("torch.", "")
    info["total_seconds"] = time.perf_counter() - t0
    saved = checkpoint.save_pruned(model, tok, out, info, overwrite=args.overwrite, dtype=save_dtype,
                               progress=not args.quiet)
    _print_result(res, saved)
    return 0


def _run_streamed(args, options, out, calib_src, tok, ids, t0: float) -> int:
    """``emprune prune --offload disk``: block by block from the folder's shards into new shards."""
    from ..jobs.offload import Output, prune_to_disk
    from ..models import data, loading

    if tok is None:
        tok = loading.load_tokenizer(args.model)
    calib = data.calibration_windows(ids, args.calib_samples, args.seqlen, args.seed) if ids is not None else None
    info = {"model": args.model, "command": command_line(args), "calibration": {"text": calib_src, "seed": args.seed}}
    print(f"streaming {args.model} from disk, one block at a time ...", file=sys.stderr)
    output = Output(out, tok, torch_dtype(args.save_dtype or args.dtype), args.overwrite, info, t0)
    res, saved = prune_to_disk(loading.locate(args.model)[1], calib, options, output, torch_dtype(args.dtype))
    _print_result(res, saved)
    return 0


def _print_result(res, saved) -> None:
    """The table, the summary line, the warnings and where the folder is."""
    from ..jobs.prune_lm import summary_line
    from ..models import checkpoint

    print(_short_table(res.report))
    print(summary_line(res))
    for w in res.report.warnings[:10]:
        print(f"WARNING: {w}")
    if len(res.report.warnings) > 10:
        print(f"WARNING: ... and {len(res.report.warnings) - 10} more (see emprune.json)")
    print(f"saved to {saved} (load with transformers: AutoModelForCausalLM.from_pretrained({str(saved)!r})); "
          f"report: {saved / checkpoint.REPORT_NAME}")


def _short_table(report: PruneReport) -> str:
    """The core table, shortened for models with many blocks (first/last lines + totals)."""
    lines = report.table().split("\n")
    body = [l for l in lines if not l.startswith("WARNING")]
    if len(body) > 40:
        body = body[:20] + [f"... ({len(body) - 36} more rows in emprune.json) ..."] + body[-16:]
    return "\n".join(body)
