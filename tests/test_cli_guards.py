"""Issue 23: nothing of the user's deleted, no option ignored or checked after the model load,
outputs complete or absent, one writer per output, Ctrl-C for real.

Each test here failed on the code before the fix (the note on each says how). A tiny random
LLaMA (tests/tiny_llama.py) stands in for a real model; signals run in real subprocesses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from emprune import cli  # noqa: E402
from emprune.cli import main  # noqa: E402
from emprune.models import checkpoint, loading  # noqa: E402

SRC = str(Path(cli.__file__).resolve().parents[2])
MAG = ["--criterion", "magnitude", "--sparsity", "0.5", "--quiet"]  # no calibration: fastest prune




def run(argv: list[str]) -> int:
    """``main(argv)``'s exit status, parse errors (argparse's SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _one_error_line(err: str, *fragments: str) -> str:
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("loading ", "note: "))]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0], err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def _env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


@pytest.fixture
def pruned(tiny, tmp_path, capsys):
    """A prune result of the tiny model (50 % magnitude), made by the CLI."""
    folder, _ = tiny
    out = tmp_path / "pruned"
    assert run(["prune", str(folder), "--out", str(out), *MAG]) == 0
    capsys.readouterr()
    return out


# ------------------------------------------------------------------ 2. user data is never deleted


def test_out_is_never_the_input_nor_around_or_inside_it(tiny, pruned, tmp_path, no_load, capsys):
    """Before: `prune src --out src --overwrite` replaced the source model (and its report then
    named its own folder as the model it came from)."""
    before = {p.name: p.read_bytes() for p in pruned.iterdir()}
    for out, how in ((pruned, "is the input"), (pruned / "sub", "lies inside the input"),
                     (tmp_path, "contains the input")):
        assert run(["prune", str(pruned), "--out", str(out), "--overwrite", *MAG]) == 2
        _one_error_line(capsys.readouterr().err, how)
    assert {p.name: p.read_bytes() for p in pruned.iterdir()} == before
    # a short name's file counts as an input too
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert run(["prune", str(gguf), "--out", str(tmp_path), "--overwrite", *MAG]) == 2
    _one_error_line(capsys.readouterr().err, "contains the input")


def test_overwrite_never_deletes_files_emprune_did_not_write(tiny, pruned, tmp_path, capsys):
    """Before: --overwrite deleted a notes.txt the user had put into an earlier output."""
    folder, _ = tiny
    report = json.loads((pruned / "emprune.json").read_text())
    assert set(report["files"]) == {p.name for p in pruned.iterdir()} - {"emprune.json"}
    (pruned / "notes.txt").write_text("mine")
    (pruned / "runs").mkdir()
    (pruned / "runs" / "a.log").write_text("mine too")
    assert run(["prune", str(folder), "--out", str(pruned), "--overwrite", *MAG]) == 2
    _one_error_line(capsys.readouterr().err, "notes.txt", "runs/a.log", "never deletes")
    assert (pruned / "notes.txt").read_text() == "mine" and (pruned / "runs" / "a.log").is_file()
    # an output of an emprune without the files list: the names save_pretrained writes are ours
    report.pop("files")
    (pruned / "emprune.json").write_text(json.dumps(report))
    assert checkpoint.foreign_files(pruned) == ["notes.txt", "runs/a.log"]
    (pruned / "notes.txt").unlink()
    (pruned / "runs" / "a.log").unlink()
    (pruned / "runs").rmdir()
    assert run(["prune", str(folder), "--out", str(pruned), "--overwrite", *MAG]) == 0


def test_files_added_while_the_run_works_are_not_deleted_either(tiny, pruned, monkeypatch):
    """The check is repeated just before the old folder is replaced."""
    import transformers as tf

    folder, _ = tiny
    model = tf.AutoModelForCausalLM.from_pretrained(folder)
    orig = model.save_pretrained

    def save_and_meddle(d, *a, **k):
        (pruned / "late.txt").write_text("written during the run")
        return orig(d, *a, **k)

    monkeypatch.setattr(model, "save_pretrained", save_and_meddle)
    with pytest.raises(FileExistsError, match="late.txt"):
        checkpoint.save_pruned(model, None, pruned, {}, overwrite=True)
    assert (pruned / "late.txt").is_file() and (pruned / "emprune.json").is_file()
    assert sorted(p.name for p in pruned.parent.iterdir() if p.name.startswith(".pruned.")) == []


# ------------------------------------------------------------------ 3. complete or absent


def test_an_incomplete_folder_is_never_renamed_into_place(tiny, tmp_path):
    """Before: a folder whose tokenizer files did not arrive was renamed into place, exit 0."""
    import transformers as tf

    folder, _ = tiny
    model = tf.AutoModelForCausalLM.from_pretrained(folder)
    tok = tf.AutoTokenizer.from_pretrained(folder)

    class Lost:  # a tokenizer whose files never reach the disk (a writer killed, a full disk, ...)
        def save_pretrained(self, d):
            return (str(Path(d) / "tokenizer_config.json"), str(Path(d) / "tokenizer.json"))

    out = tmp_path / "out"
    with pytest.raises(OSError, match="incomplete.*tokenizer"):
        checkpoint.save_pruned(model, Lost(), out, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary, no claim
    checkpoint.save_pruned(model, tok, out, {})
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "emprune.json"} <= {p.name for p in out.iterdir()}


# ------------------------------------------------------------------ 4. nothing silently ignored


def test_beta_with_fixed_counts_is_refused(tiny, tmp_path, no_load, capsys):
    """Before: `prune --beta 0.5 --sparsity 0.5` exited 0 and recorded beta null."""
    folder, _ = tiny
    for extra, other in ((["--sparsity", "0.5"], "--sparsity"), (["--nm", "2:4"], "--nm"),
                         (["--target-sparsity", "0.5"], "--target-sparsity")):
        assert run(["prune", str(folder), "--out", str(tmp_path / "o"), "--beta", "0.5", *extra, "--quiet"]) == 2
        _one_error_line(capsys.readouterr().err, "--beta", other)
    from emprune.jobs.prune_lm import plan

    with pytest.raises(ValueError, match="beta"):
        plan(beta=0.5, sparsity=0.5)
    plan(beta=1.0, sparsity=0.5)  # the default beta is no conflict


@pytest.mark.parametrize("units", ["mlp,,heads", "mlp,", ",heads", "mlp,mlp", "mlp;heads", ""])
def test_malformed_unit_lists_are_refused(units, tiny, tmp_path, no_load, capsys):
    """Before: `shrink --units "mlp,,heads"` ran as mlp,heads."""
    folder, _ = tiny
    assert run(["shrink", str(folder), "--out", str(tmp_path / "o"), "--units", units, "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "--units")
    from emprune.jobs.shrink_lm import shrink_lm

    with pytest.raises(ValueError, match="units"):
        shrink_lm(torch.nn.Linear(2, 2), None, units=units)


# --------------------------------------------------- 5. checked before the model is loaded


def test_window_and_text_checks_run_before_the_load(tiny, tmp_path, no_load, capsys):
    """Before: each of these was found only after the model was loaded (20-40 s on a real one)."""
    folder, text = tiny
    short = tmp_path / "short.txt"
    short.write_text(text.read_text()[:300])  # ~160 tokens of the tiny tokenizer
    o = str(tmp_path / "o")
    cases = [
        (["eval", str(folder), "--ppl", "--max-batch-tokens", "0"], "--max-batch-tokens"),
        (["eval", str(folder), "--ppl", "--eval-tokens", "100"], "--eval-tokens 100"),  # default seqlen 256
        (["eval", str(folder), "--ppl", "--eval-text", str(short), "--seqlen", "250"], "--eval-text"),
        (["eval", str(folder), "--ppl", "--seqlen", "300"], "256 positions"),
        (["prune", str(folder), "--out", o, "--calib-text", str(short), "--seqlen", "250"], "--calib-text"),
        (["prune", str(folder), "--out", o, "--seqlen", "300"], "256 positions"),
        (["shrink", str(folder), "--out", o, "--calib-text", str(short), "--seqlen", "250"], "--calib-text"),
        (["shrink", str(folder), "--out", o, "--seqlen", "300"], "256 positions"),
        (["compare", str(folder), "--out", o, "--seqlen", "300"], "256 positions"),
    ]
    for argv, fragment in cases:
        assert run([*argv, "--quiet"]) == 2, argv
        _one_error_line(capsys.readouterr().err, fragment)
    assert not (tmp_path / "o").exists()


def test_positions_read_from_the_header_without_the_weights(tiny):
    folder, _ = tiny
    assert loading.positions(folder) == 256
    gguf = loading.resolve_short_name("smollm2-135m")
    assert loading.positions("smollm2-135m") == 8192 == loading.gguf_metadata(
        gguf, lambda k: k == "llama.context_length")["llama.context_length"]


# ------------------------------------------------------------------ 6. fast failures


def test_missing_paths_and_an_unreachable_hub_fail_at_once(tmp_path, monkeypatch, capsys):
    """Before: `eval nothere` spent ~50 s in the hub client's retries while offline. Now the
    hub is never asked when it cannot be reached (here: a closed local port)."""
    import transformers as tf

    def hub(*a, **k):
        raise AssertionError("the hub was asked")
    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", hub)
    monkeypatch.setattr(tf.AutoTokenizer, "from_pretrained", hub)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    assert not loading.hub_reachable()
    for argv, fragment in ((["eval", "nothere", "--ppl"], "cannot be reached"),
                           (["prune", "nothere/x", "--out", str(tmp_path / "o")], "cannot be reached"),
                           (["prune", str(tmp_path / "nothere" / "x"), "--out", str(tmp_path / "o")], "no such"),
                           (["shrink", "./nothere", "--out", str(tmp_path / "o")], "no such"),
                           (["eval", str(tmp_path), "--ppl"], "no config.json")):
        assert run([*argv, "--quiet"]) == 2, argv
        _one_error_line(capsys.readouterr().err, fragment)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 7. smaller ones


def test_json_parent_must_exist(tiny, tmp_path, no_load, capsys):
    """Before: `--json /nonexistent/dir/x.json` created the folders (at the filesystem root)."""
    folder, _ = tiny
    assert run(["eval", str(folder), "--ppl", "--json", str(tmp_path / "no" / "dir" / "x.json"), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "--json", "does not exist")
    assert not (tmp_path / "no").exists()


def test_shrink_quiet_has_no_shard_bar(tiny, tmp_path, capsys):
    """Before: `shrink --quiet` still printed "Writing model shards"."""
    folder, text = tiny
    assert run(["shrink", str(folder), "--out", str(tmp_path / "s"), "--calib-text", str(text), "--seqlen", "16",
                 "--calib-samples", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "Writing model shards" not in err and "it/s" not in err, err


HOLD_SCRIPT = """
import sys, time
from emprune.models import checkpoint
checkpoint.claim_output(sys.argv[1])
print("claimed", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_at_once(tiny, tmp_path, no_load, capsys):
    """Before: two runs writing the same new --out both did all the work; the second was refused
    only at its save. A claim left by a killed run is taken over, and said so."""
    folder, _ = tiny
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(out)], stdout=subprocess.PIPE, text=True,
                            env=_env())
    try:
        assert proc.stdout.readline().strip() == "claimed"
        for cmd in (["prune", str(folder), "--out", str(out), *MAG], ["shrink", str(folder), "--out", str(out),
                                                                       "--quiet"]):
            assert run(cmd) == 2
            _one_error_line(capsys.readouterr().err, "another emprune run", f"process {proc.pid}")
    finally:
        proc.kill()
        proc.wait()
    assert checkpoint.claim_output(out) == [f"note: took over {out.parent / '.out.emprune-lock'}, left by an "
                                            "emprune run that was killed"]
    checkpoint.release_output(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 8. Ctrl-C for real

INTERRUPT_AT = """
import importlib, sys, time
from emprune.cli import main

where, word = sys.argv[1], sys.argv[2]
mod_name, _, attr = where.rpartition(":")
obj = importlib.import_module(mod_name)
*path, name = attr.split(".")
for p in path:
    obj = getattr(obj, p)

def stall(*a, **k):
    print(word, file=sys.stderr, flush=True)
    time.sleep(120)
setattr(obj, name, stall)
sys.exit(main(sys.argv[3:]))
"""


def _interrupt(where: str, word: str, argv: list[str], tmp: Path) -> tuple[int, str]:
    """Run the CLI in a subprocess with SIGINT's default handling restored (a test runner in the
    background may hand its children SIGINT ignored), stall it at ``where`` and send SIGINT."""
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPT_AT, where, word, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(TMPDIR=str(tmp)),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = []
    try:
        for line in proc.stderr:
            err.append(line)
            if line.strip() == word:
                break
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, "".join(err) + rest


@pytest.mark.parametrize("stage", ["calibration", "training", "save"])
def test_ctrl_c_during_the_work_leaves_nothing(stage, tiny, pruned, tmp_path):
    """SIGINT during prune's calibration, heal's training and a save: exit 130, one line, no
    output folder, no temporary folder, no claim left (also none under $TMPDIR)."""
    folder, text = tiny
    work = tmp_path / "work"
    tmpdir = tmp_path / "tmpdir"
    work.mkdir()
    tmpdir.mkdir()
    out = work / "out"
    if stage == "calibration":
        where, argv = "emprune.models.layerwise:run_block", [
            "prune", str(folder), "--out", str(out), "--calib-text", str(text), "--seqlen", "16",
            "--calib-samples", "2", "--quiet"]
    elif stage == "training":
        held_out = tmp_path / "eval.txt"
        held_out.write_text(" ".join(reversed(text.read_text().split())))  # not the healing text
        where, argv = "transformers:Trainer.training_step", [
            "heal", str(pruned), "--out", str(out), "--text", str(text), "--eval-text", str(held_out), "--seqlen", "16",
            "--steps", "2", "--distill", "none", "--quiet"]
    else:
        where, argv = "emprune.models.checkpoint:_check_complete", ["prune", str(folder), "--out", str(out), *MAG]
    rc, err = _interrupt(where, stage, argv, tmpdir)
    assert rc == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == f"emprune {argv[0]}: interrupted", err
    assert list(work.iterdir()) == [], list(work.iterdir())
    assert list(tmpdir.iterdir()) == [], list(tmpdir.iterdir())
