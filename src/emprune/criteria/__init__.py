"""Importance criteria: one small module each (see :mod:`.base` for the protocol), and the one
registry (:mod:`.registry`) every entry point reads: ``emprune.prune``, ``prune_lm``, ``count_by``,
``emprune.shrink`` (unit level), the CLI choices and ``emprune compare``.

Adding a criterion is one module (a :class:`Criterion` subclass, or a unit score function) and
one line here, or in your own code::

    emprune.criteria.register("l1-row", MyCriterion, summary="...")
    emprune.criteria.register("my-unit", fn, level="unit", needs="activations")

Its capabilities (``needs_calibration``, ``layerwise``) are read from the criterion itself.
"""
from __future__ import annotations

from typing import Callable, Union

from torch import Tensor, nn

from . import unit_scores as _unit
from .base import Criterion, Custom, run_model
from .magnitude import Magnitude
from .random import Random
from .registry import Entry, UnitScore, entry, get, names, register, unregister
from .taylor import Gradient, Taylor
from .unit_scores import UnitStats, collect, unit_scores
from .wanda import InputNorms, Wanda

CriterionLike = Union[str, Criterion, Callable[[str, nn.Module], Tensor]]

__all__ = ["Criterion", "Custom", "Magnitude", "Wanda", "InputNorms", "Taylor", "Gradient", "Random",
           "Entry", "UnitScore", "register", "unregister", "get", "entry", "names", "CriterionLike", "run_model",
           "UnitStats", "collect", "unit_scores"]

# the registry: one line per criterion (or variant); weight level first
register("magnitude", Magnitude, summary="|W|")
register("wanda", Wanda, summary="|W| * ||X_j||_2 over the calibration tokens (Sun et al., 2023)")
register("wanda-clip", Wanda, norm="clip", clip=4.0,
         summary="Wanda with each input norm clipped at 4x the layer's median norm (outlier features capped)")
register("wanda-sqrt", Wanda, norm="sqrt", summary="|W| * sqrt(||X_j||_2) (outlier features damped)")
register("taylor", Taylor, summary="|W * dL/dW| accumulated over the calibration batches (needs a loss)")
register("gradient", Gradient, summary="|dL/dW| accumulated over the calibration batches (needs a loss)")
register("random", Random, summary="seeded uniform scores (a baseline)")
# unit level: one score per structural unit (emprune.shrink)
register("magnitude", _unit.magnitude, level="unit", needs=None,
         summary="L2 norm of the unit's weights (KAN nodes: max mean |spline coef| in / out)")
register("activation", _unit.activation, level="unit", needs="activations",
         summary="||X_unit|| * ||W_out[:, unit]|| (Wanda-sp)")
register("fluctuation", _unit.fluctuation, level="unit", needs="activations",
         summary="FLAP: Var(X) * ||W_out||^2 summed over the unit's features")
register("taylor", _unit.taylor, level="unit", needs="gradients",
         summary="|sum dL/dX * X| over tokens and the unit's features")
