"""Exploration script behind benchmarks/results/shrink_smollm2_exploration.md (how the shrink
default was chosen): `python benchmarks/shrink_explore.py mlp|mlp,heads counts|eval [JSON rows]`
on SmolLM2-135M (calibration 16 x 256 WikiText-2 validation tokens; perplexity on NT=2048 tokens
of WikiText-2 test and python-docs). A development tool kept for provenance, not a product
script: the committed table was assembled from its printed rows."""
import copy, json, sys, time, torch
from emprune.models.loading import load_causal_lm
from emprune.models.data import load_text, calibration_batches, eval_tokens
from emprune.jobs.eval import perplexity
from emprune.jobs.shrink import score_units, shrink
from emprune.structure.units import find_groups
from emprune.criteria.unit_scores import activation, magnitude
from emprune.decide.recipes import Recipe  # a plan's recipe dicts: the fields of Recipe
from emprune.core import rule
torch.set_num_threads(2)
units = sys.argv[1] if len(sys.argv) > 1 else "mlp"
mode = sys.argv[2] if len(sys.argv) > 2 else "counts"
model, tok = load_causal_lm("smollm2-135m")
calib = calibration_batches(tok, load_text(None, "calib"), 16, 256, seed=0)
NT = int(__import__("os").environ.get("NT", "2048"))
wt = eval_tokens(tok, load_text(None, "eval"), NT)
py = eval_tokens(tok, load_text("python-docs"), NT)
t = time.time()
G, S_fl, stats = score_units(model, units, "fluctuation", calib)
S_act = [ activation(g, stats).cpu() for g in G]
S_mag = [ magnitude(g, stats).cpu() for g in G]
print("scores", time.time()-t, flush=True)
def frac_removed(S, how="score", beta=1.0):
    rem = tot = 0
    for g, s in zip(G, S):
        c = {"score": s, "sqrt": s.sqrt(), "log1p": torch.log1p(s / s.median())}[how]
        k = int(rule.keep_count(c, beta)); rem += (g.n - k) * g.params_per_unit(); tot += g.n * g.params_per_unit()
    return rem / tot
for name, S in (("fluct", S_fl), ("act", S_act), ("mag", S_mag)):
    for how in ("score", "sqrt", "log1p"):
        print(f"{name:6s} count={how:6s} removed {100*frac_removed(S, how):.1f}% of group params", flush=True)
if mode == "counts":
    sys.exit()
dense = {"wt": perplexity(model, wt, 256, progress=False, batch_size=8)["ppl"], "py": perplexity(model, py, 256, progress=False, batch_size=8)["ppl"]}
print("dense", dense, flush=True)
res = {"dense": dense, "units": units, "rows": []}
SC = {"fluctuation": S_fl, "activation": S_act, "magnitude": S_mag, "fluct_sqrt": [x.sqrt() for x in S_fl]}
def run(label, **kw):
    m = copy.deepcopy(model)
    crit = kw.pop("criterion", "fluctuation")
    if isinstance(kw.get("recipe"), dict):
        kw["recipe"] = Recipe(**kw["recipe"])
    g = find_groups(m, units)
    kw.setdefault("multiple_of", 1)  # any width, as the exploration was measured (before --multiple-of)
    rep = shrink(m, units=units, criterion="fluctuation" if crit == "fluct_sqrt" else crit, scored=(g, SC[crit], stats), **kw)
    p_wt = perplexity(m, wt, 256, progress=False, batch_size=8)["ppl"]; p_py = perplexity(m, py, 256, progress=False, batch_size=8)["ppl"]
    kept_params = sum(x.params_after for x in rep.groups); 
    r = {"label": label, "removed_ne": rep.removed_fraction_non_embedding, "wt": p_wt, "py": p_py,
         "kept_group_params": kept_params, "widths_min": {k: min(v) for k, v in rep.widths().items()}}
    print(f"{label:45s} removed {100*r['removed_ne']:5.1f}% ne  wt {p_wt:8.2f} (x{p_wt/dense['wt']:.3f})  py {p_py:8.2f} (x{p_py/dense['py']:.3f}) min {r['widths_min']}", flush=True)
    res["rows"].append(r); del m
    return rep
plan = json.loads(sys.argv[3])
for item in plan:
    label = item.pop("label")
    match = item.pop("match", None)
    rep = run(label, **item)
    if match:
        kept = sum(x.params_after for x in rep.groups)
        for mk in match:
            mk = dict(mk); lab = mk.pop("label")
            run(f"  {lab} @same", keep={"params": kept}, **mk)
json.dump(res, open(f"/tmp/h11/explore_{units}_{int(time.time())}.json", "w"), indent=1)
