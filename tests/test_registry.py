"""The criterion registry, Wanda's norm options, the report vocabulary and the README example of
Target / decide / Decision."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import emprune
from emprune import criteria as C
from emprune.criteria import Criterion, InputNorms, Wanda
from emprune.act.report import PruneReport
from emprune.decide.scopes import Target, decide

ROOT = Path(__file__).resolve().parents[1]


class RowL1(Criterion):
    """A user criterion: |W| divided by its row's L1 norm (data-free)."""

    name = "row-l1"

    def __call__(self, name: str, module: nn.Module) -> torch.Tensor:
        w = module.weight.detach().abs()
        return w / w.sum(1, keepdim=True)


@pytest.fixture
def row_l1():
    C.register("row-l1", RowL1, summary="|W| / row L1")  # the one line a new criterion needs
    yield "row-l1"
    C.unregister("row-l1")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


# ---------------------------------------------------------------- registry


def test_registered_criterion_works_in_prune_and_prune_lm(row_l1):
    m = _mlp()
    ref = [RowL1()(n, mod) for n, mod in (("0", m[0]), ("2", m[2]))]
    rep = emprune.prune(m, row_l1, "row")
    assert rep.criterion == "row-l1"
    for mod, s in zip((m[0], m[2]), ref):
        assert torch.equal(mod.weight != 0, emprune.keep_mask(s, 1.0, dim=1))
    assert row_l1 in C.names(layerwise=True)

    pytest.importorskip("transformers")
    from emprune.jobs import prune_lm as P
    from emprune.structure.targets import block_targets
    from tiny_llama import save_tiny
    from emprune.models import loading

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        save_tiny(Path(d) / "m")
        model = loading.load_causal_lm(Path(d) / "m")[0]
    assert row_l1 in P.criterion_choices() and row_l1 in P.count_by_choices()
    dense = {n: mod.weight.detach().clone() for n, mod in block_targets(model).items()}
    res = P.prune_lm(model, None, criterion=row_l1, recipe="paper", progress=False)
    assert res.info["criterion"] == row_l1 and res.info["calibration"]["tokens"] == 0
    for name, mod in block_targets(model).items():
        s = dense[name].abs() / dense[name].abs().sum(1, keepdim=True)
        assert torch.equal(mod.weight != 0, emprune.keep_mask(s, 1.0, dim=1) & (dense[name] != 0)), name
    # the CLI's choices are read from the registry when the parser is built
    from emprune.cli import build_parser

    assert build_parser().parse_args(["prune", "x", "--out", "y", "--criterion", row_l1]).criterion == row_l1


def test_registry_capabilities_and_errors():
    assert C.names()[:4] == ("magnitude", "wanda", "wanda-clip", "wanda-sqrt")
    assert C.names(layerwise=False) == ("taylor", "gradient")  # they need a loss over the whole model
    assert C.entry("wanda").needs_calibration and not C.entry("magnitude").needs_calibration
    assert C.entry("wanda").layerwise and C.entry("random").layerwise
    with pytest.raises(ValueError, match="registered already"):
        C.register("wanda", Wanda)
    with pytest.raises(ValueError, match="unknown criterion 'nope'"):
        C.get("nope")
    assert isinstance(C.get("WANDA"), Wanda)  # names are case-insensitive
    assert C.get("taylor", loss_fn=len).loss_fn is len and C.get("random", seed=3).seed == 3
    from emprune.jobs import prune_lm as P

    with pytest.raises(ValueError, match="criterion must be one of"):
        P.prune_lm(nn.Linear(2, 2), None, criterion="taylor", progress=False)


def test_layerwise_is_derived_from_the_protocol():
    class Hooked(Criterion):
        needs_calibration = True

        def observe(self, targets):
            return InputNorms().observe(targets)

    class Lossy(Criterion):
        needs_calibration = True

    assert Hooked().layerwise and not Lossy().layerwise and RowL1().layerwise


def test_same_as_scores_once_and_count_by_variant_is_not_dropped():
    assert Wanda().same_as(C.get("wanda")) and not Wanda().same_as(Wanda(norm="clip"))
    assert C.get("random", seed=1).same_as(C.get("random", seed=1)) and not C.get("random").same_as(C.get("random", seed=1))
    m = _mlp()
    calib = [torch.randn(4, 16) for _ in range(3)]
    rep = emprune.prune(m, "wanda", "row", calibration=calib, count_by="wanda-clip")
    assert rep.criterion == "wanda" and rep.count_by == "wanda-clip"


# ---------------------------------------------------------------- Wanda norm options


def _old_count_scores(kind: str, sq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The count scores of version 0.1's ``_count_fn`` (llm/prune.py), verbatim."""
    norm = sq.sqrt().to(device=w.device, dtype=torch.float32)
    if kind == "wanda-clip":
        norm = norm.clamp(max=float(4.0 * norm.median()))
    else:
        norm = norm.sqrt()
    return w.detach().abs().float() * norm


@pytest.mark.parametrize("kind", ["wanda-clip", "wanda-sqrt"])
def test_wanda_norm_options_equal_the_old_recipe_scores(kind):
    torch.manual_seed(1)
    lin = nn.Linear(64, 32)
    sq = torch.rand(64, dtype=torch.float64) * 10
    sq[5] = 1e6  # a massive-activation feature, the case the options exist for
    crit = C.get(kind)
    assert crit.name == kind
    crit.set_norms("l", sq)
    assert torch.equal(crit("l", lin), _old_count_scores(kind, sq, lin.weight))
    explicit = Wanda(norm=kind.split("-")[1], clip=4.0)
    explicit.set_norms("l", sq)
    assert torch.equal(explicit("l", lin), crit("l", lin))
    with pytest.raises(ValueError, match="norm"):
        Wanda(norm="l3")


def test_input_norms_hook_equals_the_old_llm_hook():
    """One hook for emprune.prune and the LLM loop: bit-equal to the loop's former float64 sums."""
    torch.manual_seed(2)
    lin = nn.Linear(24, 8)
    xs = [torch.randn(3, 7, 24) for _ in range(4)]
    norms = InputNorms()
    with norms.observe({"l": lin}):
        for x in xs:
            lin(x)
    old = torch.zeros(24, dtype=torch.float64)
    for x in xs:
        old += x.detach().reshape(-1, 24).to(torch.float64).square().sum(0)
    assert torch.equal(norms.sq["l"], old)
    lin(xs[0])  # outside the block: not counted, hooks removed
    assert torch.equal(norms.sq["l"], old) and not lin._forward_hooks


# ---------------------------------------------------------------- report vocabulary


def test_pruned_fraction_vs_zeros_fraction():
    m = _mlp()
    with torch.no_grad():
        m[0].weight[:, :4] = 0  # pre-existing zeros: 4 of 16 columns
    rep = emprune.prune(m, "magnitude", "row", sparsity=0.5, targets=["0"])
    assert rep.pruned_fraction == pytest.approx(0.5)
    assert rep.zeros_fraction == pytest.approx(0.5)  # magnitude prunes the zeros first
    emprune.restore(m)
    rep = emprune.prune(m, lambda n, mod: torch.rand(mod.weight.shape), "row", sparsity=0.25, targets=["0"])
    zeros = int((m[0].weight == 0).sum())
    assert rep.pruned_fraction == pytest.approx(0.25) and rep.zeros_fraction == zeros / 512 > 0.25
    assert rep.sparsity == rep.zeros_fraction  # the old name, kept for one version
    d = json.loads(rep.to_json())
    assert d["pruned_fraction"] == rep.pruned_fraction and d["zeros_fraction"] == d["sparsity"] == rep.zeros_fraction
    lay = d["layers"][0]
    assert lay["zeros_fraction"] == lay["sparsity"] and lay["pruned_fraction"] == pytest.approx(0.25)
    assert lay["max_unit_pruned_fraction"] == lay["max_unit_sparsity"] == pytest.approx(0.25)
    assert "pruned" in rep.table() and "zeros" in rep.table()


def test_report_for_run_records_beta_only_for_emp():
    assert PruneReport.for_run("wanda", "wanda", "row", beta=1.5).beta == 1.5
    assert PruneReport.for_run("wanda", "fixed", "row", beta=1.5, sparsity=0.5).beta is None
    rep = PruneReport.for_run("wanda", "matched", "row", beta=1.0, explicit_counts=True)
    assert rep.beta is None and rep.target_sparsity is None
    a = torch.randn(4, 8)
    rep.add(next(decide([Target("a", a.shape, lambda: a.abs(), k=torch.full((4,), 2))], "row")), 16)
    assert "explicit counts" in rep.table()


# ---------------------------------------------------------------- plot labels


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=12), st.data())
def test_spread_labels_never_overlap(centres, data):
    from emprune.jobs.compare import spread_labels

    centres = sorted(centres)
    widths = data.draw(st.lists(st.floats(0.01, 0.08), min_size=len(centres), max_size=len(centres)))
    pos = spread_labels(centres, widths)
    for i in range(len(pos) - 1):
        assert pos[i + 1] - pos[i] >= (widths[i] + widths[i + 1]) / 2 - 1e-9
    assert pos[0] - widths[0] / 2 >= -1e-9 and pos[-1] + widths[-1] / 2 <= 1 + 1e-9


# ---------------------------------------------------------------- README


def test_readme_decisions_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    section = text.split("## EMP's decisions for your own masks and structures", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "fc1: keep" in out and ">= bound" in out
