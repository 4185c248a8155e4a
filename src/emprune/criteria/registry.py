"""The one registry of criteria: every name a job accepts as a score.

Two levels, one table:

* ``level="weight"``: a :class:`~emprune.criteria.base.Criterion` scoring every entry of a weight
  (masks: ``emprune.prune``, ``prune_lm``, ``count_by``, the ``--criterion`` choices of
  ``emprune prune`` and ``emprune compare``);
* ``level="unit"``: a :class:`UnitScore`, one score per structural unit of a unit group
  (``emprune.shrink``, ``emprune shrink --criterion``).

A name may exist at both levels with the same idea behind it (``magnitude``: ``|W|`` of a weight,
the weight norm of a unit; ``taylor``: first-order loss change of either). Registering is one
line: ``register("mine", Mine)`` or ``register("mine", fn, level="unit", needs="activations")``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

from ..core.checks import one_of
from .base import Criterion, Custom

LEVELS = ("weight", "unit")
#: what a unit score needs besides the weights
UNIT_NEEDS = (None, "activations", "gradients")


@dataclass(frozen=True)
class UnitScore:
    """A unit criterion: ``fn(group, stats) -> Tensor[n]`` (one non-negative score per unit) and
    what ``stats`` must hold for it (``needs``: None, ``"activations"`` or ``"gradients"``)."""

    name: str
    fn: Callable[..., Tensor]
    needs: str | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.needs is not None

    def __call__(self, group: Any, stats: Any) -> Tensor:
        return self.fn(group, stats)


@dataclass(frozen=True)
class Entry:
    """A registered criterion. Weight level: ``factory(**options)`` makes the Criterion
    (``factory`` may also take ``loss_fn`` and/or ``seed``, passed by :func:`get` when it does).
    Unit level: ``factory`` is the score function and ``options`` holds ``needs``."""

    name: str
    factory: Callable[..., Any]
    options: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    level: str = "weight"

    def make(self, **context: Any) -> Criterion | UnitScore:
        if self.level == "unit":
            return UnitScore(self.name, self.factory, **self.options)
        params = _parameters(self.factory)
        crit = self.factory(**self.options, **{k: v for k, v in context.items() if k in params})
        if not isinstance(crit, Criterion):
            raise TypeError(f"criterion {self.name!r}: the factory returned {type(crit).__name__}, not a Criterion")
        return crit

    @property
    def needs_calibration(self) -> bool:
        return self.make().needs_calibration

    @property
    def layerwise(self) -> bool:
        """Usable in the layer-wise LLM loop (``prune_lm``, ``emprune prune``); unit scores never."""
        made = self.make()
        return isinstance(made, Criterion) and made.layerwise


_REGISTRY: dict[tuple[str, str], Entry] = {}


def _parameters(factory: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set()


def _check_level(level: str) -> None:
    one_of("level", level, LEVELS)


def register(name: str, factory: Callable[..., Any], *, summary: str = "", replace: bool = False,
             level: str = "weight", **options: Any) -> Entry:
    """Make ``name`` a criterion everywhere at ``level``: ``factory(**options)`` builds a
    Criterion (weight level), or ``factory`` is ``(group, stats) -> scores`` with ``needs=`` in
    ``options`` (unit level). Names are lower-case; an existing name is refused unless
    ``replace=True``."""
    _check_level(level)
    key = name.lower()
    if not key or key != key.strip() or "," in key:
        raise ValueError(f"criterion name must be a non-empty word without commas; got {name!r}")
    if (level, key) in _REGISTRY and not replace:
        raise ValueError(f"criterion {key!r} is registered already (pass replace=True to replace it)")
    if level == "unit" and options.get("needs") not in UNIT_NEEDS:
        raise ValueError(f"a unit criterion's needs must be one of {UNIT_NEEDS}; got {options.get('needs')!r}")
    entry_ = Entry(key, factory, dict(options), summary, level)
    _REGISTRY[(level, key)] = entry_
    return entry_


def unregister(name: str, *, level: str = "weight") -> None:
    """Remove ``name`` from the registry (e.g. a criterion registered by a test)."""
    entry(name, level=level)  # a clear error for an unknown name
    del _REGISTRY[(level, name.lower())]


def entry(name: str, *, level: str = "weight") -> Entry:
    """The registry entry of ``name`` at ``level`` (ValueError listing the names if there is none)."""
    _check_level(level)
    try:
        return _REGISTRY[(level, name.lower())]
    except KeyError:
        what = "unit criterion" if level == "unit" else "criterion"
        extra = "" if level == "unit" else " or pass a callable"
        raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(names(level=level))}{extra}") from None


def names(*, layerwise: bool | None = None, level: str = "weight") -> tuple[str, ...]:
    """Registered names of ``level`` in registration order (``layerwise=True``: those the LLM
    loop can use)."""
    _check_level(level)
    return tuple(n for (lv, n), e in _REGISTRY.items()
                 if lv == level and (layerwise is None or e.layerwise == layerwise))


def get(spec: Any, *, loss_fn: Callable | None = None, seed: int = 0, level: str = "weight") -> Any:
    """A :class:`Criterion` (weight level) from a registered name, an instance or a
    ``(name, module) -> scores`` callable; a :class:`UnitScore` (unit level) from a name or an
    instance."""
    if isinstance(spec, (Criterion, UnitScore)):
        return spec
    if isinstance(spec, str):
        return entry(spec, level=level).make(loss_fn=loss_fn, seed=seed)
    if callable(spec) and level == "weight":
        return Custom(spec)
    raise TypeError(f"criterion must be a name, a Criterion or a callable, got {type(spec).__name__}")
