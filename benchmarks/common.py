"""What the LLM benchmark scripts share: the repository root, the texts they measure on, and
writing a result (JSON, markdown, a picture) atomically.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path`` and
``from common import ...`` needs no path edits; emprune itself is the installed package
(``pip install -e .``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def texts(tok: Any, *, calib_samples: int, seqlen: int, eval_tokens: int, other_tokens: int, seed: int = 0,
          calib_text: str | None = None, eval_text: str | None = None,
          other_text: str = "python-docs") -> tuple[Any, Any, Any]:
    """``(calibration windows [calib_samples, seqlen], WikiText-2 test ids, other-text ids)``: the
    calibration text and the two held-out texts every LLM table reports (defaults: the texts
    shipped with emprune and the Python Language Reference)."""
    from emprune.models import data

    calib = data.calibration_batches(tok, data.load_text(calib_text, "calib"), calib_samples, seqlen, seed)
    wiki = data.eval_tokens(tok, data.load_text(eval_text, "eval"), eval_tokens)
    other = data.eval_tokens(tok, data.load_text(other_text, "eval"), other_tokens)
    return calib, wiki, other


def write_results(out: Path, doc: Any, markdown: Callable[[Any], str] | None = None,
                  plot: Callable[[Any, Path], None] | None = None) -> None:
    """``OUT.json`` (always), ``OUT.md`` (with ``markdown``) and ``OUT.png`` (with ``plot``, where
    matplotlib is installed), each written atomically."""
    from emprune.models.io import atomic_path

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
    if markdown is not None:
        with atomic_path(out.with_suffix(".md")) as tmp:
            tmp.write_text(markdown(doc))
    if plot is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    with atomic_path(out.with_suffix(".png")) as tmp:
        plot(doc, tmp)
