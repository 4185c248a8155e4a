"""Depth: EMP over whole decoder blocks (``emprune shrink --units layers``) against ShortGPT, the
naive last-blocks cut and width-only shrinking at the same size, on SmolLM2-135M and Gemma-3-270M.

Rows (per model; every baseline at the default's number of removed blocks or at its parameter count):

* ``EMP default``: EMP's count from ``sqrt`` of ShortGPT's block influence (BI = 1 - cos(x_in, x_out))
  with the default recipe's 25 % floor; the blocks chosen greedily by the measured calibration loss;
* ``EMP paper (influence)`` / ``EMP paper (loss)``: the paper's exact rule ``floor(N_eff)`` of the raw
  scores (BI, or the loss increase of the block alone skipped), lowest scored removed;
* ``ShortGPT``: the lowest-BI blocks, as many as the default removes;
* ``lowest loss, one-shot``: the blocks whose skipping alone costs least, as many;
* ``last blocks``: the blocks just before the final one, as many as the default removes (the naive cut);
* blocks with widths (``--rows joint``): ``shared budget layers,mlp`` (``--budget shared``: EMP's
  totals as one budget, spent where the measured calibration loss is lowest),
  ``shared budget layers,mlp,heads (same size)`` (``keep={"params": P}``), ``per-kind layers,mlp
  (default)`` (blocks first, then EMP's width shrink of the rest), and the single axes at the
  shared budget's size: ``width only (default) at shared size``, ``layers only at shared size``;
* ``--axis hidden``: residual channels (``--units hidden``, the default score ``activation-magnitude``)
  against the ``activation`` and ``magnitude`` scores and random channels of the same count, the
  paper's rule off the grid, ``hidden,mlp`` (``--rows joint``) and the width shrinks of the same size;
* ``width only (default)``: ``--units mlp`` with the default recipe's measured-sensitivity allocation,
  holding the same number of parameters as the default depth cut (``keep_params``);
* ``width only (uniform)``: the same size, the same fraction of neurons in every layer.

Measured per row: parameters, MACs per token (context 512, LM head included), safetensors size,
perplexity on WikiText-2 test, python-docs (held out) and a third text that played no part in
choosing anything (the GPL-3 licence text shipped by Debian in /usr/share/common-licenses, plain
legal English), PyTorch CPU speed (one thread; prefill of ``--prompt`` tokens and batch-1 decode
of ``--gen`` tokens in a cached forward loop, ``emprune.jobs.bench.time_torch``), each row timed in
alternation with the dense model (pairs; median of per-pair ratios), and the ideal decode ratio
from the MACs. ``--heal-steps``: the same rows after a short distillation from the dense model
(``emprune.jobs.heal.heal``, fixed small budget). ``--zeroshot``: the seven zero-shot tasks
(``--zeroshot-limit`` items each) for the dense model, the default and ShortGPT.

    python benchmarks/shrink_depth.py --model smollm2-135m                   # ~2 h on 2 cores
    python benchmarks/shrink_depth.py --model gemma3-270m --axis hidden      # a Gemma heal: ~25 min
    python benchmarks/shrink_depth.py --model smollm2-135m --llamacpp-only   # the default cut in llama.cpp
    python benchmarks/shrink_depth.py --quick --out /tmp/q                     # smoke (tiny LLaMA)

Results accumulate per model in ``benchmarks/results/shrink_depth.{json,md,png}`` (a model's
finished rows are reused unless ``--redo``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, write_results

THIRD_TEXT = Path("/usr/share/common-licenses/GPL-3")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- measuring


@torch.no_grad()
def ppl(model, ids: torch.Tensor, seqlen: int) -> float:
    """Perplexity over non-overlapping windows of ``seqlen`` (float64 accumulation)."""
    total, n = 0.0, 0
    for j in range(0, ids.numel() - 1, seqlen):
        x = ids[j:j + seqlen + 1]
        if x.numel() < 2:
            break
        logits = model(x[None, :-1], use_cache=False).logits[0].double()
        total += float(torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum"))
        n += x.numel() - 1
    return math.exp(total / n)


def disk_mb(model) -> float:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return sum(f.stat().st_size for f in Path(d).glob("*.safetensors")) / 1e6


def speed_pairs(model, dense, prompt: list[int], gen: list[int], pairs: int) -> dict:
    """pp / tg seconds of ``model`` and ``dense`` in alternation (one warm-up each), one thread."""
    from emprune.jobs.bench import time_torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        time_torch(model, prompt, gen[:4]), time_torch(dense, prompt, gen[:4])
        a, b = [], []
        for i in range(pairs):
            order = ((model, a), (dense, b)) if i % 2 == 0 else ((dense, b), (model, a))
            for m, acc in order:
                acc.append(time_torch(m, prompt, gen))
    finally:
        torch.set_num_threads(threads)
    pp = [y[0] / x[0] for x, y in zip(a, b)]  # dense seconds / model seconds: the speedup
    tg = [y[1] / x[1] for x, y in zip(a, b)]
    tg_cpu = [y[3] / x[3] for x, y in zip(a, b)]
    return {"pairs": pairs, "pp_speedup": statistics.median(pp), "pp_range": [min(pp), max(pp)],
            "tg_speedup": statistics.median(tg), "tg_range": [min(tg), max(tg)],
            "tg_speedup_cpu": statistics.median(tg_cpu),
            "tg_tok_s": len(gen) / statistics.median(x[1] for x in a),
            "tg_tok_s_dense": len(gen) / statistics.median(y[1] for y in b)}


def measure(model, dense, texts: dict, args, *, speed: bool = True) -> dict:
    from emprune.jobs.shrink import macs_lm

    out = {"params": sum(p.numel() for p in model.parameters()), "layers": len(model.model.layers),
           "hidden": model.config.get_text_config().hidden_size,
           "macs": macs_lm(model, 512), "ppl": {k: ppl(model, v, args.eval_seqlen) for k, v in texts.items()
                                               if k != "prompt"}}
    if speed and args.pairs:
        out["disk_mb"] = disk_mb(model)
        p = texts["prompt"]
        out["speed"] = speed_pairs(model, dense, p[: args.prompt].tolist(), p[args.prompt: args.prompt + args.gen].tolist(),
                                   args.pairs)
    return out


# ----------------------------------------------------------------------------- the rows


def build_rows(dense, calib, args, M: dict) -> dict:
    """``{row: build}``, ``build() -> (model, info)``, the default first. Rows that match another
    row's size read it from the results ``M`` when they are built (the rows are measured in
    order, so the row they match is measured by then; a row measured earlier is not rebuilt)."""
    from emprune.jobs.axes import shrink_layers
    from emprune.jobs.shrink import shrink
    from emprune.jobs.shrink_lm import shrink_lm
    from emprune.structure.depth import keep_blocks
    from emprune.structure.units import find_groups

    L = len(dense.model.layers)
    done = M["rows"]
    block = sum(p.numel() for p in dense.model.layers[0].parameters())
    outside = sum(p.numel() for p in dense.parameters()) - block * L  # embedding, final norm (tied head)

    def k_default() -> int:
        return len(done["EMP default"]["removed_layers"])

    def removed(name: str) -> int:
        return done["dense"]["after"]["params"] - done[name]["after"]["params"]

    def depth(**kw):
        def build():
            m = copy.deepcopy(dense)
            t = time.perf_counter()
            args_ = {k: v() if callable(v) else v for k, v in kw.items()}
            rep = shrink_layers(m, calib, batch_size=4, **args_)
            log(f"removed {rep.extra['removed_layers']} (N_eff {_f(rep.groups[0].neff)})")
            return m, {"options": args_, "removed_layers": rep.extra["removed_layers"],
                       "scores": rep.extra["layer_scores"], "neff": rep.groups[0].neff,
                       "seconds": time.perf_counter() - t}
        return build

    def last():
        m = copy.deepcopy(dense)
        k = k_default()
        gone = list(range(L - 1 - k, L - 1))
        keep_blocks(m, [i for i in range(L) if i not in gone])
        return m, {"removed_layers": gone}

    def width(of: str, uniform: bool = False):
        def build():
            m = copy.deepcopy(dense)
            groups = find_groups(m, "mlp")
            keep = sum(g.params() for g in groups) - removed(of)
            t = time.perf_counter()
            if uniform:  # the same fraction of neurons in every layer, the default's score and compensation
                rep = shrink(m, units="mlp", calibration=calib, keep={"params": keep}, compensate=True,
                             multiple_of=args.multiple_of)
            else:
                rep = shrink(m, units="mlp", calibration=calib, keep_params=keep, multiple_of=args.multiple_of)
            log(f"{sum(p.numel() for p in m.parameters()):,} params (target {done['dense']['after']['params'] - removed(of):,})")
            return m, {"matches": of, "widths": [g.units_after for g in rep.groups], "seconds": time.perf_counter() - t}
        return build

    def joint(units: str, same_as: str | None = None):
        def build():
            m = copy.deepcopy(dense)
            t = time.perf_counter()
            kw = {} if same_as is None else {"keep": {"params": done[same_as]["after"]["params"] - outside}}
            rep, _ = shrink_lm(m, calib, units=units, budget="shared", batch_size=4, progress=False,
                               multiple_of=args.multiple_of, **kw)
            j = rep.extra["joint"]
            log(f"joint {units}: removed {rep.extra['depth']['removed_layers']}, {rep.params_after:,} params; "
                + ", ".join(f"{c['blocks']}: {_f(c.get('loss_increase'), 4)}" for c in j["candidates"]))
            return m, {"removed_layers": rep.extra["depth"]["removed_layers"], "joint": j, "matches": same_as,
                       "widths": [g.units_after for g in rep.groups if g.kind == "mlp"],
                       "heads": [g.units_after for g in rep.groups if g.kind == "heads"],
                       "seconds": time.perf_counter() - t}
        return build

    def sequential():
        m = copy.deepcopy(dense)
        t = time.perf_counter()
        rep = shrink_layers(m, calib, batch_size=4)
        rep2, _ = shrink_lm(m, calib, units="mlp", batch_size=4, progress=False, multiple_of=args.multiple_of)
        return m, {"removed_layers": rep.extra["removed_layers"], "widths": [g.units_after for g in rep2.groups],
                   "seconds": time.perf_counter() - t}

    rows = {"EMP default": depth()}
    if "paper" in args.rows:
        rows["EMP paper (influence)"] = depth(recipe="paper", layer_score="influence")
        rows["EMP paper (loss)"] = depth(recipe="paper", layer_score="loss")
    rows["ShortGPT (BI)"] = depth(layer_score="influence", layer_select="score", keep=lambda: L - k_default())
    rows["lowest loss, one-shot"] = depth(layer_score="loss", layer_select="score", keep=lambda: L - k_default())
    rows["last blocks"] = last
    if "width" in args.rows:
        rows["width only (default)"] = width("EMP default")
        rows["width only (uniform)"] = width("EMP default", uniform=True)
    if "joint" in args.rows:
        J = "shared budget layers,mlp"
        rows[J] = joint("layers,mlp")
        rows["shared budget layers,mlp,heads (same size)"] = joint("layers,mlp,heads", same_as=J)
        rows["per-kind layers,mlp (default)"] = sequential
        rows["width only (default) at shared size"] = width(J)
        rows["layers only at shared size"] = depth(keep=lambda: L - round(removed(J) / block))
    return rows


def build_hidden_rows(dense, calib, args) -> dict:
    """``{row: (model, info)}`` of the hidden-channel axis, the default first (the others match
    its channel count or its parameter count)."""
    from emprune.jobs.axes import hidden_multiple, shrink_hidden
    from emprune.jobs.shrink import shrink
    from emprune.jobs.shrink_lm import shrink_lm
    from emprune.structure.hidden import keep_channels
    from emprune.structure.units import find_groups

    rows = {}

    def hidden(name, **kw):
        m = copy.deepcopy(dense)
        t = time.perf_counter()
        rep = shrink_hidden(m, calib, batch_size=4, **{"multiple_of": args.multiple_of, **kw})
        g = rep.groups[0]
        rows[name] = (m, {"options": kw, "hidden": [g.units_before, g.units_after], "neff": g.neff,
                          "seconds": time.perf_counter() - t})
        log(f"{name}: hidden {g.units_before} -> {g.units_after} (N_eff {_f(g.neff)})")
        return rep

    ref = hidden("EMP default")
    k = ref.groups[0].units_after
    if "paper" in args.rows:  # the default's score through the paper's rule off the grid
        hidden("EMP paper", recipe="paper", multiple_of=1)
    hidden("activation, same count", hidden_score="activation", keep=k)
    hidden("magnitude, same count", hidden_score="magnitude", keep=k)
    m = copy.deepcopy(dense)
    d = m.get_input_embeddings().weight.shape[1]
    keep = sorted(torch.randperm(d, generator=torch.Generator().manual_seed(0))[:k].tolist())
    keep_channels(m, keep)
    rows["random channels, same count"] = (m, {"hidden": [d, k]})
    sizes = [("", ref.params_before - ref.params_after)]
    if "joint" in args.rows:
        m = copy.deepcopy(dense)
        t = time.perf_counter()
        rep, _ = shrink_lm(m, calib, units="hidden,mlp", batch_size=4, progress=False, multiple_of=args.multiple_of)
        rows["hidden then mlp (default)"] = (m, {"hidden": [d, m.config.hidden_size],
                                                  "widths": [g.units_after for g in rep.groups[1:]],
                                                  "seconds": time.perf_counter() - t})
        sizes.append((" at joint size", rep.params_before - rep.params_after))
    if "width" in args.rows:
        for suffix, removed in sizes:
            m = copy.deepcopy(dense)
            groups = find_groups(m, "mlp")
            keep_p = sum(g.params() for g in groups) - removed
            if keep_p < 0.25 * sum(g.params() for g in groups):
                log(f"width only{suffix}: {removed:,} parameters are more than the MLPs can give (25 % floor)")
                continue
            rep = shrink(m, units="mlp", calibration=calib, keep_params=keep_p, multiple_of=args.multiple_of)
            rows["width only (default)" + suffix] = (m, {"widths": [g.units_after for g in rep.groups]})
            if not suffix:  # the same fraction of neurons in every layer (the default's score, compensation)
                m = copy.deepcopy(dense)
                rep = shrink(m, units="mlp", calibration=calib, keep={"params": keep_p}, compensate=True,
                             multiple_of=args.multiple_of)
                rows["width only (uniform)"] = (m, {"widths": [g.units_after for g in rep.groups]})
    log(f"hidden grid: multiples of {hidden_multiple(dense, args.multiple_of)}")
    return rows


def _heals(name: str, args) -> bool:
    return not name.startswith("EMP paper") and (args.heal_rows == "all" or name in args.heal_rows.split(";"))


def heal_row(model, dense, heal_ids, args) -> object:
    from emprune.jobs.heal import heal

    res = heal(copy.deepcopy(model), heal_ids, steps=args.heal_steps, seqlen=args.heal_seqlen, batch=args.heal_batch,
               teacher=dense, progress=False, seed=0)
    return res.model


def zeroshot(model, tok, args) -> dict:
    from emprune.jobs.zeroshot import evaluate_tasks

    res = evaluate_tasks(model, tok, limit=args.zeroshot_limit, progress=False)
    out = {t: {"value": v["acc_norm"] if v["acc_norm"] is not None else v["acc"],
               "stderr": v["acc_norm_stderr"] if v["acc_norm"] is not None else v["acc_stderr"]}
           for t, v in res["tasks"].items()}
    out["mean"] = res["mean_acc_norm"]
    return out


# ----------------------------------------------------------------------------- main


def run_model(args, R: dict) -> None:
    from emprune.models import data
    from emprune.models.loading import load_causal_lm

    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_llama import TEXT, save_tiny

        d = Path(tempfile.mkdtemp()) / "tiny"
        save_tiny(d)
        dense, tok = load_causal_lm(d, progress=False)
        calib_text = eval_text = other = third = TEXT
    else:
        dense, tok = load_causal_lm(args.model, progress=False)
        calib_text, eval_text = data.load_text(None, "calib"), data.load_text(None, "eval")
        other, third = data.load_text("python-docs"), THIRD_TEXT.read_text()
    calib = data.calibration_batches(tok, calib_text, args.calib_samples, args.calib_seqlen, seed=0)
    texts = {"wikitext": data.eval_tokens(tok, eval_text, args.eval_tokens),
             "python-docs": data.eval_tokens(tok, other, args.eval_tokens),
             "gpl-3": data.eval_tokens(tok, third, args.eval_tokens)}
    texts["prompt"] = data.eval_tokens(tok, other, args.prompt + args.gen + 8)[-(args.prompt + args.gen):]
    key = args.model if args.axis == "layers" else f"{args.model} (hidden)"
    M = R["models"].setdefault(key, {"rows": {}})
    M["axis"] = args.axis
    M["texts"] = {k: int(v.numel()) for k, v in texts.items()}
    M["settings"] = {k: getattr(args, k) for k in ("calib_samples", "calib_seqlen", "eval_tokens", "eval_seqlen",
                                                   "prompt", "gen", "pairs", "heal_steps", "heal_seqlen",
                                                   "heal_batch", "zeroshot_limit", "multiple_of")}
    if "dense" not in M["rows"] or args.redo:
        M["rows"]["dense"] = {"after": measure(dense, dense, texts, args, speed=False)}
        M["rows"]["dense"]["after"]["disk_mb"] = disk_mb(dense)
        M["rows"]["dense"]["after"]["layers"] = len(dense.model.layers)
        M["rows"]["dense"]["after"]["hidden"] = dense.config.get_text_config().hidden_size
    rows = (build_rows(dense, calib, args, M) if args.axis == "layers" else build_hidden_rows(dense, calib, args))
    heal_ids = data.tokenize(tok, calib_text) if args.heal_steps else None
    built = {}
    for name, build in rows.items():
        if name in M["rows"] and not args.redo and ("healed" in M["rows"][name] or not args.heal_steps
                                                     or not _heals(name, args)):
            continue
        log(f"-- {name}")
        m, info = build() if callable(build) else build
        built[name] = m
        rec = dict(info)
        rec["after"] = measure(m, dense, texts, args, speed=not name.startswith("EMP paper"))
        log(name, json.dumps({k: round(v, 2) for k, v in rec["after"]["ppl"].items()}),
            rec["after"].get("speed", {}).get("tg_speedup"))
        if args.heal_steps and _heals(name, args):
            t = time.perf_counter()
            healed = heal_row(m, dense, heal_ids, args)
            rec["healed"] = {"ppl": {k: ppl(healed, v, args.eval_seqlen) for k, v in texts.items() if k != "prompt"},
                             "seconds": time.perf_counter() - t}
            log(name, "healed", json.dumps({k: round(v, 2) for k, v in rec["healed"]["ppl"].items()}))
            del healed
        M["rows"][name] = rec
        save(R, args)
    if args.zeroshot and args.axis == "layers":
        zs = M.setdefault("zeroshot", {})
        if M.get("zeroshot_limit") != args.zeroshot_limit:
            zs.clear()  # measured on another number of items: all again
            M["zeroshot_limit"] = args.zeroshot_limit
        for name in ("dense", "EMP default", "ShortGPT (BI)"):
            if name in zs and not args.redo:
                continue
            m = dense if name == "dense" else built.get(name) or rows[name]()[0]
            t = time.perf_counter()
            zs[name] = zeroshot(m, tok, args)
            log(name, "zero-shot", zs[name]["mean"], f"{time.perf_counter() - t:.0f} s")
            save(R, args)
    save(R, args)


def run_llamacpp(args, R: dict) -> None:
    """The default depth cut in llama.cpp: ``emprune shrink --units layers`` (the command line's
    defaults), ``emprune export`` of it and of the dense model for each type, ``emprune bench``
    of the pair (one thread, alternating). Each command is recorded."""
    import subprocess

    from emprune.jobs.shrink import macs_lm
    from emprune.models.loading import load_causal_lm

    work = Path(args.llamacpp_dir)
    work.mkdir(parents=True, exist_ok=True)
    cmds = []

    def sh(*cmd):
        line = "emprune " + " ".join(shlex.quote(str(c)) for c in cmd)
        log("$", line)
        subprocess.run([sys.executable, "-m", "emprune", *map(str, cmd)], check=True)
        cmds.append(line)

    cut = work / "layers"
    if not (cut / "emprune.json").is_file():
        sh("shrink", args.model, "--units", "layers", "--out", cut, "--quiet")
    else:
        cmds.append(json.loads((cut / "emprune.json").read_text())["command"])
    out = {"commands": cmds, "types": {}}
    dense, _ = load_causal_lm(args.model, progress=False)
    small, _ = load_causal_lm(cut, progress=False)
    out["ideal_decode"] = macs_lm(dense, 512) / macs_lm(small, 512)
    out["blocks"] = [len(dense.model.layers), len(small.model.layers)]
    del dense, small
    for t in args.llamacpp_types.split(","):
        a, b = work / f"layers.{t}.gguf", work / f"dense.{t}.gguf"
        for src, dst in ((cut, a), (args.model, b)):
            if not dst.is_file():
                sh("export", src, "--gguf", dst, "--type", t, "--quiet")
            else:  # made earlier by this very command
                cmds.append(f"emprune export {src} --gguf {dst} --type {t} --quiet")
        js = work / f"bench.{t}.json"
        sh("bench", a, "--vs", b, "--repeats", args.llamacpp_repeats, "--gen-tokens", 128, "--no-memory",
           "--json", js)
        res = json.loads(js.read_text())
        r = res["ratio"]
        out["types"][t] = {"size_mb": [m["size_bytes"] / 1e6 for m in res["models"]],
                           "pp": {k: r["pp_tok_s"][k] for k in ("median", "min", "max")},
                           "tg": {k: r["tg_tok_s"][k] for k in ("median", "min", "max")},
                           "tg_cpu": {k: r["tg_tok_cpu_s"][k] for k in ("median", "min", "max")},
                           "tg_tok_s": [m["tg_tok_s"]["median"] for m in res["models"]],
                           "repeats": res["repeats"], "load": res["environment"].get("load_average")}
        log(t, json.dumps(out["types"][t]))
    R.setdefault("llamacpp", {})[args.model] = out


def save(R: dict, args) -> None:
    R["environment"] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                        "machine": platform.machine()}
    write_results(args.out, R, markdown, plot)


# ----------------------------------------------------------------------------- writing


def _f(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(R: dict) -> str:
    lines = ["# Depth: removing whole decoder blocks with EMP (`emprune shrink --units layers`)", "",
             f"Commands: {'; '.join('`' + c + '`' for c in R.get('commands', []))}", "",
             "Calibration: the text emprune ships (`emprune/models/texts`), windows as in the settings; perplexity "
             "on WikiText-2 test, python-docs (held out) and GPL-3 (a third text that played no part in any "
             "choice), windows of `eval_seqlen`. Speed: PyTorch on the CPU, one thread, pairs alternating with "
             "the dense model (median of per-pair ratios [min-max]); `ideal` = dense MACs / row MACs per token "
             "(context 512, LM head included); `of ideal` = (measured - 1) / (ideal - 1) of the decode speedup.", ""]
    for model, M in R.get("models", {}).items():
        # rows with a note (measured under earlier defaults) after the current ones
        rows = dict(sorted(M["rows"].items(), key=lambda kv: bool(kv[1].get("note"))))
        d = rows.get("dense", {}).get("after")
        if not d:
            continue
        lines += [f"## {model}", "", f"Settings: {json.dumps(M.get('settings', {}))}; tokens: {json.dumps(M.get('texts', {}))}", ""]
        if M.get("note"):
            lines += [M["note"], ""]
        lines += [
                  "| row | blocks | hidden | removed blocks | params | MACs | disk MB | ppl wikitext | ppl python-docs | ppl gpl-3 | "
                  "prefill | decode | ideal | of ideal | healed wikitext | healed python-docs | healed gpl-3 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in rows.items():
            a = r["after"]
            sp = a.get("speed", {})
            ideal = d["macs"] / a["macs"]
            of = ((sp["tg_speedup"] - 1) / (ideal - 1)) if sp and ideal > 1.0001 else None
            h = r.get("healed", {}).get("ppl", {})
            rem = r.get("removed_layers")
            lines.append(
                f"| {name} | {a['layers']} | {a.get('hidden', '-')} | {rem if rem is not None else '-'} | {a['params'] / 1e6:.1f} M | "
                f"{a['macs'] / 1e6:.1f} M | {_f(a.get('disk_mb'), 1)} | {_f(a['ppl'].get('wikitext'))} | "
                f"{_f(a['ppl'].get('python-docs'))} | {_f(a['ppl'].get('gpl-3'))} | "
                + (f"x{sp['pp_speedup']:.2f} [{sp['pp_range'][0]:.2f}-{sp['pp_range'][1]:.2f}] | "
                   f"x{sp['tg_speedup']:.2f} [{sp['tg_range'][0]:.2f}-{sp['tg_range'][1]:.2f}] | " if sp else "- | - | ")
                + f"x{ideal:.2f} | {_f(of)} | {_f(h.get('wikitext'))} | {_f(h.get('python-docs'))} | {_f(h.get('gpl-3'))} |")
        for name, r in rows.items():
            j = r.get("joint")
            if j:  # the shared budget's candidates: m blocks (greedy order), the rest on the widths
                lines += ["", f"{name}: budget {j['budget_params'] / 1e6:.2f} M parameters (EMP: "
                              f"{j['emp_blocks_removed']} blocks + {j['emp_width_params'] / 1e6:.2f} M of widths"
                              + (f"; matched to {r['matches']}" if r.get("matches") else "") + "); candidates, "
                              "blocks removed: calibration-loss increase (masked, 1,024 tokens) -> chosen "
                              f"{j['chosen_blocks']}: " + ", ".join(
                                  f"{c['blocks']}: {c['loss_increase']:.3f}" if "loss_increase" in c
                                  else f"{c['blocks']}: too small" for c in j["candidates"])]

        notes: dict[str, list[str]] = {}
        for name, r in rows.items():
            if r.get("note"):
                notes.setdefault(r["note"], []).append(name)
        for note, names in notes.items():
            lines += ["", f"{'; '.join(names)}: {note}."]
        zs = M.get("zeroshot")
        if zs:
            tasks = [t for t in next(iter(zs.values())) if t != "mean"]
            lines += ["", f"Zero-shot ({M.get('zeroshot_limit')} items per task, accuracy; "
                          "acc_norm where the task reports it):", "",
                      "| row | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
            for name, z in zs.items():
                lines.append(f"| {name} | " + " | ".join(_f(z[t].get("value"), 3) for t in tasks)
                             + f" | {_f(z.get('mean'), 3)} |")
        for name, r in rows.items():
            if "scores" in r and name in ("EMP default", "ShortGPT (BI)", "EMP paper (influence)"):
                how = r.get("options", {}).get("layer_score") or "influence"  # the default's score
                lines += ["", f"{name} block scores ({'BI' if how == 'influence' else how}): "
                              + ", ".join(f"{s:.3g}" for s in r["scores"]) + f"; N_eff {_f(r.get('neff'))}"]
        lines.append("")
    for model, L in R.get("llamacpp", {}).items():
        lines += [f"## {model}: the default depth cut in llama.cpp", "",
                  f"Commands: {'; '.join('`' + c + '`' for c in L['commands'])}; blocks {L['blocks'][0]} -> "
                  f"{L['blocks'][1]}; ideal decode ratio from the MACs x{L['ideal_decode']:.2f}. "
                  "`emprune bench`, one thread, pairs alternating with the dense file of the same type, "
                  "128 prompt + 128 generated tokens; ratios are medians of the per-pair ratios [min-max].", "",
                  "| type | MB (cut / dense) | prefill | decode | decode per CPU-second | decode tok/s (cut / dense) | of ideal |",
                  "|---|---|---|---|---|---|---|"]
        for t, v in L["types"].items():
            tg = v["tg"]["median"]
            lines.append(f"| {t} | {v['size_mb'][0]:.1f} / {v['size_mb'][1]:.1f} | x{v['pp']['median']:.2f} "
                         f"[{v['pp']['min']:.2f}-{v['pp']['max']:.2f}] | x{tg:.2f} [{v['tg']['min']:.2f}-"
                         f"{v['tg']['max']:.2f}] | x{v['tg_cpu']['median']:.2f} | {v['tg_tok_s'][0]:.0f} / "
                         f"{v['tg_tok_s'][1]:.0f} | {(tg - 1) / (L['ideal_decode'] - 1):.2f} |")
        lines.append("")
    lines += ["Environment: " + json.dumps(R.get("environment", {})), ""]
    return "\n".join(lines)


def plot(R: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in R.get("models", {}) if R["models"][m]["rows"].get("dense")]
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(6 * max(1, len(models)), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = R["models"][model]["rows"]
        # the current rows: not the paper's collapses, not rows kept from earlier defaults (a note)
        names = [n for n in rows if not n.startswith("EMP paper") and not rows[n].get("note")]
        x = range(len(names))
        for j, text in enumerate(("wikitext", "python-docs", "gpl-3")):
            ax.bar([i + 0.27 * (j - 1) for i in x], [rows[n]["after"]["ppl"][text] for n in names], 0.27, label=text)
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(model)
        ax.set_ylabel("perplexity (before healing)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--axis", choices=("layers", "hidden"), default="layers")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--heal-steps", type=int, default=60)
    p.add_argument("--heal-seqlen", type=int, default=256)
    p.add_argument("--heal-batch", type=int, default=4)
    p.add_argument("--zeroshot-limit", type=int, default=200)
    p.add_argument("--no-zeroshot", dest="zeroshot", action="store_false")
    p.add_argument("--multiple-of", type=int, default=32)
    p.add_argument("--rows", default="paper,width,joint", help="optional row sets: paper, width, joint")
    p.add_argument("--heal-rows", default="all", help="rows healed: all, or names joined by semicolons")
    p.add_argument("--redo", action="store_true")
    p.add_argument("--llamacpp-only", action="store_true",
                   help="only the default depth cut exported and timed in llama.cpp (emprune shrink/export/bench)")
    p.add_argument("--llamacpp-types", default="q8_0,q4_0")
    p.add_argument("--llamacpp-repeats", type=int, default=9)
    p.add_argument("--llamacpp-dir", default="/tmp/emprune-depth")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "shrink_depth")
    args = p.parse_args()
    if args.quick:
        args.model, args.calib_samples, args.calib_seqlen, args.eval_tokens, args.eval_seqlen = "tiny", 4, 32, 256, 64
        args.prompt, args.gen, args.pairs, args.heal_steps, args.zeroshot, args.multiple_of = 16, 8, 1, 2, False, 1
    R = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").is_file() else {}
    R.setdefault("models", {})
    cmd = "python benchmarks/shrink_depth.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    R["commands"] = [c for c in R.get("commands", []) if c != cmd] + [cmd]
    if args.llamacpp_only:
        run_llamacpp(args, R)
        save(R, args)
        return
    run_model(args, R)


if __name__ == "__main__":
    main()
