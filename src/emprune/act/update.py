"""Rewrite a decided Linear: SparseGPT's OBS update, or an N:M pattern, in place of a plain mask.

Once EMP has decided how many weights each row of a Linear keeps (a
:class:`~emprune.decide.scopes.Decision`), :func:`apply_update` may choose *which* differently:

* ``method="obs"``: SparseGPT's reconstruction (:func:`emprune.core.obs.obs_prune`) chooses which
  weights of each row go (exactly the decided count of every row; with a fixed sparsity,
  SparseGPT's own per-block choice over all rows) and rewrites the kept ones so that the layer's
  outputs on the calibration inputs change least;
* ``nm=(n, m)``: keep the ``n`` best of every ``m`` consecutive weights of a row (by the scores,
  or by OBS's saliency with ``method="obs"``).

The returned decision carries the mask actually applied (counts and retained mass recomputed;
EMP's mass guarantee does not apply to a mask that is not the top-k of the scores).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core import rule
from ..core.obs import nm_mask, obs_prune
from ..decide.scopes import Decision


@dataclass(frozen=True)
class Update:
    """How decided Linears are rewritten: ``method`` (``"obs"`` or None), an ``nm`` pattern,
    whether the counts are a fixed fraction (``fixed``: SparseGPT's per-block choice), and the
    OBS settings (``damp``, ``damp_kind``, ``blocksize``, ``quota``; see :func:`obs_prune`)."""

    method: str | None = None
    nm: tuple[int, int] | None = None
    fixed: bool = False
    damp: float = 0.01
    damp_kind: str = "mean"
    blocksize: int = 128
    quota: str = "lookahead"

    @property
    def active(self) -> bool:
        return self.method is not None or self.nm is not None


def with_mask(d: Decision, mask: Tensor, scores: Tensor) -> Decision:
    """``d`` with another mask (chosen by OBS, or an N:M pattern): counts and retained mass of
    the selection scores recomputed from it; no mass guarantee (recorded as 0), since the mask
    is not the top-k of the scores."""
    rows = mask.shape[0]
    m2, s2 = mask.reshape(rows, -1), scores.reshape(rows, -1)
    if d.unit == "row":
        k = m2.sum(1).to("cpu", torch.int64)
        mass = rule.retained_mass(s2, m2, 1).cpu()
    else:
        k = m2.sum().reshape(1).to("cpu", torch.int64)
        mass = rule.retained_mass(s2.reshape(-1), m2.reshape(-1), None).reshape(1).cpu()
    return dataclasses.replace(d, k=k, mask=mask, mass=mass.double(), guaranteed=torch.zeros_like(mass).double())


@torch.no_grad()
def apply_update(d: Decision, mod: nn.Linear, scores: Tensor, how: Update, hessian: Tensor | None = None,
                 overwrite_hessian: bool = False) -> Decision:
    """Rewrite ``mod``'s weight as ``how`` says for decision ``d`` (``scores``: the selection
    scores of the weights as decided; ``hessian``: the layer's input Hessian, for OBS, which
    ``overwrite_hessian`` lets OBS use as its working matrix) and return the decision as applied.
    The pruned entries are left for the caller to zero."""
    if how.method == "obs":
        if hessian is None:
            raise ValueError(f"{d.name}: the OBS update needs the layer's input Hessian")
        w = mod.weight.detach()
        common = dict(blocksize=how.blocksize, damp=how.damp, damp_kind=how.damp_kind, quota=how.quota, where=d.name,
                      overwrite_hessian=overwrite_hessian)
        if how.nm is not None:
            res = obs_prune(w, hessian, nm=how.nm, **common)  # type: ignore[arg-type]
        elif how.fixed:  # fixed or OWL: SparseGPT's per-block choice over all rows
            res = obs_prune(w, hessian, sparsity=1.0 - d.kept / d.total, **common)  # type: ignore[arg-type]
        else:  # EMP / matched counts: exactly the decided count of every row
            res = obs_prune(w, hessian, k=d.mask.reshape(w.shape[0], -1).sum(1), **common)  # type: ignore[arg-type]
        mod.weight.data.copy_(res.weight.to(mod.weight.dtype))
        mask = res.mask
    elif how.nm is not None:
        mask = nm_mask(scores.reshape(scores.shape[0], -1), *how.nm).reshape(scores.shape)
    else:
        return d
    return with_mask(d, mask, scores)
