"""Old import paths (before the layered layout of 0.2), kept importable with a
``DeprecationWarning``: ``import emprune.rule`` gives :mod:`emprune.core.rule`, and so on.

Only modules that moved whole are aliased; the attributes of the old ``emprune.llm`` and
``emprune.structured`` packages that users were told about are in :data:`OLD_ATTRIBUTES`.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

#: old module -> the module it became
MOVED = {
    "emprune.rule": "emprune.core.rule",
    "emprune._select": "emprune.core.engine",
    "emprune._kernels": "emprune.core.kernels",
    "emprune.obs": "emprune.core.obs",
    "emprune.report": "emprune.act.report",
    "emprune.scopes": "emprune.decide.scopes",
    "emprune.llm.data": "emprune.models.data",
    "emprune.llm.layouts": "emprune.structure.layouts",
    "emprune.llm.calibrate": "emprune.models.layerwise",
    "emprune.llm.eval": "emprune.jobs.eval",
    "emprune.llm.heal": "emprune.jobs.heal",
    "emprune.llm.zeroshot": "emprune.jobs.zeroshot",
    "emprune.llm.compare": "emprune.jobs.compare",
    "emprune.llm.memory": "emprune.jobs.memory",
    "emprune.llm.prune": "emprune.jobs.prune_lm",
    "emprune.llm.shrink": "emprune.jobs.shrink_lm",
    "emprune.structured.units": "emprune.structure.units",
    "emprune.structured.remove": "emprune.act.remove",
    "emprune.structured.scores": "emprune.criteria.unit_scores",
    "emprune.structured.sensitivity": "emprune.decide.sensitivity",
    "emprune.structured.shrink": "emprune.jobs.shrink",
    "emprune.structured.traced": "emprune.jobs.traced",
}
#: (old package, attribute) -> (module, name) of what users were pointed at
OLD_ATTRIBUTES = {
    ("emprune.llm", "from_pretrained"): ("emprune", "from_pretrained"),
    ("emprune.llm", "load_shrunk"): ("emprune.models.checkpoint", "load_shrunk"),
    ("emprune.structured", "shrink"): ("emprune.jobs.shrink", "shrink"),
    ("emprune.structured", "shrink_traced"): ("emprune.jobs.traced", "shrink_traced"),
    ("emprune.structured", "find_groups"): ("emprune.structure.units", "find_groups"),
    ("emprune.structured", "score_units"): ("emprune.jobs.shrink", "score_units"),
}
OLD_PACKAGES = ("emprune.llm", "emprune.structured")


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} is now {new}; the old name will be removed", DeprecationWarning, stacklevel=4)


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: Any) -> ModuleType:
        _warn(spec.name, self.new)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:  # already executed under its new name
        pass


class _OldPackage(importlib.abc.Loader):
    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        name = module.__name__

        def __getattr__(attr: str) -> Any:
            if (name, attr) not in OLD_ATTRIBUTES:
                raise AttributeError(f"module {name!r} has no attribute {attr!r}")
            mod, new = OLD_ATTRIBUTES[(name, attr)]
            _warn(f"{name}.{attr}", f"{mod}.{new}")
            return getattr(importlib.import_module(mod), new)

        module.__getattr__ = __getattr__  # type: ignore[method-assign]
        module.__path__ = []  # a package: its old submodules are found by this finder


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, _Alias(MOVED[fullname]))
        if fullname in OLD_PACKAGES:
            return importlib.util.spec_from_loader(fullname, _OldPackage(), is_package=True)
        return None


def install() -> None:
    """Put the finder of old names on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
