"""Speed and memory of the EMP rule at LLM scale, as ratios against baselines in the same run.

Cases (each in a fresh subprocess, so that peak memory is its own):
  row-fp32 / row-bf16  keep_mask(W.abs(), dim=1) on an 11008 x 4096 matrix, against
                       W.clone() (the memory-traffic floor) and the authors' sort-based
                       reference (argsort per row + scatter); masks compared.
  global-1b            one EMP decision over >= 1 B scores held as many tensors (LLaMA-7B
                       MLP shapes): global_threshold + global_masks (each mask dropped as
                       made), against one clone() pass over every tensor.
  prune-row / -layer / -global
                       emprune.prune(model, "magnitude", scope, permanent=True) on LLaMA-7B
                       MLP shapes (two blocks: 271 M weights), end to end, against one clone()
                       pass over the weights.

Peak memory: on CPU the resident-set high-water mark (VmHWM, reset just before the call) above
the resident set once the inputs existed; on CUDA torch.cuda.max_memory_allocated above the
inputs.

    python benchmarks/bench_rule.py [--quick] [--device cpu|cuda] [--json OUT] [--md OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_rss_peak() -> bool:
    """Reset the resident-set high-water mark (Linux >= 4.0), so a peak is the code's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_peak_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_now_mb() -> float:
    now = _status_mb("VmRSS")
    return now if now is not None else rss_peak_mb()


class Peak:
    """Peak extra memory (MB) of the code run inside, above what was held on entry."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> "Peak":
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            import gc

            gc.collect()
            reset_rss_peak()
            self.base = rss_now_mb()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20 - self.base
        else:
            self.mb = max(0.0, rss_peak_mb() - self.base)


def timed(fn, device: str, repeat: int) -> float:
    """Median wall time of ``fn`` over ``repeat`` runs (after one warm-up)."""
    fn()
    ts = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def reference_row_mask(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The authors' approach: sort every row, scatter the first k (a stable sort, so that
    ties go to the lower index as in emprune and the masks can be compared exactly)."""
    order = torch.sort(x, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(x.shape[1], device=x.device).expand_as(x)
    return torch.zeros_like(x, dtype=torch.bool).scatter_(1, order, ranks < k[:, None])


def case_row(dtype: torch.dtype, device: str, quick: bool, repeat: int) -> dict:
    import emprune
    from emprune.core import kernels

    rows, cols = (2752, 4096) if quick else (11008, 4096)
    g = torch.Generator().manual_seed(0)
    x = torch.empty(rows, cols).normal_(generator=g).abs_().to(dtype).to(device)
    t_clone = timed(lambda: x.clone(), device, repeat)
    emprune.keep_mask(x[:8], dim=1)  # warm-up (loads the compiled kernel) outside the peak
    with Peak(device) as pk:
        mask = emprune.keep_mask(x, dim=1)
    t_ours = timed(lambda: emprune.keep_mask(x, dim=1), device, repeat)
    k = emprune.keep_count(x, dim=1)
    # kept counts must equal a float64 computation of floor(N_eff)
    x64 = x.double()
    k64 = torch.floor((x64.sum(1) ** 2 / (x64 * x64).sum(1)) * (1 + 2.0**-48)).clamp(1, cols).long()
    del x64
    t_ref = timed(lambda: reference_row_mask(x, k), device, max(1, repeat // 2))
    ref = reference_row_mask(x, k)
    ties = int((x.float().sort(1).values.diff(1) == 0).any(1).sum())
    return {
        "case": f"row-{str(dtype).split('.')[-1]}", "shape": [rows, cols], "device": device,
        "ours_s": t_ours, "reference_s": t_ref, "clone_s": t_clone,
        "ours_over_clone": t_ours / t_clone, "reference_over_ours": t_ref / t_ours,
        "peak_extra_mb": pk.mb, "input_mb": x.numel() * x.element_size() / 2**20,
        "counts_equal_float64": bool(torch.equal(k.cpu(), k64.cpu())),
        "exact_counts": bool(torch.equal(mask.sum(1), k)),
        "mask_equal_reference": bool(torch.equal(mask, ref)),
        "rows_with_ties": ties,
        "path": "numba kernel" if kernels.usable(x) else "pytorch",
        "targets": {"ours_over_clone_max": 4.0, "reference_over_ours_min": 10.0},
    }


def case_global(device: str, quick: bool, repeat: int) -> dict:
    import emprune

    g = torch.Generator().manual_seed(0)
    shapes = [(11008, 4096), (11008, 4096), (4096, 11008)] * (1 if quick else 8)  # 8 LLaMA-7B MLPs
    ts = [torch.empty(s).normal_(generator=g).to(device) for s in shapes]
    n = sum(t.numel() for t in ts)
    largest_mb = max(t.numel() * t.element_size() for t in ts) / 2**20

    def clone_pass() -> None:
        for t in ts:
            t.clone()

    def ours() -> int:
        thr = emprune.global_threshold(ts)
        kept = 0
        for m in emprune.global_masks(ts, thr):
            kept += int(torch.count_nonzero(m))  # m.sum() would make an int64 copy
        return kept

    t_clone = timed(clone_pass, device, repeat)
    emprune.global_threshold([t[:8] for t in ts])  # warm-up outside the peak
    with Peak(device) as pk:
        kept = ours()
    t_ours = timed(ours, device, max(1, repeat // 2))
    thr = emprune.global_threshold(ts)
    return {
        "case": "global-1b" if not quick else "global-135m", "tensors": len(ts), "scores": n, "device": device,
        "ours_s": t_ours, "clone_s": t_clone, "ours_over_clone": t_ours / t_clone,
        "peak_extra_mb": pk.mb, "largest_tensor_mb": largest_mb, "peak_over_largest": pk.mb / largest_mb,
        "model_mb": n * 4 / 2**20, "kept": kept, "k": thr.k, "exact_count": kept == thr.k,
        "n_eff_over_n": thr.n_eff / n,
        "targets": {"ours_over_clone_max": 6.0, "peak_over_largest_max": 2.0},
    }


def case_prune(scope: str, device: str, quick: bool, repeat: int) -> dict:
    """emprune.prune(model, "magnitude", scope, permanent=True) on LLaMA-7B MLP shapes (one
    block quick, two otherwise), end to end: scores, N_eff, selection, masks applied, report."""
    import emprune
    from emprune.act.report import count_zeros

    torch.manual_seed(0)
    blocks = 1 if quick else 2
    model = torch.nn.ModuleDict({
        f"{p}{i}": torch.nn.Linear(*shape, bias=False)
        for i in range(blocks) for p, shape in (("gate", (4096, 11008)), ("up", (4096, 11008)), ("down", (11008, 4096)))
    }).to(device)
    ws = [p.detach() for p in model.parameters()]
    n = sum(w.numel() for w in ws)
    largest_mb = max(w.numel() * w.element_size() for w in ws) / 2**20
    t_clone = timed(lambda: [w.clone() for w in ws], device, repeat)
    emprune.prune(torch.nn.Linear(64, 64), "magnitude", scope)  # warm-up outside the peak
    with Peak(device) as pk:
        t0 = time.perf_counter()
        rep = emprune.prune(model, "magnitude", scope, permanent=True)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter() - t0
    zeros = sum(count_zeros(w) for w in ws)
    return {"case": f"prune-{scope}-{n // 10**6}m", "scope": scope, "weights": n, "device": device,
            "seconds": t, "clone_s": t_clone, "ours_over_clone": t / t_clone,
            "peak_extra_mb": pk.mb, "largest_tensor_mb": largest_mb, "peak_over_largest": pk.mb / largest_mb,
            "sparsity": rep.sparsity, "report_matches_weights": zeros == round(rep.sparsity * n),
            "bound_ok": rep.bound_ok,
            "global_neff": rep.global_neff, "mass": rep.global_mass, "bound": rep.global_bound}


def _pytorch_only(fn):
    """Run a case with the compiled kernel disabled (the pure PyTorch fallback)."""
    def run(d, q, r):
        from emprune.core import kernels as _kernels

        _kernels.AVAILABLE = False
        res = fn(d, q, r)
        res["case"] += "-pytorch"
        return res
    return run


CASES = {
    "row-fp32": lambda d, q, r: case_row(torch.float32, d, q, r),
    "row-bf16": lambda d, q, r: case_row(torch.bfloat16, d, q, r),
    "row-fp32-pytorch": _pytorch_only(lambda d, q, r: case_row(torch.float32, d, q, r)),
    "row-bf16-pytorch": _pytorch_only(lambda d, q, r: case_row(torch.bfloat16, d, q, r)),
    "global": case_global,
    "prune-row": lambda d, q, r: case_prune("row", d, q, r),
    "prune-layer": lambda d, q, r: case_prune("layer", d, q, r),
    "prune-global": lambda d, q, r: case_prune("global", d, q, r),
}


def _met(r: dict) -> str:
    """"yes" when every target of a case holds (and its answer is right), else what missed."""
    t = r["targets"]
    missed = [f"{key} {r[key]:.2f} > {t[key + '_max']}" for key in ("ours_over_clone", "peak_over_largest")
              if key + "_max" in t and r[key] > t[key + "_max"]]
    missed += [f"{key} {r[key]:.1f} < {t[key + '_min']}" for key in ("reference_over_ours",)
               if key + "_min" in t and r[key] < t[key + "_min"]]
    if not (r.get("mask_equal_reference", True) and r.get("exact_count", True) and r.get("exact_counts", True)
            and r.get("counts_equal_float64", True)):
        missed.append("wrong answer")
    return "yes" if not missed else "no: " + ", ".join(missed)


def _prune_mass(r: dict) -> str:
    if r["mass"] is not None:
        return f"{r['mass']:.4f} >= {r['bound']:.4f}"
    return "True (every unit)" if r["bound_ok"] else "False"


# one table per kind of case: (title, case-name prefix, [(column, cell of a result), ...])
TABLES = [
    ("Per-row keep_mask (11008 x 4096)", "row", [
        ("case", lambda r: r["case"]), ("path", lambda r: r["path"]),
        ("ours (ms)", lambda r: f"{1e3 * r['ours_s']:.1f}"), ("clone (ms)", lambda r: f"{1e3 * r['clone_s']:.1f}"),
        ("sort ref (ms)", lambda r: f"{1e3 * r['reference_s']:.1f}"),
        ("ours / clone (target <= 4)", lambda r: f"{r['ours_over_clone']:.2f}"),
        ("ref / ours (target >= 10)", lambda r: f"{r['reference_over_ours']:.1f}"),
        ("peak extra (MB)", lambda r: f"{r['peak_extra_mb']:.0f}"), ("input (MB)", lambda r: f"{r['input_mb']:.0f}"),
        ("counts = float64", lambda r: r["counts_equal_float64"]), ("mask = ref", lambda r: r["mask_equal_reference"]),
        ("rows with ties", lambda r: r["rows_with_ties"]), ("targets met", _met)]),
    ("Global scope over many tensors", "global", [
        ("case", lambda r: r["case"]), ("tensors", lambda r: r["tensors"]), ("scores", lambda r: f"{r['scores']:,}"),
        ("ours (s)", lambda r: f"{r['ours_s']:.2f}"), ("clone pass (s)", lambda r: f"{r['clone_s']:.2f}"),
        ("ours / clone (target <= 6)", lambda r: f"{r['ours_over_clone']:.2f}"),
        ("peak extra (MB)", lambda r: f"{r['peak_extra_mb']:.0f}"),
        ("largest tensor (MB)", lambda r: f"{r['largest_tensor_mb']:.0f}"),
        ("peak / largest (target <= 2)", lambda r: f"{r['peak_over_largest']:.2f}"),
        ("model (MB)", lambda r: f"{r['model_mb']:.0f}"), ("exact count", lambda r: r["exact_count"]),
        ("targets met", _met)]),
    ("emprune.prune(model, \"magnitude\", scope, permanent=True), end to end (LLaMA-7B MLP shapes)", "prune", [
        ("case", lambda r: r["case"]), ("weights", lambda r: f"{r['weights']:,}"),
        ("seconds", lambda r: f"{r['seconds']:.2f}"), ("clone pass (s)", lambda r: f"{r['clone_s']:.3f}"),
        ("ours / clone", lambda r: f"{r['ours_over_clone']:.1f}"),
        ("peak extra (MB)", lambda r: f"{r['peak_extra_mb']:.0f}"),
        ("largest tensor (MB)", lambda r: f"{r['largest_tensor_mb']:.0f}"),
        ("peak / largest", lambda r: f"{r['peak_over_largest']:.2f}"),
        ("sparsity", lambda r: f"{100 * r['sparsity']:.2f}%"),
        ("report = weights", lambda r: r["report_matches_weights"]), ("mass >= bound", _prune_mass)]),
]


def to_markdown(results: list[dict], cmd: str, env: dict) -> str:
    lines = ["# EMP rule: speed and memory", "", f"Command: `{cmd}`", "",
             f"Machine: {env['machine']}; torch {env['torch']}; threads {env['threads']}; device {env['device']}"]
    for title, prefix, cols in TABLES:
        lines += ["", f"## {title}", "", "| " + " | ".join(c for c, _ in cols) + " |", "|---" * len(cols) + "|"]
        lines += ["| " + " | ".join(str(cell(r)) for _, cell in cols) + " |"
                  for r in results if r["case"].startswith(prefix)]
    lines += ["", "Times are medians of repeated runs in one process; each case ran in its own process so that "
              "its peak memory is its own (CPU: resident-set high-water mark, reset before the call, above "
              "the resident set holding the inputs; the result itself, e.g. a bool mask, is included).", "",
              "Paths: on CPU the per-row rule runs the compiled numba kernel when numba is installed "
              "(`pip install emprune[fast]`; the test script installs it) and falls back to the pure-PyTorch "
              "engine otherwise; the `-pytorch` rows force that fallback (the same engine runs on CUDA "
              "tensors). Both give the same masks; the targets are stated for the default path."]
    if env["device"] == "cpu":
        lines += ["", "No CUDA figures here: this machine has no GPU. On one, run the same command with "
                  "`--device cuda` (peak memory is then torch.cuda.max_memory_allocated)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--json", default=None, help="write results JSON here")
    ap.add_argument("--md", default=None, help="write a markdown table here")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case
    a = ap.parse_args()
    if a.case:
        r = CASES[a.case](a.device, a.quick, a.repeat)
        print("RESULT " + json.dumps(r))
        return 0
    results = []
    for name in a.cases.split(","):
        cmd = [sys.executable, __file__, "--case", name, "--device", a.device, "--repeat", str(a.repeat)]
        if a.quick:
            cmd.append("--quick")
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if out.returncode != 0:
            print(out.stdout, out.stderr, file=sys.stderr)
            return 1
        r = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
        results.append(r)
        print(json.dumps(r, indent=None))
    env = {"machine": f"{platform.machine()}, {os.cpu_count()} cores" + (
        f", {torch.cuda.get_device_name(0)}" if a.device == "cuda" else ""),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": a.device}
    cmdline = "python benchmarks/bench_rule.py " + " ".join(sys.argv[1:])
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"command": cmdline, "env": env, "results": results}, indent=2))
    md = to_markdown(results, cmdline, env)
    if a.md:
        Path(a.md).parent.mkdir(parents=True, exist_ok=True)
        Path(a.md).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
