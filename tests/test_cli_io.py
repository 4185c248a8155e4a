"""The inspect command and safe, atomic checkpoint I/O."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import emprune
from emprune.cli import main
from emprune.jobs.inspect import inspect_checkpoint
from emprune.models.io import atomic_path, load_state_dict, save_state_dict


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 5))
    p = tmp_path / "m.safetensors"
    save_state_dict(m.state_dict(), p)
    return m, p


@pytest.mark.parametrize("scope", ["row", "layer", "global"])
def test_inspect_matches_rule(ckpt, scope, capsys):
    m, p = ckpt
    rep = inspect_checkpoint(str(p), 1.0, scope)
    assert [l.name for l in rep.layers] == ["0.weight", "2.weight"]  # biases (1-D) skipped
    w = m[0].weight.detach()
    if scope == "row":
        assert rep.layers[0].kept == int(emprune.keep_count(w, dim=1).sum())
    elif scope == "layer":
        assert rep.layers[0].kept == int(emprune.keep_count(w))
    else:
        cat = torch.cat([m[0].weight.detach().reshape(-1), m[2].weight.detach().reshape(-1)])
        assert rep.kept == int(emprune.keep_count(cat))
    assert main(["inspect", str(p), "--scope", scope, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["scope"] == scope and d["kept"] == rep.kept


def test_inspect_table_torch_checkpoint_and_options(tmp_path, capsys):
    m = nn.Linear(50, 20)
    p = tmp_path / "m.pt"
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, p)  # wrapped, with a non-tensor entry
    assert main(["inspect", str(p), "--beta", "0.5", "--min-keep", "0.6"]) == 0
    out = capsys.readouterr().out
    assert "weight" in out and "min_keep=0.6" in out
    rep = inspect_checkpoint(str(p), sparsity=0.5)
    assert rep.layers[0].kept == 20 * 25
    assert main(["inspect", str(p), "--include", "nothing"]) == 2
    assert "no floating-point tensors" in capsys.readouterr().err


def test_inspect_refuses_pickles_and_missing(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2, 2), "x": Evil()}, p)
    assert main(["inspect", str(p)]) == 2
    err = capsys.readouterr().err
    assert "weights-only" in err and "pwned" not in err
    assert main(["inspect", str(tmp_path / "none.pt")]) == 2


def test_help_documents_commands():
    out = subprocess.run([sys.executable, "-m", "emprune.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "inspect" in out.stdout
    out = subprocess.run([sys.executable, "-m", "emprune.cli", "inspect", "--help"], capture_output=True, text=True)
    assert "--scope" in out.stdout and "--beta" in out.stdout


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    dest = tmp_path / "w.safetensors"
    save_state_dict({"a": torch.ones(3)}, dest)
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert torch.equal(load_state_dict(dest)["a"], torch.ones(3))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp left
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_save_shared_tensors_and_torch_format(tmp_path):
    lin = nn.Linear(4, 4)
    sd = {"a": lin.weight, "b": lin.weight}  # shared storage: safetensors would refuse as is
    back = load_state_dict(save_state_dict(sd, tmp_path / "s.safetensors"))
    assert torch.equal(back["a"], back["b"])
    back = load_state_dict(save_state_dict({"x": torch.arange(3)}, tmp_path / "s.pt"))
    assert back["x"].tolist() == [0, 1, 2]


def test_read_report_absent_damaged_and_strict(tmp_path):
    """models.read_report: None without emprune.json; a damaged or non-object report is None for
    readers that only annotate, and one ValueError naming the file for commands that act on it."""
    from emprune.models.checkpoint import REPORT_NAME, read_report
    from emprune.models.checkpoint import is_shrunk

    assert read_report(tmp_path) is None and read_report(tmp_path, strict=True) is None
    (tmp_path / REPORT_NAME).write_text('{"kind": "shrunk", "summary": {}}')
    assert read_report(tmp_path, strict=True)["kind"] == "shrunk" and is_shrunk(tmp_path)
    for bad in ("{not json", "[1, 2]"):
        (tmp_path / REPORT_NAME).write_text(bad)
        assert read_report(tmp_path) is None and not is_shrunk(tmp_path)
        with pytest.raises(ValueError, match=REPORT_NAME):
            read_report(tmp_path, strict=True)
