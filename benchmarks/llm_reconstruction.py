"""EMP's counts with SparseGPT's OBS reconstruction, against uniform and OWL allocations, at equal
sparsity: perplexity on WikiText-2 test and on text nobody calibrated on (issue 13).

For each target set (MLP, all linear) and each sparsity level (EMP's own at beta = 1, then fixed
fractions; EMP reaches a fraction through ``target_sparsity``), the rows are:

* ``wanda``          Wanda, the same sparsity in every row;
* ``sparsegpt``      SparseGPT (OBS update, its per-block choice), uniform over the layers;
* ``owl-wanda``      OWL's per-layer sparsities (M = 5, lambda = 0.08) with Wanda;
* ``owl-sparsegpt``  OWL's per-layer sparsities with SparseGPT;
* ``emp-wanda``      EMP, counts from N_eff of |W|, Wanda picks which (``--recipe count-magnitude
                     --update none``: the default recipe before the OBS update joined it);
* ``emp-obs``        EMP's counts per row, OBS chooses which and updates the rest (the default
                     recipe, ``count-magnitude-obs``);

and once per target set the 2:4 rows ``nm-wanda`` and ``nm-sparsegpt``. Every row uses the same
calibration tokens and the same evaluation tokens; pruning time is given against the Wanda row of
the same level (same tokens, same run).

    python benchmarks/llm_reconstruction.py                       # the full table
    python benchmarks/llm_reconstruction.py --quick --out /tmp/q  # smoke run
    python benchmarks/llm_reconstruction.py --targets mlp --levels emp --rows emp-wanda,emp-obs \\
        --damps 0.01,0.1,1 --calib-samples 16 --seqlen 256 --eval-tokens 4096 --other-tokens 4096  # damp probe

Writes OUT.json, OUT.md and OUT.png after every row (``--out``, default
benchmarks/results/llm_reconstruction). ``--resume`` continues a stopped or partial run: the rows
already in OUT.json (same calibration, evaluation and dampening settings; refused otherwise) are
kept and only the missing ones run, so the table can be filled over several sittings.
"""
from __future__ import annotations

import os

# numba's OpenMP threads (the compiled selection kernel) spin after each parallel region by
# default; on a small shared CPU they then slow every later torch op of the process ~10x
# (measured here: one OBS layer 0.75 s -> 18-30 s). Must be set before the runtime starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from common import REPO, write_results  # noqa: E402

from emprune.models import data  # noqa: E402
from emprune.jobs.eval import perplexity  # noqa: E402
from emprune.models.loading import load_causal_lm  # noqa: E402
from emprune.jobs.prune_lm import DEFAULT_DAMP, DEFAULT_DAMP_KIND, prune_lm  # noqa: E402
from emprune.structure.targets import block_targets as target_modules  # noqa: E402
from emprune.models.checkpoint import versions  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "llm_reconstruction"
ROWS = ("wanda", "sparsegpt", "owl-wanda", "owl-sparsegpt", "emp-wanda", "emp-obs")
NM_ROWS = ("nm-wanda", "nm-sparsegpt")
LABELS = {
    "wanda": "Wanda uniform", "sparsegpt": "SparseGPT uniform", "owl-wanda": "OWL + Wanda",
    "owl-sparsegpt": "OWL + SparseGPT", "emp-wanda": "EMP + Wanda (count-magnitude, --update none)",
    "emp-obs": "EMP + OBS update (default recipe)", "nm-wanda": "Wanda 2:4", "nm-sparsegpt": "SparseGPT 2:4",
}


def _label(r: dict[str, Any]) -> str:
    """A row's name, from its key at render time (rows keep their meaning when names change)."""
    kind = (r.get("options") or {}).get("damp_kind", "mean")
    name = LABELS.get(r["row"]) or r.get("label") or r["row"]
    if r.get("damp") is None:
        return name
    return f"{name} (damp {r['damp']:g}{'' if kind == 'mean' else ' ' + kind})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--targets", default="mlp,linear", help="comma-separated: mlp, linear (default both)")
    p.add_argument("--levels", default="emp,0.5,0.6,0.7",
                   help="sparsity levels: 'emp' (EMP's own at beta=1) and/or fractions (default emp,0.5,0.6,0.7)")
    p.add_argument("--rows", default=",".join(ROWS + NM_ROWS), help=f"rows to run (default all: {', '.join(ROWS + NM_ROWS)})")
    p.add_argument("--damps", default=None,
                   help=f"comma-separated dampening values; OBS rows are repeated for each (default {DEFAULT_DAMP:g})")
    p.add_argument("--damp-kind", default=DEFAULT_DAMP_KIND, choices=("mean", "diag"),
                   help=f"damp scales the mean Hessian diagonal (SparseGPT) or each diagonal entry (default {DEFAULT_DAMP_KIND})")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration and evaluation window (default 512)")
    p.add_argument("--calib-text", default=None,
                   help="calibration text(s), comma-separated for a mix (samples split evenly); default WikiText-2 "
                        "validation. The other text's evaluated prefix is never drawn for calibration")
    p.add_argument("--eval-tokens", type=int, default=32768, help="WikiText-2 test tokens (default 32768)")
    p.add_argument("--other-text", default="python-docs", help="the text nobody calibrated on (default python-docs)")
    p.add_argument("--other-tokens", type=int, default=16384, help="tokens of the other text (default 16384)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny settings, a few rows")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output prefix (default benchmarks/results/llm_reconstruction)")
    p.add_argument("--replot", action="store_true", help="rewrite OUT.md/.png from OUT.json")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of OUT.json (same calibration, evaluation and dampening settings) and run "
                        "only the missing ones; the commands are listed")
    p.add_argument("--note", default=None, help="a line for the markdown (e.g. what else ran on the machine)")
    args = p.parse_args(argv)
    if args.quick:
        args.calib_samples, args.seqlen, args.eval_tokens, args.other_tokens = 4, 64, 512, 512
        if args.levels == "emp,0.5,0.6,0.7":  # (only where not given)
            args.levels = "emp,0.6"
        if args.targets == "mlp,linear":
            args.targets = "mlp"
    return args


# ------------------------------------------------------------------------------- data


def calibration(tokenizer: Any, texts: list[str], n: int, seqlen: int, seed: int, other: str,
                other_tokens: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """``n`` windows split evenly over ``texts`` (seeded); the ``other`` text's first
    ``other_tokens`` tokens (those evaluated) are never drawn."""
    parts, info = [], []
    for i, src in enumerate(texts):
        k = n // len(texts) + (1 if i < n % len(texts) else 0)
        if k == 0:
            continue
        ids = data.tokenize(tokenizer, data.load_text(src, "calib"))
        skip = other_tokens if src == other else 0
        ids = ids[skip:]
        if ids.numel() <= seqlen:
            raise ValueError(f"calibration text {src}: {ids.numel()} tokens after the evaluated prefix; need > {seqlen}")
        rng = random.Random(seed + i)
        starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(k)]
        parts.append(torch.stack([ids[s:s + seqlen] for s in starts]))
        info.append({"text": src, "samples": k, "skipped_prefix_tokens": skip})
    return torch.cat(parts), info


# ------------------------------------------------------------------------------- runs


def _kwargs(row: str, level: str, emp_p: float | None, damp: float, damp_kind: str = DEFAULT_DAMP_KIND) -> dict[str, Any]:
    """prune_lm's options for a row at a level (``emp``: EMP's own sparsity ``emp_p``)."""
    obs = {"update": "obs", "damp": damp, "damp_kind": damp_kind}
    p = emp_p if level == "emp" else None if level == "2:4" else float(level)
    # EMP's counts from N_eff of |W| (the count-magnitude recipe), named explicitly so that the rows
    # keep their meaning whatever the package's default recipe is
    emp: dict[str, Any] = {"recipe": "count-magnitude"} | ({} if level == "emp" else {"target_sparsity": p})
    table: dict[str, dict[str, Any]] = {
        "wanda": {"sparsity": p},
        "sparsegpt": {"sparsity": p, **obs},
        "owl-wanda": {"sparsity": p, "allocation": "owl"},
        "owl-sparsegpt": {"sparsity": p, "allocation": "owl", **obs},
        "emp-wanda": emp | {"update": None},
        "emp-obs": emp | obs,
        "nm-wanda": {"nm": "2:4"},
        "nm-sparsegpt": {"nm": "2:4", **obs},
    }
    return table[row]


class Bench:
    """The model loaded once, the dense targeted weights kept for restoring, the tokens."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.model, tok = load_causal_lm(args.model, progress=False)
        texts = args.calib_text.split(",") if args.calib_text else [str(data.default_text_path("calib"))]
        self.calib, self.calib_info = calibration(tok, texts, args.calib_samples, args.seqlen, args.seed,
                                                  args.other_text, args.other_tokens)
        self.ev = data.eval_tokens(tok, data.load_text(None, "eval"), args.eval_tokens)
        self.other = data.eval_tokens(tok, data.load_text(args.other_text, "eval"), args.other_tokens)
        mods = {n: m for t in ("mlp", "linear") for n, m in target_modules(self.model, t).items()}
        self.dense = {n: m.weight.detach().clone() for n, m in mods.items()}
        self.seqlen, self.batch_size = args.seqlen, args.batch_size

    @torch.no_grad()
    def restore(self) -> None:
        mods = dict(self.model.named_modules())
        for n, w in self.dense.items():
            mods[n].weight.copy_(w)

    def evaluate(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        a = perplexity(self.model, self.ev, self.seqlen, batch_size=self.batch_size, progress=False)
        b = perplexity(self.model, self.other, self.seqlen, batch_size=self.batch_size, progress=False)
        return {"ppl": a["ppl"], "ppl_other": b["ppl"], "tokens": a["tokens_evaluated"],
                "other_tokens": b["tokens_evaluated"], "eval_seconds": time.perf_counter() - t0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    bench = Bench(args)
    damps = [float(d) for d in args.damps.split(",")] if args.damps else [DEFAULT_DAMP]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS + NM_ROWS]
    if bad:
        raise SystemExit(f"unknown rows {bad}; choose from {', '.join(ROWS + NM_ROWS)}")
    doc: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": args.model, "versions": versions(),
        "settings": {"calibration": {"samples": int(bench.calib.shape[0]), "seqlen": args.seqlen, "seed": args.seed,
                                     "texts": bench.calib_info, "tokens": int(bench.calib.numel())},
                     "eval": {"text": "WikiText-2 test", "tokens": int(bench.ev.numel())},
                     "other": {"text": args.other_text, "tokens": int(bench.other.numel())},
                     "damps": damps, "damp_kind": args.damp_kind, "levels": args.levels, "rows": rows, "threads": torch.get_num_threads(),
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "sections": [], "status": "running", "note": args.note,
    }
    if args.resume and out.with_suffix(".json").is_file():
        doc = _resumed(doc, json.loads(out.with_suffix(".json").read_text()))
    else:
        doc["dense"] = bench.evaluate()
    write(doc, out)
    for targets in args.targets.split(","):
        sec = next((s for s in doc["sections"] if s["targets"] == targets), None)
        if sec is None:
            sec = {"targets": targets, "rows": []}
            doc["sections"].append(sec)
        done = {(r["row"], r["level"], r["damp"]) for r in sec["rows"]}
        emp_p = next((r["options"]["sparsity"] for r in sec["rows"]
                      if r["level"] == "emp" and r["row"] != "emp-wanda" and "sparsity" in r["options"]), None)
        for level in args.levels.split(","):
            for row in [r for r in rows if r in ROWS]:
                for damp in (damps if "obs" in row or "sparsegpt" in row else [None]):
                    if (row, level, damp) in done:
                        continue
                    if level == "emp" and emp_p is None and row != "emp-wanda":
                        emp_p = _emp_sparsity(bench, targets, args)
                    kw = _kwargs(row, level, emp_p, damp if damp is not None else DEFAULT_DAMP, args.damp_kind)
                    rec = _one(bench, targets, row, level, kw, damp)
                    if level == "emp" and row == "emp-wanda":
                        emp_p = rec["pruned_fraction"]
                    sec["rows"].append(rec)
                    write(doc, out)
        for row in [r for r in rows if r in NM_ROWS]:
            for damp in (damps if "sparsegpt" in row else [None]):
                if (row, "2:4", damp) in done:
                    continue
                kw = _kwargs(row, "2:4", None, damp if damp is not None else DEFAULT_DAMP, args.damp_kind)
                sec["rows"].append(_one(bench, targets, row, "2:4", kw, damp))
                write(doc, out)
    doc["status"] = "complete"
    doc["wall_seconds"] = time.perf_counter() - t_start + doc.pop("wall_seconds_before", 0.0)
    write(doc, out)
    return doc


def _same_settings(s: dict[str, Any]) -> dict[str, Any]:
    """What must match for rows to share a table: the tokens and the dampening (texts by name,
    not by the path they were read from); not which rows or levels were asked for."""
    c = s["calibration"]
    return {"calibration": {**c, "texts": [{**t, "text": Path(t["text"]).name} for t in c["texts"]]},
            "eval": s["eval"], "other": s["other"], "damps": s["damps"], "damp_kind": s["damp_kind"]}


def _resumed(doc: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (this run's header) continuing ``old``: its dense evaluation and rows kept."""
    if old.get("model") != doc["model"] or _same_settings(old["settings"]) != _same_settings(doc["settings"]):
        raise SystemExit("--resume: OUT.json was made with another model or other calibration, evaluation or "
                         "dampening settings; use another --out")
    doc["commands"] = [*old.get("commands", [old["command"]]), doc["command"]]
    doc["dense"], doc["sections"] = old["dense"], old["sections"]
    doc["wall_seconds_before"] = old.get("wall_seconds", 0.0)
    doc["note"] = doc.get("note") or old.get("note")
    return doc


def _emp_sparsity(bench: Bench, targets: str, args: argparse.Namespace) -> float:
    """EMP's own pruned fraction at beta = 1 (default recipe: counts from |W|, no data needed)."""
    res = prune_lm(bench.model, None, criterion="magnitude", targets=targets, recipe="count-magnitude",
                   update=None, progress=False)  # type: ignore[arg-type]
    bench.restore()
    return res.pruned_fraction


def _one(bench: Bench, targets: str, row: str, level: str, kw: dict[str, Any], damp: float | None) -> dict[str, Any]:
    bench.restore()
    print(f"[{targets}] {level} {row} {kw}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    res = prune_lm(bench.model, bench.calib, targets=targets, progress=False, batch_size=bench.batch_size, **kw)
    prune_s = time.perf_counter() - t0
    rec = {"row": row, "level": level, "damp": damp, "options": {k: v for k, v in kw.items()},
           "pruned_fraction": res.pruned_fraction,
           "prune_seconds": prune_s, "update_seconds": (res.info.get("update") or {}).get("seconds"),
           "beta": res.info.get("beta"), "beta_for_target": res.info.get("beta_for_target"),
           "owl_layer_sparsity": (res.info.get("owl") or {}).get("layer_sparsity"),
           "max_unit_pruned_fraction": max(l["max_unit_pruned_fraction"] for l in res.info["layers"])}
    rec["label"] = _label(rec)
    rec.update(bench.evaluate())
    print(f"    pruned {100 * rec['pruned_fraction']:.2f}%  ppl {rec['ppl']:.3f}  other {rec['ppl_other']:.3f}  "
          f"{prune_s:.1f} s", file=sys.stderr, flush=True)
    bench.restore()
    return rec


# ------------------------------------------------------------------------------- output


def write(doc: dict[str, Any], out: Path) -> None:
    write_results(out, doc, markdown, plot if any(sec["rows"] for sec in doc["sections"]) else None)


def _x(v: float, ref: float) -> str:
    return f"x{v / ref:.3f}" if ref and math.isfinite(v) else "-"


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    d = doc["dense"]
    cal = ", ".join(f"{t['samples']} from `{Path(t['text']).name}`" for t in s["calibration"]["texts"])
    cmds = doc.get("commands", [doc["command"]])
    lines = [
        *(["Commands (one table, the rows added by each in turn with `--resume`):", "",
           *(f"- `{c}`" for c in cmds)] if len(cmds) > 1 else [f"Command: `{doc['command']}`"]), "",
        *([f"Note: {doc['note']}", ""] if doc.get("note") else []),
        f"Model `{doc['model']}`; calibration {s['calibration']['samples']} x {s['calibration']['seqlen']} tokens "
        f"({cal}; seed {s['calibration']['seed']}); perplexity on {s['eval']['tokens']:,} tokens of WikiText-2 test "
        f"and {s['other']['tokens']:,} tokens of `{s['other']['text']}` (other text, never calibrated on); OBS "
        f"dampening {', '.join(f'{x:g}' for x in s['damps'])}; status: {doc['status']}"
        + (f"; wall time {doc['wall_seconds'] / 60:.1f} min" if "wall_seconds" in doc else "") + ".", "",
        f"Dense: WikiText {d['ppl']:.3f}, other {d['ppl_other']:.3f}.", "",
    ]
    for sec in doc["sections"]:
        lines += [f"### targets: {sec['targets']}", "",
                  "| level | method | pruned | max row | ppl WikiText | vs dense | ppl other | vs dense | prune s | vs Wanda |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        wanda_s = {r["level"]: r["prune_seconds"] for r in sec["rows"] if r["row"] in ("wanda", "nm-wanda")}
        for lev in dict.fromkeys(r["level"] for r in sec["rows"]):
            rows = [r for r in sec["rows"] if r["level"] == lev]
            best = min(r["ppl_other"] for r in rows)
            for r in rows:
                other = f"{r['ppl_other']:.3f}"
                if r["ppl_other"] == best and len(rows) > 1:
                    other = f"**{other}**"
                ws = wanda_s.get(lev)
                lev_name = "EMP (beta=1)" if lev == "emp" else lev if lev == "2:4" else f"{100 * float(lev):.0f}%"
                lines.append(f"| {lev_name} | {_label(r)} | {100 * r['pruned_fraction']:.2f}% | "
                             f"{100 * r['max_unit_pruned_fraction']:.1f}% | {r['ppl']:.3f} | {_x(r['ppl'], d['ppl'])} | "
                             f"{other} | {_x(r['ppl_other'], d['ppl_other'])} | {r['prune_seconds']:.1f} | "
                             f"{'x%.2f' % (r['prune_seconds'] / ws) if ws else '-'} |")
        lines.append("")
    lines += [
        "Columns: *pruned* = weights removed / targeted weights of the dense model; *max row* = the most-pruned row; "
        "*prune s* = the whole pruning call (calibration passes, statistics, decisions, OBS update; OWL and "
        "`--target-sparsity` with data-driven counts include their extra dense pass); *vs Wanda* = that time over "
        "the Wanda row's at the same level (same tokens, same run; CPU shared with other jobs, so indicative). "
        "Bold: the lowest perplexity on the other text at that level. EMP at 50/60/70 % uses `--target-sparsity` "
        "(beta by bisection on the counts of the dense model); SparseGPT and OWL + SparseGPT choose per column "
        "block over all rows (SparseGPT's rule), EMP + OBS keeps EMP's count in every row.", ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = [s for s in doc["sections"] if s["rows"]]
    fig, axes = plt.subplots(2, len(secs), figsize=(6.5 * len(secs), 8), squeeze=False)
    d = doc["dense"]
    markers = {"wanda": "o", "sparsegpt": "s", "owl-wanda": "^", "owl-sparsegpt": "v", "emp-wanda": "D",
               "emp-obs": "*", "nm-wanda": "x", "nm-sparsegpt": "+"}
    for j, sec in enumerate(secs):
        for i, (key, ref, name) in enumerate((("ppl", d["ppl"], "WikiText-2 test"),
                                              ("ppl_other", d["ppl_other"], doc["settings"]["other"]["text"]))):
            ax = axes[i][j]
            labels = dict.fromkeys(_label(r) for r in sec["rows"])
            for lab in labels:
                rs = sorted((r for r in sec["rows"] if _label(r) == lab), key=lambda r: r["pruned_fraction"])
                ax.plot([100 * r["pruned_fraction"] for r in rs], [r[key] / ref for r in rs],
                        marker=markers.get(rs[0]["row"], "."), label=lab, ms=8 if rs[0]["row"] == "emp-obs" else 6)
            ax.set_yscale("log")
            ax.set_xlabel("pruned % of targeted weights")
            ax.set_ylabel(f"perplexity / dense ({name})")
            ax.set_title(f"targets {sec['targets']}: {name}")
            ax.grid(alpha=0.3, which="both")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"{doc['model']}: EMP counts + OBS update vs uniform and OWL allocations", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        doc = json.loads(Path(args.out).with_suffix(".json").read_text())
        write(doc, Path(args.out))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
