"""Model-level pruning: criteria, scopes, reversibility, reports."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import emprune
from emprune import criteria
from emprune.models.io import load_state_dict, pruned_state_dict
from emprune.models.io import save_pruned


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 4))


def batches(n=3, shape=(6, 20), classes=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)) for _ in range(n)]


def ce(model, b):
    return F.cross_entropy(model(b[0]), b[1])


def zeros_fraction(model, names):
    mods = dict(model.named_modules())
    tot = sum(mods[n].weight.numel() for n in names)
    return sum(int((mods[n].weight == 0).sum()) for n in names) / tot


@pytest.mark.parametrize("scope", ["row", "layer", "global"])
@pytest.mark.parametrize("crit", ["magnitude", "wanda", "taylor", "gradient", "random"])
def test_prune_every_criterion_and_scope(scope, crit):
    m = mlp()
    kw = {}
    if crit == "wanda":
        kw["calibration"] = [b[0] for b in batches()]
    if crit in ("taylor", "gradient"):
        kw.update(calibration=batches(), loss_fn=ce)
    rep = emprune.prune(m, crit, scope, **kw)
    names = [l.name for l in rep.layers]
    assert names == ["0", "2", "4"]
    assert rep.sparsity == pytest.approx(zeros_fraction(m, names))  # the report is what the model holds
    assert rep.pruned_fraction == pytest.approx(1 - rep.kept / rep.total)
    assert 0 < rep.sparsity < 1
    assert rep.bound_ok
    for l in rep.layers:
        assert l.kept + (l.total - l.kept) == l.total
        assert 1 <= l.neff_min <= l.neff_max <= l.n_per_unit if scope != "global" else True


def test_row_scope_counts_match_rule():
    m = mlp()
    w = m[0].weight.detach().clone()
    emprune.prune(m, "magnitude", "row")
    assert torch.equal((m[0].weight != 0).sum(1), emprune.keep_count(w, dim=1))
    assert torch.equal(m[0].weight != 0, emprune.keep_mask(w, dim=1))


def test_global_scope_matches_rule_on_concatenation():
    m = mlp()
    ws = [m[i].weight.detach().clone() for i in (0, 2, 4)]
    rep = emprune.prune(m, "magnitude", "global")
    cat = torch.cat([w.reshape(-1) for w in ws])
    assert rep.kept == int(emprune.keep_count(cat))
    got = torch.cat([(m[i].weight != 0).reshape(-1) for i in (0, 2, 4)])
    assert torch.equal(got, emprune.keep_mask(cat))
    assert rep.global_mass >= rep.global_bound


def test_sparsity_baseline_and_beta():
    m = mlp()
    rep = emprune.prune(m, "magnitude", "row", sparsity=0.5)
    for l in rep.layers:
        assert l.kept == l.units * (l.n_per_unit - l.n_per_unit // 2)
    emprune.restore(m)
    r1 = emprune.prune(m, "magnitude", "layer", beta=0.5)
    emprune.restore(m)
    r2 = emprune.prune(m, "magnitude", "layer", beta=1.0)
    assert r1.sparsity > r2.sparsity


def test_count_by_separates_how_many_from_which():
    m = mlp()
    calib = [b[0] for b in batches()]
    w = m[0].weight.detach().clone()
    rep = emprune.prune(m, "wanda", "row", calibration=calib, count_by="magnitude")
    assert rep.count_by == "magnitude" and rep.criterion == "wanda"
    assert torch.equal((m[0].weight != 0).sum(1), emprune.keep_count(w, dim=1))  # counts from |W|
    emprune.restore(m)
    emprune.prune(m, "wanda", "row", calibration=calib)
    assert not torch.equal((m[0].weight != 0).sum(1), emprune.keep_count(w, dim=1))


def test_min_keep_floor():
    m = nn.Linear(100, 4, bias=False)
    with torch.no_grad():
        m.weight.zero_()
        m.weight[:, 0] = 10.0  # one spike per row: N_eff = 1
        m.weight[:, 1:] = 1e-3
    rep = emprune.prune(m, "magnitude", "row", targets=[""] if False else None)
    assert rep.layers[0].kept == 4 * 1 and rep.layers[0].max_unit_sparsity > 0.95
    assert rep.warnings and "95" in rep.warnings[0]
    emprune.restore(m)
    rep = emprune.prune(m, "magnitude", "row", min_keep=0.25)
    assert rep.layers[0].kept == 4 * 25 and rep.layers[0].raised_by_floor == 4
    emprune.restore(m)
    rep = emprune.prune(m, "magnitude", "layer", min_keep=7)
    assert rep.layers[0].kept >= 7
    # global scope: a layer the global threshold would empty is raised to exactly the floor
    net = nn.Sequential(nn.Linear(20, 20, bias=False), nn.Linear(20, 20, bias=False))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[1].weight.fill_(1e-6)
    rep = emprune.prune(net, "magnitude", "global", min_keep=5)
    small = rep.layers[1]
    assert small.raised_by_floor == 1 and small.kept == 5 == int(torch.count_nonzero(net[1].weight))


def test_reversible_optimizer_step_permanent_restore():
    m = mlp()
    dense = copy.deepcopy(m.state_dict())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    emprune.prune(m, "magnitude", "row")
    mask = m[0].weight_mask.clone().bool()
    x, y = batches(1)[0]
    ce(m, (x, y)).backward()
    opt.step()
    assert bool((m[0].weight[~mask] == 0).all())  # masks hold through an optimizer step
    # state_dict round trip keeps the reparametrisation
    m2 = mlp()
    emprune.prune(m2, "magnitude", "row")
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x), m(x))
    # restore undoes an un-committed pruning exactly (no training in between)
    m3 = mlp()
    emprune.prune(m3, "wanda", "global", calibration=[x])
    assert emprune.restore(m3) == 3
    for k, v in m3.state_dict().items():
        assert torch.equal(v, dense[k]), k
    assert not hasattr(m3[0], "weight_orig")
    # make_permanent leaves plain parameters with zeros
    assert emprune.make_permanent(m) == 3
    assert isinstance(m[0].weight, nn.Parameter) and not hasattr(m[0], "weight_mask")
    assert bool((m[0].weight[~mask] == 0).all())
    assert emprune.restore(m) == 0


def test_restore_keeps_parameter_identity_for_optimizers():
    m = mlp()
    p = m[0].weight
    emprune.prune(m, "magnitude", "layer")
    emprune.restore(m)
    assert m[0].weight is p


def test_permanent_mode_and_saving(tmp_path):
    m = mlp()
    rep = emprune.prune(m, "magnitude", "row", permanent=True)
    assert not hasattr(m[0], "weight_orig")
    assert rep.sparsity == pytest.approx(zeros_fraction(m, ["0", "2", "4"]))
    m2 = mlp()
    emprune.prune(m2, "magnitude", "row")
    sd = pruned_state_dict(m2)
    assert set(sd) == set(mlp().state_dict())
    p = save_pruned(m2, tmp_path / "m.safetensors")
    back = load_state_dict(p)
    for k in sd:
        assert torch.equal(back[k], sd[k])
    fresh = mlp()
    fresh.load_state_dict(back)
    assert torch.equal(fresh[0].weight, m[0].weight)


def test_cnn_targets_batchnorm_and_grads_untouched():
    m = cnn()
    m.train()
    x = torch.randn(4, 3, 8, 8)
    y = torch.randint(0, 4, (4,))
    ce_ = lambda mod, b: F.cross_entropy(mod(b[0]), b[1])  # noqa: E731
    ce_(m, (x, y)).backward()  # a user's pending gradients
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    params = {n: p.detach().clone() for n, p in m.named_parameters()}
    bn = {n: b.clone() for n, b in m.named_buffers()}
    crit = criteria.Taylor(ce_)
    crit.prepare(m, emprune.select_targets(m), [(x, y), (x * 2, y)])
    for n, p in m.named_parameters():
        assert torch.equal(p.grad, grads[n]) and torch.equal(p.detach(), params[n]), n
    for n, b in m.named_buffers():
        assert torch.equal(b, bn[n]), n
    assert m.training
    rep = emprune.prune(m, crit, "row")
    assert [l.name for l in rep.layers] == ["0", "3", "7"]
    assert rep.layers[0].units == 8 and rep.layers[0].n_per_unit == 27  # a filter flattened
    emprune.restore(m)
    rep = emprune.prune(m, "wanda", "layer", calibration=[x])
    assert rep.layers[1].shape == [16, 4, 3, 3]  # grouped conv handled


def test_targets_selection_and_errors():
    m = mlp()
    rep = emprune.prune(m, "magnitude", "row", targets=r"^[24]$")
    assert [l.name for l in rep.layers] == ["2", "4"]
    emprune.restore(m)
    rep = emprune.prune(m, "magnitude", "row", targets=lambda n, mod: n == "0")
    assert [l.name for l in rep.layers] == ["0"]
    emprune.restore(m)
    with pytest.raises(ValueError, match="not found"):
        emprune.prune(m, targets=["nope"])
    with pytest.raises(ValueError, match="no target"):
        emprune.prune(m, targets="zzz")
    with pytest.raises(ValueError, match="scope"):
        emprune.prune(m, scope="block")
    with pytest.raises(ValueError, match="sparsity"):
        emprune.prune(m, sparsity=1.0)
    with pytest.raises(ValueError, match="beta"):
        emprune.prune(m, beta=0)
    with pytest.raises(ValueError, match="min_keep"):
        emprune.prune(m, min_keep=1.5)
    with pytest.raises(ValueError, match="calibration"):
        emprune.prune(m, "wanda")
    with pytest.raises(ValueError, match="unknown criterion"):
        emprune.prune(m, "hessian")
    with pytest.raises(ValueError, match="loss_fn"):
        emprune.prune(m, "taylor", calibration=[torch.randn(2, 20)])
    with pytest.raises(ValueError, match="count_by"):
        emprune.prune(m, sparsity=0.5, count_by="magnitude")
    # nothing was left half-pruned by the failures
    assert not any(hasattr(mod, "weight_orig") for mod in m.modules())


def test_custom_callable_criterion_and_nan_scores_name_the_layer():
    m = mlp()
    rep = emprune.prune(m, lambda name, mod: mod.weight.detach() ** 2, "row")
    assert rep.criterion == "<lambda>"
    emprune.restore(m)

    def bad(name, mod):
        s = mod.weight.detach().abs().clone()
        if name == "2":
            s[0, 0] = float("nan")
        return s
    with pytest.raises(ValueError, match=r"NaN.*\(2\)"):
        emprune.prune(m, bad, "row")
    emprune.restore(m)
    with pytest.raises(ValueError, match="shape"):
        emprune.prune(m, lambda n, mod: torch.ones(3), "row")


def test_report_json_and_table():
    m = mlp()
    rep = emprune.prune(m, "magnitude", "global")
    import json
    d = json.loads(rep.to_json())
    assert d["sparsity"] == pytest.approx(rep.sparsity)
    assert d["global_neff"] > 1 and len(d["layers"]) == 3
    t = rep.table()
    assert "global N_eff" in t and "0" in t


def test_global_scope_large_model_streams():
    """Global scope on a model with more than 2**24 weights (no quantile limit)."""
    m = nn.Sequential(nn.Linear(4096, 2048, bias=False), nn.Linear(2048, 4096, bias=False),
                      nn.Linear(4096, 100, bias=False))
    assert sum(p.numel() for p in m.parameters()) > 2**24
    rep = emprune.prune(m, "magnitude", "global", permanent=True)
    assert rep.sparsity == pytest.approx(zeros_fraction(m, ["0", "1", "2"]))
    assert rep.kept == int(sum((mod.weight != 0).sum() for mod in m))
    # kaiming-uniform init: N_eff/N = (E|u|)^2 / E u^2 = 3/4 per layer, a little less across
    # layers of different scales
    assert 0.25 <= rep.sparsity < 0.30


# ---------------------------------------------------------------- explicit counts (Target.k)

def test_decide_with_explicit_counts():
    """Explicit per-unit counts (matched runs) keep exactly those counts, by the selection
    scores; N_eff columns then show the selection scores' own N_eff."""
    from emprune.core import rule
    from emprune.decide.scopes import Target, decide
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 40, generator=g), torch.randn(3, 50, generator=g)
    k_rows = torch.tensor([0, 1, 7, 39, 40, 20])
    d = next(decide([Target("a", a.shape, lambda: a, k=k_rows)], "row"))
    assert torch.equal(d.k, k_rows) and torch.equal(d.mask.sum(1), k_rows)
    assert torch.equal(d.mask, rule.topk_mask(a, k_rows, dim=1))
    assert torch.allclose(d.neff, emprune.effective_number(a, dim=1))
    d = next(decide([Target("a", a.shape, lambda: a, k=torch.tensor([100]))], "layer"))
    assert int(d.mask.sum()) == 100 and torch.equal(d.mask, rule.topk_mask(a, 100))
    d = next(decide([Target("a", a.shape, lambda: a, k=k_rows)], "layer"))  # per-row counts: their total
    assert int(d.mask.sum()) == int(k_rows.sum()) and torch.equal(d.k, k_rows.sum().reshape(1))
    # global: the total is kept over all targets, by one threshold
    ds = list(decide([Target("a", a.shape, lambda: a, k=torch.tensor([100])),
                      Target("b", b.shape, lambda: b, k=torch.tensor([30]))], "global"))
    assert sum(int(x.mask.sum()) for x in ds) == 130
    kept_min = min(float(t.abs()[x.mask].min()) for t, x in zip((a, b), ds))
    dropped_max = max(float(t.abs()[~x.mask].max()) for t, x in zip((a, b), ds))
    assert kept_min >= dropped_max
    # bad counts: a clear error naming the target
    with pytest.raises(ValueError, match="one per unit"):
        next(decide([Target("a", a.shape, lambda: a, k=torch.tensor([1, 2]))], "row"))
    with pytest.raises(ValueError, match=r"\[0, 40\]"):
        next(decide([Target("a", a.shape, lambda: a, k=torch.full((6,), 41))], "row"))
    with pytest.raises(ValueError, match=r"\[0, 240\]"):
        next(decide([Target("a", a.shape, lambda: a, k=torch.full((6,), 80))], "layer"))  # total 480
    with pytest.raises(TypeError, match="integers"):
        next(decide([Target("a", a.shape, lambda: a, k=torch.full((6,), 2.0))], "row"))
    with pytest.raises(ValueError, match="every target"):
        next(decide([Target("a", a.shape, lambda: a, k=k_rows), Target("b", b.shape, lambda: b)], "row"))
    with pytest.raises(ValueError, match="without sparsity"):
        next(decide([Target("a", a.shape, lambda: a, k=k_rows)], "row", sparsity=0.5))
    with pytest.raises(ValueError, match="not both"):
        Target("a", a.shape, lambda: a, count=lambda: a, k=k_rows)
