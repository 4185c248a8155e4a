"""Models larger than memory: peak RSS and wall time of ``emprune prune`` in memory vs streamed from
disk (``--offload disk``), on synthetic LLaMA-family models of about 0.5 B, 1.5 B and 3 B parameters
(bf16, sharded safetensors) and on SmolLM2-135M; plus one streamed run under a memory cap the
in-memory path cannot meet.

Parts (each merges its rows into ``benchmarks/results/large_models.json``; the md and png are
redrawn from the JSON):

* ``scale``: for each size, ``emprune prune`` in memory and streamed, measured by ``/usr/bin/time -v``
  (maximum resident set size, elapsed time) as separate processes, alternating;
* ``smollm2``: SmolLM2-135M (its GGUF saved once as a bf16 folder), default recipe, paired and
  alternating runs of both paths; the saved tensors are compared byte for byte and the
  perplexities of both outputs on held-out text are checked equal;
* ``cap``: the largest synthetic model streamed under a cgroup (v1) memory limit of ``--cap-gb``,
  with the in-memory path tried under the same cap (expected to be killed).

The synthetic models are random (normal, std 0.02; norms 1), written one block at a time (the
generator never holds the model), with SmolLM2's tokenizer; their shapes are Qwen2.5's
(0.5 B / 1.5 B / 3 B: hidden 896 / 1536 / 2048, MLP 4864 / 8960 / 11008, 24 / 28 / 36 blocks,
151,936-token tied embeddings), without the attention biases (LLaMA layout).

    python benchmarks/large_models.py --part scale --calib-samples 8 --seqlen 128
    python benchmarks/large_models.py --part smollm2 --pairs 3 --calib-samples 32 --seqlen 512
    python benchmarks/large_models.py --part cap --cap-gb 3
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "large_models"

#: name -> (hidden, intermediate, blocks, heads, kv heads)
SIZES = {"0.5B": (896, 4864, 24, 14, 2), "1.5B": (1536, 8960, 28, 12, 2), "3B": (2048, 11008, 36, 16, 2)}
VOCAB = 151936


def cache_dir() -> Path:
    d = Path(os.environ.get("EMPRUNE_SYNTH") or Path(tempfile.gettempdir()) / "emprune-synth")
    d.mkdir(parents=True, exist_ok=True)
    return d


def tokenizer_files(folder: Path) -> None:
    """SmolLM2's tokenizer (from its GGUF) saved into ``folder``."""
    from emprune.models.loading import load_tokenizer

    load_tokenizer("smollm2-135m").save_pretrained(folder)


def synth(size: str) -> tuple[Path, float, int]:
    """The synthetic model ``size`` as a sharded bf16 folder (made once; cached): ``(folder,
    seconds it took to make, parameters)``."""
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from emprune.models.stream import ShardWriter

    folder = cache_dir() / f"llama-{size}"
    done = folder / "made.json"
    if done.is_file():
        m = json.loads(done.read_text())
        return folder, m["seconds"], m["parameters"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    h, inter, n, heads, kv = SIZES[size]
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=h, intermediate_size=inter, num_hidden_layers=n,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=True, rope_theta=1e6, bos_token_id=0, eos_token_id=0)
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    model.tie_weights()
    gen = torch.Generator().manual_seed(0)
    writer = ShardWriter(folder)
    seen: set[int] = set()
    group: dict = {}
    count = 0

    def tensor(name: str, shape) -> "torch.Tensor":
        if "norm" in name:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    prefix = None
    for name, p in model.named_parameters():  # tied: the head is the embedding, listed once
        if id(p) in seen:
            continue
        seen.add(id(p))
        block = re.match(r"model\.layers\.(\d+)\.", name)
        key = block.group(0) if block else "outer"
        if prefix is not None and key != prefix:
            writer.add(group)
            group = {}
        prefix = key
        group[name] = tensor(name, tuple(p.shape))
        count += p.numel()
    writer.add(group)
    writer.finish()
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(folder)
    tokenizer_files(folder)
    secs = time.perf_counter() - t0
    done.write_text(json.dumps({"seconds": secs, "parameters": count}) + "\n")
    return folder, secs, count


def smollm2_folder() -> Path:
    """SmolLM2-135M's GGUF de-quantised and saved once as a bf16 folder (cached)."""
    import torch

    from emprune.models.loading import load_causal_lm

    folder = cache_dir() / "smollm2-135m-bf16"
    if not (folder / "made.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        model, tok = load_causal_lm("smollm2-135m", progress=False)
        model.to(torch.bfloat16).save_pretrained(folder)
        tok.save_pretrained(folder)
        (folder / "made.json").write_text("{}\n")
    return folder


def timed(cmd: list[str], cgroup: str | None = None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v`` (inside the cgroup ``cgroup`` when given): return
    code, elapsed seconds, maximum RSS in bytes, last lines of its output."""
    pre = []
    if cgroup:
        pre = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh"]
    t0 = time.perf_counter()
    p = subprocess.run(pre + ["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return {"rc": p.returncode, "wall_s": wall, "max_rss_bytes": int(m.group(1)) * 1024 if m else None,
            "tail": (p.stdout + p.stderr).strip().splitlines()[-4:]}


def prune_cmd(folder: Path, out: Path, stream: bool, args: argparse.Namespace, extra: list[str] = ()) -> list[str]:
    """``emprune prune`` (or ``shrink``: ``--job``) streamed (``--offload disk``) or forced in memory
    (``--offload none``)."""
    return [sys.executable, "-m", "emprune", args.job, str(folder), "--out", str(out), "--overwrite", "--quiet",
            "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen),
            "--offload", "disk" if stream else "none", *extra]


def load_results() -> dict:
    path = RESULTS / f"{NAME}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(res: dict) -> None:
    from emprune.models.io import atomic_path

    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_path(RESULTS / f"{NAME}.json") as tmp:
        tmp.write_text(json.dumps(res, indent=2) + "\n")
    with atomic_path(RESULTS / f"{NAME}.md") as tmp:
        tmp.write_text(markdown(res))
    try:
        plot(res)
    except ImportError:
        print("matplotlib missing: no png", file=sys.stderr)


def command() -> str:
    import shlex

    return shlex.join(["python", "benchmarks/large_models.py"] + sys.argv[1:])


def label(args: argparse.Namespace) -> str:
    """The key of a run's rows: the job (shrink only; prune rows keep their earlier keys) and the options."""
    return ("emprune shrink: " if args.job == "shrink" else "") + (args.extra or "default recipe")


def part_scale(args: argparse.Namespace, res: dict) -> None:
    extra = args.extra.split() if args.extra else []
    label_ = label(args)
    entry = res.setdefault("scale", {}).setdefault(label_, {})
    rows = entry.setdefault("rows", {})
    for size in args.sizes.split(","):
        folder, made_s, params = synth(size)
        print(f"{size}: {params / 1e9:.2f} B parameters, made in {made_s:.0f} s", file=sys.stderr)
        out = cache_dir() / "out"
        row = {"parameters": params, "made_seconds": made_s, "stored_bytes": sum(
            f.stat().st_size for f in folder.glob("*.safetensors")), "runs": {}}
        for mode in (["disk", "memory"] if "memory" not in args.skip else ["disk"]):
            r = timed(prune_cmd(folder, out, mode == "disk", args, extra))
            print(size, mode, {k: r[k] for k in ("rc", "wall_s", "max_rss_bytes")}, file=sys.stderr)
            if r["rc"] != 0:
                print("\n".join(r["tail"]), file=sys.stderr)
            row["runs"][mode] = r
            shutil.rmtree(out, ignore_errors=True)
        rows[size] = row
        entry.update(command=command(), calib_samples=args.calib_samples, seqlen=args.seqlen, extra=extra)
        save_results(res)


def same_tensors(a: Path, b: Path) -> tuple[int, list[str]]:
    """``(tensors compared, names whose bytes, dtype or shape differ)`` of two saved folders."""
    from safetensors.torch import load_file

    def sd(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    x, y = sd(a), sd(b)
    bad = sorted(set(x) ^ set(y))
    for k in set(x) & set(y):
        if x[k].dtype != y[k].dtype or x[k].shape != y[k].shape or x[k].view(-1).view(
                __import__("torch").uint8).ne(y[k].view(-1).view(__import__("torch").uint8)).any():
            bad.append(k)
    return len(x), bad


def part_smollm2(args: argparse.Namespace, res: dict) -> None:
    folder = smollm2_folder()
    outs = {m: cache_dir() / f"smol-out-{m}" for m in ("memory", "disk")}
    runs: dict[str, list] = {"memory": [], "disk": []}
    for k in range(args.pairs):
        order = ("memory", "disk") if k % 2 == 0 else ("disk", "memory")
        for mode in order:
            r = timed(prune_cmd(folder, outs[mode], mode == "disk", args))
            print("smollm2", k, mode, {q: r[q] for q in ("rc", "wall_s", "max_rss_bytes")}, file=sys.stderr)
            if r["rc"] != 0:
                raise SystemExit("\n".join(r["tail"]))
            runs[mode].append(r)
    n, bad = same_tensors(outs["memory"], outs["disk"])
    ppl = {}
    for mode in ("memory", "disk"):
        j = cache_dir() / f"ppl-{mode}.json"
        cmd = [sys.executable, "-m", "emprune", "eval", str(outs[mode]), "--ppl", "--eval-text", "python-docs",
               "--eval-tokens", str(args.eval_tokens), "--seqlen", "512", "--quiet", "--json", str(j)]
        if mode == "disk":
            cmd += ["--offload", "disk"]
        r = timed(cmd)
        if r["rc"] != 0:
            raise SystemExit("\n".join(r["tail"]))
        ppl[mode] = {"ppl": json.loads(j.read_text())["ppl"], "wall_s": r["wall_s"], "max_rss_bytes": r["max_rss_bytes"]}
    ratios = [d["wall_s"] / m["wall_s"] for m, d in zip(runs["memory"], runs["disk"])]
    res["smollm2" if args.job == "prune" else "smollm2_shrink"] = {
        "command": command(), "job": args.job,
        "folder": "SmolLM2-135M GGUF (Q4_1) de-quantised, saved as a bf16 folder", "runs": runs,
        "wall_ratio_disk_over_memory": ratios, "median_ratio": statistics.median(ratios),
        "tensors_compared": n, "tensors_differing": bad, "ppl_python_docs": ppl,
        "calib_samples": args.calib_samples, "seqlen": args.seqlen}
    save_results(res)


def part_cap(args: argparse.Namespace, res: dict) -> None:
    size = args.sizes.split(",")[-1]
    folder, _, params = synth(size)
    cg = Path("/sys/fs/cgroup/memory/emprune-cap")
    cg.mkdir(exist_ok=True)
    cap = int(args.cap_gb * 1e9)
    (cg / "memory.limit_in_bytes").write_text(str(cap))
    out = cache_dir() / "out-cap"
    extra = args.extra.split() if args.extra else []
    runs = {}
    try:
        for mode in ("disk", "memory"):
            (cg / "memory.max_usage_in_bytes").write_text("0")
            r = timed(prune_cmd(folder, out, mode == "disk", args, extra), str(cg))
            r["cgroup_max_usage_bytes"] = int((cg / "memory.max_usage_in_bytes").read_text())
            r["oom_kill"] = "oom_kill " in (cg / "memory.oom_control").read_text() and int(
                re.search(r"oom_kill (\d+)", (cg / "memory.oom_control").read_text()).group(1)) > 0
            print(size, mode, {k: r[k] for k in ("rc", "wall_s", "max_rss_bytes", "cgroup_max_usage_bytes")},
                  file=sys.stderr)
            runs[mode] = r
            shutil.rmtree(out, ignore_errors=True)
    finally:
        cg.rmdir()
    res.setdefault("cap", {})[label(args)] = {"command": command(),
                  "model": size, "parameters": params, "cap_bytes": cap,
                  "how": "cgroup v1 memory.limit_in_bytes (no swap on this box); the process joins the group before "
                         "exec", "runs": runs, "extra": extra}
    save_results(res)


def gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def markdown(res: dict) -> str:
    lines = ["# Models larger than memory: `emprune prune` and `emprune shrink` streamed from disk vs in memory", "",
             "Peak RSS is `/usr/bin/time -v`'s maximum resident set size of the whole process (Python, torch and "
             "transformers take about 0.5 GB before any weight). Synthetic models are random LLaMA-family models "
             "with Qwen2.5's shapes, stored in bf16 and computed in float32 (the default `--dtype`).", ""]
    for label, sc in res.get("scale", {}).items():
        lines += [f"## Peak memory and wall time against model size: {label}", "", f"`{sc['command']}`", "",
                  "| model | parameters | stored (GB) | made in (s) | in memory: peak RSS (GB) | wall (s) "
                  "| streamed: peak RSS (GB) | wall (s) |", "|---|---|---|---|---|---|---|---|"]
        for size, row in sc["rows"].items():
            m, d = row["runs"].get("memory", {}), row["runs"].get("disk", {})
            lines.append(f"| {size} | {row['parameters'] / 1e9:.2f} B | {gb(row['stored_bytes'])} | "
                         f"{row['made_seconds']:.0f} | {gb(m.get('max_rss_bytes'))} | {m.get('wall_s', 0):.0f} | "
                         f"{gb(d.get('max_rss_bytes'))} | {d.get('wall_s', 0):.0f} |")
        lines.append("")
    for key, job, recipe in (("smollm2", "prune", "EMP counts + OBS update"),
                             ("smollm2_shrink", "shrink", "MLP neurons, sensitivity allocation, bias compensation")):
        sm = res.get(key)
        if not sm:
            continue
        lines += [f"## SmolLM2-135M, `emprune {job}`: wall time and exactness", "", f"`{sm['command']}`", "",
                  f"{sm['folder']}; default recipe ({recipe}), {sm['calib_samples']} x {sm['seqlen']} "
                  "calibration tokens; runs paired and alternating.", "",
                  "| pair | in memory (s) | streamed (s) | ratio | in memory RSS (GB) | streamed RSS (GB) |",
                  "|---|---|---|---|---|---|"]
        for k, (m, d) in enumerate(zip(sm["runs"]["memory"], sm["runs"]["disk"])):
            lines.append(f"| {k + 1} | {m['wall_s']:.1f} | {d['wall_s']:.1f} | x{d['wall_s'] / m['wall_s']:.2f} | "
                         f"{gb(m['max_rss_bytes'])} | {gb(d['max_rss_bytes'])} |")
        p = sm["ppl_python_docs"]
        lines += ["", f"Median ratio streamed / in memory: **x{sm['median_ratio']:.2f}**. Saved tensors compared: "
                  f"{sm['tensors_compared']}, differing: {len(sm['tensors_differing'])}"
                  + (f" ({', '.join(sm['tensors_differing'][:5])})" if sm["tensors_differing"] else " (byte-identical)")
                  + f". Perplexity on python-docs: in memory {p['memory']['ppl']!r}, streamed {p['disk']['ppl']!r}.", ""]
    for label, cp in res.get("cap", {}).items():
        lines += [f"## Under a memory cap of {gb(cp['cap_bytes'])} GB: {label}", "", f"`{cp['command']}`", "",
                  f"{cp['model']} model ({cp['parameters'] / 1e9:.2f} B parameters); {cp['how']}.", "",
                  "| path | exit code | wall (s) | peak RSS (GB) | cgroup peak usage (GB) | OOM-killed |",
                  "|---|---|---|---|---|---|"]
        for mode, r in cp["runs"].items():
            lines.append(f"| {'streamed' if mode == 'disk' else 'in memory'} | {r['rc']} | {r['wall_s']:.0f} | "
                         f"{gb(r['max_rss_bytes'])} | {gb(r['cgroup_max_usage_bytes'])} | {r['oom_kill']} |")
        lines.append("")
    if res.get("notes"):
        lines += ["## Notes", ""] + [f"* {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


def plot(res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not res.get("scale"):
        return
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for (label, sc), style in zip(res["scale"].items(), ("-", "--", ":")):
        sizes = list(sc["rows"])
        x = [sc["rows"][s]["parameters"] / 1e9 for s in sizes]
        for mode, name in (("memory", "in memory"), ("disk", "streamed")):
            pts = [(xi, sc["rows"][s]["runs"][mode]) for xi, s in zip(x, sizes) if mode in sc["rows"][s]["runs"]]
            if not pts:
                continue
            tag = f"{name}, {label}"
            ax[0].plot([p[0] for p in pts], [p[1]["max_rss_bytes"] / 1e9 for p in pts], "o" + style, label=tag)
            ax[1].plot([p[0] for p in pts], [p[1]["wall_s"] for p in pts], "o" + style, label=tag)
    for a, what in zip(ax, ("peak RSS (GB)", "wall time (s)")):
        a.set_xlabel("parameters (B)")
        a.set_ylabel(what)
        a.legend(fontsize=7)
        a.grid(alpha=.3)
    fig.suptitle("emprune prune: in memory vs streamed from disk (synthetic LLaMA-family, bf16 on disk)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("scale", "smollm2", "cap", "make"), required=True)
    ap.add_argument("--sizes", default="0.5B,1.5B,3B")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--cap-gb", type=float, default=3.0)
    ap.add_argument("--extra", default="", help="more emprune prune options, e.g. '--update none'")
    ap.add_argument("--skip", default="", help="'memory': streamed runs only")
    ap.add_argument("--job", choices=("prune", "shrink"), default="prune", help="the command measured")
    args = ap.parse_args()
    res = load_results()
    if args.part == "make":
        for s in args.sizes.split(","):
            print(s, synth(s), file=sys.stderr)
        return
    {"scale": part_scale, "smollm2": part_smollm2, "cap": part_cap}[args.part](args, res)


if __name__ == "__main__":
    main()
