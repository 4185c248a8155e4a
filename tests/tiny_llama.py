"""A tiny random LLaMA (3 blocks) with a byte-level BPE tokenizer trained on the spot: the LLM
pipeline's test model (no network, no model files).  Shared by the LLM test files."""
from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes weights from a network.\n"
    "Effective model pruning keeps floor(beta * N_eff) components of every score vector.\n"
    "A model that is pruned well keeps its perplexity close to the dense model's value.\n"
) * 30


def tokenizer():
    """A 320-token byte-level BPE tokenizer trained on :data:`TEXT`."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def save_tiny(folder: Path):
    """Build the tiny LLaMA (seeded) and save it with its tokenizer to ``folder``; returns
    ``(model, tokenizer)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok
