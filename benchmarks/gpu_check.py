"""GPU check: the pure-PyTorch selection engine and the LLM pipeline's device paths on CUDA.

One script, run once on a machine with a GPU (CI has none), in three parts:

1. ``select``: exactness of the selection engine on CUDA against the CPU (the PyTorch path and
   the numba kernel where installed): per-row ``keep_mask`` / ``topk_mask`` (float32, bfloat16,
   float16, heavy ties), the global threshold over many tensors, and ``emprune.prune`` on a
   small MLP. Masks must be identical.
2. ``llm``: ``prune_lm`` (Wanda, default recipe, layer-wise calibration) on a randomly
   initialised LLaMA-shaped model (``--hidden``/``--layers``; random weights, so the numbers
   say nothing about quality) along every device path, same calibration tokens:
   ``cpu`` (reference), ``cuda`` (the model on the GPU), ``offload`` (the model in CPU memory,
   each block moved to the GPU for its turn: ``prune_lm(device="cuda")``, ``--offload``), and
   ``auto`` (accelerate ``device_map="auto"``, everything fitting on the GPU), plus accelerate
   CPU offload (blocks on ``meta``), which must be refused with one line. Reported: seconds,
   peak GPU memory, and the agreement of the kept counts and masks with the CPU reference
   (float32 sums differ in the last bits across devices, so a few N_eff may round differently)
   and between the GPU paths (which must agree exactly).
3. ``cli``: the same commands a user types, on a saved random model: ``emprune prune DIR
   --device cuda``, ``--device cuda --offload``, ``--device auto``, then ``emprune eval --ppl
   --device cuda`` on the outputs.

    python benchmarks/gpu_check.py --out DIR [--parts select,llm,cli] [--quick]

Writes DIR/gpu_check.json and DIR/gpu_check.md. Exit 1 if an exactness check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from emprune.core import rule  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev: torch.device, repeat: int = 3) -> tuple[Any, float]:
    """The result of ``fn()`` and the median of ``repeat`` timed calls (after one warm-up)."""
    out = fn()
    _sync(dev)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return out, sorted(times)[len(times) // 2]


# --------------------------------------------------------------------------- part 1: select


def part_select(dev: torch.device, quick: bool) -> dict[str, Any]:
    """Masks computed on ``dev`` against the CPU engine's, on the same scores."""
    g = torch.Generator().manual_seed(0)
    rows, cols = (512, 1024) if quick else (11008, 4096)
    cases: dict[str, torch.Tensor] = {
        "randn-fp32": torch.randn(rows, cols, generator=g),
        "randn-bf16": torch.randn(rows, cols, generator=g).to(torch.bfloat16),
        "randn-fp16": torch.randn(rows, cols, generator=g).to(torch.float16),
        "ties-int": torch.randint(0, 8, (rows, cols), generator=g).float(),
        "heavy-tail": torch.randn(rows, cols, generator=g).exp() ** 3,
    }
    out: dict[str, Any] = {}
    ok = True
    for name, s in cases.items():
        s_dev = s.to(dev)
        from emprune.core import kernels as _kernels

        compiled = _kernels.AVAILABLE
        ref, t_cpu = _timed(lambda: rule.keep_mask(s.abs(), dim=1), torch.device("cpu"))
        _kernels.AVAILABLE = False  # the CPU's pure-PyTorch path, the same code as on the GPU
        ref_pt, t_cpu_pt = _timed(lambda: rule.keep_mask(s.abs(), dim=1), torch.device("cpu"), repeat=1)
        _kernels.AVAILABLE = compiled
        got, t_dev = _timed(lambda: rule.keep_mask(s_dev.abs(), dim=1), dev)
        k = torch.randint(1, cols, (rows,), generator=g)
        ref_k = rule.topk_mask(s.abs(), k, dim=1)
        got_k = rule.topk_mask(s_dev.abs(), k.to(dev), dim=1)
        same = (bool(torch.equal(ref, got.cpu())) and bool(torch.equal(ref_pt, got.cpu()))
                and bool(torch.equal(ref_k, got_k.cpu())))
        ok &= same
        out[name] = {"shape": [rows, cols], "dtype": str(s.dtype), "masks_equal": same,
                     "cpu_path": "numba kernel" if compiled else "pytorch",
                     "cpu_ms": 1e3 * t_cpu, "cpu_pytorch_ms": 1e3 * t_cpu_pt, "device_ms": 1e3 * t_dev,
                     "speedup": t_cpu / t_dev, "kept": int(ref.sum())}
        print(f"select {name:11s} equal={same} cpu {1e3 * t_cpu:8.1f} ms  {dev.type} {1e3 * t_dev:7.2f} ms",
              flush=True)
    # one decision over many tensors (streamed global threshold)
    n = 4 if quick else 16
    shapes = [(rows // 2, cols), (cols, rows // 2)] * (n // 2)
    ts = [torch.randn(*sh, generator=g).abs() for sh in shapes]
    ts_dev = [t.to(dev) for t in ts]

    def glob(tensors):
        thr = rule.global_threshold(tensors)
        return [m for m in rule.global_masks(tensors, thr)]

    ref_g, t_cpu = _timed(lambda: glob(ts), torch.device("cpu"), repeat=1)
    got_g, t_dev = _timed(lambda: glob(ts_dev), dev, repeat=1)
    same = all(torch.equal(a, b.cpu()) for a, b in zip(ref_g, got_g))
    ok &= same
    out["global"] = {"tensors": n, "scores": sum(t.numel() for t in ts), "masks_equal": same,
                     "cpu_ms": 1e3 * t_cpu, "device_ms": 1e3 * t_dev, "speedup": t_cpu / t_dev}
    print(f"select global      equal={same} cpu {1e3 * t_cpu:8.1f} ms  {dev.type} {1e3 * t_dev:7.2f} ms", flush=True)
    # the public pruning call on a module
    import copy

    import emprune

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64))
    for scope in ("row", "layer", "global"):
        a = copy.deepcopy(net)
        b = copy.deepcopy(net).to(dev)
        emprune.prune(a, "magnitude", scope=scope, permanent=True)
        emprune.prune(b, "magnitude", scope=scope, permanent=True)
        same = all(torch.equal(p.cpu(), q.cpu()) for p, q in zip(a.parameters(), b.parameters()))
        ok &= same
        out[f"prune-{scope}"] = {"weights_equal": same}
        print(f"select prune-{scope:6s} weights equal={same}", flush=True)
    out["ok"] = ok
    return out


# --------------------------------------------------------------------------- part 2: llm


def _random_llama(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                      num_key_value_heads=max(hidden // 256, 1), max_position_embeddings=2048,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _weights(model) -> dict[str, torch.Tensor]:
    from emprune.structure.targets import block_targets as target_modules

    return {n: m.weight.detach().to("cpu", torch.float32) for n, m in target_modules(model, "mlp").items()}


def _agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    rows = same_rows = entries = same_entries = 0
    for n in a:
        ma, mb = a[n] != 0, b[n] != 0
        rows += ma.shape[0]
        same_rows += int((ma.sum(1) == mb.sum(1)).sum())
        entries += ma.numel()
        same_entries += int((ma == mb).sum())
    return {"rows_same_count": same_rows / rows, "mask_agreement": same_entries / entries,
            "identical": same_rows == rows and same_entries == entries}


def part_llm(dev: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    from emprune.jobs.prune_lm import prune_lm

    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, args.vocab, (args.calib_samples, args.seqlen), generator=g)
    base = _random_llama(args.hidden, args.layers, args.vocab)
    n_params = sum(p.numel() for p in base.parameters())
    print(f"llm: random LLaMA {n_params / 1e6:.0f} M parameters, calibration {tuple(calib.shape)}", flush=True)
    import copy

    runs: dict[str, Any] = {}
    weights: dict[str, dict[str, torch.Tensor]] = {}

    def run(name: str, model, device=None) -> None:
        try:
            _run(name, model, device)
        except Exception as e:  # noqa: BLE001 - one path failing must not hide the others
            import traceback

            traceback.print_exc()
            runs[name] = {"error": f"{type(e).__name__}: {e}"}

    def _run(name: str, model, device=None) -> None:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = time.perf_counter()
        res = prune_lm(model, calib, criterion="wanda", progress=False, device=device, batch_size=8)
        _sync(dev)
        secs = time.perf_counter() - t
        weights[name] = _weights(model)
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
        runs[name] = {"seconds": secs, "pruned_fraction": res.pruned_fraction, "peak_gpu_mb": peak,
                      "calibration_seconds": res.info["calibration"]["seconds"]}
        print(f"llm {name:8s} {secs:7.1f} s  pruned {res.pruned_fraction:.4f}  peak GPU {peak or 0:.0f} MB", flush=True)

    if not args.skip_cpu:
        run("cpu", copy.deepcopy(base))
    if dev.type == "cuda":
        run("cuda", copy.deepcopy(base).to(dev))
        run("offload", copy.deepcopy(base), device=dev)
        # accelerate: everything placed on the GPU by device_map="auto"
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            base.save_pretrained(tmp)
            from transformers import AutoModelForCausalLM

            try:
                m = AutoModelForCausalLM.from_pretrained(tmp, device_map="auto").eval()
                run("auto", m)
                del m
            except Exception as e:  # noqa: BLE001
                runs["auto"] = {"error": f"{type(e).__name__}: {e}"}
            # accelerate CPU offload: blocks on meta must be refused, with one line
            small = {0: f"{max(args.hidden * args.hidden * 40 // 2**20, 50)}MiB", "cpu": "64GiB"}
            where: list[str] = []
            try:
                m = AutoModelForCausalLM.from_pretrained(tmp, device_map="auto", max_memory=small).eval()
                where = sorted({str(p.device) for p in m.parameters()})
                prune_lm(m, calib, criterion="wanda", progress=False)
                runs["accelerate-cpu-offload"] = {"refused": False, "param_devices": where}
            except Exception as e:  # noqa: BLE001 - we report what happened
                runs["accelerate-cpu-offload"] = {"refused": True, "error": f"{type(e).__name__}: {e}",
                                                  "one_line": "\n" not in str(e), "param_devices": where}
            print(f"llm accelerate cpu-offload -> {runs['accelerate-cpu-offload']}", flush=True)
    ref = "cpu" if "cpu" in weights else next(iter(weights))
    agree = {k: _agreement(weights[ref], w) for k, w in weights.items() if k != ref}
    if "cuda" in weights:
        for k in ("offload", "auto"):
            if k in weights:
                agree[f"cuda~{k}"] = _agreement(weights["cuda"], weights[k])
    for k, v in agree.items():
        print(f"llm agreement {ref if '~' not in k else ''}~{k}: {v}", flush=True)
    gpu_exact = all(v["identical"] for k, v in agree.items() if k.startswith("cuda~"))
    return {"parameters": n_params, "calibration": list(calib.shape), "runs": runs,
            "agreement_reference": ref, "agreement": agree, "ok": gpu_exact}


# --------------------------------------------------------------------------- part: obs, gpt2


def part_obs(dev: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Pruning time of the OBS (SparseGPT) update against the Wanda pipeline on the same tokens,
    on the GPU: EMP counts (default recipe), then SparseGPT at 50 % and 2:4."""
    import copy

    from emprune.jobs.prune_lm import prune_lm

    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, args.vocab, (args.calib_samples, args.seqlen), generator=g)
    base = _random_llama(args.hidden, args.layers, args.vocab).to(dev)
    out: dict[str, Any] = {}
    runs = {"wanda-emp": dict(update=None), "obs-emp": dict(update="obs"), "wanda-50": dict(sparsity=0.5),
            "sparsegpt-50": dict(sparsity=0.5, update="obs"), "sparsegpt-2:4": dict(nm="2:4", update="obs")}
    for name, kw in runs.items():
        m = copy.deepcopy(base)
        _sync(dev)
        t = time.perf_counter()
        try:
            res = prune_lm(m, calib, criterion="wanda", progress=False, **kw)
            _sync(dev)
            out[name] = {"seconds": time.perf_counter() - t, "pruned_fraction": res.pruned_fraction,
                         "finite": bool(torch.isfinite(m(calib[:1].to(dev)).logits).all())}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"obs {name:14s} {out[name]}", flush=True)
        del m
    if "seconds" in out.get("obs-emp", {}) and "seconds" in out.get("wanda-emp", {}):
        out["obs_over_wanda"] = out["obs-emp"]["seconds"] / out["wanda-emp"]["seconds"]
    out["ok"] = all("error" not in v for v in out.values() if isinstance(v, dict))
    return out


def part_gpt2(dev: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """GPT-2 (Conv1D, transposed weights) pruned on the GPU, whole and block by block (--offload):
    the Conv1D views must give the same stored weights as a CPU run up to float differences."""
    import copy

    from transformers import GPT2Config, GPT2LMHeadModel

    from emprune.jobs.prune_lm import prune_lm

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=1000, n_positions=256)).eval()
    calib = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(2))
    w: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, Any] = {}
    for name in ("cpu", "cuda", "offload"):
        m = copy.deepcopy(base)
        if name == "cuda":
            m = m.to(dev)
        res = prune_lm(m, calib, criterion="wanda", sparsity=0.5, progress=False,
                       device=dev if name == "offload" else None)
        w[name] = {k: v.detach().cpu() for k, v in m.state_dict().items() if "mlp.c_fc.weight" in k}
        cols_half = all(bool(((x != 0).sum(0) == x.shape[0] // 2).all()) for x in w[name].values())
        out[name] = {"pruned_fraction": res.pruned_fraction, "each_output_unit_keeps_half": cols_half,
                     "type": type(m.transformer.h[0].mlp.c_fc).__name__}
        print(f"gpt2 {name}: {out[name]}", flush=True)
    for k in ("cuda", "offload"):
        same = sum(int((w["cpu"][n] != 0).eq(w[k][n] != 0).sum()) for n in w["cpu"])
        total = sum(x.numel() for x in w["cpu"].values())
        out[f"cpu~{k}_mask_agreement"] = same / total
    out["ok"] = all(v["each_output_unit_keeps_half"] and v["type"] == "Conv1D"
                    for k, v in out.items() if isinstance(v, dict))
    print(f"gpt2 agreement: cuda {out['cpu~cuda_mask_agreement']:.6f} offload {out['cpu~offload_mask_agreement']:.6f}",
          flush=True)
    return out


# --------------------------------------------------------------------------- part 3: cli


def part_cli(dev: torch.device, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The user's commands on a saved random model with a real tokenizer (``--tokenizer``)."""
    from transformers import AutoTokenizer

    model_dir = work / "random-llama"
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    m = _random_llama(args.hidden, args.layers, len(tok))
    m.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    base = [sys.executable, "-m", "emprune"]
    small = ["--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen), "--quiet"]
    dv = "cuda" if dev.type == "cuda" else "cpu"
    cmds = {
        "prune-cuda": base + ["prune", str(model_dir), "--device", dv, "--out", str(work / "o-cuda")] + small,
        "prune-offload": base + ["prune", str(model_dir), "--device", dv, "--offload", "--out", str(work / "o-off")]
        + small,
        "prune-auto": base + ["prune", str(model_dir), "--device", "auto", "--out", str(work / "o-auto")] + small,
        "eval-cuda": base + ["eval", str(work / "o-cuda"), "--ppl", "--device", dv, "--eval-tokens", "8192",
                             "--seqlen", str(args.seqlen), "--quiet", "--json", str(work / "eval.json")],
    }
    if dev.type != "cuda":
        cmds.pop("prune-offload")
        cmds.pop("prune-auto")
    out: dict[str, Any] = {}
    for name, cmd in cmds.items():
        t = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        secs = time.perf_counter() - t
        out[name] = {"command": shlex.join(["emprune"] + cmd[3:]).replace(str(work), "W"), "rc": p.returncode,
                     "seconds": secs, "stdout_tail": p.stdout[-600:], "stderr_tail": p.stderr[-600:]}
        print(f"cli {name}: rc={p.returncode} {secs:.1f} s\n  {p.stdout.strip()[-300:]}\n  {p.stderr.strip()[-300:]}",
              flush=True)
    # the three outputs must hold the same pruned weights (same device arithmetic for cuda/offload)
    if dev.type == "cuda" and all(out[k]["rc"] == 0 for k in ("prune-cuda", "prune-offload", "prune-auto")):
        from safetensors.torch import load_file

        def load(d: str) -> dict[str, torch.Tensor]:
            ws: dict[str, torch.Tensor] = {}
            for f in sorted((work / d).glob("*.safetensors")):
                ws.update({k: v for k, v in load_file(f).items() if ".mlp." in k})
            return ws

        a, b, c = load("o-cuda"), load("o-off"), load("o-auto")
        out["outputs_identical"] = {"cuda~offload": all(torch.equal(a[k], b[k]) for k in a),
                                    "cuda~auto": all(torch.equal(a[k], c[k]) for k in a)}
        print(f"cli outputs identical: {out['outputs_identical']}", flush=True)
    out["ok"] = all(v["rc"] == 0 for k, v in out.items() if isinstance(v, dict) and "rc" in v)
    return out


# --------------------------------------------------------------------------- main


def _markdown(res: dict[str, Any]) -> str:
    lines = ["# GPU check: selection engine and LLM device paths", "",
             f"Command: `{res['command']}`", "", f"Machine: {res['machine']}", ""]
    if "select" in res:
        lines += ["## Selection engine on the GPU against the CPU engine (same scores)", "",
                  "| case | shape / size | masks equal (CPU kernel, CPU PyTorch, GPU) | CPU best path (ms) | CPU PyTorch (ms) | GPU (ms) | CPU best / GPU |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in res["select"].items():
            if isinstance(v, dict) and "cpu_ms" in v:
                size = "x".join(map(str, v["shape"])) if "shape" in v else f"{v['scores']:,} in {v['tensors']}"
                pt = f"{v['cpu_pytorch_ms']:.1f}" if "cpu_pytorch_ms" in v else "-"
                lines.append(f"| {k} | {size} | {v['masks_equal']} | {v['cpu_ms']:.1f} | {pt} | {v['device_ms']:.2f} | "
                             f"{v['speedup']:.1f} |")
        lines += ["", "`emprune.prune` (row/layer/global) on an MLP, CUDA vs CPU weights equal: "
                  + ", ".join(f"{k}: {v['weights_equal']}" for k, v in res["select"].items()
                              if k.startswith("prune-")), ""]
    if "llm" in res:
        L = res["llm"]
        lines += ["## prune_lm along every device path (random LLaMA, Wanda, default recipe)", "",
                  f"{L['parameters'] / 1e6:.0f} M parameters, calibration {L['calibration']} random tokens.", "",
                  "| path | seconds | calibration (s) | pruned | peak GPU (MB) |", "|---|---|---|---|---|"]
        for k, v in L["runs"].items():
            if "error" in v:
                lines.append(f"| {k} | error: {v['error'][:200]} | | | |")
            elif "seconds" in v:
                pk = "-" if v["peak_gpu_mb"] is None else f"{v['peak_gpu_mb']:.0f}"
                lines.append(f"| {k} | {v['seconds']:.1f} | {v['calibration_seconds']:.1f} | "
                             f"{100 * v['pruned_fraction']:.2f}% | {pk} |")
        if "accelerate-cpu-offload" in L["runs"]:
            lines += ["", f"accelerate CPU offload (blocks on meta): {L['runs']['accelerate-cpu-offload']}"]
        lines += ["", "| compared | rows with the same count | mask agreement | identical |", "|---|---|---|---|"]
        for k, v in L["agreement"].items():
            name = k if "~" in k else f"{L['agreement_reference']}~{k}"
            lines.append(f"| {name} | {100 * v['rows_same_count']:.3f}% | {100 * v['mask_agreement']:.4f}% | "
                         f"{v['identical']} |")
        lines.append("")
    if "obs" in res:
        lines += ["## OBS (SparseGPT) update on the GPU against the Wanda pipeline (same tokens)", "",
                  "| run | seconds | pruned | logits finite |", "|---|---|---|---|"]
        for k, v in res["obs"].items():
            if isinstance(v, dict) and "seconds" in v:
                lines.append(f"| {k} | {v['seconds']:.2f} | {100 * v['pruned_fraction']:.2f}% | {v['finite']} |")
            elif isinstance(v, dict) and "error" in v:
                lines.append(f"| {k} | error: {v['error'][:200]} | | |")
        if "obs_over_wanda" in res["obs"]:
            lines += ["", f"EMP + OBS over EMP + Wanda time: {res['obs']['obs_over_wanda']:.2f}x"]
        lines.append("")
    if "gpt2" in res:
        g2 = res["gpt2"]
        lines += ["## GPT-2 (Conv1D) pruned on the GPU (Wanda 50 %)", "",
                  "| path | pruned | every output unit keeps half | layer type after |", "|---|---|---|---|"]
        for k in ("cpu", "cuda", "offload"):
            if k in g2:
                lines.append(f"| {k} | {100 * g2[k]['pruned_fraction']:.2f}% | {g2[k]['each_output_unit_keeps_half']} | "
                             f"{g2[k]['type']} |")
        lines += ["", f"Mask agreement with the CPU run: cuda {g2.get('cpu~cuda_mask_agreement', float('nan')):.6f}, "
                  f"offload {g2.get('cpu~offload_mask_agreement', float('nan')):.6f}", ""]
    if "cli" in res:
        lines += ["## The CLI on the GPU", "", "| command | exit | seconds |", "|---|---|---|"]
        for k, v in res["cli"].items():
            if isinstance(v, dict) and "rc" in v:
                lines.append(f"| `{v['command']}` | {v['rc']} | {v['seconds']:.1f} |")
        if "outputs_identical" in res["cli"]:
            lines += ["", f"Saved outputs identical: {res['cli']['outputs_identical']}"]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json/.md")
    ap.add_argument("--parts", default="select,llm,cli")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, also on CPU)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--skip-cpu", action="store_true", help="no CPU reference run in the llm part")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for the cli part")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.calib_samples, args.seqlen = 128, 2, 512, 4, 64
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if dev.type == "cuda":
        machine += f", {torch.cuda.get_device_name(dev)}"
    res: dict[str, Any] = {"command": shlex.join(["python"] + sys.argv), "machine": machine, "device": dev.type}
    parts = args.parts.split(",")
    ok = True
    try:
        import transformers

        res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    except ImportError:
        pass
    for part in parts:
        t = time.perf_counter()
        try:
            if part == "select":
                res["select"] = part_select(dev, args.quick)
            elif part == "llm":
                res["llm"] = part_llm(dev, args)
            elif part == "obs":
                res["obs"] = part_obs(dev, args)
            elif part == "gpt2":
                res["gpt2"] = part_gpt2(dev, args)
            elif part == "cli" and args.tokenizer:
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    res["cli"] = part_cli(dev, args, Path(tmp))
            ok &= res.get(part, {}).get("ok", True)
        except Exception as e:  # noqa: BLE001 - keep the other parts' results
            import traceback

            traceback.print_exc()
            res[f"{part}_error"] = f"{type(e).__name__}: {e}"
            ok = False
        res.setdefault("seconds", {})[part] = time.perf_counter() - t
        (out / "gpu_check.json").write_text(json.dumps(res, indent=2, default=str))
        (out / "gpu_check.md").write_text(_markdown(res))
    print(f"ok={ok}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
