"""Apply structural decisions: remove the units a decision did not keep, physically.

For every unit group and its :class:`~emprune.decide.scopes.Decision`: optionally fold the
removed units' mean contribution into the consumer's bias (FLAP's compensation, from the
calibration statistics), remove the units (smaller modules, in place: :meth:`UnitGroup.remove`)
and record a :class:`~emprune.act.report.GroupReport`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from ..criteria.unit_scores import UnitStats
from ..decide.scopes import Decision
from ..structure.units import HeadGroup, UnitGroup
from .report import GroupReport


def _finite_or_none(x: Any) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def remove_units(groups: Sequence[UnitGroup], decisions: Sequence[Decision], *, stats: UnitStats | None = None,
                 compensate: bool = False, exact_bound: bool = False, dry_run: bool = False) -> list[GroupReport]:
    """Remove the unkept units of every group (after folding their mean output into a bias with
    ``compensate``, which needs ``stats``) and report each group. ``exact_bound``: the counts are
    the paper's per-group rule on the selection scores, so the mass bound is reported.
    ``dry_run``: nothing is changed; the parameters after are computed, not measured."""
    out = []
    for g, d in zip(groups, decisions):
        m = d.mask
        n_before, p_before = g.n, g.params()
        neff = _finite_or_none(d.neff[0])
        mass = float(d.mass[0]) if m.numel() else None
        kept = m.nonzero().squeeze(1).tolist()
        if dry_run:
            k = int(m.sum())
            out.append(GroupReport(g.name, g.kind, g.layer, n_before, k, p_before,
                                   p_before - (n_before - k) * g.params_per_unit(), neff, d.emp_k, mass, None,
                                   None, kept))
            continue
        if compensate:
            assert stats is not None, "bias compensation needs the calibration statistics"
            g.compensate(m, stats.mean(g))
        g.remove(m)
        bound = float(d.guaranteed[0]) if exact_bound and neff is not None else None
        out.append(GroupReport(g.name, g.kind, g.layer, n_before, g.n, p_before, g.params(), neff, d.emp_k, mass,
                               bound, g.n_kv if isinstance(g, HeadGroup) else None, kept))
    return out
