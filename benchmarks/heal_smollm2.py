"""Healing (``emprune heal``) on SmolLM2-135M: how much of the perplexity lost to pruning comes back
after a short fine-tune with the pruned weights held at zero, and what the text alone does.

Rows (each built from the same dense model, calibration 32 x 256 tokens of WikiText-2 validation):

* ``dense``: the control; fine-tuned on the same tokens (the text alone moves perplexity: healing
  must not be credited with that);
* ``default``: EMP-Wanda with counts from |W| and no update (``--recipe count-magnitude --update
  none``: ``emprune prune``'s default when this table was made, before the OBS update joined it;
  37.6 % of the MLP weights);
* ``wanda50``: Wanda at 50 % per row;
* ``emp60``: the same at ``--emp-beta`` (0.64: about 60 %);
* ``uniform25``: 25 % of the MLP neurons of every layer removed (``shrink_lm(keep=0.75,
  uniform=True)``: fluctuation scores, no compensation; a stock config);
* ``shrink``: ``emprune shrink``'s default before the ``sensitivity`` recipe, ``zscore`` (global z-score
  allocation of fluctuation scores, bias compensation; about 22 % of the non-embedding parameters);
* ``uniform-shrink``: its fixed-size baseline, the same fraction of MLP neurons removed in every
  layer by the activation score, at the ``shrink`` row's kept parameter count (as
  ``shrink_smollm2.py``'s "uniform activation @default"), so the two compare healed at equal size;
* ``shrink-sens`` / ``uniform-sens``: the same pair for the default since, recipe ``sensitivity``
  (EMP's total removed where the measured loss increase is smallest).

Each row is healed by full fine-tuning and by LoRA (``--modes``) with the same token budget
(``--steps`` x ``--batch`` x ``--seqlen`` tokens of WikiText-2 *validation*, the calibration text),
then evaluated on WikiText-2 *test* and python-docs (both held out). A perplexity curve on the
first ``--curve-tokens`` of WikiText-2 test is taken every ``--curve-every`` steps. The exact zero
count of every pruned module is checked before and after.

    python benchmarks/heal_smollm2.py                          # the committed table (long: run under flock)
    python benchmarks/heal_smollm2.py --rows uniform25 --modes full --lrs 1e-4,3e-4 --out /tmp/tune
    python benchmarks/heal_smollm2.py --quick --out /tmp/q     # smoke: tiny random LLaMA, 2 steps
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from common import REPO, write_results

ROWS = ("dense", "default", "wanda50", "emp60", "uniform25", "shrink", "uniform-shrink", "shrink-sens", "uniform-sens")
LABELS = {
    "dense": "dense (control)",
    "default": "EMP count-magnitude (default then)",
    "wanda50": "Wanda 50%",
    "emp60": "EMP count-magnitude, beta<1",
    "uniform25": "uniform 25% MLP neurons removed",
    "shrink": "emprune shrink zscore (default then)",
    "uniform-shrink": "uniform activation, shrink's size",
    "shrink-sens": "emprune shrink default (sensitivity)",
    "uniform-sens": "uniform activation, sensitivity's size",
}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def build(row: str, dense: nn.Module, calib: torch.Tensor, args) -> tuple[nn.Module, dict]:
    """A fresh copy of ``dense`` pruned / shrunk as ``row`` says, and what it is."""
    from emprune.jobs.prune_lm import prune_lm
    from emprune.jobs.shrink_lm import shrink_lm

    m = copy.deepcopy(dense)
    t = time.perf_counter()
    if row == "dense":
        return m, {"targets": None, "pruned_fraction": 0.0, "params": sum(p.numel() for p in m.parameters())}
    if row in ("default", "wanda50", "emp60"):
        kw = {"default": {}, "wanda50": {"sparsity": 0.5}, "emp60": {"beta": args.emp_beta}}[row]
        res = prune_lm(m, calib, criterion="wanda", recipe="count-magnitude", update=None, targets="mlp",
                       progress=False, batch_size=8, **kw)
        info = {"targets": [l["name"] for l in res.info["layers"]], "pruned_fraction": res.pruned_fraction}
    else:
        recipe = {"shrink": "zscore", "uniform-shrink": "zscore"}.get(row, "sensitivity")
        kw = {"keep": 0.75, "uniform": True} if row == "uniform25" else {"recipe": recipe, "scope": "global"}
        kw["multiple_of"] = 1  # any width, as the results in heal_smollm2.md were measured (before --multiple-of)
        if row in ("uniform-shrink", "uniform-sens"):  # the EMP row's kept MLP parameters, the same share everywhere
            ref, _ = shrink_lm(copy.deepcopy(dense), calib, units="mlp", progress=False, **kw)
            kw = {"criterion": "activation", "keep": {"params": sum(g.params_after for g in ref.groups)},
                  "multiple_of": 1}
        report, summ = shrink_lm(m, calib, units="mlp", progress=False, **kw)
        info = {"targets": None, "pruned_fraction": summ["summary"]["removed_fraction_non_embedding"],
                "layout": summ["layout"]}
    info["params"] = sum(p.numel() for p in m.parameters())
    info["build_seconds"] = time.perf_counter() - t
    return m, info


def evaluate(m: nn.Module, wt: torch.Tensor, py: torch.Tensor, args) -> dict:
    from emprune.jobs.eval import perplexity

    return {"wikitext": perplexity(m, wt, args.eval_seqlen, batch_size=4, progress=False)["ppl"],
            "other": perplexity(m, py, args.eval_seqlen, batch_size=4, progress=False)["ppl"]}


def run(args, R: dict, save) -> None:
    from emprune.models.data import calibration_batches, eval_tokens, load_text, tokenize
    from emprune.jobs.heal import heal
    from emprune.models.loading import load_causal_lm

    if args.quick:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_llama import TEXT, save_tiny

        d = Path(tempfile.mkdtemp()) / "tiny"
        save_tiny(d)
        dense, tok = load_causal_lm(d, progress=False)
        heal_text = eval_text = other_text = TEXT
    else:
        dense, tok = load_causal_lm(args.model, progress=False)
        heal_text, eval_text = load_text(None, "calib"), load_text(None, "eval")
        other_text = load_text("python-docs")
    heal_ids = tokenize(tok, heal_text)
    calib = calibration_batches(tok, heal_text, args.calib_samples, args.calib_seqlen, seed=0)
    wt = eval_tokens(tok, eval_text, args.eval_tokens)
    py = eval_tokens(tok, other_text, args.other_tokens)
    curve = wt[: args.curve_tokens]
    R["texts"] = {"heal_tokens": int(heal_ids.numel()), "wikitext_tokens": int(wt.numel()),
                  "other_tokens": int(py.numel()), "curve_tokens": int(curve.numel())}
    done = {(r["row"], r["mode"], r["lr"], r.get("loss_kind", "ce")) for r in R["runs"]}
    if "dense" not in R["rows"]:  # the reference of every gap, evaluated even when not healed
        R["rows"]["dense"] = {"targets": None, "pruned_fraction": 0.0, "before": evaluate(dense, wt, py, args),
                              "params": sum(p.numel() for p in dense.parameters())}
        save()
    for row in args.rows:
        todo = [(mode, lr, kind) for kind in args.losses for mode in args.modes
                for lr in (args.lrs if mode == "full" else args.lora_lrs) if (row, mode, lr, kind) not in done
                and not (row == "dense" and kind == "kd")]  # the dense model distilled from itself: no loss
        if not todo:
            continue
        pruned, info = build(row, dense, calib, args)
        if row not in R["rows"] or "before" not in R["rows"][row]:
            info["before"] = evaluate(pruned, wt, py, args)
            R["rows"][row] = info
            save()
        log(f"{row}: pruned {100 * info['pruned_fraction']:.1f}%, ppl wikitext {R['rows'][row]['before']['wikitext']:.2f} "
            f"other {R['rows'][row]['before']['other']:.2f}")
        for mode, lr, kind in todo:
            m = copy.deepcopy(pruned)
            res = heal(m, heal_ids, steps=args.steps, lr=lr, seqlen=args.seqlen, batch=args.batch,
                       lora=args.lora_r if mode == "lora" else None, targets=info["targets"],
                       schedule=args.schedule, warmup=args.warmup, eval_tokens=curve,
                       eval_every=args.curve_every, eval_seqlen=args.eval_seqlen, eval_batch=4,
                       teacher=dense if kind == "kd" else None,
                       progress=not args.no_progress, seed=args.seed)
            rec = res.record
            after = evaluate(res.model, wt, py, args)
            run_rec = {"row": row, "mode": mode, "lr": lr, "loss_kind": kind, "command": R["command"],
                       "after": after, "seconds": rec["seconds"],
                       "steps": rec["steps"], "tokens": rec["tokens"], "curve": rec["eval"]["curve"],
                       "loss": [x["loss"] for x in rec["loss_curve"]], "masks": rec["masks"],
                       "rezeroed_after_merge": (rec["lora"] or {}).get("rezeroed_after_merge"),
                       "trainable_parameters": rec["trainable_parameters"]}
            if info["targets"] is not None and not rec["masks"]["zeros_unchanged"]:
                raise SystemExit(f"{row} {mode}: the zero count changed: {rec['masks']['modules_with_changed_zeros']}")
            R["runs"].append(run_rec)
            save()
            log(f"{row} {mode} {kind} lr {lr:g}: wikitext {R['rows'][row]['before']['wikitext']:.2f} -> {after['wikitext']:.2f}, "
                f"other {R['rows'][row]['before']['other']:.2f} -> {after['other']:.2f} in {rec['seconds']:.0f} s "
                f"(zeros {rec['masks']['zeros_before']:,} -> {rec['masks']['zeros_after']:,})")
            del m, res
        del pruned


# ------------------------------------------------------------------------------- writing


def gap_closed(before: float, after: float, dense: float) -> float | None:
    """Share of the perplexity gap to the dense model closed by healing, (before - after) /
    (before - dense), as the issue measured it (x2.34 -> x1.69 of dense = 48 %); 1 = back to
    dense, above 1 = better than the unhealed dense model."""
    gap = before - dense
    return None if gap <= 0 else (before - after) / gap


def markdown(R: dict) -> str:
    a = R["args"]
    dense = R["rows"].get("dense", {}).get("before")
    ctrl = {(r["mode"], r["lr"], r.get("loss_kind", "ce")): r["after"] for r in R["runs"] if r["row"] == "dense"}
    lines = [f"# emprune heal on {a['model'] if not a['quick'] else 'a tiny random LLaMA (--quick)'}", "",
             *([f"Command: `{R['command']}`  "] if len(R.get("commands", [])) < 2 else
               ["Commands (the runs were added one command at a time with `--resume`, same settings):", "",
                *[f"- `{c}`" for c in R["commands"]], ""]),
             f"Machine: {R['env']}; wall time {R.get('seconds', 0) / 60:.1f} min" + (
                 f" ({R['note']})" if R.get("note") else "") + ".", "",
             f"Healing: {a['steps']} AdamW steps of {a['batch']} x {a['seqlen']} tokens "
             f"({a['steps'] * a['batch'] * a['seqlen']:,} tokens) of WikiText-2 *validation* (the calibration text), "
             f"{a['schedule']} schedule, warm-up {a['warmup']}; full fine-tuning (float32) or LoRA r={a['lora_r']} "
             f"on every Linear of the blocks, merged, masks re-applied. Perplexity on the first "
             f"{R['texts']['wikitext_tokens']:,} tokens of WikiText-2 *test* and {R['texts']['other_tokens']:,} of "
             f"python-docs (held out), windows of {a['eval_seqlen']}. Pruning: calibration {a['calib_samples']} x "
             f"{a['calib_seqlen']} tokens of WikiText-2 validation, MLP weights.", "",
             "| row | removed | mode | lr | ppl WikiText-2 before -> after | gap closed | to control | "
             "vs dense control | ppl python-docs before -> after | gap closed | to control | vs dense control | "
             "zeros before = after | re-zeroed after merge | time |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    order = lambda r: (ROWS.index(r["row"]), r["mode"] != "full", r.get("loss_kind", "ce"), -r["lr"])  # noqa: E731
    for r in sorted(R["runs"], key=order):  # grouped by row (the JSON keeps the order they ran in)
        row = R["rows"][r["row"]]
        b, af = row["before"], r["after"]
        kind = r.get("loss_kind", "ce")
        if kind == "kd":  # distilling the dense model from itself changes nothing: its control is dense itself
            c = dense
        else:
            c = ctrl.get((r["mode"], r["lr"], kind))  # the control trained the same way (lr included)
        cells = []
        for key in ("wikitext", "other"):
            g = gap_closed(b[key], af[key], dense[key]) if dense else None
            gc = None if c is None or r["row"] == "dense" else gap_closed(b[key], af[key], c[key])
            cells += [f"{b[key]:.2f} -> {af[key]:.2f}", "-" if g is None else f"{100 * g:.0f}%",
                      "-" if gc is None else f"{100 * gc:.0f}%",
                      "-" if c is None or r["row"] == "dense" else f"x{af[key] / c[key]:.3f}"]
        m = r["masks"]
        zeros = (f"{m['zeros_before']:,} = {m['zeros_after']:,}" if m["masked_modules"] else "no masks")
        if m["masked_modules"] and not m["zeros_unchanged"]:
            zeros = f"CHANGED {m['zeros_before']:,} -> {m['zeros_after']:,}"
        rz = "-" if r["rezeroed_after_merge"] is None or not m["masked_modules"] else f"{r['rezeroed_after_merge']:,}"
        removed = "-" if r["row"] == "dense" else f"{100 * row['pruned_fraction']:.1f}%"
        lines.append(f"| {LABELS.get(r['row'], r['row'])} | {removed} | {r['mode']}{' + KD' if kind == 'kd' else ''} | "
                     f"{r['lr']:g} | "
                     + " | ".join(cells) + f" | {zeros} | {rz} | "
                     f"{r['seconds'] / 60:.1f} min |")
    lines += ["", "Columns: *removed* = pruned share of the MLP weights (unstructured rows) or of the non-embedding "
              "parameters (shrunk rows); *gap closed* = (ppl before - ppl after) / (ppl before - ppl dense), "
              "where dense is the unhealed dense model (100% = back to dense; above 100% = better than "
              "dense, which fine-tuning on WikiText-2 text can do on WikiText-2 test); *to control* = the same share of "
              "the gap to the dense control below (what healing adds beyond what the text alone does; above 100% "
              "= better than the control); *vs dense control* = ppl "
              "after / ppl of the dense model fine-tuned the same way on the same tokens (what the text alone "
              "gives; x1.000 = healed all the way to the control; for distillation (+ KD) rows the control is the dense "
              "model itself, the distillation target); *zeros* = exact zeros of the pruned modules "
              "before and after healing (checked); *re-zeroed after merge* = merged LoRA entries at pruned "
              "positions that were set back to zero; *time* = training only (evaluation excluded)."]
    return "\n".join(lines) + "\n"


def plot(R: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    colour = {row: plt.get_cmap("tab10")(i) for i, row in enumerate(ROWS)}  # one colour per input model
    styles = {}  # one line style per loss and lr: (loss, lr) -> style, in the order they first appear
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), sharey=True)
    for ax, mode in zip(axes, ("full", "lora")):
        for r in R["runs"]:
            if r["mode"] != mode or not r["curve"]:
                continue
            key = ("distillation" if r.get("loss_kind") == "kd" else "next-token loss", r["lr"])
            ls = styles.setdefault(key, ("-", "--", ":", "-.")[len(styles) % 4])
            ax.plot([p["tokens"] for p in r["curve"]], [p["ppl"] for p in r["curve"]], marker="o", ms=3,
                    color=colour[r["row"]], ls=ls)
        ax.set_yscale("log")
        ax.set_xlabel("healing tokens")
        ax.set_title(f"{mode} fine-tuning" + (f" (LoRA r={R['args']['lora_r']})" if mode == "lora" else ""))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"perplexity, first {R['texts']['curve_tokens']:,} tokens of WikiText-2 test")
    rows = dict.fromkeys(r["row"] for r in R["runs"])
    handles = ([Line2D([], [], color=colour[row], lw=3) for row in rows]
               + [Line2D([], [], color="k", ls=ls) for ls in styles.values()])
    names = [LABELS.get(row, row) for row in rows] + [f"{loss}, lr {lr:g}" for loss, lr in styles]
    axes[1].legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write(R: dict, out: Path, final: bool) -> None:
    write_results(out, R, markdown if final else None, plot if final else None)


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "heal_smollm2"),
                    help="output prefix (.md/.json/.png)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--modes", default="full,lora", help="full, lora or full,lora")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per healing run")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256, help="training window")
    ap.add_argument("--lrs", type=_floats, default=[2e-4], help="full fine-tuning learning rate(s), comma-separated")
    ap.add_argument("--lora-lrs", type=_floats, default=[1e-3], help="LoRA learning rate(s)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--losses", default="ce", help="ce (next-token loss on the text), kd (distillation from the "
                    "dense model) or ce,kd")
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--emp-beta", type=float, default=0.64, help="beta of the emp60 row (0.64: about 60%%)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="WikiText-2 test tokens")
    ap.add_argument("--other-tokens", type=int, default=8192, help="python-docs tokens")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--curve-tokens", type=int, default=4096, help="WikiText-2 test tokens of the curve")
    ap.add_argument("--curve-every", type=int, default=None, help="steps between curve points (default steps/8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="keep the runs already in OUT.json (same settings)")
    ap.add_argument("--note", default="", help="a remark for the table's header (e.g. machine load)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny random LLaMA, 2 steps, tiny sizes")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.seqlen, args.calib_samples, args.calib_seqlen = 2, 2, 32, 4, 32
        args.eval_tokens, args.other_tokens, args.eval_seqlen, args.curve_tokens = 512, 512, 32, 256
    args.rows = [r for r in args.rows.split(",") if r]
    args.modes = [m for m in args.modes.split(",") if m]
    args.losses = [k for k in args.losses.split(",") if k]
    if set(args.losses) - {"ce", "kd"}:
        ap.error("--losses takes ce, kd or ce,kd")
    for r in args.rows:
        if r not in ROWS:
            ap.error(f"unknown row {r!r}; choose from {', '.join(ROWS)}")
    if "dense" in args.rows:  # the control first: the other rows' gaps are measured against it
        args.rows = ["dense"] + [r for r in args.rows if r != "dense"]
    args.curve_every = args.curve_every or max(1, args.steps // 8)
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("rows", "modes", "lrs", "lora_lrs", "losses", "out", "resume",
                                                                  "note", "no_progress")}
    R = {"command": " ".join(["python", "benchmarks/heal_smollm2.py",
                              *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
         "args": {**vars(args)}, "settings": settings,
         "env": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads", "note": args.note, "rows": {}, "runs": []}
    if args.resume and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        if old.get("settings") != settings:
            ap.error("--resume: OUT.json was made with other settings")
        R["rows"], R["runs"] = old["rows"], old["runs"]
        R["note"] = args.note or old.get("note", "")  # kept unless a new one is given
        R["commands"] = [*old.get("commands", [old["command"]]), R["command"]]
        R["seconds_before"] = old.get("seconds", 0)  # includes its own earlier runs
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)

    def save() -> None:
        R["seconds"] = time.perf_counter() - t0 + R.get("seconds_before", 0)
        write(R, out, final=False)

    run(args, R, save)
    R["seconds"] = time.perf_counter() - t0 + R.get("seconds_before", 0)
    write(R, out, final=True)
    log(f"wrote {out}.md/.json/.png in {R['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
