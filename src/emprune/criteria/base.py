"""The criterion protocol: how the entries of a weight are scored.

A criterion turns ``(name, module)`` into a score tensor shaped like ``module.weight``.
Criteria that need data (Wanda, Taylor) collect it in :meth:`Criterion.prepare`, which the
pruner calls once with the model, its targets and the calibration batches, and drop it in
:meth:`Criterion.release`.  Scores are computed on demand (and may be asked for more than
once, e.g. by the global scope's streaming passes), so ``__call__`` must be cheap and pure.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from torch import Tensor, nn

Batch = Any  # a Tensor (model(x)), a tuple/list (model(*x)) or a mapping (model(**x))


def run_model(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` on one calibration batch, whatever its container."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def weight_of(module: nn.Module, name: str = "") -> Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, Tensor):
        raise TypeError(f"{name or type(module).__name__} has no weight tensor to score")
    return w.detach()


class Criterion:
    """Base class: subclasses set ``name`` and implement ``__call__``."""

    name: str = "criterion"
    needs_calibration: bool = False

    def prepare(self, model: nn.Module, targets: Mapping[str, nn.Module],
                calibration: Iterable[Batch] | None) -> None:
        """Collect whatever the scores need (default: nothing)."""
        if self.needs_calibration and calibration is None:
            raise ValueError(f"criterion {self.name!r} needs calibration batches (calibration=...)")

    @property
    def prepared(self) -> bool:
        """Whether the statistics the scores need are there (always, for data-free criteria)."""
        return not self.needs_calibration

    def __call__(self, name: str, module: nn.Module) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def release(self) -> None:
        """Free collected statistics."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Custom(Criterion):
    """Wraps a user callable ``(name, module) -> score tensor`` shaped like the weight."""

    def __init__(self, fn: Callable[[str, nn.Module], Tensor], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def __call__(self, name: str, module: nn.Module) -> Tensor:
        s = self.fn(name, module)
        w = weight_of(module, name)
        if not isinstance(s, Tensor) or s.shape != w.shape:
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"criterion {self.name!r} returned {got} for {name}, expected a tensor "
                             f"of the weight's shape {tuple(w.shape)}")
        return s.detach()
