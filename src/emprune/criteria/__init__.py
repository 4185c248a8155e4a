"""Importance criteria: one small module each (see :mod:`.base` for the protocol), and the one
registry every entry point reads (``emprune.prune``, ``prune_lm``, ``count_by``, the CLI
choices and ``emprune compare``).

Adding a criterion is one module (a :class:`Criterion` subclass) and one line here, or in your
own code::

    emprune.criteria.register("l1-row", MyCriterion, summary="...")

Its capabilities (``needs_calibration``, ``layerwise``) are read from the criterion itself.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from torch import Tensor, nn

from .base import Criterion, Custom, run_model
from .magnitude import Magnitude
from .random import Random
from .taylor import Gradient, Taylor
from .wanda import InputNorms, Wanda

CriterionLike = Union[str, Criterion, Callable[[str, nn.Module], Tensor]]

__all__ = ["Criterion", "Custom", "Magnitude", "Wanda", "InputNorms", "Taylor", "Gradient", "Random",
           "Entry", "register", "unregister", "get", "entry", "names", "CriterionLike", "run_model"]


@dataclass(frozen=True)
class Entry:
    """A registered criterion: ``factory(**options)`` makes it (``factory`` may also take
    ``loss_fn`` and/or ``seed``, passed by :func:`get` when it does)."""

    name: str
    factory: Callable[..., Criterion]
    options: dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    def make(self, **context: Any) -> Criterion:
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
        """Usable in the layer-wise LLM loop (``prune_lm``, ``emprune prune``)."""
        return self.make().layerwise


_REGISTRY: dict[str, Entry] = {}


def _parameters(factory: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set()


def register(name: str, factory: Callable[..., Criterion], *, summary: str = "", replace: bool = False,
             **options: Any) -> Entry:
    """Make ``name`` a criterion everywhere: ``factory(**options)`` builds it (a Criterion
    subclass, or any callable returning a Criterion). Names are lower-case; an existing name
    is refused unless ``replace=True``."""
    key = name.lower()
    if not key or key != key.strip() or "," in key:
        raise ValueError(f"criterion name must be a non-empty word without commas; got {name!r}")
    if key in _REGISTRY and not replace:
        raise ValueError(f"criterion {key!r} is registered already (pass replace=True to replace it)")
    entry = Entry(key, factory, dict(options), summary)
    _REGISTRY[key] = entry
    return entry


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (e.g. a criterion registered by a test)."""
    entry(name)  # a clear error for an unknown name
    del _REGISTRY[name.lower()]


def entry(name: str) -> Entry:
    """The registry entry of ``name`` (ValueError listing the names if there is none)."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown criterion {name!r}; choose from {', '.join(_REGISTRY)} or pass a callable") from None


def names(*, layerwise: bool | None = None) -> tuple[str, ...]:
    """Registered names in registration order (``layerwise=True``: those the LLM loop can use)."""
    return tuple(n for n, e in _REGISTRY.items() if layerwise is None or e.layerwise == layerwise)


def get(spec: CriterionLike, *, loss_fn=None, seed: int = 0) -> Criterion:
    """A :class:`Criterion` from a registered name, an instance or a ``(name, module) -> scores`` callable."""
    if isinstance(spec, Criterion):
        return spec
    if isinstance(spec, str):
        return entry(spec).make(loss_fn=loss_fn, seed=seed)
    if callable(spec):
        return Custom(spec)
    raise TypeError(f"criterion must be a name, a Criterion or a callable, got {type(spec).__name__}")


# the registry: one line per criterion (or variant)
register("magnitude", Magnitude, summary="|W|")
register("wanda", Wanda, summary="|W| * ||X_j||_2 over the calibration tokens (Sun et al., 2023)")
register("wanda-clip", Wanda, norm="clip", clip=4.0,
         summary="Wanda with each input norm clipped at 4x the layer's median norm (outlier features capped)")
register("wanda-sqrt", Wanda, norm="sqrt", summary="|W| * sqrt(||X_j||_2) (outlier features damped)")
register("taylor", Taylor, summary="|W * dL/dW| accumulated over the calibration batches (needs a loss)")
register("gradient", Gradient, summary="|dL/dW| accumulated over the calibration batches (needs a loss)")
register("random", Random, summary="seeded uniform scores (a baseline)")
