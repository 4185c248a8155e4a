"""``emprune compare``: dense vs magnitude/Wanda baselines vs EMP recipes, one model load.

Every run uses the same calibration and evaluation tokens. The model is loaded once; a CPU copy
of the targeted weights restores the dense model between runs.

Rows, per target set (``mlp``: the paper's protocol; ``linear``: attention too), named as in
the tables:

* ``dense``;
* ``magnitude 50%``, ``Wanda 50%``: the baseline criteria at a fixed sparsity per row;
* ``EMP-magnitude (paper)``, ``EMP-Wanda (paper)``: EMP at ``beta`` with the paper's exact
  recipe; ``EMP-Wanda (default)`` and any ``extra_recipes`` (criterion Wanda);
* *matched*, ``Wanda @EMP-magnitude (paper) counts``: a baseline criterion keeping exactly the
  per-row counts of an EMP run (only which entries differs). A run identical to one already in
  the table is not repeated: it is listed under "same as";
* *uniform*, ``Wanda uniform @37.6%``: the EMP run's criterion pruning the EMP run's overall
  pruned fraction in every row (only the allocation over rows differs).

The lifecycle of :func:`run_compare`: check the options; load the model and the texts once
(:func:`_load_bench`); plan the runs of each target set (:func:`plan`); evaluate the dense model;
then for every planned run prune (:func:`_prune_kwargs` + ``prune_lm``), evaluate, record the
row (:func:`_row`) and restore the dense weights (:meth:`_Bench.restore`), writing OUT.md/.json/.png
after every row so that an interrupted run keeps its rows so far.
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

from .. import criteria as C
from .memory import PeakMemory, fmt_bytes
from ..decide.allocate import spread
from ..decide.recipes import RECIPES, Recipe, get_recipe
from ..models.checkpoint import versions
from ..structure.targets import block_targets
from .options import CompareOptions, build
from .prune_lm import LMPruneResult, auto_update, criterion_choices, prune_lm

#: the criteria of the fixed-sparsity, matched and uniform baselines (the papers' two)
BASELINES = ("magnitude", "wanda")
#: what the scores are, in the "how many" column (other criteria: their registry name)
_SCORES = {"magnitude": "|W|", "wanda": "Wanda scores",
           "wanda-clip": "Wanda scores, input norms clipped at 4x median", "wanda-sqrt": "|W|*sqrt(||X||)"}


def _display(crit: str) -> str:
    """A criterion's name in labels (``Wanda`` capitalised as in the paper)."""
    return crit.replace("wanda", "Wanda")


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
    update: str | None = None  # the reconstruction the run applies (emp: its recipe's; uniform: its reference's)
    same_as: list[str] = field(default_factory=list)


def _count_source(spec: RunSpec) -> str:
    assert spec.recipe is not None and spec.criterion is not None
    return spec.criterion if spec.recipe.count_by == "same" else spec.recipe.count_by


def _emp_key(criterion: str, source: str, recipe: Recipe, beta: float, update: str | None = None) -> str:
    return f"emp|{criterion}|{source}|{recipe.count_unit}|{recipe.min_keep}|{beta:g}|{update}"


def _how(criterion: str, r: Recipe, beta: float, update: str | None = None) -> str:
    src = r.count_by if r.count_by != "same" else criterion
    txt = f"EMP beta={beta:g}: N_eff of {_SCORES.get(src, src + ' scores')} per "
    txt += "layer, spread over rows" if r.count_unit == "layer" else "unit"
    if r.min_keep is not None:
        txt += f", floor {r.min_keep:g}" if isinstance(r.min_keep, float) else f", floor {r.min_keep}"
    return txt + (f"; {update.upper()} chooses which and updates the rest" if update else "")


def _emp_specs(beta: float, extra_recipes: Sequence[str], baselines: Sequence[str],
               scope: str = "row") -> list[RunSpec]:
    """The EMP runs: each baseline criterion with the paper's recipe, then EMP-Wanda with the
    default recipe and the extra ones (duplicates of an earlier run dropped)."""
    paper = RECIPES["paper"]
    out = [RunSpec(_emp_key(c, c, paper, beta), f"EMP-{_display(c)} (paper)", "emp", c, recipe=paper,
                   how=_how(c, paper, beta)) for c in baselines]
    for name in ("default", *extra_recipes):
        r = get_recipe(name, "prune")
        upd = auto_update(r, "wanda", scope)
        spec = RunSpec("", f"EMP-Wanda ({name})", "emp", "wanda", recipe=r, how=_how("wanda", r, beta, upd),
                       update=upd)
        spec.key = _emp_key("wanda", _count_source(spec), r, beta, upd)
        out.append(spec)
    return list({r.key: r for r in out}.values())  # order kept, duplicates (default == paper) dropped


def plan(beta: float = 1.0, sparsity: float = 0.5, extra_recipes: Sequence[str] = (),
         uniform: bool = True, matched: bool = True, baselines: Sequence[str] = BASELINES,
         scope: str = "row") -> list[RunSpec]:
    """The runs of one target set, in execution order, duplicates folded into ``same_as``.

    ``baselines``: registered criteria (usable layer-wise) of the fixed-sparsity, matched and
    uniform rows, and of the paper-recipe EMP rows. A uniform run applies its reference's update
    (an EMP run with OBS is set against OBS at the same pruned fraction in every row: only the
    allocation differs); matched runs apply none (the criterion chooses at the reference's counts)."""
    for c in baselines:
        if c not in criterion_choices():
            raise ValueError(f"baselines must be among {', '.join(criterion_choices())}; got {c!r}")
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
    for c in baselines:
        add(RunSpec(f"fixed|{c}|{sparsity:.6f}", f"{_display(c)} {pct}", "fixed", c, sparsity,
                    how=f"{pct} of every unit"))
    emp = [add(spec) for spec in _emp_specs(beta, extra_recipes, baselines, scope)]
    for ref in emp if matched else ():
        src = _count_source(ref)
        for crit in baselines:
            if crit == ref.criterion:
                continue  # the reference itself
            if not C.entry(src).needs_calibration:  # data-free counts: identical in any pruning chain
                assert ref.recipe is not None
                key = _emp_key(crit, src, ref.recipe, beta)
            else:
                key = f"matched|{crit}|{ref.key}"
            add(RunSpec(key, f"{_display(crit)} @{ref.label} counts", "matched", crit, ref=ref.key,
                        how=f"per-unit counts of {ref.label}"))
    for ref in emp if uniform else ():
        crit = ref.criterion
        assert crit is not None
        add(RunSpec(f"uniform|{crit}|{ref.key}", f"{_uniform_name(crit, ref.update)} uniform @{ref.label}", "uniform", crit,
                    ref=ref.key, how=f"pruned fraction of {ref.label}, equal in every unit"
                    + (f"; {ref.update.upper()} chooses which and updates the rest" if ref.update else ""),
                    update=ref.update))
    return runs


# ------------------------------------------------------------------------ running


def uniform_counts(model: torch.nn.Module, targets: str, sparsity: float) -> dict[str, torch.Tensor]:
    """Per-row keep counts giving every targeted matrix the sparsity ``sparsity`` (its kept total
    rounded to the nearest entry, spread evenly over its rows): the equal-sparsity baseline at
    an EMP run's exact overall sparsity (``sparsity=`` would round every row up instead)."""
    out = {}
    for name, mod in block_targets(model, targets).items():  # type: ignore[arg-type]
        w = mod.weight
        out[name] = spread(round((1.0 - sparsity) * w.numel()), w.shape[0])
    return out


@dataclass
class _Bench:
    """What every run shares: the loaded model, the calibration and evaluation tokens, and a CPU
    copy of the dense targeted weights (restored after each run)."""

    model: torch.nn.Module
    calib: torch.Tensor
    ev_ids: torch.Tensor
    other_ids: torch.Tensor | None
    eval_seqlen: int
    batch_size: int
    device: str | None  # execution device for prune_lm (None: as loaded)
    dense: dict[str, torch.Tensor]

    def evaluate(self, row: dict[str, Any], other: bool) -> None:
        """Perplexity on the evaluation text (and the other text if ``other``), into ``row``."""
        from .eval import perplexity

        te = time.perf_counter()
        r = perplexity(self.model, self.ev_ids, self.eval_seqlen, batch_size=self.batch_size, progress=False)
        row.update(ppl=r["ppl"], tokens_evaluated=r["tokens_evaluated"])
        if other and self.other_ids is not None:
            o = perplexity(self.model, self.other_ids, self.eval_seqlen, batch_size=self.batch_size, progress=False)
            row.update(ppl_other=o["ppl"], other_tokens_evaluated=o["tokens_evaluated"])
        row["eval_seconds"] = time.perf_counter() - te

    @torch.no_grad()
    def restore(self) -> None:
        """Back to the dense weights for the next run."""
        mods = dict(self.model.named_modules())
        for n, w in self.dense.items():
            mods[n].weight.copy_(w.to(mods[n].weight.device))


def _load_bench(model_spec: str, o: CompareOptions) -> tuple[_Bench, dict[str, Any]]:
    """Load the model and the texts once; returns the bench and the document's header fields."""
    from ..models import data
    from ..models.loading import load_causal_lm
    from ..structure.layouts import to_linears

    targets, calib_text, eval_text, seqlen, device = tuple(o.targets), o.calib_text, o.eval_text, o.seqlen, o.device
    calib_samples, seed, eval_tokens, other_text, other_tokens = o.calib_samples, o.seed, o.eval_tokens, o.other_text, o.other_tokens
    eval_seqlen, other_for, batch_size = o.eval_seqlen or seqlen, o.other_for, o.batch_size
    model, tokenizer = load_causal_lm(model_spec, dtype=o.dtype or torch.float32, device_map=device)
    to_linears(model)  # GPT-2: its Conv1D as Linear (rows = output units) for the whole session; never saved
    calib_src = calib_text if calib_text is not None else str(data.default_text_path("calib"))
    eval_src = eval_text if eval_text is not None else str(data.default_text_path("eval"))
    calib = data.calibration_batches(tokenizer, data.load_text(calib_src, "calib"), calib_samples, seqlen, seed)
    ev_ids = data.eval_tokens(tokenizer, data.load_text(eval_src, "eval"), eval_tokens)
    other_ids = None
    if other_text and other_for != "none":
        other_ids = data.eval_tokens(tokenizer, data.load_text(other_text, "eval"), other_tokens)
    mods = {n: m for t in targets for n, m in block_targets(model, t).items()}  # type: ignore[arg-type]
    dense = {n: m.weight.detach().to("cpu", copy=True) for n, m in mods.items()}
    run_device = None if device in (None, "cpu", "auto") else device  # "auto": run as dispatched
    bench = _Bench(model, calib, ev_ids, other_ids, eval_seqlen, batch_size, run_device, dense)
    header = {
        "calibration": {"text": calib_src, "n_samples": calib_samples, "seqlen": seqlen, "seed": seed,
                        "tokens": int(calib.numel())},
        "evaluation": {"text": eval_src, "tokens": int(ev_ids.numel()), "seqlen": eval_seqlen,
                       "windows": int(ev_ids.numel()) // eval_seqlen},
        "other_text": None if other_ids is None else {
            "text": other_text, "tokens": int(other_ids.numel()), "seqlen": eval_seqlen, "rows": other_for,
            "note": "text other than WikiText: python-docs = the Python Language Reference topics shipped "
                    "with CPython (pydoc_data.topics)" if other_text == "python-docs" else ""},
    }
    return bench, header


def _prune_kwargs(spec: RunSpec, bench: _Bench, targets: str, scope: str, beta: float,
                  done: dict[str, dict[str, Any]], counts: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """``prune_lm``'s arguments for one planned run (matched and uniform runs read their
    reference run's counts or pruned fraction)."""
    kw: dict[str, Any] = dict(criterion=spec.criterion, scope=scope, targets=targets, progress=False,
                              batch_size=bench.batch_size, device=bench.device)
    if spec.kind == "fixed":
        kw["sparsity"] = spec.sparsity
    elif spec.kind == "emp":
        kw.update(beta=beta, recipe=spec.recipe, update=spec.update)
    elif spec.kind == "matched":
        kw.update(counts=counts[spec.ref], counts_from=done[spec.ref]["label"])  # type: ignore[index]
    elif spec.kind == "uniform":  # the reference's pruned fraction in every layer, rows within one entry
        p = done[spec.ref]["pruned_fraction"]  # type: ignore[index]
        kw.update(counts=uniform_counts(bench.model, targets, p), counts_from=f"uniform {100 * p:.2f}%",
                  update=spec.update)
    return kw


def _uniform_name(criterion: str, update: str | None) -> str:
    """Who chooses in a uniform run: the update (``OBS``) if it has one, else the criterion."""
    return update.upper() if update else _display(criterion)


def _uniform_label(spec: RunSpec, p: float, ref_label: str, taken: set[str]) -> str:
    """``Wanda uniform @37.6%`` (with the reference run named where that repeats a label)."""
    label = f"{_uniform_name(spec.criterion or '', spec.update)} uniform @{100 * p:.1f}%"
    return label if label not in taken else f"{label} ({ref_label})"


def _row(spec: RunSpec, res: LMPruneResult, kw: dict[str, Any], label: str) -> dict[str, Any]:
    """The JSON row of one run (before evaluation). ``pruned_fraction`` is what pruning removed,
    against the dense model; the old key ``sparsity`` (same value) is written for one version."""
    layers = res.info["layers"]
    per_layer = {l["name"]: l["pruned_fraction"] for l in layers}
    max_unit = max(l["max_unit_pruned_fraction"] for l in layers)
    row = {
        "key": spec.key, "label": label, "kind": spec.kind, "criterion": spec.criterion,
        "how": spec.how, "ref": spec.ref, "same_as": spec.same_as,
        "recipe": spec.recipe.to_dict() if spec.recipe else None,
        "update": (res.info["update"] or {}).get("method"),
        "target_sparsity": kw.get("sparsity"),
        "pruned_fraction": res.pruned_fraction,
        "zeros_fraction": res.zeros_fraction,
        "dense_zeros_fraction": res.info["summary"]["dense_zeros_fraction"],
        "max_unit_pruned_fraction": max_unit,
        "layers_with_units_over_95pct": len(res.info["layers_with_units_over_95pct"]),
        "prune_seconds": res.info["seconds"],
        "calibration_seconds": res.info["calibration"]["seconds"],
        "calibration_mode": res.info["calibration"]["mode"],
        "peak_memory": res.info["peak_memory"],
        "per_layer_pruned_fraction": per_layer,
        # the same numbers under their names of version 0.1 (read by older tools)
        "sparsity": res.pruned_fraction, "max_unit_sparsity": max_unit, "per_layer_sparsity": per_layer,
    }
    return row


def _run_section(t: str, specs: list[RunSpec], bench: _Bench, doc: dict[str, Any], out: Path, bar: Any,
                 scope: str, beta: float, other_for: str) -> None:
    """Every planned run of target set ``t``: prune, evaluate, record, restore; written after each."""
    section: dict[str, Any] = {"targets": t, "rows": []}
    doc["sections"].append(section)
    done: dict[str, dict[str, Any]] = {}
    counts: dict[str, dict[str, torch.Tensor]] = {}
    for spec in specs:
        bar.set_postfix_str(f"{t}: {spec.label}")
        kw = _prune_kwargs(spec, bench, t, scope, beta, done, counts)
        res = prune_lm(bench.model, bench.calib, **kw)
        counts[spec.key] = res.counts
        if spec.kind == "uniform":
            p = done[spec.ref]["pruned_fraction"]  # type: ignore[index]
            label = _uniform_label(spec, p, done[spec.ref]["label"], {r["label"] for r in section["rows"]})  # type: ignore[index]
            row = _row(spec, res, kw, label)
            row["uniform_at"] = p
        else:
            row = _row(spec, res, kw, spec.label)
        with torch.no_grad():
            bench.evaluate(row, other_for == "all" or (other_for == "emp" and spec.kind == "emp"))
        bench.restore()
        done[spec.key] = row
        section["rows"].append(row)
        bar.update(1)
        _write(doc, out)


def run_compare(
    model_spec: str,
    options: CompareOptions | None = None,
    *,
    out: str | os.PathLike = "emprune-compare",
    **fields: Any,
) -> dict[str, Any]:
    """Run the comparison and write ``OUT.md``, ``OUT.json`` and ``OUT.png`` (after every row,
    so an interrupted run leaves its rows so far). Returns the JSON document.

    Steps: check the options and plan every target set's runs (before loading anything); load
    the model and texts once; evaluate the dense model; run each section
    (:func:`_run_section`); mark the document done. The options are the fields of
    :class:`~emprune.jobs.options.CompareOptions`, given as ``options=`` or as keywords."""
    from tqdm.auto import tqdm

    o = build(CompareOptions, options, fields)
    targets, scope, beta, sparsity, other_for = tuple(o.targets), o.scope, o.beta, o.sparsity, o.other_for
    extra_recipes, uniform, matched, command, progress = o.extra_recipes, o.uniform, o.matched, o.command, o.progress
    if other_for not in ("all", "emp", "none"):
        raise ValueError(f"other_for must be all, emp or none; got {other_for!r}")
    for t in targets:
        if t not in ("mlp", "linear"):
            raise ValueError(f"targets must be mlp and/or linear; got {t!r}")
    specs = {t: plan(beta, sparsity, extra_recipes, uniform, matched, scope=scope) for t in targets}
    t_start = time.perf_counter()
    out = Path(out)
    bench, header = _load_bench(model_spec, o)
    doc: dict[str, Any] = {
        "command": command or "emprune " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "model": model_spec,
        "versions": versions(),
        "settings": {
            "targets": list(targets), "scope": scope, "beta": beta, "fixed_sparsity": sparsity,
            "extra_recipes": list(extra_recipes), "default_recipe": get_recipe("default", "prune").to_dict(),
            "paper_recipe": RECIPES["paper"].to_dict(),
        },
        **header,
        "sections": [],
        "status": "running",
    }
    bar = tqdm(total=1 + sum(len(v) for v in specs.values()), desc="compare", unit="run", disable=not progress)
    bar.set_postfix_str("dense")
    doc["dense"] = _dense_row(bench)
    bar.update(1)
    _write(doc, out)
    for t in targets:
        _run_section(t, specs[t], bench, doc, out, bar, scope, beta, other_for)
    bar.close()
    doc["status"] = "done"
    doc["wall_seconds"] = time.perf_counter() - t_start
    _write(doc, out)
    return doc


def _dense_row(bench: _Bench) -> dict[str, Any]:
    row: dict[str, Any] = {"key": "dense", "label": "dense", "kind": "dense", "criterion": None,
                           "how": "no pruning", "pruned_fraction": 0.0, "sparsity": 0.0, "same_as": []}
    with PeakMemory(bench.device) as mem:
        bench.evaluate(row, True)
    row.update(prune_seconds=0.0, peak_memory=None, eval_peak_memory=mem.result)
    return row


# ------------------------------------------------------------------------ output


def _write(doc: dict[str, Any], out: Path) -> None:
    """OUT.json, OUT.md and OUT.png, each written atomically (mode as for any new file)."""
    from ..models.io import atomic_path

    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(doc, indent=1, default=_default) + "\n")
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(doc))
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # matplotlib missing: the table and JSON are still written
        return
    with atomic_path(out.with_suffix(".png")) as tmp:
        plot(doc, tmp)


def _default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _pruned(row: dict[str, Any]) -> float:
    """A row's pruned fraction (``sparsity`` in documents of version 0.1)."""
    return row["pruned_fraction"] if "pruned_fraction" in row else row["sparsity"]


def _max_unit(row: dict[str, Any]) -> float:
    return row["max_unit_pruned_fraction"] if "max_unit_pruned_fraction" in row else row["max_unit_sparsity"]


def _ratio(x: float | None, ref: float | None) -> str:
    if x is None or ref is None:
        return "-"
    return f"x{x / ref:.2f}"


def _peak(row: dict[str, Any]) -> str:
    mem = row.get("peak_memory") or {}
    return fmt_bytes(mem.get("cuda_peak_bytes", mem.get("peak_rss_bytes")))


def _cell(s: str) -> str:
    """Text for a markdown table cell: ``|`` escaped (unless it is already)."""
    out, prev = [], ""
    for ch in s:
        out.append("\\|" if ch == "|" and prev != "\\" else ch)
        prev = ch
    return "".join(out)


NAMES_NOTE = (
    "Method names: *X 50%* = criterion X pruning 50% of every row; *EMP-X (recipe)* = EMP with "
    "criterion X choosing which entries, the recipe saying where the counts come from (paper: X's own "
    "scores; default: N_eff of \\|W\\|, then OBS chooses which and updates the rest); *X @EMP-run "
    "counts* (**matched**) = criterion X keeping exactly the per-row counts of that EMP run, so only "
    "which entries are kept differs; *X uniform @p%* (**uniform**) = criterion X pruning the EMP run's "
    "overall pruned fraction p in every row, so only the spread of the counts over the rows differs "
    "(*OBS uniform @p%*: the same with OBS choosing and updating, for an EMP run with the OBS update).")


def _section_table(sec: dict[str, Any], dense: dict[str, Any]) -> list[str]:
    """One target set's table, with lettered notes for runs that stand for several methods."""
    lines = [f"### targets: {sec['targets']}"
             + (" (paper protocol: the MLP projections of every block, e.g. gate/up/down on LLaMA)"
                if sec["targets"] == "mlp" else " (every Linear of every block: attention and MLP projections)"), "",
             "| method | how many | pruned | max unit | ppl WikiText | vs dense | ppl other | vs dense | "
             "prune s | peak RSS |", "|" + "---|" * 10,
             f"| dense | - | 0.00% | - | {dense.get('ppl', float('nan')):.3f} | x1.00 | "
             + (f"{dense['ppl_other']:.3f} | x1.00" if dense.get("ppl_other") else "- | -") + " | - | - |"]
    notes = []
    for r in sec["rows"]:
        label = r["label"]
        if r.get("same_as"):
            tag = "abcdefghijklmnopqrstuvwxyz"[len(notes) % 26]
            label += f" [{tag}]"
            notes.append(f"[{tag}] also stands for {'; '.join(r['same_as'])} (the same run).")
        warn = f" ({r['layers_with_units_over_95pct']} layers >95%)" if r["layers_with_units_over_95pct"] else ""
        lines.append(
            f"| {_cell(label)} | {_cell(r['how'])} | {100 * _pruned(r):.2f}% | {100 * _max_unit(r):.1f}%{warn} | "
            f"{r['ppl']:.3f} | {_ratio(r['ppl'], dense.get('ppl'))} | "
            + (f"{r['ppl_other']:.3f} | {_ratio(r['ppl_other'], dense.get('ppl_other'))}"
               if r.get("ppl_other") else "- | -")
            + f" | {r['prune_seconds']:.1f} | {_peak(r)} |")
    return lines + ([""] + [_cell(n) for n in notes] if notes else []) + [""]


def markdown(doc: dict[str, Any]) -> str:
    """The comparison as a markdown document (tables per target set, then the settings)."""
    dense = doc.get("dense") or {}
    other = doc.get("other_text")
    ev, ca = doc["evaluation"], doc["calibration"]
    lines = [f"Command: `{doc['command']}`", "",
             f"Model `{doc['model']}`; calibration {ca['n_samples']} x {ca['seqlen']} tokens of "
             f"`{Path(ca['text']).name}` (seed {ca['seed']}); perplexity on {ev['tokens']:,} tokens of "
             f"`{Path(ev['text']).name}` ({ev['windows']} windows of {ev['seqlen']})"
             + (f"; 'other' = {other['tokens']:,} tokens of `{other['text']}`" if other else "")
             + f"; scope {doc['settings']['scope']}; "
             + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if k != "platform")
             + (f"; status: {doc['status']}" if doc.get("status") != "done" else
                f"; total wall time {doc.get('wall_seconds', 0) / 60:.1f} min") + ".", ""]
    for sec in doc["sections"]:
        lines += _section_table(sec, dense)
    d, p = doc["settings"]["default_recipe"], doc["settings"]["paper_recipe"]
    lines += [
        NAMES_NOTE, "",
        "Columns: *pruned* = weights removed by pruning / targeted weights of the dense model (the "
        "pre-existing exact zeros of the weights are not counted as pruned; see `zeros_fraction` and "
        "`dense_zeros_fraction` in the JSON); *max unit* = the most-pruned unit (row); *prune s* = "
        "calibration + scoring + masking; *peak RSS* = process resident memory peak during the pruning "
        "run (sampled; it includes the loaded model and the dense copy kept for restoring; evaluation "
        "is not included).",
        "",
        _cell(f"Recipes: paper = {p['summary']}; default = `{d['name']}`: {d['summary']}."),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------ plot

_MARKER = {"fixed": "s", "emp": "*", "matched": "^", "uniform": "o"}
_KIND_TEXT = {"fixed": "fixed % of every row", "emp": "EMP run (numbered at the top)",
              "matched": "matched: an EMP run's per-row counts",
              "uniform": "uniform: an EMP run's pruned fraction in every row"}
_PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def _colors(secs: list[dict[str, Any]]) -> dict[str, str]:
    """One colour per criterion: magnitude blue, Wanda orange, others in order of appearance."""
    crits = ["magnitude", "wanda"] + [r["criterion"] for s in secs for r in s["rows"] if r.get("criterion")]
    return {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(dict.fromkeys(crits))}


def spread_labels(centres: Sequence[float], widths: Sequence[float], lo: float = 0.0,
                  hi: float = 1.0) -> list[float]:
    """Centres for labels of the given widths on a line, as close as possible to ``centres``
    (sorted ascending) but never overlapping: pushed right past their left neighbour, then
    pulled back left from ``hi``. Labels overlap only if their widths add up to more than
    ``hi - lo``."""
    pos: list[float] = []
    for c, w in zip(centres, widths):
        left = lo + w / 2 if not pos else pos[-1] + (widths[len(pos) - 1] + w) / 2
        pos.append(max(c, left))
    for i in range(len(pos) - 1, -1, -1):
        right = hi - widths[i] / 2 if i == len(pos) - 1 else pos[i + 1] - (widths[i + 1] + widths[i]) / 2
        pos[i] = min(pos[i], right)
    return pos


def _emp_numbers(secs: list[dict[str, Any]]) -> dict[str, int]:
    """EMP run label -> its number in the key (the same in every panel)."""
    labels = [r["label"] for s in secs for r in s["rows"] if r["kind"] == "emp"]
    return {lab: i + 1 for i, lab in enumerate(dict.fromkeys(labels))}


def _plot_section(ax: Any, sec: dict[str, Any], doc: dict[str, Any], numbers: dict[str, int],
                  color: dict[str, str]) -> list[str]:
    """One panel; returns the lines of the key for points drawn off scale."""
    dense = doc.get("dense") or {}
    if dense.get("ppl"):
        ax.axhline(dense["ppl"], color="gray", ls="--", lw=1)
    for crit in color:  # the equal-sparsity curve of each criterion
        pts = sorted((100 * _pruned(r), r["ppl"]) for r in sec["rows"]
                     if r["criterion"] == crit and r["kind"] in ("fixed", "uniform"))
        if len(pts) > 1:
            ax.plot(*zip(*pts), color=color[crit], lw=1, alpha=0.6)
    # collapsed runs (thousands of times dense) would squash the interesting range: they are
    # drawn on the top edge and their values listed in the key
    top = 30 * dense["ppl"] if dense.get("ppl") else math.inf
    off = []
    for r in sec["rows"]:
        x, y = 100 * _pruned(r), r["ppl"]
        if y > top:
            y = top
            off.append(f"  {sec['targets']}: {r['label']}: ppl {r['ppl']:.4g}")
        emp = r["kind"] == "emp"  # big stars below, the smaller baseline markers drawn over them
        ax.scatter(x, y, marker=_MARKER.get(r["kind"], "o"), s=190 if emp else 40, zorder=3 if emp else 4,
                   color=color.get(r["criterion"], "k"), edgecolor="k", lw=0.5, clip_on=False)
    xs = [100 * _pruned(r) for r in sec["rows"]] or [0.0]
    x0, x1 = min(xs) - 2, max(xs) + 2
    ax.set_xlim(x0, x1)
    _number_emp_runs(ax, sec, numbers, x0, x1)
    ax.set_yscale("log")
    ax.set_xlabel("pruned fraction of the targeted weights (% of the dense model)")
    ax.set_ylabel("perplexity (WikiText-2 test)")
    ax.set_title(f"{doc['model']}: targets {sec['targets']}", fontsize=10, pad=22)
    ax.grid(True, which="both", alpha=0.3)
    return off


def _number_emp_runs(ax: Any, sec: dict[str, Any], numbers: dict[str, int], x0: float, x1: float) -> None:
    """A dotted vertical line at each EMP run's pruned fraction (its matched and uniform runs sit
    on it) and the run's number above the panel, labels spread so that they never overlap."""
    at: dict[float, list[int]] = {}
    for r in sec["rows"]:
        if r["kind"] == "emp":
            at.setdefault(round(100 * _pruned(r), 6), []).append(numbers[r["label"]])
    xs = sorted(at)
    texts = [",".join(map(str, at[x])) for x in xs]
    widths = [0.02 + 0.018 * len(t) for t in texts]  # axes fraction: ~7 pt digits on a 5 inch panel
    pos = spread_labels([(x - x0) / (x1 - x0) for x in xs], widths)
    for x, t, p in zip(xs, texts, pos):
        ax.axvline(x, color="gray", ls=":", lw=0.8, zorder=1)
        ax.annotate(t, xy=(x, 1.0), xycoords=ax.get_xaxis_transform(), xytext=(p, 1.035),
                    textcoords="axes fraction", ha="center", va="bottom", fontsize=8, fontweight="bold",
                    arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "gray", "shrinkA": 0, "shrinkB": 0})


def _legend_handles(doc: dict[str, Any], color: dict[str, str], kinds: set[str]) -> list[Any]:
    from matplotlib.lines import Line2D

    dense = doc.get("dense") or {}
    hs = [Line2D([], [], color="gray", ls="--", label=f"dense (ppl {dense.get('ppl', float('nan')):.2f})")]
    hs += [Line2D([], [], marker=_MARKER[k], ls="", color="lightgray", markeredgecolor="k",
                  markersize=11 if k == "emp" else 7, label=_KIND_TEXT[k]) for k in _MARKER if k in kinds]
    hs += [Line2D([], [], color=c, marker="o", lw=1, label=f"{_display(crit)} (line: equal pruned fraction "
                  f"in every row)") for crit, c in color.items()]
    return hs


def plot(doc: dict[str, Any], path: Path) -> None:
    """Perplexity vs pruned fraction, one panel per target set, and a key panel: marker = kind
    of run, colour = criterion, EMP runs numbered above the panels (the only labels, spread so
    that they never overlap), the command line as caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = doc["sections"] or [{"targets": "-", "rows": []}]
    n = len(secs)
    fig = plt.figure(figsize=(5.2 * n + 4.8, 5.8))
    gs = fig.add_gridspec(1, n + 1, width_ratios=[5.2] * n + [4.8])
    color = _colors(secs)
    numbers = _emp_numbers(secs)
    off: list[str] = []
    for j, sec in enumerate(secs):
        off += _plot_section(fig.add_subplot(gs[0, j]), sec, doc, numbers, color)
    kax = fig.add_subplot(gs[0, n])
    kax.axis("off")
    kinds = {r["kind"] for s in secs for r in s["rows"]}
    leg = kax.legend(handles=_legend_handles(doc, color, kinds), loc="upper left", fontsize=7, frameon=False,
                     borderaxespad=0)
    same = {r["label"]: r.get("same_as") or [] for s in secs for r in s["rows"]}
    key = ["EMP runs:"] + [f"{i:>2}  {lab}" + "".join(f"\n      = {o}" for o in same.get(lab, []))
                           for lab, i in numbers.items()]
    if off:
        key += ["", "off scale (> 30x dense, drawn on the top edge):", *off]
    fig.canvas.draw()  # the legend's height, to start the key below it
    y = leg.get_window_extent().transformed(kax.transAxes.inverted()).y0 - 0.04
    kax.text(0.0, y, "\n".join(key), fontsize=7, va="top", family="monospace", transform=kax.transAxes)
    fig.text(0.01, 0.005, "\n".join(_wrap(doc["command"], 150)), fontsize=6.5, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def _wrap(s: str, n: int) -> list[str]:
    return [s[i:i + n] for i in range(0, len(s), n)] or [""]
