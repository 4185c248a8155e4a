"""Depth (issue 25): ``emprune shrink --units layers`` removes whole decoder blocks.

* removal is exact: a model with blocks removed computes what the model with those blocks skipped
  (passing their input through) computes, for LLaMA and for Gemma-3's sliding/full pattern;
* the result is a stock model: plain ``AutoModelForCausalLM.from_pretrained`` reloads it with
  identical logits, and generation with the KV cache equals generation without it;
* the scores: block influence is ShortGPT's ``1 - mean cos(x_in, x_out)``, the loss score is the
  measured loss increase of the skipped block; the counts are EMP's (the paper's rule on the raw
  scores, the default on ``sqrt``) or ``keep=``;
* the command line, its errors (one line, before the load), heal and GGUF export of a depth cut,
  and the real SmolLM2-135M.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))

from emprune.cli import main  # noqa: E402
from emprune.core import rule  # noqa: E402
from emprune.criteria.block_scores import block_influence  # noqa: E402
from emprune.decide.sensitivity import block_sensitivity  # noqa: E402
from emprune.jobs.axes import shrink_layers  # noqa: E402
from emprune.jobs.shrink import lm_forward, lm_loss  # noqa: E402
from emprune.jobs.shrink_lm import shrink_lm  # noqa: E402
from emprune.structure.depth import keep_blocks, skipped  # noqa: E402


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return int(e.code)


def llama(layers: int = 6):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def gemma(layers: int = 7):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           max_position_embeddings=128)
    return Gemma3ForCausalLM(cfg).eval()


def qwen3(layers: int = 6):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                      use_sliding_window=True, sliding_window=4, max_window_layers=3)
    return Qwen3ForCausalLM(cfg).eval()


IDS = torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("make,drop", [(llama, [1, 3]), (gemma, [0, 5, 6]), (qwen3, [2, 4])])
def test_removed_blocks_compute_what_skipped_blocks_compute(make, drop):
    m = make()
    n = m.config.num_hidden_layers
    types = list(getattr(m.config, "layer_types", None) or [])
    with torch.no_grad(), skipped(m, drop):
        ref = m(IDS).logits
    with torch.no_grad():
        dense = m(IDS).logits
    assert not torch.equal(dense, ref)  # skipping changed something, and was undone:
    assert all("forward" not in vars(b) for b in m.model.layers)
    keep_blocks(m, [i for i in range(n) if i not in drop])
    with torch.no_grad():
        got = m(IDS).logits
    assert torch.equal(got, ref)
    assert m.config.num_hidden_layers == len(m.model.layers) == n - len(drop)
    assert [b.self_attn.layer_idx for b in m.model.layers] == list(range(n - len(drop)))
    if types:  # Gemma-3: the kept blocks keep their sliding / full attention
        assert m.config.layer_types == [t for i, t in enumerate(types) if i not in drop]
    # the KV cache: generation with it is generation without it
    g1 = m.generate(IDS[:1, :6], max_new_tokens=12, do_sample=False)
    g2 = m.generate(IDS[:1, :6], max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(g1, g2)


def test_keep_blocks_refuses_bad_indices():
    m = llama(3)
    with pytest.raises(ValueError, match="at least one"):
        keep_blocks(m, [])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        keep_blocks(m, [0, 3])
    assert keep_blocks(m, [0, 1, 2]) == [] and len(m.model.layers) == 3


def test_block_influence_is_one_minus_cosine():
    m = llama(4)
    bi = block_influence(m, [IDS[:2], IDS[2:]], lm_forward)
    # by hand: the cosine of every block's input and output, over all tokens
    ins, outs = [], []

    def keep(mod, a, kw, o):
        ins.append(a[0] if a else kw["hidden_states"])
        outs.append(o)

    hooks = [b.register_forward_hook(keep, with_kwargs=True) for b in m.model.layers]
    with torch.no_grad():
        m(IDS, use_cache=False)
    for h in hooks:
        h.remove()
    want = [1 - float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).mean())
            for x, y in zip(ins, outs)]
    assert bi.dtype == torch.float64 and torch.allclose(bi, torch.tensor(want, dtype=torch.float64), atol=1e-9)
    with skipped(m, [2]):  # a skipped block turns nothing: influence 0
        assert abs(float(block_influence(m, [IDS], lm_forward)[2])) < 1e-12


def test_block_sensitivity_is_the_loss_of_the_model_without_the_block():
    m = llama(4)
    sens = block_sensitivity(m, [IDS], lm_loss)
    with torch.no_grad():
        base = float(lm_loss(m, IDS).double())
    for i in (0, 3):
        cut = copy.deepcopy(m)
        keep_blocks(cut, [k for k in range(4) if k != i])
        with torch.no_grad():
            assert math.isclose(sens[i], float(lm_loss(cut, IDS).double()) - base, rel_tol=1e-6, abs_tol=1e-9)
    with torch.no_grad():
        assert float(lm_loss(m, IDS).double()) == base  # left as it was


@pytest.mark.parametrize("recipe,transform", [("paper", None), ("default", "sqrt")])
def test_counts_are_emps_and_the_lowest_blocks_go(recipe, transform):
    m = llama(8)
    rep = shrink_layers(m, IDS, recipe=recipe, layer_score="influence", layer_select="score")
    raw = torch.tensor(rep.extra["layer_scores"], dtype=torch.float64).clamp_min(0)
    counted = raw if transform is None else raw.sqrt()
    k = int(rule.keep_count_from_neff(rule.effective_number(counted), 1.0, 8))
    if recipe == "default":
        k = max(k, math.ceil(0.25 * 8))  # the recipe's 25 % floor
    g = rep.groups[0]
    assert g.kind == "layers" and g.units_before == 8 and g.units_after == k == len(m.model.layers)
    assert sorted(g.kept) == sorted(raw.argsort(descending=True)[:k].tolist())  # the highest scores stay
    assert rep.extra["removed_layers"] == [i for i in range(8) if i not in g.kept]
    assert rep.params_after == sum(p.numel() for p in m.parameters()) < rep.params_before


def test_greedy_choice_is_the_best_loss_one_block_at_a_time():
    """The greedy choice, by hand: among all blocks (8 blocks = the candidate count, so every
    block is a candidate) the one whose skipping gives the lowest loss, then the next on top."""
    from emprune.jobs.shrink import loss_batches

    m = llama(8)
    batches = loss_batches(IDS, True)

    def loss(skip):
        with skipped(m, skip):
            with torch.no_grad():
                return sum(float(lm_loss(m, b).double()) for b in batches) / len(batches)

    first = min(range(8), key=lambda i: (loss([i]), i))
    second = min((i for i in range(8) if i != first), key=lambda i: (loss([first, i]), i))
    rep = shrink_layers(copy.deepcopy(m), IDS, keep=6)
    assert rep.recipe["layer_select"] == "greedy" and rep.extra["removal_order"] == [first, second]
    assert rep.extra["removed_layers"] == sorted([first, second])
    # the paper's recipe chooses by score; so does a run without calibration tokens
    assert shrink_layers(copy.deepcopy(m), IDS, recipe="paper").recipe["layer_select"] == "score"
    assert shrink_layers(copy.deepcopy(m), None, keep=6).recipe["layer_score"] == "magnitude"
    with pytest.raises(ValueError, match="needs calibration"):
        shrink_layers(copy.deepcopy(m), None, keep=6, layer_select="greedy")


def test_greedy_candidates_are_the_lowest_influence_blocks():
    from emprune.jobs.axes import lowest_influence
    from emprune.jobs.shrink import loss_batches

    m = llama(6)
    batches = loss_batches(IDS, True)
    pick = lowest_influence(m, batches, 3)
    bi = block_influence(m, batches, lm_forward)
    assert pick([]) == bi.argsort(stable=True)[:3].tolist()
    with skipped(m, [int(bi.argmin())]):
        bi2 = block_influence(m, batches, lm_forward)
    assert pick([int(bi.argmin())]) == [int(i) for i in bi2.argsort(stable=True) if int(i) != int(bi.argmin())][:3]


def test_keep_a_count_of_blocks_and_dry_run():
    m = llama(6)
    before = [id(b) for b in m.model.layers]
    dry = shrink_layers(m, IDS, keep=4, dry_run=True)
    assert [id(b) for b in m.model.layers] == before and dry.groups[0].units_after == 4
    rep = shrink_layers(m, IDS, keep=4)
    assert len(m.model.layers) == 4 and rep.groups[0].kept == dry.groups[0].kept
    assert rep.params_after == dry.params_after  # equal blocks: the dry run's count is exact


def test_depth_then_width_one_report():
    m = llama(6)
    rep, info = shrink_lm(m, IDS, units="layers,mlp", keep=0.5, progress=False)
    kinds = [g.kind for g in rep.groups]
    assert kinds[0] == "layers" and kinds[1:] == ["mlp"] * 3 and len(m.model.layers) == 3
    assert rep.params_before > rep.params_after == sum(p.numel() for p in m.parameters())
    removed = info["extra"]["depth"]["removed_layers"]
    assert len(removed) == 3 and sorted(removed + rep.groups[0].kept) == list(range(6))


# ------------------------------------------------------------------ folders and the command line


@pytest.fixture(scope="module")
def dense(tiny):
    return tiny


def test_cli_depth_folder_is_stock_and_exact(dense, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import emprune

    d, text = dense
    out = tmp_path / "d"
    assert run(["shrink", str(d), "--out", str(out), "--units", "layers", "--keep", "2", "--calib-text", str(text),
                "--calib-samples", "4", "--seqlen", "16", "--quiet"]) == 0
    assert "layers" in capsys.readouterr().out
    meta = json.loads((out / "emprune.json").read_text())
    assert meta["layout"] == "uniform" and meta["summary"]["params_after"] < meta["summary"]["params_before"]
    assert meta["recipe"]["layer_score"] == "influence" and meta["recipe"]["layer_select"] == "greedy"
    assert len(meta["extra"]["removed_layers"]) == 1
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = emprune.from_pretrained(out)
    assert plain.config.num_hidden_layers == 2
    ids = torch.arange(2, 40)[None]
    with torch.no_grad():
        assert (plain(ids).logits - ours(ids).logits).abs().max() < 1e-5


def test_cli_layer_errors_are_one_line_before_loading(dense, tmp_path, capsys, no_load):
    d, text = dense
    for extra, frag in ((["--units", "layers,bogus"], "not a unit kind"),
                        (["--units", "layers", "--layer-score", "bogus"], "invalid choice"),
                        (["--units", "layers", "--layer-select", "all"], "invalid choice")):
        assert run(["shrink", str(d), "--out", str(tmp_path / "x"), *extra, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert frag in err and "Traceback" not in err


@pytest.mark.parametrize("units,keep,qtype", [("layers", "2", "f32"), ("hidden", "32", "q8_0")])
def test_heal_and_export_a_cut(dense, tmp_path, capsys, units, keep, qtype):
    """A depth cut and a hidden-channel cut, healed by ``emprune heal`` and exported to GGUF
    (llama.cpp's ``llama``; the narrower stream quantised too): llama.cpp's float32 logits are the
    folder's."""
    pytest.importorskip("llama_cpp")
    import numpy as np

    from emprune.models import llamacpp, loading

    d, text = dense
    small, healed = tmp_path / "small", tmp_path / "healed"
    assert run(["shrink", str(d), "--out", str(small), "--units", units, "--keep", keep, "--calib-text", str(text),
                "--calib-samples", "4", "--seqlen", "16", "--quiet"]) == 0
    assert run(["heal", str(small), "--out", str(healed), "--text", str(text), "--steps", "2", "--seqlen", "32",
                "--quiet"]) == 0
    for t in {qtype, "f32"}:
        assert run(["export", str(healed), "--gguf", str(tmp_path / f"h.{t}.gguf"), "--type", t, "--quiet"]) == 0
        assert "architecture: llama" in capsys.readouterr().out
    model, _ = loading.load_causal_lm(healed, progress=False)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == ((2, 64) if units == "layers" else (3, 32))
    ids = list(range(2, 40))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    assert np.abs(llamacpp.logits(tmp_path / "h.f32.gguf", ids) - ref).max() < 1e-3


def test_benchmark_quick(tmp_path):
    """benchmarks/shrink_depth.py --quick (tiny LLaMA): every row measured, table, JSON and plot."""
    import subprocess

    pytest.importorskip("matplotlib")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "d"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "shrink_depth.py"), "--quick", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    rows = res["models"]["tiny"]["rows"]
    assert {"dense", "EMP default", "ShortGPT (BI)", "last blocks", "width only (default)"} <= set(rows)
    k = len(rows["EMP default"]["removed_layers"])
    assert len(rows["ShortGPT (BI)"]["removed_layers"]) == len(rows["last blocks"]["removed_layers"]) == k
    assert all("speed" in rows[r]["after"] and "healed" in rows[r] for r in ("EMP default", "ShortGPT (BI)"))
    md = out.with_suffix(".md").read_text()
    assert "--quick" in md and "| EMP default |" in md and out.with_suffix(".png").stat().st_size > 0


# ------------------------------------------------------------------ the real models


@pytest.mark.slow
@pytest.mark.real_model  # under CI=true a skip is a failure (conftest.py)
@pytest.mark.parametrize("name,units,keep", [("smollm2-135m", "layers", "26"), ("gemma3-270m", "layers", "14"),
                                             ("gemma3-270m", "hidden", "576")])
def test_real_model_cut_is_stock_and_reloads_exactly(name, units, keep, tmp_path):
    """SmolLM2-135M and Gemma-3-270M (sliding/full layers, one KV head, 262k vocabulary, scaled
    and tied embedding, post-norms) through the command line: blocks or residual channels
    removed, the folder reloads with plain transformers with the same logits, and generation
    with the KV cache equals generation without it."""
    from transformers import AutoModelForCausalLM

    from emprune.models import loading

    try:
        loading.resolve_short_name(name)
    except FileNotFoundError as err:  # pip install ... (scripts/test.sh does)
        pytest.skip(str(err))
    out = tmp_path / "cut"
    assert run(["shrink", name, "--out", str(out), "--units", units, "--keep", keep, "--calib-samples", "2",
                "--seqlen", "64", "--quiet"]) == 0
    meta = json.loads((out / "emprune.json").read_text())
    assert meta["layout"] == "uniform" and meta["summary"]["params_after"] < meta["summary"]["params_before"]
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cfg = plain.config.get_text_config()
    if units == "layers":
        assert cfg.num_hidden_layers == int(keep) == len(plain.model.layers)
        if name.startswith("gemma"):  # the kept blocks keep their sliding / full attention
            dense_types = loading.load_causal_lm(name, progress=False)[0].config.get_text_config().layer_types
            assert cfg.layer_types == [t for i, t in enumerate(dense_types) if i not in meta["extra"]["removed_layers"]]
    else:
        assert cfg.hidden_size == int(keep) and plain.get_input_embeddings().weight.shape[1] == int(keep)
    ours, tok = loading.load_causal_lm(out, progress=False)
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (plain(ids).logits - ours(ids).logits).abs().max() < 1e-5
    g1 = plain.generate(ids, max_new_tokens=8, do_sample=False)
    g2 = plain.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(g1, g2)


# ------------------------------------------------------------------ one budget across blocks and widths


JOINT_IDS = torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("make,units", [(llama, "layers,mlp"), (gemma, "layers,mlp,heads")])
def test_joint_budget_applies_the_lowest_loss_candidate_exactly(make, units):
    from emprune.jobs.shrink import loss_batches

    m = make(8)
    rep, info = shrink_lm(m, JOINT_IDS, units=units, budget="shared", progress=False, multiple_of=1)
    j = info["extra"]["joint"]
    measured = [c for c in j["candidates"] if "loss_increase" in c]
    best = min(measured, key=lambda c: c["loss_increase"])
    assert j["chosen_blocks"] == best["blocks"] == 8 - len(m.model.layers)
    assert sorted(best["removed_blocks"]) == info["extra"]["depth"]["removed_layers"]
    # the candidates are the greedy order's prefixes, from no block to as many as the budget pays for
    assert [c["blocks"] for c in j["candidates"]] == list(range(len(j["candidates"])))
    assert all(c["removed_blocks"] == j["candidates"][-1]["removed_blocks"][:c["blocks"]] for c in j["candidates"])
    # what was measured masked is what the model computes now: same loss on the same tokens
    loss = sum(float(lm_loss(m, b).detach().double()) for b in loss_batches(JOINT_IDS, True)) / len(loss_batches(JOINT_IDS, True))
    assert loss == pytest.approx(j["base_loss"] + best["loss_increase"], abs=1e-5)
    added = sum(lay.mlp.down_proj.bias.numel() for lay in m.model.layers if lay.mlp.down_proj.bias is not None)
    added += sum(lay.self_attn.o_proj.bias.numel() for lay in m.model.layers if lay.self_attn.o_proj.bias is not None)
    assert rep.params_before - rep.params_after == best["params_removed"] - added  # the compensation's biases
    assert rep.groups[0].params_before == sum(p.numel() for p in make(8).model.layers.parameters())
    assert rep.params_after == sum(p.numel() for p in m.parameters())
    # the width groups are named and numbered as in the model that stays
    layers = len(m.model.layers)
    for g in rep.groups[1:]:
        assert g.layer < layers and g.name.startswith(f"model.layers.{g.layer}.")
        mod = m.get_submodule(g.name)
        width = mod.down_proj.in_features if g.kind == "mlp" else mod.o_proj.in_features // mod.head_dim
        assert width == g.units_after
    out = m.generate(JOINT_IDS[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_joint_budget_keep_params_and_uniform_fallback():
    m = llama(8)
    blocks = sum(p.numel() for p in m.model.layers.parameters())
    target = int(0.6 * blocks)
    rep, info = shrink_lm(m, JOINT_IDS, units="layers,mlp", keep={"params": target}, progress=False, multiple_of=1)
    now = sum(p.numel() for p in m.model.layers.parameters())
    assert info["extra"]["joint"]["budget_params"] == blocks - target
    assert abs(now - target) <= 0.02 * (blocks - target) + 1  # the chosen candidate's size, within the tolerance
    # one width per model: blocks first, then the widths (no shared budget)
    m2 = llama(8)
    rep2, info2 = shrink_lm(m2, JOINT_IDS, units="layers,mlp", uniform=True, progress=False)
    assert "joint" not in info2["extra"] and "depth" in info2["extra"]
    with pytest.raises(ValueError, match="keep params"):
        shrink_lm(llama(8), JOINT_IDS, units="layers,mlp", keep={"params": 10 * blocks}, progress=False)
    for kw, msg in (({"uniform": True}, "per-layer widths"), ({"units": "layers"}, "units with layers and mlp"),
                    ({"keep": 0.5}, "no per-group keep"), ({"recipe": "paper"}, "the default recipe")):
        with pytest.raises(ValueError, match=f"budget 'shared' needs {msg}"):
            shrink_lm(llama(8), JOINT_IDS, **{"units": "layers,mlp", "budget": "shared", **kw}, progress=False)
    with pytest.raises(ValueError, match="budget 'shared' needs calibration tokens"):
        shrink_lm(llama(8), None, units="layers,mlp", budget="shared", progress=False)
    with pytest.raises(ValueError, match="is the shared budget"):
        shrink_lm(llama(8), JOINT_IDS, units="layers,mlp", budget="per-kind", keep={"params": target}, progress=False)


def test_default_budget_is_per_kind_and_cli_refuses_a_shared_budget_early(tmp_path, capsys, no_load):
    from emprune.jobs.budget import DEFAULT_BUDGET

    assert DEFAULT_BUDGET == "per-kind"
    m = llama(8)
    rep, info = shrink_lm(m, JOINT_IDS, units="layers,mlp", progress=False, multiple_of=1)
    assert "joint" not in info["extra"] and info["extra"]["depth"]["removed_layers"]
    assert run(["shrink", "smollm2-135m", "--units", "layers,mlp", "--budget", "shared", "--uniform",
                "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget 'shared' needs per-layer widths" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o").exists()


def test_masked_loss_restores_the_model():
    from emprune.decide.sensitivity import masked_loss
    from emprune.jobs.shrink import loss_batches
    from emprune.structure.units import find_groups

    m = llama(4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    groups = find_groups(m, "mlp")
    keeps = [torch.arange(g.n) % 2 == 0 for g in groups]
    batches = loss_batches(JOINT_IDS, True)
    a = masked_loss(m, batches, lm_loss, skip=[1], groups=groups, keeps=keeps)
    assert a != masked_loss(m, batches, lm_loss)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(lay.mlp.down_proj.bias is None for lay in m.model.layers)
