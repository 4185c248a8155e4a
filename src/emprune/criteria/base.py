"""The criterion protocol: how the entries of a weight are scored.

A criterion turns ``(name, module)`` into a score tensor shaped like ``module.weight``.
Criteria that need data (Wanda, Taylor) collect it in :meth:`Criterion.prepare`, which the
pruner calls once with the model, its targets and the calibration batches, and drop it in
:meth:`Criterion.release`.  Scores are computed on demand (and may be asked for more than
once, e.g. by the global scope's streaming passes), so ``__call__`` must be cheap and pure.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator, Mapping

from torch import Tensor, nn

Batch = Any  # a Tensor (model(x)), a tuple/list (model(*x)) or a mapping (model(**x))

#: ``emprune.prune(inputs=...)``: batch -> model inputs, applied by :func:`run_model` while set.
#: A context variable rather than an argument so that every criterion (built-in or not) that
#: calls ``run_model`` honours it without a change to its signature.
_INPUTS: ContextVar[Callable[[Batch], Any] | None] = ContextVar("emprune_inputs", default=None)


@contextmanager
def model_inputs(fn: Callable[[Batch], Any] | None) -> Iterator[None]:
    """Within the block, :func:`run_model` feeds the model ``fn(batch)`` instead of ``batch``."""
    token = _INPUTS.set(fn)
    try:
        yield
    finally:
        _INPUTS.reset(token)


def run_model(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` on one calibration batch, whatever its container.

    The batch (or ``inputs(batch)`` inside :func:`model_inputs`) reaches the model as
    ``model(x)`` for a tensor, ``model(*x)`` for a tuple or list, ``model(**x)`` for a mapping.
    So ``(x, y)`` batches from a ``DataLoader`` call ``model(x, y)``: pass
    ``inputs=lambda b: b[0]`` to :func:`emprune.prune` to feed ``x`` alone.
    """
    fn = _INPUTS.get()
    if fn is not None:
        batch = fn(batch)
    try:
        if isinstance(batch, Mapping):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)
    except TypeError as err:
        if not isinstance(batch, (tuple, list)) or fn is not None:
            raise
        # the classic trap: a (x, y) batch unpacked into model(x, y)
        raise TypeError(f"{err}. Calibration batches reach the model as model(*batch) for a "
                        f"{type(batch).__name__} of {len(batch)}: if the batch holds targets too, "
                        "pass inputs=lambda b: b[0] to emprune.prune") from err


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
