"""Every supported decoder layout prunes, saves and reloads as a stock checkpoint.

Eight families on tiny random configs (2 blocks, hidden 32, no downloads): LLaMA, Mistral, Qwen2
(q/k/v bias), Qwen3 (q/k norm), Gemma-3 (text-only), Phi-3 (fused qkv_proj / gate_up_proj),
GPT-2 (``Conv1D``, weights stored ``[in, out]``) and OPT (``model.decoder.layers``, fc1/fc2).
For each: magnitude and Wanda, EMP (default recipe: with Wanda, the OBS update) and fixed 50 %, mlp
and linear targets;
``save_pruned`` -> plain ``from_pretrained`` gives the in-memory model's logits, and the zeros
counted here in the stored weights are the report's pruned fraction. GPT-2's rows are output
units (each stored column is a unit). Unsupported layouts get one line naming the supported ones.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from emprune.cli import main  # noqa: E402
from emprune.structure import layouts  # noqa: E402
from emprune.models.layerwise import prune_layerwise  # noqa: E402
from emprune.models.checkpoint import save_pruned  # noqa: E402
from emprune.jobs.prune_lm import prune_lm  # noqa: E402

VOCAB, SEQ = 128, 16
_DEC = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _config(family: str):
    """A tiny config of ``family`` (2 blocks, hidden 32)."""
    T = transformers
    return {
        "llama": lambda: T.LlamaConfig(**_DEC),
        "mistral": lambda: T.MistralConfig(**_DEC, sliding_window=8),
        "qwen2": lambda: T.Qwen2Config(**_DEC),  # q/k/v biases
        "qwen3": lambda: T.Qwen3Config(**_DEC, head_dim=8),  # q/k norms
        "gemma3": lambda: T.Gemma3TextConfig(**{**_DEC, "num_key_value_heads": 1}, head_dim=8, sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: T.Phi3Config(**_DEC),  # fused qkv_proj, gate_up_proj
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **_IDS),
        "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64, **_IDS),
    }[family]()


#: family -> (layout, its mlp targets, its attention targets), relative to a block
EXPECTED = {
    **{f: ("llama", {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
           {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"})
       for f in ("llama", "mistral", "qwen2", "qwen3", "gemma3")},
    "phi3": ("phi3", {"mlp.gate_up_proj", "mlp.down_proj"}, {"self_attn.qkv_proj", "self_attn.o_proj"}),
    "gpt2": ("gpt2", {"mlp.c_fc", "mlp.c_proj"}, {"attn.c_attn", "attn.c_proj"}),
    "opt": ("opt", {"fc1", "fc2"}, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                    "self_attn.out_proj"}),
}
FAMILIES = list(EXPECTED)
SUPPORTED = ("LLaMA-like", "Phi-3", "GPT-2", "OPT")


def _model(family: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(family), attn_implementation=attn).eval()


def _tokens(n: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))


def _stored_targets(model, targets: str) -> dict[str, torch.Tensor]:
    """Full name -> the stored weight (GPT-2: ``[in, out]``) of every target, from the layout table."""
    lay = layouts.find_layout(model)
    out = {}
    for i, block in enumerate(model.get_submodule(lay.blocks)):
        for name in lay.names(targets):
            out[f"{lay.blocks}.{i}.{name}"] = block.get_submodule(name).weight
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_table_finds_blocks_and_targets(family):
    model = _model(family)
    name, mlp, attn = EXPECTED[family]
    lay = layouts.find_layout(model)
    assert lay.name == name
    blocks = layouts.decoder_layers(model)
    assert len(blocks) == 2
    for block in blocks:
        assert set(layouts.block_linears(block, "mlp")) == mlp
        assert set(layouts.block_linears(block, "linear")) == mlp | attn


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_replay_equals_the_models_hidden_states(family):
    """The loop feeds each block exactly what the model feeds it: its own arguments are replayed
    (GPT-2's mask is positional; OPT/GPT-2 add position embeddings before the blocks). Eager
    attention: a dropped causal mask would change the outputs."""
    model, tokens = _model(family, "eager"), _tokens(3)
    with torch.no_grad():
        ref = model(tokens, output_hidden_states=True).hidden_states
    blocks = layouts.decoder_layers(model)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(blocks))}
    phase = {"loop": False}

    def recorder(i):
        def hook(module, args, kwargs):
            if phase["loop"]:
                seen[i].append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        return hook

    handles = [b.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        prune_layerwise(model, tokens, "linear", lambda i, lin: phase.update(loop=True), progress=False,
                        batch_size=2)
    finally:
        for h in handles:
            h.remove()
    got = torch.cat(seen[1][:2])  # block 1's first pass (two batches) is fed block 0's replayed outputs
    assert torch.allclose(got, ref[1], atol=1e-5), float((got - ref[1]).abs().max())


@pytest.mark.parametrize("sparsity", [None, 0.5], ids=["emp", "fixed50"])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prune_save_reload_same_logits_and_reported_fraction(family, criterion, sparsity, tmp_path):
    _prune_save_reload(family, criterion, sparsity, "mlp", tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_targets_linear(family, tmp_path):
    res = _prune_save_reload(family, "wanda", None, "linear", tmp_path)
    _, mlp, attn = EXPECTED[family]
    prefix = re.escape(layouts.find_layout(_model(family)).blocks) + r"\.\d+\."
    assert {re.sub(prefix, "", lay["name"]) for lay in res.info["layers"]} == mlp | attn


def _prune_save_reload(family: str, criterion: str, sparsity: float | None, targets: str, tmp_path):
    model, tokens = _model(family), _tokens()
    dense = {n: w.detach().clone() for n, w in _stored_targets(model, targets).items()}
    assert all(int((w == 0).sum()) == 0 for w in dense.values())  # so pruned = zeros below
    res = prune_lm(model, tokens if criterion == "wanda" else None, criterion=criterion, sparsity=sparsity,
                   targets=targets, progress=False)
    stored = _stored_targets(model, targets)  # GPT-2: Conv1D again, [in, out]
    assert all(stored[n].shape == dense[n].shape for n in dense)
    zeros = sum(int((w == 0).sum()) for w in stored.values())
    total = sum(w.numel() for w in stored.values())
    assert res.info["summary"]["targeted_weights"] == total
    assert res.pruned_fraction == pytest.approx(zeros / total, abs=0)
    assert res.pruned_fraction > 0.3
    for lay in res.info["layers"]:  # and per layer
        assert lay["total"] - lay["kept"] == int((stored[lay["name"]] == 0).sum()), lay["name"]
    # EMP with Wanda gets the default recipe's OBS update (kept weights rewritten, every layout);
    # the baselines and data-free runs keep their weights untouched
    assert (res.info["update"] is not None) == (criterion == "wanda" and sparsity is None)
    for n, w in stored.items():
        if res.info["update"] is None:
            assert torch.equal(w[w != 0], dense[n][w != 0])
        assert torch.isfinite(w).all()

    out = save_pruned(model, None, tmp_path / "out", res.info, progress=False)
    assert json.loads((out / "emprune.json").read_text())["summary"]["pruned_fraction"] == res.pruned_fraction
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    for n, w in _stored_targets(reloaded, targets).items():
        assert torch.equal(w, stored[n]), n
    with torch.no_grad():
        a, b = model(tokens).logits, reloaded(tokens).logits
    assert float((a - b).abs().max()) < 1e-5
    return res


def test_gpt2_rows_are_output_units():
    """GPT-2 stores c_fc as [in, out]: a unit (Wanda's comparison group) is a stored column.
    At 50 % every column keeps exactly half of its inputs, the ones with the largest
    |W_ij| * ||X_i|| over the calibration inputs (block 0: the dense model's activations)."""
    model, tokens = _model("gpt2"), _tokens()
    c_fc = model.transformer.h[0].mlp.c_fc
    dense = c_fc.weight.detach().clone()  # [in 32, out 128]
    xs = []
    h = c_fc.register_forward_hook(lambda m, i, o: xs.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(tokens)
    h.remove()
    norms = torch.cat(xs).double().norm(dim=0)  # ||X_i|| per input feature
    prune_lm(model, tokens, criterion="wanda", sparsity=0.5, targets="mlp", progress=False)
    w = c_fc.weight
    n_in, n_out = w.shape
    assert ((w == 0).sum(dim=0) == n_in // 2).all()  # every column (output unit) half zero
    assert not ((w == 0).sum(dim=1) == n_out // 2).all()  # rows of the storage are not the units
    score = dense.abs().double() * norms[:, None]
    top = score.topk(n_in // 2, dim=0).indices
    expected = torch.zeros_like(w, dtype=torch.bool).scatter_(0, top, True)
    assert torch.equal(w != 0, expected)
    assert type(c_fc).__name__ == "Conv1D" and type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def _unsupported(kind: str):
    T = transformers
    torch.manual_seed(0)
    if kind == "bert":  # not a decoder-only layout at all
        cfg = T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, is_decoder=True)
    else:  # a decoder layout emprune does not know (gpt_neox.layers, mlp.dense_h_to_4h)
        cfg = T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=64, **_IDS)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["bert", "gpt_neox"])
def test_unsupported_layout_one_line_naming_the_supported(kind):
    model = _unsupported(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(NotImplementedError) as err:
        prune_lm(model, _tokens(), criterion="wanda", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "unsupported architecture" in msg and type(model).__name__ in msg
    assert all(s in msg for s in SUPPORTED), msg
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_cli_unsupported_layout_exits_2_with_one_line(tmp_path, capsys):
    from tiny_llama import tokenizer

    folder, out = tmp_path / "neox", tmp_path / "out"
    _unsupported("gpt_neox").save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    capsys.readouterr()  # the saving bars above
    # --seqlen within the model's 64 positions (a longer one is refused first, before the load)
    assert main(["prune", str(folder), "--out", str(out), "--seqlen", "32", "--quiet"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("loading ")]
    assert len(err) == 1 and err[0].startswith("emprune prune: error: unsupported architecture"), err
    assert all(s in err[0] for s in SUPPORTED)
    assert not out.exists()


def test_cli_prunes_gpt2_to_a_stock_checkpoint(tmp_path, capsys):
    from tiny_llama import tokenizer

    folder, out = tmp_path / "gpt2", tmp_path / "out"
    _model("gpt2").save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    capsys.readouterr()  # the saving bars above
    assert main(["prune", str(folder), "--out", str(out), "--criterion", "magnitude", "--sparsity", "0.5",
                 "--quiet"]) == 0
    assert "pruned 50.00%" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    for block in model.transformer.h:
        w = block.mlp.c_fc.weight  # [in, out]: each output unit (column) keeps half
        assert ((w == 0).sum(dim=0) == w.shape[0] // 2).all()


@pytest.mark.parametrize("family", ["gpt2", "opt", "phi3"])
def test_shrink_refuses_other_layouts_with_one_line(family):
    from emprune.structure.units import find_groups

    with pytest.raises(NotImplementedError) as err:
        find_groups(_model(family), "mlp")
    msg = str(err.value)
    assert "\n" not in msg and "emprune shrink supports LLaMA-like" in msg, msg


def test_linear_view_writes_back_when_the_view_is_broken():
    """Moving a block to another device (``prune_lm(device=...)``) or replacing the Linear's weight
    breaks the shared storage: the Conv1D still gets the Linear's values, transposed."""
    model = _model("gpt2")
    conv = model.transformer.h[1].mlp.c_fc
    dense = conv.weight.detach().clone()
    with layouts.linear_view(model):
        lin = model.transformer.h[1].mlp.c_fc
        assert isinstance(lin, torch.nn.Linear) and lin.weight.shape == (dense.shape[1], dense.shape[0])
        lin.weight = torch.nn.Parameter(lin.weight.detach().clone().contiguous())  # a copy: view broken
        lin.weight.data[:, 0] = 0  # input feature 0 of every output unit
    assert model.transformer.h[1].mlp.c_fc is conv and conv.weight.is_contiguous()
    assert (conv.weight[0] == 0).all() and torch.equal(conv.weight[1:], dense[1:])
