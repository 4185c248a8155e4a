"""What a careless user can do to the command line: every case ends with one clear line and a
non-zero exit (never a traceback, never a half-written output), is caught before the model is
loaded wherever the model is not needed, and never destroys what emprune did not write.

A tiny random LLaMA (tests/tiny_llama.py) stands in for a real model; signals and pipes are
tested in subprocesses."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from emprune import cli  # noqa: E402
from emprune.cli import main  # noqa: E402
from emprune.cli.common import Parser  # noqa: E402
from emprune.models.io import usual_mode  # noqa: E402
from emprune.models import data  # noqa: E402
from emprune.models import checkpoint, runtime  # noqa: E402
from emprune.decide import recipes as P  # noqa: E402
from emprune.jobs.eval import NonFiniteLossError, perplexity  # noqa: E402

SRC = str(Path(cli.__file__).resolve().parents[2])
TINY = ["--calib-samples", "3", "--seqlen", "16", "--quiet"]
MAG = ["--criterion", "magnitude", "--sparsity", "0.5", "--quiet"]  # no calibration: fastest prune




def _env() -> dict:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _one_error_line(err: str, *fragments: str) -> str:
    """The one error line of stderr (besides prune's "loading MODEL ..." progress line)."""
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("loading ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0], err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# ----------------------------------------------------------------------- --help


@pytest.mark.parametrize("command", ["", "inspect", "prune", "eval", "compare", "demo"])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"] if command else ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: emprune") and "--help" in out
    if command == "prune":
        assert ">= 30%" in out and "--save-dtype" in out  # the floor recipe's summary, % intact


def test_help_survives_percent_in_data(monkeypatch, capsys):
    """A recipe summary with format-like text (and a help string that slipped past escaping)
    is shown as written, not read as a format directive."""
    import dataclasses

    monkeypatch.setitem(P.RECIPES, "floor", dataclasses.replace(P.RECIPES["floor"], summary="keeps 100%s; 5% (x)"))
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    assert "keeps 100%s; 5% (x)" in " ".join(capsys.readouterr().out.split())
    p = Parser(prog="x")
    p.add_argument("--a", help="raw 50% of it; default %(default)s")
    assert "raw 50% of it" in p.format_help()


# ------------------------------------------------------ options: refused at parse time, one line


@pytest.mark.parametrize("argv, fragment", [
    (["prune", "M", "--out", "o", "--beta", "nan"], "--beta"),
    (["prune", "M", "--out", "o", "--beta", "inf"], "--beta"),
    (["prune", "M", "--out", "o", "--beta", "0"], "--beta"),
    (["prune", "M", "--out", "o", "--beta", "-1"], "--beta"),
    (["prune", "M", "--out", "o", "--sparsity", "1"], "--sparsity"),
    (["prune", "M", "--out", "o", "--sparsity", "nan"], "--sparsity"),
    (["prune", "M", "--out", "o", "--sparsity", "-0.1"], "--sparsity"),
    (["prune", "M", "--out", "o", "--min-keep", "abc"], "--min-keep"),
    (["prune", "M", "--out", "o", "--min-keep", "0"], "--min-keep"),
    (["prune", "M", "--out", "o", "--min-keep", "1.5"], "--min-keep"),
    (["prune", "M", "--out", "o", "--seqlen", "0"], "--seqlen"),
    (["prune", "M", "--out", "o", "--calib-samples", "0"], "--calib-samples"),
    (["prune", "M", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["prune", "M", "--out", "o", "--save-dtype", "int8"], "--save-dtype"),
    (["eval", "M", "--ppl", "--eval-tokens", "0"], "--eval-tokens"),
    (["eval", "M", "--ppl", "--seqlen", "1"], "--seqlen"),
    (["eval", "M", "--ppl", "--batch-size", "x"], "--batch-size"),
    (["inspect", "x.safetensors", "--include", "("], "--include"),
    (["inspect", "x.safetensors", "--exclude", "["], "--exclude"),
    (["inspect", "x.safetensors", "--beta", "nan"], "--beta"),
    (["inspect", "x.safetensors", "--min-keep", "abc"], "--min-keep"),
    (["compare", "M", "--beta", "inf"], "--beta"),
    (["compare", "M", "--eval-tokens", "-5"], "--eval-tokens"),
    (["demo", "--seqlen", "0"], "--seqlen"),
])
def test_bad_options_one_line(argv, fragment, no_load, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    _one_error_line(capsys.readouterr().err, fragment, f"emprune {argv[0]}: error")


def test_option_conflicts_and_devices_before_load(tiny, tmp_path, no_load, capsys):
    folder, text = tiny
    base = ["prune", str(folder), "--calib-text", str(text), *TINY]
    assert main([*base, "--out", str(tmp_path / "a"), "--sparsity", "0.5", "--min-keep", "3"]) == 2
    _one_error_line(capsys.readouterr().err, "--min-keep")
    assert main([*base, "--out", str(tmp_path / "a"), "--device", "gpu0"]) == 2
    _one_error_line(capsys.readouterr().err, "--device")
    assert main(["eval", str(folder), "--ppl", "--eval-text", str(text), "--device", "nonsense"]) == 2
    _one_error_line(capsys.readouterr().err, "--device")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------- texts: read before the model


def test_texts_are_checked_before_the_model(tiny, tmp_path, no_load, monkeypatch, capsys):
    folder, _ = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    for src, fragment in ((tmp_path / "none.txt", "--calib-text"), (empty, "empty"), (binary, "UTF-8")):
        assert main(["prune", str(folder), "--out", str(tmp_path / "o"), "--calib-text", str(src), *TINY]) == 2
        _one_error_line(capsys.readouterr().err, fragment)
        assert main(["eval", str(folder), "--ppl", "--eval-text", str(src), "--quiet"]) == 2
        _one_error_line(capsys.readouterr().err, "--eval-text" if fragment == "--calib-text" else fragment)

    def missing(kind):
        raise FileNotFoundError(f"default {kind} text not found; pass {data._OPTION[kind]} PATH")
    prefix = ["--out", str(tmp_path / "c" / "r"), "--eval-tokens", "32", "--quiet"]
    good = tiny[1]
    assert main(["compare", str(folder), "--calib-text", str(empty), "--eval-text", str(good), *prefix]) == 2
    _one_error_line(capsys.readouterr().err, "--calib-text", "empty")
    assert main(["compare", str(folder), "--calib-text", str(good), "--eval-text", str(good), "--other-text",
                 str(tmp_path / "none.txt"), *prefix]) == 2
    _one_error_line(capsys.readouterr().err, "--other-text")
    assert main(["demo", "--model", str(folder), "--calib-text", str(good), "--eval-text", str(binary), *prefix]) == 2
    _one_error_line(capsys.readouterr().err, "--eval-text", "UTF-8")
    monkeypatch.setattr(data, "default_text_path", missing)
    assert main(["prune", str(folder), "--out", str(tmp_path / "o"), *TINY]) == 2
    _one_error_line(capsys.readouterr().err, "default calib text")
    assert main(["eval", str(folder), "--ppl", "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "default eval text")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ --out: destroy nothing


def test_out_never_the_current_folder_or_a_parent(tiny, tmp_path, no_load, monkeypatch, capsys):
    folder, text = tiny
    work = tmp_path / "thesis" / "code"
    work.mkdir(parents=True)
    (work / "chapter1.tex").write_text("precious")
    (work / checkpoint.REPORT_NAME).write_text("{}")  # even a folder that looks like an output
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path), "./"):
        assert main(["prune", str(folder), "--out", out, "--overwrite", *MAG]) == 2
        _one_error_line(capsys.readouterr().err, "current folder")
    assert (work / "chapter1.tex").read_text() == "precious"


def test_overwrite_only_replaces_an_emprune_output(tiny, tmp_path, no_load, capsys):
    folder, _ = tiny
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["prune", str(folder), "--out", str(other), *MAG]) == 2
    _one_error_line(capsys.readouterr().err, "not empty")
    assert main(["prune", str(folder), "--out", str(other), "--overwrite", *MAG]) == 2
    _one_error_line(capsys.readouterr().err, "not an earlier emprune output")
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["prune", str(folder), "--out", str(f), "--overwrite", *MAG]) == 2
    _one_error_line(capsys.readouterr().err, "not a folder")
    assert main(["prune", str(folder), "--out", str(f / "sub"), *MAG]) == 2
    _one_error_line(capsys.readouterr().err, "not a folder")
    assert (other / "notes.txt").read_text() == "mine" and f.read_text() == "x"


def test_unwritable_out_and_json_refused_before_loading(tiny, tmp_path, no_load, capsys):
    """/proc refuses new entries even to root; a chmod-ed folder is tried too where not root."""
    folder, text = tiny
    assert main(["prune", str(folder), "--out", "/proc/emprune-test/out", *MAG]) == 2
    _one_error_line(capsys.readouterr().err, "cannot write")
    assert main(["eval", str(folder), "--ppl", "--eval-text", str(text), "--json", "/proc/emprune-test.json"]) == 2
    _one_error_line(capsys.readouterr().err, "--json", "cannot write")
    assert main(["eval", str(folder), "--ppl", "--eval-text", str(text), "--json", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, "--json", "is a folder")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert main(["prune", str(folder), "--out", str(ro / "out"), *MAG]) == 2
            _one_error_line(capsys.readouterr().err, "cannot write")
        finally:
            ro.chmod(0o755)


def test_symlinked_out_is_followed_and_kept(tiny, tmp_path, capsys):
    folder, _ = tiny
    real = tmp_path / "real"
    link = tmp_path / "link"
    assert main(["prune", str(folder), "--out", str(real), *MAG]) == 0
    capsys.readouterr()
    link.symlink_to(real, target_is_directory=True)
    assert main(["prune", str(folder), "--out", str(link), *MAG]) == 2  # not empty, no --overwrite
    _one_error_line(capsys.readouterr().err, "--overwrite")
    assert main(["prune", str(folder), "--out", str(link), "--overwrite", "--criterion", "magnitude",
                 "--sparsity", "0.25", "--quiet"]) == 0
    assert link.is_symlink() and link.resolve() == real.resolve()
    rep = json.loads((link / checkpoint.REPORT_NAME).read_text())
    assert rep["target_sparsity"] == 0.25 and (real / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no temporaries left


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_killed_runs(tmp_path):
    """Marked, dead, same host: removed (an .old- folder is put back if the output is gone);
    unmarked or alive: only reported."""
    import socket

    out = tmp_path / "out"
    pid = _dead_pid()

    def leftover(kind: str, owner: int | None) -> Path:
        d = tmp_path / f".out.{kind}-{owner or 0}-abc{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
        if owner is not None:
            (d / checkpoint.WRITING_MARK).write_text(json.dumps({"pid": owner, "host": socket.gethostname()}))
        return d

    dead, alive, unmarked = leftover("tmp", pid), leftover("tmp", os.getpid()), leftover("tmp", None)
    old = leftover("old", pid)
    (old / "dir").mkdir()
    (old / "dir" / checkpoint.REPORT_NAME).write_text("{}")
    unrelated = tmp_path / ".outside.tmp-1-x"
    unrelated.mkdir()
    notes = checkpoint.clean_stale_temporaries(out)
    assert not dead.exists() and not old.exists()
    assert (out / checkpoint.REPORT_NAME).is_file()  # the previous output, restored
    assert alive.exists() and unmarked.exists() and unrelated.exists()
    text = "\n".join(notes)
    assert str(dead) in text and str(alive) in text and str(unmarked) in text and "restored" in text
    assert str(unrelated) not in text


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from torch import nn
from emprune.models import checkpoint, runtime

class Slow(nn.Linear):
    def save_pretrained(self, d):
        (Path(d) / "model.safetensors").write_bytes(b"half written")
        print("writing", flush=True)
        time.sleep(120)

checkpoint.save_pruned(Slow(2, 2), None, sys.argv[1], {})
"""


def test_sigkill_leftover_cleaned_by_next_run(tiny, tmp_path, capsys):
    folder, _ = tiny
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out)], stdout=subprocess.PIPE, text=True,
                            env=_env())
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1 and f"-{proc.pid}-" in left[0].name and not out.exists()
    assert main(["prune", str(folder), "--out", str(out), *MAG]) == 0
    assert "removed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------- files that are not what they claim


def test_bad_checkpoints_one_line(tiny, tmp_path, capsys):
    folder, text = tiny
    whole = (folder / "model.safetensors").read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(whole[: len(whole) // 2])
    fake = tmp_path / "fake.safetensors"
    fake.write_text("not a tensor file\n")
    txt = tmp_path / "notes.txt"
    txt.write_text("emprune is nice\n")
    for path, fragment in ((trunc, "not a complete safetensors"), (fake, "not a complete safetensors"),
                           (txt, "not a PyTorch checkpoint")):
        assert main(["inspect", str(path)]) == 2
        _one_error_line(capsys.readouterr().err, str(path), fragment)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "model.safetensors").write_bytes(whole[: len(whole) - 100])
    assert main(["prune", str(broken), "--out", str(tmp_path / "o"), *MAG]) == 2
    _one_error_line(capsys.readouterr().err, "model.safetensors", "not a complete safetensors")
    assert main(["eval", str(broken), "--ppl", "--eval-text", str(text), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "not a complete safetensors")
    assert not (tmp_path / "o").exists()


def test_seqlen_beyond_the_models_positions(tiny, tmp_path, capsys):
    folder, text = tiny
    out = tmp_path / "o"
    assert main(["prune", str(folder), "--out", str(out), "--calib-text", str(text), "--seqlen", "257",
                 "--calib-samples", "2", "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "--seqlen 257", "256", "max_position_embeddings")
    assert main(["eval", str(folder), "--ppl", "--eval-text", str(text), "--seqlen", "300", "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "--seqlen 300", "256")
    assert not out.exists()
    # the default window is 2048, or the model's positions if fewer
    j = tmp_path / "r.json"
    assert main(["eval", str(folder), "--ppl", "--eval-text", str(text), "--eval-tokens", "600",
                 "--json", str(j), "--quiet"]) == 0
    res = json.loads(j.read_text())
    assert res["seqlen"] == 256 and res["windows"] == 2
    assert j.stat().st_mode & 0o777 == usual_mode()


def test_nan_weights_are_an_error_not_a_perplexity(tiny, tmp_path, capsys):
    folder, text = tiny
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    bad = tmp_path / "nan"
    model.save_pretrained(bad)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / f, bad / f)
    capsys.readouterr()
    assert main(["eval", str(bad), "--ppl", "--eval-text", str(text), "--seqlen", "32", "--eval-tokens", "128",
                 "--quiet"]) == 2
    out = capsys.readouterr()
    _one_error_line(out.err, "not finite", "model.layers.1.mlp.up_proj.weight")
    assert "perplexity" not in out.out
    with pytest.raises(NonFiniteLossError, match="windows 0-"):
        perplexity(model, torch.randint(0, 100, (64,)), 32, progress=False)


# ------------------------------------------------------------------- Ctrl-C and pipes


INTERRUPT_SCRIPT = """
import signal, sys, time
# Ctrl-C as a terminal user has it: a test runner started in the background (nohup, `cmd &` in a
# script) hands its children SIGINT ignored, and Python then installs no KeyboardInterrupt handler
signal.signal(signal.SIGINT, signal.default_int_handler)
import transformers
from emprune.cli import main

orig = transformers.PreTrainedModel.save_pretrained
def slow_save(self, d, *a, **k):
    orig(self, d, *a, **k)           # the model file is complete, the folder is not
    print("saving", file=sys.stderr, flush=True)
    time.sleep(120)
transformers.PreTrainedModel.save_pretrained = slow_save
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_one_line_130_no_partial_output(tiny, tmp_path):
    folder, _ = tiny
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPT_SCRIPT, "prune", str(folder), "--out", str(out), *MAG],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    err = []
    try:
        for line in proc.stderr:
            err.append(line)
            if "saving" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err.append(rest)
    text = "".join(err)
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert text.strip().splitlines()[-1] == "emprune prune: interrupted"
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary folder


def test_broken_pipe_is_quiet(tmp_path):
    from safetensors.torch import save_file

    big = tmp_path / "many.safetensors"
    save_file({f"layer{i}.weight": torch.randn(2, 3) for i in range(300)}, str(big))  # ~170 kB of JSON
    res = subprocess.run(f"{sys.executable} -m emprune.cli inspect {big} --json | head -1", shell=True,
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert res.stdout.strip() == "{"
    assert res.stderr == "", res.stderr  # no BrokenPipeError traceback, no "Exception ignored"


# ---------------------------------------------------------- output: bars, modes, dtypes


def test_quiet_silences_loading_and_saving_bars(tiny, tmp_path, capsys):
    folder, text = tiny
    assert main(["prune", str(folder), "--out", str(tmp_path / "o"), *MAG]) == 0
    assert main(["eval", str(tmp_path / "o"), "--ppl", "--eval-text", str(text), "--seqlen", "32", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err and "it/s" not in err
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # restored afterwards
    import transformers.modeling_gguf_pytorch_utils as gguf_mod

    with runtime.quiet_progress():
        assert gguf_mod.tqdm(range(2)).disable  # the GGUF de-quantisation bar
    assert not gguf_mod.tqdm(range(2), file=open(os.devnull, "w")).disable


def test_saved_files_have_the_usual_mode(tiny, tmp_path):
    folder, _ = tiny
    out = tmp_path / "o"
    assert main(["prune", str(folder), "--out", str(out), *MAG]) == 0
    assert out.stat().st_mode & 0o777 == usual_mode(folder=True)
    files = list(out.iterdir())
    assert "model.safetensors" in [f.name for f in files] and checkpoint.WRITING_MARK not in [f.name for f in files]
    for f in files:
        assert f.stat().st_mode & 0o777 == usual_mode(), f.name


@pytest.mark.parametrize("save_dtype", [None, "bfloat16", "float16"])
def test_save_dtype(tiny, tmp_path, save_dtype):
    folder, _ = tiny
    out = tmp_path / "o"
    extra = ["--save-dtype", save_dtype] if save_dtype else []
    assert main(["prune", str(folder), "--out", str(out), *MAG, *extra]) == 0
    rep = json.loads((out / checkpoint.REPORT_NAME).read_text())
    want = save_dtype or "float32"  # default: the dtype it was loaded in
    assert rep["saved_dtype"] == want
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.dtype == getattr(torch, want)
    dense = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    for lay in rep["layers"]:
        w = back.get_submodule(lay["name"]).weight
        pruned = lay["total"] - lay["kept"]
        # every pruned entry is an exact zero; the kept ones are the dense values, rounded
        assert int((w == 0).sum()) >= pruned
        kept = w != 0
        assert torch.equal(w[kept], dense[lay["name"] + ".weight"][kept].to(w.dtype))


# ------------------------------------------------------------------ chunked perplexity


def _reference_ppl(model, tokens, seqlen, batch_size):
    """The former implementation: full logits of a batch at once."""
    n = tokens.numel() // seqlen
    wins = tokens[: n * seqlen].reshape(n, seqlen)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, batch_size):
            b = wins[i : i + batch_size]
            logits = model(b, use_cache=False).logits
            total += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                       b[:, 1:].reshape(-1), reduction="sum").item()
    return math.exp(total / (n * (seqlen - 1)))


def test_chunked_perplexity_equals_full_logits(tiny):
    folder, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, model.config.vocab_size, (5 * 40 + 7,), generator=torch.Generator().manual_seed(0))
    ref = _reference_ppl(model, tokens, 40, 2)
    for chunk in (1, 7 * model.config.vocab_size, 1 << 24):  # one row at a time .. everything at once
        res = perplexity(model, tokens, 40, batch_size=2, progress=False, chunk_entries=chunk)
        assert res["loss"] == "chunked"
        assert res["ppl"] == pytest.approx(ref, rel=1e-6)
    # accelerate-dispatched (hooks on every module): same number
    from accelerate import dispatch_model

    disp = dispatch_model(AutoModelForCausalLM.from_pretrained(folder).eval(), device_map={"": "cpu"})
    assert perplexity(disp, tokens, 40, batch_size=3, progress=False)["ppl"] == pytest.approx(ref, rel=1e-6)


def test_models_that_change_their_logits_fall_back_to_full_logits(tiny):
    """A forward that does more than head(base(x)) (here: logit scaling, like soft-capping) is
    detected on the probe and evaluated on its real logits."""
    folder, _ = tiny

    class Scaled(type(AutoModelForCausalLM.from_pretrained(folder))):
        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            out.logits = out.logits * 3.0
            return out

    model = Scaled.from_pretrained(folder).eval()
    tokens = torch.randint(0, model.config.vocab_size, (3 * 24,), generator=torch.Generator().manual_seed(1))
    res = perplexity(model, tokens, 24, batch_size=2, progress=False)
    assert res["loss"] == "full"
    assert res["ppl"] == pytest.approx(_reference_ppl(model, tokens, 24, 2), rel=1e-6)


def test_python_dash_m_runs_the_same_cli():
    """``python -m emprune`` is the ``emprune`` command (for environments without the script)."""
    p = subprocess.run([sys.executable, "-m", "emprune", "prune", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "--beta" in p.stdout
    p = subprocess.run([sys.executable, "-m", "emprune", "prune", "x", "--out", "y", "--beta", "nan"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
