"""Shrink a causal LM (LLaMA family) physically, save it, and load it back.

* :func:`shrink_lm`: calibrate (one dense pass over the calibration tokens: activation and
  fluctuation scores, FLAP bias compensation; a backward pass for Taylor), decide with EMP and
  remove MLP neurons and/or attention heads (:func:`emprune.shrink`). ``uniform=True`` rounds the
  per-layer widths to one width per model (intermediate size a multiple of 64, heads a multiple
  of the KV-group size) so that the result is a stock config.
* :func:`save_shrunk`: the folder ``emprune prune`` writes (safetensors + config + tokenizer +
  ``emprune.json`` with ``"kind": "shrunk"``), atomically. Per-layer widths are recorded in
  ``config.json`` as ``emprune_shrunk``.
* :func:`from_pretrained` / :func:`load_shrunk`: a normal transformers model object with the
  right per-layer shapes (``generate``, perplexity, PEFT work as usual). A uniform folder also
  loads with plain ``AutoModelForCausalLM.from_pretrained(DIR)``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..structured.shrink import (DEFAULT_CRITERION, ShrinkReport, _lm_forward, _lm_loss, get_recipe, lm_batches,
                                 score_units, shrink)
from .models import decoder_layers, read_report, save_pruned

SHRUNK_KIND = "shrunk"
INTERMEDIATE_MULTIPLE = 64


def _uniform_widths(report: ShrinkReport, groups: list, multiple: int = INTERMEDIATE_MULTIPLE) -> dict[str, int]:
    """One width per kind from a (dry-run) decision: the mean kept count, rounded to a
    multiple of ``multiple`` (MLP) or of the KV-group count (heads, query mode)."""
    out: dict[str, int] = {}
    by_kind: dict[str, list] = {}
    for g, gr in zip(groups, report.groups):
        by_kind.setdefault(g.kind, []).append((g, gr))
    for kind, items in by_kind.items():
        mean = sum(gr.units_after for _, gr in items) / len(items)
        n = items[0][0].n
        if kind == "mlp":
            w = int(round(mean / multiple)) * multiple
            w = min(n, max(multiple if n >= multiple else 1, w))
        else:
            g0 = items[0][0]
            w = g0.n_kv * min(g0.group_size, max(1, int(round(mean / g0.n_kv))))
        for g, _ in items:
            out[g.name] = w
    return out


@torch.no_grad()
def shrink_lm(
    model: nn.Module,
    calib_tokens: Tensor | None,
    *,
    units: str = "mlp",
    criterion: str | None = None,
    scope: str | None = None,
    beta: float = 1.0,
    keep: float | int | dict | None = None,
    recipe: str = "default",
    head_mode: str = "query",
    compensate: bool | None = None,
    uniform: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[ShrinkReport, dict[str, Any]]:
    """Shrink ``model`` in place; returns the report and the JSON summary for ``emprune.json``.

    ``calib_tokens`` ``[n, seqlen]`` feed activation / fluctuation / Taylor scores and the bias
    compensation (one dense pass); the default recipe (``sensitivity``) also measures the loss on
    their first 1,024 tokens once per group. Other options as in :func:`emprune.shrink`."""
    from tqdm.auto import tqdm

    for u in units.split(","):
        if u.strip() not in ("mlp", "heads"):
            raise ValueError(f"--units must be mlp, heads or mlp,heads; got {units!r}")
    rec = get_recipe(recipe)
    crit = criterion or (DEFAULT_CRITERION if calib_tokens is not None else "magnitude")
    t0 = time.perf_counter()
    batches = None if calib_tokens is None else lm_batches(calib_tokens, batch_size)
    if batches is not None and progress:
        batches = tqdm(batches, desc="calibrate", unit="batch")
    scored = score_units(model, units, crit, batches, forward=_lm_forward, loss_fn=_lm_loss)
    t_cal = time.perf_counter() - t0
    kw = dict(units=units, criterion=crit, scope=scope, beta=beta, recipe=recipe, head_mode=head_mode,
              calibration=calib_tokens, progress=progress)
    if uniform:
        comp = (rec.compensate and keep is None and calib_tokens is not None) if compensate is None else compensate
        # the sensitivities (default recipe) are measured with the compensation the final model gets
        dry = shrink(model, keep=keep, scored=scored, compensate=comp, dry_run=True, **kw)
        widths = _uniform_widths(dry, scored[0])
        report = shrink(model, keep=widths, scored=scored, compensate=comp, **kw)
        report.extra["uniform_from"] = {"recipe": dry.recipe, "widths_before_rounding": dry.widths()}
    else:
        report = shrink(model, keep=keep, scored=scored, compensate=compensate, **kw)
    report.extra["calibration_seconds"] = t_cal
    if uniform:
        _make_stock(model)  # zero biases where the stock bias flags create them
        report.params_after = sum(p.numel() for p in model.parameters())
    info = summary(model, report, calib_tokens, uniform)
    return report, info


def summary(model: nn.Module, report: ShrinkReport, calib_tokens: Tensor | None, uniform: bool) -> dict[str, Any]:
    """The JSON written to ``emprune.json`` (``kind: shrunk``)."""
    from .prune import versions

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    shr = dict(getattr(cfg, "emprune_shrunk", {}))
    d = report.to_dict()
    return {
        "kind": SHRUNK_KIND,
        "versions": versions(),
        "layout": "uniform" if shr.get("uniform") else "per-layer",
        "loads_with": ("AutoModelForCausalLM.from_pretrained(DIR) or emprune.llm.from_pretrained(DIR)"
                       if shr.get("uniform") else "emprune.llm.from_pretrained(DIR)"),
        "uniform_requested": uniform,
        "widths": shr,
        "summary": {k: d[k] for k in ("params_before", "params_after", "embedding_params", "removed_fraction",
                                      "removed_fraction_non_embedding", "macs_before", "macs_after",
                                      "macs_note", "bound_ok", "global_neff", "seconds")},
        "criterion": report.criterion, "scope": report.scope, "beta": report.beta, "keep": report.keep,
        "recipe": report.recipe,
        "calibration": {"n_samples": int(calib_tokens.shape[0]) if calib_tokens is not None else 0,
                        "seqlen": int(calib_tokens.shape[1]) if calib_tokens is not None else 0,
                        "seconds": report.extra.get("calibration_seconds", 0.0)},
        "groups": [{k: v for k, v in g.items() if k != "kept"} for g in d["groups"]],
        "kept_units": {g["name"]: g["kept"] for g in d["groups"]},
        "extra": {k: v for k, v in report.extra.items() if k != "calibration_seconds"},
    }


@torch.no_grad()
def _make_stock(model: nn.Module) -> None:
    """For a uniform layout with compensation biases: switch on the config's bias flags and give
    every projection those flags create a (zero) bias, so plain transformers loads the folder."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    shr = getattr(cfg, "emprune_shrunk", {})
    if not shr.get("uniform"):
        return
    layers = decoder_layers(model)
    plans = []
    if shr.get("mlp_bias"):
        plans.append(("mlp_bias", [("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]))
    if shr.get("o_bias"):
        plans.append(("attention_bias", [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]))
    for flag, mods in plans:
        if not hasattr(cfg, flag):  # e.g. Qwen2 / Gemma3: no such flag; the folder stays per-layer
            shr["uniform"] = False
            continue
        setattr(cfg, flag, True)
        for block in layers:
            for parent, name in mods:
                lin = getattr(getattr(block, parent), name)
                if lin.bias is None:
                    w = lin.weight
                    lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                            requires_grad=w.requires_grad)


def save_shrunk(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, report_json: dict,
                overwrite: bool = False) -> Path:
    """Write the shrunk model like ``emprune prune`` does (atomic; see
    :func:`emprune.llm.models.save_pruned`). ``overwrite`` replaces only a folder that holds an
    ``emprune.json`` (an earlier emprune output), never an arbitrary non-empty folder."""
    return save_pruned(model, tokenizer, out_dir, report_json, overwrite=overwrite)  # its folder rules


def is_shrunk(folder: str | os.PathLike) -> bool:
    """Whether ``folder/emprune.json`` says ``"kind": "shrunk"``."""
    return (read_report(folder) or {}).get("kind") == SHRUNK_KIND


def _state_dict(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, Tensor] = {}
        for f in files:
            sd.update(load_file(str(folder / f)))
        return sd
    raise FileNotFoundError(f"{folder}: no model.safetensors (or index) to load")


def _linear(w: Tensor, b: Tensor | None, dtype: torch.dtype) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=dtype)
    return lin.to_empty(device="cpu")


@torch.no_grad()
def from_pretrained(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device_map: str | dict | torch.device | None = None) -> nn.Module:
    """Load a shrunk folder as a normal transformers model with the saved per-layer shapes.

    Builds the model from ``config.json``, resizes every decoder block's projections to the
    shapes in the safetensors file (``config.emprune_shrunk`` says which widths), sets each
    attention module's ``num_key_value_groups``, and loads the weights (every tensor must fit:
    a missing or unexpected one raises). Folders without ``emprune_shrunk`` load as usual."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json (not a model folder)")
    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    shr = getattr(text, "emprune_shrunk", None)
    if not shr:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
        return model.eval()
    sd = _state_dict(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    names = {m: n for n, m in model.named_modules()}
    for block in decoder_layers(model):
        for parent_name in ("mlp", "self_attn"):
            parent = getattr(block, parent_name)
            prefix = names[parent]
            for child, mod in list(parent.named_children()):
                key = f"{prefix}.{child}.weight"
                if isinstance(mod, nn.Linear) and key in sd:
                    w, b = sd[key], sd.get(f"{prefix}.{child}.bias")
                    if tuple(w.shape) != tuple(mod.weight.shape) or (b is None) != (mod.bias is None):
                        setattr(parent, child, _linear(w, b, dtype))
        attn = block.self_attn
        hd = int(getattr(attn, "head_dim", 0) or text.head_dim)
        n_q, n_kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        attn.num_key_value_groups = n_q // n_kv
        if hasattr(block.mlp, "intermediate_size"):
            block.mlp.intermediate_size = block.mlp.down_proj.in_features
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set()
    if getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False):
        tied = {n for n in missing if n.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        raise ValueError(f"{path}: weights do not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    model.eval()
    if device_map is not None:
        from .models import _place

        model = _place(model, device_map)
    return model


def load_shrunk(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                device_map: str | dict | torch.device | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a shrunk folder: the hook for ``models.load_causal_lm`` when
    ``DIR/emprune.json`` says ``"kind": "shrunk"``."""
    from transformers import AutoTokenizer

    return from_pretrained(folder, dtype, device_map), AutoTokenizer.from_pretrained(folder)


__all__ = ["shrink_lm", "save_shrunk", "from_pretrained", "load_shrunk", "is_shrunk", "summary"]
