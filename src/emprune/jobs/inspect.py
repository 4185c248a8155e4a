"""``inspect``: EMP on the magnitudes of a checkpoint's tensors, without the model's class."""
from __future__ import annotations

import re
import time

from ..act.report import PruneReport, count_zeros
from ..decide.scopes import Target, decide
from ..models.io import load_state_dict


def inspect_checkpoint(path: str, beta: float = 1.0, scope: str = "row", *, sparsity: float | None = None,
                       include: str | None = None, exclude: str | None = None,
                       min_keep: float | int | None = None) -> PruneReport:
    """EMP on the magnitudes of a checkpoint's weight tensors (2-D and up, floating point):
    what would be kept, without needing the model's class.  Nothing is written."""
    start = time.perf_counter()
    sd = load_state_dict(path)
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    tensors = {k: v for k, v in sd.items() if v.dim() >= 2 and v.is_floating_point()
               and (inc is None or inc.search(k)) and (exc is None or not exc.search(k))}
    if not tensors:
        raise ValueError(f"{path}: no floating-point tensors with 2 or more dims matched")
    targets = [Target(k, v.shape, (lambda v=v: v)) for k, v in tensors.items()]
    report = PruneReport.for_run("magnitude", "magnitude", scope, beta=beta, sparsity=sparsity, min_keep=min_keep)
    for d in decide(targets, scope, beta, sparsity=sparsity, min_keep=min_keep):  # type: ignore[arg-type]
        report.add(d, count_zeros(d.mask & (tensors[d.name] != 0)))
    report.seconds = time.perf_counter() - start
    return report
