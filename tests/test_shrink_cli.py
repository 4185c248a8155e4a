"""``emprune shrink`` (the command module; cli.py wiring is the lead's): output folders, errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))

from emprune.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from tiny_llama import save_tiny

    d = tmp_path_factory.mktemp("dense") / "m"
    save_tiny(d)
    text = d.parent / "calib.txt"
    from tiny_llama import TEXT

    text.write_text(TEXT)
    return d, text


def _run(dense, out, *extra):
    d, text = dense
    try:
        return main(["shrink", str(d), "--out", str(out), "--calib-text", str(text), "--calib-samples", "4",
                     "--seqlen", "16", "--quiet", *extra])
    except SystemExit as e:  # refused while parsing (one line too)
        return int(e.code)


def test_shrink_writes_loadable_folder(dense, tmp_path, capsys):
    import emprune

    out = tmp_path / "small"
    assert _run(dense, out, "--units", "mlp,heads", "--keep", "0.5") == 0
    meta = json.loads((out / "emprune.json").read_text())
    assert meta["kind"] == "shrunk" and meta["summary"]["params_after"] < meta["summary"]["params_before"]
    assert meta["command"].startswith("emprune ") and meta["multiple_of"] == 32
    model = emprune.from_pretrained(out)
    # 0.5 x 96 = 48, on the default grid of 32 the nearest width (a tie keeps more): 64
    assert [l.mlp.down_proj.in_features for l in model.model.layers] == [64, 64, 64]
    assert "saved to" in capsys.readouterr().out
    # --overwrite replaces an emprune output
    assert _run(dense, out, "--units", "mlp", "--recipe", "paper", "--criterion", "magnitude", "--overwrite") == 0
    assert json.loads((out / "emprune.json").read_text())["recipe"]["name"] == "paper"


def test_uniform_folder_is_stock(dense, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "u"
    assert _run(dense, out, "--uniform") == 0
    assert json.loads((out / "emprune.json").read_text())["layout"] == "uniform"
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.intermediate_size % 64 == 0 or m.config.intermediate_size == 96
    assert m(torch.randint(0, 100, (1, 5))).logits.shape[-1] == m.config.vocab_size


@pytest.mark.parametrize("extra, match", [
    (("--units", "attn"), "argument --units: expected mlp, heads"), (("--keep", "1.5"), "--keep as a fraction"),
    (("--keep", "abc"), "--keep must be"), (("--keep", "0"), "--keep as a count"), (("--beta", "-1"), "argument --beta: must be a positive"),
])
def test_bad_options_one_line(dense, tmp_path, capsys, extra, match):
    assert _run(dense, tmp_path / "o", *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and match in err[-1] and err[-1].startswith("emprune shrink: error:"), err


def test_refuses_foreign_and_non_empty(dense, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert _run(dense, out) == 2
    assert "not empty" in capsys.readouterr().err
    assert _run(dense, out, "--overwrite") == 2
    assert "not an earlier emprune output" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


def test_refuses_the_current_folder(dense, tmp_path, capsys, monkeypatch):
    """The same output rules as `emprune prune`: never the current folder or a parent."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.txt").write_text("x")
    monkeypatch.chdir(work)
    assert _run(dense, ".", "--overwrite") == 2
    assert "current folder" in capsys.readouterr().err
    assert (work / "thesis.txt").read_text() == "x"


def test_emprune_command_shrinks_and_evaluates_the_folder(dense, tmp_path, capsys):
    """Through the `emprune` entry point: `emprune shrink` writes a per-layer folder and
    `emprune eval` loads it (loading.load_causal_lm's shrunk hook) with the shrunk shapes."""
    from emprune.cli import main as emprune_main

    d, text = dense
    out = tmp_path / "small"
    assert emprune_main(["shrink", str(d), "--out", str(out), "--calib-text", str(text), "--calib-samples", "4",
                         "--seqlen", "16", "--units", "mlp", "--keep", "0.5", "--multiple-of", "16", "--quiet"]) == 0
    res = tmp_path / "ppl.json"
    assert emprune_main(["eval", str(out), "--ppl", "--eval-text", str(text), "--eval-tokens", "256",
                         "--seqlen", "32", "--quiet", "--json", str(res)]) == 0
    ppl = json.loads(res.read_text())["ppl"]
    assert torch.isfinite(torch.tensor(ppl)) and ppl > 1
    from emprune.models import loading

    model, _ = loading.load_causal_lm(out)
    assert model.model.layers[0].mlp.down_proj.weight.shape[1] == 48  # 96 neurons -> 48 kept (a multiple of 16)


def test_default_is_sensitivity_recorded_and_reloads(dense, tmp_path, capsys):
    """The default run measures each layer's loss increase, prints it (``loss+``), records it per
    group in emprune.json, and the folder reloads (exact round trips: test_shrink.test_round_trip)."""
    import emprune

    out = tmp_path / "d"
    assert _run(dense, out) == 0
    printed = capsys.readouterr().out
    assert "loss+" in printed and "recipe=sensitivity" in printed
    meta = json.loads((out / "emprune.json").read_text())
    assert meta["recipe"]["name"] == "sensitivity"
    groups = meta["report"]["groups"] if "report" in meta else meta["groups"]
    assert all(isinstance(g["sensitivity"], float) for g in groups)
    # data-free: no calibration text is read, the zscore default runs without compensation
    out2 = tmp_path / "free"
    assert _run(dense, out2, "--criterion", "magnitude", "--no-compensate") == 0
    assert json.loads((out2 / "emprune.json").read_text())["recipe"]["name"] == "zscore"
    m = emprune.from_pretrained(out)
    x = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        assert torch.isfinite(m(x).logits).all()
