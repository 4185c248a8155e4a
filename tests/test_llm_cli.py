"""LLM pruning pipeline and the prune / eval / compare / demo commands, on a tiny random LLaMA.

Everything here runs in seconds: a 3-block LLaMA with a byte-level BPE tokenizer trained on the
spot, calibration and evaluation text written to temporary files (no network, no shared data).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from emprune.core import rule  # noqa: E402
from emprune.criteria import InputNorms, Wanda  # noqa: E402
from emprune.cli import main  # noqa: E402
from emprune.models import layerwise as calibrate  # noqa: E402
from emprune.jobs import compare  # noqa: E402
from emprune.models import checkpoint, loading  # noqa: E402
from emprune.decide import recipes  # noqa: E402
from emprune.decide.allocate import spread  # noqa: E402
from emprune.jobs import prune_lm as P  # noqa: E402
from emprune.structure.targets import block_targets  # noqa: E402

TINY = ["--calib-samples", "3", "--seqlen", "16", "--quiet"]


@pytest.fixture
def model(tiny):
    return loading.load_causal_lm(tiny[0])[0]


def _calib(model, n=3, seqlen=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=g)


def _mlp_weights(m):
    return {n: mod.weight.detach().clone() for n, mod in block_targets(m, "mlp").items()}


# ---------------------------------------------------------------- library: prune_lm


def test_paper_recipe_is_per_row_emp_on_wanda_scores(model):
    """Block 0 sees the embeddings in every chain, so its masks must equal EMP applied by hand
    to Wanda scores computed from hand-collected input norms."""
    calib = _calib(model)
    dense = _mlp_weights(model)
    norms = InputNorms()
    calibrate.prune_layerwise(loading.load_causal_lm(model.name_or_path)[0], calib, "mlp", lambda i, lin: None,
                              [norms], progress=False)
    seen = norms.sq
    res = P.prune_lm(model, calib, criterion="wanda", recipe="paper", progress=False)
    for rel in ("gate_proj", "up_proj", "down_proj"):
        name = f"model.layers.0.mlp.{rel}"
        scores = dense[name].abs() * seen[name].sqrt().float()
        mask = rule.keep_mask(scores, 1.0, dim=1)
        w = block_targets(model, "mlp")[name].weight
        assert torch.equal(w != 0, mask & (dense[name] != 0)), name
        assert torch.equal(res.counts[name], mask.sum(1))
    assert res.info["recipe"]["name"] == "paper" and res.info["count_by"] == "wanda"
    assert res.info["calibration"]["mode"].startswith("layer-wise")


def test_default_recipe_counts_equal_emp_magnitude_counts(model, tiny):
    """count_by=magnitude: the counts are EMP-magnitude's (data-free); OBS chooses which and
    updates the rest (the default recipe's update, applied by update="auto")."""
    calib = _calib(model)
    dense = _mlp_weights(model)
    res = P.prune_lm(model, calib, criterion="wanda", recipe="default", progress=False)
    assert recipes.DEFAULT_PRUNE == "count-magnitude-obs" and res.info["recipe"]["count_by"] == "magnitude"
    assert res.info["recipe"]["update"] == "obs" and res.info["update"]["method"] == "obs"
    assert "(OBS update)" in P.summary_line(res)
    for name, w in dense.items():
        assert torch.equal(res.counts[name], rule.keep_count(w.abs(), 1.0, dim=1)), name
    other = loading.load_causal_lm(tiny[0])[0]
    mag = P.prune_lm(other, None, criterion="magnitude", recipe="paper", progress=False)
    assert mag.info["calibration"]["mode"].startswith("none")
    assert all(torch.equal(mag.counts[n], res.counts[n]) for n in dense)
    assert 0.3 < res.pruned_fraction < 0.45  # ~1 - 2/pi for Gaussian-like weights


def test_auto_update_applies_only_where_emp_decides_with_activations(model, tiny):
    """update="auto": OBS for the default recipe with an activation-aware criterion; never for
    the fixed-sparsity/N:M baselines, data-free criteria (no calibration needed), the global
    scope, the paper's recipe or update="none"; update="obs" stays available everywhere."""
    calib = _calib(model)
    dense = _mlp_weights(model)

    def upd(**kw):
        res = P.prune_lm(model, kw.pop("calib", calib), progress=False, **kw)
        for name, mod in block_targets(model, "mlp").items():
            mod.weight.data.copy_(dense[name])
        return (res.info["update"] or {}).get("method")

    assert upd(criterion="wanda") == "obs"
    assert upd(criterion="wanda", update="none") is None and upd(criterion="wanda", update=None) is None
    assert upd(criterion="wanda", sparsity=0.5) is None and upd(criterion="wanda", nm="2:4") is None
    assert upd(criterion="wanda", recipe="paper") is None and upd(criterion="wanda", recipe="count-magnitude") is None
    assert upd(criterion="wanda", scope="global") is None
    assert upd(criterion="magnitude", calib=None) is None  # data-free stays data-free
    assert upd(criterion="wanda", sparsity=0.5, update="obs") == "obs"  # SparseGPT
    assert not P.plan(criterion="magnitude", update="auto").needs_data
    with pytest.raises(ValueError, match="update must be"):
        P.plan(update="sgpt")


def test_fixed_sparsity_and_matched_counts(model, tiny):
    calib = _calib(model)
    dense = _mlp_weights(model)
    fixed = P.prune_lm(model, calib, criterion="wanda", sparsity=0.5, progress=False)
    assert fixed.pruned_fraction == pytest.approx(0.5)
    assert fixed.report.beta is None and fixed.info["count_by"] == "fixed"
    for name, mod in block_targets(model, "mlp").items():
        assert ((mod.weight == 0).sum(1) >= mod.weight.shape[1] // 2).all()
        mod.weight.data.copy_(dense[name])  # restore
    ref = P.prune_lm(model, calib, criterion="wanda", recipe="paper", progress=False)
    for name, mod in block_targets(model, "mlp").items():
        mod.weight.data.copy_(dense[name])
    matched = P.prune_lm(model, calib, criterion="magnitude", counts=ref.counts, counts_from="EMP-Wanda",
                         progress=False)
    assert matched.info["count_by"] == "matched to EMP-Wanda"
    for name, mod in block_targets(model, "mlp").items():
        assert torch.equal(matched.counts[name], ref.counts[name])
        # magnitude selection with those counts: the largest |W| of every row
        assert torch.equal(mod.weight != 0, rule.topk_mask(dense[name].abs(), ref.counts[name], dim=1)), name
    with pytest.raises(ValueError, match="either sparsity or counts"):
        P.prune_lm(model, calib, sparsity=0.5, counts=ref.counts, progress=False)
    # layer and global scopes keep the totals of per-row counts (compare's uniform/matched runs)
    for scope in ("layer", "global"):
        for name, mod in block_targets(model, "mlp").items():
            mod.weight.data.copy_(dense[name])
        res = P.prune_lm(model, calib, criterion="magnitude", scope=scope, counts=ref.counts, progress=False)
        kept = {n: int(torch.count_nonzero(m.weight)) for n, m in block_targets(model, "mlp").items()}
        if scope == "layer":
            assert kept == {n: int(k.sum()) for n, k in ref.counts.items()}
        assert sum(kept.values()) == sum(int(k.sum()) for k in ref.counts.values())
        assert res.report.kept == sum(kept.values())


def test_spread_layer_count_over_rows():
    assert torch.equal(spread(10, 4), torch.tensor([3, 3, 2, 2]))
    assert torch.equal(spread(2, 4), torch.tensor([1, 1, 1, 1]))  # every row keeps >= 1


@pytest.mark.parametrize("recipe", ["floor", "count-wanda-clip", "count-wanda-sqrt", "layer", "layer-magnitude"])
def test_other_recipes(model, recipe):
    calib = _calib(model)
    res = P.prune_lm(model, calib, criterion="wanda", recipe=recipe, progress=False)
    assert 0.0 < res.pruned_fraction < 1.0
    layers = res.info["layers"]
    if recipe == "floor":
        assert all(l["max_unit_sparsity"] <= 0.7 + 1e-9 for l in layers)
    if recipe.startswith("layer"):
        for l in layers:  # one count per matrix, spread evenly: rows differ by at most one
            k = res.counts[l["name"]]
            assert int(k.max() - k.min()) <= 1
            assert int(k.sum()) == int(math.floor(l["layer_neff"] * (1 + 2**-48)))


def test_old_recipe_names_warn_and_run_the_renamed_recipe():
    """prune's old ``clip`` is ``count-wanda-clip`` (names are unique across both jobs now)."""
    with pytest.warns(DeprecationWarning, match="count-wanda-clip"):
        old = recipes.get_recipe("clip", "prune")
    assert old is recipes.RECIPES["count-wanda-clip"]
    with pytest.warns(DeprecationWarning, match="floor-comp"):
        assert recipes.get_recipe("floor", "shrink") is recipes.RECIPES["floor-comp"]
    assert recipes.get_recipe("floor", "prune") is recipes.RECIPES["floor"]  # prune's own floor


def test_global_scope_one_dense_pass(model, tiny):
    calib = _calib(model)
    dense = _mlp_weights(model)
    res = P.prune_lm(model, calib, criterion="wanda", scope="global", recipe="paper", progress=False)
    assert res.info["calibration"]["mode"].startswith("one dense pass")
    # one decision over all layers: the global N_eff of the dense-pass Wanda scores
    norms = InputNorms()
    calibrate.prune_layerwise(loading.load_causal_lm(tiny[0])[0], calib, "mlp", lambda i, lin: None, [norms],
                              progress=False)
    scores = [dense[n].abs() * norms.sq[n].sqrt().float() for n in dense]
    neff, n = rule.global_effective_number(scores)
    assert res.report.kept == int(math.floor(neff * (1 + 2**-48)))
    assert res.info["summary"]["global_neff"] == pytest.approx(neff)


def test_magnitude_without_calibration_and_errors(model):
    res = P.prune_lm(model, None, criterion="magnitude", targets="linear", progress=False)
    assert res.info["calibration"]["tokens"] == 0
    assert len(res.info["layers"]) == 3 * 7
    with pytest.raises(ValueError, match="calibration"):
        P.prune_lm(model, None, criterion="wanda", progress=False)
    with pytest.raises(ValueError, match="criterion"):
        P.prune_lm(model, None, criterion="taylor", progress=False)
    with pytest.raises(ValueError, match="recipe"):
        P.prune_lm(model, None, criterion="magnitude", recipe="nope", progress=False)
    with pytest.raises(ValueError, match="scope='row'"):
        P.prune_lm(model, None, criterion="magnitude", recipe="layer", scope="layer", progress=False)
    with pytest.raises(ValueError, match="count_by"):
        P.get_recipe("paper", count_by="activations")


def test_dense_zeros_are_not_counted_as_pruned(model):
    w = block_targets(model, "mlp")["model.layers.1.mlp.up_proj"].weight
    w.data[:, :8] = 0  # pre-existing exact zeros (like GGUF's)
    res = P.prune_lm(model, None, criterion="magnitude", sparsity=0.25, progress=False)
    s = res.info["summary"]
    assert s["pruned_fraction"] == pytest.approx(0.25, abs=1e-3)
    assert s["dense_zeros_fraction"] == pytest.approx(8 * w.shape[0] / s["targeted_weights"])
    # 8 of 64 columns were zero: magnitude prunes them first, so zeros == pruned there
    assert s["zeros_fraction"] == pytest.approx(s["pruned_fraction"])
    lay = {l["name"]: l for l in res.info["layers"]}["model.layers.1.mlp.up_proj"]
    assert lay["dense_zeros"] == 8 * w.shape[0] and lay["pruned_fraction"] == pytest.approx(0.25, abs=0.02)


def test_units_pruned_above_95_percent_are_warned(model):
    """One massive input feature makes the Wanda scores of every down_proj row one spike:
    the paper recipe keeps ~1 entry per row; the report warns."""
    down = block_targets(model, "mlp")["model.layers.0.mlp.down_proj"]
    wanda = Wanda()
    sq = torch.ones(down.in_features, dtype=torch.float64)
    sq[3] = 1e12
    wanda.set_norms("d", sq)
    from emprune.decide.scopes import Target, decide

    d = next(decide([Target("d", down.weight.shape, lambda: wanda("d", down))], "row", 1.0))
    assert int(d.k.max()) <= 2
    from emprune.act.report import PruneReport

    rep = PruneReport("wanda", "wanda", "row", 1.0, None, None)
    rep.add(d, int((~d.mask).sum()))
    assert rep.warnings and "above 95%" in rep.warnings[0]
    # end to end: a huge weight in one row of gate_proj collapses that row under magnitude EMP
    gate = block_targets(model, "mlp")["model.layers.2.mlp.gate_proj"]
    gate.weight.data[5, 7] = 1e4
    res = P.prune_lm(model, None, criterion="magnitude", recipe="paper", progress=False)
    assert res.info["layers_with_units_over_95pct"] == ["model.layers.2.mlp.gate_proj"]
    assert res.report.warnings and "above 95%" in P.summary_line(res)


def test_calibration_batches_give_same_statistics():
    """Batched block forwards (kwargs captured for one sample, broadcast) give the same sums as
    one sample at a time, with eager attention (an explicit mask tensor) and with SDPA."""
    for impl in ("eager", "sdpa"):
        torch.manual_seed(1)
        cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, attn_implementation=impl)
        m = LlamaForCausalLM(cfg).eval()
        toks = torch.randint(0, 100, (5, 12))
        got = []
        for bs in (1, 2, 8):
            norms = InputNorms()
            calibrate.prune_layerwise(m, toks, "linear", lambda i, lin: None, [norms], progress=False, batch_size=bs)
            got.append(norms.sq)
        for other in got[1:]:
            for n in got[0]:
                torch.testing.assert_close(other[n], got[0][n], rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- CLI


def test_cli_prune_saves_a_loadable_model(tiny, tmp_path, capsys):
    folder, text = tiny
    out = tmp_path / "pruned"
    rc = main(["prune", str(folder), "--out", str(out), "--calib-text", str(text), *TINY])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "counted against the dense model" in printed and str(out) in printed
    rep = json.loads((out / checkpoint.REPORT_NAME).read_text())
    for key in ("criterion", "scope", "beta", "recipe", "calibration", "summary", "layers", "seconds",
                "peak_memory", "versions", "command"):
        assert key in rep, key
    assert rep["criterion"] == "wanda" and rep["scope"] == "row" and rep["beta"] == 1.0
    assert rep["recipe"]["count_by"] == "magnitude"  # the default recipe
    assert rep["calibration"]["n_samples"] == 3 and rep["calibration"]["seqlen"] == 16
    assert rep["command"].startswith("emprune prune")
    assert rep["peak_memory"]["peak_rss_bytes"] > 0
    assert len(rep["layers"]) == 9 and all("neff_mean" in l and "pruned_fraction" in l for l in rep["layers"])
    pruned = AutoModelForCausalLM.from_pretrained(out)
    dense = AutoModelForCausalLM.from_pretrained(folder)
    sd, dd = pruned.state_dict(), dense.state_dict()
    n_zero = n_total = 0
    for name, p in sd.items():
        if ".mlp." in name:
            n_zero += int((p == 0).sum())
            n_total += p.numel()
        else:  # attention, norms, embeddings and lm_head untouched
            assert torch.equal(p, dd[name]), name
    assert n_zero / n_total == pytest.approx(rep["summary"]["zeros_fraction"])
    # the folder refuses to be overwritten silently
    assert main(["prune", str(folder), "--out", str(out), "--calib-text", str(text), *TINY]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prune", str(folder), "--out", str(out), "--calib-text", str(text), "--overwrite",
                 "--recipe", "paper", *TINY]) == 0
    assert json.loads((out / checkpoint.REPORT_NAME).read_text())["recipe"]["name"] == "paper"


@pytest.mark.parametrize("opts, check", [
    (["--criterion", "magnitude", "--sparsity", "0.5"], lambda r: abs(r["summary"]["pruned_fraction"] - 0.5) < 1e-9),
    (["--scope", "global", "--recipe", "paper"], lambda r: r["summary"]["global_neff"] > 0),
    (["--scope", "layer", "--targets", "linear"], lambda r: len(r["layers"]) == 21 and r["layers"][0]["unit"] == "layer"),
    (["--min-keep", "0.5", "--recipe", "paper"], lambda r: max(l["max_unit_sparsity"] for l in r["layers"]) <= 0.5),
    (["--count-by", "wanda-clip", "--beta", "1.1"], lambda r: r["count_by"] == "wanda-clip" and r["beta"] == 1.1),
])
def test_cli_prune_options(tiny, tmp_path, opts, check):
    folder, text = tiny
    out = tmp_path / "p"
    assert main(["prune", str(folder), "--out", str(out), "--calib-text", str(text), *opts, *TINY]) == 0
    assert check(json.loads((out / checkpoint.REPORT_NAME).read_text()))


def test_cli_prune_errors(tiny, tmp_path, capsys):
    folder, text = tiny
    assert main(["prune", str(folder), "--out", str(tmp_path / "x"), "--sparsity", "0.5", "--count-by",
                 "magnitude", *TINY]) == 2
    assert "no meaning with --sparsity" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "y"), *TINY]) == 2
    assert main(["prune", str(folder), "--out", str(tmp_path / "z"), "--calib-text", str(tmp_path / "no.txt"),
                 *TINY]) == 2
    assert "--calib-text" in capsys.readouterr().err


def test_cli_eval(tiny, tmp_path, capsys):
    folder, text = tiny
    j = tmp_path / "ppl.json"
    assert main(["eval", str(folder), "--ppl", "--eval-text", str(text), "--eval-tokens", "64", "--seqlen", "16",
                 "--json", str(j), "--quiet"]) == 0
    res = json.loads(j.read_text())
    assert res["windows"] == 4 and res["tokens_evaluated"] == 4 * 15 and res["ppl"] > 1
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", str(folder), "--eval-text", str(text)]) == 2  # --ppl missing
    assert main(["eval", str(folder), "--ppl", "--eval-text", "python-docs", "--eval-tokens", "40",
                 "--seqlen", "20", "--quiet"]) == 0


def test_cli_compare_and_matched_rows(tiny, tmp_path, capsys):
    folder, text = tiny
    prefix = tmp_path / "cmp" / "result"
    rc = main(["compare", str(folder), "--targets", "mlp,linear", "--out", str(prefix), "--calib-text", str(text),
               "--eval-text", str(text), "--eval-tokens", "64", "--other-tokens", "48", "--recipes", "floor",
               *TINY])
    assert rc == 0
    for ext in (".md", ".json", ".png"):
        assert prefix.with_suffix(ext).is_file(), ext
    doc = json.loads(prefix.with_suffix(".json").read_text())
    assert doc["status"] == "done" and doc["command"].startswith("emprune compare")
    assert doc["dense"]["ppl"] > 1 and doc["dense"]["ppl_other"] > 1
    assert [s["targets"] for s in doc["sections"]] == ["mlp", "linear"]
    for sec in doc["sections"]:
        rows = {r["key"]: r for r in sec["rows"]}
        labels = [r["label"] for r in sec["rows"]]
        assert labels[:5] == ["magnitude 50%", "Wanda 50%", "EMP-magnitude (paper)", "EMP-Wanda (paper)",
                              "EMP-Wanda (default)"]
        assert "EMP-Wanda (floor)" in labels and "magnitude @EMP-Wanda (paper) counts" in labels
        assert len(set(labels)) == len(labels)  # short and distinct
        for r in sec["rows"]:
            for key in ("ppl", "ppl_other", "pruned_fraction", "prune_seconds", "peak_memory"):
                assert r[key] is not None, (r["label"], key)
            # one vocabulary: pruned vs zeros fraction; the old key still written (same value)
            assert r["sparsity"] == r["pruned_fraction"] and r["max_unit_sparsity"] == r["max_unit_pruned_fraction"]
            assert r["zeros_fraction"] >= r["pruned_fraction"] - 1e-12
            if r["kind"] == "matched":  # exactly the reference's per-layer kept counts
                ref = rows[r["ref"]]
                assert r["per_layer_pruned_fraction"] == pytest.approx(ref["per_layer_pruned_fraction"])
            if r["kind"] == "uniform":  # the reference's pruned fraction, and its update
                ref = rows[r["ref"]]
                assert r["pruned_fraction"] == pytest.approx(ref["pruned_fraction"], abs=0.02)
                assert r["update"] == ref["update"]
                name = "OBS" if ref["update"] else "Wanda" if r["criterion"] == "wanda" else "magnitude"
                assert r["label"].startswith(f"{name} uniform @{100 * r['uniform_at']:.1f}%")
        # the default recipe: counts of EMP-magnitude, then OBS; so magnitude at its counts is
        # EMP-magnitude itself (run once), and Wanda at EMP-magnitude's counts is a run of its own
        default = next(r for r in sec["rows"] if r["label"] == "EMP-Wanda (default)")
        assert default["update"] == "obs" and not default["same_as"]
        assert rows[default["key"]]["per_layer_pruned_fraction"] == pytest.approx(
            next(r for r in sec["rows"] if r["label"] == "Wanda @EMP-magnitude (paper) counts")["per_layer_pruned_fraction"])
        mag = next(r for r in sec["rows"] if r["label"] == "EMP-magnitude (paper)")
        assert mag["same_as"] == ["magnitude @EMP-Wanda (default) counts"] and mag["update"] is None
        assert "OBS uniform @" in " ".join(labels)
    md = prefix.with_suffix(".md").read_text()
    assert "emprune compare" in md and "| dense |" in md and "targets: linear" in md
    assert "| EMP-magnitude (paper) [a] |" in md and "[a] also stands for magnitude @EMP-Wanda (default) counts" in md
    assert "**matched**" in md and "**uniform**" in md  # the names are explained under the tables
    assert "results:" in capsys.readouterr().out


def test_cli_demo(tiny, tmp_path, capsys):
    folder, text = tiny
    prefix = tmp_path / "demo" / "demo"
    assert main(["demo", "--model", str(folder), "--out", str(prefix), "--calib-samples", "2", "--seqlen", "16",
                 "--eval-tokens", "48", "--other-tokens", "48", "--calib-text", str(text), "--eval-text", str(text),
                 "--quiet"]) == 0
    doc = json.loads(prefix.with_suffix(".json").read_text())
    assert doc["status"] == "done" and doc["sections"][0]["targets"] == "mlp"
    out = capsys.readouterr()
    assert str(prefix.with_suffix(".md")) in out.out and "Results go to" in out.err


def test_compare_plan_dedupes():
    runs = compare.plan(1.0, 0.5)
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    kinds = [r.kind for r in runs]
    assert kinds.count("emp") == 3 and kinds.count("uniform") == 3
    paper_only = compare.plan(1.0, 0.5, extra_recipes=["paper"])  # paper again: folded
    assert len(paper_only) == len(runs)


def test_inspect_still_works(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(8, 32)}, str(tmp_path / "w.safetensors"))
    assert main(["inspect", str(tmp_path / "w.safetensors")]) == 0
    assert "N_eff" in capsys.readouterr().out
