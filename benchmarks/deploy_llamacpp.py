"""Savings where models run: shrunk SmolLM2-135M exported to GGUF and measured in llama.cpp itself.

For the dense model and each shrink (the default per-layer widths on grids of 32 and 128, and
``--uniform``), every GGUF type asked for is written with ``emprune export`` and measured:

* size of the file;
* prompt processing (pp) and batch-1 generation (tg) tokens per second in llama.cpp, one thread,
  paired with the dense model of the same type in alternation (``emprune.jobs.bench``: A B, B A,
  ..., ratios = median of per-pair ratios with their min-max);
* perplexity in llama.cpp on held-out text (python-docs: never the calibration text), next to
  PyTorch's on the same windows for the float32 model the file was written from.

    python benchmarks/deploy_llamacpp.py                       # everything (~45 min on 2 cores)
    python benchmarks/deploy_llamacpp.py --types q8_0 --grids 32 --repeats 3   # a quick look

Writes ``benchmarks/results/deploy_llamacpp.{json,md,png}``. The shrinks are run with the
``emprune shrink`` command line (default recipe and calibration), the exports with ``emprune
export``: the exact commands are in the JSON and the markdown.
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def sh(cmd: list[str], log: list) -> float:
    """Run an emprune command (``python -m emprune``), recording it; returns its seconds."""
    t = time.perf_counter()
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run([sys.executable, "-m", "emprune", *cmd[1:]], check=True, cwd=REPO)
    dt = time.perf_counter() - t
    log.append({"command": " ".join(shlex.quote(c) for c in cmd), "seconds": round(dt, 1)})
    return dt


def _made(cmd: list[str], folder: Path, log: list) -> None:
    """Run ``cmd`` unless ``folder`` holds its finished output already (then record the command
    that made it, from its ``emprune.json``)."""
    if (folder / "emprune.json").is_file():
        made = json.loads((folder / "emprune.json").read_text())
        log.append({"command": made.get("command", " ".join(cmd)), "seconds": made.get("summary", {}).get("seconds"),
                    "reused": True})
        return
    sh(cmd, log)


def shrink_all(work: Path, grids: list[int], uniform: bool, log: list) -> dict[str, str]:
    """``{name: folder}`` of the shrunk models (made once; an existing folder is reused)."""
    out = {}
    for m in grids:
        f = work / f"shrink-m{m}"
        _made(["emprune", "shrink", "smollm2-135m", "--out", str(f), "--multiple-of", str(m), "--quiet"], f, log)
        out[f"shrink (per-layer, --multiple-of {m})"] = str(f)
    if uniform:
        f = work / "shrink-uniform"
        _made(["emprune", "shrink", "smollm2-135m", "--out", str(f), "--uniform", "--quiet"], f, log)
        out["shrink --uniform"] = str(f)
    return out


def torch_ppl(spec: str, windows) -> float:
    """PyTorch perplexity (float32) of a model on the windows, every next token counted."""
    import torch

    from emprune.models import loading

    model, _ = loading.load_causal_lm(spec, progress=False)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            lg = model(w[None]).logits[0].double()
            nll += float(torch.nn.functional.cross_entropy(lg[:-1], w[1:], reduction="sum"))
            n += len(w) - 1
    import math

    return math.exp(nll / n)


def _key(path: str, windows) -> str:
    """A cache key: the file (or folder's weights) with its size and time, and the windows' shape."""
    p = Path(path)
    f = p if p.is_file() else next(iter(sorted(p.glob("*.safetensors"))), p)
    st = f.stat()
    return f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{tuple(windows.shape)}"


def cached(cache: dict, kind: str, path: str, windows, compute) -> float:
    """``compute()``, remembered in ``cache`` under the file's identity (perplexity is deterministic
    for the same file and tokens: measured once, reused by later runs)."""
    key = f"{kind}|{_key(path, windows)}"
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/emprune-deploy", help="folder for the shrunk models and GGUF files")
    ap.add_argument("--types", default="f16,q8_0,q4_0,q4_k_m")
    ap.add_argument("--grids", default="32,128", help="--multiple-of values of the per-layer shrinks")
    ap.add_argument("--no-uniform", action="store_true")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=FOLDER",
                    help="another model folder to export and measure (e.g. a healed shrink)")
    ap.add_argument("--no-shrink", action="store_true", help="only the dense model and the --extra folders")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=str(RESULTS / "deploy_llamacpp"))
    ap.add_argument("--append", action="store_true",
                    help="add these rows to the results already at --out (the dense rows are measured again "
                         "as the baselines of the new ones but kept once)")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")

    from emprune.jobs.bench import bench
    from emprune.models import data, loading
    from emprune.models import llamacpp

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log: list = []
    t0 = time.time()
    types = args.types.split(",")
    models = {"dense": "smollm2-135m"}
    if not args.no_shrink:
        models.update(shrink_all(work, [int(g) for g in args.grids.split(",") if g], not args.no_uniform, log))
    for item in args.extra:
        name, _, folder = item.partition("=")
        models[name] = folder
    tok = loading.load_tokenizer("smollm2-135m")
    ids = data.eval_tokens(tok, data.load_text("python-docs"), args.ppl_windows * args.seqlen)
    windows = ids[: args.ppl_windows * args.seqlen].reshape(args.ppl_windows, args.seqlen)

    cache_file = work / "ppl_cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    rows = []
    for name, spec in models.items():
        where = str(loading.locate(spec)[1])
        ref = cached(cache, "torch", where, windows, lambda: torch_ppl(spec, windows))
        summary = {}
        if spec != "smollm2-135m":
            summary = json.loads((Path(spec) / "emprune.json").read_text()).get("summary", {})
        for qt in types:
            stem = Path(spec).name if spec != "smollm2-135m" else "dense"
            gg = work / f"{stem}.{qt}.gguf"
            row = {"model": name, "spec": spec, "type": qt, "gguf": str(gg), "torch_ppl": ref,
                   "params_after": summary.get("params_after"), "params_before": summary.get("params_before")}
            try:
                if not gg.is_file():
                    sh(["emprune", "export", spec, "--gguf", str(gg), "--type", qt, "--quiet",
                        "--json", str(gg) + ".json"], log)
                row["export"] = json.loads(Path(str(gg) + ".json").read_text())
            except subprocess.CalledProcessError as e:
                row["error"] = f"export failed (status {e.returncode})"
                rows.append(row)
                continue
            row["bytes"] = gg.stat().st_size
            row["llama_ppl"] = cached(cache, "llama.cpp", str(gg), windows,
                                      lambda: llamacpp.perplexity(gg, windows.numpy())["ppl"])
            cache_file.write_text(json.dumps(cache, indent=1))
            rows.append(row)
            print(f"{name} {qt}: {row['bytes'] / 1e6:.1f} MB, ppl llama.cpp {row['llama_ppl']:.2f} "
                  f"PyTorch {ref:.2f}", flush=True)
    # speed: every model vs the dense model of the same type, paired in alternation
    for row in rows:
        if row["model"] == "dense" or "error" in row:
            continue
        dense = next((r for r in rows if r["model"] == "dense" and r["type"] == row["type"] and "error" not in r), None)
        if dense is None:
            continue
        res = bench(row["gguf"], dense["gguf"], repeats=args.repeats, threads=1, prompt_tokens=args.prompt_tokens,
                    gen_tokens=args.gen_tokens, progress=False)
        r = res["ratio"]
        row["bench"] = {"pp_ratio": r["pp_tok_s"], "tg_ratio": r["tg_tok_s"], "size_ratio": r["size"],
                        "pp_cpu_ratio": r["pp_tok_cpu_s"], "tg_cpu_ratio": r["tg_tok_cpu_s"],
                        "peak_rss_ratio": r["peak_rss"],
                        "pp_tok_s": res["models"][0]["pp_tok_s"]["median"],
                        "tg_tok_s": res["models"][0]["tg_tok_s"]["median"],
                        "dense_pp_tok_s": res["models"][1]["pp_tok_s"]["median"],
                        "dense_tg_tok_s": res["models"][1]["tg_tok_s"]["median"],
                        "load_average": res["environment"].get("load_average")}
        print(f"{row['model']} {row['type']}: pp x{r['pp_tok_s']['median']:.2f} tg x{r['tg_tok_s']['median']:.2f} "
              f"(per CPU-second pp x{r['pp_tok_cpu_s']['median']:.2f} tg x{r['tg_tok_cpu_s']['median']:.2f}) "
              f"size x{r['size']:.3f}", flush=True)
    out = {"benchmark": "deploy_llamacpp", "command": "python " + " ".join(map(shlex.quote, sys.argv)),
           "settings": vars(args), "ppl_text": "python-docs", "ppl_tokens": int(windows.numel()),
           "commands": log, "rows": rows, "seconds": round(time.time() - t0, 1),
           "environment": {"python": platform.python_version(), "machine": platform.machine(),
                           "cpus": os.cpu_count(), "load_average_end": os.getloadavg()}}
    base = Path(args.out)
    if args.append and base.with_suffix(".json").is_file():
        prev = json.loads(base.with_suffix(".json").read_text())
        runs = prev.get("runs") or [{k: prev[k] for k in ("command", "settings", "commands", "seconds",
                                                            "environment") if k in prev}]
        out["runs"] = runs + [{k: out[k] for k in ("command", "settings", "commands", "seconds", "environment")}]
        out["rows"] = prev["rows"] + [r for r in rows if r["model"] != "dense"]
        out["seconds"] = sum(r["seconds"] for r in out["runs"])
        out["command"] = " ; ".join(r["command"] for r in out["runs"])
        out["commands"] = [c for r in out["runs"] for c in r["commands"]]
    base.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    base.with_suffix(".md").write_text(markdown(out) + "\n")
    plot(out, base.with_suffix(".png"))
    print(f"wrote {base}.json/.md/.png")
    return 0


def markdown(out: dict) -> str:
    s = out["settings"]
    lines = ["# Shrunk SmolLM2-135M in llama.cpp (`emprune export`)", "",
             f"Command: `{out['command']}` ({out['seconds'] / 60:.0f} min). Speed: llama.cpp through "
             f"llama-cpp-python, 1 thread, pp = {s['prompt_tokens']} prompt tokens in one batch, tg = "
             f"{s['gen_tokens']} single-token decodes, {s['repeats']} pairs alternating with the dense model of the "
             "same type; ratios are medians of the per-pair ratios [min-max]. Perplexity: python-docs "
             f"(held out), {out['ppl_tokens']} tokens in windows of {s['seqlen']}, llama.cpp on the file vs "
             "PyTorch float32 on the model it was written from.", "",
             "| model | type | arch | MB | size vs dense | tg tok/s | tg vs dense | tg vs dense per CPU-s | "
             "pp tok/s | pp vs dense | pp vs dense per CPU-s | ppl llama.cpp | ppl PyTorch f32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = (lambda x: f"x{x['median']:.2f} [{x['min']:.2f}-{x['max']:.2f}]")
    for r in out["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['type']} | - | - | - | - | - | - | - | - | - | {r['error']} | "
                         f"{r['torch_ppl']:.2f} |")
            continue
        b = r.get("bench")
        head = f"| {r['model']} | {r['type']} | {r['export']['arch']} | {r['bytes'] / 1e6:.1f} | "
        tail = f" {r['llama_ppl']:.2f} | {r['torch_ppl']:.2f} |"
        if not b:
            lines.append(head + "1 | - | - | - | - | - | - |" + tail)
            continue
        cpu = lambda k: fmt(b[k]) if k in b else "-"  # noqa: E731 (older rows: wall clock only)
        lines.append(head + f"x{b['size_ratio']:.3f} | {b['tg_tok_s']:.1f} | {fmt(b['tg_ratio'])} | "
                     f"{cpu('tg_cpu_ratio')} | {b['pp_tok_s']:.0f} | {fmt(b['pp_ratio'])} | {cpu('pp_cpu_ratio')} |"
                     + tail)
    lines += ["", "Tensor types per file (read back from the file):", ""]
    for r in out["rows"]:
        if "export" in r:
            e = r["export"]
            lines.append(f"- {r['model']} {r['type']}: {e['tensor_types']}"
                         + (f"; not quantised: {e['fallback']}" if e["fallback"] else ""))
    lines += ["", "Commands run:", ""] + [f"    {c['command']}" for c in out["commands"]]
    return "\n".join(lines)


def short(name: str) -> str:
    """A model's name for an axis label."""
    import re

    m = re.search(r"multiple-of (\d+)", name)
    if "heal" in name:
        return "healed"
    return f"per-layer /{m.group(1)}" if m else name.replace("shrink ", "").lstrip("-")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in out["rows"] if r.get("bench")]
    if not rows:
        return
    labels = [f"{short(r['model'])}\n{r['type']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.75), 4))
    x = range(len(rows))
    w = 0.27
    for k, (key, name) in enumerate((("size_ratio", "size"), ("pp_ratio", "pp tok/s"), ("tg_ratio", "tg tok/s"))):
        vals = [r["bench"][key] if key == "size_ratio" else r["bench"][key]["median"] for r in rows]
        ax.bar([i + (k - 1) * w for i in x], vals, w, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("shrunk / dense (same GGUF type)")
    ax.set_title("SmolLM2-135M shrunk by emprune, in llama.cpp (1 thread)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
