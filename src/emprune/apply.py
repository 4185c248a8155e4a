"""Model-level pruning: choose targets, score, decide (EMP), and apply masks.

Masks are applied with ``torch.nn.utils.prune``'s reparametrisation (``weight_orig`` +
``weight_mask``), so a pruned model keeps training with its optimizer and round-trips its
``state_dict``; :func:`make_permanent` folds the masks in, :func:`restore` undoes them.
Data flows one way: model -> scores -> groups -> counts -> masks -> model.
"""
from __future__ import annotations

import re
import time
import warnings
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as tprune

from . import criteria as C
from .criteria.base import model_inputs
from .report import PruneReport, count_zeros
from .scopes import Target, check_options, decide

TargetSpec = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]
PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def select_targets(model: nn.Module, targets: TargetSpec = None) -> dict[str, nn.Module]:
    """Modules whose ``weight`` is pruned.

    ``None``: every Linear and Conv layer (biases, norms and embeddings are untouched).
    A string is a regular expression matched against module names (``re.search``), a
    sequence lists names exactly, a callable decides per ``(name, module)``."""
    out: dict[str, nn.Module] = {}
    named = dict(model.named_modules())
    if targets is None:
        out = {n: m for n, m in named.items() if isinstance(m, PRUNABLE)}
    elif isinstance(targets, str):
        pat = re.compile(targets)
        out = {n: m for n, m in named.items() if n and pat.search(n) and _has_weight(m)}
    elif callable(targets):
        out = {n: m for n, m in named.items() if n and targets(n, m)}
    else:
        missing = [n for n in targets if n not in named]
        if missing:
            raise ValueError(f"targets not found in the model: {missing[:5]}")
        out = {n: named[n] for n in targets}
    for n, m in out.items():
        if not _has_weight(m):
            raise ValueError(f"target {n} ({type(m).__name__}) has no weight tensor")
    if not out:
        raise ValueError(f"no target modules matched {targets!r}")
    return out


def _has_weight(m: nn.Module) -> bool:
    return isinstance(getattr(m, "weight", None), Tensor)


def prune(
    model: nn.Module,
    criterion: C.CriterionLike = "magnitude",
    scope: str = "row",
    beta: float = 1.0,
    *,
    sparsity: float | None = None,
    calibration: Iterable | None = None,
    inputs: Callable | None = None,
    targets: TargetSpec = None,
    count_by: C.CriterionLike | None = None,
    min_keep: float | int | None = None,
    loss_fn: Callable | None = None,
    negative: str = "abs",
    seed: int = 0,
    permanent: bool = False,
    progress: bool = False,
) -> PruneReport:
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
    over the targets (with ``tqdm`` installed)."""
    check_options(scope, beta, sparsity, min_keep)
    if sparsity is not None and count_by is not None:
        raise ValueError("count_by sets EMP's counts; it has no meaning with a fixed sparsity")
    if inputs is not None and not callable(inputs):
        raise ValueError(f"inputs must be a function batch -> model inputs, got {type(inputs).__name__}")
    if inputs is not None and calibration is None:
        raise ValueError("inputs= picks the model inputs out of calibration batches: pass calibration= too")
    start = time.perf_counter()
    mods = select_targets(model, targets)
    masked = _already_masked(model, mods)
    if masked:
        warnings.warn(
            f"{len(masked)} target(s) already carry a reversible mask (e.g. {masked[0]}): the new mask "
            "stacks on it (weights pruned before stay zero and score as zero). Call "
            "emprune.restore(model) first to prune the dense weights again, or "
            "emprune.make_permanent(model) to fold the old masks in.", UserWarning, stacklevel=2)
    crit = C.get(criterion, loss_fn=loss_fn, seed=seed)
    cnt = None if count_by is None else C.get(count_by, loss_fn=loss_fn, seed=seed)
    if cnt is not None and cnt.same_as(crit):
        cnt = None  # the same scores: score once
    calib = list(calibration) if calibration is not None else None  # may be iterated twice
    # prepare what needs data; a criterion the caller prepared already is used as it is
    ours = [c for c in (crit, cnt) if c is not None and (calib is not None or not c.prepared)]
    with model_inputs(inputs):
        for c in ours:
            c.prepare(model, mods, calib)
    tlist = [Target(n, m.weight.shape, _bind(crit, n, m), None if cnt is None else _bind(cnt, n, m))
             for n, m in mods.items()]
    report = PruneReport.for_run(crit.name, (cnt or crit).name, scope, beta=beta, sparsity=sparsity,
                                 min_keep=min_keep)
    if masked:
        report.extra["already_masked"] = masked
    try:
        decisions = decide(tlist, scope, beta, sparsity=sparsity, min_keep=min_keep, negative=negative)  # type: ignore[arg-type]
        for d in _progress(decisions, len(tlist), progress, f"emprune {scope}"):
            mod = mods[d.name]
            apply_mask(mod, d.mask, permanent=permanent)
            report.add(d, count_zeros(mod.weight))
    finally:
        for c in ours:
            c.release()
    report.seconds = time.perf_counter() - start
    return report


def _already_masked(model: nn.Module, mods: dict[str, nn.Module]) -> list[str]:
    """Names of the targets whose weight carries a reversible (``weight_mask``) mask."""
    ids = {id(m) for m, name in _pruned(model) if name == "weight"}
    return [n for n, m in mods.items() if id(m) in ids]


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


def apply_mask(module: nn.Module, mask: Tensor, *, permanent: bool = False, name: str = "weight") -> None:
    """Zero ``module.<name>`` where ``mask`` is False.

    Reversible by default (``torch.nn.utils.prune.custom_from_mask``: masks of successive
    calls combine); ``permanent=True`` multiplies the weight in place instead."""
    w = getattr(module, name)
    if mask.shape != w.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != {name} shape {tuple(w.shape)}")
    if permanent:
        with torch.no_grad():
            (getattr(module, name + "_orig") if tprune.is_pruned(module) and hasattr(module, name + "_orig")
             else w).masked_fill_(~mask.to(w.device), 0)
        if hasattr(module, name + "_orig"):
            make_permanent(module)
        return
    tprune.custom_from_mask(module, name, mask.to(w.device))


def _pruned(model: nn.Module) -> Iterable[tuple[nn.Module, str]]:
    for m in model.modules():
        for h in list(m._forward_pre_hooks.values()):
            if isinstance(h, tprune.BasePruningMethod):
                yield m, h._tensor_name


def make_permanent(model: nn.Module) -> int:
    """Fold every reversible mask into its weight (``torch.nn.utils.prune.remove``); the
    model then holds plain parameters with zeros.  Returns the number of tensors folded."""
    done = list(_pruned(model))
    for m, name in done:
        tprune.remove(m, name)
    return len(done)


def restore(model: nn.Module) -> int:
    """Undo every un-committed (reversible) mask: each weight gets back its original
    values, as the same ``Parameter`` object (optimizers keep working).  Returns the number
    of tensors restored."""
    done = list(_pruned(model))
    for m, name in done:
        orig = getattr(m, name + "_orig")
        for k, h in list(m._forward_pre_hooks.items()):
            if isinstance(h, tprune.BasePruningMethod) and h._tensor_name == name:
                del m._forward_pre_hooks[k]
        delattr(m, name)
        del m._parameters[name + "_orig"]
        del m._buffers[name + "_mask"]
        m.register_parameter(name, orig)
    return len(done)
