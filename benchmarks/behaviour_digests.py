"""Behaviour digests: SHA-256 of the weights that fixed-seed emprune commands save.

A restructuring must not move behaviour. This script runs a fixed list of commands (the tiny
3-block LLaMA of ``tests/tiny_llama.py`` with many option combinations, and the embedded
SmolLM2-135M with the default ``prune`` and ``shrink``) and records, per command, the SHA-256 of
every saved ``model.safetensors`` and ``config.json``, a digest of ``emprune.json`` with the
volatile fields (times, memory, versions, paths) removed, and the printed perplexities. Run it
before and after a change and compare the two JSON files (``--compare OLD.json``).

    python benchmarks/behaviour_digests.py --out /tmp/before.json               # everything (~10 min)
    python benchmarks/behaviour_digests.py --out /tmp/after.json --compare /tmp/before.json
    python benchmarks/behaviour_digests.py --only tiny --out /tmp/t.json        # the tiny model only

``--python`` / ``PYTHONPATH`` choose which emprune runs (e.g. a checkout of an older commit).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: emprune.json keys whose values differ between identical runs (times, memory, machine, paths)
VOLATILE = {"seconds", "total_seconds", "decide_seconds", "peak_memory", "versions", "command", "model",
            "input", "text", "calibration_seconds", "eval_seconds", "seconds_per_item", "tokens_per_s",
            "block_seconds", "capture_seconds", "teacher"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(folder: Path) -> dict:
    out = {}
    for name in ("model.safetensors", "config.json"):
        if (folder / name).is_file():
            out[name] = sha256(folder / name)
    rep = folder / "emprune.json"
    if rep.is_file():
        out["emprune.json (stripped)"] = hashlib.sha256(
            json.dumps(_strip(json.loads(rep.read_text())), sort_keys=True).encode()).hexdigest()
    return out


def commands(tiny: Path, text: Path, work: Path) -> list[tuple[str, list[str], str | None]]:
    """``(name, argv after 'emprune', output folder or json file)``, in order (later ones may read
    earlier outputs)."""
    T, F, W = str(tiny), str(text), work
    cal = ["--calib-text", F, "--calib-samples", "8", "--seqlen", "32", "--quiet"]
    p = lambda name, *extra: (name, ["prune", T, "--out", str(W / name), *extra, *cal], str(W / name))  # noqa: E731
    s = lambda name, *extra: (name, ["shrink", T, "--out", str(W / name), *extra, *cal], str(W / name))  # noqa: E731
    heal = ["--text", F, "--steps", "4", "--seqlen", "32", "--batch", "2", "--quiet"]
    return [
        p("tiny-prune-default"),
        p("tiny-prune-sparsity", "--sparsity", "0.5"),
        p("tiny-prune-sparsity-obs", "--sparsity", "0.5", "--update", "obs"),
        p("tiny-prune-global", "--scope", "global"),
        p("tiny-prune-layer-paper", "--scope", "layer", "--recipe", "paper"),
        p("tiny-prune-nm", "--nm", "2:4"),
        p("tiny-prune-nm-obs", "--nm", "2:4", "--update", "obs"),
        p("tiny-prune-owl", "--sparsity", "0.5", "--allocation", "owl"),
        p("tiny-prune-target", "--target-sparsity", "0.6"),
        p("tiny-prune-linear-floor", "--targets", "linear", "--recipe", "floor"),
        p("tiny-prune-magnitude", "--criterion", "magnitude"),
        p("tiny-prune-layer-magnitude", "--recipe", "layer-magnitude"),
        p("tiny-prune-clip", "--recipe", "clip", "--update", "none"),
        p("tiny-prune-sqrt-minkeep", "--recipe", "sqrt", "--min-keep", "0.4"),
        p("tiny-prune-countunit", "--count-unit", "layer", "--count-by", "magnitude"),
        p("tiny-prune-damp", "--update", "obs", "--damp", "0.1", "--damp-kind", "mean"),
        s("tiny-shrink-default"),
        s("tiny-shrink-mlp-heads", "--units", "mlp,heads"),
        s("tiny-shrink-heads-uniform", "--units", "heads", "--uniform"),
        s("tiny-shrink-uniform", "--uniform"),
        s("tiny-shrink-paper-layer", "--recipe", "paper", "--scope", "layer"),
        s("tiny-shrink-keep", "--keep", "0.5"),
        s("tiny-shrink-magnitude", "--criterion", "magnitude", "--no-compensate"),
        s("tiny-shrink-zscore", "--recipe", "zscore"),
        s("tiny-shrink-mean-joint", "--recipe", "mean-joint", "--units", "mlp,heads"),
        s("tiny-shrink-taylor-group", "--criterion", "taylor", "--units", "mlp,heads", "--head-mode", "group"),
        ("tiny-heal-pruned", ["heal", str(W / "tiny-prune-default"), "--out", str(W / "tiny-heal-pruned"), *heal],
         str(W / "tiny-heal-pruned")),
        ("tiny-heal-shrunk", ["heal", str(W / "tiny-shrink-default"), "--out", str(W / "tiny-heal-shrunk"), *heal],
         str(W / "tiny-heal-shrunk")),
        ("tiny-heal-lora", ["heal", str(W / "tiny-prune-default"), "--out", str(W / "tiny-heal-lora"), "--lora", "4",
                            "--distill", "none", *heal], str(W / "tiny-heal-lora")),
        ("tiny-eval", ["eval", str(W / "tiny-prune-default"), "--ppl", "--eval-text", F, "--seqlen", "32",
                       "--json", str(W / "tiny-eval.json"), "--quiet"], str(W / "tiny-eval.json")),
        ("tiny-eval-shrunk", ["eval", str(W / "tiny-shrink-mlp-heads"), "--ppl", "--eval-text", F, "--seqlen", "32",
                              "--json", str(W / "tiny-eval-shrunk.json"), "--quiet"], str(W / "tiny-eval-shrunk.json")),
        ("tiny-compare", ["compare", T, "--targets", "mlp,linear", "--calib-text", F, "--eval-text", F,
                          "--other-text", "python-docs", "--calib-samples", "8", "--seqlen", "32",
                          "--eval-tokens", "512", "--other-tokens", "512", "--recipes", "floor",
                          "--out", str(W / "tiny-compare"), "--quiet"], str(W / "tiny-compare.json")),
        ("tiny-inspect", ["inspect", str(tiny / "model.safetensors"), "--scope", "layer", "--json"], None),
    ]


def smollm2_commands(work: Path) -> list[tuple[str, list[str], str | None]]:
    return [
        ("smollm2-prune-default", ["prune", "smollm2-135m", "--out", str(work / "smollm2-prune"),
                                   "--calib-samples", "8", "--seqlen", "256", "--quiet"], str(work / "smollm2-prune")),
        ("smollm2-shrink-default", ["shrink", "smollm2-135m", "--out", str(work / "smollm2-shrink"), "--quiet"],
         str(work / "smollm2-shrink")),
    ]


def _result_of(kind_path: str | None, stdout: str) -> dict:
    if kind_path is None:  # inspect: the JSON printed, seconds removed
        return {"stdout (stripped)": hashlib.sha256(
            json.dumps(_strip(json.loads(stdout)), sort_keys=True).encode()).hexdigest()}
    p = Path(kind_path)
    if p.is_dir():
        return folder_digest(p)
    doc = json.loads(p.read_text())
    if "sections" in doc:  # compare: perplexities and pruned fractions of every row
        rows = [doc["dense"]] + [r for s in doc["sections"] for r in s["rows"]]
        return {"rows": [[r["label"], r.get("pruned_fraction"), r.get("ppl"), r.get("ppl_other")] for r in rows]}
    return {"ppl": doc.get("ppl")}


def run(args) -> dict:
    py = args.python or sys.executable
    work = Path(tempfile.mkdtemp(prefix="emprune-digests-"))
    tiny_dir = Path(args.tiny).expanduser() if args.tiny else work / "tiny"
    if not (tiny_dir / "model").is_dir():  # the tiny model is made once and reused (same bytes for both runs)
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_llama import TEXT, save_tiny

        save_tiny(tiny_dir / "model")
        (tiny_dir / "text.txt").write_text(TEXT)
    cmds = []
    if args.only in ("all", "tiny"):
        cmds += commands(tiny_dir / "model", tiny_dir / "text.txt", work)
    if args.only in ("all", "smollm2"):
        cmds += smollm2_commands(work)
    env = {**os.environ, "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false"}
    doc = {"tiny_model": {"model.safetensors": sha256(tiny_dir / "model" / "model.safetensors")}, "runs": {}}
    for name, argv, out in cmds:
        t = time.perf_counter()
        r = subprocess.run([py, "-m", "emprune.cli", *argv], capture_output=True, text=True, env=env, cwd=work)
        entry = {"argv": argv[:1] + ["..."] + [a for a in argv[2:] if not a.startswith(str(work))], "rc": r.returncode,
                 "seconds": round(time.perf_counter() - t, 1)}
        if r.returncode == 0:
            entry.update(_result_of(out, r.stdout))
        else:
            entry["stderr"] = r.stderr[-2000:]
        doc["runs"][name] = entry
        print(f"{name}: rc {r.returncode} {entry['seconds']} s", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return doc


def compare(new: dict, old: dict) -> int:
    bad = 0
    for name, o in old["runs"].items():
        n = new["runs"].get(name)
        if n is None:
            continue
        keys = sorted((set(o) | set(n)) - {"seconds", "argv"})
        diff = [k for k in keys if o.get(k) != n.get(k)]
        print(f"{'SAME' if not diff else 'DIFF'} {name}" + (f": {diff}" if diff else ""))
        bad += bool(diff)
    print(f"{bad} of {len(old['runs'])} runs differ")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--only", choices=("all", "tiny", "smollm2"), default="all")
    ap.add_argument("--tiny", default=None, help="folder holding model/ and text.txt (made if absent)")
    ap.add_argument("--python", default=None, help="interpreter that runs emprune (default: this one)")
    ap.add_argument("--compare", default=None, help="an earlier output: print which runs differ")
    args = ap.parse_args()
    doc = run(args)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return compare(doc, json.loads(Path(args.compare).read_text())) if args.compare else 0


if __name__ == "__main__":
    sys.exit(main())
