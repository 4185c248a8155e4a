"""Run a GGUF file in llama.cpp itself (llama-cpp-python, the ``deploy`` extra): logits of a
token sequence and perplexity over windows, for checking an export against PyTorch on the same
tokens and for ``emprune eval --runtime llama.cpp``.

The context keeps its KV cache in float32 (llama.cpp's default is f16, whose rounding alone
moves logits by ~1e-2) and asks for the logits of every position.
"""
from __future__ import annotations

import importlib.util
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

#: how to get llama.cpp's Python binding (llama-cpp-python)
DEPLOY_HINT = "pip install 'emprune[deploy]'"


def llama_cpp_module(why: str, missing: str | None = None) -> Any:
    """``import llama_cpp``, or ``ValueError`` with one line: ``missing`` (default: ``why`` needs
    the binding and how to install it) when it is not installed, another when it is installed
    but does not import (a missing shared library)."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise ValueError(missing or f"{why} needs llama.cpp's Python binding: {DEPLOY_HINT} (llama-cpp-python; "
                                    "it builds llama.cpp, about 5 minutes)")
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        raise ValueError(f"{why}: llama-cpp-python is installed but does not import ({e}); reinstall it: "
                         f"{DEPLOY_HINT}") from None
    return llama_cpp


@contextmanager
def open_gguf(path: str | os.PathLike, n_ctx: int, threads: int = 1, all_logits: bool = True) -> Iterator[Any]:
    """A ``llama_cpp.Llama`` over ``path`` with ``n_ctx`` positions, float32 KV cache, closed on exit."""
    llama_cpp = llama_cpp_module("running a GGUF in llama.cpp")
    f32 = 0  # GGML_TYPE_F32
    llm = llama_cpp.Llama(str(Path(path)), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                          n_threads_batch=threads, logits_all=all_logits, type_k=f32, type_v=f32,
                          flash_attn=False, verbose=False, seed=0)
    try:
        yield llm
    finally:
        llm.close()


def logits(path: str | os.PathLike, tokens: Sequence[int], threads: int = 1) -> np.ndarray:
    """``[len(tokens), vocab]`` float32 logits of ``tokens`` (one sequence from position 0)."""
    with open_gguf(path, max(len(tokens), 8), threads) as llm:
        return _window_logits(llm, tokens)


def _window_logits(llm: Any, tokens: Sequence[int]) -> np.ndarray:
    llm.reset()
    _clear(llm)
    llm.eval(list(int(t) for t in tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32, copy=True)


def _clear(llm: Any) -> None:
    """Empty the context's memory (KV cache) so that the next window starts at position 0."""
    llama_cpp = llama_cpp_module("running a GGUF in llama.cpp")
    mem = llama_cpp.llama_get_memory(llm.ctx) if hasattr(llama_cpp, "llama_get_memory") else None
    if mem is not None:
        llama_cpp.llama_memory_clear(mem, True)


def perplexity(path: str | os.PathLike, windows: np.ndarray, threads: int = 1,
               progress: bool = False) -> dict[str, Any]:
    """Perplexity of ``windows`` (``[n, seqlen]`` token ids, each scored from position 0, every
    next token counted, as emprune's PyTorch ``eval --ppl``): ``{"ppl", "nll", "tokens"}``,
    the sum of negative log-likelihoods accumulated in float64."""
    windows = np.asarray(windows)
    total, count = 0.0, 0
    rows = range(windows.shape[0])
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="llama.cpp ppl", unit="window")
    with open_gguf(path, int(windows.shape[1]), threads) as llm:
        for i in rows:
            ids = windows[i]
            lg = _window_logits(llm, ids).astype(np.float64)
            lse = np.log(np.exp(lg - lg.max(axis=1, keepdims=True)).sum(axis=1)) + lg.max(axis=1)
            nll = lse[:-1] - lg[np.arange(len(ids) - 1), ids[1:]]
            total += float(nll.sum())
            count += len(ids) - 1
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count}
