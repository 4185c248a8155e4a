"""Exploration behind the "measured sensitivity" rows of benchmarks/results/shrink_smollm2_exploration.md:
`NS=4 F=0.5 python benchmarks/shrink_explore_sensitivity.py` (SmolLM2-135M, calibration 16 x 256
WikiText-2 validation tokens; the loss increase of each layer alone losing F of its neurons measured on
the first NS calibration rows; perplexity on NT=2048 tokens of WikiText-2 test and python-docs). The
library recipe `sensitivity` (emprune/structured/sensitivity.py) is this allocation; kept for
provenance, not a product script."""
import copy, json, time, torch, os
from emprune.models.loading import load_causal_lm
from emprune.models.data import load_text, calibration_batches, eval_tokens
from emprune.jobs.eval import perplexity
from emprune.jobs.shrink import score_units
from emprune.structure.units import find_groups
from emprune.criteria.unit_scores import activation
from emprune.core import rule
torch.set_num_threads(2)
NT = int(os.environ.get("NT", "2048"))
model, tok = load_causal_lm("smollm2-135m"); model.eval()
calib = calibration_batches(tok, load_text(None, "calib"), 16, 256, seed=0)
wt = eval_tokens(tok, load_text(None, "eval"), NT)
py = eval_tokens(tok, load_text("python-docs"), NT)
G, S_fl, stats = score_units(model, "mlp", "fluctuation", calib)
S_act = [activation(g, stats).cpu() for g in G]
def ev(m):
    return (perplexity(m, wt, 256, progress=False, batch_size=8)["ppl"], perplexity(m, py, 256, progress=False, batch_size=8)["ppl"])
dense = (38.77387664823909, 18.247931244225885)
sub = calib[:int(os.environ.get("NS", "4"))]
@torch.no_grad()
def loss(m):
    return float(m(sub, labels=sub, use_cache=False).loss)
L0 = loss(model); print("dense calib loss", L0, flush=True)
F = float(os.environ.get("F", "0.5"))
t = time.time()
sens = []
for i, g in enumerate(G):
    lin = g.consumer
    w0 = lin.weight.data.clone(); b0 = None if lin.bias is None else lin.bias.data.clone()
    keep = rule.topk_mask(S_fl[i], round((1 - F) * g.n))
    g.compensate(keep, stats.mean(g)); g.zero(keep)
    sens.append(loss(model) - L0)
    lin.weight.data = w0
    if b0 is None: lin.bias = None
    else: lin.bias.data = b0
print("sens seconds", time.time() - t, flush=True)
print("sens", [round(s, 4) for s in sens], flush=True)
total_keep = 32316
n = 1536; L = len(G)
R = L * n - total_keep
def alloc(a, fmax=0.75, power=1.0):
    a = torch.tensor(a, dtype=torch.float64).clamp_min(1e-6) ** power
    lo, hi = 0.0, 1e6
    for _ in range(200):
        lam = (lo + hi) / 2
        f = (lam / a).clamp(max=fmax)
        if float((f * n).sum()) < R: lo = lam
        else: hi = lam
    f = (hi / a).clamp(max=fmax)
    return [n - int(round(x * n)) for x in f.tolist()]
res = {"dense": dense, "sens": sens, "rows": {}}
def run(label, ks, S, comp=True):
    m = copy.deepcopy(model)
    for i, (g, k) in enumerate(zip(find_groups(m, "mlp"), ks)):
        keep = rule.topk_mask(S[i], k)
        if comp: g.compensate(keep, stats.mean(G[i]))
        g.remove(keep)
    r = ev(m)
    print(f"{label:45s} kept {sum(ks)} min {min(ks)} max {max(ks)} wt {r[0]:.2f} (x{r[0]/dense[0]:.3f}) py {r[1]:.2f} (x{r[1]/dense[1]:.3f})  {ks}", flush=True)
    res["rows"][label] = {"ks": ks, "wt": r[0], "py": r[1]}
for p in (1.0, 0.5):
    ks = alloc(sens, power=p)
    run(f"sens^{p} alloc, fluct+comp", ks, S_fl, True)
    run(f"sens^{p} alloc, activation", ks, S_act, False)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), f"sens_F{F}.json"), "w"), indent=1)
