"""Hidden channels (issue 25): ``emprune shrink --units hidden`` removes channels of the residual
stream (embedding, LM head, every projection, every norm).

* keeping every channel changes nothing; removing channels that are zero everywhere changes
  nothing (up to the norms' eps), for LLaMA (tied and untied head) and Gemma-3 (``1 + w`` norm
  gains, the embedding scaled by ``sqrt(hidden_size)``, post-norms);
* the result reloads with plain ``from_pretrained`` with identical logits, and generates with a
  KV cache;
* the scores and EMP's count on the grid (a multiple of the head count and of ``multiple_of``);
* the command line (heal and GGUF export of a cut: tests/test_shrink_depth.py).
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))

from emprune.core import rule  # noqa: E402
from emprune.criteria.channel_scores import channel_activation, channel_scores  # noqa: E402
from emprune.jobs.axes import DEFAULT_HIDDEN_SCORE, hidden_multiple, shrink_hidden  # noqa: E402
from emprune.jobs.shrink import lm_forward  # noqa: E402
from emprune.structure.hidden import keep_channels, residual, zero_channels  # noqa: E402
from test_shrink_depth import IDS, gemma, llama, qwen3, run  # noqa: E402


def tied_llama():
    m = llama(3)
    m.config.tie_word_embeddings = True
    m.lm_head.weight = m.model.embed_tokens.weight
    return m


def logits(m):
    with torch.no_grad():
        return m(IDS).logits


@pytest.mark.parametrize("make", [lambda: llama(3), tied_llama, lambda: gemma(4), lambda: qwen3(3)],
                         ids=["llama", "tied", "gemma", "qwen3"])
def test_removing_zero_channels_changes_nothing(make):
    m = make()
    before = logits(m)
    assert keep_channels(m, range(64)) == [] and torch.equal(logits(m), before)  # all kept: untouched
    removed = [0, 7, 8, 30, 63]
    zero_channels(m, removed)
    ref = logits(m)
    assert not torch.allclose(ref, before)  # the zeroing mattered
    assert keep_channels(m, [i for i in range(64) if i not in removed]) == removed
    got = logits(m)
    assert m.config.hidden_size == 59 and m.get_input_embeddings().weight.shape[1] == 59
    # exact: the norms' gains and eps follow the mean over fewer channels (float rounding left)
    assert (got - ref).abs().max() < 1e-5, (got - ref).abs().max()
    if m.get_output_embeddings().weight is m.get_input_embeddings().weight or make is tied_llama:
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight  # still tied
    g1 = m.generate(IDS[:1, :6], max_new_tokens=10, do_sample=False)
    g2 = m.generate(IDS[:1, :6], max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("make", [lambda: llama(3), lambda: gemma(4)], ids=["llama", "gemma"])
def test_result_reloads_with_plain_transformers(make, tmp_path):
    from transformers import AutoModelForCausalLM

    m = make()
    keep_channels(m, range(0, 64, 2))  # 32 channels: a multiple of the 4 heads
    m.save_pretrained(tmp_path)
    r = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert r.config.hidden_size == 32 and r.config.head_dim == 16
    assert (logits(r) - logits(m)).abs().max() < 1e-5


def test_activation_score_is_the_norm_outputs_energy():
    m = llama(2)
    r = residual(m)
    acc = torch.zeros(64, dtype=torch.float64)

    def add(mod, a, o):
        acc.add_(o.double().reshape(-1, 64).square().sum(0))

    hooks = [n.register_forward_hook(add) for n in [*r.norms, r.final_norm]]
    with torch.no_grad():
        m(IDS, use_cache=False)
    for h in hooks:
        h.remove()
    got = channel_activation(m, [IDS[:2], IDS[2:]], lm_forward)
    assert torch.allclose(got, acc.sqrt(), rtol=1e-9) and len(r.norms) == 4 and not r.write_norms


def test_activation_score_reads_gemmas_pre_norms_only():
    g = gemma(2)
    r = residual(g)
    names = {id(mod): n.split(".")[-1] for n, mod in g.named_modules()}
    assert sorted({names[id(n)] for n in r.write_norms}) == ["post_attention_layernorm", "post_feedforward_layernorm"]
    assert sorted({names[id(n)] for n in r.read_norms()}) == ["input_layernorm", "norm", "pre_feedforward_layernorm"]
    acc = torch.zeros(64, dtype=torch.float64)

    def add(mod, a, o):
        acc.add_(o.double().reshape(-1, 64).square().sum(0))

    hooks = [n.register_forward_hook(add) for n in r.read_norms()]
    with torch.no_grad():
        g(IDS, use_cache=False)
    for h in hooks:
        h.remove()
    assert torch.allclose(channel_activation(g, [IDS], lm_forward), acc.sqrt(), rtol=1e-9)


def test_default_score_is_the_geometric_mean_of_activation_and_weight_norm():
    m = llama(2)
    got = channel_scores(m, "activation-magnitude", [IDS], lm_forward)
    act = channel_activation(m, [IDS], lm_forward)
    assert torch.allclose(got, (act * residual(m).channel_norms()).sqrt(), rtol=1e-12)
    assert DEFAULT_HIDDEN_SCORE == "activation-magnitude"
    with pytest.raises(ValueError, match="needs calibration tokens"):
        channel_scores(m, "activation-magnitude", None, lm_forward)


def test_count_is_emps_on_the_grid():
    m = llama(2)
    with torch.no_grad():  # a heavy tail: a few channels carry most of the activation
        m.model.embed_tokens.weight[:, :4] *= 30
    for recipe, multiple, score in (("paper", 1, "activation"), ("default", 1, "activation"),
                                    ("default", 1, None), ("default", 32, None)):
        mm = copy.deepcopy(m)
        grid = hidden_multiple(mm, multiple)
        rep = shrink_hidden(mm, IDS, recipe=recipe, multiple_of=multiple, hidden_score=score)
        s = channel_scores(copy.deepcopy(m), score or "activation-magnitude", [IDS], lm_forward)
        # the default counts hidden channels on the raw scores (no transform), with its 25 % floor
        k = int(rule.keep_count_from_neff(rule.effective_number(s), 1.0, 64))
        if recipe == "default":
            k = max(k, 16)
        g = rep.groups[0]
        assert rep.recipe["transform"] == "none" and rep.criterion == (score or "activation-magnitude")
        assert grid == math.lcm(4, multiple) and g.units_after % grid == 0 or g.units_after == 64
        assert abs(g.units_after - k) <= grid / 2, (recipe, multiple, g.units_after, k)
        assert mm.config.hidden_size == g.units_after
        assert set(range(4)) <= set(g.kept)  # the heavy channels stay


def test_hidden_with_layers_and_mlp_in_one_run(tiny, tmp_path, capsys):
    import emprune

    d, text = tiny
    out = tmp_path / "h"
    assert run(["shrink", str(d), "--out", str(out), "--units", "layers,hidden,mlp", "--keep", "0.5",
                "--calib-text", str(text), "--calib-samples", "4", "--seqlen", "16", "--multiple-of", "1",
                "--quiet"]) == 0
    meta = json.loads((out / "emprune.json").read_text())
    kinds = [g["kind"] for g in meta["groups"]]
    assert kinds[:2] == ["layers", "hidden"] and set(kinds[2:]) == {"mlp"}
    model = emprune.from_pretrained(out)
    assert model.config.hidden_size == 32 and len(model.model.layers) == 2  # half of 64 channels, 2 of 3 blocks
    assert meta["extra"]["hidden"]["hidden_multiple"] == 4


def test_cli_hidden_score_choice_is_checked_before_loading(tiny, tmp_path, capsys, no_load):
    d, _ = tiny
    assert run(["shrink", str(d), "--out", str(tmp_path / "x"), "--units", "hidden", "--hidden-score", "taylor"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err
