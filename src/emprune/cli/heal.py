"""The ``emprune heal`` command: a short recovery fine-tune of a pruned or shrunk model.

``cli.py`` wires it in with :func:`add_parser` (on its sub-parsers) and :func:`run` (returns an
exit code; bad input raises ``ValueError`` / ``FileExistsError`` / ``FileNotFoundError``, which the
main entry point prints as one line). The work is :func:`emprune.llm.heal.heal`.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .common import (beta_type, check_positions, check_seqlen, claim_out, int_at_least, positive_int, read_text,
                     text_ids)

HELP = "recover quality with a short fine-tune that keeps pruned weights at zero (full or LoRA)"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``heal`` sub-command to ``subparsers`` (an ``argparse`` sub-parsers object)."""
    from ..jobs.heal import (DEFAULT_BATCH, DEFAULT_DISTILL_LR, DEFAULT_LORA_LR, DEFAULT_LR, DEFAULT_SCHEDULE,
                       DEFAULT_SEQLEN, DEFAULT_STEPS, DEFAULT_WARMUP, SCHEDULES)

    p = subparsers.add_parser(
        "heal", help=HELP,
        description="Fine-tune a model written by emprune prune (pruned weights are held at exactly zero: "
                    "their gradients are masked and they are re-zeroed after every optimizer step) or emprune "
                    "shrink (trained at its smaller shapes), with transformers' Trainer (AdamW), on windows of "
                    "a healing text (default: the calibration text, WikiText-2 validation; never the evaluation "
                    "text). --lora R trains peft adapters instead and merges them, re-applying the masks. "
                    "Saves the same layout it read, plus emprune.json's 'healing' record (text, tokens, steps, "
                    "lr, loss and perplexity curves, zero counts before/after). Multi-GPU: accelerate launch "
                    "-m emprune.cli heal ... (see docs/llm.md).")
    p.add_argument("model", help="a folder written by emprune prune / shrink (or any causal LM: a transformers "
                                 "folder, a .gguf file, smollm2-135m, which is then fine-tuned without masks)")
    p.add_argument("--out", required=True, help="output folder (created; checked before training; see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an earlier emprune output (holds emprune.json)")
    p.add_argument("--text", default=None,
                   help="healing text: a file (default: the calibration text, WikiText-2 validation shipped with "
                        "emprune), 'python-docs' or 'wikitext2'/'c4' (online); refused if it is the --eval-text")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--steps", type=positive_int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS})")
    size.add_argument("--tokens", type=positive_int, default=None,
                      help="token budget instead of --steps (rounded up to whole steps)")
    p.add_argument("--lr", type=beta_type, default=None,
                   help=f"peak learning rate (default {DEFAULT_LR:g} with the next-token loss, {DEFAULT_DISTILL_LR:g} "
                        f"distilling, {DEFAULT_LORA_LR:g} with --lora)")
    p.add_argument("--lora", type=positive_int, default=None, metavar="R",
                   help="train rank-R LoRA adapters on every Linear of the decoder blocks (needs peft) and merge "
                        "them; the masks are applied again after merging")
    p.add_argument("--lora-alpha", type=beta_type, default=None, help="LoRA alpha (default 2 R)")
    p.add_argument("--seqlen", type=int_at_least(2), default=DEFAULT_SEQLEN,
                   help=f"tokens per training window (default {DEFAULT_SEQLEN})")
    p.add_argument("--batch", type=positive_int, default=DEFAULT_BATCH,
                   help=f"windows per step and process (default {DEFAULT_BATCH})")
    p.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches accumulated per optimizer step (default 1)")
    p.add_argument("--schedule", choices=SCHEDULES, default=DEFAULT_SCHEDULE,
                   help=f"learning-rate schedule after warm-up (default {DEFAULT_SCHEDULE})")
    p.add_argument("--warmup", type=float, default=DEFAULT_WARMUP,
                   help=f"warm-up: a fraction of the steps (< 1) or a number of steps (default {DEFAULT_WARMUP})")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--distill", default="auto", metavar="TEACHER",
                   help="learn from TEACHER (the dense model the input was pruned from, same tokenizer) by "
                        "distillation instead of from the text's next tokens: what carries over to other text "
                        "(measured: benchmarks/results/heal_smollm2.md; costs one teacher forward per step and "
                        "the teacher's memory). auto (default): the model named in DIR/emprune.json when it is "
                        "a local folder or an embedded short name, else plain next-token loss; source: that "
                        "model, required; none: plain next-token loss; or a model folder/name")
    p.add_argument("--distill-weight", type=float, default=1.0,
                   help="with --distill: weight of the distillation loss, the rest cross-entropy (default 1)")
    p.add_argument("--targets", choices=("auto", "mlp", "linear", "none"), default="auto",
                   help="whose zeros are held at zero: auto = the pruned modules named in DIR/emprune.json, "
                        "checked against the weights' exact zeros (refused where they disagree); without a "
                        "usable emprune.json, every decoder Linear with 1%% or more exact zeros (said); none for "
                        "a shrunk or a dense model. mlp / linear: the zeros of those Linears of every block; "
                        "none: no masks (both say how many zeros of pruned-looking weights they train away)")
    ev = p.add_argument_group("held-out perplexity during healing")
    ev.add_argument("--eval-every", type=positive_int, default=None, metavar="N",
                    help="perplexity on --eval-text before training, every N steps and at the end")
    ev.add_argument("--eval-text", default=None,
                    help="evaluation text (default WikiText-2 test, shipped with emprune), or 'python-docs'")
    ev.add_argument("--eval-tokens", type=positive_int, default=16384, help="tokens of it (default 16384)")
    ev.add_argument("--eval-seqlen", type=int_at_least(2), default=None, help="window (default: --seqlen)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (for GPUs; default float32)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (less memory, ~30%% more time)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is visible")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the saved weights (default: the dtype the input folder was saved in)")
    p.add_argument("--seed", type=int, default=0, help="seed of the window order and the adapters (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(_heal_run=run)
    return p


def _saved_dtype(model_spec: str) -> str:
    """The dtype a model folder was saved in (``config.json``), float32 for anything else."""
    cfg = Path(model_spec).expanduser() / "config.json"
    try:
        d = json.loads(cfg.read_text())
        name = str(d.get("dtype") or d.get("torch_dtype") or "float32")
    except (OSError, ValueError):
        return "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _teacher_spec(distill: str | None, model: str, report: dict[str, Any] | None) -> str | None:
    """``--distill``'s teacher, or None for plain next-token loss (auto / source / none resolved)."""
    from ..models.loading import SHORT_NAMES, resolve_short_name

    if distill is None or distill == "none":
        return None
    if distill not in ("auto", "source"):
        return distill
    src = (report or {}).get("model")
    src = str(src) if src else None
    if distill == "source":
        if not src:
            raise ValueError(f"--distill source: {model} has no emprune.json naming the model it came from; "
                             "give the teacher's folder or name")
        return src
    local = bool(src) and Path(src).expanduser().is_dir()
    if src in SHORT_NAMES:
        try:
            resolve_short_name(src)  # the model package may not be installed here
            local = True
        except FileNotFoundError:
            pass
    if local:
        print(f"distilling from {src}, the model {model} was made from (--distill none: plain next-token loss)",
              file=sys.stderr)
        return src
    print("no local source model named in emprune.json: plain next-token loss (--distill TEACHER to distill)",
          file=sys.stderr)
    return None


def check_texts(text_src: str, text: str, eval_src: str, eval_text: str) -> None:
    """Refuse a healing text that is the evaluation text (the same file, or the same content):
    perplexity on it would measure memorisation, not recovery."""
    a, b = Path(text_src).expanduser(), Path(eval_src).expanduser()
    same_file = a.is_file() and b.is_file() and os.path.samefile(a, b)
    if same_file or text_src == eval_src or text == eval_text:
        raise ValueError(f"the healing text {text_src} is the evaluation text {eval_src}: heal on other text "
                         "(default: the calibration text, WikiText-2 validation) so perplexity stays held-out")


def _check_args(args: argparse.Namespace) -> None:
    """The options that need neither the model nor the texts, refused in one line each."""
    if args.lora is not None:
        try:
            import peft  # noqa: F401
        except ImportError:  # a missing optional package is bad input here: one line, exit 2
            raise ValueError("--lora needs peft: pip install peft (or pip install 'emprune[heal]')") from None
    if not (args.warmup >= 0 and (args.warmup < 1 or args.warmup == int(args.warmup))):
        raise ValueError(f"--warmup must be a fraction in [0, 1) or a whole number of steps, got {args.warmup}")
    if not 0 < args.distill_weight <= 1:
        raise ValueError(f"--distill-weight must lie in (0, 1], got {args.distill_weight}")
    if args.bf16 and args.cpu:
        raise ValueError("--bf16 is for GPUs; on the CPU train in float32 (leave out --bf16)")


def _before_the_load(args: argparse.Namespace) -> SimpleNamespace:
    """Everything ``heal`` checks before the (slow) model load and the training: the options, the
    output folder (never the input or the teacher; claimed), the report, the teacher, both texts
    (not the same; the healing text long enough for one batch of windows, with the tokenizer
    alone), the window lengths against the model's positions."""
    from ..models import checkpoint, loading
    from ..models.checkpoint import SHRUNK_KIND

    _check_args(args)
    report = checkpoint.read_report(args.model, strict=True)
    args.distill = _teacher_spec(args.distill, args.model, report)
    out = claim_out(args.out, args.overwrite, [args.model] + ([args.distill] if args.distill else []))
    try:
        text_src, text = read_text(args.text, "calib")
    except (ValueError, FileNotFoundError) as e:  # name this command's option
        raise type(e)(str(e).replace("--calib-text", "--text")) from None
    eval_src, eval_text = read_text(args.eval_text, "eval")
    check_texts(text_src, text, eval_src, eval_text)
    check_positions(args.model, args.seqlen)
    check_positions(args.model, args.eval_seqlen or args.seqlen, "--eval-seqlen")
    tok = loading.load_tokenizer(args.model)
    ids = text_ids(tok, "--text", text_src, text, args.seqlen * args.batch, more=False,
                   what=f"one batch of {args.batch} windows of {args.seqlen}", fix="a smaller --seqlen or --batch")
    shrunk = (report or {}).get("kind") == SHRUNK_KIND  # the report just read (is_shrunk would read it again)
    if shrunk and args.targets in ("mlp", "linear"):
        print("note: a shrunk model has no pruned zeros; masks from its zeros are applied as asked", file=sys.stderr)
    return SimpleNamespace(report=report, shrunk=shrunk, out=out, tokenizer=tok, ids=ids, text_src=text_src,
                           eval_src=eval_src, eval_text=eval_text)


def _options(args: argparse.Namespace, targets: Any, eval_seqlen: int) -> Any:
    """:class:`~emprune.jobs.options.HealOptions` from the parsed command line."""
    from ..jobs.options import HealOptions

    return HealOptions(steps=args.steps, train_tokens=args.tokens, lr=args.lr, seqlen=args.seqlen, batch=args.batch,
                       grad_accum=args.grad_accum, lora=args.lora, lora_alpha=args.lora_alpha, targets=targets,
                       schedule=args.schedule, warmup=args.warmup, weight_decay=args.weight_decay,
                       eval_every=args.eval_every, eval_seqlen=eval_seqlen, distill_weight=args.distill_weight,
                       bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, use_cpu=args.cpu,
                       seed=args.seed, progress=not args.quiet)


def _save(args: argparse.Namespace, model: Any, tok: Any, out: Path, report: dict[str, Any] | None,
          rec: dict[str, Any], shrunk: bool) -> Path:
    """Save the healed model the way its input was saved (a shrunk folder, or a pruned / dense
    one in ``--save-dtype``), its report extended by this healing."""
    import torch

    from ..models import checkpoint, runtime
    from ..models.checkpoint import save_shrunk, versions

    info = dict(report) if report else {"kind": "dense", "model": args.model, "versions": versions(),
                                        "note": "fine-tuned by emprune heal without masks: the input had no "
                                                "emprune.json"}
    if not report and rec["masks"]["masked_modules"]:  # not dense: its zeros were masks
        del info["kind"]
        info["note"] = f"fine-tuned by emprune heal, the input having no usable emprune.json: {rec['masks']['plan']}"
    if "healing" in info:
        info["healing_earlier"] = [*info.get("healing_earlier", []), info["healing"]]
    info["healing"] = rec
    save_dtype = args.save_dtype or _saved_dtype(args.model)
    info["saved_dtype"] = save_dtype
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[save_dtype]
    if shrunk:
        model.to(dtype=dtype)
        with runtime.quiet_progress(args.quiet):
            saved = save_shrunk(model, tok, out, info, overwrite=args.overwrite, progress=not args.quiet)
    else:
        saved = checkpoint.save_pruned(model, tok, out, info, overwrite=args.overwrite, dtype=dtype,
                                   progress=not args.quiet)
    return saved


def run(args: argparse.Namespace) -> int:
    """Run ``emprune heal`` for parsed ``args``; returns 0 on success."""
    import torch

    from ..jobs.heal import UnmaskedZerosWarning, heal, plan_masks
    from ..jobs.memory import PeakMemory, fmt_bytes
    from ..models import checkpoint, data, loading
    from ..models.checkpoint import versions
    from ..models.loading import SHORT_NAMES

    t0 = time.perf_counter()
    pre = _before_the_load(args)
    print(f"loading {args.model} ...", file=sys.stderr)
    model, tok = loading.load_causal_lm(args.model, dtype=torch.float32, progress=not args.quiet,
                                       tokenizer=pre.tokenizer)
    report, shrunk, out = pre.report, pre.shrunk, pre.out
    # the masks, from the weights and the report, refused where they disagree: before anything else is done
    gguf = str(args.model).lower().endswith(".gguf") or args.model in SHORT_NAMES
    plan = plan_masks(model, report, args.targets, quantised=gguf)
    print(plan.note, file=sys.stderr)
    for w in plan.warnings:
        print(f"WARNING: {w}", file=sys.stderr)

    check_seqlen(model, args.seqlen)  # where the positions could not be read before the load
    eval_seqlen = args.eval_seqlen or args.seqlen
    check_seqlen(model, eval_seqlen, "--eval-seqlen")
    teacher = None
    if args.distill is not None:
        print(f"loading the teacher {args.distill} ...", file=sys.stderr)
        teacher, _ = loading.load_causal_lm(args.distill, dtype=torch.float32, progress=not args.quiet)
    ids = pre.ids
    ev_ids = data.eval_tokens(tok, pre.eval_text, args.eval_tokens) if args.eval_every else None
    with PeakMemory() as mem, warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmaskedZerosWarning)  # plan.warnings said it already
        res = heal(model, ids, _options(args, plan.targets, eval_seqlen), teacher=teacher, eval_tokens=ev_ids)
    if int(os.environ.get("RANK", "0")) != 0:  # accelerate launch: the first process saves
        return 0
    rec = res.record
    rec["masks"].update(source=plan.source, plan=plan.note)
    rec.update(text=pre.text_src, teacher=args.distill, command="emprune " + " ".join(shlex.quote(a) for a in getattr(args, "_argv", [])),
               input=args.model, peak_memory=mem.result, total_seconds=time.perf_counter() - t0,
               versions=versions())
    if rec["eval"] is not None:
        rec["eval"]["text"] = pre.eval_src
    if rec["masks"]["masked_modules"] and not rec["masks"]["zeros_unchanged"]:
        print(f"WARNING: the zero count changed in {len(rec['masks']['modules_with_changed_zeros'])} module(s) "
              "(new exact zeros in trained weights; see emprune.json)", file=sys.stderr)
    saved = _save(args, res.model, tok, out, report, rec, shrunk)
    print(summary_line(rec, fmt_bytes(mem.result.get("peak_rss_bytes"))))
    how = ("emprune.from_pretrained(DIR)" if shrunk and (report or {}).get("layout") != "uniform"
           else "AutoModelForCausalLM.from_pretrained(DIR)")
    print(f"saved to {saved}; load with {how}; report: {saved / checkpoint.REPORT_NAME}")
    return 0


def summary_line(rec: dict[str, Any], peak: str = "-") -> str:
    """One human line: what was trained, loss and perplexity before/after, zeros, time."""
    loss = rec["loss_curve"]
    m = rec["masks"]
    parts = [f"healed {rec['mode']}{' r=' + str(rec['lora']['r']) if rec['lora'] else ''}"
             f"{' by distillation' if rec.get('teacher') else ''}: {rec['steps']} steps, "
             f"{rec['tokens']:,} tokens, lr {rec['lr']:g}"]
    if loss:
        k = max(1, len(loss) // 10)  # first and last tenth: single steps are noisy
        first = sum(x["loss"] for x in loss[:k]) / k
        last = sum(x["loss"] for x in loss[-k:]) / k
        parts.append(f"loss {first:.3f} -> {last:.3f}")
    if rec.get("eval") and rec["eval"]["curve"]:
        c = rec["eval"]["curve"]
        parts.append(f"perplexity {c[0]['ppl']:.3f} -> {c[-1]['ppl']:.3f}")
    if m["masked_modules"]:
        parts.append(f"zeros {m['zeros_before']:,} -> {m['zeros_after']:,} in {m['masked_modules']} modules"
                     + (" (masks from the weights)" if m.get("source") == "weights" else "")
                     + (f" ({rec['lora']['rezeroed_after_merge']:,} merged entries re-zeroed)" if rec["lora"] else ""))
    parts.append(f"{rec['seconds']:.1f} s, peak memory {peak}")
    return "; ".join(parts)
