"""Models larger than memory (issue 26): ``prune``, ``shrink`` and ``eval --ppl`` streamed from the
checkpoint's safetensors shards one block at a time (``--offload disk``) give the in-memory path's
saved tensors byte for byte and its perplexity exactly; the output appears only when complete.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from emprune.cli import main  # noqa: E402
from emprune.jobs.eval import perplexity, perplexity_streamed  # noqa: E402
from emprune.jobs.offload import Output, prune_to_disk, shrink_to_disk  # noqa: E402
from emprune.jobs.options import PruneOptions, ShrinkOptions  # noqa: E402
from emprune.jobs.prune_lm import prune_lm  # noqa: E402
from emprune.jobs.shrink_lm import shrink_lm  # noqa: E402
from emprune.models import checkpoint, layerwise, stream  # noqa: E402
from emprune.models.stream import DiskModel, Shards  # noqa: E402

TINY = ["--calib-samples", "3", "--seqlen", "16", "--quiet"]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_bytes(a: Path, b: Path) -> int:
    x, y = tensors(a), tensors(b)
    assert sorted(x) == sorted(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
        assert torch.equal(x[k].reshape(-1).view(torch.uint8), y[k].reshape(-1).view(torch.uint8)), k
    return len(x)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny):
    """The tiny LLaMA saved in bf16 over several shards (as large checkpoints are), with its tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("sharded") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
    AutoTokenizer.from_pretrained(tiny[0]).save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def _calib(n=4, seqlen=16, seed=0, vocab=300):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _in_memory(folder: Path, calib, opts: PruneOptions, out: Path, save_dtype=None):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    res = prune_lm(model, calib, opts)
    checkpoint.save_pruned(model, None, out, dict(res.info), dtype=save_dtype, progress=False)
    return res


@pytest.mark.parametrize("fields", [
    {},  # the default recipe: EMP counts + OBS update
    {"sparsity": 0.5},
    {"criterion": "magnitude", "recipe": "paper"},  # data-free: no calibration pass
    {"targets": "linear", "scope": "layer"},
    {"nm": "2:4"},
    {"target_sparsity": 0.4},  # a dense pass first, then the final one
    {"sparsity": 0.5, "allocation": "owl"},
])
def test_streamed_prune_is_byte_identical(sharded, tmp_path, fields):
    opts = PruneOptions(progress=False, **fields)
    calib = _calib()
    a = _in_memory(sharded, calib, opts, tmp_path / "mem")
    b, out = prune_to_disk(sharded, calib, opts, Output(tmp_path / "disk"))
    assert assert_same_bytes(tmp_path / "mem", out) > 10
    assert a.info["summary"] == b.info["summary"] and sorted(a.counts) == sorted(b.counts)
    assert all(torch.equal(a.counts[k], b.counts[k]) for k in a.counts)
    rep = json.loads((out / "emprune.json").read_text())
    assert rep["offload"]["mode"] == "disk" and rep["offload"]["blocks"] == 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(out))  # every tensor indexed, each shard listed in files
    assert set(index["weight_map"].values()) <= set(rep["files"])
    m = AutoModelForCausalLM.from_pretrained(out)  # plain transformers reads the folder
    assert m.model.layers[0].mlp.down_proj.weight.eq(0).any()


def _shrunk_in_memory(folder, calib, opts: ShrinkOptions, out: Path, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    report, info = shrink_lm(model, calib, opts, progress=False)
    checkpoint.save_shrunk(model, None, out, info, progress=False)
    return report, info


def assert_same_shrink(a: tuple, b: tuple, mem: Path, disk: Path) -> None:
    """Two shrinks (report, emprune.json) and their folders: the same tensors, byte for byte,
    the same decisions and measurements, the same config."""
    assert assert_same_bytes(mem, disk) > 10
    (ra, ia), (rb, ib) = a, b
    assert ia["kept_units"] == ib["kept_units"] and ia["widths"] == ib["widths"]
    assert [g.sensitivity for g in ra.groups] == [g.sensitivity for g in rb.groups]
    assert [g.neff for g in ra.groups] == [g.neff for g in rb.groups]
    assert (ra.params_before, ra.params_after, ra.macs_after) == (rb.params_before, rb.params_after, rb.macs_after)
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (mem, disk))
    assert ca == cb


@pytest.mark.parametrize("fields", [
    {},  # the default recipe: EMP's total placed by the measured sensitivity, bias compensation
    {"units": "mlp,heads"},
    {"units": "heads", "head_mode": "group"},
    {"keep": 0.5},
    {"recipe": "paper", "scope": "layer"},
    {"recipe": "zscore", "multiple_of": 1},
    {"criterion": "magnitude", "compensate": False},  # data-free: the blocks are only read
    {"uniform": True, "multiple_of": 1},  # a stock config: zero biases added once every block is written
    {"uniform": True, "units": "mlp,heads"},
])
def test_streamed_shrink_is_byte_identical(sharded, tmp_path, fields):
    fields = {"units": "mlp", **fields}
    calib = None if fields.get("criterion") == "magnitude" else _calib(n=6)
    opts = ShrinkOptions(progress=False, batch_size=4, **fields)
    a = _shrunk_in_memory(sharded, calib, opts, tmp_path / "mem")
    report, info, out = shrink_to_disk(sharded, calib, opts, Output(tmp_path / "disk"))
    assert_same_shrink(a, (report, info), tmp_path / "mem", out)
    if fields == {"units": "mlp"}:  # the default removes neurons (others may keep every unit of the tiny model)
        assert a[0].params_after < a[0].params_before
    rep = json.loads((out / "emprune.json").read_text())
    assert rep["kind"] == "shrunk" and rep["offload"]["mode"] == "disk"
    m = checkpoint.from_pretrained(out)  # the per-layer widths load from the shards' shapes
    assert sum(p.numel() for p in m.parameters()) == report.params_after
    if fields.get("uniform") and info["layout"] == "uniform":  # plain transformers reads a stock folder
        assert sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters()) == report.params_after


def test_streamed_shrink_spills_the_sensitivity_copies(sharded, tmp_path, monkeypatch):
    """With almost no memory available, the calibration activations and the per-group copies of
    the sensitivity pass live in memory-mapped temporary files; nothing changes."""
    opts = ShrinkOptions(progress=False, units="mlp,heads")
    calib = _calib(n=4)
    a = shrink_to_disk(sharded, calib, opts, Output(tmp_path / "a"))
    made = []
    real = torch.from_file
    monkeypatch.setattr(stream, "available_memory", lambda: 1000)
    monkeypatch.setattr(torch, "from_file", lambda *x, **k: made.append(x[0]) or real(*x, **k))
    b = shrink_to_disk(sharded, calib, opts, Output(tmp_path / "b"))
    assert len(made) >= 4  # two calibration buffers, two for the measurement rows, the copies
    assert_same_shrink(a[:2], b[:2], tmp_path / "a", tmp_path / "b")


def test_streamed_save_dtype_and_bf16_compute(sharded, tmp_path):
    opts = PruneOptions(progress=False, sparsity=0.5, criterion="magnitude")
    _in_memory(sharded, None, opts, tmp_path / "mem", save_dtype=torch.bfloat16)
    prune_to_disk(sharded, None, opts, Output(tmp_path / "disk", save_dtype=torch.bfloat16))
    assert assert_same_bytes(tmp_path / "mem", tmp_path / "disk")
    assert all(t.dtype == torch.bfloat16 for t in tensors(tmp_path / "disk").values())


@pytest.mark.parametrize("batch_size", [1, 3])
def test_streamed_perplexity_is_exact(sharded, batch_size):
    tokens = _calib(n=1, seqlen=16 * 9, seed=3).reshape(-1)
    model = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()
    a = perplexity(model, tokens, 16, batch_size=batch_size, progress=False)
    b = perplexity_streamed(DiskModel(sharded), tokens, 16, batch_size=batch_size, progress=False)
    assert a["nll"] == b["nll"] and a["ppl"] == b["ppl"] and a["tokens_evaluated"] == b["tokens_evaluated"]


def test_spilled_activations_give_the_same_result(sharded, tmp_path, monkeypatch):
    """With almost no memory available the activations between blocks live in a memory-mapped
    temporary file (deleted at once); the saved tensors do not change."""
    opts = PruneOptions(progress=False)
    calib = _calib()
    prune_to_disk(sharded, calib, opts, Output(tmp_path / "a"))
    made = []
    real = torch.from_file
    monkeypatch.setattr(stream, "available_memory", lambda: 1000)
    monkeypatch.setattr(torch, "from_file", lambda *a, **k: made.append(a[0]) or real(*a, **k))
    prune_to_disk(sharded, calib, opts, Output(tmp_path / "b"))
    assert made and not any(Path(p).exists() for p in made)  # spilled, and the files are gone already
    assert assert_same_bytes(tmp_path / "a", tmp_path / "b")
    buf = layerwise.buffer((2, 3), torch.float32, torch.device("cpu"))
    buf.copy_(torch.arange(6.0).reshape(2, 3))
    assert buf.sum().item() == 15.0


def test_an_interrupted_stream_leaves_the_previous_output(sharded, tmp_path, monkeypatch):
    out = tmp_path / "out"
    opts = PruneOptions(progress=False, sparsity=0.5, criterion="magnitude")
    prune_to_disk(sharded, None, opts, Output(out, info={"run": 1}))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(self, i, block):
        if i == 1:
            raise KeyboardInterrupt
        return real(self, i, block)

    real = DiskModel.block_tensors
    monkeypatch.setattr(DiskModel, "block_tensors", boom)
    with pytest.raises(KeyboardInterrupt):
        prune_to_disk(sharded, None, PruneOptions(progress=False, sparsity=0.3, criterion="magnitude"),
                      Output(out, overwrite=True, info={"run": 2}))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder, no lock left behind


def test_shards_refuse_a_truncated_file(sharded, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        Shards(bad)
    assert Shards(sharded).read(["model.norm.weight"])["model.norm.weight"].dtype == torch.bfloat16


def test_cli_prune_and_eval_offload_disk(sharded, tiny, tmp_path, capsys):
    text = str(tiny[1])
    assert main(["prune", str(sharded), "--out", str(tmp_path / "d"), "--offload", "disk", "--calib-text", text,
                 *TINY]) == 0
    assert "streaming" in capsys.readouterr().err
    assert main(["prune", str(sharded), "--out", str(tmp_path / "m"), "--offload", "none", "--calib-text", text,
                 *TINY]) == 0
    assert assert_same_bytes(tmp_path / "d", tmp_path / "m")
    rep = json.loads((tmp_path / "d" / "emprune.json").read_text())
    assert rep["calibration"]["text"] == text and rep["offload"]["mode"] == "disk" and "total_seconds" in rep
    capsys.readouterr()
    ppl = []
    for extra in (["--offload", "disk"], []):
        assert main(["eval", str(tmp_path / "d"), "--ppl", "--eval-text", text, "--seqlen", "32", "--quiet",
                     *extra]) == 0
        ppl.append(capsys.readouterr().out.split()[1])
    assert ppl[0] == ppl[1]


def test_cli_streams_by_default_when_the_model_does_not_fit(sharded, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stream, "available_memory", lambda: 1000)
    assert main(["prune", str(sharded), "--out", str(tmp_path / "d"), "--calib-text", str(tiny[1]), *TINY]) == 0
    err = capsys.readouterr().err
    assert "more than 60% of the" in err and "--offload disk" in err
    assert json.loads((tmp_path / "d" / "emprune.json").read_text())["offload"]["mode"] == "disk"


@pytest.mark.parametrize("argv, msg", [
    (["prune", "{m}", "--offload", "disk", "--scope", "global"], "--scope global"),
    (["prune", "{m}", "--offload", "disk", "--device", "auto"], "not auto"),
    (["eval", "{m}", "--ppl", "--tasks", "piqa", "--offload", "disk"], "--tasks with a model streamed"),
])
def test_cli_offload_disk_refusals_before_loading(sharded, tmp_path, capsys, no_load, monkeypatch, argv, msg):
    monkeypatch.setattr(stream, "DiskModel", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    argv = [a.replace("{m}", str(sharded)) for a in argv]
    if argv[0] == "prune":
        argv += ["--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_shrink_offload_disk(sharded, tiny, tmp_path, capsys):
    text = str(tiny[1])
    assert main(["shrink", str(sharded), "--out", str(tmp_path / "d"), "--offload", "disk", "--calib-text", text,
                 "--units", "mlp,heads", *TINY]) == 0
    cap = capsys.readouterr()
    assert "streaming" in cap.err and "saved to" in cap.out
    assert main(["shrink", str(sharded), "--out", str(tmp_path / "m"), "--offload", "none", "--calib-text", text,
                 "--units", "mlp,heads", *TINY]) == 0
    assert assert_same_bytes(tmp_path / "d", tmp_path / "m")
    d, m = (json.loads((tmp_path / x / "emprune.json").read_text()) for x in ("d", "m"))
    assert d["kept_units"] == m["kept_units"] and d["calibration"]["text"] == m["calibration"]["text"] == text
    assert d["offload"]["mode"] == "disk" and d["command"].startswith("emprune shrink")


def test_cli_shrink_streams_by_default_when_the_model_does_not_fit(sharded, tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(stream, "available_memory", lambda: 1000)
    assert main(["shrink", str(sharded), "--out", str(tmp_path / "d"), "--calib-text", str(tiny[1]), *TINY]) == 0
    assert "--offload disk" in capsys.readouterr().err
    assert json.loads((tmp_path / "d" / "emprune.json").read_text())["offload"]["mode"] == "disk"


@pytest.mark.parametrize("extra, msg", [
    (["--units", "layers,mlp"], "--units layers decides over the whole model"),
    (["--units", "hidden"], "--units hidden decides over the whole model"),
    (["--criterion", "taylor"], "--criterion taylor needs a backward pass"),
])
def test_cli_shrink_offload_disk_refusals_before_loading(sharded, tiny, tmp_path, capsys, no_load, monkeypatch,
                                                          extra, msg):
    monkeypatch.setattr(stream, "DiskModel", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    argv = ["shrink", str(sharded), "--out", str(tmp_path / "o"), "--offload", "disk", "--calib-text",
            str(tiny[1]), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "--offload none" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_streamed_eval_of_a_shrunk_folder(tiny, tmp_path):
    """Per-layer widths (an ``emprune shrink`` output) are read from the shards' shapes."""
    from emprune.models.loading import load_causal_lm

    out = tmp_path / "shrunk"
    assert main(["shrink", str(tiny[0]), "--out", str(out), "--calib-text", str(tiny[1]), *TINY]) == 0
    tokens = _calib(n=1, seqlen=16 * 5, seed=4).reshape(-1)
    a = perplexity(load_causal_lm(out)[0], tokens, 16, batch_size=2, progress=False)
    b = perplexity_streamed(DiskModel(out), tokens, 16, batch_size=2, progress=False)
    assert a["nll"] == b["nll"]


@pytest.mark.real_model
def test_smollm2_streamed_prune_and_perplexity_match_in_memory(tmp_path):
    """SmolLM2-135M saved as a bf16 folder: the default recipe (EMP counts + OBS update) streamed
    from disk saves the in-memory path's tensors byte for byte, and both outputs have the same
    perplexity to the last digit."""
    pytest.importorskip("gguf")
    from emprune.models import data
    from emprune.models.loading import load_causal_lm

    try:
        model, tok = load_causal_lm("smollm2-135m", progress=False)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    folder = tmp_path / "smol"
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    ids = data.tokenize(tok, data.read_text_file(data.default_text_path("calib"), "calib")[:60000])
    calib = data.calibration_windows(ids, 4, 128, 0)
    opts = PruneOptions(progress=False)
    _in_memory(folder, calib, opts, tmp_path / "mem")
    prune_to_disk(folder, calib, opts, Output(tmp_path / "disk"))
    assert assert_same_bytes(tmp_path / "mem", tmp_path / "disk") == 272  # 30 blocks x 9 + embeddings (tied) + norm
    tokens = ids[:4 * 256]
    a = perplexity(AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval(), tokens, 256, batch_size=2,
                   progress=False)
    b = perplexity_streamed(DiskModel(tmp_path / "disk"), tokens, 256, batch_size=2, progress=False)
    assert a["ppl"] == b["ppl"] and a["ppl"] < 1e4


@pytest.mark.real_model
def test_gguf_is_streamed_one_tensor_at_a_time(tmp_path):
    """A quantised GGUF (SmolLM2-135M, Q4_1) streamed from the file: each tensor de-quantised on
    demand gives the in-memory loader's tensors, so the pruned output and the perplexity match."""
    pytest.importorskip("gguf")
    from emprune.models.loading import load_causal_lm, locate

    try:
        path = locate("smollm2-135m")[1]
    except FileNotFoundError as e:
        pytest.skip(str(e))
    opts = PruneOptions(progress=False, sparsity=0.5, criterion="magnitude")
    model = load_causal_lm("smollm2-135m", progress=False)[0]
    res = prune_lm(model, None, opts)
    checkpoint.save_pruned(model, None, tmp_path / "mem", dict(res.info), progress=False)
    prune_to_disk(path, None, opts, Output(tmp_path / "disk"))
    assert assert_same_bytes(tmp_path / "mem", tmp_path / "disk") == 272
    disk = DiskModel(path)
    assert disk.shards.nbytes() < path.stat().st_size  # read as stored: quantised blocks, not floats
    tokens = _calib(n=1, seqlen=4 * 128, seed=5, vocab=40000).reshape(-1)
    a = perplexity(load_causal_lm("smollm2-135m", progress=False)[0], tokens, 128, batch_size=2, progress=False)
    b = perplexity_streamed(disk, tokens, 128, batch_size=2, progress=False)
    assert a["nll"] == b["nll"]


@pytest.mark.real_model
def test_smollm2_gguf_streamed_shrink_matches_in_memory(tmp_path):
    """``emprune shrink``'s default recipe on SmolLM2-135M streamed from its quantised GGUF (each
    block de-quantised for its turn, three passes) saves the in-memory path's tensors byte for
    byte, with the same sensitivities and decisions; both outputs have the same perplexity."""
    pytest.importorskip("gguf")
    from emprune.models import data
    from emprune.models.loading import load_causal_lm, locate

    try:
        path = locate("smollm2-135m")[1]
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, tok = load_causal_lm("smollm2-135m", progress=False)
    ids = data.tokenize(tok, data.read_text_file(data.default_text_path("calib"), "calib")[:60000])
    calib = data.calibration_windows(ids, 4, 128, 0)
    opts = ShrinkOptions(progress=False, units="mlp")
    report, info = shrink_lm(model.eval(), calib, opts, progress=False)
    checkpoint.save_shrunk(model, None, tmp_path / "mem", info, progress=False)
    del model
    b = shrink_to_disk(path, calib, opts, Output(tmp_path / "disk"))
    assert_same_shrink((report, info), b[:2], tmp_path / "mem", tmp_path / "disk")
    assert report.params_after < report.params_before and report.groups[0].sensitivity is not None
    tokens = ids[-4 * 128:]
    a = perplexity(checkpoint.from_pretrained(tmp_path / "mem").eval(), tokens, 128, batch_size=2, progress=False)
    c = perplexity_streamed(DiskModel(tmp_path / "disk"), tokens, 128, batch_size=2, progress=False)
    assert a["nll"] == c["nll"] and a["ppl"] < 1e4
