"""Measured per-group sensitivity and the allocation it implies.

Why: EMP's per-layer counts collapse on heavy-tailed unit scores, and allocations that compare
normalised scores across layers only tie uniform removal (``benchmarks/results/shrink_smollm2.md``).
What a layer can lose is better read from the loss itself: remove a fixed fraction ``F`` of one
group's units (the lowest scored, masked, with the recipe's bias compensation), measure the loss
increase ``d_g`` on a few calibration batches, restore the group, next group.

Allocation: with the quadratic model ``loss_g(f) ~ a_g f^2`` (``a_g = d_g / F^2``), removing a
given number of parameters ``R`` at least cost (``sum_g a_g f_g^2`` subject to
``sum_g f_g P_g = R``, ``P_g`` the group's parameters) gives ``f_g = lambda P_g / a_g``, clipped to
the recipe's per-group ceiling; ``lambda`` is found by bisection. EMP still decides ``R`` (how
many); the sensitivities only decide where.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..structure.depth import skipped
from ..structure.layouts import decoder_layers
from ..structure.units import KANGroup, UnitGroup


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[Any], loss_fn: Callable[[nn.Module, Any], Tensor]) -> float:
    """Mean loss over ``batches`` (float64 accumulation)."""
    total = 0.0
    for b in batches:
        total += float(loss_fn(model, b).double())
    return total / max(len(batches), 1)


@contextmanager
def masked(groups: Sequence[UnitGroup], keeps: Sequence[Tensor], means: Sequence[Tensor] | None = None) -> Iterator[None]:
    """Within the block, every group's units outside its ``keep`` mask are zeroed (the masked
    reference of their removal), their mean output first folded into the consumer's bias when
    ``means`` (the consumers' input means) are given; on exit every consumer is restored exactly
    (its parameters copied back, a bias created by the compensation dropped)."""
    saved = []
    try:
        for j, (g, keep) in enumerate(zip(groups, keeps)):
            c = g.consumer
            saved.append((c, {n: p.detach().clone() for n, p in c.named_parameters(recurse=False)},
                          getattr(c, "bias", None) is not None))
            if means is not None and not isinstance(g, KANGroup):
                g.compensate(keep, means[j])
            g.zero(keep)
        yield
    finally:
        with torch.no_grad():
            for c, params, had_bias in reversed(saved):
                if not had_bias and getattr(c, "bias", None) is not None:
                    c.bias = None  # created by the compensation
                for n, p in c.named_parameters(recurse=False):
                    p.copy_(params[n])


def sensitivity_keep(g: UnitGroup, scores: Tensor, fraction: float) -> Tensor:
    """The units group ``g`` keeps while its sensitivity is measured: the highest ``scores`` but
    ``fraction`` of them, by the group's own rule (``g.keep_mask``), off any MLP width grid so that
    the measurement is the same whatever ``multiple_of`` the decision then uses."""
    return g.keep_mask(scores, max(1, round((1 - fraction) * g.n)), grid=False)


@torch.no_grad()
def group_sensitivity(model: nn.Module, groups: list[UnitGroup], scores: list[Tensor], batches: Iterable[Any],
                      loss_fn: Callable[[nn.Module, Any], Tensor], *, fraction: float = 0.5,
                      means: list[Tensor] | None = None, progress: bool = False) -> list[float]:
    """Loss increase when each group alone loses ``fraction`` of its units (the lowest
    ``scores``, kept by the group's own rule: ``g.keep_mask``; off any MLP width grid, so
    that the measurement is the same whatever ``multiple_of`` the decision then uses).

    The model is left exactly as it was (the consumer's parameters are restored, a bias created
    by the compensation is dropped again). ``means``: per-group consumer input means; given,
    the removed units' mean output is folded into the consumer's bias (the recipe's bias
    compensation) before the loss is measured. Returns one float per group (may be slightly
    negative: removing units can lower the loss)."""
    if not 0 < fraction < 1:
        raise ValueError(f"sensitivity fraction must lie in (0, 1), got {fraction}")
    batches = list(batches)
    if not batches:
        raise ValueError("sensitivity needs at least one calibration batch")
    was = model.training
    model.eval()
    base = mean_loss(model, batches, loss_fn)
    out: list[float] = []
    it = enumerate(zip(groups, scores))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(groups), desc="sensitivity", unit="group")
    try:
        for j, (g, s) in it:
            keep = sensitivity_keep(g, s, fraction)
            with masked([g], [keep], None if means is None else [means[j]]):
                out.append(mean_loss(model, batches, loss_fn) - base)
    finally:
        model.train(was)
    return out


@torch.no_grad()
def block_sensitivity(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor], *,
                      progress: bool = False) -> list[float]:
    """Loss increase when each decoder block alone is skipped (its input passed through, see
    :func:`~emprune.structure.depth.skipped`), on ``batches``: one float per block (may be
    slightly negative). The model is left as it was."""
    batches = list(batches)
    if not batches:
        raise ValueError("block sensitivity needs at least one calibration batch")
    was = model.training
    model.eval()
    try:
        base = mean_loss(model, batches, loss_fn)
        it = range(len(decoder_layers(model)))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="block sensitivity", unit="block")
        out = []
        for i in it:
            with skipped(model, [i]):
                out.append(mean_loss(model, batches, loss_fn) - base)
    finally:
        model.train(was)
    return out


@torch.no_grad()
def greedy_blocks(model: nn.Module, k: int, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor], *,
                  candidates: Callable[[list[int]], list[int]] | None = None,
                  progress: bool = False) -> tuple[list[int], list[float]]:
    """Which ``k`` decoder blocks to remove, one at a time: each round skips, one by one, every
    block still there (or the ``candidates(removed)`` it names) on top of those already chosen and
    takes the one whose skipping gives the lowest loss on ``batches``. Blocks interact (two
    neighbours that are each harmless can be harmful together), so the loss is measured again
    after every choice. Returns the blocks in the order chosen and the loss after each choice
    (float64 sums). The model is left as it was."""
    batches = list(batches)
    if not batches:
        raise ValueError("greedy block removal needs at least one calibration batch")
    n = len(decoder_layers(model))
    if not 0 <= k < n:
        raise ValueError(f"can remove 0 to {n - 1} of {n} blocks, asked for {k}")
    was = model.training
    model.eval()
    chosen: list[int] = []
    losses: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=k, desc="choose blocks", unit="block")
    try:
        for _ in range(k):
            pool = [i for i in (candidates(list(chosen)) if candidates else range(n)) if i not in chosen]
            best: tuple[float, int] | None = None
            for i in pool:
                with skipped(model, chosen + [i]):
                    v = mean_loss(model, batches, loss_fn)
                if best is None or v < best[0]:
                    best = (v, i)
            assert best is not None, "no candidate block"
            chosen.append(best[1])
            losses.append(best[0])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was)
    return chosen, losses


@torch.no_grad()
def masked_loss(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], Tensor], *,
                skip: Sequence[int] = (), groups: Sequence[UnitGroup] = (), keeps: Sequence[Tensor] = (),
                means: Sequence[Tensor] | None = None) -> float:
    """The mean loss on ``batches`` of one candidate shrink, masked: the decoder blocks ``skip``
    passed through and each group's units outside its ``keeps`` mask zeroed (with the bias
    compensation when ``means`` are given). The model is left as it was."""
    was = model.training
    model.eval()
    try:
        with skipped(model, list(skip)), masked(groups, keeps, means):
            return mean_loss(model, list(batches), loss_fn)
    finally:
        model.train(was)
