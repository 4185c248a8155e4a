"""Structured EMP on the hidden nodes of a B-spline KAN [784, 64, 10] trained on real MNIST.

pykan is not used: it pulls in sympy/pandas/scikit-learn/tqdm/pyyaml, and its per-edge Python
machinery trains a 784-input KAN far more slowly on a CPU than the compact layer below, which
is the standard B-spline KAN layer ("efficient-KAN" formulation, same maths as pykan's edges):

    phi_{j,i}(x) = w_base[j,i] * silu(x) + sum_c C[j,i,c] * B_c(x),   y_j = sum_i phi_{j,i}(x_i)

with cubic B-splines (order 3) on a uniform grid of 5 intervals over [-1, 1] (8 coefficients per
edge) and no biases.  Inputs: pixels scaled to [-1, 1].  Training: Adam lr 1e-3, batch 128.

EMP, as in the paper: node score of hidden node j = max(mean |C| over its incoming edges, mean |C|
over its outgoing edges) (spline coefficients only); ``emprune.keep_mask(scores, beta)`` on the
64 scores decides which nodes stay; the KAN is then physically shrunk into a [784, k, 10] KAN
(rows of layer 1 and columns of layer 2 removed, by ``emprune.structure.units.KANGroup``) - checked to give the same logits as zeroing
the removed nodes in the original.  Baselines at the same node count k: random nodes, and the top-k
nodes by a data-driven activation score (mean |node value| over the train digits).  No fine-tuning.

    python benchmarks/small_models/kan_nodes.py            # full (about a minute)
    python benchmarks/small_models/kan_nodes.py --quick    # smoke run
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import emprune
from emprune.structure.units import find_groups
from _common import (accuracy, base_parser, command_line, count_params, environment, md_table, mean_std,
                     mnist_info, mnist_split, pct, plt, start, train, train_cached, write_json)

WIDTH = [784, 64, 10]
GRID, ORDER = 5, 3
LR, BATCH = 1e-3, 128
EPOCHS_FULL, EPOCHS_QUICK = 20, 2
BETAS_FULL = [0.25, 0.5, 0.75, 1.0, 1.25]
BETAS_QUICK = [0.75, 1.0]
PAPER = {"kept": 52, "of": 64, "acc_before": 97.21, "acc_after": 95.81, "rerun": (97.15, 94.36)}


class KANLayer(nn.Module):
    """B-spline KAN layer: ``out`` x ``in`` learnable edge functions (base SiLU + cubic spline)."""

    def __init__(self, n_in: int, n_out: int, grid: int = GRID, order: int = ORDER, lo: float = -1.0,
                 hi: float = 1.0) -> None:
        super().__init__()
        self.n_in, self.n_out, self.order = n_in, n_out, order
        h = (hi - lo) / grid
        knots = lo + h * torch.arange(-order, grid + order + 1, dtype=torch.float32)
        self.register_buffer("knots", knots)  # grid + 2*order + 1 knots
        self.base = nn.Parameter(torch.empty(n_out, n_in))
        self.coef = nn.Parameter(torch.empty(n_out, n_in, grid + order))
        nn.init.kaiming_uniform_(self.base, a=5 ** 0.5)
        nn.init.normal_(self.coef, std=0.1 / (n_in ** 0.5))

    def bases(self, x: torch.Tensor) -> torch.Tensor:
        """Cox-de Boor recursion: [B, in] -> [B, in, grid + order]."""
        t = self.knots
        x = x.unsqueeze(-1)
        b = ((x >= t[:-1]) & (x < t[1:])).to(x.dtype)
        for p in range(1, self.order + 1):
            b = ((x - t[:-(p + 1)]) / (t[p:-1] - t[:-(p + 1)]) * b[..., :-1]
                 + (t[p + 1:] - x) / (t[p + 1:] - t[1:-p]) * b[..., 1:])
        return b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.silu(x), self.base)
        return y + F.linear(self.bases(x).flatten(1), self.coef.flatten(1))

    @classmethod
    def from_parts(cls, base: torch.Tensor, coef: torch.Tensor, knots: torch.Tensor, order: int) -> "KANLayer":
        n_out, n_in = base.shape
        layer = cls(n_in, n_out, grid=coef.shape[-1] - order, order=order)
        with torch.no_grad():
            layer.knots.copy_(knots)
            layer.base.copy_(base)
            layer.coef.copy_(coef)
        return layer


class KAN(nn.Module):
    def __init__(self, width=WIDTH) -> None:
        super().__init__()
        self.width = list(width)
        self.layers = nn.ModuleList(KANLayer(a, b) for a, b in zip(width[:-1], width[1:]))

    def forward(self, x, upto: int | None = None):
        for i, layer in enumerate(self.layers):
            if upto is not None and i == upto:
                return x
            x = layer(x)
        return x


def node_scores(model: KAN) -> dict[str, torch.Tensor]:
    """Paper's hidden-node importance: max of incoming / outgoing mean |spline coefficient|
    (the score is the library's ``KANGroup.node_scores``; the two halves are kept for the plots)."""
    l1, l2 = model.layers
    incoming = l1.coef.detach().abs().mean(dim=(1, 2))  # [64]: edges i -> j
    outgoing = l2.coef.detach().abs().mean(dim=(0, 2))  # [64]: edges j -> k
    score = find_groups(model, "kan")[0].node_scores().to(incoming.dtype)
    return {"incoming": incoming, "outgoing": outgoing, "score": score}


def shrink(model: KAN, keep: torch.Tensor) -> KAN:
    """A physically smaller KAN [784, k, 10] holding only the kept hidden nodes (a copy; the
    removal itself is the library's: ``emprune.structure.units.KANGroup``)."""
    new = copy.deepcopy(model)
    find_groups(new, "kan")[0].remove(keep)
    new.width[1] = int(keep.sum())
    return new.eval()


@torch.no_grad()
def masked_logits(model: KAN, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The full-size KAN with the removed nodes' outgoing edges switched off (base and spline
    coefficients zeroed; ``KANGroup.zero``).  Zeroing the node *values* would not do: an edge
    function at 0 is not 0 (phi(0) = sum_c C_c B_c(0)), so a KAN node is removed by removing its edges."""
    off = copy.deepcopy(model)
    find_groups(off, "kan")[0].zero(keep)
    return off(x)


def main(argv=None) -> int:
    ap = base_parser(__doc__, "kan_mnist", "smoke run: 2 epochs, 2 betas, 1 seed")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds (default 3; quick 1)")
    ap.add_argument("--random-seeds", type=int, default=None, help="seeds for the random-node baseline (default 10)")
    ap.add_argument("--cache", default=None, help="dev only: folder to cache trained weights")
    args = ap.parse_args(argv)
    started = start(args, "kan_mnist", lambda out, R: (write_markdown(out, R), plot(out, R)))
    if started is None:
        return 0
    log, out = started
    t_start = time.perf_counter()
    epochs = EPOCHS_QUICK if args.quick else EPOCHS_FULL
    betas = BETAS_QUICK if args.quick else BETAS_FULL
    n_seeds = args.seeds or (1 if args.quick else 3)
    n_rand = args.random_seeds or (2 if args.quick else 10)
    xtr, ytr, xte, yte = mnist_split("pm1")

    R: dict = {"command": command_line(), "quick": args.quick, "env": environment(),
               "data": mnist_info("pm1", len(xtr), len(xte)),
               "model": {"width": WIDTH, "grid": GRID, "order": ORDER, "grid_range": [-1, 1],
                         "implementation": "compact B-spline KAN layer in this script (no pykan)"},
               "training": {"optimizer": "Adam", "lr": LR, "batch": BATCH, "epochs": epochs,
                            "seeds": list(range(n_seeds))},
               "betas": betas, "random_seeds": list(range(n_rand)), "seeds": []}
    for seed in range(n_seeds):
        def make(seed=seed):
            torch.manual_seed(seed)
            return KAN()

        def fit(m, seed=seed):
            t0 = time.perf_counter()
            hist = train(m, xtr, ytr, epochs=epochs, lr=LR, batch_size=BATCH, seed=seed, x_test=xte, y_test=yte,
                         log_every=5, log=log)
            return {"history": hist, "train_seconds": time.perf_counter() - t0}

        log(f"KAN {WIDTH} seed {seed}: training {epochs} epochs")
        model, info, _ = train_cached(f"kan_s{seed}_e{epochs}", make, fit, args.cache, log)
        dense_acc = accuracy(model, xte, yte)
        params = count_params(model)
        sc = node_scores(model)
        score = sc["score"]
        with torch.no_grad():  # data-driven baseline score: mean |node value| on the TRAIN digits
            act = model(xtr, upto=1).abs().mean(0)
        log(f"seed {seed}: dense acc {pct(dense_acc)}%, {params:,} params; node N_eff "
            f"{float(emprune.effective_number(score)):.1f} of {score.numel()}")
        S = {"seed": seed, "dense_acc": dense_acc, "params": params, "train": info,
             "node_neff": float(emprune.effective_number(score)),
             "scores": {k: v.tolist() for k, v in sc.items()}, "activation_score": act.tolist(),
             "incoming_wins": int((sc["incoming"] >= sc["outgoing"]).sum()), "emp": []}
        for beta in betas:
            keep = emprune.keep_mask(score, beta)
            k = int(keep.sum())
            assert k == int(emprune.keep_count(score, beta)), "keep_mask and keep_count disagree"
            small = shrink(model, keep)
            acc = accuracy(small, xte, yte)
            same = torch.allclose(small(xte), masked_logits(model, keep, xte), atol=1e-5)
            assert same, "shrunk KAN differs from the masked KAN"
            accs_r = []
            for s in range(n_rand):
                g = torch.Generator().manual_seed(s)
                rk = torch.zeros(score.numel(), dtype=torch.bool)
                rk[torch.randperm(score.numel(), generator=g)[:k]] = True
                accs_r.append(accuracy(shrink(model, rk), xte, yte))
            ak = emprune.topk_mask(act, k)
            acc_act = accuracy(shrink(model, ak), xte, yte)
            e = {"beta": beta, "kept": k, "of": score.numel(), "sparsity": 1 - k / score.numel(), "acc": acc,
                 "params": count_params(small), "kept_nodes": keep.nonzero().squeeze(1).tolist(),
                 "shrunk_equals_masked": bool(same),
                 "random": {"acc": float(np.mean(accs_r)), "acc_std": float(np.std(accs_r, ddof=1)) if n_rand > 1 else 0.0,
                            "accs": accs_r},
                 "activation_topk": {"acc": acc_act}}
            S["emp"].append(e)
            log(f"s{seed} beta={beta:<5g} keep {k:2d}/64 nodes  acc {pct(acc)}%  params {e['params']:,}  | "
                f"random {pct(e['random']['acc'])}  activation-top-k {pct(acc_act)}")
        R["seeds"].append(S)
    R["seconds"] = time.perf_counter() - t_start
    write_json(out / "results.json", R)
    write_markdown(out, R)
    plot(out, R)
    log(f"wrote {out}")
    return 0


def _agg(R: dict, beta: float, key) -> tuple[float, float]:
    return mean_std([key(e) for S in R["seeds"] for e in S["emp"] if e["beta"] == beta])


def write_markdown(out: Path, R: dict) -> None:
    n = len(R["seeds"])
    pm = lambda m, s, scale=100: f"{scale * m:.2f}" + (f" ± {scale * s:.2f}" if n > 1 else "")
    dm, dsd = mean_std([S["dense_acc"] for S in R["seeds"]])
    S0 = R["seeds"][0]
    L = [f"# Structured EMP on KAN hidden nodes, real MNIST ({'QUICK smoke run' if R['quick'] else 'full run'})", "",
         f"Command: `{R['command']}`  ", f"Wall time: {R['seconds']:.0f} s on {R['env']['threads']} CPU thread(s) "
         f"(torch {R['env']['torch']}, emprune {R['env']['emprune']}).", "",
         f"Data: {R['data']['source']}, fixed stratified split: {R['data']['train']} train / {R['data']['test']} test "
         f"digits, pixels scaled to [-1, 1].  Model: KAN {R['model']['width']}, cubic B-splines, grid "
         f"{R['model']['grid']} on {R['model']['grid_range']}, plus a SiLU base term per edge; "
         f"{R['model']['implementation']}; {S0['params']:,} parameters.  ",
         f"Training: Adam lr {R['training']['lr']:g}, batch {R['training']['batch']}, {R['training']['epochs']} epochs, "
         f"training seeds {R['training']['seeds']}; dense test accuracy {pm(dm, dsd)}%.  ",
         "EMP: node score = max(mean |spline coef| in, mean |spline coef| out); `emprune.keep_mask(scores, beta)` "
         "over the 64 hidden nodes; the network is rebuilt as a smaller KAN (asserted equal to masking the "
         "nodes). Baselines at the same node count: random nodes (mean of seeds "
         f"{R['random_seeds']}) and top-k by mean |node value| on the train digits. No fine-tuning. Cells: "
         "mean ± std over training seeds.", ""]
    body = []
    for beta in R["betas"]:
        k = _agg(R, beta, lambda e: e["kept"])
        p = _agg(R, beta, lambda e: e["params"])
        a = _agg(R, beta, lambda e: e["acc"])
        r = _agg(R, beta, lambda e: e["random"]["acc"])
        ac = _agg(R, beta, lambda e: e["activation_topk"]["acc"])
        body.append([f"{beta:g}", pm(k[0], k[1], 1), f"{p[0]:,.0f} ({p[0] / S0['params']:.3f})", pm(*a), pm(*r), pm(*ac),
                     f"{PAPER['kept']} / {PAPER['acc_before']} -> {PAPER['acc_after']}" if beta == 1.0 else ""])
    L += [md_table(["beta", "hidden nodes kept (of 64)", "params after (fraction)", "EMP acc %",
                    "random nodes @same k", "activation top-k @same k", "paper (kept / acc before -> after)"], body), ""]
    L += ["Per training seed: " + "; ".join(
        f"seed {S['seed']}: dense {pct(S['dense_acc'])}%, node N_eff {S['node_neff']:.1f}, the incoming mean is the max "
        f"for {S['incoming_wins']} of 64 nodes" for S in R["seeds"]) + ".", "",
          f"Paper (60k-digit training, pykan): {PAPER['kept']} of {PAPER['of']} nodes kept, {PAPER['acc_before']}% -> "
          f"{PAPER['acc_after']}% (a later run {PAPER['rerun'][0]}% -> {PAPER['rerun'][1]}%).", "",
          "Plots: `kan_sweep.png` (beta vs nodes kept; accuracy vs nodes kept with the baselines), "
          "`kan_nodes.png` (the 64 node scores of seed 0, incoming vs outgoing, with the EMP cut at beta = 1).", ""]
    (out / "results.md").write_text("\n".join(L))


def plot(out: Path, R: dict) -> None:
    p = plt()
    fig, (a0, a1) = p.subplots(1, 2, figsize=(11, 4.2))
    betas = R["betas"]
    k = [_agg(R, b, lambda e: e["kept"]) for b in betas]
    a0.errorbar(betas, [m for m, _ in k], yerr=[s for _, s in k], fmt="o-", c="C0", label="EMP (ours)", capsize=2)
    a0.plot([1.0], [PAPER["kept"]], "s", mfc="none", c="k", label="paper (pykan, 60k train)")
    a0.axvline(1, c="grey", ls=":", lw=0.6)
    a0.set(xlabel="beta", ylabel="hidden nodes kept (of 64)", title="KAN [784,64,10]: beta vs nodes kept")
    a0.legend(fontsize=8)
    dense = 100 * float(np.mean([S["dense_acc"] for S in R["seeds"]]))
    for key, c, st, lab in (("acc", "C0", "o-", "EMP"), ("random", "C3", "v--", "random nodes @ same k"),
                            ("activation_topk", "C2", "x--", "activation top-k @ same k")):
        get = (lambda e: e["acc"]) if key == "acc" else (lambda e, key=key: e[key]["acc"])
        ys = [_agg(R, b, get) for b in betas]
        a1.errorbar([m for m, _ in k], [100 * m for m, _ in ys], yerr=[100 * s for _, s in ys], fmt=st, c=c,
                    label=lab, capsize=2)
    for b, (km, _) in zip(betas, k):
        a1.annotate(f"β={b:g}", (km, 100 * _agg(R, b, lambda e: e["acc"])[0]), fontsize=7, xytext=(3, -10),
                    textcoords="offset points", color="C0")
    a1.plot([PAPER["kept"]], [PAPER["acc_after"]], "s", mfc="none", c="k",
            label=f"paper: {PAPER['acc_before']}% -> {PAPER['acc_after']}%")
    a1.axhline(dense, c="grey", lw=0.6)
    a1.set(xlabel="hidden nodes kept", ylabel="test accuracy (%)", title=f"dense {dense:.2f}%, no fine-tuning")
    a1.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "kan_sweep.png", dpi=110)
    p.close(fig)

    S0 = R["seeds"][0]
    sc = S0["scores"]
    order = np.argsort(sc["score"])[::-1]
    e1 = next((e for e in S0["emp"] if e["beta"] == 1.0), S0["emp"][0])
    keep = set(e1["kept_nodes"])
    fig, ax = p.subplots(figsize=(10, 3.8))
    x = np.arange(len(order))
    ax.bar(x, [sc["score"][i] for i in order], color=["C0" if i in keep else "C3" for i in order],
           label="score = max(in, out)")
    ax.plot(x, [sc["incoming"][i] for i in order], ".", c="k", ms=4, label="incoming mean |coef|")
    ax.plot(x, [sc["outgoing"][i] for i in order], "x", c="C1", ms=4, label="outgoing mean |coef|")
    ax.axvline(e1["kept"] - 0.5, c="k", ls="--", lw=0.8)
    ax.set(xlabel="hidden node (sorted by score)", ylabel="mean |spline coefficient|",
           title=f"KAN seed 0: node scores, N_eff = {S0['node_neff']:.1f}; EMP beta={e1['beta']:g} keeps "
                 f"{e1['kept']} (blue), prunes {64 - e1['kept']} (red)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "kan_nodes.png", dpi=110)
    p.close(fig)


if __name__ == "__main__":
    sys.exit(main())
