"""Heal a pruned causal LM: a short recovery fine-tune that keeps every pruned weight at zero.

:func:`heal` trains a model in memory with transformers' ``Trainer`` (so devices, mixed
precision, gradient accumulation, gradient checkpointing and multi-GPU launches come from the
ecosystem, not from a hand-written loop) on non-overlapping windows of a healing text:

* **Unstructured** outputs (``emprune prune``: weights with exact zeros): the targeted weights'
  zeros at the start are the mask. The gradients of masked entries are zeroed as they are
  computed (a tensor hook, so AdamW's moments of those entries stay zero and the gradient norm
  used for clipping ignores them), and the masked entries are set to zero again after every
  optimizer step (:class:`MaskCallback`). A weight that was already zero in the dense model
  (GGUF quantisation leaves some) is held at zero too. The exact zero count per targeted module
  is compared before and after.
* **Which zeros** (:func:`plan_masks`, what ``emprune heal --targets auto`` uses): the weights
  carry the truth. A decoder Linear with at least :data:`PRUNED_LOOKING` (1 %) exact zeros looks
  pruned; the modules ``emprune.json`` names as pruned are the masks where it can be read, and
  every one must hold the zeros it records and no unlisted weight may look pruned, else the
  command refuses in one line; with no, an empty or an unusable report the pruned-looking weights
  are the masks, and it says so. ``--targets none`` / ``mlp`` / ``linear`` are explicit and say
  how many zeros they will train away.
* **Structured** outputs (``emprune shrink``): the removed units are gone from the shapes, so
  the model trains at its smaller shapes with no mask.
* ``lora=R``: low-rank adapters (``peft``, optional) on the Linears of the decoder blocks,
  merged into the weights afterwards; the merge writes dense deltas, so the masks are applied
  again after merging and the number of entries that had to be re-zeroed is reported.

The healing text should be separate from the evaluation text (the CLI defaults to the
calibration text, WikiText-2 validation, and refuses the evaluation text itself).
"""
from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..structure.layouts import block_linears, decoder_layers, layout_or_none
from ..structure.targets import TARGET_SETS, block_targets, select_targets
from .options import HealOptions, build

#: defaults of :func:`heal` (chosen on SmolLM2-135M's held-out texts, not searched: benchmarks/results/
#: heal_smollm2.md). The next-token loss at 2e-4 fits the healing text and makes other text worse on
#: lightly pruned models (EMP count-magnitude: python-docs 18.64 -> 20.36); at 3e-5 both texts improve
#: (25.99 / 17.17). Distillation at 2e-4 improved both texts in every row measured. LoRA's 1e-3
#: behaves like full fine-tuning at 2e-4 (fits the healing text); not searched further.
DEFAULT_LR = 3e-5
DEFAULT_DISTILL_LR = 2e-4
DEFAULT_LORA_LR = 1e-3
DEFAULT_SEQLEN = 256
DEFAULT_BATCH = 4
DEFAULT_STEPS = 200
DEFAULT_WARMUP = 0.1
DEFAULT_SCHEDULE = "cosine"
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")


@dataclass
class HealResult:
    """What :func:`heal` did. ``model`` is the healed model (for LoRA: merged, plain modules
    again); ``record`` is the JSON-ready ``healing`` entry of ``emprune.json``."""

    model: nn.Module
    record: dict[str, Any]
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    eval_curve: list[dict[str, float]] = field(default_factory=list)
    zeros_before: dict[str, int] = field(default_factory=dict)
    zeros_after: dict[str, int] = field(default_factory=dict)

    @property
    def zeros_unchanged(self) -> bool:
        """Whether every targeted module has exactly as many zeros as before healing."""
        return self.zeros_before == self.zeros_after


# ----------------------------------------------------------------------------- masks


def target_modules(model: nn.Module, targets: str | Sequence[str] | None) -> dict[str, nn.Linear]:
    """The Linears whose zeros are held at zero, by full module name: none for ``None`` (a dense
    or a shrunk model), else :func:`emprune.structure.targets.select_targets`'s reading of
    ``targets`` (``"mlp"`` / ``"linear"``, or module names such as the ``layers[*].name`` of an
    ``emprune.json``), each of which must be an ``nn.Linear`` (``ValueError`` otherwise)."""
    if targets is None or (not isinstance(targets, str) and len(targets) == 0):
        return {}
    out = select_targets(model, targets)
    for n, mod in out.items():
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"masked module {n!r} is not a Linear of this model")
    return out  # type: ignore[return-value]


def zero_masks(mods: dict[str, nn.Linear]) -> dict[str, Tensor]:
    """``name -> bool tensor``, True where the weight is exactly zero now (1 byte per weight,
    on the weight's device)."""
    return {n: m.weight.detach() == 0 for n, m in mods.items()}


def count_module_zeros(mods: dict[str, nn.Linear]) -> dict[str, int]:
    """Exact zeros of each module's weight."""
    return {n: m.weight.numel() - int(torch.count_nonzero(m.weight.detach())) for n, m in mods.items()}


@torch.no_grad()
def apply_masks(mods: dict[str, nn.Linear], masks: dict[str, Tensor], count: bool = True) -> int:
    """Set the masked entries to zero; returns how many of them were not zero (were refilled),
    or 0 with ``count=False`` (no temporary copy of the masked entries: the per-step path)."""
    refilled = 0
    for n, m in mods.items():
        w, mask = m.weight, masks[n]
        if mask.device != w.device:
            mask = masks[n] = mask.to(w.device)
        if count:
            refilled += int(torch.count_nonzero(w.masked_select(mask)))
        w.masked_fill_(mask, 0)
    return refilled


class _GradMask:
    """Zero the gradient of masked entries as it is computed (a tensor hook on the weight)."""

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask

    def __call__(self, grad: Tensor) -> Tensor:
        if self.mask.device != grad.device:
            self.mask = self.mask.to(grad.device)
        return grad.masked_fill(self.mask, 0)


# ------------------------------------------------------------- which zeros are masks (the CLI's plan)

#: a weight *looks pruned* when at least this fraction of its entries is exactly 0.0. A weight
#: trained in floating point essentially never lands on exact zero (the tiny random LLaMA: none;
#: SmolLM2-135M, dequantised from its Q4_1 GGUF: at most 0.07 % per decoder Linear), while a pruned
#: weight carries its sparsity as exact zeros (10 % to 90 % in practice), so 1 % sits two orders of
#: magnitude above the first and an order below the second. It is not a quantisation detector:
#: symmetric GGUF types (Q4_0, Q5_0, Q6_K, Q8_0) round small weights to exact zero, and
#: gemma3-270m's dequantised GGUF has 3-11 % exact zeros in most of its decoder Linears; hence
#: :data:`QUANTISED_SLACK` and :func:`plan_masks`' handling of quantised sources.
PRUNED_LOOKING = 0.01
#: where an ``emprune.json`` records that its dense source already had exact zeros (a quantised
#: model: ``layers[*].dense_zeros`` >= :data:`PRUNED_LOOKING` of a layer), a module it does not list
#: is taken for pruned only above this multiple of the largest recorded dense-zero fraction (the
#: quantisation zeros of one model's tensors differ by up to ~1.5x: gemma3-270m's attention 11 %,
#: its MLP 7 %); below it, its zeros are the source's quantisation zeros and train as dense.
QUANTISED_SLACK = 2.0


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules emprune prunes, by full name: every projection of every decoder block
    (``"linear"``) where the layout is known, else every ``nn.Linear`` but the LM head."""
    if layout_or_none(model) is not None:
        return block_targets(model, "linear")
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def weight_zeros(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``name -> (exact zeros, entries)`` of the weight of every :func:`prunable_modules` module."""
    out = {}
    for n, m in prunable_modules(model).items():
        w = m.weight.detach()
        out[n] = (w.numel() - int(torch.count_nonzero(w)), w.numel())
    return out


def looks_pruned(zeros: int, entries: int) -> bool:
    """Whether a weight with ``zeros`` exact zeros of ``entries`` looks pruned (:data:`PRUNED_LOOKING`)."""
    return entries > 0 and zeros >= PRUNED_LOOKING * entries


@dataclass
class ReportClaim:
    """What an ``emprune.json`` says about the zeros of its folder's weights (:func:`report_claim`).

    ``state``: ``absent`` (no report), ``empty`` (``{}``), ``shrunk`` (``"kind": "shrunk"``: no
    pruned zeros), ``pruned`` (its ``layers`` / ``targets`` name the pruned modules), ``unusable``
    (some of ``layers`` / ``targets`` / ``summary`` cannot be read: ``problems`` says which) or
    ``silent`` (none of them: it does not say what was pruned). ``names``: the pruned modules (a
    target set or module names); ``zeros``: their exact zeros after pruning as recorded;
    ``total_zeros``: the zeros of the targeted weights it records; ``dense_fraction``: the largest
    fraction of exact zeros a pruned module had *before* pruning (a quantised source)."""

    state: str
    names: str | list[str] | None = None
    zeros: dict[str, int] = field(default_factory=dict)
    total_zeros: int | None = None
    dense_fraction: float = 0.0
    problems: list[str] = field(default_factory=list)


def _count(x: Any) -> int | None:
    """A recorded count (a non-negative int, not a bool), else None."""
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else None


def _read_layers(claim: ReportClaim, layers: Any) -> None:
    """``claim.names`` / ``zeros`` / ``dense_fraction`` from a prune report's ``layers``."""
    if not (isinstance(layers, list) and layers
            and all(isinstance(lay, dict) and isinstance(lay.get("name"), str) for lay in layers)):
        claim.problems.append("its layers are not a list of {name: ...} records")
        return
    claim.names = [lay["name"] for lay in layers]
    for lay in layers:
        z, dz, total = _count(lay.get("zeros")), _count(lay.get("dense_zeros")), _count(lay.get("total"))
        if z is not None:
            claim.zeros[lay["name"]] = z
        if dz is not None and total:
            claim.dense_fraction = max(claim.dense_fraction, dz / total)


def report_claim(report: dict[str, Any] | None) -> ReportClaim:
    """Read what ``report`` (a folder's ``emprune.json``, or None) says was pruned (see
    :class:`ReportClaim`); a hand-edited or foreign report is ``unusable``, never an error."""
    if report is None:
        return ReportClaim("absent")
    if not report:
        return ReportClaim("empty")
    if report.get("kind") == "shrunk":
        return ReportClaim("shrunk", names=[])
    claim = ReportClaim("pruned")
    if "layers" in report:
        _read_layers(claim, report["layers"])
    if "targets" in report:
        t = report["targets"]
        if t not in TARGET_SETS:
            claim.problems.append(f"its targets {t!r} are neither 'mlp' nor 'linear'")
        elif claim.names is None:
            claim.names = t
    s = report.get("summary")
    if "summary" in report:
        tw, zf = (s.get("targeted_weights"), s.get("zeros_fraction")) if isinstance(s, dict) else (None, None)
        if _count(tw) is not None and isinstance(zf, (int, float)) and 0 <= zf <= 1:
            claim.total_zeros = round(zf * tw)
        else:
            claim.problems.append("its summary has no targeted_weights and zeros_fraction")
    if claim.total_zeros is None and claim.zeros:
        claim.total_zeros = sum(claim.zeros.values())
    if claim.problems:
        claim.state = "unusable"
    elif claim.names is None:
        claim.state = "silent" if claim.total_zeros is None else "unusable"
        if claim.total_zeros is not None:
            claim.problems.append("it records zeros but not which modules were pruned")
    return claim


@dataclass
class MaskPlan:
    """Whose zeros :func:`heal` holds at zero, and why (:func:`plan_masks`). ``targets``: for
    :class:`~emprune.jobs.options.HealOptions` (module names, a target set, or None = no masks);
    ``source``: ``emprune.json``, ``weights``, ``--targets mlp`` / ``--targets linear`` or
    ``none``; ``note``: one line saying where the masks come from; ``warnings``: zeros that
    healing will train away, said before it starts."""

    targets: Any
    source: str
    note: str
    warnings: list[str] = field(default_factory=list)


def _n(x: int) -> str:
    """A count for messages: ``27,648`` or ``39.8 M``."""
    return f"{x / 1e6:.1f} M" if x >= 10 ** 6 else f"{x:,}"


def _first(found: dict[str, tuple[int, int]]) -> str:
    """``name: Z of N exact zeros (P %)`` of the first entry, for a one-line message."""
    n, (z, k) = next(iter(found.items()))
    return f"{n}: {z:,} of {k:,} exact zeros, {100 * z / k:.1f} %"


def _looking(found: dict[str, tuple[int, int]]) -> str:
    """``N pruned-looking tensors (Z exact zeros)``."""
    return f"{len(found)} pruned-looking tensor{'s' if len(found) != 1 else ''} ({_n(sum(z for z, _ in found.values()))} exact zeros)"


REFUSE_HINT = ("--targets linear holds every exact zero of the decoder Linears, --targets none trains "
               "without masks")


def plan_masks(model: nn.Module, report: dict[str, Any] | None, targets: str | None = "auto", *,
               quantised: bool = False) -> MaskPlan:
    """Decide whose zeros are masks for ``emprune heal``: from the weights, cross-checked with
    the folder's ``emprune.json`` (``report``); ``ValueError`` (one line) where they disagree.

    The weights carry the truth: a decoder Linear (:func:`prunable_modules`) with at least
    :data:`PRUNED_LOOKING` exact zeros looks pruned. ``targets``:

    * ``"auto"``: a readable prune report's modules (``layers[*].name``, else its target set) are
      the masks, each of which must hold at least the exact zeros the report records (or look
      pruned where it records none), and no other module may look pruned beyond what a quantised
      source explains (:data:`QUANTISED_SLACK`); else refused. A shrunk model has no masks (its
      zeros, if any, are said). No, an empty, an unusable or a silent report: every pruned-looking
      weight is a mask (said), after checking the zero count a report still records; a
      ``quantised`` input (a GGUF file, never an emprune output) trains its zeros as dense (said).
    * ``"mlp"`` / ``"linear"``: those Linears' zeros, whatever the report says; ``None`` /
      ``"none"``: no masks. Both the user's explicit choice: the zeros of pruned-looking weights
      left unmasked are counted in ``warnings`` (trained away), not refused."""
    census = weight_zeros(model)
    looking = {n: zk for n, zk in census.items() if looks_pruned(*zk)}
    if targets is None or targets == "none":
        warn = [f"--targets none: the {_looking(looking)} lose their zeros in training "
                "(--targets auto keeps them)"] if looking else []
        return MaskPlan(None, "none", "no masks (--targets none)", warn)
    if targets in TARGET_SETS:
        mods = target_modules(model, targets)
        outside = {n: zk for n, zk in looking.items() if n not in mods}
        warn = [f"--targets {targets}: the {_looking(outside)} outside it lose their zeros in training "
                "(--targets auto or linear keeps them)"] if outside else []
        return MaskPlan(targets, f"--targets {targets}", f"masks from --targets {targets}: {len(mods)} modules, "
                        f"{_n(sum(count_module_zeros(mods).values()))} exact zeros", warn)
    if targets != "auto":
        raise ValueError(f"targets must be 'auto', 'mlp', 'linear' or 'none', got {targets!r}")
    claim = report_claim(report)
    if claim.state == "pruned":
        return _report_plan(model, claim, looking)
    if claim.state == "shrunk":
        note = "no masks (a shrunk model: its removed units are gone from the shapes)"
        if looking:
            note += (f"; its {_looking(looking)}, which shrinking does not make (a quantised source's?), "
                     "train as dense (--targets linear holds them)")
        return MaskPlan(None, "none", note)
    return _weights_plan(claim, looking, quantised)


def _report_plan(model: nn.Module, claim: ReportClaim, looking: dict[str, tuple[int, int]]) -> MaskPlan:
    """Masks from a readable prune report, cross-checked with the weights (see :func:`plan_masks`)."""
    try:
        mods = target_modules(model, claim.names)
    except ValueError as e:
        raise ValueError(f"emprune.json does not describe this model ({e}); {REFUSE_HINT}") from None
    zeros = count_module_zeros(mods)
    entries = {n: m.weight.numel() for n, m in mods.items()}
    short = {n: (zeros[n], entries[n]) for n in mods
             if (zeros[n] < claim.zeros[n] if n in claim.zeros else not looks_pruned(zeros[n], entries[n]))}
    have = sum(zeros.values())
    if short or (claim.total_zeros is not None and have < claim.total_zeros):
        said = f"{_n(claim.total_zeros)} zeros" if claim.total_zeros is not None else "pruned"
        which = (f"{len(short)} of them have fewer exact zeros than it records ({_first(short)})" if short
                 else f"they hold only {_n(have)}")
        raise ValueError(f"emprune.json says {len(mods)} modules were pruned ({said}), but in the weights "
                         f"{which}: not the weights it describes; {REFUSE_HINT}")
    bar = PRUNED_LOOKING
    if claim.dense_fraction >= PRUNED_LOOKING:
        bar = max(bar, QUANTISED_SLACK * claim.dense_fraction)
    unlisted = {n: zk for n, zk in looking.items() if n not in mods}
    over = {n: (z, k) for n, (z, k) in unlisted.items() if z >= bar * k}
    if over:
        raise ValueError(f"the weights have {_looking(over)} that emprune.json does not list as pruned "
                         f"({_first(over)}; {100 * bar:g} % or more looks pruned); {REFUSE_HINT}")
    note = f"masks from emprune.json: {len(mods)} modules, {_n(have)} exact zeros (checked against the weights)"
    if unlisted:
        most = max(z / k for z, k in unlisted.values())
        note += (f"; {_looking(unlisted)} it does not list (at most {100 * most:.1f} % zeros) are within "
                 f"{QUANTISED_SLACK:g}x the zeros its source had before pruning (up to "
                 f"{100 * claim.dense_fraction:.1f} %: a quantised model), trained as dense "
                 "(--targets linear holds them)")
    return MaskPlan(list(mods), "emprune.json", note)


def _weights_plan(claim: ReportClaim, looking: dict[str, tuple[int, int]], quantised: bool) -> MaskPlan:
    """Masks from the weights where no readable prune report names them (see :func:`plan_masks`)."""
    why = {"absent": "emprune.json absent", "empty": "emprune.json is empty",
           "silent": "emprune.json does not say what was pruned",
           "unusable": "emprune.json unusable: " + "; ".join(claim.problems)}[claim.state]
    have = sum(z for z, _ in looking.values())
    if claim.total_zeros is not None and have < claim.total_zeros:
        raise ValueError(f"emprune.json records {_n(claim.total_zeros)} zeros in the pruned weights, but the "
                         f"weights have only {_n(have)} in {_looking(looking)}: not the weights it describes; "
                         f"{REFUSE_HINT}")
    if not looking:
        return MaskPlan(None, "none", f"no masks: no weight has {100 * PRUNED_LOOKING:g} % or more exact zeros "
                                      f"(a dense model); {why}")
    if quantised and claim.state == "absent":
        return MaskPlan(None, "none", f"no masks: a GGUF input, whose {_looking(looking)} are quantisation zeros, "
                                      "trains as dense (--targets linear holds them)")
    return MaskPlan(list(looking), "weights", f"masks from the weights: {len(looking)} tensors with "
                    f"{100 * PRUNED_LOOKING:g} % or more exact zeros, {_n(have)} zeros in all; {why}")


# ------------------------------------------------------------------------- data and callbacks


class TokenWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seqlen`` tokens of one token stream, as causal-LM examples
    (``input_ids`` = ``labels``; the model shifts them). A trailing partial window is dropped."""

    def __init__(self, tokens: Tensor, seqlen: int) -> None:
        tokens = tokens.reshape(-1).long()
        n = tokens.numel() // seqlen
        if seqlen < 2 or n < 1:
            raise ValueError(f"the healing text has {tokens.numel()} tokens: too few for one window of {seqlen}")
        self.windows = tokens[: n * seqlen].reshape(n, seqlen)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        w = self.windows[i]
        return {"input_ids": w, "labels": w}


def _callbacks():
    """The Trainer callbacks (built lazily: transformers is imported only when healing)."""
    from transformers import TrainerCallback

    class MaskCallback(TrainerCallback):
        """Set the masked entries to zero again after every optimizer step."""

        def __init__(self, mods: dict[str, nn.Linear], masks: dict[str, Tensor]) -> None:
            self.mods, self.masks = mods, masks

        def on_optimizer_step(self, args, state, control, **kw):
            apply_masks(self.mods, self.masks, count=False)

    class CurveCallback(TrainerCallback):
        """Loss curve (every logged step), periodic held-out perplexity, and a tqdm bar."""

        def __init__(self, model: nn.Module, eval_fn, eval_every: int | None, tokens_per_step: int,
                     max_steps: int, progress: bool) -> None:
            self.model, self.eval_fn, self.eval_every = model, eval_fn, eval_every
            self.tokens_per_step, self.max_steps, self.progress = tokens_per_step, max_steps, progress
            self.loss: list[dict[str, float]] = []
            self.evals: list[dict[str, float]] = []
            self.bar = None
            self.eval_seconds = 0.0
            self._postfix: dict[str, str] = {}

        def _eval(self, step: int) -> None:
            if self.eval_fn is None or (self.evals and self.evals[-1]["step"] == step):
                return
            t = time.perf_counter()
            res = self.eval_fn(self.model)
            self.eval_seconds += time.perf_counter() - t
            self.evals.append({"step": step, "tokens": step * self.tokens_per_step, "ppl": res["ppl"]})
            self._postfix["ppl"] = f"{res['ppl']:.2f}"
            if self.bar is not None:
                self.bar.set_postfix(self._postfix, refresh=False)

        def on_train_begin(self, args, state, control, **kw):
            from tqdm.auto import tqdm

            if state.is_world_process_zero:
                self.bar = tqdm(total=self.max_steps, desc="heal", unit="step", disable=not self.progress)
                self._eval(0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and state.is_world_process_zero:
                self.loss.append({"step": state.global_step, "loss": float(logs["loss"]),
                                  "lr": float(logs.get("learning_rate", float("nan")))})
                self._postfix["loss"] = f"{logs['loss']:.3f}"
                if self.bar is not None:
                    self.bar.set_postfix(self._postfix, refresh=False)

        def on_step_end(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
            if self.eval_every and state.global_step % self.eval_every == 0:
                self._eval(state.global_step)

        def on_train_end(self, args, state, control, **kw):
            if state.is_world_process_zero and self.eval_every:
                self._eval(state.global_step)
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return MaskCallback, CurveCallback


def _distill_trainer_class():
    """A ``Trainer`` whose loss is distillation from a frozen teacher (built lazily)."""
    import torch.nn.functional as F
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """Loss = ``w`` x KL(teacher || student) over the next-token distributions of every position
        + (1 - ``w``) x the usual cross-entropy. The teacher runs in eval mode without gradients on
        the student's device."""

        def __init__(self, *a, teacher: nn.Module, weight: float, **kw) -> None:
            super().__init__(*a, **kw)
            # no_grad below keeps the teacher out of autograd; its requires_grad flags are left alone
            # (the caller's model: freezing it would silently freeze every later copy of it)
            self.teacher = teacher.to(self.args.device).eval()
            self.kd_weight = weight
            self.model_accepts_loss_kwargs = False  # a mean loss: Trainer scales it for accumulation

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            out = model(input_ids=ids, use_cache=False)
            with torch.no_grad():
                t_logits = self.teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
            s_logp = F.log_softmax(out.logits[:, :-1].float(), dim=-1)
            t_logp = F.log_softmax(t_logits, dim=-1)
            del t_logits
            kd = F.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean")
            loss = kd
            if self.kd_weight < 1:
                ce = F.nll_loss(s_logp.flatten(0, 1), inputs["labels"][:, 1:].flatten().to(s_logp.device))
                loss = self.kd_weight * kd + (1 - self.kd_weight) * ce
            return (loss, out) if return_outputs else loss

    return DistillTrainer


# ----------------------------------------------------------------------------- LoRA


def _lora_wrap(model: nn.Module, r: int, alpha: float | None) -> nn.Module:
    """``model`` with peft LoRA adapters (rank ``r``) on every Linear of its decoder blocks."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("--lora needs peft: pip install peft (or pip install 'emprune[heal]')") from None
    names = {m: n for n, m in model.named_modules()}
    modules = [names[m] for block in decoder_layers(model) for m in block_linears(block, "linear").values()]
    cfg = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=0.0,
                     target_modules=modules, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


# ----------------------------------------------------------------------------- healing


def _checkpointing_args(on: bool) -> dict[str, Any]:
    """Gradient (activation) checkpointing options under the name this transformers uses
    (``activation_checkpointing`` from v5.x, ``gradient_checkpointing`` before)."""
    if not on:
        return {}
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: True, f"{key}_kwargs": {"use_reentrant": False}}


def plan_steps(steps: int | None, train_tokens: int | None, tokens_per_step: int) -> int:
    """Optimizer steps for a step count or a token budget (rounded up to whole steps)."""
    if steps is not None and train_tokens is not None:
        raise ValueError("give steps or a token budget, not both")
    if train_tokens is not None:
        if train_tokens < 1:
            raise ValueError(f"the token budget must be >= 1, got {train_tokens}")
        return max(1, math.ceil(train_tokens / tokens_per_step))
    steps = DEFAULT_STEPS if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return steps


def _check(o: HealOptions, model: nn.Module, teacher: nn.Module | None, eval_tokens: Tensor | None) -> float:
    """Refuse bad options before anything is built; returns the learning rate (the default of
    the mode where ``o.lr`` is None)."""
    lora, batch, grad_accum, seqlen, schedule, warmup = o.lora, o.batch, o.grad_accum, o.seqlen, o.schedule, o.warmup
    eval_every, distill_weight, lr = o.eval_every, o.distill_weight, o.lr
    if lora is not None and lora < 1:
        raise ValueError(f"the LoRA rank must be >= 1, got {lora}")
    if batch < 1 or grad_accum < 1 or seqlen < 2:
        raise ValueError(f"need batch >= 1, grad_accum >= 1 and seqlen >= 2, got {batch}, {grad_accum}, {seqlen}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup < 0 or (warmup >= 1 and warmup != int(warmup)):
        raise ValueError(f"warmup must be a fraction in [0, 1) or a whole number of steps, got {warmup}")
    if eval_every is not None and (eval_every < 1 or eval_tokens is None):
        raise ValueError("eval_every needs eval_tokens and must be >= 1")
    if not 0 < distill_weight <= 1:
        raise ValueError(f"distill_weight must lie in (0, 1], got {distill_weight}")
    if teacher is not None:
        tv, sv = teacher.get_output_embeddings(), model.get_output_embeddings()
        if tv is None or sv is None or tv.weight.shape[0] != sv.weight.shape[0]:
            raise ValueError("the teacher must be a causal LM with the student's vocabulary (same tokenizer)")
    if lr is None:
        lr = DEFAULT_LORA_LR if lora else DEFAULT_DISTILL_LR if teacher is not None else DEFAULT_LR
    lr = float(lr)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"the learning rate must be a positive finite number, got {lr}")
    return lr


def heal(model: nn.Module, tokens: Tensor, options: HealOptions | None = None, *, teacher: nn.Module | None = None,
         eval_tokens: Tensor | None = None, **fields: Any) -> HealResult:
    """Fine-tune ``model`` in place on ``tokens`` (a 1-D token stream) with ``Trainer``,
    holding the zeros of the ``targets`` modules at zero; returns a :class:`HealResult`.

    Options: the fields of :class:`~emprune.jobs.options.HealOptions` (``options=`` or keywords).
    Each optimizer step sees ``batch * grad_accum`` random non-overlapping windows of ``seqlen``
    tokens (per process), for ``steps`` (default :data:`DEFAULT_STEPS`) or a ``train_tokens``
    budget; AdamW with ``lr`` (default :data:`DEFAULT_LR`, :data:`DEFAULT_DISTILL_LR` with a
    ``teacher``, :data:`DEFAULT_LORA_LR` with ``lora``), ``warmup`` and ``schedule``.
    ``targets``: ``None`` (no masks; an :class:`UnmaskedZerosWarning` where weights look pruned),
    ``"mlp"`` / ``"linear"`` or module names (:func:`plan_masks` picks them for the CLI). ``lora=R``:
    rank-R adapters on every Linear of the decoder blocks, merged, then the masks re-applied.
    ``eval_tokens`` with ``eval_every=N``: held-out perplexity before, every N steps and at the
    end. ``teacher`` (same tokenizer): ``distill_weight`` x KL(teacher || student) + the rest
    cross-entropy. Trainer writes nothing and seeds the generators with ``seed``. Interrupted,
    the model is left part-trained (with ``lora``, still wrapped). ``ValueError`` for bad
    options, ``RuntimeError`` if a masked entry is not zero at the end (a bug).

    Steps: check (:func:`_check`); list the masked modules and their zeros; wrap (LoRA) and
    hook the gradients; train (:func:`_trainer`); merge and re-zero (:func:`_merge_and_rezero`);
    record (:func:`_settings_record`, :func:`_mask_record`)."""
    o = build(HealOptions, options, fields)
    lr = _check(o, model, teacher, eval_tokens)
    dataset = TokenWindows(tokens, o.seqlen)
    if len(dataset) < o.batch:
        raise ValueError(f"the healing text gives {len(dataset)} windows of {o.seqlen} tokens, fewer than one "
                         f"batch of {o.batch}; use a longer text or a smaller --seqlen/--batch")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = o.batch * o.grad_accum * o.seqlen * world
    max_steps = plan_steps(o.steps, o.train_tokens, tokens_per_step)
    mods, masks, zeros_before, unmasked = _masks_at_start(model, o.targets)
    t0 = time.perf_counter()
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # no KV cache while training (and none with checkpointing)
    if o.lora:
        from transformers import set_seed

        set_seed(o.seed)  # the adapters' initialisation (Trainer seeds only later, for training)
    train_model = _lora_wrap(model, o.lora, o.lora_alpha) if o.lora else model
    hooks = []
    if not o.lora:  # LoRA leaves the base weights frozen: nothing to mask until the merge
        hooks = [m.weight.register_hook(_GradMask(masks[n])) for n, m in mods.items() if m.weight.requires_grad]
    trainable = sum(p.numel() for p in train_model.parameters() if p.requires_grad)
    MaskCallback, CurveCallback = _callbacks()
    # evaluated on ``model`` itself: peft injects its adapters into it, and emprune's perplexity
    # reads the transformers model's base/head split
    curve_cb = CurveCallback(model, _eval_fn(o, eval_tokens), o.eval_every, tokens_per_step, max_steps, o.progress)
    try:
        with tempfile.TemporaryDirectory(prefix="emprune-heal-") as tmp:
            trainer = _trainer(o, tmp, max_steps, lr, train_model, dataset, [MaskCallback(mods, masks), curve_cb],
                               teacher)
            apply_masks(mods, masks, count=False)  # masks on the training device from the start
            out = trainer.train()
    finally:
        for h in hooks:
            h.remove()
        if use_cache is not None:
            model.config.use_cache = use_cache
    train_seconds = time.perf_counter() - t0 - curve_cb.eval_seconds
    model, mods, rezeroed = _merge_and_rezero(model, train_model, mods, masks, bool(o.lora))
    zeros_after = count_module_zeros(mods)
    record = {
        "steps": max_steps, "tokens": max_steps * tokens_per_step, "tokens_per_step": tokens_per_step,
        **_settings_record(o, lr, teacher, rezeroed), "processes": world,
        "text_tokens": int(tokens.numel()), "windows": len(dataset),
        "epochs": max_steps * o.batch * o.grad_accum * world / len(dataset),
        "trainable_parameters": trainable,
        "seconds": train_seconds,  # training only: the held-out evaluations are in eval_seconds
        "eval_seconds": curve_cb.eval_seconds, "train_loss": float(out.training_loss), "loss_curve": curve_cb.loss,
        "eval": ({"tokens": int(eval_tokens.numel()), "seqlen": o.eval_seqlen or o.seqlen,  # type: ignore[union-attr]
                  "curve": curve_cb.evals} if o.eval_every else None),
        "masks": {**_mask_record(mods, masks, zeros_before, zeros_after, bool(o.lora)),
                  "unmasked_pruned_looking": {"tensors": len(unmasked), "zeros": sum(unmasked.values())}},
    }
    return HealResult(model=model, record=record, loss_curve=curve_cb.loss, eval_curve=curve_cb.evals,
                      zeros_before=zeros_before, zeros_after=zeros_after)


class UnmaskedZerosWarning(UserWarning):
    """:func:`heal` without masks on a model whose weights look pruned: their zeros are trained away."""


def _masks_at_start(model: nn.Module, targets: Any) -> tuple[dict[str, nn.Linear], dict[str, Tensor],
                                                             dict[str, int], dict[str, int]]:
    """The masked modules, their masks and zero counts before training, and ``name -> zeros`` of
    the pruned-looking weights (:func:`looks_pruned`) left unmasked: with no masks at all
    (``targets=None``) an :class:`UnmaskedZerosWarning` says that their zeros will be trained away."""
    mods = target_modules(model, targets)
    masks = zero_masks(mods)
    unmasked = {n: z for n, (z, k) in weight_zeros(model).items() if n not in mods and looks_pruned(z, k)}
    if unmasked and not mods:
        warnings.warn(UnmaskedZerosWarning(
            f"heal without masks (targets=None): {len(unmasked)} weights look pruned ({sum(unmasked.values()):,} "
            "exact zeros) and lose their zeros in training; targets='mlp' / 'linear' / module names keep them"),
            stacklevel=3)
    return mods, masks, count_module_zeros(mods), unmasked


def _eval_fn(o: HealOptions, eval_tokens: Tensor | None) -> Any:
    """The held-out perplexity the curve reads every ``eval_every`` steps (None: no evaluations)."""
    if not o.eval_every:
        return None
    from .eval import perplexity

    seqlen = o.eval_seqlen or o.seqlen
    return lambda m: perplexity(m, eval_tokens, seqlen, batch_size=o.eval_batch, progress=False)


def _settings_record(o: HealOptions, lr: float, teacher: nn.Module | None, rezeroed: int) -> dict[str, Any]:
    """The record's training settings: sizes, optimizer, schedule, loss, LoRA."""
    dw = o.distill_weight
    return {
        "seqlen": o.seqlen, "batch": o.batch, "grad_accum": o.grad_accum,
        "lr": lr, "schedule": o.schedule, "warmup": o.warmup, "weight_decay": o.weight_decay,
        "max_grad_norm": o.max_grad_norm, "optimizer": "adamw_torch", "seed": o.seed,
        "bf16": o.bf16, "gradient_checkpointing": o.gradient_checkpointing,
        "mode": "lora" if o.lora else "full",
        "loss": ("distillation" + (f" x {dw:g} + cross-entropy x {1 - dw:g}" if dw < 1 else "")
                 if teacher is not None else "cross-entropy"),
        "lora": ({"r": o.lora, "alpha": 2 * o.lora if o.lora_alpha is None else o.lora_alpha,
                  "modules": "every Linear of the decoder blocks", "merged": True,
                  "rezeroed_after_merge": rezeroed} if o.lora else None),
    }


def _trainer(o: HealOptions, tmp: str, max_steps: int, lr: float, train_model: nn.Module, dataset: Any,
             callbacks: list[Any], teacher: nn.Module | None) -> Any:
    """A transformers ``Trainer`` (a distilling one with a ``teacher``) that writes nothing to
    ``tmp`` and reports through ``callbacks`` only (its own bar and printer removed)."""
    from transformers import Trainer, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    args = TrainingArguments(
        output_dir=tmp, max_steps=max_steps, per_device_train_batch_size=o.batch,
        gradient_accumulation_steps=o.grad_accum, learning_rate=lr, lr_scheduler_type=o.schedule,
        warmup_steps=o.warmup, weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm,
        optim="adamw_torch", logging_steps=1, logging_strategy="steps", save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, seed=o.seed, data_seed=o.seed,
        bf16=o.bf16, dataloader_drop_last=True, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available() and not o.use_cpu, remove_unused_columns=False,
        label_names=["labels"], use_cpu=o.use_cpu, **_checkpointing_args(o.gradient_checkpointing))
    kw: dict[str, Any] = dict(model=train_model, args=args, train_dataset=dataset,
                              data_collator=default_data_collator, callbacks=callbacks)
    if teacher is not None:
        trainer = _distill_trainer_class()(teacher=teacher, weight=o.distill_weight, **kw)
    else:
        trainer = Trainer(**kw)
    for cb in (PrinterCallback, ProgressCallback):  # our own bar and curve instead
        trainer.remove_callback(cb)
    return trainer


def _merge_and_rezero(model: nn.Module, train_model: nn.Module, mods: dict[str, nn.Linear],
                      masks: dict[str, Tensor], lora: bool) -> tuple[nn.Module, dict[str, nn.Linear], int]:
    """After training: merge LoRA adapters (their deltas are dense) and zero the masked entries
    again; check that every one is zero. Returns the model, its masked modules and how many
    merged entries had to be re-zeroed."""
    rezeroed = 0
    if lora:
        model = train_model.merge_and_unload()
        mods = target_modules(model, list(mods))  # the same Linear objects, base weights now merged
        rezeroed = apply_masks(mods, masks)
    else:
        apply_masks(mods, masks)
    model.eval()
    leaked = sum(int(torch.count_nonzero(m.weight.detach().masked_select(masks[n].to(m.weight.device))))
                 for n, m in mods.items())
    if leaked:
        raise RuntimeError(f"{leaked} masked weights are not zero after healing (a bug in emprune heal)")
    return model, mods, rezeroed


def _mask_record(mods: dict[str, nn.Linear], masks: dict[str, Tensor], zeros_before: dict[str, int],
                 zeros_after: dict[str, int], lora: bool) -> dict[str, Any]:
    """The record's ``masks`` entry: what was held at zero and whether every zero stayed."""
    changed = {n: [zeros_before[n], zeros_after[n]] for n in mods if zeros_before[n] != zeros_after[n]}
    return {
        "masked_modules": len(mods),
        "masked_entries": int(sum(int(m.sum()) for m in masks.values())),
        "zeros_before": int(sum(zeros_before.values())),
        "zeros_after": int(sum(zeros_after.values())),
        "zeros_unchanged": not changed,
        "modules_with_changed_zeros": changed,
        "how": ("gradients of the masked entries zeroed in backward and the entries set to zero after "
                "every optimizer step" + ("; after the LoRA merge the masks were applied again" if lora else "")
                ) if mods else "no masks",
    }


def masked_targets_from_report(report: dict[str, Any] | None) -> list[str] | None:
    """The module names whose zeros are masks, from a folder's ``emprune.json``: the pruned
    layers of an ``emprune prune`` output (``layers[*].name``, else its ``targets``); ``None``
    for a shrunk folder (its units are gone) or no report. A healed folder keeps the report
    of what it came from, so healing again masks the same modules. The report alone: ``emprune
    heal`` uses :func:`plan_masks`, which checks it against the weights' zeros."""
    if not report or report.get("kind") == "shrunk":
        return None
    layers = report.get("layers")
    if isinstance(layers, list) and layers and all(isinstance(l, dict) and "name" in l for l in layers):
        return [str(l["name"]) for l in layers]
    t = report.get("targets")
    return t if t in ("mlp", "linear") else None  # type: ignore[return-value]


__all__ = ["heal", "HealResult", "TokenWindows", "target_modules", "zero_masks", "apply_masks",
           "count_module_zeros", "masked_targets_from_report", "plan_steps", "PRUNED_LOOKING", "QUANTISED_SLACK",
           "prunable_modules", "weight_zeros", "looks_pruned", "ReportClaim", "report_claim", "MaskPlan",
           "plan_masks", "UnmaskedZerosWarning"]
