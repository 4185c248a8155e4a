"""prune_lm with the OBS update, N:M, --target-sparsity and OWL allocation, on the tiny LLaMA."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from emprune.decide.allocate import outlier_ratio, owl_sparsities, parse_nm  # noqa: E402
from emprune.jobs.prune_lm import beta_for_sparsity, prune_lm  # noqa: E402
from emprune.models import loading  # noqa: E402
from emprune.structure.targets import block_targets as target_modules  # noqa: E402

from tiny_llama import save_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny(folder)
    return folder


def _fresh(folder):
    return loading.load_causal_lm(folder)[0]


def _calib(n=4, seqlen=32):
    return torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _layer_error(model, dense, calib, names) -> float:
    """Sum over the MLP targets ``names`` of ||(W_dense - W) X||, X the dense model's inputs."""
    xs: dict[str, list[torch.Tensor]] = {}
    mods = target_modules(dense, "mlp")
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: xs.setdefault(n, []).append(i[0].detach()))
             for n, m in mods.items()]
    with torch.no_grad():
        dense(calib)
    for h in hooks:
        h.remove()
    pruned = target_modules(model, "mlp")
    total = 0.0
    for n in names:
        m = mods[n]
        x = torch.cat(xs[n]).reshape(-1, m.in_features)
        total += float(((m.weight - pruned[n].weight).detach() @ x.T).norm())
    return total


def test_obs_keeps_emp_counts_exactly_and_reconstructs(tiny):
    calib = _calib()
    plain, obs = _fresh(tiny), _fresh(tiny)
    a = prune_lm(plain, calib, progress=False, update="none")  # counts of |W|, Wanda picks which
    b = prune_lm(obs, calib, progress=False, update="obs")
    assert a.counts.keys() == b.counts.keys()
    for n in a.counts:
        assert torch.equal(a.counts[n], b.counts[n])  # EMP's counts, exactly
        w = target_modules(obs, "mlp")[n].weight
        assert torch.equal((w != 0).sum(1), b.counts[n])  # the report is the final mask
    assert b.pruned_fraction == a.pruned_fraction
    from emprune.jobs.prune_lm import DEFAULT_DAMP, DEFAULT_DAMP_KIND

    assert b.info["update"]["method"] == "obs" and b.info["update"]["damp"] == DEFAULT_DAMP
    assert b.info["update"]["damp_kind"] == DEFAULT_DAMP_KIND
    # first block: both see the same (dense) inputs, so OBS must reconstruct them better
    dense = _fresh(tiny)
    first = {n: m for n, m in target_modules(dense, "mlp").items() if ".layers.0." in n}
    assert first
    err_plain = _layer_error(plain, dense, calib, first)
    err_obs = _layer_error(obs, dense, calib, first)
    assert err_obs < err_plain


def test_sparsity_with_obs_is_sparsegpt_and_nm_patterns(tiny):
    calib = _calib()
    m = _fresh(tiny)
    r = prune_lm(m, calib, progress=False, sparsity=0.5, update="obs", targets="linear")
    assert abs(r.pruned_fraction - 0.5) < 0.01
    for nm_update in (None, "obs"):
        m = _fresh(tiny)
        r = prune_lm(m, calib, progress=False, nm="2:4", update=nm_update, targets="linear")
        assert r.pruned_fraction == 0.5 and r.info["nm"] == "2:4"
        for n, mod in target_modules(m, "linear").items():
            groups = (mod.weight != 0).reshape(mod.out_features, -1, 4).sum(-1)
            assert bool((groups <= 2).all()), n
            assert torch.equal(r.counts[n], torch.full((mod.out_features,), mod.in_features // 2))


def test_nm_with_wanda_keeps_the_largest_scores(tiny):
    calib = _calib()
    m, ref = _fresh(tiny), _fresh(tiny)
    prune_lm(m, calib, progress=False, nm="1:4", criterion="magnitude")
    # magnitude needs no data: the kept entry of every group is the largest |W| of the group
    for n, mod in target_modules(m, "mlp").items():
        w0 = target_modules(ref, "mlp")[n].weight.reshape(mod.out_features, -1, 4).abs()
        kept = (mod.weight != 0).reshape(mod.out_features, -1, 4)
        assert torch.equal(kept.float().argmax(-1), w0.argmax(-1))


def test_target_sparsity_finds_beta_and_reports_it(tiny):
    calib = _calib()
    for p in (0.5, 0.7):
        m = _fresh(tiny)
        r = prune_lm(m, calib, progress=False, target_sparsity=p)
        info = r.info["beta_for_target"]
        assert info["requested"] == p
        # counts from |W| (the default recipe) do not change before a block is decided: exact
        assert abs(r.pruned_fraction - info["dense_estimate"]) < 1e-12
        assert abs(r.pruned_fraction - p) < 0.002
        assert r.info["beta"] == pytest.approx(info["beta"])
    m = _fresh(tiny)
    r = prune_lm(m, calib, progress=False, target_sparsity=0.5, recipe="paper", update="obs")
    assert abs(r.pruned_fraction - 0.5) < 0.05  # Wanda counts on pruned inputs: close, not exact


def test_beta_search_is_monotone_step_exact():
    from emprune.jobs.prune_lm import plan as make_plan

    lin = {"a": torch.nn.Linear(10, 3), "b": torch.nn.Linear(10, 2)}
    neffs = {"a": torch.tensor([2.5, 7.0, 10.0], dtype=torch.float64), "b": torch.tensor([4.0, 1.0], dtype=torch.float64)}
    plan = make_plan(criterion="magnitude")
    beta, frac = beta_for_sparsity(neffs, lin, plan, 0.6)
    assert frac == pytest.approx(0.6)  # 30 of 50 pruned: reachable exactly
    k = [max(1, min(10, int(beta * v))) for v in (2.5, 7.0, 10.0, 4.0, 1.0)]
    assert 50 - sum(k) == 30


def test_owl_formula_and_run(tiny):
    sp = owl_sparsities([1.0, 2.0, 3.0, 6.0], 0.6)
    assert sum(sp) / 4 == pytest.approx(0.6)
    assert max(sp) - min(sp) == pytest.approx(0.16)  # spread 2 * lambda
    assert sp[0] > sp[-1]  # more outliers -> fewer pruned
    assert owl_sparsities([2.0, 2.0], 0.5) == [0.5, 0.5]
    s = torch.ones(100)
    s[:3] = 100.0
    assert outlier_ratio([s]) == pytest.approx(0.03)
    m = _fresh(tiny)
    r = prune_lm(m, _calib(), progress=False, sparsity=0.6, allocation="owl", update="obs")
    layer_sp = r.info["owl"]["layer_sparsity"]
    assert len(layer_sp) == 3 and sum(layer_sp) / 3 == pytest.approx(0.6)
    assert abs(r.pruned_fraction - 0.6) < 0.01


@pytest.mark.parametrize("kwargs, msg", [
    ({"update": "sgd"}, "update must be"),
    ({"update": "obs", "damp": -0.1}, "damp"),
    ({"nm": "4:2"}, "1 <= N < M"),
    ({"nm": "x"}, "N:M"),
    ({"nm": "2:4", "sparsity": 0.5}, "excludes"),
    ({"allocation": "owl"}, "give sparsity"),
    ({"allocation": "best", "sparsity": 0.5}, "allocation must be"),
    ({"update": "obs", "scope": "global"}, "global"),
    ({"target_sparsity": 1.5}, r"\(0, 1\)"),
    ({"target_sparsity": 0.5, "sparsity": 0.5}, "excludes"),
])
def test_errors_are_one_line(tiny, kwargs, msg):
    with pytest.raises(ValueError, match=msg) as e:
        prune_lm(_fresh(tiny), _calib(), progress=False, **kwargs)
    assert "\n" not in str(e.value)


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm((1, 8)) == (1, 8) and parse_nm(None) is None


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("extra, fragment", [
    (["--nm", "4:2"], "--nm"),
    (["--nm", "2"], "--nm"),
    (["--damp", "-1", "--update", "obs"], "--damp"),
    (["--damp", "nan", "--update", "obs"], "--damp"),
    (["--target-sparsity", "1"], "--target-sparsity"),
    (["--target-sparsity", "0"], "--target-sparsity"),
    (["--update", "sgd"], "--update"),
    (["--allocation", "best"], "--allocation"),
])
def test_cli_bad_values_refused_at_parse_time(extra, fragment, capsys):
    from emprune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["prune", "M", "--out", "o", *extra])
    assert e.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and fragment in err[0] and "Traceback" not in err[0]


@pytest.mark.parametrize("extra, fragment", [
    (["--nm", "2:4", "--sparsity", "0.5"], "--nm"),
    (["--allocation", "owl"], "--sparsity"),
    (["--damp", "0.1", "--update", "none"], "--update obs"),
    (["--damp", "0.1", "--sparsity", "0.5"], "--update obs"),  # a baseline: auto adds no update
    (["--damp", "0.1", "--criterion", "magnitude"], "--update obs"),  # data-free: auto adds no update
    (["--target-sparsity", "0.5", "--sparsity", "0.3"], "--target-sparsity"),
    (["--update", "obs", "--scope", "global"], "--scope"),
])
def test_cli_conflicts_before_the_model_loads(tiny, tmp_path, monkeypatch, capsys, extra, fragment):
    from emprune.cli import main

    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["prune", str(tiny), "--out", str(tmp_path / "o"), "--quiet", *extra]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and fragment in err[0], err


def test_cli_prune_with_update_nm_and_target(tiny, tmp_path, capsys):
    import json

    from emprune.cli import main

    base = ["prune", str(tiny), "--calib-samples", "3", "--seqlen", "16", "--quiet",
            "--calib-text", str(tiny.parent / "calib.txt")]
    from tiny_llama import TEXT
    (tiny.parent / "calib.txt").write_text(TEXT)
    assert main([*base, "--out", str(tmp_path / "a"), "--update", "obs", "--damp", "0.05",
                 "--target-sparsity", "0.6"]) == 0
    info = json.loads((tmp_path / "a" / "emprune.json").read_text())
    assert info["update"]["damp"] == 0.05 and info["beta_for_target"]["requested"] == 0.6
    assert abs(info["summary"]["pruned_fraction"] - 0.6) < 0.01
    assert main([*base, "--out", str(tmp_path / "b"), "--nm", "2:4", "--targets", "linear"]) == 0
    info = json.loads((tmp_path / "b" / "emprune.json").read_text())
    assert info["nm"] == "2:4" and info["summary"]["pruned_fraction"] == 0.5
    assert main([*base, "--out", str(tmp_path / "c"), "--sparsity", "0.5", "--allocation", "owl",
                 "--update", "obs"]) == 0
    info = json.loads((tmp_path / "c" / "emprune.json").read_text())
    assert len(info["owl"]["layer_sparsity"]) == 3


def test_benchmark_quick_on_tiny_model_writes_partial_results(tiny, tmp_path):
    """benchmarks/llm_reconstruction.py --quick on the tiny LLaMA: md/json/png, every row both texts."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("matplotlib")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rec"
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": str(root / "src")}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "llm_reconstruction.py"), "--quick",
                           "--model", str(tiny), "--levels", "emp", "--rows", "emp-wanda,emp-obs,nm-sparsegpt",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = doc["sections"][0]["rows"]
    assert [r["row"] for r in rows] == ["emp-wanda", "emp-obs", "nm-sparsegpt"]
    assert rows[0]["pruned_fraction"] == rows[1]["pruned_fraction"]  # EMP's counts, with and without OBS
    assert all(r["ppl"] > 0 and r["ppl_other"] > 0 for r in rows)
    assert doc["status"] == "complete" and out.with_suffix(".png").stat().st_size > 0
    assert "EMP + OBS update" in out.with_suffix(".md").read_text()

    # --resume: the finished rows are kept as they are, only the missing one runs, both commands listed
    cmd = [sys.executable, str(root / "benchmarks" / "llm_reconstruction.py"), "--quick", "--model", str(tiny),
           "--levels", "emp", "--out", str(out), "--resume"]
    proc = subprocess.run([*cmd, "--rows", "emp-wanda,wanda,nm-sparsegpt"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads(out.with_suffix(".json").read_text())
    assert [r["row"] for r in again["sections"][0]["rows"]] == ["emp-wanda", "emp-obs", "nm-sparsegpt", "wanda"]
    assert again["sections"][0]["rows"][:3] == rows and again["dense"] == doc["dense"]
    assert len(again["commands"]) == 2 and "--resume" in out.with_suffix(".md").read_text()
    # other dampening settings: refused in one line, the table untouched
    proc = subprocess.run([*cmd, "--damps", "0.5"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(out.with_suffix(".json").read_text()) == again
