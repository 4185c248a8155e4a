"""``emprune compare``: dense vs magnitude/Wanda baselines vs EMP recipes, one model load.

Every run uses the same calibration tokens and the same evaluation tokens. The model is loaded
once; a CPU copy of the targeted weights restores the dense model between runs.

Rows, per target set (``mlp``: the paper's protocol; ``linear``: attention too):

* ``dense``;
* magnitude and Wanda at a fixed sparsity per row (default 50 %, the papers' baselines);
* EMP-magnitude and EMP-Wanda at ``beta`` with the paper's exact recipe;
* the default recipe (and any ``extra_recipes``), criterion Wanda;
* *matched*: magnitude and Wanda keeping exactly the per-unit counts of each EMP run (a run
  that would be identical to one already in the table is not repeated: it is listed under
  "same as");
* *uniform*: the EMP run's criterion at the EMP run's overall sparsity, the same fraction in
  every row (the usual "equal sparsity" baseline).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .memory import PeakMemory, fmt_bytes
from .prune import CLIP_FACTOR, RECIPES, Recipe, _spread, get_recipe, prune_lm, target_modules, versions


@dataclass
class RunSpec:
    key: str
    label: str
    kind: str  # dense | fixed | emp | matched | uniform
    criterion: str | None = None
    sparsity: float | None = None
    recipe: Recipe | None = None
    ref: str | None = None  # key of the reference run (matched, uniform)
    how: str = ""
    same_as: list[str] = field(default_factory=list)


def _count_source(spec: RunSpec) -> str:
    assert spec.recipe is not None and spec.criterion is not None
    return spec.criterion if spec.recipe.count_by == "same" else spec.recipe.count_by


def _emp_key(criterion: str, source: str, recipe: Recipe, beta: float) -> str:
    return f"emp|{criterion}|{source}|{recipe.count_unit}|{recipe.min_keep}|{beta:g}"


def _how(r: Recipe) -> str:
    src = {"same": "Wanda scores", "magnitude": "\\|W\\|", "wanda": "Wanda scores",
           "wanda-clip": f"Wanda scores, input norms clipped at {CLIP_FACTOR:g}x median",
           "wanda-sqrt": "\\|W\\|*sqrt(\\|\\|X\\|\\|)"}[r.count_by]
    txt = f"N_eff of {src} per " + ("layer, spread over rows" if r.count_unit == "layer" else "unit")
    if r.min_keep is not None:
        txt += f", floor {r.min_keep:g}" if isinstance(r.min_keep, float) else f", floor {r.min_keep}"
    return txt


def plan(beta: float = 1.0, sparsity: float = 0.5, extra_recipes: Sequence[str] = (),
         uniform: bool = True, matched: bool = True) -> list[RunSpec]:
    """The runs of one target set, in execution order, duplicates folded into ``same_as``."""
    runs: list[RunSpec] = []
    keys: dict[str, RunSpec] = {}

    def add(spec: RunSpec) -> RunSpec:
        if spec.key in keys:
            keys[spec.key].same_as.append(spec.label)
            return keys[spec.key]
        keys[spec.key] = spec
        runs.append(spec)
        return spec

    pct = f"{100 * sparsity:g}%"
    unit = "unit"
    add(RunSpec(f"fixed|magnitude|{sparsity:.6f}", f"magnitude {pct}", "fixed", "magnitude", sparsity,
                how=f"{pct} of every {unit}"))
    add(RunSpec(f"fixed|wanda|{sparsity:.6f}", f"Wanda {pct}", "fixed", "wanda", sparsity,
                how=f"{pct} of every {unit}"))
    paper = RECIPES["paper"]
    emp: list[RunSpec] = []
    b = f"beta={beta:g}"
    emp.append(add(RunSpec(_emp_key("magnitude", "magnitude", paper, beta), "EMP-magnitude (paper)", "emp",
                           "magnitude", recipe=paper, how=f"EMP {b}: N_eff of \\|W\\| per {unit}")))
    emp.append(add(RunSpec(_emp_key("wanda", "wanda", paper, beta), "EMP-Wanda (paper)", "emp", "wanda",
                           recipe=paper, how=f"EMP {b}: N_eff of Wanda scores per {unit}")))
    for name in ("default", *extra_recipes):
        r = get_recipe(name)
        label = f"EMP-Wanda, default recipe ({r.name.split('(')[-1].rstrip(')')})" if name == "default" \
            else f"EMP-Wanda, recipe {r.name}"
        spec = RunSpec("", label, "emp", "wanda", recipe=r, how=f"EMP {b}: {_how(r)}")
        spec.key = _emp_key("wanda", _count_source(spec), r, beta)
        emp.append(add(spec))
    emp = list({r.key: r for r in emp}.values())  # order kept, duplicates (default == paper) dropped
    if matched:
        for ref in emp:
            src = _count_source(ref)
            for crit in ("magnitude", "wanda"):
                if crit == ref.criterion:
                    continue  # the reference itself
                crit_name = "Wanda" if crit == "wanda" else crit
                label = f"{crit_name}, counts of {ref.label}"
                if src == "magnitude":  # data-free counts: identical in any pruning chain
                    assert ref.recipe is not None
                    key = _emp_key(crit, src, ref.recipe, beta)
                else:
                    key = f"matched|{crit}|{ref.key}"
                add(RunSpec(key, label, "matched", crit, ref=ref.key, how=f"same kept count per {unit}"))
    if uniform:
        for ref in emp:
            crit = ref.criterion
            crit_name = "Wanda" if crit == "wanda" else crit
            add(RunSpec(f"uniform|{crit}|{ref.key}", f"{crit_name} uniform at the sparsity of {ref.label}",
                        "uniform", crit, ref=ref.key, how=f"same overall sparsity, equal in every {unit}"))
    return runs


# ------------------------------------------------------------------------ running


def uniform_counts(model: torch.nn.Module, targets: str, sparsity: float) -> dict[str, torch.Tensor]:
    """Per-row keep counts giving every targeted matrix the sparsity ``sparsity`` (its kept total
    rounded to the nearest entry, spread evenly over its rows): the equal-sparsity baseline at
    an EMP run's exact overall sparsity (``sparsity=`` would round every row up instead)."""
    out = {}
    for name, mod in target_modules(model, targets).items():  # type: ignore[arg-type]
        w = mod.weight
        out[name] = _spread(round((1.0 - sparsity) * w.numel()), w.shape[0])
    return out



def run_compare(
    model_spec: str,
    *,
    targets: Sequence[str] = ("mlp",),
    scope: str = "row",
    beta: float = 1.0,
    sparsity: float = 0.5,
    calib_samples: int = 32,
    seqlen: int = 512,
    calib_text: str | None = None,
    eval_tokens: int = 32768,
    eval_seqlen: int | None = None,
    eval_text: str | None = None,
    other_text: str | None = "python-docs",
    other_tokens: int = 16384,
    other_for: str = "all",
    extra_recipes: Sequence[str] = (),
    uniform: bool = True,
    matched: bool = True,
    seed: int = 0,
    batch_size: int = 8,
    out: str | os.PathLike = "emprune-compare",
    command: str | None = None,
    progress: bool = True,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Run the comparison and write ``OUT.md``, ``OUT.json`` and ``OUT.png`` (after every row,
    so an interrupted run leaves its rows so far). Returns the JSON document."""
    from tqdm.auto import tqdm

    from . import data
    from .eval import perplexity
    from .models import load_causal_lm

    if other_for not in ("all", "emp", "none"):
        raise ValueError(f"other_for must be all, emp or none; got {other_for!r}")
    for t in targets:
        if t not in ("mlp", "linear"):
            raise ValueError(f"targets must be mlp and/or linear; got {t!r}")
    t_start = time.perf_counter()
    command = command or "emprune " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = Path(out)
    eval_seqlen = eval_seqlen or seqlen
    model, tokenizer = load_causal_lm(model_spec, dtype=dtype, device_map=device)
    device = None if device in (None, "cpu", "auto") else device  # execution device ("auto": as dispatched)
    calib_src = calib_text if calib_text is not None else str(data.default_text_path("calib"))
    eval_src = eval_text if eval_text is not None else str(data.default_text_path("eval"))
    calib = data.calibration_batches(tokenizer, data.load_text(calib_src, "calib"), calib_samples, seqlen, seed)
    ev_ids = data.eval_tokens(tokenizer, data.load_text(eval_src, "eval"), eval_tokens)
    other_ids = None
    if other_text and other_for != "none":
        other_ids = data.eval_tokens(tokenizer, data.load_text(other_text, "eval"), other_tokens)
    all_mods = {n: m for t in targets for n, m in target_modules(model, t).items()}  # type: ignore[arg-type]
    dense_w = {n: m.weight.detach().to("cpu", copy=True) for n, m in all_mods.items()}

    doc: dict[str, Any] = {
        "command": command,
        "model": model_spec,
        "versions": versions(),
        "settings": {
            "targets": list(targets), "scope": scope, "beta": beta, "fixed_sparsity": sparsity,
            "extra_recipes": list(extra_recipes), "default_recipe": get_recipe("default").to_dict(),
            "paper_recipe": RECIPES["paper"].to_dict(),
        },
        "calibration": {"text": calib_src, "n_samples": calib_samples, "seqlen": seqlen, "seed": seed,
                        "tokens": int(calib.numel())},
        "evaluation": {"text": eval_src, "tokens": int(ev_ids.numel()), "seqlen": eval_seqlen,
                       "windows": int(ev_ids.numel()) // eval_seqlen},
        "other_text": None if other_ids is None else {
            "text": other_text, "tokens": int(other_ids.numel()), "seqlen": eval_seqlen, "rows": other_for,
            "note": "text other than WikiText: python-docs = the Python Language Reference topics shipped "
                    "with CPython (pydoc_data.topics)" if other_text == "python-docs" else ""},
        "sections": [],
        "status": "running",
    }

    def evaluate(row: dict[str, Any], other: bool) -> None:
        te = time.perf_counter()
        r = perplexity(model, ev_ids, eval_seqlen, batch_size=batch_size, progress=False)
        row.update(ppl=r["ppl"], tokens_evaluated=r["tokens_evaluated"])
        if other and other_ids is not None:
            o = perplexity(model, other_ids, eval_seqlen, batch_size=batch_size, progress=False)
            row.update(ppl_other=o["ppl"], other_tokens_evaluated=o["tokens_evaluated"])
        row["eval_seconds"] = time.perf_counter() - te

    dense_row: dict[str, Any] = {"key": "dense", "label": "dense", "kind": "dense", "criterion": None,
                                 "how": "no pruning", "sparsity": 0.0, "same_as": []}
    specs = {t: plan(beta, sparsity, extra_recipes, uniform, matched) for t in targets}
    total_runs = 1 + sum(len(v) for v in specs.values())
    bar = tqdm(total=total_runs, desc="compare", unit="run", disable=not progress)
    bar.set_postfix_str("dense")
    with PeakMemory(device) as mem:
        evaluate(dense_row, True)
    dense_row.update(prune_seconds=0.0, peak_memory=None, eval_peak_memory=mem.result)
    bar.update(1)
    doc["dense"] = dense_row
    _write(doc, out)

    for t in targets:
        section: dict[str, Any] = {"targets": t, "rows": []}
        doc["sections"].append(section)
        done: dict[str, dict[str, Any]] = {}
        counts: dict[str, dict[str, torch.Tensor]] = {}
        for spec in specs[t]:
            bar.set_postfix_str(f"{t}: {spec.label}")
            kw: dict[str, Any] = dict(criterion=spec.criterion, scope=scope, targets=t, progress=False,
                                      batch_size=batch_size, device=device)
            sp_note = None
            if spec.kind == "fixed":
                kw["sparsity"] = spec.sparsity
            elif spec.kind == "emp":
                kw.update(beta=beta, recipe=spec.recipe)
            elif spec.kind == "matched":
                kw.update(counts=counts[spec.ref], counts_from=done[spec.ref]["label"])
            elif spec.kind == "uniform":  # the reference's sparsity in every layer, rows within one entry
                p = done[spec.ref]["sparsity"]
                kw.update(counts=uniform_counts(model, t, p), counts_from=f"uniform {100 * p:.2f}%")
                sp_note = p
            res = prune_lm(model, calib, **kw)
            counts[spec.key] = res.counts
            row = {
                "key": spec.key, "label": spec.label, "kind": spec.kind, "criterion": spec.criterion,
                "how": spec.how, "ref": spec.ref, "same_as": spec.same_as,
                "recipe": spec.recipe.to_dict() if spec.recipe else None,
                "target_sparsity": kw.get("sparsity"),
                "sparsity": res.pruned_fraction,
                "zeros_fraction": res.info["summary"]["zeros_fraction"],
                "dense_zeros_fraction": res.info["summary"]["dense_zeros_fraction"],
                "max_unit_sparsity": max(l["max_unit_sparsity"] for l in res.info["layers"]),
                "layers_with_units_over_95pct": len(res.info["layers_with_units_over_95pct"]),
                "prune_seconds": res.info["seconds"],
                "calibration_seconds": res.info["calibration"]["seconds"],
                "calibration_mode": res.info["calibration"]["mode"],
                "peak_memory": res.info["peak_memory"],
                "per_layer_sparsity": {l["name"]: l["pruned_fraction"] for l in res.info["layers"]},
            }
            if sp_note is not None:
                row["uniform_at"] = sp_note
            with torch.no_grad():
                evaluate(row, other_for == "all" or (other_for == "emp" and spec.kind == "emp"))
            for n, m in all_mods.items():  # back to dense for the next run
                with torch.no_grad():
                    m.weight.copy_(dense_w[n].to(m.weight.device))
            done[spec.key] = row
            section["rows"].append(row)
            bar.update(1)
            _write(doc, out)
    bar.close()
    doc["status"] = "done"
    doc["wall_seconds"] = time.perf_counter() - t_start
    _write(doc, out)
    return doc


# ------------------------------------------------------------------------ output


def _write(doc: dict[str, Any], out: Path) -> None:
    from ..io import atomic_path

    doc = dict(doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o666 & ~_umask()  # mkstemp creates 0600 files; results are meant to be shared
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, default=_default) + "\n")
        os.chmod(tmp, mode)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(doc))
        os.chmod(tmp, mode)
    try:
        plot(doc, out.with_suffix(".png"))
    except ImportError:  # matplotlib missing: the table and JSON are still written
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _ratio(x: float | None, ref: float | None) -> str:
    if x is None or ref is None:
        return "-"
    return f"x{x / ref:.2f}"


def _peak(row: dict[str, Any]) -> str:
    mem = row.get("peak_memory") or {}
    return fmt_bytes(mem.get("cuda_peak_bytes", mem.get("peak_rss_bytes")))


def markdown(doc: dict[str, Any]) -> str:
    """The comparison as a markdown document (tables per target set, then the settings)."""
    dense = doc.get("dense") or {}
    other = doc.get("other_text")
    lines = [f"Command: `{doc['command']}`", ""]
    ev, ca = doc["evaluation"], doc["calibration"]
    lines.append(f"Model `{doc['model']}`; calibration {ca['n_samples']} x {ca['seqlen']} tokens of "
                 f"`{Path(ca['text']).name}` (seed {ca['seed']}); perplexity on {ev['tokens']:,} tokens of "
                 f"`{Path(ev['text']).name}` ({ev['windows']} windows of {ev['seqlen']})"
                 + (f"; 'other' = {other['tokens']:,} tokens of `{other['text']}`" if other else "")
                 + f"; scope {doc['settings']['scope']}; "
                 + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if k != "platform")
                 + (f"; status: {doc['status']}" if doc.get("status") != "done" else
                    f"; total wall time {doc.get('wall_seconds', 0) / 60:.1f} min") + ".")
    lines.append("")
    head = ("| method | how many | sparsity | max unit | ppl WikiText | vs dense | ppl other | vs dense | "
            "prune s | peak RSS |")
    sep = "|" + "---|" * 10
    dense_line = (f"| dense | - | 0.00% | - | {dense.get('ppl', float('nan')):.3f} | x1.00 | "
                  + (f"{dense['ppl_other']:.3f} | x1.00" if dense.get("ppl_other") else "- | -")
                  + " | - | - |")
    for sec in doc["sections"]:
        lines += [f"### targets: {sec['targets']}"
                  + (" (paper protocol: gate/up/down of every block)" if sec["targets"] == "mlp"
                     else " (every Linear of every block: q/k/v/o + gate/up/down)"), "", head, sep, dense_line]
        for r in sec["rows"]:
            label = r["label"] + (f" (= {'; '.join(r['same_as'])})" if r.get("same_as") else "")
            warn = f" ({r['layers_with_units_over_95pct']} layers >95%)" if r["layers_with_units_over_95pct"] else ""
            lines.append(
                f"| {label} | {r['how']} | {100 * r['sparsity']:.2f}% | {100 * r['max_unit_sparsity']:.1f}%{warn} | "
                f"{r['ppl']:.3f} | {_ratio(r['ppl'], dense.get('ppl'))} | "
                + (f"{r['ppl_other']:.3f} | {_ratio(r['ppl_other'], dense.get('ppl_other'))}"
                   if r.get("ppl_other") else "- | -")
                + f" | {r['prune_seconds']:.1f} | {_peak(r)} |")
        lines.append("")
    d, p = doc["settings"]["default_recipe"], doc["settings"]["paper_recipe"]
    lines += [
        "Columns: *sparsity* = weights removed by pruning / targeted weights of the dense model (the "
        "pre-existing exact zeros of the weights are not counted as pruned; see `zeros_fraction` and "
        "`dense_zeros_fraction` in the JSON); *max unit* = the most-pruned unit (row); *prune s* = "
        "calibration + scoring + masking; *peak RSS* = process resident memory peak during the pruning "
        "run (sampled; it includes the loaded model and the dense copy kept for restoring; evaluation "
        "is not included).",
        "",
        f"Recipes: paper = {p['summary']}; default = `{d['name']}`: {d['summary']}. *Matched* rows keep "
        "exactly the per-row counts of the named EMP run; *uniform* rows prune every row by the EMP run's "
        "overall sparsity.",
        "",
    ]
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Perplexity vs sparsity, one panel per target set: numbered points (keyed on the right),
    the equal-sparsity baselines joined by a line per criterion, the command line as caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = doc["sections"] or [{"targets": "-", "rows": []}]
    n = len(secs)
    fig = plt.figure(figsize=(5.2 * n + 4.6, 5.6))
    gs = fig.add_gridspec(1, n + 1, width_ratios=[5.2] * n + [4.6])
    marker = {"fixed": "s", "emp": "*", "matched": "^", "uniform": "o"}
    color = {"magnitude": "tab:blue", "wanda": "tab:orange"}
    dense = doc.get("dense") or {}
    key_lines: list[str] = []
    labels: dict[str, int] = {}
    for j, sec in enumerate(secs):
        ax = fig.add_subplot(gs[0, j])
        if dense.get("ppl"):
            ax.axhline(dense["ppl"], color="gray", ls="--", lw=1, label=f"dense {dense['ppl']:.2f}")
        for crit in ("magnitude", "wanda"):  # the equal-sparsity curve of each criterion
            pts = sorted((100 * r["sparsity"], r["ppl"]) for r in sec["rows"]
                         if r["criterion"] == crit and r["kind"] in ("fixed", "uniform"))
            if len(pts) > 1:
                ax.plot(*zip(*pts), color=color[crit], lw=1, alpha=0.6,
                        label=f"{'Wanda' if crit == 'wanda' else crit}, equal sparsity per row")
        # collapsed runs (thousands of times dense) would squash the interesting range: draw them
        # on the top edge with their value
        top = 30 * dense["ppl"] if dense.get("ppl") else math.inf
        for r in sec["rows"]:
            if r["label"] not in labels:
                labels[r["label"]] = len(labels) + 1
                key_lines.append(f"{labels[r['label']]:>2}  {r['label']}")
            x, y = 100 * r["sparsity"], r["ppl"]
            tag = str(labels[r["label"]])
            if y > top:
                y, tag = top, f"{tag} (ppl {r['ppl']:.3g}, off scale)"
            ax.scatter(x, y, marker=marker.get(r["kind"], "o"), s=150 if r["kind"] == "emp" else 45,
                       color=color.get(r["criterion"], "k"), edgecolor="k", lw=0.5, zorder=3)
            ax.annotate(tag, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity of the targeted weights (% of the dense model)")
        ax.set_ylabel("perplexity (WikiText-2 test)")
        ax.set_title(f"{doc['model']}: targets {sec['targets']}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
    kax = fig.add_subplot(gs[0, n])
    kax.axis("off")
    key = "\n".join(key_lines) + "\n\nstar: EMP   square: fixed %   triangle: matched counts\n" \
                                 "circle: equal sparsity   blue: magnitude   orange: Wanda"
    kax.text(0.0, 1.0, key, fontsize=6.5, va="top", family="monospace", wrap=True)
    caption = "\n".join(_wrap(doc["command"], 150))
    fig.text(0.01, 0.005, caption, fontsize=6.5, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _wrap(s: str, n: int) -> list[str]:
    return [s[i:i + n] for i in range(0, len(s), n)] or [""]
