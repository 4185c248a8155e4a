"""The layer-wise loop must replay each block with that block's own call arguments.

Gemma-3 gives its sliding-window and full-attention layers different masks and rotary tables;
reusing block 0's for every block calibrated the full-attention layers on wrong activations
(silently). With nothing pruned, the hidden states the loop feeds each block must equal the
model's own hidden states."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from emprune.models.layerwise import prune_layerwise  # noqa: E402


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                           max_position_embeddings=256,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_layerwise_replay_equals_the_models_hidden_states(batch_size):
    model = _tiny_gemma3()
    n, seqlen = 3, 32  # seqlen > sliding_window: the two layer types see different masks
    tokens = torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(tokens, output_hidden_states=True).hidden_states  # [embeddings, block 0 out, ...]
    layers = model.model.layers
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    phase = {"loop": False}

    def recorder(i):
        def hook(module, args, kwargs):
            if phase["loop"]:
                seen[i].append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        return hook

    handles = [l.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, l in enumerate(layers)]

    def on_block(i, linears):
        phase["loop"] = True  # from the first block's turn on, calls are the loop's own

    try:
        prune_layerwise(model, tokens, "mlp", on_block, progress=False, batch_size=batch_size)
    finally:
        for h in handles:
            h.remove()
    for i in range(1, len(layers)):
        # each block runs twice per turn (statistics, then outputs); its inputs are the replay
        got = torch.cat(seen[i][: -(-n // batch_size)])
        assert torch.allclose(got, ref[i], atol=1e-5), (i, float((got - ref[i]).abs().max()))
