"""Write a causal LM as a GGUF file that llama.cpp runs: uniform widths as ``llama``, per-layer
widths (``emprune shrink``) as ``deci``, quantised.

llama.cpp's ``llama`` architecture reads ``feed_forward_length`` but builds every layer with one
width; its ``deci`` architecture (Nemotron-NAS) builds layer ``i`` with its own
``feed_forward_length[i]``, ``attention.head_count[i]`` and ``head_count_kv[i]``, with the same
RMSNorm, SwiGLU and RoPE as ``llama`` and optional attention-output and MLP biases. So a LLaMA-
family model with the widths emprune gives it maps onto one of the two, tensor for tensor.

What is written, and why:

* RoPE: transformers rotates the two halves of a head (``rotate_half``), llama.cpp's ``llama``
  and ``deci`` rotate neighbouring pairs; the rows of ``q_proj`` and ``k_proj`` (and their biases)
  are permuted per head so that both compute the same thing (as llama.cpp's converter does).
* Biases: only those that hold a non-zero value (a uniform shrink stores zero gate/up biases so
  that stock transformers loads it; they cost an add per token and are dropped here).
* Norms and biases stay float32; every matrix gets the requested type. A matrix whose rows
  cannot be cut into the type's blocks (``ffn_down`` of a width that is not a multiple of 32) is
  refused, or written as ``fallback`` when one is named; :func:`plan_types` tells beforehand.
* Tokenizer: the ``tokenizer.*`` keys of a source GGUF with the same vocabulary, copied as they
  are; otherwise built from the transformers tokenizer with ``gguf.vocab`` (see
  :func:`tokenizer_keys`).
* Types: f32, f16, bf16 and the block types gguf-py quantises itself (q8_0, q4_0, q4_1, q5_0,
  q5_1); the K-quants (q4_k_m, ...) through llama.cpp's own quantiser (``llama_model_quantize``
  of llama-cpp-python, the ``deploy`` extra) from a float32 file written first.

The file is written beside its destination and renamed into place when complete.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..structure.layouts import decoder_layers, layout_or_none
from .io import atomic_path

#: types gguf-py writes itself -> (GGMLQuantizationType name, llama.cpp file type name)
NATIVE_TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
}
#: types only llama.cpp's quantiser writes -> llama.cpp file type name (llama_ftype)
LLAMA_CPP_TYPES: dict[str, str] = {
    "q2_k": "MOSTLY_Q2_K", "q3_k_s": "MOSTLY_Q3_K_S", "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_l": "MOSTLY_Q3_K_L",
    "q4_k_s": "MOSTLY_Q4_K_S", "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M",
    "q6_k": "MOSTLY_Q6_K", "iq4_nl": "MOSTLY_IQ4_NL", "iq4_xs": "MOSTLY_IQ4_XS",
}
TYPES: tuple[str, ...] = (*NATIVE_TYPES, *LLAMA_CPP_TYPES)
FLOAT_TYPES = ("f32", "f16", "bf16")
#: the transformers model types whose blocks map onto llama.cpp's llama / deci
EXPORTABLE = ("llama", "mistral")
_ROPE_KINDS = ("default", "linear", "llama3")


def type_arg(value: str) -> str:
    """A ``--type`` value, lower-cased; ``ValueError`` (one line, listing the types) otherwise."""
    v = value.strip().lower()
    if v not in TYPES:
        raise ValueError(f"unknown GGUF type {value!r}; choose one of {', '.join(TYPES)}")
    return v


def block_size(qtype: str) -> int:
    """How many values a row of ``qtype`` must be a multiple of (1 for float types; 256 for K-quants)."""
    import gguf

    if qtype in NATIVE_TYPES:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[NATIVE_TYPES[qtype][0]]][0]
    return 32 if qtype == "iq4_nl" else 256


# ------------------------------------------------------------------------ what the model holds


@dataclass
class Layers:
    """The per-layer shape of a LLaMA-family model: MLP width, query heads and KV heads of every
    block, and the one head size. ``arch`` is ``llama`` when all blocks agree, else ``deci``."""

    ffn: list[int]
    heads: list[int]
    kv_heads: list[int]
    head_dim: int

    @property
    def uniform(self) -> bool:
        """Whether every block has the same widths."""
        return len(set(self.ffn)) == 1 and len(set(self.heads)) == 1 and len(set(self.kv_heads)) == 1

    @property
    def arch(self) -> str:
        """The llama.cpp architecture that builds these blocks."""
        return "llama" if self.uniform else "deci"


def text_config(model: nn.Module) -> Any:
    """The (text) config of ``model``."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def check_exportable(config: Any) -> None:
    """``NotImplementedError`` (one line) unless the config is one llama.cpp's ``llama`` /
    ``deci`` build reproduces: a LLaMA-family model type, SiLU, no sliding window, RoPE of a kind
    the file can say."""
    mt = getattr(config, "model_type", None)
    if mt not in EXPORTABLE:
        raise NotImplementedError(
            f"GGUF export supports LLaMA-family models ({', '.join(EXPORTABLE)}: llama.cpp's llama for one width, "
            f"deci for per-layer widths); this model is {mt!r}, whose llama.cpp architecture has no per-layer form "
            "in emprune yet")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"GGUF export: hidden_act {config.hidden_act!r} (llama.cpp's llama/deci use silu)")
    sw = getattr(config, "sliding_window", None)
    if sw is not None and sw < getattr(config, "max_position_embeddings", 0):
        raise NotImplementedError(f"GGUF export: sliding-window attention ({sw}) has no llama/deci form")
    kind = _rope(config).get("rope_type", "default") or "default"
    if kind not in _ROPE_KINDS:
        raise NotImplementedError(f"GGUF export: RoPE scaling {kind!r} (exported: {', '.join(_ROPE_KINDS)})")


def _rope(config: Any) -> dict[str, Any]:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "rope_theta" not in rp and hasattr(config, "rope_theta"):
        rp = {**rp, "rope_theta": config.rope_theta}
    return dict(rp)


def layer_shapes(model: nn.Module) -> Layers:
    """The widths of every decoder block, read from the weights themselves (never from the
    config, which a per-layer model cannot state)."""
    cfg = text_config(model)
    ffn, heads, kv = [], [], []
    hd = int(getattr(cfg, "head_dim", 0) or cfg.hidden_size // cfg.num_attention_heads)
    for block in decoder_layers(model):
        attn, mlp = block.self_attn, block.mlp
        hd = int(getattr(attn, "head_dim", 0) or hd)
        ffn.append(int(mlp.down_proj.in_features))
        heads.append(int(attn.q_proj.out_features // hd))
        kv.append(int(attn.k_proj.out_features // hd))
    return Layers(ffn, heads, kv, hd)


# ------------------------------------------------------------------------ tensors


def _permute_rope(w: Tensor, n_head: int) -> Tensor:
    """Rows of one RoPE'd projection from transformers' half-split order to llama.cpp's
    interleaved pairs, head by head (weight ``[n_head*hd, in]`` or bias ``[n_head*hd]``)."""
    if n_head == 0:
        return w
    hd = w.shape[0] // n_head
    rest = w.shape[1:]
    return w.reshape(n_head, 2, hd // 2, *rest).transpose(1, 2).reshape(w.shape)


_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
_MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def gguf_tensors(model: nn.Module, layers: Layers) -> Iterator[tuple[str, Tensor]]:
    """``(gguf name, float32 tensor)`` of every tensor the file holds, in llama.cpp's names.
    Every parameter of ``model`` is either written or accounted for (a tied LM head, an all-zero
    bias); anything else is refused, so that nothing is silently lost."""
    sd = dict(model.state_dict())
    used: set[str] = set()
    names = {id(m): n for n, m in model.named_modules()}

    def take(key: str) -> Tensor:
        used.add(key)
        return sd[key].detach().to(torch.float32).cpu()

    emb = model.get_input_embeddings()
    emb_key = f"{names[id(emb)]}.weight"
    yield "token_embd.weight", take(emb_key)
    for i, block in enumerate(decoder_layers(model)):
        pre = names[id(block)]
        yield f"blk.{i}.attn_norm.weight", take(f"{pre}.input_layernorm.weight")
        yield f"blk.{i}.ffn_norm.weight", take(f"{pre}.post_attention_layernorm.weight")
        for group, table in (("self_attn", _ATTN), ("mlp", _MLP)):
            for hf, gg in table.items():
                for what in ("weight", "bias"):
                    key = f"{pre}.{group}.{hf}.{what}"
                    if key not in sd:
                        continue
                    t = take(key)
                    if what == "bias" and not bool(t.any()):
                        continue  # an all-zero bias changes nothing
                    if hf in ("q_proj", "k_proj"):
                        t = _permute_rope(t, layers.heads[i] if hf == "q_proj" else layers.kv_heads[i])
                    yield f"blk.{i}.{gg}.{what}", t
    norm = next(k for k in sd if k.endswith("norm.weight") and not k.startswith(tuple(
        names[id(b)] + "." for b in decoder_layers(model))))
    yield "output_norm.weight", take(norm)
    head = model.get_output_embeddings()
    head_key = f"{names[id(head)]}.weight"
    if head is not None and head.weight.data_ptr() != emb.weight.data_ptr():
        yield "output.weight", take(head_key)
    else:
        used.add(head_key)
    left = sorted(k for k in sd if k not in used and "rotary_emb" not in k)
    if left:
        raise NotImplementedError(f"GGUF export: tensors with no place in llama.cpp's {layers.arch}: "
                                  f"{', '.join(left[:4])}{' ...' if len(left) > 4 else ''}")


# ------------------------------------------------------------------------ types


@dataclass
class TypePlan:
    """Which GGML type each tensor gets: ``types[name]``; ``fallback`` lists the matrices whose
    rows do not fit the requested type's blocks and get ``fallback_type`` instead."""

    qtype: str
    types: dict[str, str] = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)
    fallback_type: str | None = None


def plan_types(shapes: dict[str, tuple[int, ...]], qtype: str, fallback: str | None = None) -> TypePlan:
    """The type of every tensor for ``--type qtype``: 1-D tensors (norms, biases) float32, every
    matrix ``qtype`` (its rows, the last torch dimension, cut into ``block_size(qtype)``). A
    matrix that cannot be cut gets ``fallback`` if one is named, else ``ValueError`` (one line
    naming the tensors, the multiple and the fixes). For llama.cpp's own types the matrices go
    to llama.cpp as float32 and its quantiser decides (its recipe mixes types)."""
    plan = TypePlan(qtype, fallback_type=fallback)
    native = qtype in NATIVE_TYPES
    bs = block_size(qtype)
    for name, shape in shapes.items():
        if len(shape) < 2:
            plan.types[name] = "f32"
        elif not native:
            plan.types[name] = "f32"  # llama.cpp's quantiser takes it from here
            if shape[-1] % bs:
                plan.fallback.append(name)
        elif shape[-1] % bs:
            plan.fallback.append(name)
            plan.types[name] = fallback or qtype
        else:
            plan.types[name] = qtype
    if native and plan.fallback and fallback is None:
        bad = ", ".join(f"{n} ({shapes[n][-1]})" for n in plan.fallback[:3])
        raise ValueError(
            f"{len(plan.fallback)} {'matrix' if len(plan.fallback) == 1 else 'matrices'} cannot be {qtype}: "
            f"rows not a multiple of {bs} ({bad}"
            f"{' ...' if len(plan.fallback) > 3 else ''}); shrink with --multiple-of {bs}, or keep them in a "
            "float type with --fallback f16")
    return plan


def _encode(t: Tensor, gtype: str) -> tuple[np.ndarray, Any]:
    """``(array, raw GGML type or None)`` for ``GGUFWriter.add_tensor``."""
    import gguf

    a = t.numpy()
    if gtype == "f32":
        return np.ascontiguousarray(a, dtype=np.float32), None
    if gtype == "f16":
        return np.ascontiguousarray(a, dtype=np.float16), None
    q = gguf.GGMLQuantizationType[NATIVE_TYPES[gtype][0]]
    return gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), q), q


# ------------------------------------------------------------------------ tokenizer


def tokenizer_keys(source_gguf: Path | None, tokenizer: Any, pre: str | None = None) -> tuple[list, str]:
    """``([(key, value, GGUFValueType, sub_type)], where)``: the tokenizer metadata of the file.

    From ``source_gguf`` when given and its token list equals the tokenizer's vocabulary (copied
    key by key, types kept: what llama.cpp read before, it reads again). Otherwise from the
    transformers tokenizer, saved to a temporary folder and read with ``gguf.vocab``: a
    SentencePiece model (``tokenizer.model``) as ``llama``, a byte-level BPE as ``gpt2`` with
    the pre-tokenizer ``pre`` (llama.cpp's name for the split rules, e.g. ``smollm``, ``llama3``;
    ``default`` if not given, which llama.cpp warns about)."""
    if source_gguf is not None:
        keys = _keys_from_gguf(source_gguf)
        toks = next((v for k, v, *_ in keys if k == "tokenizer.ggml.tokens"), None)
        if toks is not None and _same_vocab(toks, tokenizer):
            return keys, f"copied from {source_gguf.name}"
    return _keys_from_hf(tokenizer, pre), "built from the transformers tokenizer"


def _keys_from_gguf(path: Path) -> list:
    import gguf

    r = gguf.GGUFReader(str(path))
    out = []
    for key, f in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, f.contents(), vtype, sub))
    return out


def _same_vocab(tokens: list, tokenizer: Any) -> bool:
    if tokenizer is None:
        return True
    n = len(tokenizer)
    if len(tokens) < n:
        return False
    ids = tokenizer.convert_ids_to_tokens(list(range(n)))
    return all(a == b for a, b in zip(ids, tokens) if b is not None and a is not None)


def _keys_from_hf(tokenizer: Any, pre: str | None) -> list:
    import tempfile

    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    if tokenizer is None:
        raise ValueError("GGUF export needs a tokenizer (the model folder holds none, and no source GGUF has one)")
    V = gguf.GGUFValueType
    with tempfile.TemporaryDirectory(prefix="emprune-tok-") as d:
        tokenizer.save_pretrained(d)
        folder = Path(d)
        if (folder / "tokenizer.model").is_file():
            vocab, model_name = LlamaHfVocab(folder), "llama"
        else:
            vocab, model_name = BpeVocab(folder), "gpt2"
        toks, scores, types = [], [], []
        for text, score, ttype in vocab.all_tokens():
            toks.append(text.decode("utf-8") if isinstance(text, bytes) else text)
            scores.append(float(score))
            types.append(int(ttype))
        special = SpecialVocab(folder, load_merges=model_name == "gpt2", n_vocab=len(toks))
    out = [("tokenizer.ggml.model", model_name, V.STRING, None),
           ("tokenizer.ggml.tokens", toks, V.ARRAY, V.STRING),
           ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32)]
    if model_name == "llama":
        out.append(("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32))
    else:
        out.append(("tokenizer.ggml.pre", pre or "default", V.STRING, None))
    if special.merges:
        out.append(("tokenizer.ggml.merges", list(special.merges), V.ARRAY, V.STRING))
    for typ, tid in special.special_token_ids.items():
        out.append((f"tokenizer.ggml.{typ}_token_id", int(tid), V.UINT32, None))
    for typ, flag in special.add_special_token.items():
        out.append((f"tokenizer.ggml.add_{typ}_token", bool(flag), V.BOOL, None))
    if isinstance(special.chat_template, str):
        out.append(("tokenizer.chat_template", special.chat_template, V.STRING, None))
    return out


# ------------------------------------------------------------------------ the file


@dataclass
class ExportResult:
    """What :func:`write_gguf` wrote: the path, the architecture, the per-layer widths, the
    type of every tensor (counted by type), the tensors in a fallback type, the tokenizer's
    origin, the size in bytes."""

    path: Path
    arch: str
    qtype: str
    layers: Layers
    type_counts: dict[str, int]
    fallback: list[str]
    tokenizer: str
    bytes: int
    dropped_biases: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": str(self.path), "arch": self.arch, "type": self.qtype, "bytes": self.bytes,
                "tensor_types": self.type_counts, "fallback": self.fallback, "tokenizer": self.tokenizer,
                "feed_forward_length": self.layers.ffn, "head_count": self.layers.heads,
                "head_count_kv": self.layers.kv_heads, "head_dim": self.layers.head_dim,
                "dropped_zero_biases": self.dropped_biases}


def _metadata(w: Any, cfg: Any, layers: Layers, name: str, file_type: str | None) -> None:
    import gguf

    n = len(layers.ffn)
    one = layers.uniform
    w.add_name(name)
    w.add_type("model")
    if file_type is not None:
        w.add_file_type(int(gguf.LlamaFileType[file_type]))
    w.add_block_count(n)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_feed_forward_length(layers.ffn[0] if one else layers.ffn)
    w.add_head_count(layers.heads[0] if one else layers.heads)
    w.add_head_count_kv(layers.kv_heads[0] if one else layers.kv_heads)
    w.add_key_length(layers.head_dim)
    w.add_value_length(layers.head_dim)
    w.add_rope_dimension_count(layers.head_dim)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    rope = _rope(cfg)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if (rope.get("rope_type") or "default") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))


def _rope_freqs(cfg: Any, hd: int) -> Tensor | None:
    """llama3-style RoPE: the per-frequency divisors llama.cpp reads from ``rope_freqs.weight``
    (default inverse frequencies over the scaled ones, from transformers' own RoPE functions)."""
    rope = _rope(cfg)
    if (rope.get("rope_type") or "default") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = float(rope["rope_theta"])
    plain = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    return (plain / scaled.to(torch.float64)).to(torch.float32)


def write_gguf(model: nn.Module, tokenizer: Any, out: str | os.PathLike, qtype: str = "f16", *,
               source_gguf: str | os.PathLike | None = None, fallback: str | None = None,
               name: str | None = None, progress: bool = True) -> ExportResult:
    """Write ``model`` (a LLaMA-family causal LM, per-layer widths allowed) to ``out`` as GGUF of
    type ``qtype`` (:data:`TYPES`) and return what was written. See the module docstring for the
    architecture, RoPE, bias, type and tokenizer rules; ``fallback``: the type for matrices whose
    rows do not fit ``qtype``'s blocks (none: refuse them); ``source_gguf``: a GGUF to take the
    tokenizer metadata from. Atomic: ``out`` appears complete or not at all."""
    qtype = type_arg(qtype)
    if fallback is not None and fallback not in NATIVE_TYPES:
        raise ValueError(f"--fallback must be a type gguf-py writes ({', '.join(NATIVE_TYPES)}), got {fallback!r}")
    cfg = text_config(model)
    check_exportable(cfg)
    if layout_or_none(model) is None:
        raise NotImplementedError(f"GGUF export: {type(model).__name__} has no LLaMA-family decoder blocks")
    layers = layer_shapes(model)
    tensors = dict(gguf_tensors(model, layers))
    freqs = _rope_freqs(cfg, layers.head_dim)
    if freqs is not None:
        tensors["rope_freqs.weight"] = freqs
    plan = plan_types({k: tuple(v.shape) for k, v in tensors.items()}, qtype, fallback)
    tok_keys, tok_from = tokenizer_keys(Path(source_gguf) if source_gguf else None, tokenizer)
    zero_biases = sum(1 for k, v in model.state_dict().items() if k.endswith(".bias") and not bool(v.any()))
    out = Path(out)
    title = name or str(getattr(cfg, "_name_or_path", "") or out.stem)
    if qtype in NATIVE_TYPES:
        with atomic_path(out) as tmp:
            _write(tmp, cfg, layers, tensors, plan, tok_keys, title, NATIVE_TYPES[qtype][1], progress)
    else:
        _write_llama_cpp(out, cfg, layers, tensors, plan, tok_keys, title, progress)
    counts, fell = file_tensor_types(out, qtype)
    if fell and fallback is None and qtype not in NATIVE_TYPES:
        out.unlink(missing_ok=True)
        raise ValueError(f"llama.cpp left {len(fell)} matrices unquantised for {qtype} ({', '.join(fell[:3])}); "
                         "shrink with --multiple-of 32 (256: K-quant blocks throughout) or pass --fallback f16 to "
                         "accept them")
    return ExportResult(out, layers.arch, qtype, layers, counts, plan.fallback if qtype in NATIVE_TYPES else fell,
                        tok_from, out.stat().st_size, zero_biases)


def _write(path: Path, cfg: Any, layers: Layers, tensors: dict[str, Tensor], plan: TypePlan, tok_keys: list,
           title: str, file_type: str | None, progress: bool) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), layers.arch)
    _metadata(w, cfg, layers, title, file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in tok_keys:
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.add_string("emprune.widths", json.dumps({"feed_forward_length": layers.ffn, "head_count": layers.heads,
                                               "head_count_kv": layers.kv_heads}))
    for name, t in tensors.items():
        arr, raw = _encode(t, plan.types[name])
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=progress)
    w.close()


def _write_llama_cpp(out: Path, cfg: Any, layers: Layers, tensors: dict[str, Tensor], plan: TypePlan,
                     tok_keys: list, title: str, progress: bool) -> None:
    """A float32 file first, then llama.cpp's quantiser into ``out`` (atomically)."""
    from .llamacpp import llama_cpp_module

    llama_cpp = llama_cpp_module(f"--type {plan.qtype}")
    import tempfile

    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".f32.tmp", dir=out.parent)
    os.close(fd)
    f32 = Path(name)
    try:
        _write(f32, cfg, layers, tensors, plan, tok_keys, title, "ALL_F32", progress)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(gguf.LlamaFileType[LLAMA_CPP_TYPES[plan.qtype]])
        params.nthread = max(1, os.cpu_count() or 1)
        with atomic_path(out) as tmp, _c_stderr_to(f32.with_suffix(".log")) as log:
            rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), params)
            if rc != 0:
                last = (log.read_text(errors="replace").strip().splitlines() or [""])[-1]
                raise RuntimeError(f"llama.cpp's quantiser failed (status {rc}) for {plan.qtype}: {last}")
    finally:
        f32.unlink(missing_ok=True)


@contextmanager
def _c_stderr_to(path: Path) -> Iterator[Path]:
    """Send what C code writes to stderr (llama.cpp's quantiser logs every tensor) to ``path``
    for the duration, then remove it; the types it chose are read back from the file instead."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as f:
            os.dup2(f.fileno(), 2)
            try:
                yield path
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
        path.unlink(missing_ok=True)


def file_tensor_types(path: Path, qtype: str) -> tuple[dict[str, int], list[str]]:
    """``(count of tensors per GGML type, matrices left in a float type)`` of a written file,
    read back from it (what llama.cpp will load, not what was intended)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    floats = []
    for t in r.tensors:
        tn = t.tensor_type.name
        counts[tn] = counts.get(tn, 0) + 1
        if len(t.shape) >= 2 and tn in ("F32", "F16", "BF16") and qtype not in FLOAT_TYPES:
            floats.append(t.name)
    return counts, floats
