"""``emprune bench`` (issue 24): bad input refused in one line before any load; a real llama.cpp
run on the embedded SmolLM2 GGUF against itself; a PyTorch run on the tiny random LLaMA of
tests/tiny_llama.py. Small settings throughout (a few seconds per run)."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math

import pytest

from emprune.cli import main
from emprune.jobs import bench as job
from emprune.models import loading

SMALL = ["--prompt-tokens", "16", "--gen-tokens", "4", "--repeats", "2", "--quiet"]


def run(argv: list[str]) -> int:
    """``main(argv)``'s exit status, parse errors (argparse's SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _one_error_line(err: str, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0], err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture
def no_runner(monkeypatch, no_load):
    """No model is loaded for timing either (a GGUF in llama.cpp), nor measured in a child."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the check")
    monkeypatch.setattr(job, "open_runner", boom)
    monkeypatch.setattr(job, "peak_memory", boom)


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ------------------------------------------------------------------ (a) refused before any load


@pytest.mark.parametrize("argv, fragments", [
    (["--repeats", "0"], ["--repeats", ">= 1"]),
    (["--threads", "-2"], ["--threads", ">= 1"]),
    (["--prompt-tokens", "0"], ["--prompt-tokens", ">= 1"]),
    (["--gen-tokens", "many"], ["--gen-tokens", "whole number"]),
    (["--runtime", "onnx"], ["--runtime", "invalid choice"]),
])
def test_bad_numbers_and_choices_are_refused_at_parse(tiny, no_runner, capsys, argv, fragments):
    folder, _ = tiny
    assert run(["bench", str(folder), *argv]) == 2
    _one_error_line(capsys.readouterr().err, *fragments)


def test_missing_model_or_baseline_is_refused_before_any_load(tiny, tmp_path, no_runner, capsys):
    folder, _ = tiny
    assert run(["bench", str(tmp_path / "nope.gguf"), "--vs", str(folder)]) == 2
    _one_error_line(capsys.readouterr().err, "not found", "nope.gguf")
    assert run(["bench", str(folder), "--vs", str(tmp_path / "gone")]) == 2
    _one_error_line(capsys.readouterr().err, "gone")
    (tmp_path / "empty").mkdir()
    assert run(["bench", str(tmp_path / "empty")]) == 2
    _one_error_line(capsys.readouterr().err, "config.json")


def test_prompt_beyond_the_context_is_refused_before_any_load(tiny, no_runner, capsys):
    folder, _ = tiny  # 256 positions
    assert run(["bench", str(folder), "--prompt-tokens", "250", "--gen-tokens", "7"]) == 2
    _one_error_line(capsys.readouterr().err, "--prompt-tokens 250", "257", "256")
    gguf = str(loading.resolve_short_name("smollm2-135m"))  # context_length 8192 in the header
    assert run(["bench", gguf, "--prompt-tokens", "9000"]) == 2
    _one_error_line(capsys.readouterr().err, "--prompt-tokens 9000", "8192")


def test_json_folder_must_exist(tiny, tmp_path, no_runner, capsys):
    folder, _ = tiny
    assert run(["bench", str(folder), "--json", str(tmp_path / "no" / "such" / "r.json")]) == 2
    _one_error_line(capsys.readouterr().err, "--json", "does not exist")
    assert not (tmp_path / "no").exists()


def test_a_gguf_without_llama_cpp_says_how_to_install_it(tiny, monkeypatch, no_runner, capsys):
    folder, _ = tiny
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert run(["bench", str(folder), "--vs", "smollm2-135m"]) == 2
    _one_error_line(capsys.readouterr().err, "--vs smollm2-135m", "pip install 'emprune[deploy]'", "--runtime torch")
    # in PyTorch the GGUF needs no llama.cpp: the checks pass (and the load is reached)
    with pytest.raises(AssertionError, match="loaded before"):
        job.bench(str(folder), "smollm2-135m", runtime="torch", progress=False)


def test_the_api_checks_its_numbers_too(tiny, no_runner):
    folder, _ = tiny
    with pytest.raises(ValueError, match="--repeats"):
        job.bench(str(folder), repeats=0)
    with pytest.raises(TypeError, match="no option 'repeat'"):
        job.bench(str(folder), repeat=3)


def test_cli_defaults_are_the_dataclass_defaults():
    from emprune.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in sub.choices["bench"]._actions}
    for f in dataclasses.fields(job.BenchOptions):
        if f.metadata.get("cli") is False:
            continue
        assert actions[f.name].default == f.default, f.name
        if "choices" in f.metadata:
            assert tuple(actions[f.name].choices) == tuple(f.metadata["choices"])


# ------------------------------------------------------------------ (b) llama.cpp, for real


@pytest.mark.real_model
def test_llama_cpp_run_on_the_smollm2_gguf_against_itself(tmp_path, capsys):
    out = tmp_path / "bench.json"
    gguf = loading.resolve_short_name("smollm2-135m")
    assert run(["bench", "smollm2-135m", "--vs", "smollm2-135m", *SMALL, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "llama.cpp" in table and "model / baseline" in table and "pp tok/s" in table and "CPU-second" in table
    res = json.loads(out.read_text())
    assert [r["role"] for r in res["models"]] == ["model", "baseline"]
    assert res["same_prompt_tokens"] is True and res["mixed_runtimes"] is False
    assert (res["prompt_tokens"], res["gen_tokens"], res["repeats"], res["threads"]) == (16, 4, 2, 1)
    for row in res["models"]:
        assert row["runtime"] == "llama.cpp" and row["threads"] == 1
        assert row["size_bytes"] == gguf.stat().st_size
        assert len(row["pp_seconds"]) == len(row["tg_seconds"]) == 2
        assert all(_finite_positive(x) for x in row["pp_seconds"] + row["tg_seconds"])
        # CPU seconds of the process: positive, and (one thread) never much above the wall seconds
        assert all(_finite_positive(x) for x in row["pp_cpu_seconds"] + row["tg_cpu_seconds"])
        assert all(c <= 1.5 * w + 0.01 for c, w in zip(row["tg_cpu_seconds"], row["tg_seconds"]))
        for key in ("pp_tok_s", "tg_tok_s", "pp_tok_cpu_s", "tg_tok_cpu_s"):
            assert all(_finite_positive(row[key][k]) for k in ("median", "min", "max"))
            assert row[key]["min"] <= row[key]["median"] <= row[key]["max"]
        assert _finite_positive(row["warmup"]["pp_seconds"]) and _finite_positive(row["warmup"]["tg_seconds"])
        mem = row["memory"]
        assert mem["peak_rss_bytes"] > mem["rss_after_import_bytes"] > 0
    ratio = res["ratio"]
    for key in ("pp_tok_s", "tg_tok_s", "pp_tok_cpu_s", "tg_tok_cpu_s"):  # sane; near 1 not asserted (noise)
        assert len(ratio[key]["pairs"]) == 2 and all(_finite_positive(x) for x in ratio[key]["pairs"])
        assert ratio[key]["min"] <= ratio[key]["median"] <= ratio[key]["max"]
    assert ratio["size"] == 1.0 and _finite_positive(ratio["peak_rss"])
    assert res["command"].startswith("emprune bench smollm2-135m")


# ------------------------------------------------------------------ (c) PyTorch


def test_pytorch_run_on_a_tiny_model_folder(tiny, tmp_path, capsys):
    folder, _ = tiny
    out = tmp_path / "bench.json"
    argv = ["bench", str(folder), "--prompt-tokens", "8", "--gen-tokens", "4", "--repeats", "3", "--quiet",
            "--json", str(out)]
    assert run(argv) == 0
    assert "PyTorch" in capsys.readouterr().out
    res = json.loads(out.read_text())
    (row,) = res["models"]
    assert res["ratio"] is None and res["same_prompt_tokens"] is None
    assert row["runtime"] == "PyTorch" and row["kind"] == "folder"
    assert row["size_bytes"] == sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert len(row["pp_tok_s"]["runs"]) == len(row["tg_tok_s"]["runs"]) == 3
    assert all(_finite_positive(x) for x in row["pp_tok_s"]["runs"] + row["tg_tok_s"]["runs"])
    assert row["memory"]["peak_rss_bytes"] > row["memory"]["rss_after_import_bytes"] > 0


def test_pytorch_pair_through_the_api(tiny):
    folder, _ = tiny
    res = job.bench(str(folder), str(folder), repeats=2, prompt_tokens=8, gen_tokens=2, memory=False,
                    progress=False)
    assert res["same_prompt_tokens"] is True and res["models"][1]["role"] == "baseline"
    assert all(r["memory"] is None for r in res["models"]) and res["ratio"]["peak_rss"] is None
    assert all(_finite_positive(x) for x in res["ratio"]["tg_tok_s"]["pairs"])
    assert "model / baseline" in job.format_table(res)
