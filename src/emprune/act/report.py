"""What a run did, per target and overall, printable as a table or JSON: :class:`PruneReport`
(masks) and :class:`ShrinkReport` (units removed).

Two fractions, one vocabulary everywhere (reports, ``emprune.json``, compare JSON and tables):

* **pruned fraction** = weights removed by pruning / targeted weights of the dense model
  (``1 - kept/total``): the sparsity a run chose;
* **zeros fraction** = targeted weights that are zero after pruning / targeted weights, which
  also counts zeros already present in the dense weights (e.g. from quantisation).

They differ only by pre-existing zeros. *Sparsity* is only ever an input (the fraction a
fixed-size run is asked to remove); what was measured is a fraction with one of the names above.
A shrink reports the **removed fraction** of the parameters (all, and non-embedding).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..decide.scopes import Decision

WARN_UNIT_SPARSITY = 0.95  # a unit pruned above this is reported as a warning


def count_zeros(t: torch.Tensor) -> int:
    """Entries of ``t`` equal to zero (False for a mask), without temporaries: ``(t == 0).sum()``
    would allocate a bool copy and then an int64 one (8 bytes per weight)."""
    return t.numel() - int(torch.count_nonzero(t))


@dataclass
class LayerReport:
    name: str
    shape: list[int]
    unit: str
    units: int
    n_per_unit: int
    neff_mean: float
    neff_min: float
    neff_max: float
    kept: int
    total: int
    zeros: int  # weights that are zero after pruning (pre-existing zeros included)
    zeros_fraction: float  # zeros / total
    pruned_fraction: float  # 1 - kept / total
    max_unit_pruned_fraction: float  # the most-pruned unit's 1 - k / n
    raised_by_floor: int
    mass_mean: float
    mass_min: float
    bound_min: float  # smallest per-unit guarantee of the mass bound
    bound_ok: bool  # every unit retained at least its guarantee

    @classmethod
    def from_decision(cls, d: Decision, zeros: int) -> "LayerReport":
        units = int(d.k.numel())
        unit_pruned = 1.0 - d.k.double() / d.n_per_unit
        ok = bool((d.mass >= d.guaranteed - 1e-9).all()) if d.unit != "global" else True
        return cls(
            name=d.name, shape=list(d.shape), unit=d.unit, units=units, n_per_unit=d.n_per_unit,
            neff_mean=float(d.neff.mean()), neff_min=float(d.neff.min()), neff_max=float(d.neff.max()),
            kept=d.kept, total=d.total, zeros=zeros, zeros_fraction=zeros / d.total,
            pruned_fraction=1.0 - d.kept / d.total, max_unit_pruned_fraction=float(unit_pruned.max()),
            raised_by_floor=d.raised, mass_mean=float(d.mass.mean()), mass_min=float(d.mass.min()),
            bound_min=float(d.guaranteed.min()), bound_ok=ok,
        )

    @property
    def sparsity(self) -> float:
        """Old name of :attr:`zeros_fraction` (kept for one version)."""
        return self.zeros_fraction

    @property
    def max_unit_sparsity(self) -> float:
        """Old name of :attr:`max_unit_pruned_fraction` (kept for one version)."""
        return self.max_unit_pruned_fraction

    def to_dict(self) -> dict[str, Any]:
        """The fields, plus the old keys ``sparsity`` and ``max_unit_sparsity`` (one version)."""
        return {**asdict(self), "sparsity": self.sparsity, "max_unit_sparsity": self.max_unit_sparsity}


@dataclass
class PruneReport:
    """Summary of one pruning run: :attr:`pruned_fraction` (what pruning removed) and
    :attr:`zeros_fraction` (what a user measures on the model: zeros after pruning, dense
    zeros included), per target in :attr:`layers` and overall."""

    criterion: str
    count_by: str
    scope: str
    beta: float | None
    target_sparsity: float | None
    min_keep: float | int | None
    layers: list[LayerReport] = field(default_factory=list)
    global_neff: float | None = None
    global_mass: float | None = None
    global_bound: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    _mass_kept: float = field(default=0.0, repr=False)
    _mass_total: float = field(default=0.0, repr=False)

    @classmethod
    def for_run(cls, criterion: str, count_by: str, scope: str, *, beta: float, sparsity: float | None = None,
                min_keep: float | int | None = None, explicit_counts: bool = False) -> "PruneReport":
        """An empty report for a run: ``beta`` is recorded only when EMP set the counts (not
        with a fixed ``sparsity`` or explicit counts)."""
        emp = sparsity is None and not explicit_counts
        return cls(criterion=criterion, count_by=count_by, scope=scope, beta=float(beta) if emp else None,
                   target_sparsity=sparsity, min_keep=min_keep)

    def add(self, d: Decision, zeros: int) -> LayerReport:
        """Record one target's decision (``zeros``: its weights that are zero now)."""
        layer = LayerReport.from_decision(d, zeros)
        self.layers.append(layer)
        if d.unit == "global":
            self.global_neff = float(d.neff[0])
            self.global_bound = float(d.guaranteed[0])
            self._mass_kept += float(d.mass[0]) * d.score_sum
            self._mass_total += d.score_sum
            self.global_mass = self._mass_kept / self._mass_total if self._mass_total > 0 else 1.0
        return layer

    @property
    def total(self) -> int:
        return sum(l.total for l in self.layers)

    @property
    def kept(self) -> int:
        return sum(l.kept for l in self.layers)

    @property
    def zeros(self) -> int:
        return sum(l.zeros for l in self.layers)

    @property
    def zeros_fraction(self) -> float:
        """Targeted weights that are zero now / targeted weights (dense zeros included)."""
        return self.zeros / self.total if self.total else 0.0

    @property
    def sparsity(self) -> float:
        """Old name of :attr:`zeros_fraction` (kept for one version)."""
        return self.zeros_fraction

    @property
    def pruned_fraction(self) -> float:
        """Share of the targeted weights the masks removed (``1 - kept/total``); differs from
        :attr:`zeros_fraction` by the weights that were already zero before pruning."""
        return 1.0 - self.kept / self.total if self.total else 0.0

    @property
    def bound_ok(self) -> bool:
        if self.global_mass is not None and self.global_bound is not None:
            return self.global_mass >= self.global_bound - 1e-9
        return all(l.bound_ok for l in self.layers)

    @property
    def warnings(self) -> list[str]:
        w = [f"{l.name}: a {l.unit if l.unit != 'global' else 'layer'} is "
             f"{100 * l.max_unit_pruned_fraction:.1f}% pruned (above {100 * WARN_UNIT_SPARSITY:.0f}%); "
             f"consider min_keep or count_by" for l in self.layers
             if l.max_unit_pruned_fraction > WARN_UNIT_SPARSITY]
        if not self.bound_ok:  # cannot happen for EMP masks; would reveal a bug
            w.append("retained mass below the EMP bound for some unit")
        return w

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the settings, per-layer rows and totals (``sparsity``: the old name of
        ``zeros_fraction``, written for one version)."""
        d = asdict(self)
        d.pop("_mass_kept"), d.pop("_mass_total")
        d["layers"] = [l.to_dict() for l in self.layers]
        d.update(total=self.total, kept=self.kept, zeros=self.zeros, pruned_fraction=self.pruned_fraction,
                 zeros_fraction=self.zeros_fraction, sparsity=self.sparsity,
                 bound_ok=self.bound_ok, warnings=self.warnings)
        return _finite(d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """A fixed-width table: one line per target, then the totals."""
        head = f"{'target':<40} {'shape':>14} {'unit':>6} {'N':>8} {'N_eff mean [min,max]':>26} " \
               f"{'kept':>11} {'pruned':>8} {'mass':>6} {'bound':>6}"
        lines = [head, "-" * len(head)]
        for l in self.layers:
            if l.unit == "global":  # one N_eff for the whole model: printed below the table
                neff = "(global)"
            elif l.units > 1:
                neff = f"{l.neff_mean:.1f} [{l.neff_min:.0f},{l.neff_max:.0f}]"
            else:
                neff = f"{l.neff_mean:.1f}"
            lines.append(f"{_clip(l.name, 40):<40} {'x'.join(map(str, l.shape)):>14} {l.unit:>6} "
                         f"{l.n_per_unit:>8} {neff:>26} {l.kept:>11} {100 * l.pruned_fraction:>7.2f}% "
                         f"{l.mass_mean:>6.3f} {l.bound_min:>6.3f}")
        lines.append("-" * len(head))
        how = (f"sparsity={self.target_sparsity:g}" if self.target_sparsity is not None
               else f"beta={self.beta:g}" if self.beta is not None else "explicit counts")
        lines.append(f"criterion={self.criterion} count_by={self.count_by} scope={self.scope} {how} "
                     f"min_keep={self.min_keep}")
        lines.append(f"kept {self.kept:,} of {self.total:,} targeted weights; pruned {100 * self.pruned_fraction:.2f}%, "
                     f"zeros {100 * self.zeros_fraction:.2f}%"
                     + (f"; global N_eff {self.global_neff:.1f}, mass {self.global_mass:.4f} >= bound "
                        f"{self.global_bound:.4f}" if self.global_neff is not None else "")
                     + f"; {self.seconds:.2f} s")
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------- shrink


@dataclass
class GroupReport:
    """One unit group: units and parameters before/after, N_eff and retained score mass."""

    name: str
    kind: str
    layer: int | None
    units_before: int
    units_after: int
    params_before: int
    params_after: int
    neff: float | None = None
    emp_count: int | None = None
    retained_mass: float | None = None
    bound: float | None = None
    kv_heads_after: int | None = None
    kept: list[int] = field(default_factory=list)
    sensitivity: float | None = None

    @property
    def bound_ok(self) -> bool | None:
        if self.bound is None or self.retained_mass is None:
            return None
        return self.retained_mass >= self.bound - 1e-9


@dataclass
class ShrinkReport:
    """What :func:`shrink` did, per group and in total (parameters counted on the real model)."""

    criterion: str
    scope: str
    beta: float | None
    recipe: dict[str, Any]
    keep: Any
    groups: list[GroupReport] = field(default_factory=list)
    #: the grid of the kept MLP widths (multiples of it or the full width; 1: any width; None:
    #: no MLP group in the run)
    multiple_of: int | None = None
    params_before: int = 0
    params_after: int = 0
    embedding_params: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    macs_note: str = ""
    global_neff: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def removed_fraction(self) -> float:
        """Removed share of all parameters."""
        return 1 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def removed_fraction_non_embedding(self) -> float:
        """Removed share of the non-embedding parameters (the usual LLM measure)."""
        dense = self.params_before - self.embedding_params
        return (self.params_before - self.params_after) / dense if dense else 0.0

    @property
    def bound_ok(self) -> bool:
        return all(g.bound_ok is not False for g in self.groups)

    def widths(self) -> dict[str, list[int]]:
        """Units kept per layer, by kind."""
        out: dict[str, list[int]] = {}
        for g in self.groups:
            out.setdefault(g.kind, []).append(g.units_after)
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["removed_fraction"] = self.removed_fraction
        d["removed_fraction_non_embedding"] = self.removed_fraction_non_embedding
        d["bound_ok"] = self.bound_ok
        if self.macs_before and self.macs_after:
            d["mac_ratio"] = self.macs_before / self.macs_after
        return d

    def summary(self) -> str:
        """One line: parameters and MACs before/after."""
        s = (f"shrunk {self.params_before:,} -> {self.params_after:,} parameters "
             f"({100 * self.removed_fraction:.2f}% removed; {100 * self.removed_fraction_non_embedding:.2f}% "
             f"of the non-embedding parameters)")
        if self.macs_before and self.macs_after:
            s += f"; MACs {self.macs_before:,} -> {self.macs_after:,} (x{self.macs_before / self.macs_after:.3f} fewer)"
        return s

    def __str__(self) -> str:
        sens = any(g.sensitivity is not None for g in self.groups)
        head = (f"{'group':<34} {'kind':<8} {'units':>12} {'N_eff':>9} {'params':>21} {'mass':>7} {'bound':>7}"
                + (f" {'loss+':>8}" if sens else ""))
        grid = f" multiple_of={self.multiple_of}" if self.multiple_of is not None else ""
        lines = [f"criterion={self.criterion} scope={self.scope} beta={self.beta} recipe={self.recipe.get('name')} "
                 f"keep={self.keep}{grid}", head, "-" * len(head)]
        for g in self.groups:
            ne = f"{g.neff:9.1f}" if g.neff is not None else f"{'-':>9}"
            ma = f"{g.retained_mass:7.3f}" if g.retained_mass is not None else f"{'-':>7}"
            bo = f"{g.bound:7.3f}" if g.bound is not None else f"{'-':>7}"
            lines.append(f"{g.name[-34:]:<34} {g.kind:<8} {g.units_before:>5} -> {g.units_after:<4} {ne} "
                         f"{g.params_before:>9,} -> {g.params_after:<9,} {ma} {bo}"
                         + (f" {g.sensitivity:8.4f}" if g.sensitivity is not None else f" {'-':>8}" if sens else ""))
        if sens:
            lines.append(f"loss+: calibration loss increase when that group alone loses "
                         f"{100 * self.recipe.get('sens_fraction', 0.5):.0f}% of its units (where EMP's total goes)")
        j = self.extra.get("joint")
        if j:
            chosen = next(c for c in j["candidates"] if c["blocks"] == j["chosen_blocks"])
            tried = [c for c in j["candidates"] if "loss_increase" in c]
            lines.append(f"one budget: {j['budget_params']:,} parameters (EMP: {j['emp_blocks_removed']} blocks + "
                         f"{j['emp_width_params']:,} of widths) spent as {chosen['blocks']} blocks + "
                         f"{chosen['width_params']:,} of widths: the lowest calibration loss ("
                         f"{chosen['loss_increase']:+.4f}) of {len(tried)} candidates (0 to "
                         f"{j['candidates'][-1]['blocks']} blocks; each in emprune.json)")
        lines.append(self.summary())
        return "\n".join(lines)



def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else "..." + s[-(n - 3):]


def _finite(x: Any) -> Any:
    """JSON has no NaN/Inf: map them to None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
