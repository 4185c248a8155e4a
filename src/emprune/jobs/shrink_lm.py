"""``emprune shrink`` on a causal LM (LLaMA family): calibrate, shrink, make the result a stock
config where it can be.

:func:`shrink_lm`: one dense calibration pass over the calibration tokens (activation and
fluctuation scores, FLAP bias compensation; a backward pass for Taylor), then :func:`~.shrink.shrink`
(EMP decides, MLP neurons and/or attention heads are removed). ``uniform=True`` rounds the per-layer
widths to one width per model (intermediate size a multiple of ``lcm(64, multiple_of)``, which is
``max(64, multiple_of)`` for powers of two, heads a multiple of the KV-group size) so that the result
is a stock config. :func:`summary`: the ``emprune.json`` of the result.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from .. import criteria as C
from ..act.report import ShrinkReport
from ..core.checks import one_of
from ..decide import recipes
from ..models.checkpoint import SHRUNK_KIND, versions
from ..models.stream import DiskModel
from ..structure.layouts import decoder_layers
from ..structure.units import find_groups
from .options import ShrinkOptions, build, lm_units
from .axes import combined, shrink_hidden, shrink_layers
from .budget import check_budget, shrink_joint
from .shrink_disk import check_streamable, score_from_disk
from .shrink import DEFAULT_CRITERION, check_multiple, lm_batches, lm_forward, lm_loss, score_units, shrink

#: the uniform layout's intermediate size is a multiple of this (and of ``multiple_of``)
INTERMEDIATE_MULTIPLE = 64


def _uniform_widths(report: ShrinkReport, groups: list, multiple: int = INTERMEDIATE_MULTIPLE) -> dict[str, int]:
    """One width per kind from a (dry-run) decision: the mean kept count, rounded to a
    multiple of ``multiple`` (MLP) or of the KV-group count (heads, query mode)."""
    out: dict[str, int] = {}
    by_kind: dict[str, list] = {}
    for g, gr in zip(groups, report.groups):
        by_kind.setdefault(g.kind, []).append((g, gr))
    for kind, items in by_kind.items():
        mean = sum(gr.units_after for _, gr in items) / len(items)
        n = items[0][0].n
        if kind == "mlp":
            w = int(round(mean / multiple)) * multiple
            w = min(n, max(multiple if n >= multiple else 1, w))
        else:
            g0 = items[0][0]
            w = g0.n_kv * min(g0.group_size, max(1, int(round(mean / g0.n_kv))))
        for g, _ in items:
            out[g.name] = w
    return out

@torch.no_grad()
def shrink_lm(model: nn.Module, calib_tokens: Tensor | None, options: ShrinkOptions | None = None, *,
              progress: bool = True, blocks: DiskModel | None = None, **fields: Any) -> tuple[ShrinkReport, dict[str, Any]]:
    """Shrink ``model`` in place; returns the report and the JSON summary for ``emprune.json``.

    ``calib_tokens`` ``[n, seqlen]`` feed activation / fluctuation / Taylor scores and the bias
    compensation (one dense pass, in batches of ``batch_size``); the default recipe
    (``sensitivity``) also measures the loss on their first 1,024 tokens once per group. Options
    as in :func:`~.shrink.shrink` (``units`` default ``mlp``; ``layers`` removes whole blocks
    first, :func:`~.axes.shrink_layers`, ``hidden`` residual channels next,
    :func:`~.axes.shrink_hidden`, then the other kinds are shrunk on what stays; with
    ``budget="shared"`` (or ``keep={"params": P}``) blocks and widths share one budget instead,
    :func:`~.budget.shrink_joint`, after the channels;
    ``uniform``: one width per model; ``multiple_of``: the grid of the MLP widths, default 32);
    ``progress``: bars over the calibration and the sensitivity measurement.

    ``blocks``: ``model`` is streamed from disk (:class:`~emprune.models.stream.DiskModel`, whose
    ``on_done`` writes each finished block): scored, measured and shrunk block by block
    (:mod:`~emprune.jobs.shrink_disk`), the same result as in memory; MLP neurons and heads only
    (:func:`~emprune.jobs.shrink_disk.check_streamable`)."""
    o = build(ShrinkOptions, options, {"units": "mlp", **fields} if options is None else fields)
    try:
        units = lm_units(o.units)
    except ValueError as e:
        raise ValueError(f"units: {e}") from None
    rec = recipes.get_recipe(o.recipe, "shrink")
    check_multiple(o.multiple_of)  # before the calibration pass
    uniform = fields.get("uniform", options.uniform if options is not None else False)
    kinds = units.split(",")
    if blocks is not None:
        check_streamable(kinds, budget=o.budget, criterion=o.criterion)
    joint = check_budget(kinds, o.budget, uniform=uniform, keep=o.keep, recipe=o.recipe,
                         has_data=calib_tokens is not None) and o.keep_params is None
    whole: list[ShrinkReport] = []  # depth first, then the residual channels: widths are decided on what stays
    for kind, job in ((("hidden", shrink_hidden),) if joint else (("layers", shrink_layers), ("hidden", shrink_hidden))):
        if kind in kinds:
            whole.append(job(model, calib_tokens, o.replace(units=kind, progress=progress, keep=None if joint else o.keep)))
            kinds.remove(kind)
    if joint:  # blocks and widths share one budget, spent where the measured loss is lowest
        report = combined([*whole, shrink_joint(model, calib_tokens, o.replace(units=",".join(kinds),
                                                                                progress=progress))])
        return report, summary(model, report, calib_tokens, uniform)
    if not kinds:
        report = combined(whole)
        return report, summary(model, report, calib_tokens, uniform)
    units = ",".join(kinds)
    crit = o.criterion or (DEFAULT_CRITERION if calib_tokens is not None else "magnitude")
    t0 = time.perf_counter()
    scored = _score(model, units, crit, calib_tokens, o.replace(progress=progress), blocks)
    t_cal = time.perf_counter() - t0
    o = o.replace(units=units, criterion=crit, progress=progress, uniform=False)
    if uniform:
        comp = ((rec.compensate and o.keep is None and calib_tokens is not None) if o.compensate is None
                else o.compensate)
        # the sensitivities (default recipe) are measured with the compensation the final model gets;
        # the dry run decides at any width (multiple_of=1): its mean is rounded once, to the uniform grid
        dry = shrink(model, calibration=calib_tokens, scored=scored,
                     options=o.replace(compensate=comp, dry_run=True, multiple_of=1), blocks=blocks)
        grid = math.lcm(INTERMEDIATE_MULTIPLE, o.multiple_of)
        widths = _uniform_widths(dry, scored[0], grid)
        report = shrink(model, calibration=calib_tokens, scored=scored, options=o.replace(compensate=comp, keep=widths),
                        blocks=blocks)
        report.extra["uniform_from"] = {"recipe": dry.recipe, "widths_before_rounding": dry.widths(),
                                        "intermediate_multiple": grid}
    else:
        report = shrink(model, calibration=calib_tokens, scored=scored, options=o, blocks=blocks)
    if whole:
        report = combined([*whole, report])
    report.extra["calibration_seconds"] = t_cal
    if uniform:
        added = _make_stock(model)  # zero biases where the stock bias flags create them
        if blocks is not None and added:  # the blocks are written already: the biases go to a shard of their own
            blocks.add({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in added.items()})
        report.params_after = sum(p.numel() for p in model.parameters())
    info = summary(model, report, calib_tokens, uniform)
    return report, info


def _score(model: nn.Module, units: str, criterion: str, calib_tokens: Tensor | None, o: ShrinkOptions,
           blocks: DiskModel | None) -> tuple:
    """The groups, their scores and the calibration statistics (one dense pass over the
    calibration tokens in batches of ``o.batch_size``; block by block from disk with ``blocks``)."""
    from tqdm.auto import tqdm

    if blocks is not None:
        one_of("criterion", criterion, C.names(level="unit"))
        groups = find_groups(model, units)
        return (groups, *score_from_disk(blocks, groups, criterion, calib_tokens, o.batch_size, o.progress))
    batches = None if calib_tokens is None else lm_batches(calib_tokens, o.batch_size)
    if batches is not None and o.progress:
        batches = tqdm(batches, desc="calibrate", unit="batch")
    return score_units(model, units, criterion, batches, forward=lm_forward, loss_fn=lm_loss)


def summary(model: nn.Module, report: ShrinkReport, calib_tokens: Tensor | None, uniform: bool) -> dict[str, Any]:
    """The JSON written to ``emprune.json`` (``kind: shrunk``)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    shr = dict(getattr(cfg, "emprune_shrunk", {}))
    d = report.to_dict()
    return {
        "kind": SHRUNK_KIND,
        "versions": versions(),
        "layout": "uniform" if shr.get("uniform") else "per-layer",
        "loads_with": ("AutoModelForCausalLM.from_pretrained(DIR) or emprune.from_pretrained(DIR)"
                       if shr.get("uniform") else "emprune.from_pretrained(DIR)"),
        "uniform_requested": uniform,
        "widths": shr,
        "summary": {k: d[k] for k in ("params_before", "params_after", "embedding_params", "removed_fraction",
                                      "removed_fraction_non_embedding", "macs_before", "macs_after",
                                      "macs_note", "bound_ok", "global_neff", "seconds")},
        "criterion": report.criterion, "scope": report.scope, "beta": report.beta, "keep": report.keep,
        "multiple_of": report.multiple_of, "recipe": report.recipe,
        "calibration": {"n_samples": int(calib_tokens.shape[0]) if calib_tokens is not None else 0,
                        "seqlen": int(calib_tokens.shape[1]) if calib_tokens is not None else 0,
                        "seconds": report.extra.get("calibration_seconds", 0.0)},
        "groups": [{k: v for k, v in g.items() if k != "kept"} for g in d["groups"]],
        "kept_units": {g["name"]: g["kept"] for g in d["groups"]},
        "extra": {k: v for k, v in report.extra.items() if k != "calibration_seconds"},
    }

@torch.no_grad()
def _make_stock(model: nn.Module) -> dict[str, Tensor]:
    """For a uniform layout with compensation biases: switch on the config's bias flags and give
    every projection those flags create a (zero) bias, so plain transformers loads the folder.
    Returns the biases created, by their names in the model."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    shr = getattr(cfg, "emprune_shrunk", {})
    added: dict[str, Tensor] = {}
    if not shr.get("uniform"):
        return added
    names = {m: n for n, m in model.named_modules()}
    layers = decoder_layers(model)
    plans = []
    if shr.get("mlp_bias"):
        plans.append(("mlp_bias", [("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]))
    if shr.get("o_bias"):
        plans.append(("attention_bias", [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]))
    for flag, mods in plans:
        if not hasattr(cfg, flag):  # e.g. Qwen2 / Gemma3: no such flag; the folder stays per-layer
            shr["uniform"] = False
            continue
        setattr(cfg, flag, True)
        for block in layers:
            for parent, name in mods:
                lin = getattr(getattr(block, parent), name)
                if lin.bias is None:
                    w = lin.weight
                    lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                            requires_grad=w.requires_grad)
                    added[f"{names[lin]}.bias"] = lin.bias
    return added
