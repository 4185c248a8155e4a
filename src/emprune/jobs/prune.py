"""``emprune.prune``: EMP masks on any model (Linear and Conv weights), after one calibration pass.

The steps: resolve the targets (:func:`~emprune.structure.targets.select_targets`), build the
criteria from the registry and gather their statistics (:meth:`Criterion.prepare`), decide
through the one funnel (:func:`~emprune.decide.scopes.decide`), apply each mask
(:func:`~emprune.act.masks.apply_mask`) and record it (:class:`~emprune.act.report.PruneReport`).
Decoder LMs have their own, layer-wise job: :mod:`emprune.jobs.prune_lm`.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Iterable

from torch import Tensor, nn

from .. import criteria as C
from ..act.masks import already_masked, apply_mask
from ..act.report import PruneReport, count_zeros
from ..criteria.base import model_inputs
from ..decide.scopes import Target, check_options, decide
from ..structure.targets import select_targets
from .options import MaskOptions, build


def prune(model: nn.Module, criterion: C.CriterionLike = "magnitude", scope: str = "row", beta: float = 1.0, *,
          calibration: Iterable | None = None, options: MaskOptions | None = None, **fields: Any) -> PruneReport:
    """Prune ``model`` in place with EMP and return a :class:`PruneReport`.

    ``criterion`` scores the entries to keep (``"magnitude"``, ``"wanda"``, ``"taylor"``,
    ``"gradient"``, ``"random"``, a :class:`~emprune.criteria.Criterion` or a callable
    ``(name, module) -> scores``); ``count_by`` (default: the same) supplies the scores whose
    N_eff sets how many each unit keeps.  ``scope`` is ``"row"``, ``"layer"`` or ``"global"``.
    Each unit keeps ``floor(beta * N_eff)``, or ``N - floor(sparsity * N)`` when ``sparsity``
    is given (fixed-sparsity baselines), raised to ``min_keep`` (a fraction or a count).
    ``calibration`` is an iterable of batches for data-driven criteria; a batch reaches the
    model as ``model(x)`` (tensor), ``model(*x)`` (tuple/list) or ``model(**x)`` (mapping),
    after ``inputs(batch)`` when ``inputs`` is given (e.g. ``inputs=lambda b: b[0]`` for the
    ``(x, y)`` batches of a ``DataLoader``).  ``loss_fn(model, batch) -> loss`` (it gets the
    whole batch) is needed by Taylor/gradient unless the model returns ``.loss``; a
    criterion instance prepared beforehand is used as it is when no calibration is given.
    Targets that carry a reversible mask already (an earlier ``prune`` without
    :func:`restore` or :func:`make_permanent`) get the new mask stacked on the old one: a
    warning says so and ``report.extra["already_masked"]`` lists them.
    Masks stay reversible (:func:`restore`) until :func:`make_permanent`, or are folded in
    at once with ``permanent=True`` (no extra memory).  ``progress`` shows a progress bar
    over the targets (with ``tqdm`` installed). The other options (``sparsity``, ``inputs``,
    ``targets``, ``count_by``, ``min_keep``, ``loss_fn``, ``negative``, ``seed``, ``permanent``,
    ``progress``) are the fields of :class:`~emprune.jobs.options.MaskOptions`, given as
    ``options=`` or as keywords."""
    o = build(MaskOptions, options, fields)
    _check(o, scope, beta, calibration)
    start = time.perf_counter()
    mods = select_targets(model, o.targets)
    masked = already_masked(model, mods)
    if masked:
        warnings.warn(
            f"{len(masked)} target(s) already carry a reversible mask (e.g. {masked[0]}): the new mask "
            "stacks on it (weights pruned before stay zero and score as zero). Call "
            "emprune.restore(model) first to prune the dense weights again, or "
            "emprune.make_permanent(model) to fold the old masks in.", UserWarning, stacklevel=2)
    crit = C.get(criterion, loss_fn=o.loss_fn, seed=o.seed)
    cnt = None if o.count_by is None else C.get(o.count_by, loss_fn=o.loss_fn, seed=o.seed)
    if cnt is not None and cnt.same_as(crit):
        cnt = None  # the same scores: score once
    ours = _prepare(model, mods, (crit, cnt), calibration, o.inputs)
    tlist = [Target(n, m.weight.shape, _bind(crit, n, m), None if cnt is None else _bind(cnt, n, m))
             for n, m in mods.items()]
    report = PruneReport.for_run(crit.name, (cnt or crit).name, scope, beta=beta, sparsity=o.sparsity,
                                 min_keep=o.min_keep)
    if masked:
        report.extra["already_masked"] = masked
    try:
        decisions = decide(tlist, scope, beta, sparsity=o.sparsity, min_keep=o.min_keep,  # type: ignore[arg-type]
                           negative=o.negative)
        for d in _progress(decisions, len(tlist), o.progress, f"emprune {scope}"):
            mod = mods[d.name]
            apply_mask(mod, d.mask, permanent=o.permanent)
            report.add(d, count_zeros(mod.weight))
    finally:
        for c in ours:
            c.release()
    report.seconds = time.perf_counter() - start
    return report


def _check(o: MaskOptions, scope: str, beta: float, calibration: Iterable | None) -> None:
    check_options(scope, beta, o.sparsity, o.min_keep)
    if o.sparsity is not None and o.count_by is not None:
        raise ValueError("count_by sets EMP's counts; it has no meaning with a fixed sparsity")
    if o.inputs is not None and not callable(o.inputs):
        raise ValueError(f"inputs must be a function batch -> model inputs, got {type(o.inputs).__name__}")
    if o.inputs is not None and calibration is None:
        raise ValueError("inputs= picks the model inputs out of calibration batches: pass calibration= too")


def _prepare(model: nn.Module, mods: dict[str, nn.Module], crits: tuple[C.Criterion | None, ...],
             calibration: Iterable | None, inputs: Callable | None) -> list[C.Criterion]:
    """Gather the statistics of the criteria that need data (a criterion the caller prepared
    already is used as it is); returns those gathered here, to be released afterwards."""
    calib = list(calibration) if calibration is not None else None  # may be iterated twice
    ours = [c for c in crits if c is not None and (calib is not None or not c.prepared)]
    with model_inputs(inputs):
        for c in ours:
            c.prepare(model, mods, calib)
    return ours


def _progress(it: Iterable, total: int, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return it
    return tqdm(it, total=total, desc=desc, unit="layer")


def _bind(crit: C.Criterion, name: str, mod: nn.Module) -> Callable[[], Tensor]:
    return lambda: crit(name, mod)
