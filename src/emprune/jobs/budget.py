"""One budget across decoder blocks and widths: ``--units layers,mlp`` (and ``heads``).

How many parameters go is EMP's, kind by kind, as each kind alone would decide: ``k`` blocks
(the count of :func:`~.axes.shrink_layers`: the recipe's transform of the block scores) and the
width total of the measured-sensitivity allocation (a dry run of :func:`~.shrink.shrink` on the
whole model). Their sum is the budget ``R`` (or, with ``keep={"params": P}``, whatever brings the
decoder blocks down to ``P`` parameters: matched-size comparisons).

Where it goes is measured, not assumed. Removing blocks and removing neurons are not comparable
by their scores, but both are comparable by the calibration loss they cost per parameter: the
blocks are ordered by the greedy choice (the cheapest to skip first, measured again after each
removal, :func:`~emprune.decide.sensitivity.greedy_blocks`); for every ``m`` (no blocks, one, ...,
as many as ``R`` pays for, at most three quarters of them) the rest of the budget, ``R`` minus the
``m`` blocks' parameters, is spread over the widths of the blocks that stay by the sensitivity
allocation (loss per parameter under its quadratic model,
:class:`~emprune.decide.allocate.BySensitivity`), and the calibration loss of that whole
candidate is measured, masked (:func:`~emprune.decide.sensitivity.masked_loss`: the ``m`` blocks
skipped, the widths zeroed with the bias compensation). The candidate with the lowest loss is
applied exactly as it was measured: its widths removed, then its blocks.

Why measure every candidate rather than trust the models: the sum of per-group sensitivities
under-counts what many groups cost together, and the greedy block losses are already joint, so
an allocation by the predicted costs alone would favour widths. One masked forward pass over
the sensitivity tokens per candidate is cheap next to the sensitivity measurement itself.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import torch
from torch import Tensor, nn

from ..act.remove import remove_units
from ..act.report import ShrinkReport
from ..core import rule
from ..core.checks import one_of
from ..decide import allocate as A
from ..decide import recipes
from ..decide.scopes import decide
from ..decide.sensitivity import masked_loss
from ..structure.surgery import sync_config
from ..structure.units import find_groups
from .axes import (DEFAULT_LAYER_SCORE, combined, decide_one, greedy_order, report_removal, resolve_recipe,
                   score_blocks)
from .options import ShrinkOptions
from .shrink import (DEFAULT_CRITERION, unit_targets, finish_sizes, lm_batches, lm_forward, lm_loss, loss_batches,
                     measure_sizes, score_units, shrink)

#: the kinds that share the budget with the blocks
WIDTH_KINDS = ("mlp", "heads")
BUDGETS = ("shared", "per-kind")
#: the default for blocks with widths, chosen on held-out text (benchmarks/results/shrink_depth.md)
DEFAULT_BUDGET = "per-kind"
#: a candidate is measured if it removes at least the most any candidate removes (at most the
#: budget) less this share of the budget (the widths' grids and floors make sizes differ a little)
SIZE_TOLERANCE = 0.02


def check_budget(kinds: list[str], budget: str | None, *, uniform: bool = False, keep: Any = None,
                 recipe: Any = "default", has_data: bool = True) -> bool:
    """Whether ``kinds`` share one budget (:func:`shrink_joint`); ``ValueError`` (one line) for a
    ``budget`` that cannot hold. Shared needs blocks and a width kind, calibration tokens (the
    budget is spent by measured loss), the default recipe, per-layer widths (``uniform`` decides
    the blocks first, then one width) and no per-group ``keep``; ``keep={"params": P}`` is the
    shared budget's own size, so it selects ``shared`` when ``budget`` is not given."""
    if budget is not None:
        one_of("budget", budget, BUDGETS)
    params_keep = isinstance(keep, dict) and set(keep) == {"params"}
    how = budget or ("shared" if params_keep else DEFAULT_BUDGET)
    mixed = "layers" in kinds and any(k in WIDTH_KINDS for k in kinds)
    if how == "per-kind":
        if params_keep and mixed:
            raise ValueError("keep={'params': P} with blocks and widths is the shared budget: budget='shared'")
        return False
    problem = (None if mixed else "units with layers and mlp and/or heads")
    problem = problem or (None if has_data else "calibration tokens (the budget is spent by measured loss)")
    problem = problem or (None if not uniform else "per-layer widths (--uniform decides the blocks first)")
    problem = problem or (None if keep is None or params_keep else "no per-group keep (keep={'params': P} sets it)")
    problem = problem or (None if not isinstance(recipe, recipes.Recipe) and recipe == "default"
                          else "the default recipe")
    if problem is None:
        return True
    if budget == "shared":
        raise ValueError(f"budget 'shared' needs {problem}")
    return False


def _renumber(name: str, new: dict[int, int]) -> str:
    """A group name of the model before blocks were removed, in the numbering after."""
    return re.sub(r"(?<=\.layers\.)(\d+)(?=\.)", lambda m: str(new[int(m.group(1))]), name, count=1)


@dataclasses.dataclass
class _Widths:
    """The width kinds of the dense model: groups, scores and statistics (one calibration pass),
    the measured sensitivities and EMP's width total (a dry run of the default shrink)."""

    groups: list[Any]
    scores: list[Tensor]
    stats: Any
    sens: list[float]
    rec: recipes.Recipe
    dry: ShrinkReport

    @property
    def compensate(self) -> bool:
        return bool(self.dry.recipe["compensate"])

    @property
    def emp_removed(self) -> int:
        return sum(g.params_before - g.params_after for g in self.dry.groups)

    def plan(self, skip: list[int], removed: float) -> tuple[list[int], list[Any], int]:
        """The groups of the blocks that stay, their decisions for ``removed`` parameters (the
        sensitivity allocation) and the parameters those decisions remove."""
        sub = [j for j, g in enumerate(self.groups) if g.layer not in skip]
        groups, scores = [self.groups[j] for j in sub], [self.scores[j] for j in sub]
        alloc = A.BySensitivity([self.sens[j] for j in sub], self.rec.sens_fraction, removed=max(removed, 0.0))
        decs = list(decide(unit_targets(groups, scores, scores, self.rec.transform), "global", 1.0,
                           min_keep=self.rec.min_keep, allocate=alloc))
        gone = sum((g.n - int(d.mask.sum())) * g.params_per_unit() for g, d in zip(groups, decs))
        return sub, decs, int(gone)


def _widths(model: nn.Module, calib_tokens: Tensor, o: ShrinkOptions, kinds: list[str]) -> _Widths:
    from tqdm.auto import tqdm

    batches = lm_batches(calib_tokens, o.batch_size)
    if o.progress:
        batches = tqdm(batches, desc="calibrate", unit="batch")
    crit = o.criterion or DEFAULT_CRITERION
    scored = score_units(model, ",".join(kinds), crit, batches, forward=lm_forward, loss_fn=lm_loss)
    wo = o.replace(units=",".join(kinds), criterion=crit, keep=None, keep_params=None, uniform=False)
    dry = shrink(model, calibration=calib_tokens, scored=scored, options=wo.replace(dry_run=True))
    groups, scores, stats = scored
    return _Widths(groups, scores, stats, [float(g.sensitivity) for g in dry.groups],
                   recipes.get_recipe(dry.recipe["name"], "shrink"), dry)


def _spend(model: nn.Module, w: _Widths, order: list[int], budget: float, sizes: list[int],
           batches: list[Any]) -> tuple[list[dict[str, Any]], float, tuple[int, list[int], list[Any]]]:
    """Every candidate (``m`` blocks of ``order``, the rest on the widths), measured masked:
    the candidates' rows, the dense loss and the lowest-loss candidate's ``(m, sub, decisions)``."""
    plans = []
    for m in range(len(order) + 1):
        skip = order[:m]
        sub, decs, gone = w.plan(skip, budget - sum(sizes[i] for i in skip))
        row = {"blocks": m, "removed_blocks": list(skip), "width_params": gone,
               "params_removed": gone + sum(sizes[i] for i in skip)}
        plans.append((row, sub, decs))
    # the widths' floors may not hold the rest of the budget: a candidate that removes less than
    # the others can (by more than SIZE_TOLERANCE of the budget) would win by being smaller; it is
    # not measured
    reach = min(budget, max(r["params_removed"] for r, _, _ in plans))
    means = [w.stats.mean(g) for g in w.groups] if w.compensate else None
    base = masked_loss(model, batches, lm_loss)
    best: tuple[float, tuple[int, list[int], list[Any]]] | None = None
    for row, sub, decs in plans:
        if row["params_removed"] < reach - SIZE_TOLERANCE * budget:
            row["feasible"] = False
            continue
        loss = masked_loss(model, batches, lm_loss, skip=row["removed_blocks"], groups=[w.groups[j] for j in sub],
                           keeps=[d.mask for d in decs], means=None if means is None else [means[j] for j in sub])
        row["loss_increase"] = loss - base
        if best is None or loss < best[0]:
            best = (loss, (row["blocks"], sub, decs))
    assert best is not None  # the candidate that removes the most is always measured
    return [r for r, _, _ in plans], base, best[1]


@torch.no_grad()
def shrink_joint(model: nn.Module, calib_tokens: Tensor, o: ShrinkOptions) -> ShrinkReport:
    """Remove decoder blocks and MLP neurons / attention heads of ``model`` in place, one budget
    spent where the measured calibration loss is lowest (see the module's docstring); returns one
    report (the blocks' group first, then the width groups, named as after the removal) with the
    candidates in ``extra["joint"]``. ``o.units``: ``layers`` plus ``mlp`` and/or ``heads``."""
    t0 = time.perf_counter()
    rec_l = resolve_recipe(o, calib_tokens)
    how = o.layer_score or DEFAULT_LAYER_SCORE
    (lg,) = find_groups(model, "layers")
    n, sizes = lg.n, lg.block_params()
    before = measure_sizes(model, o, True)

    # EMP's two totals, each as its kind alone would decide
    raw = score_blocks(model, lg, how, calib_tokens, batch_size=o.batch_size, progress=o.progress)
    d_emp = decide_one(lg, raw.clamp_min(0), rec_l, o.replace(keep=None))
    k_emp = n - int(d_emp.mask.sum())
    w = _widths(model, calib_tokens, o, [k for k in o.units.split(",") if k != "layers"])
    if o.keep is not None:
        budget = sum(sizes) - float(o.keep["params"])
        if not 0 <= budget < sum(sizes):
            raise ValueError(f"keep params {o.keep['params']} must lie in (0, {sum(sizes)}] "
                             "(the parameters of the decoder blocks now)")
    else:
        budget = float(sum(sorted(sizes)[:k_emp]) + w.emp_removed)

    # the candidates: m blocks in the greedy order (25 % of them always stay), the rest on the widths
    floor = rec_l.min_keep if rec_l.min_keep is not None else 1
    min_blocks = max(1, math.ceil(floor * n) if isinstance(floor, float) else int(floor))
    m_max = max(0, min(n - min_blocks, int(budget // (sum(sizes) / n))))
    batches = loss_batches(calib_tokens, True)
    order = greedy_order(model, m_max, batches, o.progress)
    candidates, base, (m, sub, decs) = _spend(model, w, order, budget, sizes, batches)

    # apply what was measured: the blocks, then the widths of the blocks that stay (their groups
    # still hold their modules; their names are renumbered)
    mask = torch.ones(n, dtype=torch.bool)
    mask[order[:m]] = False
    d = dataclasses.replace(d_emp, mask=mask, mass=rule.retained_mass(raw.clamp_min(0), mask).reshape(1))
    lrep = report_removal(model, lg, d, o.replace(keep=None), rec_l, how, before, False, layer_score=how,
                          layer_select="greedy", joint=True)
    wrep = ShrinkReport(criterion=w.dry.criterion, scope="global", beta=w.dry.beta, keep=o.keep,
                        recipe={**w.dry.recipe, "joint": True}, multiple_of=w.dry.multiple_of)
    wrep.groups = remove_units([w.groups[j] for j in sub], decs, stats=w.stats, compensate=w.compensate,
                               dry_run=o.dry_run)
    new = {old: i for i, old in enumerate(lrep.groups[0].kept)}
    for gr, j in zip(wrep.groups, sub):
        gr.sensitivity = w.sens[j]
        if not o.dry_run:
            gr.name, gr.layer = _renumber(gr.name, new), new[gr.layer]
    if not o.dry_run:
        sync_config(model)
    finish_sizes(wrep, model, o, True, before)
    lrep.extra.update(layer_scores=[float(x) for x in raw], removed_layers=sorted(order[:m]),
                      removal_order=order[:m], emp_count=n - k_emp)
    wrep.extra["joint"] = {"budget_params": int(budget), "emp_blocks_removed": k_emp,
                           "emp_width_params": int(w.emp_removed), "chosen_blocks": m, "base_loss": base,
                           "candidates": candidates}
    lrep.seconds = 0.0
    wrep.seconds = time.perf_counter() - t0
    return combined([lrep, wrep])
