"""``emprune eval --tasks``: zero-shot accuracy from the command line (tiny model, real task data)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from emprune.cli import main  # noqa: E402
from emprune.jobs import zeroshot as zs  # noqa: E402


def test_bad_tasks_and_limit_fail_before_the_model_is_loaded(capsys, tmp_path):
    missing = str(tmp_path / "no-such-model")  # never loaded: the options fail first
    assert main(["eval", missing, "--tasks", "piqa,bogus"]) == 2
    assert "unknown task(s) 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # refused while parsing
        main(["eval", missing, "--tasks", "piqa", "--limit", "0"])
    assert e.value.code == 2
    assert "argument --limit: must be >= 1" in capsys.readouterr().err
    assert main(["eval", missing, "--tasks", "piqa,,arc_easy"]) == 2
    assert "empty item" in capsys.readouterr().err
    assert main(["eval", missing]) == 2
    assert "pass --ppl and/or --tasks" in capsys.readouterr().err


def test_eval_tasks_writes_accuracies_to_json(tmp_path, capsys):
    try:
        zs.data_root()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    from tiny_llama import save_tiny

    save_tiny(tmp_path / "tiny")
    out = tmp_path / "zs.json"
    assert main(["eval", str(tmp_path / "tiny"), "--tasks", "piqa,winogrande", "--limit", "3", "--quiet",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())["zeroshot"]
    assert set(res["tasks"]) == {"piqa", "winogrande"}
    for task in ("piqa", "winogrande"):
        assert res["tasks"][task]["n"] == 3
        assert 0.0 <= res["tasks"][task]["acc"] <= 1.0
    assert "piqa" in capsys.readouterr().out  # the table is printed
