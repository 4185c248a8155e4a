"""Smoke test of benchmarks/bench_rule.py --quick: every case runs, writes its JSON and markdown,
and the answers the benchmark checks (masks equal to the sort reference, counts equal to a
float64 computation, exact global counts, the mass bound) hold.  Times are printed by the
benchmark, never asserted here (machines are noisy); memory is checked against the issue's
bound only for the global scope, where a regression (e.g. an int64 copy of a mask) is large.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_rule_quick(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    cases = "row-fp32,row-bf16,row-fp32-pytorch,row-bf16-pytorch,global,prune-row,prune-layer,prune-global"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_rule.py"), "--quick", "--repeat", "1",
         "--cases", cases, "--json", str(out_json), "--md", str(out_md)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    assert data["command"].startswith("python benchmarks/bench_rule.py --quick")
    res = {r["case"]: r for r in data["results"]}
    assert set(res) == {"row-float32", "row-bfloat16", "row-float32-pytorch", "row-bfloat16-pytorch",
                        "global-135m", "prune-row-135m", "prune-layer-135m", "prune-global-135m"}
    for name, r in res.items():
        if name.startswith("row"):
            assert r["mask_equal_reference"] and r["exact_counts"] and r["counts_equal_float64"], name
            assert r["ours_s"] > 0 and r["reference_s"] > 0 and r["clone_s"] > 0
    assert res["row-float32-pytorch"]["path"] == "pytorch"
    g = res["global-135m"]
    assert g["exact_count"] and g["kept"] == g["k"] and 0.5 < g["n_eff_over_n"] < 0.75  # Gaussian: 2/pi
    assert g["peak_over_largest"] <= 2.0, g  # the memory bound (no model-sized temporaries)
    for scope in ("row", "layer", "global"):
        p = res[f"prune-{scope}-135m"]
        assert p["bound_ok"] and p["report_matches_weights"] and 0.0 < p["sparsity"] < 1.0, p
        assert p["peak_over_largest"] <= 3.0, p  # scores + mask + chunk scratch (~1.7x), no model-sized copies
    assert res["prune-global-135m"]["mass"] >= res["prune-global-135m"]["bound"]
    md = out_md.read_text()
    assert "| global-135m |" in md and "| row-bfloat16-pytorch | pytorch |" in md
