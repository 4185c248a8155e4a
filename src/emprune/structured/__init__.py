"""Structured EMP: remove whole neurons, attention heads, channels and KAN nodes physically.

``emprune.shrink(model, units=..., criterion=..., scope=..., beta=..., calibration=..., keep=...)``
scores structural units (:mod:`.scores`), lets EMP decide how many to keep (and, for a decoder
LM, the measured loss increase of each layer where: :mod:`.sensitivity`), removes the rest
(:mod:`.remove`, :mod:`.units`) and returns a :class:`ShrinkReport`.
"""
from .remove import compensate, keep_in, keep_out, zero_in
from .scores import NEEDS, UNIT_SCORES, UnitStats, collect, unit_scores
from .sensitivity import allocate_by_sensitivity, group_sensitivity
from .shrink import (DEFAULT_CRITERION, DEFAULT_RECIPE, DEFAULT_RECIPE_LM, DEFAULT_RECIPE_MIXED, DEFAULT_SCOPE, RECIPES,
                     GroupReport, Recipe, ShrinkReport, get_recipe, lm_batches, macs_lm, macs_plain, score_units, shrink)
from .traced import shrink_traced
from .units import (KINDS, ChainGroup, HeadGroup, KANGroup, MLPGroup, UnitGroup, chain_groups, find_groups,
                    head_keep_mask, llm_groups)

__all__ = [
    "shrink", "shrink_traced", "score_units", "ShrinkReport", "GroupReport", "Recipe", "RECIPES", "get_recipe",
    "DEFAULT_RECIPE", "DEFAULT_RECIPE_LM", "DEFAULT_RECIPE_MIXED", "group_sensitivity", "allocate_by_sensitivity", "DEFAULT_SCOPE", "DEFAULT_CRITERION", "UNIT_SCORES", "NEEDS", "UnitStats", "collect",
    "unit_scores", "UnitGroup", "MLPGroup", "HeadGroup", "ChainGroup", "KANGroup", "KINDS", "find_groups",
    "llm_groups", "chain_groups", "head_keep_mask", "keep_in", "keep_out", "zero_in", "compensate",
    "macs_lm", "macs_plain", "lm_batches",
]
