"""The whole-model axes of ``emprune shrink``: decoder blocks (``--units layers``, depth) and the
residual channels (``--units hidden``), each one group decided by EMP.

Hidden channels (:func:`shrink_hidden`): one score per channel of the residual stream
(``hidden_score``: by default the geometric mean of Minitron's activation score and the weight
norm; see :mod:`emprune.criteria.channel_scores`), EMP's count of the raw scores (the default
recipe's floor, no transform: these scores do not collapse; another ``--recipe`` brings its own
transform) on a grid (the kept ``hidden_size`` a multiple of the head count, which transformers'
configs require, and of ``multiple_of``), the lowest-scored channels removed everywhere
(:func:`emprune.structure.hidden.keep_channels`).

Depth (:func:`shrink_layers`):

One group, one unit per block. *How many* blocks stay is EMP's count of the block scores
(``layer_score``: ShortGPT's block influence, the measured loss increase of the block alone
skipped, or the weight norm; :mod:`emprune.criteria.block_scores`) through the one funnel
(:func:`~emprune.decide.scopes.decide`, with the recipe's ``transform`` and ``min_keep``: the
default recipe counts on ``sqrt(score)`` with a 25 % floor; ``--recipe paper`` is the exact
``floor(beta * N_eff)`` of the raw scores). *Which* blocks go (``layer_select``): ``greedy`` (the
default with calibration tokens) removes them one at a time, each time the block whose skipping
raises the calibration loss least, measured again after every removal among the blocks of lowest
influence in the model as it now is (:func:`~emprune.decide.sensitivity.greedy_blocks`);
``score`` removes the lowest-scored blocks at once (with ``influence``: ShortGPT's choice).
``keep=`` (a fraction or a count of blocks) replaces EMP's count, for matched-size baselines.
Then the blocks are removed (:func:`emprune.structure.depth.keep_blocks`) and the config synced.

Why these defaults (``benchmarks/results/shrink_depth.md``): block scores are heavy-tailed (the
first block, and the last ones, dominate): on SmolLM2-135M the paper's count keeps 5-6 of 30
blocks, a collapse; the square root keeps 21 (influence) or 18 (loss). Blocks interact: the
blocks that are each cheapest to skip are costly together (three neighbouring early blocks), so
one-shot rankings lose to the greedy, re-measured choice as more blocks go.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..act.remove import remove_units
from ..act.report import ShrinkReport
from ..core import rule
from ..core.checks import one_of
from ..criteria.block_scores import LAYER_SCORES, block_influence
from ..criteria.channel_scores import HIDDEN_SCORES, channel_scores
from ..decide import recipes
from ..decide.allocate import FixedSize
from ..decide.scopes import Decision, Target, decide
from ..decide.sensitivity import block_sensitivity, greedy_blocks
from ..structure.depth import skipped, text_config
from ..structure.layouts import decoder_layers
from ..structure.surgery import sync_config
from ..structure.units import LayerGroup, find_groups
from .options import ShrinkOptions, build
from .shrink import check_multiple, finish_sizes, lm_batches, lm_forward, lm_loss, loss_batches, measure_sizes

#: the block score whose EMP count is the default (chosen by measurement, benchmarks/results/shrink_depth.md)
DEFAULT_LAYER_SCORE = "influence"
#: the channel score of the default for ``--units hidden`` (chosen by measurement,
#: benchmarks/results/shrink_depth.md; see :mod:`emprune.criteria.channel_scores`)
DEFAULT_HIDDEN_SCORE = "activation-magnitude"
#: how the default chooses which blocks go (with calibration tokens)
DEFAULT_LAYER_SELECT = "greedy"
LAYER_SELECTS = ("greedy", "score")
#: the greedy choice measures the loss for this many candidate blocks per round (the lowest
#: influence), or a quarter of the blocks if more
GREEDY_CANDIDATES = 8


def score_blocks(model: nn.Module, group: LayerGroup, how: str, calib_tokens: Tensor | None, *,
                 batch_size: int = 8, progress: bool = False) -> Tensor:
    """One float64 score per block by ``how`` (:data:`LAYER_SCORES`); higher = more important.
    ``loss`` is measured on the first calibration tokens (``SENSITIVITY_TOKENS``), ``influence``
    on all of them."""
    one_of("layer_score", how, LAYER_SCORES)
    if how == "magnitude":
        return group.weight_norms()
    if calib_tokens is None:
        raise ValueError(f"layer score {how!r} needs calibration tokens")
    if how == "influence":
        return block_influence(model, lm_batches(calib_tokens, batch_size), lm_forward)
    sens = block_sensitivity(model, loss_batches(calib_tokens, True), lm_loss, progress=progress)
    return torch.tensor(sens, dtype=torch.float64)


def lowest_influence(model: nn.Module, batches: list[Any], m: int) -> Callable[[list[int]], list[int]]:
    """``candidates(removed)`` for :func:`greedy_blocks`: the ``m`` blocks of lowest influence
    in the model with ``removed`` skipped (one forward pass over ``batches``)."""
    def pick(removed: list[int]) -> list[int]:
        with skipped(model, removed):
            bi = block_influence(model, batches, lm_forward)
        return [int(i) for i in bi.argsort(stable=True) if int(i) not in removed][:m]
    return pick


def greedy_order(model: nn.Module, k: int, batches: list[Any], progress: bool) -> list[int]:
    """``k`` blocks in the greedy order (:func:`greedy_blocks` on ``batches``, each round among the
    :data:`GREEDY_CANDIDATES` blocks of lowest influence, or a quarter of the blocks if more)."""
    n = len(decoder_layers(model))
    m = max(GREEDY_CANDIDATES, n // 4)
    order, _ = greedy_blocks(model, k, batches, lm_loss, progress=progress,
                             candidates=None if m >= n else lowest_influence(model, batches, m))
    return order


def _greedy_mask(model: nn.Module, n_keep: int, calib_tokens: Tensor, progress: bool) -> tuple[Tensor, list[int]]:
    """The keep mask of the greedy choice and the blocks in the order chosen."""
    n = len(decoder_layers(model))
    order = greedy_order(model, n - n_keep, loss_batches(calib_tokens, True), progress)
    keep = torch.ones(n, dtype=torch.bool)
    keep[order] = False
    return keep, order


def resolve_recipe(o: ShrinkOptions, calib_tokens: Tensor | None) -> recipes.Recipe:
    rec = recipes.get_recipe(o.recipe, "shrink")
    return recipes.get_recipe("default", "shrink", lm=calib_tokens is not None) if o.recipe == "default" else rec


def decide_one(group: Any, scores: Tensor, rec: recipes.Recipe, o: ShrinkOptions) -> Decision:
    """EMP's decision for one whole-model group: the count from the recipe's ``transform`` of
    ``scores`` with its ``min_keep`` (or ``keep=``), the highest scores kept (on the group's grid)."""
    count = None if rec.transform == "none" else (lambda: recipes.count_scores(scores, rec.transform))
    target = Target(group.name, torch.Size([group.n]), lambda: scores, count, group=group)
    allocator = FixedSize(o.keep) if o.keep is not None else None
    (d,) = decide([target], "layer" if allocator is None else "global", 1.0 if o.beta is None else o.beta,
                  min_keep=rec.min_keep, allocate=allocator)
    return d


def report_removal(model: nn.Module, group: Any, d: Decision, o: ShrinkOptions, rec: recipes.Recipe, how: str,
            before: tuple[int, int, int | None], exact: bool, **recipe_extra: Any) -> ShrinkReport:
    """Remove what ``d`` did not keep (unless a dry run), sync the config, report."""
    report = ShrinkReport(criterion=how, scope="layer", beta=None if o.keep is not None else (o.beta or 1.0),
                          recipe={**rec.to_dict(), "compensate": False, **recipe_extra}, keep=o.keep,
                          multiple_of=getattr(group, "multiple", None) if group.kind == "hidden" else None)
    report.groups = remove_units([group], [d], exact_bound=exact and o.keep is None and rec.transform == "none"
                                 and rec.min_keep is None, dry_run=o.dry_run)
    if not o.dry_run:
        sync_config(model)
    finish_sizes(report, model, o, True, before)
    return report


@torch.no_grad()
def shrink_layers(model: nn.Module, calib_tokens: Tensor | None, options: ShrinkOptions | None = None,
                  **fields: Any) -> ShrinkReport:
    """Remove whole decoder blocks of ``model`` in place (EMP's count of the block scores, or
    ``keep=``; the blocks chosen by ``layer_select``); returns the report (one group, kind
    ``layers``). Options: ``layer_score``, ``layer_select``, ``recipe`` (its ``transform`` and
    ``min_keep`` shape the count), ``beta``, ``keep``, ``dry_run``, ``progress``, ``batch_size``."""
    o = build(ShrinkOptions, options, fields)
    t0 = time.perf_counter()
    rec = resolve_recipe(o, calib_tokens)
    how = o.layer_score or (DEFAULT_LAYER_SCORE if calib_tokens is not None else "magnitude")
    select = o.layer_select or (DEFAULT_LAYER_SELECT if calib_tokens is not None and rec.name != "paper" else "score")
    one_of("layer_select", select, LAYER_SELECTS)
    if select == "greedy" and calib_tokens is None:
        raise ValueError("layer_select 'greedy' measures the loss: it needs calibration tokens")
    (group,) = find_groups(model, "layers")
    before = measure_sizes(model, o, True)
    raw = score_blocks(model, group, how, calib_tokens, batch_size=o.batch_size, progress=o.progress)
    scores = raw.clamp_min(0)  # a block whose skipping lowers the loss scores 0, not below
    d = decide_one(group, scores, rec, o)
    order = None
    if select == "greedy":
        mask, order = _greedy_mask(model, int(d.mask.sum()), calib_tokens, o.progress)
        d = dataclasses.replace(d, mask=mask, mass=rule.retained_mass(scores, mask).reshape(1))
    report = report_removal(model, group, d, o, rec, how, before, select == "score", layer_score=how, layer_select=select)
    report.extra["layer_scores"] = [float(x) for x in raw]
    report.extra["removed_layers"] = [i for i in range(len(raw)) if i not in set(report.groups[0].kept)]
    if order is not None:
        report.extra["removal_order"] = order
    report.seconds = time.perf_counter() - t0
    return report


def combined(reports: list[ShrinkReport]) -> ShrinkReport:
    """One report for several steps (blocks, channels, widths, in that order): the last step's
    settings, every step's groups, sizes before from the first; each whole-model step's decision
    in ``extra["depth"]`` / ``extra["hidden"]``."""
    last = reports[-1]
    if len(reports) == 1:
        return last
    first = reports[0]
    last.groups = [g for r in reports for g in r.groups]
    last.params_before, last.embedding_params, last.macs_before = (
        first.params_before, first.embedding_params, first.macs_before)
    for r in reports[:-1]:
        last.seconds += r.seconds
        key = "depth" if r.groups[0].kind == "layers" else "hidden"
        last.extra[key] = {"score": r.criterion, "recipe": r.recipe["name"], "beta": r.beta, "keep": r.keep,
                           **r.extra}
    return last


def hidden_multiple(model: nn.Module, multiple_of: int) -> int:
    """The grid of the kept ``hidden_size``: a multiple of the attention head count
    (transformers' configs require it) and of ``multiple_of`` (a GGUF type's rows)."""
    cfg = text_config(model)
    return math.lcm(int(cfg.num_attention_heads), int(multiple_of))


@torch.no_grad()
def shrink_hidden(model: nn.Module, calib_tokens: Tensor | None, options: ShrinkOptions | None = None,
                  **fields: Any) -> ShrinkReport:
    """Remove residual channels of ``model`` in place (EMP's count of the channel scores on the
    grid of :func:`hidden_multiple`, or ``keep=``; the lowest-scored channels go); returns the
    report (one group, kind ``hidden``). Options: ``hidden_score``, ``recipe``, ``beta``,
    ``keep``, ``multiple_of``, ``dry_run``, ``batch_size``."""
    o = build(ShrinkOptions, options, fields)
    t0 = time.perf_counter()
    rec = resolve_recipe(o, calib_tokens)
    if o.recipe == "default":  # the default score is not heavy-tailed: EMP's raw count, no transform
        rec = dataclasses.replace(rec, transform="none")
    how = o.hidden_score or (DEFAULT_HIDDEN_SCORE if calib_tokens is not None else "magnitude")
    one_of("hidden_score", how, HIDDEN_SCORES)
    (group,) = find_groups(model, "hidden")
    group.multiple = hidden_multiple(model, check_multiple(o.multiple_of))
    before = measure_sizes(model, o, True)
    batches = None if calib_tokens is None else lm_batches(calib_tokens, o.batch_size)
    scores = channel_scores(model, how, batches, lm_forward)
    d = decide_one(group, scores, rec, o)
    report = report_removal(model, group, d, o, rec, how, before, group.multiple == 1, hidden_score=how)
    report.extra["hidden_multiple"] = group.multiple
    report.seconds = time.perf_counter() - t0
    return report
