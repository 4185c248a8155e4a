"""Smoke tests of the small-model benchmarks (benchmarks/small_models/*.py --quick).

Each script runs in its --quick mode into a temporary folder; the four run concurrently (one
torch thread each) and the whole file takes well under two minutes on a 2-core machine.  Needs
the benchmark extras (mlxtend, scikit-image, matplotlib); skipped without them.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlxtend")
pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "small_models"
SCRIPTS = {
    "mlp": ("mlp_beta_sweep.py", ["results.md", "results.json", "mlp_sweep.png", "mlp_layers.png"]),
    "cnn": ("cnn_vgg.py", ["results.md", "results.json", "cnn_sweep.png", "cnn_layers.png"]),
    "kan": ("kan_nodes.py", ["results.md", "results.json", "kan_sweep.png", "kan_nodes.png"]),
    "image": ("image_pixels.py", ["results.md", "results.json", "image_sweep.png", "image_astronaut.png",
                                  "image_patch_counts.png"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every script's --quick mode once, concurrently; return {name: output folder}."""
    base = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, (script, _) in SCRIPTS.items():
        out = base / name
        procs[name] = (out, subprocess.Popen([sys.executable, str(BENCH / script), "--quick", "--out", str(out)],
                                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True))
    outs, logs = {}, {}
    for name, (out, proc) in procs.items():
        try:
            logs[name], _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            logs[name], _ = proc.communicate()
        outs[name] = (out, proc.returncode, logs[name])
    return outs


def _load(runs, name):
    out, rc, log = runs[name]
    assert rc == 0, f"{name} --quick failed:\n{log[-3000:]}"
    for f in SCRIPTS[name][1]:
        p = out / f
        assert p.exists() and p.stat().st_size > 0, f"{name}: missing {f}"
    md = (out / "results.md").read_text()
    assert "--quick" in md and "Command:" in md  # the exact command is recorded
    return json.loads((out / "results.json").read_text())


def _sp_ok(x):
    return x is not None and 0.0 <= x <= 1.0


def test_mlp_quick(runs):
    R = _load(runs, "mlp")
    assert R["quick"] and set(R["models"]) == {"FC2", "FC5"}
    for name, M in R["models"].items():
        assert min(M["dense_acc"]) > 0.5, f"{name} dense accuracy near chance"
        for scope in ("global", "row"):
            rows = sorted((r for r in M["sweep"] if r["emp_scope"] == scope), key=lambda r: r["beta"])
            sps = [r["emp"]["sparsity"] for r in rows]
            assert all(_sp_ok(s) for s in sps)
            assert all(a >= b for a, b in zip(sps, sps[1:])), "sparsity must not grow with beta"
            assert 0.05 < sps[[r["beta"] for r in rows].index(1.0)] < 0.6
            for r in rows:
                e = r["emp"]
                assert 1 <= e["kept"] <= e["total"] == M["targeted_weights"]
                assert e["kept"] == e["total"] - round(e["sparsity"] * e["total"])  # kept counts consistent
                assert 0.0 <= e["acc"] <= 1.0
                for b in r["baselines"].values():  # matched sparsity (up to per-row / per-layer rounding)
                    assert abs(b["sparsity"] - e["sparsity"]) < 0.011 and 0.0 <= b["acc"] <= 1.0
                # global magnitude at EMP-global's sparsity is EMP-global's own mask
                if scope == "global":
                    assert r["baselines"]["global_magnitude"]["acc"] == e["acc"]
        lay = M["layers_beta1"]["row"]
        assert all(0 < l["kept"] <= l["total"] and 1 <= l["neff_mean"] <= l["n_per_unit"] for l in lay)


def test_cnn_quick(runs):
    R = _load(runs, "cnn")
    S = R["seeds"][0]
    assert S["dense_acc"] > 0.5 and S["flops_dense"] > 0
    by = {e["criterion"]: e for e in S["emp"] if e["beta"] == 1.0}
    assert set(by) == set(R["criteria"])
    for c, e in by.items():
        assert _sp_ok(e["sparsity"]) and 0.0 <= e["acc"] <= 1.0
        assert 0 < e["flops_effective"] <= e["flops_dense"] == S["flops_dense"]
        assert e["kept"] == e["total"] - round(e["sparsity"] * e["total"])
        assert sum(l["kept"] for l in e["layers"]) == e["kept"]
        for b in e["baselines"].values():  # matched sparsity (up to per-layer rounding)
            assert abs(b["sparsity"] - e["sparsity"]) < 0.01
    assert 0.05 < by["magnitude"]["sparsity"] < 0.8
    # count_by=magnitude: the count comes from magnitude's N_eff, so the sparsity is magnitude's
    for v in ("taylor+count_by_magnitude", "gradient+count_by_magnitude"):
        assert by[v]["kept"] == by["magnitude"]["kept"]


def test_kan_quick(runs):
    R = _load(runs, "kan")
    S = R["seeds"][0]
    assert S["dense_acc"] > 0.5 and S["params"] == 9 * (784 * 64 + 64 * 10)
    assert 1 <= S["node_neff"] <= 64
    ks = []
    for e in sorted(S["emp"], key=lambda e: e["beta"]):
        assert 1 <= e["kept"] <= 64 and len(e["kept_nodes"]) == e["kept"]
        assert e["params"] == 9 * (784 * e["kept"] + e["kept"] * 10)  # physically shrunk
        assert e["shrunk_equals_masked"] and 0.0 <= e["acc"] <= 1.0
        assert e["kept"] == math.floor(e["beta"] * S["node_neff"] * (1 + 1e-12)) or e["kept"] in (1, 64)
        ks.append(e["kept"])
    assert ks == sorted(ks)


def test_image_quick(runs):
    R = _load(runs, "image")
    I = R["images"]["astronaut"]
    for mode in ("channel", "patch"):
        es = sorted(I["modes"][mode], key=lambda e: e["beta"])
        sps = [e["sparsity"] for e in es]
        assert all(_sp_ok(s) for s in sps) and all(a >= b for a, b in zip(sps, sps[1:]))
        e1 = next(e for e in es if e["beta"] == 1.0)
        assert 0.05 < e1["sparsity"] < 0.6
        assert e1["psnr"] is not None and 15 < e1["psnr"] < 80 and 0.5 < e1["ssim"] <= 1.0
        rnd = e1["baselines"]["random_same_count"]
        assert rnd["psnr"] < e1["psnr"]  # EMP keeps the largest deviations: beats random pixels
    e1 = next(e for e in I["modes"]["patch"] if e["beta"] == 1.0)
    assert sum(e1["kept_hist"]) * 16 * (1 - e1["sparsity"]) == pytest.approx(
        sum(k * n for k, n in enumerate(e1["kept_hist"])), rel=1e-9)
    assert abs(e1["baselines"]["uniform_per_patch"]["sparsity"] - e1["sparsity"]) < 1e-9
