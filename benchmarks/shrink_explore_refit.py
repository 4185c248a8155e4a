"""Exploration behind the "least-squares refit / greedy OBS" rows of
benchmarks/results/shrink_smollm2_exploration.md: `python benchmarks/shrink_explore_refit.py base|greedy`
(SmolLM2-135M, calibration 16 x 256 WikiText-2 validation tokens, perplexity on NT=2048 tokens of
WikiText-2 test and python-docs). A development tool kept for provenance, not a product script;
it writes res_*.json and greedy.pt into $OUT (default: the current folder)."""
import copy, json, sys, time, torch, os
from emprune.models.loading import load_causal_lm
from emprune.structure.layouts import decoder_layers
from emprune.models.data import load_text, calibration_batches, eval_tokens
from emprune.jobs.eval import perplexity
from emprune.jobs.shrink import score_units, shrink
from emprune.structure.units import find_groups
torch.set_num_threads(2)
NT = int(os.environ.get("NT", "2048"))
model, tok = load_causal_lm("smollm2-135m"); model.eval()
calib = calibration_batches(tok, load_text(None, "calib"), 16, 256, seed=0)
wt = eval_tokens(tok, load_text(None, "eval"), NT)
py = eval_tokens(tok, load_text("python-docs"), NT)
layers = decoder_layers(model)
# Gram of down_proj inputs
S1 = [None]*len(layers); S2 = [None]*len(layers); CNT = [0]*len(layers)
def mk(i):
    def h(mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        if S1[i] is None:
            S1[i] = torch.zeros(x.shape[1], dtype=torch.float64); S2[i] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        S1[i] += x.sum(0); S2[i] += x.T @ x; CNT[i] += x.shape[0]
    return h
hs = [l.mlp.down_proj.register_forward_pre_hook(mk(i)) for i, l in enumerate(layers)]
t = time.time()
G, S_fl, stats = score_units(model, "mlp", "fluctuation", calib)
for h in hs: h.remove()
MU = [s1 / c for s1, c in zip(S1, CNT)]
COV = [s2 / c - torch.outer(m, m) for s2, m, c in zip(S2, MU, CNT)]
print("scored", time.time() - t, flush=True)
def ev(m):
    return (perplexity(m, wt, 256, progress=False, batch_size=8)["ppl"], perplexity(m, py, 256, progress=False, batch_size=8)["ppl"])
dense = ev(model); print("dense", dense, flush=True)

def refit_layer(lin, C, mu, keep, damp):
    W = lin.weight.detach().double(); b = lin.bias.detach().double() if lin.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    K = keep.nonzero().squeeze(1); R = (~keep).nonzero().squeeze(1)
    CKK = C[K][:, K]; lam = damp * CKK.diagonal().mean()
    X = torch.linalg.solve(CKK + lam * torch.eye(len(K), dtype=torch.float64), C[K][:, R])  # [K,R]
    Wn = W[:, K] + W[:, R] @ X.T
    bn = b + W @ mu - Wn @ mu[K]
    return Wn, bn

def greedy_order(W, C, damp, n_remove):
    """Greedy OBS removal order of columns; returns (order, increments)."""
    W = W.detach().double().clone(); n = W.shape[1]
    lam = damp * C.diagonal().mean()
    Hi = torch.linalg.inv(C + lam * torch.eye(n, dtype=torch.float64))
    alive = torch.ones(n, dtype=torch.bool); order = []; inc = []
    for _ in range(n_remove):
        d = Hi.diagonal().clamp_min(1e-30)
        e = W.square().sum(0) / d
        e[~alive] = float("inf")
        j = int(e.argmin()); order.append(j); inc.append(float(e[j]))
        W -= torch.outer(W[:, j], Hi[j, :]) / Hi[j, j]
        Hi -= torch.outer(Hi[:, j], Hi[j, :]) / Hi[j, j]
        alive[j] = False; W[:, j] = 0; Hi[j, :] = 0; Hi[:, j] = 0; Hi[j, j] = 1.0
    return order, inc

def apply(masks, mode, damp=0.01, label=""):
    m = copy.deepcopy(model)
    g = find_groups(m, "mlp")
    for i, (gi, k) in enumerate(zip(g, masks)):
        lin = gi.consumer
        if mode == "comp":
            gi.compensate(k, MU[i])
            gi.remove(k)
        elif mode == "refit":
            Wn, bn = refit_layer(lin, COV[i], MU[i], k, damp)
            gi.remove(k)
            lin.weight.data = Wn.float()
            lin.bias = torch.nn.Parameter(bn.float())
        else:
            gi.remove(k)
    r = ev(m)
    kept = sum(int(k.sum()) for k in masks)
    print(f"{label:50s} kept {kept} ({100*(1-kept/(len(masks)*1536)):.1f}% removed) min {min(int(k.sum()) for k in masks)}  wt {r[0]:.2f} (x{r[0]/dense[0]:.3f}) py {r[1]:.2f} (x{r[1]/dense[1]:.3f})", flush=True)
    return r

# default masks (dry run)
rep = shrink(copy.deepcopy(model), units="mlp", criterion="fluctuation", scored=(find_groups(model, "mlp"), S_fl, stats), dry_run=True, multiple_of=1)
dmasks = []
for gr in rep.groups:
    k = torch.zeros(gr.units_before, dtype=torch.bool); k[torch.tensor(gr.kept)] = True; dmasks.append(k)
total_keep = sum(int(k.sum()) for k in dmasks)
print("default keeps", total_keep, [int(k.sum()) for k in dmasks], flush=True)
from emprune.core import rule
frac = total_keep / (len(dmasks) * 1536)
ku = round(frac * 1536)
umasks_fl = [rule.topk_mask(s, ku) for s in S_fl]
which = sys.argv[1].split(",") if len(sys.argv) > 1 else ["all"]
R = {}
def want(x): return "all" in which or x in which
if want("base"):
    R["default_comp"] = apply(dmasks, "comp", label="default (zscore) + comp")
    R["default_refit"] = apply(dmasks, "refit", label="default (zscore) + refit")
    R["unif_fl_refit"] = apply(umasks_fl, "refit", label="uniform fluct + refit")
if want("greedy"):
    t = time.time()
    ORD = []; INC = []
    for i, gi in enumerate(find_groups(model, "mlp")):
        o, inc = greedy_order(gi.consumer.weight, COV[i], 0.01, int(0.75 * 1536))
        ORD.append(o); INC.append(inc)
    print("greedy orders", time.time() - t, flush=True)
    torch.save({"ord": ORD, "inc": INC}, os.path.join(os.environ.get("OUT", "."), "greedy.pt"))
    def mask_from(o, nrem):
        k = torch.ones(1536, dtype=torch.bool); k[torch.tensor(o[:nrem], dtype=torch.long)] = False; return k
    umasks_g = [mask_from(o, 1536 - ku) for o in ORD]
    R["unif_greedy_refit"] = apply(umasks_g, "refit", label="uniform greedy-OBS + refit")
    dm_g = [mask_from(o, 1536 - int(k.sum())) for o, k in zip(ORD, dmasks)]
    R["default_counts_greedy_refit"] = apply(dm_g, "refit", label="default counts, greedy-OBS sel + refit")
    # global merge by relative error: increment / output variance trace
    nrem_total = len(dmasks) * 1536 - total_keep
    for norm in ("trace", "raw", "cum"):
        cand = []
        for i, gi in enumerate(find_groups(model, "mlp")):
            W = gi.consumer.weight.detach().double()
            tr = float((W @ COV[i] @ W.T).trace())
            inc = torch.tensor(INC[i])
            if norm == "cum":
                val = inc.cumsum(0) / tr  # cumulative relative error after r removals
            else:
                val = torch.cummax(inc, 0).values / (tr if norm == "trace" else 1.0)
            for r, v in enumerate(val.tolist()):
                cand.append((v, i, r))
        cand.sort()
        nr = [0] * len(dmasks)
        for v, i, r in cand[:nrem_total]:
            nr[i] = max(nr[i], r + 1)
        # ensure exactly the total: count r values within selection (cummax monotone so prefix)
        gm = [mask_from(o, n) for o, n in zip(ORD, nr)]
        print("alloc", norm, nr, flush=True)
        R[f"global_{norm}_greedy_refit"] = apply(gm, "refit", label=f"global {norm} alloc, greedy + refit")
json.dump({"dense": dense, "rows": R}, open(os.path.join(os.environ.get("OUT", "."), f"res_{'_'.join(which)}.json"), "w"), indent=1)
