"""``emprune export`` (issue 24): GGUF files that llama.cpp itself loads and runs, checked against
PyTorch on the same tokens.

* the tiny random LLaMA of tests/tiny_llama.py: one width (llama.cpp's ``llama``) and per-layer
  MLP widths and head counts (``deci``), float32 logits within 1e-3 of PyTorch, its tokenizer
  converted from transformers;
* the real SmolLM2-135M: f16 perplexity within 0.5 % and q8_0 within 2 % of PyTorch's on held-out
  text, a per-layer shrink (MLP widths and heads) exported from its folder by the command line,
  greedy generation that agrees with PyTorch;
* refusals in one line before any load, and atomic files.

llama.cpp is llama-cpp-python (the ``deploy`` extra, installed by scripts/test.sh): these tests
never skip for it under CI (conftest.py).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from emprune.cli import main  # noqa: E402
from emprune.jobs.eval import perplexity  # noqa: E402
from emprune.jobs.export import check_export  # noqa: E402
from emprune.jobs.shrink_lm import shrink_lm  # noqa: E402
from emprune.models import checkpoint, data, llamacpp, loading  # noqa: E402
from emprune.models import export as gx  # noqa: E402


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return int(e.code)


def one_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "error" in lines[0], err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].double().numpy()


def torch_ppl(model, windows: torch.Tensor) -> float:
    """emprune's PyTorch perplexity over the same windows (each from position 0)."""
    return perplexity(model, windows.reshape(-1), windows.shape[1], progress=False)["ppl"]


def greedy_torch(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def greedy_llama(path, ids: list[int], n: int) -> list[int]:
    with llamacpp.open_gguf(path, len(ids) + n + 8, all_logits=False) as llm:
        got = []
        for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            got.append(int(t))
            if len(got) == n:
                break
        return got


# ------------------------------------------------------------------ the tiny model


@pytest.fixture(scope="module")
def tiny_model(tiny):
    model, tok = loading.load_causal_lm(tiny[0], progress=False)
    return model, tok


IDS = list(range(2, 60))


def test_tiny_dense_is_llama_arch_and_logits_match(tiny_model, tmp_path):
    model, tok = tiny_model
    res = gx.write_gguf(model, tok, tmp_path / "t.gguf", "f32", progress=False)
    assert res.arch == "llama" and res.type_counts == {"F32": res.type_counts["F32"]}
    got = llamacpp.logits(res.path, IDS)
    ref = torch_logits(model, IDS)
    assert np.abs(got - ref).max() < 1e-3, np.abs(got - ref).max()
    # the tokenizer was converted from transformers (no source GGUF): llama.cpp tokenizes alike
    with llamacpp.open_gguf(res.path, 64, all_logits=False) as llm:
        text = "The quick brown fox jumps over the lazy dog."
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text)["input_ids"]


def test_llama3_rope_scaling_is_written(tmp_path, monkeypatch):
    """Llama-3-style RoPE scaling goes in as llama.cpp's rope_freqs tensor: logits match within
    1e-3 past the original context, and do not without that tensor (so the test sees it)."""
    from tiny_llama import tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    ids = list(range(2, 120))
    ref = torch_logits(m, ids)
    res = gx.write_gguf(m, tok, tmp_path / "r.gguf", "f32", progress=False)
    assert np.abs(llamacpp.logits(res.path, ids) - ref).max() < 1e-3
    monkeypatch.setattr(gx, "_rope_freqs", lambda cfg, hd: None)
    bare = gx.write_gguf(m, tok, tmp_path / "bare.gguf", "f32", progress=False)
    assert np.abs(llamacpp.logits(bare.path, ids) - ref).max() > 1e-3


def _per_layer(model, mlp_keep, head_keep):
    """A copy of ``model`` shrunk to explicit per-layer MLP widths and query-head counts."""
    m = copy.deepcopy(model)
    keep = {}
    for i, (w, h) in enumerate(zip(mlp_keep, head_keep)):
        keep[f"model.layers.{i}.mlp"] = w
        keep[f"model.layers.{i}.self_attn"] = h
    shrink_lm(m, None, units="mlp,heads", criterion="magnitude", keep=keep, multiple_of=1, progress=False)
    return m


def test_tiny_per_layer_mlp_and_heads_is_deci_and_logits_match(tiny_model, tmp_path):
    model, tok = tiny_model
    m = _per_layer(model, [40, 96, 64], [2, 4, 2])  # heads: 4 query / 2 KV -> 2 query keeps 1 per KV group
    res = gx.write_gguf(m, tok, tmp_path / "d.gguf", "f32", progress=False)
    assert res.arch == "deci"
    assert res.layers.ffn == [40, 96, 64] and res.layers.heads == [2, 4, 2] and res.layers.kv_heads == [2, 2, 2]
    got, ref = llamacpp.logits(res.path, IDS), torch_logits(m, IDS)
    assert np.abs(got - ref).max() < 1e-3, np.abs(got - ref).max()
    assert gx.file_tensor_types(res.path, "f32")[0] == res.type_counts


def test_tiny_uniform_with_compensation_biases_is_llama(tiny_model, tmp_path):
    """A uniform shrink with FLAP compensation: down/o-proj biases are written, all-zero biases
    (the gate/up ones a stock config needs) are dropped and counted."""
    model, tok = tiny_model
    m = copy.deepcopy(model)
    calib = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    shrink_lm(m, calib, units="mlp", keep=0.66, uniform=True, compensate=True, progress=False)
    assert m.model.layers[0].mlp.down_proj.bias is not None
    res = gx.write_gguf(m, tok, tmp_path / "u.gguf", "f32", progress=False)
    assert res.arch == "llama" and len(set(res.layers.ffn)) == 1
    names = {t.name for t in __import__("gguf").GGUFReader(str(res.path)).tensors}
    assert "blk.0.ffn_down.bias" in names
    got, ref = llamacpp.logits(res.path, IDS), torch_logits(m, IDS)
    assert np.abs(got - ref).max() < 1e-3, np.abs(got - ref).max()


def test_quantised_every_matrix_or_refused(tiny_model, tmp_path):
    model, tok = tiny_model
    res = gx.write_gguf(model, tok, tmp_path / "q.gguf", "q8_0", progress=False)
    r = __import__("gguf").GGUFReader(str(res.path))
    for t in r.tensors:  # every matrix Q8_0, every 1-D tensor F32
        assert t.tensor_type.name == ("Q8_0" if len(t.shape) >= 2 else "F32"), (t.name, t.tensor_type.name)
    assert not res.fallback
    odd = _per_layer(model, [40, 96, 64], [4, 4, 4])  # 40 is not a multiple of 32
    with pytest.raises(ValueError, match="--multiple-of 32"):
        gx.write_gguf(odd, tok, tmp_path / "odd.gguf", "q8_0", progress=False)
    assert not (tmp_path / "odd.gguf").exists()
    fb = gx.write_gguf(odd, tok, tmp_path / "fb.gguf", "q8_0", fallback="f16", progress=False)
    assert fb.fallback == ["blk.0.ffn_down.weight"]
    assert gx.file_tensor_types(fb.path, "q8_0")[1] == ["blk.0.ffn_down.weight"]
    # a K-quant through llama.cpp's own quantiser: rows of 64 take its quantised fallbacks, none float
    k = gx.write_gguf(model, tok, tmp_path / "k.gguf", "q4_k_m", progress=False)
    assert not k.fallback and set(k.type_counts) <= {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0", "Q5_K"}, k.type_counts
    assert k.type_counts["F32"] == 7  # the norms: 3 blocks x 2 + the output norm
    assert np.isfinite(llamacpp.logits(k.path, IDS)).all()


def test_cli_refuses_in_one_line_before_loading(tiny, tmp_path, capsys, no_load):
    folder = str(tiny[0])
    out = str(tmp_path / "x.gguf")
    assert run(["export", folder, "--gguf", out, "--type", "q9"]) == 2
    one_error(capsys, "unknown GGUF type 'q9'")
    assert run(["export", folder, "--gguf", str(tmp_path / "x.bin")]) == 2
    one_error(capsys, "must end in .gguf")
    (tmp_path / "x.gguf").write_bytes(b"old")
    assert run(["export", folder, "--gguf", out]) == 2
    one_error(capsys, "exists; pass --overwrite")
    assert (tmp_path / "x.gguf").read_bytes() == b"old"
    assert run(["export", str(tmp_path / "nope"), "--gguf", str(tmp_path / "y.gguf")]) == 2
    one_error(capsys, "nope")
    assert run(["export", folder, "--gguf", str(tmp_path / "y.gguf"), "--fallback", "q4_k_m"]) == 2
    one_error(capsys, "--fallback")
    assert run(["export", folder, "--gguf", str(tmp_path / "y.gguf"), "--tokenizer-from", folder]) == 2
    one_error(capsys, "--tokenizer-from")


def test_k_quant_without_llama_cpp_is_one_line(tiny, tmp_path, capsys, no_load, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert run(["export", str(tiny[0]), "--gguf", str(tmp_path / "k.gguf"), "--type", "q4_k_m"]) == 2
    one_error(capsys, "--type q4_k_m needs llama.cpp's Python binding", "pip install 'emprune[deploy]'")
    assert not (tmp_path / "k.gguf").exists()


def test_cli_refuses_widths_off_the_blocks_from_the_headers(tiny_model, tmp_path, capsys, monkeypatch):
    model, tok = tiny_model
    odd = _per_layer(model, [40, 96, 64], [4, 4, 4])
    folder = checkpoint.save_shrunk(odd, tok, tmp_path / "odd", {"kind": "shrunk"}, progress=False)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["EmpruneShrunkLlamaForCausalLM"]  # stock tools refuse the folder
    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert run(["export", str(folder), "--gguf", str(tmp_path / "o.gguf"), "--type", "q4_0"]) == 2
    one_error(capsys, "1 matrix cannot be q4_0", "not a multiple of 32", "down_proj", "--multiple-of 32",
              "--fallback f16")


def test_gemma_refused_before_loading(capsys, no_load, tmp_path):
    try:
        loading.resolve_short_name("gemma3-270m")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert run(["export", "gemma3-270m", "--gguf", str(tmp_path / "g.gguf")]) == 2
    one_error(capsys, "'gemma3'", "LLaMA-family")


def test_interrupted_write_leaves_the_old_file(tiny_model, tmp_path, monkeypatch):
    model, tok = tiny_model
    out = tmp_path / "a.gguf"
    out.write_bytes(b"previous")

    def fail(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(gx, "_encode", fail)
    with pytest.raises(KeyboardInterrupt):
        gx.write_gguf(model, tok, out, "q8_0", progress=False)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]  # no temporary left behind


def test_per_layer_folder_config_is_refused_by_plain_transformers(tiny_model, tmp_path):
    model, tok = tiny_model
    m = _per_layer(model, [40, 96, 64], [4, 4, 4])
    folder = checkpoint.save_shrunk(m, tok, tmp_path / "pl", {"kind": "shrunk"}, progress=False)
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(folder)
    again, _ = loading.load_causal_lm(folder, progress=False)  # emprune's loader: the right widths
    assert [b.mlp.down_proj.in_features for b in again.model.layers] == [40, 96, 64]


def test_every_folder_emprune_writes_exports(tiny, tmp_path, capsys):
    """A pruned folder (masks: llama), a per-layer shrink healed by ``emprune heal`` (deci), each
    through the command line; the file reproduces the folder's logits in llama.cpp."""
    d, text = tiny
    pruned, small, healed = tmp_path / "pruned", tmp_path / "small", tmp_path / "healed"
    assert run(["prune", str(d), "--out", str(pruned), "--criterion", "magnitude", "--sparsity", "0.5",
                "--quiet"]) == 0
    assert run(["shrink", str(d), "--out", str(small), "--calib-text", str(text), "--calib-samples", "4",
                "--seqlen", "16", "--units", "mlp,heads", "--recipe", "paper", "--criterion", "activation",
                "--multiple-of", "1", "--quiet"]) == 0
    assert run(["heal", str(small), "--out", str(healed), "--text", str(text), "--steps", "2", "--seqlen", "32",
                "--quiet"]) == 0
    for folder, arch in ((pruned, "llama"), (healed, "deci")):
        out = tmp_path / f"{folder.name}.gguf"
        assert run(["export", str(folder), "--gguf", str(out), "--type", "f32", "--quiet"]) == 0
        assert f"architecture: {arch}" in capsys.readouterr().out
        model, _ = loading.load_causal_lm(folder, progress=False)
        got, ref = llamacpp.logits(out, IDS), torch_logits(model, IDS)
        assert np.abs(got - ref).max() < 1e-3, (folder.name, np.abs(got - ref).max())


# ------------------------------------------------------------------ the real SmolLM2-135M


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = loading.resolve_short_name("smollm2-135m")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    model, tok = loading.load_causal_lm("smollm2-135m", progress=False)
    ids = data.eval_tokens(tok, data.load_text("python-docs"), 1024)  # held-out text: not WikiText
    windows = ids[: 4 * 256].reshape(4, 256)
    return path, model, tok, windows, torch_ppl(model, windows)


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("qtype,tol", [("f16", 0.005), ("q8_0", 0.02)])
def test_smollm2_export_perplexity_matches_pytorch(smollm2, tmp_path, qtype, tol):
    path, model, tok, windows, ref = smollm2
    res = gx.write_gguf(model, tok, tmp_path / f"s.{qtype}.gguf", qtype, source_gguf=path, progress=False)
    assert res.arch == "llama" and res.tokenizer.startswith("copied from")
    assert not res.fallback and res.type_counts.get(qtype.upper(), 0) == 7 * 30 + 1  # every matrix (+ the tied embedding)
    got = llamacpp.perplexity(res.path, windows.numpy())["ppl"]
    assert abs(got / ref - 1) < tol, (qtype, got, ref)


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_per_layer_shrink_exports_from_its_folder(smollm2, tmp_path, capsys):
    """A per-layer shrink (MLP widths on the grid of 32, 9 or 6 query heads by layer) saved as
    emprune writes it, exported by the command line as q8_0 (deci): the tokenizer is copied from
    the model it was made from, llama.cpp's perplexity is within 2 % of PyTorch's, and a float32
    export generates greedily what PyTorch generates."""
    path, model, tok, windows, _ = smollm2
    m = copy.deepcopy(model)
    keep = {}
    for i in range(30):  # mild (magnitude scores, no calibration): a model still worth measuring
        keep[f"model.layers.{i}.mlp"] = 1536 - 64 * (i % 4)
        keep[f"model.layers.{i}.self_attn"] = 6 if i % 10 == 5 else 9
    _, info = shrink_lm(m, None, units="mlp,heads", criterion="magnitude", keep=keep, progress=False)
    info["model"] = "smollm2-135m"
    folder = checkpoint.save_shrunk(m, tok, tmp_path / "small", info, progress=False)
    out = tmp_path / "small.gguf"
    assert run(["export", str(folder), "--gguf", str(out), "--type", "q8_0", "--quiet",
                "--json", str(tmp_path / "e.json")]) == 0
    report = capsys.readouterr().out
    assert "deci" in report and "every matrix quantised" in report and "copied from" in report
    meta = json.loads((tmp_path / "e.json").read_text())
    assert meta["feed_forward_length"] == [keep[f"model.layers.{i}.mlp"] for i in range(30)]
    assert meta["head_count"] == [keep[f"model.layers.{i}.self_attn"] for i in range(30)]
    assert meta["head_count_kv"] == [3] * 30
    ref = torch_ppl(m, windows)
    got = llamacpp.perplexity(out, windows.numpy())["ppl"]
    assert abs(got / ref - 1) < 0.02, (got, ref)
    # float32: logits agree, and greedy generation is PyTorch's
    f32 = gx.write_gguf(m, tok, tmp_path / "small.f32.gguf", "f32", source_gguf=path, progress=False)
    prompt = tok("The capital of France is")["input_ids"]
    assert np.abs(llamacpp.logits(f32.path, prompt) - torch_logits(m, prompt)).max() < 1e-3
    want = greedy_torch(m, prompt, 12)
    assert greedy_llama(f32.path, prompt, 12) == want
    assert len(set(want)) > 3, tok.decode(want)  # not one token repeated


def test_check_export_finds_the_source_gguf(tmp_path):
    try:
        path = loading.resolve_short_name("smollm2-135m")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    plan = check_export("smollm2-135m", tmp_path / "a.gguf", "Q8_0")
    assert plan.source_gguf == path and plan.qtype == "q8_0"
    with pytest.raises(ValueError, match="input model itself"):
        check_export(str(path), path, "q8_0", overwrite=True)
