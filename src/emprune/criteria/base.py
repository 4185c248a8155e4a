"""The criterion protocol: how the entries of a weight are scored.

A criterion turns ``(name, module)`` into a score tensor shaped like ``module.weight``. Its
lifecycle, the same wherever it is used:

1. collect: :meth:`Criterion.prepare` runs the calibration batches through the model once
   (``emprune.prune``); criteria whose statistics come from forward hooks on the targets
   (Wanda's input norms) expose those hooks as :meth:`Criterion.observe`, so the layer-wise LLM
   loop can gather them block by block instead;
2. score: ``criterion(name, module)``, on demand and possibly more than once (the global
   scope streams over the targets twice), so ``__call__`` must be cheap and pure;
3. release: :meth:`Criterion.release` drops the statistics of some targets, or of all.

Capabilities are class attributes: ``needs_calibration`` (scores need data) and
:attr:`Criterion.layerwise` (usable in the layer-wise LLM loop: data-free, or fed by
:meth:`Criterion.observe`). A new criterion is one module plus one line in
:mod:`emprune.criteria`'s registry (:func:`emprune.criteria.register`).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from functools import partial
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

    def observe(self, targets: Mapping[str, nn.Module]) -> AbstractContextManager[None]:
        """Forward hooks on ``targets`` gathering this criterion's statistics while the caller
        runs data through them, removed on exit (default: none, nothing to gather)."""
        return nullcontext()

    @property
    def layerwise(self) -> bool:
        """Usable in the layer-wise LLM loop: data-free, or its statistics come from
        :meth:`observe` hooks (not from a loss over the whole model, like Taylor's)."""
        return not self.needs_calibration or type(self).observe is not Criterion.observe

    @property
    def prepared(self) -> bool:
        """Whether the statistics the scores need are there (always, for data-free criteria)."""
        return not self.needs_calibration

    def __call__(self, name: str, module: nn.Module) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def release(self, names: Iterable[str] | None = None) -> None:
        """Free collected statistics: of the targets ``names``, or all of them (default)."""

    def options(self) -> dict[str, Any]:
        """The settings that shape the scores (two criteria of one type with equal options
        score alike; see :meth:`same_as`)."""
        return {}

    def same_as(self, other: object) -> bool:
        """Whether ``other`` gives the same scores from the same data (then it is scored once)."""
        return type(other) is type(self) and other.options() == self.options()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


class Custom(Criterion):
    """Wraps a user callable ``(name, module) -> score tensor`` shaped like the weight."""

    def __init__(self, fn: Callable[[str, nn.Module], Tensor], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def options(self) -> dict[str, Any]:
        return {"fn": self.fn}

    def __call__(self, name: str, module: nn.Module) -> Tensor:
        s = self.fn(name, module)
        w = weight_of(module, name)
        if not isinstance(s, Tensor) or s.shape != w.shape:
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"criterion {self.name!r} returned {got} for {name}, expected a tensor "
                             f"of the weight's shape {tuple(w.shape)}")
        return s.detach()


class TargetStats:
    """Statistics of target modules gathered by forward hooks, one entry per target name in
    :attr:`data` (subclasses fill it in :meth:`add`): the shared mechanics of Wanda's input norms
    and the OBS update's input Hessians (hook while observing, list what is missing, drop)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    @contextmanager
    def observe(self, targets: Mapping[str, nn.Module]) -> Iterator[None]:
        """Hook ``targets`` (name -> module) for the duration of the ``with`` block."""
        self.check_targets(targets)
        handles = [mod.register_forward_hook(partial(self.add, name)) for name, mod in targets.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.after_observe()

    def check_targets(self, targets: Mapping[str, nn.Module]) -> None:
        """Refuse targets these statistics cannot be gathered for (default: none)."""

    def after_observe(self) -> None:
        """Called when the hooks are removed (default: nothing)."""

    def add(self, name: str, module: nn.Module, inputs: tuple, output: object) -> None:  # pragma: no cover
        raise NotImplementedError

    def missing(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` no input was seen for."""
        return [n for n in names if n not in self.data]

    def drop(self, names: Iterable[str] | None = None) -> None:
        """Forget the statistics of ``names`` (all when None)."""
        if names is None:
            self.data = {}
        for n in names or ():
            self.data.pop(n, None)
