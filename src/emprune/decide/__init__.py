"""Decide: how many units each target keeps, and which.

* :mod:`.scopes`: the one decision funnel, :func:`decide` (targets -> :class:`Decision` with the
  counts, the mask, N_eff and the retained score mass with its bound), for masks and for unit
  groups alike;
* :mod:`.recipes`: the one registry of recipes (where the counts come from, how they are
  allocated, what else is done) for both jobs;
* :mod:`.allocate`: allocators that move a total between targets (fixed sizes, measured
  sensitivity, normalised scores), OWL's per-layer sparsities, N:M patterns, beta for a fraction;
* :mod:`.sensitivity`: the measured loss increase of each unit group, which the sensitivity
  allocation reads.
"""
from .allocate import BySensitivity, ByNormalisedScores, FixedSize
from .recipes import RECIPES, Recipe, get_recipe
from .scopes import SCOPES, Decision, Target, check_options, decide

__all__ = ["Target", "Decision", "decide", "check_options", "SCOPES", "Recipe", "RECIPES", "get_recipe",
           "FixedSize", "BySensitivity", "ByNormalisedScores"]
