"""The model runner against independent references: a plain one-window-at-a-time loop in
float64, lm-evaluation-harness's own window functions, and the window plan read by eye."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ppl_runner
from ppl_runner import evaluate_texts, plan_windows, score_texts

TEXTS = [
    "The cat sat on the mat.",
    "A much longer text about the Python language, its syntax, its standard library, and the many modules "
    "that ship with it, written to be longer than one window of the model. " * 3,
    "x",
    "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "Short.",
]


# ---------------------------------------------------------------------------------------
# Window plan: a pure function of token counts
# ---------------------------------------------------------------------------------------


def test_plan_windows_gold():
    # 34 tokens, windows of 10 advancing by 10: the last one reaches back to full length.
    assert plan_windows(34, max_length=10, stride=10) == [(0, 10, 10), (10, 20, 10), (20, 30, 10), (23, 33, 3)]
    # advancing by 4 keeps at least 6 tokens of context for every scored token
    assert plan_windows(20, max_length=10, stride=4) == [(0, 10, 10), (4, 14, 4), (8, 18, 4), (9, 19, 1)]
    assert plan_windows(5, max_length=10, stride=10) == [(0, 4, 4)]
    assert plan_windows(1, max_length=10, stride=10) == []


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 200), st.integers(1, 40), st.data())
def test_plan_windows_scores_every_target_once(num_tokens, max_length, data):
    stride = data.draw(st.integers(1, max_length))
    scored = []
    for start, stop, num_scored in plan_windows(num_tokens, max_length, stride):
        assert 0 <= start < stop <= num_tokens - 1 and stop - start <= max_length
        targets = list(range(stop - num_scored + 1, stop + 1))  # positions of the scored targets
        first_context = targets[0] - start  # tokens the first scored target sees
        assert first_context >= min(targets[0], max_length - stride)
        scored += targets
    assert scored == list(range(1, num_tokens))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(1, 8), st.integers(1, 200))
def test_pack_batches_respects_its_limits(lengths, batch_size, max_batch_tokens):
    batches = ppl_runner.pack_batches(lengths, batch_size, max_batch_tokens)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        if len(batch) > 1:  # a single item always runs, whatever its size
            assert len(batch) <= batch_size and padded <= max_batch_tokens
            assert padded - sum(lengths[i] for i in batch) <= 0.1 * padded


def lm_eval_windows(num_tokens, max_length, context_len):
    """lm-evaluation-harness's own windows over a sequence [0, 1, ..., num_tokens - 1] whose token 0
    is the start (its `prefix_token`) and the rest the text (its `token_list`), as (input, predicted)."""
    from lm_eval.utils import get_rolling_token_windows

    return list(get_rolling_token_windows(list(range(1, num_tokens)), 0, max_length, context_len))


def our_windows(num_tokens, max_length, stride):
    """plan_windows on the same sequence, as (input, predicted): a window feeds seq[start:stop] and
    scores its last num_scored predictions, of seq[stop - num_scored + 1 : stop + 1]."""
    seq = list(range(num_tokens))
    return [(seq[start:stop], seq[stop - num_scored + 1 : stop + 1])
            for start, stop, num_scored in plan_windows(num_tokens, max_length, stride)]


def test_plan_equals_lm_eval_windows_at_every_stride():
    # lm-eval's get_rolling_token_windows(max_seq_len=M, context_len=c): the first window predicts
    # min(M, n) tokens, each later one feeds a full M tokens and predicts the last M - c + 1 of them,
    # so its first prediction is conditioned on c tokens. plan_windows(max_length=M, stride=S): each
    # later window feeds M tokens and scores its last S, its first scored token conditioned on
    # M - S + 1. So stride S is context_len M - S + 1: stride == max_length is the rolling case
    # lm-eval runs (loglikelihood_rolling, context_len=1), stride 1 is context_len M; every
    # (M, S) with 1 <= S <= M has its lm-eval counterpart.
    for max_length in range(1, 13):
        for stride in range(1, max_length + 1):
            for num_tokens in range(1, 4 * max_length + 3):  # no text, one window, one and a bit, several
                expected = lm_eval_windows(num_tokens, max_length, context_len=max_length - stride + 1)
                assert our_windows(num_tokens, max_length, stride) == expected, (num_tokens, max_length, stride)


@pytest.mark.parametrize("num_tokens,max_length", [(34, 10), (10, 10), (11, 10), (3, 8), (100, 7), (513, 256)])
def test_rolling_plan_equals_lm_eval_disjoint_windows(num_tokens, max_length):
    """What lm-eval's loglikelihood_rolling scores: make_disjoint_window of its context_len=1 windows,
    (context, continuation) with the model fed context + continuation[:-1]."""
    from lm_eval.utils import make_disjoint_window

    theirs = [make_disjoint_window(w) for w in lm_eval_windows(num_tokens, max_length, context_len=1)]
    ours = [(fed[: len(fed) - len(scored) + 1], scored) for fed, scored in our_windows(num_tokens, max_length, max_length)]
    assert ours == theirs


# ---------------------------------------------------------------------------------------
# Reference: one window at a time, no padding, float64 log-softmax over the full logits
# ---------------------------------------------------------------------------------------


def reference_logprobs(model, tokenizer, text, *, max_length, stride, add_start_token=True):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    seq = ([tokenizer.bos_token_id] if add_start_token else []) + ids
    out = []
    for start, stop, num_scored in plan_windows(len(seq), max_length, stride):
        with torch.no_grad():
            logits = model(torch.tensor([seq[start:stop]])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(seq[start + 1 : stop + 1])
        out += logprobs.gather(-1, targets[:, None])[:, 0][-num_scored:].tolist()
    return out


def collect(batches):
    preds, refs = [], []
    for batch in batches:
        assert set(batch) == {"predictions", "references"}
        preds += batch["predictions"]
        refs += batch["references"]
    return preds, refs


@pytest.mark.parametrize("batch_size", [1, 16])
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("add_start_token", [True, False])
def test_runner_matches_reference_loop(tiny, batch_size, padding_side, add_start_token):
    model, tokenizer = tiny
    texts = [t for t in TEXTS if add_start_token or len(tokenizer(t)["input_ids"]) > 1]
    preds, refs = collect(
        score_texts(model, tokenizer, texts, batch_size=batch_size, max_length=24, stride=16,
                    padding_side=padding_side, add_start_token=add_start_token, progress=False)
    )
    assert len(preds) == len(texts)
    for text, logprobs, targets in zip(texts, preds, refs):
        expected = reference_logprobs(model, tokenizer, text, max_length=24, stride=16, add_start_token=add_start_token)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert targets == (ids if add_start_token else ids[1:])
        assert len(logprobs) == len(expected)
        assert math.exp(-sum(logprobs) / len(logprobs)) == pytest.approx(math.exp(-sum(expected) / len(expected)), rel=1e-4)
        assert logprobs == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_runner_streams_in_chunks_and_keeps_order(tiny, monkeypatch):
    model, tokenizer = tiny
    whole = collect(score_texts(model, tokenizer, TEXTS, max_length=32, progress=False))
    monkeypatch.setattr(ppl_runner, "TEXTS_PER_CHUNK", 2)
    batches = list(score_texts(model, tokenizer, iter(TEXTS), max_length=32, progress=False))
    assert len(batches) == 3
    streamed = collect(batches)
    assert streamed[1] == whole[1]
    for a, b in zip(streamed[0], whole[0]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_token_budget_does_not_change_results(tiny):
    model, tokenizer = tiny
    small = collect(score_texts(model, tokenizer, TEXTS, max_length=32, max_batch_tokens=1, progress=False))
    large = collect(score_texts(model, tokenizer, TEXTS, max_length=32, max_batch_tokens=10_000, progress=False))
    for a, b in zip(small[0], large[0]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_runner_leaves_model_and_inputs_alone(tiny):
    model, tokenizer = tiny
    texts = list(TEXTS)
    model.train()
    try:
        list(score_texts(model, tokenizer, texts, max_length=32, progress=False))
        assert model.training  # mode restored
    finally:
        model.eval()
    assert texts == TEXTS


def test_start_token_falls_back_to_eos(tiny):
    model, tokenizer = tiny
    tok = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    assert tok.bos_token_id is None and tok.eos_token_id == 0
    a = collect(score_texts(model, tok, TEXTS[:2], max_length=32, progress=False))
    b = collect(score_texts(model, tokenizer, TEXTS[:2], max_length=32, progress=False))
    assert a == b


# ---------------------------------------------------------------------------------------
# lm-evaluation-harness parity: word / byte perplexity and bits per byte
# ---------------------------------------------------------------------------------------


def lm_eval_metrics(model, tokenizer, docs, max_length):
    """loglikelihood_rolling per document, then lm-eval's pooled word/byte metrics."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    total_ll, words, num_bytes = 0.0, 0, 0
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id  # lm-eval's prefix_token_id
    for doc in docs:
        tokens = tokenizer(doc, add_special_tokens=False)["input_ids"]
        windows = get_rolling_token_windows(tokens, prefix, max_length, context_len=1)  # as its loglikelihood_rolling
        for context, continuation in map(make_disjoint_window, windows):
            inp = torch.tensor([(context + continuation)[:-1]])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(inp).logits[0].double(), dim=-1)[-len(continuation):]
            total_ll += logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()
        words += len(re.split(r"\s+", doc))
        num_bytes += len(doc.encode("utf-8"))
    return {
        "word_perplexity": math.exp(-total_ll / words),
        "byte_perplexity": math.exp(-total_ll / num_bytes),
        "bits_per_byte": -total_ll / (num_bytes * math.log(2)),
    }


def assert_lm_eval_parity(model, tokenizer, docs, max_length, **runner_kwargs):
    expected = lm_eval_metrics(model, tokenizer, docs, max_length=max_length)
    result = evaluate_texts(model, tokenizer, docs, max_length=max_length, progress=False, **runner_kwargs)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-4), key
    return result


def test_lm_eval_parity_tiny(tiny):
    assert_lm_eval_parity(*tiny, TEXTS, max_length=16, batch_size=4)


@pytest.mark.slow
def test_lm_eval_parity_real_model(smol):
    docs = ["Perplexity measures how well a language model predicts a text.", TEXTS[1]]
    assert_lm_eval_parity(*smol, docs, max_length=48, batch_size=8)


@pytest.mark.slow
def test_real_model_matches_reference_loop(smol):
    model, tokenizer = smol
    texts = ["The capital of France is Paris.", TEXTS[1], "def add(a, b):\n    return a + b\n"]
    preds, _ = collect(score_texts(model, tokenizer, texts, batch_size=16, max_length=40, stride=24,
                                   padding_side="left", progress=False))
    for text, logprobs in zip(texts, preds):
        expected = reference_logprobs(model, tokenizer, text, max_length=40, stride=24)
        assert math.exp(-sum(logprobs) / len(logprobs)) == pytest.approx(math.exp(-sum(expected) / len(expected)), rel=1e-4)
    # an ordinary English sentence is not random to a real model
    assert math.exp(-sum(preds[0]) / len(preds[0])) < 200


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,texts,error,match",
    [
        ({"stride": 40, "max_length": 32}, TEXTS, ValueError, "stride"),
        ({"stride": 0, "max_length": 32}, TEXTS, ValueError, "stride"),
        ({"max_length": 10_000}, TEXTS, ValueError, "max_length.*context"),
        ({"max_length": 0}, TEXTS, ValueError, "max_length"),
        ({"batch_size": 0}, TEXTS, ValueError, "batch_size"),
        ({"padding_side": "middle"}, TEXTS, ValueError, "padding_side"),
        ({}, ["fine", ""], ValueError, r"texts\[1\]"),
        ({}, ["fine", 3], TypeError, r"texts\[1\]"),
        ({}, "a single string", TypeError, "list of strings"),
        ({"add_start_token": False}, ["x"], ValueError, r"texts\[0\].*no start token"),
    ],
)
def test_runner_rejects_bad_input(tiny, kwargs, texts, error, match):
    model, tokenizer = tiny
    with pytest.raises(error, match=match):
        list(score_texts(model, tokenizer, texts, progress=False, **kwargs))


def test_tokenizer_without_start_token(tiny):
    model, tokenizer = tiny
    bare = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="add_start_token=False"):
        list(score_texts(model, bare, TEXTS, progress=False))
    preds, _ = collect(score_texts(model, bare, TEXTS[:2], add_start_token=False, max_length=32, progress=False))
    assert len(preds[0]) == len(bare(TEXTS[0])["input_ids"]) - 1


def test_checks_run_at_call_time_and_the_loop_body_is_not_in_inference_mode(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="stride"):
        score_texts(model, tokenizer, TEXTS, max_length=8, stride=9)  # no next() needed
    for _ in score_texts(model, tokenizer, TEXTS, max_length=32, progress=False):
        assert not torch.is_inference_mode_enabled()


def test_non_finite_model_output_names_the_texts(tiny):
    import copy

    model, tokenizer = tiny
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.transformer.h[0].attn.c_attn.weight.fill_(math.nan)
    with pytest.raises(ValueError, match=r"Scoring `texts` \[0, 1\] failed"):
        list(score_texts(broken, tokenizer, TEXTS[:2], max_length=32, progress=False))


def test_resolved_settings_are_reported(tiny):
    model, tokenizer = tiny
    settings = ppl_runner.resolve_settings(model, tokenizer, max_length=32)
    # the budget holds batch_size full windows; GPT-2 float32: 4 bytes x (16 x 64 hidden + 8 x 256 inner)
    assert settings == {"max_length": 32, "stride": 32, "batch_size": 16, "max_batch_tokens": 16 * 32,
                        "padding_side": "right", "start_token_id": 0, "head": "fused", "bytes_per_token": 12288}
    plain = ppl_runner.resolve_settings(model, tokenizer, max_length=32, head="logits")
    assert plain["head"] == "logits" and plain["bytes_per_token"] == 12288 + 4 * 1000  # plus a row of logits
    assert ppl_runner.resolve_settings(model, tokenizer, add_start_token=False)["max_length"] == 256  # the context


@pytest.mark.slow
def test_real_text_real_model(smol, wikitext_paragraphs):
    """WikiText-2 paragraphs (from ../shared; skipped where absent): a long one scored in strided
    windows equals the plain loop, and the rolling windows equal lm-evaluation-harness's."""
    model, tokenizer = smol
    long = next(p for p in wikitext_paragraphs if 300 < len(tokenizer(p)["input_ids"]) < 400)
    docs = [wikitext_paragraphs[1], long, wikitext_paragraphs[3]]
    preds, _ = collect(score_texts(model, tokenizer, docs, max_length=128, stride=96, progress=False))
    for doc, logprobs in zip(docs, preds):
        expected = reference_logprobs(model, tokenizer, doc, max_length=128, stride=96)
        assert logprobs == pytest.approx(expected, rel=1e-4, abs=1e-4)
    result = assert_lm_eval_parity(model, tokenizer, docs, max_length=128)
    assert 5 < result["perplexity"] < 200  # real English under a real model
