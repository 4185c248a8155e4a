"""EMP on arbitrary CNNs (residual additions, concatenations, Flatten) through Torch-Pruning.

The chain walk of :mod:`.units` only knows ``nn.Sequential``-like stacks. For any other network the
channel dependencies (a residual addition ties the channels of every conv that feeds it) come
from Torch-Pruning's dependency graph (``pip install torch-pruning``, optional): each of its
groups is one EMP unit group; its group-magnitude scores (L2 over every coupled weight) give
N_eff, the paper's rule keeps ``floor(beta * N_eff)`` channels (or ``keep=`` gives the fixed-size
baseline), and Torch-Pruning removes the rest physically in every coupled layer.

Why not for LLMs: its tracer is known to fail or hang on recent transformers decoders; the
decoder blocks use :func:`emprune.shrink`'s own groups.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from ..act.report import GroupReport, ShrinkReport
from ..core import rule
from .shrink import macs_plain


def _tp():
    try:
        import torch_pruning
    except ImportError as e:  # optional dependency
        raise ImportError("shrink_traced needs Torch-Pruning: pip install torch-pruning") from e
    return torch_pruning


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _group_params_per_unit(group: Any, n: int) -> float:
    """Parameters that leave with one channel of ``group``: rows (out) or columns (in) of every
    coupled Conv / Linear, the affine pair of every coupled norm layer (an estimate from shapes,
    used for groups that lose nothing; a pruned group's figure is measured)."""
    total, seen = 0, set()
    for item in group:
        mod, how = item.dep.target.module, getattr(item.dep.handler, "__name__", "")
        if (id(mod), how) in seen or not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear,
                                                           nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
            continue
        seen.add((id(mod), how))
        w = mod.weight
        if w is None:
            continue
        if how == "prune_out_channels":
            per = (w[0].numel() if w.dim() > 1 else 1) + (1 if getattr(mod, "bias", None) is not None else 0)
        elif how == "prune_in_channels":
            per = w.shape[0] * (math.prod(w.shape[2:]) if w.dim() > 2 else 1)
        else:
            continue
        total += per * len(item.idxs)
    return total / max(n, 1)


def shrink_traced(model: nn.Module, example_input: Tensor, *, beta: float = 1.0, keep: float | int | None = None,
                  ignored_layers: list[nn.Module] | None = None) -> ShrinkReport:
    """Shrink any CNN (or MLP) whose dependencies Torch-Pruning can trace, in place.

    Per dependency group: group-magnitude scores (``torch_pruning.importance.
    GroupMagnitudeImportance(p=2)``, not normalised), then EMP's ``floor(beta * N_eff)`` highest
    kept (``keep``: a fraction or a count per group instead), the rest removed in every coupled
    layer. ``ignored_layers``: modules whose outputs must stay (default: the last Conv/Linear, the
    output layer). Returns a :class:`ShrinkReport` (scope ``layer``, recipe ``paper``; the mass
    bound holds for every group). Groups are pruned in the graph's order, so a group's parameters
    are counted at the shapes it has then (weights coupling two groups count for the later one);
    the per-group removals add up to the model's."""
    tp = _tp()
    t0 = time.perf_counter()
    b = rule.check_beta(beta) if keep is None else None
    if keep is not None and (isinstance(keep, bool) or not (isinstance(keep, int) and keep >= 1
                                                          or isinstance(keep, float) and 0 < keep <= 1)):
        raise ValueError(f"keep must be a fraction in (0, 1] or a count >= 1, got {keep!r}")
    layers = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    if not layers:
        raise ValueError("shrink_traced: the model has no Conv or Linear layer")
    if ignored_layers is None:
        ignored_layers = layers[-1:]
    was = model.training
    model.eval()
    names = {m: n for n, m in model.named_modules()}
    params_before, macs_before = _params(model), macs_plain(model, example_input)
    with torch.enable_grad():  # the tracer follows autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    imp = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    report = ShrinkReport(criterion="group-magnitude (torch-pruning)", scope="layer", beta=b,
                          recipe={"name": "paper" if keep is None else "keep", "backend": "torch-pruning"}, keep=keep)
    grad = torch.is_grad_enabled()
    try:
        torch.set_grad_enabled(False)
        for group in graph.get_all_groups(ignored_layers=ignored_layers,
                                          root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
            root = group[0].dep.target.module
            s = imp(group).detach().double().cpu()
            n = s.numel()
            neff = emp_k = bound = None
            if keep is None:
                neff = float(rule.effective_number(s))
                k = emp_k = int(rule.keep_count_from_neff(torch.tensor(neff), b, n))
            else:
                k = max(1, min(n, round(keep * n) if isinstance(keep, float) else keep))
            mask = rule.topk_mask(s, k)
            ppu = _group_params_per_unit(group, n)
            mass = float(rule.retained_mass(s, mask))
            if neff is not None:
                nu = max(1, min(int(math.floor(neff)), n))
                bound = float(rule.guaranteed_mass(torch.tensor([float(nu)]), torch.tensor([k]), n)[0])
            removed = (~mask).nonzero().squeeze(1).tolist()
            if removed:
                p0 = _params(model)
                group.prune(idxs=removed)
                ppu = (p0 - _params(model)) / len(removed)  # measured: the per-group rows add up exactly
            report.groups.append(GroupReport(names.get(root, type(root).__name__), "channels" if isinstance(
                root, nn.modules.conv._ConvNd) else "neurons", None, n, k, round(ppu * n), round(ppu * k), neff,
                emp_k, mass, bound, None, mask.nonzero().squeeze(1).tolist()))
    finally:
        torch.set_grad_enabled(grad)
        model.train(was)
    report.params_before, report.params_after = params_before, _params(model)
    report.macs_before, report.macs_after = macs_before, macs_plain(model, example_input)
    report.macs_note = "per example_input forward: Linear and Conv multiply-adds"
    report.seconds = time.perf_counter() - t0
    return report
