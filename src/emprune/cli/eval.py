"""``emprune eval``: perplexity and zero-shot accuracy of a causal LM."""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..jobs import zeroshot
from ..models.io import check_can_write
from .common import (MODEL_HELP, add_model_args, check_device, check_positions, check_seqlen, device_map,
                     int_at_least, offload_mode, positive_int, read_text, text_ids, torch_dtype)


def add_parser(sub) -> None:
    """The ``eval`` sub-command's parser."""
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
    ev.add_argument("--eval-tokens", type=positive_int, default=None, help="first T tokens of the text (default: all)")
    ev.add_argument("--seqlen", type=int_at_least(2), default=None,
                    help="window length, at most the model's positions (default 2048, or the model's "
                         "max_position_embeddings if smaller)")
    ev.add_argument("--eval-text", default=None,
                    help="text file (default: WikiText-2 test, shipped with emprune; $EMPRUNE_DATA overrides), "
                         "'python-docs' (offline), or 'wikitext2'/'c4' (online)")
    ev.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)")
    ev.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON to OUT")
    ev.add_argument("--offload", choices=("disk",), default=None,
                    help="disk: perplexity of a model larger than memory, read from its folder's safetensors shards "
                         "one block at a time (every window through block 0, then block 1, ...; the same number as "
                         "in memory); the default, said on stderr, for a local folder whose weights would not fit. "
                         "Not with --tasks")
    add_zeroshot_arguments(ev)
    add_model_args(ev)


_TASKS_STREAMED = ("--tasks with a model streamed from disk (--offload disk) is not supported: zero-shot scoring "
                   "runs thousands of short contexts through the whole model, and block by block it would hold the "
                   "hidden states of all of them; evaluate --ppl only, or load the model in memory")


def run(args) -> int:
    """Run ``emprune eval`` for parsed ``args``; returns 0 on success."""
    from ..jobs.eval import perplexity
    from ..models import loading

    if not args.ppl and not args.tasks:
        raise ValueError("nothing to evaluate: pass --ppl and/or --tasks")
    if args.offload == "disk" and args.tasks:  # an option conflict: said before the task data is looked for
        raise ValueError(_TASKS_STREAMED)
    check_device(args.device)
    if args.tasks:  # task names, sizes and the task data, before the model is loaded
        zeroshot.check_tasks(args.tasks)
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        zeroshot.data_root()
    if args.json:
        check_can_write(args.json, "--json", parent_must_exist=True)
    loading.locate(args.model)  # a missing path, or the hub while offline, fails now, in one line
    stream = offload_mode(args.model, args.offload, args.dtype, args.device) if args.ppl or args.offload else False
    if stream and args.tasks:
        raise ValueError(_TASKS_STREAMED)
    if not args.ppl:
        model, tok = loading.load_causal_lm(args.model, dtype=torch_dtype(args.dtype),
                                           device_map=device_map(args.device), progress=not args.quiet)
        res = {"model": args.model, "zeroshot": run_zeroshot(args, model, tok)}
        _write_eval_json(args.json, res)
        return 0
    src, text = read_text(args.eval_text, "eval")
    limit = check_positions(args.model, args.seqlen)
    seqlen = args.seqlen or (min(2048, limit) if limit is not None and limit >= 2 else 2048)
    known = args.seqlen is not None or limit is not None  # else (a hub id) the window is known after the load
    if known and args.eval_tokens is not None and args.eval_tokens < seqlen:
        raise ValueError(f"--eval-tokens {args.eval_tokens} is less than one window of --seqlen {seqlen}; "
                         f"give at least {seqlen} tokens or a smaller --seqlen")
    tok = loading.load_tokenizer(args.model)
    ids = text_ids(tok, "--eval-text", src, text, seqlen if known else 1, more=False)[:args.eval_tokens]  # None: all
    if stream:
        from ..jobs.eval import perplexity_streamed
        from ..models.stream import DiskModel

        disk = DiskModel(loading.locate(args.model)[1], torch_dtype(args.dtype), args.device)
        check_seqlen(disk.model, seqlen)
        res = perplexity_streamed(disk, ids, seqlen, batch_size=args.batch_size, progress=not args.quiet)
        return _report_ppl(args, res, src)
    model, tok = loading.load_causal_lm(args.model, dtype=torch_dtype(args.dtype), device_map=device_map(args.device),
                                       progress=not args.quiet, tokenizer=tok)
    if args.seqlen is None and limit is None:  # positions unknown before the load (a hub id)
        cfg_limit = getattr(model.config, "max_position_embeddings", None)
        seqlen = min(2048, cfg_limit) if isinstance(cfg_limit, int) and cfg_limit >= 2 else 2048
    check_seqlen(model, seqlen)
    res = perplexity(model, ids, seqlen, batch_size=args.batch_size, progress=not args.quiet)
    return _report_ppl(args, res, src, model, tok)


def _report_ppl(args: argparse.Namespace, res: dict, src: str, model: Any = None, tok: Any = None) -> int:
    """Print the perplexity, run the zero-shot tasks (a model in memory), write ``--json``."""
    from ..models import checkpoint

    res.update(model=args.model, text=src)
    report = checkpoint.read_report(args.model)  # a damaged one does not spoil the evaluation: None
    if report is not None:
        summary = report.get("summary")
        res["pruned_fraction"] = summary.get("pruned_fraction") if isinstance(summary, dict) else None
    print(f"perplexity {res['ppl']:.4f} on {res['tokens_evaluated']:,} predicted tokens "
          f"({res['windows']} windows of {res['seqlen']}) of {src}; {res['seconds']:.1f} s"
          + (" (streamed from disk)" if res.get("offload") else ""))
    if args.tasks:
        res["zeroshot"] = run_zeroshot(args, model, tok)
    _write_eval_json(args.json, res)
    return 0


def _write_eval_json(path: str | None, res: dict) -> None:
    """``eval --json OUT``: the results, written atomically."""
    if path:
        from ..models.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {path}")


def add_zeroshot_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--tasks``, ``--limit`` and ``--max-batch-tokens`` to ``emprune eval``'s parser
    (``--batch-size``, ``--json`` and ``--quiet`` are the command's own)."""
    parser.add_argument("--tasks", default=None, metavar="T1,T2",
                        help=f"zero-shot multiple-choice tasks, comma-separated, or all: {', '.join(zeroshot.TASKS)} "
                             f"(data: {zeroshot.PIP_DATA})")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="zero-shot: first N items of each task (default: all)")
    parser.add_argument("--max-batch-tokens", type=positive_int, default=2048, metavar="T",
                        help="zero-shot: input positions per forward pass (default 2048)")


def run_zeroshot(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Run :func:`zeroshot.evaluate_tasks` from parsed ``emprune eval`` arguments, print the table and
    return the result (the caller adds it to ``--json``). Contexts per batch: ``--batch-size``
    x 4 (a zero-shot context is much shorter than a perplexity window)."""
    tasks = zeroshot.check_tasks(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if getattr(args, "max_batch_tokens", 2048) < 1:
        raise ValueError(f"--max-batch-tokens must be >= 1, got {args.max_batch_tokens}")
    res = zeroshot.evaluate_tasks(model, tokenizer, tasks, args.limit, batch_size=4 * getattr(args, "batch_size", 8),
                         progress=not getattr(args, "quiet", False),
                         max_batch_tokens=getattr(args, "max_batch_tokens", 2048))
    print(zeroshot.format_table(res))
    return res
