"""Peak memory of a block of code, for run reports.

On CUDA the allocator's own peak (``torch.cuda.max_memory_allocated``) is used. On CPU
PyTorch's allocations are invisible to ``tracemalloc``, so the process's resident set size
(RSS) is sampled in a background thread (``/proc/self/statm`` on Linux, every 20 ms) and the
peak during the block is reported, together with the RSS at its start (the model and anything
else already held) and the process-lifetime maximum from ``resource.getrusage``.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """Current resident set size of this process (``None`` where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        try:
            import psutil  # type: ignore[import-not-found]

            return int(psutil.Process().memory_info().rss)
        except Exception:  # pragma: no cover - neither /proc nor psutil
            return None


def max_rss_bytes() -> int | None:
    """Process-lifetime peak RSS (``resource.getrusage``; KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakMemory:
    """Context manager measuring peak memory; read :attr:`result` afterwards.

    ``device``: a CUDA device also reports ``cuda_peak_bytes`` (the allocator's peak over the
    block, after resetting its counter on entry).
    """

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.02) -> None:
        self.device = torch.device(device) if device is not None else None
        self.interval = interval
        self.result: dict[str, Any] = {}
        self._stop = threading.Event()
        self._peak = 0
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            r = rss_bytes()
            if r is not None and r > self._peak:
                self._peak = r

    def __enter__(self) -> "PeakMemory":
        self._start = rss_bytes()
        self._peak = self._start or 0
        self._t0 = time.perf_counter()
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, name="emprune-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        end = rss_bytes()
        if end is not None:
            self._peak = max(self._peak, end)
        res: dict[str, Any] = {
            "method": "RSS sampled every %g s (/proc/self/statm)" % self.interval if self._start is not None
            else "unavailable",
            "start_rss_bytes": self._start,
            "peak_rss_bytes": self._peak if self._start is not None else None,
            "peak_extra_bytes": (self._peak - self._start) if self._start is not None else None,
            "process_max_rss_bytes": max_rss_bytes(),
        }
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            res["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            res["cuda_start_bytes"] = int(self._cuda_start)
            res["method"] = "torch.cuda.max_memory_allocated (+ host RSS)"
        self.result = res


def fmt_bytes(n: int | None) -> str:
    """``1.23 GB`` style (decimal units); ``-`` for unknown."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
