"""Bad input at every public entry point, in one place.

Each entry point (the core function and class, the evaluate metric in both configurations,
the model runner, model and corpus loading, the command line, the app's handlers) must
reject bad input with a `ValueError` or `TypeError` whose message names the argument, and
must leave what the caller passed (tensors, arrays, lists, texts, model, tokenizer)
exactly as it was. Distributed faults live in test_distributed.py.
"""

import copy
import errno
import inspect
import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import evaluate
import gradio as gr
import numpy as np
import pytest
import torch

import app
import ppl_cli
import ppl_corpus
from conftest import ROOT
from ppl_core import perplexity, target_nll
from ppl_torchmetrics import Perplexity
from ppl_runner import evaluate_texts, score_texts
from ppl_corpus import read_corpus
from ppl_sources import load_model

METRIC_PATH = str(ROOT / "perplexity_metric.py")
TEXTS = ["The cat sat on the mat.", "Perplexity is the exponential of the mean negative log-likelihood.", "Short."]


def snapshot(value):
    """A deep copy to compare the caller's data with afterwards."""
    return copy.deepcopy(value)


def assert_unchanged(before, after):
    """Same type, same values (NaN equal to NaN), recursively."""
    assert type(after) is type(before)
    if isinstance(before, torch.Tensor):
        assert after.dtype == before.dtype and after.shape == before.shape
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
    elif isinstance(before, np.ndarray):
        assert after.dtype == before.dtype
        np.testing.assert_array_equal(after, before)
    elif isinstance(before, (list, tuple)):
        assert len(after) == len(before)
        for a, b in zip(after, before):
            assert_unchanged(b, a)
    elif isinstance(before, dict):
        assert after.keys() == before.keys()
        for key in before:
            assert_unchanged(before[key], after[key])
    elif isinstance(before, float) and math.isnan(before):
        assert math.isnan(after)
    else:
        assert after == before


def batch(seed=0, shape=(2, 5, 7)):
    """Logits `shape` and in-vocabulary targets."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randint(shape[-1], shape[:2], generator=gen)


# =======================================================================================
# Core: `perplexity`, `Perplexity.update / forward / compute`
# =======================================================================================


def _core_cases():
    preds, target = batch()
    nan, inf, neg_inf_target = preds.clone(), preds.clone(), preds.clone()
    nan[0, 1, 3] = math.nan
    inf[1, 2, (target[1, 2] + 1) % 7] = math.inf  # +inf at a non-target logit poisons the row
    neg_inf_target[1, 4, target[1, 4]] = -math.inf  # the target has probability 0
    half_nan = preds.half()
    half_nan[0, 0, target[0, 0]] = math.nan
    out_of_vocab, negative = target.clone(), target.clone()
    out_of_vocab[1, 3] = 7
    negative[0, 2] = -3
    P = pytest.param
    return [
        P(None, target, None, TypeError, "`preds`", id="preds-None"),
        P(preds, None, None, TypeError, "`target`", id="target-None"),
        P(preds.numpy(), target, None, TypeError, "`preds`", id="preds-numpy"),
        P(preds.tolist(), target, None, TypeError, "`preds`", id="preds-list"),
        P(preds, target.numpy(), None, TypeError, "`target`", id="target-numpy"),
        P(preds.long(), target, None, TypeError, "`preds`", id="preds-int"),
        P(preds.to(torch.complex64), target, None, TypeError, "`preds`", id="preds-complex"),
        P(preds, target.float(), None, TypeError, "`target`", id="target-float"),
        P(preds, target.bool(), None, TypeError, "`target`", id="target-bool"),
        P(preds[0], target, None, ValueError, "`preds`", id="preds-2d"),
        P(preds[None], target, None, ValueError, "`preds`", id="preds-4d"),
        P(preds, target[0], None, ValueError, "`target`", id="target-1d"),
        P(preds, target[..., None], None, ValueError, "`target`", id="target-3d"),
        P(preds, target[:1], None, ValueError, "`preds` and `target`", id="batch-mismatch"),
        P(preds, target[:, :4], None, ValueError, "`preds` and `target`", id="seq-len-mismatch"),
        P(preds[:0], target[:0], None, ValueError, "`preds`", id="empty-batch"),
        P(preds[..., :0], target, None, ValueError, "`preds`", id="empty-vocab"),
        P(preds, out_of_vocab, None, ValueError, r"`target`.*\[0, 7\)", id="target-out-of-vocab"),
        P(preds, negative, None, ValueError, "`target`", id="target-negative"),
        P(preds, negative, -100, ValueError, "`target`", id="target-negative-not-ignore-index"),
        P(nan, target, None, ValueError, "`preds`", id="nan-logit"),
        P(inf, target, None, ValueError, "`preds`", id="plus-inf-logit"),
        P(neg_inf_target, target, None, ValueError, "`preds`", id="minus-inf-target-log-prob"),
        P(half_nan, target, None, ValueError, "`preds`", id="nan-float16"),
        P(preds, torch.full_like(target, -100), -100, ValueError, "`ignore_index`", id="every-target-ignored"),
        P(preds, target, 1.5, TypeError, "`ignore_index`", id="ignore-index-float"),
        P(preds, target, "-100", TypeError, "`ignore_index`", id="ignore-index-str"),
        P(preds, target, True, TypeError, "`ignore_index`", id="ignore-index-bool"),
    ]


def _core_routes():
    def function(preds, target, ignore_index):
        return perplexity(preds, target, ignore_index=ignore_index)

    def update(preds, target, ignore_index):
        metric = Perplexity(ignore_index=ignore_index)
        metric.update(preds, target)
        return metric.compute()

    def forward(preds, target, ignore_index):
        return Perplexity(ignore_index=ignore_index)(preds, target)

    return [function, update, forward]


@pytest.mark.parametrize("route", _core_routes(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("preds, target, ignore_index, error, match", _core_cases())
def test_core_rejects_bad_input(route, preds, target, ignore_index, error, match):
    before = snapshot((preds, target))
    with pytest.raises(error, match=match):
        route(preds, target, ignore_index)
    assert_unchanged(before, (preds, target))


@pytest.mark.parametrize("preds, target, ignore_index, error, match",
                         [case for case in _core_cases() if not case.id.startswith("ignore-index")])
def test_core_state_survives_a_rejected_batch(preds, target, ignore_index, error, match):
    good_preds, good_target = batch(seed=1)
    metric = Perplexity(ignore_index=ignore_index)
    expected = metric(good_preds, good_target).item()
    # a batch that is all padding is fine to update() with (it adds nothing); forward() has no value to return
    all_padding = ignore_index is not None and isinstance(target, torch.Tensor) and bool((target == ignore_index).all())
    for call in (metric.forward,) if all_padding else (metric.update, metric.forward):
        with pytest.raises(error, match=match):
            call(preds, target)
    if all_padding:
        metric.update(preds, target)
    assert metric.compute().item() == pytest.approx(expected, rel=1e-12)


def test_core_class_rejects_bad_settings_and_empty_state():
    for bad in (1.5, "-100", True, torch.tensor(-100)):
        with pytest.raises(TypeError, match="`ignore_index`"):
            Perplexity(ignore_index=bad)
    metric = Perplexity()
    with pytest.raises(ValueError, match="No token was scored"):
        metric.compute()


# =======================================================================================
# The evaluate metric, default configuration
# =======================================================================================


@pytest.fixture(scope="module")
def metric_class():
    """The class `evaluate.load` builds (a copy in its module cache, relative imports)."""
    return type(evaluate.load(METRIC_PATH, keep_in_memory=True))


@pytest.fixture
def new_metric(metric_class):
    return lambda **kwargs: metric_class(keep_in_memory=True, **kwargs)


def _metric_cases():
    preds, target = batch(shape=(3, 6, 11))
    logprobs = -target_nll(preds, target)
    nan, pos, inf, neg_inf = (logprobs.clone() for _ in range(4))
    nan[0, 1] = math.nan
    pos[1, 2] = 0.25  # a probability passed as a log-probability
    inf[2, 0] = math.inf
    neg_inf[2, 3] = -math.inf
    full_nan = preds.clone()
    full_nan[2, 1, 3] = math.nan
    out_of_vocab, negative = target.clone(), target.clone()
    out_of_vocab[0, 2] = 11
    negative[1, 2] = -1
    P = pytest.param
    return [
        # types and containers
        P(None, target, TypeError, "`predictions`", id="predictions-None"),
        P(preds, None, TypeError, "`references`", id="references-None"),
        P("text", target, TypeError, "`predictions`", id="predictions-str"),
        P({"a": 1}, target, TypeError, "`predictions`", id="predictions-dict"),
        P((x for x in logprobs), target, TypeError, "`predictions`", id="predictions-generator"),
        P([["a", "b"]], [[1, 2]], TypeError, r"`predictions\[0\]`", id="predictions-strings"),
        P(np.array([["a", "b"]]), [[1, 2]], TypeError, "`predictions`", id="predictions-numpy-str"),
        P([[-0.5], [-0.5, -0.5]], [[1, 2]], ValueError, "`predictions`.*`references`", id="ragged-count-mismatch"),
        P([[-0.5, -0.5]], [["a", "b"]], TypeError, r"`references\[0\]`", id="references-strings"),
        P(logprobs, target.float(), TypeError, "`references`", id="references-float"),
        P(logprobs, target.bool(), TypeError, "`references`", id="references-bool"),
        P(logprobs.long(), target, TypeError, "`predictions`", id="predictions-int"),
        # shapes and lengths
        P(torch.tensor(-1.0), target, ValueError, "`predictions`", id="predictions-0d"),
        P(preds[None], target, ValueError, "`predictions`", id="predictions-4d"),
        P(preds, target[..., None], ValueError, "`references`", id="references-3d"),
        P([preds[0][None]], [target[0]], ValueError, r"`predictions\[0\]`", id="example-predictions-3d"),
        P([logprobs[0]], [target[:2]], ValueError, r"`references\[0\]`", id="example-references-2d"),
        P(list(logprobs), [target[0], target[1, :5], target[2]], ValueError,
          r"`predictions\[1\]` and `references\[1\]`", id="example-length-mismatch"),
        P(list(preds), list(target[:2]), ValueError, r"`predictions`.*`references`", id="example-count-mismatch"),
        P([], [], ValueError, "`predictions`", id="no-examples"),
        P(preds[:, :, :0], target, ValueError, r"`predictions\[0\]`", id="empty-vocab"),
        # values
        P(nan, target, ValueError, "`predictions`", id="nan-log-prob"),
        P(pos, target, ValueError, "`predictions`", id="positive-log-prob"),
        P(inf, target, ValueError, "`predictions`", id="plus-inf-log-prob"),
        P(neg_inf, target, ValueError, "`predictions`", id="minus-inf-log-prob"),
        P(full_nan, target, ValueError, r"`predictions\[2\]`", id="full-nan-logit"),
        P(preds, out_of_vocab, ValueError, r"`references\[0\]`.*\[0, 11\)", id="full-target-out-of-vocab"),
        P(logprobs, negative, ValueError, "`references`", id="compact-target-negative"),
        P(preds, negative, ValueError, r"`references\[1\]`", id="full-target-negative"),
    ]


@pytest.mark.parametrize("predictions, references, error, match", _metric_cases())
def test_metric_rejects_bad_batches(new_metric, predictions, references, error, match):
    before = snapshot((predictions, references)) if not inspect.isgenerator(predictions) else None
    with pytest.raises(error, match=match):
        new_metric().compute(predictions=predictions, references=references)
    with pytest.raises(error, match=match):
        new_metric().add_batch(predictions=predictions, references=references)
    if before is not None:
        assert_unchanged(before, (predictions, references))


def _example_cases():
    P = pytest.param
    return [
        P(None, [1, 2], TypeError, r"`predictions\[0\]`", id="prediction-None"),
        P([-0.5, -0.5], None, TypeError, r"`references\[0\]`", id="reference-None"),
        P("-0.5", [1], TypeError, r"`predictions\[0\]`", id="prediction-str"),
        P(-0.5, 1, ValueError, r"`references\[0\]`", id="scalars"),
        P([-0.5, -0.5], [1], ValueError, r"`predictions\[0\]` and `references\[0\]`", id="length-mismatch"),
        P([-0.5, math.nan], [1, 2], ValueError, "`predictions`", id="nan"),
        P([-0.5, 2.0], [1, 2], ValueError, "`predictions`", id="positive"),
        P([-0.5, -0.5], [1, -7], ValueError, "`references`", id="negative-reference"),
        P(np.zeros((2, 3)), [1, 3], ValueError, r"`references\[0\]`.*\[0, 3\)", id="full-out-of-vocab"),
    ]


@pytest.mark.parametrize("prediction, reference, error, match", _example_cases())
def test_metric_add_rejects_bad_examples(new_metric, prediction, reference, error, match):
    before = snapshot((prediction, reference))
    with pytest.raises(error, match=match):
        new_metric().add(prediction=prediction, reference=reference)
    assert_unchanged(before, (prediction, reference))


def test_metric_rejected_batch_adds_nothing(new_metric):
    preds, target = batch(shape=(3, 6, 11))
    expected = new_metric().compute(predictions=preds[:2], references=target[:2])
    metric = new_metric()
    metric.add_batch(predictions=preds[:2], references=target[:2])
    bad_target = target[2:].clone()
    bad_target[0, -1] = 11  # the last example of the batch is bad: nothing of the batch may stay
    with pytest.raises(ValueError, match="references"):
        metric.add_batch(predictions=torch.cat([preds[:2], preds[2:]]), references=torch.cat([target[:2], bad_target]))
    with pytest.raises(ValueError, match="predictions"):
        metric.add(prediction=[0.5] * 6, reference=target[2])
    assert metric.compute() == expected


@pytest.mark.parametrize("keep_in_memory", [False, True], ids=["on-disk", "in-memory"])
def test_metric_failed_compute_leaves_no_data_behind(metric_class, tmp_path, keep_in_memory):
    metric = metric_class(keep_in_memory=keep_in_memory, cache_dir=str(tmp_path))
    metric.add_batch(predictions=[[-1.0, -2.0]], references=[[1, -100]])
    with pytest.raises(ValueError, match="bootstrap_resamples"):  # fails inside _compute, after the data is read
        metric.compute(bootstrap_resamples=0)
    fresh = metric.compute(predictions=[[-3.0]], references=[[4]])
    assert fresh["num_tokens"] == 1 and fresh["perplexity"] == pytest.approx(math.exp(3.0))


@pytest.mark.parametrize(
    "keep_in_memory",
    [False, True],
    ids=["on-disk", "in-memory"],
)
def test_metric_compute_with_nothing_added(metric_class, tmp_path, keep_in_memory):
    metric = metric_class(keep_in_memory=keep_in_memory, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="add"):
        metric.compute()


@pytest.mark.parametrize("settings, error, match", [
    ({"ignore_index": 1.5}, TypeError, "`ignore_index`"),
    ({"ignore_index": "pad"}, TypeError, "`ignore_index`"),
    ({"ignore_indx": 0}, TypeError, "ignore_indx"),
])
def test_metric_rejects_bad_load_settings(settings, error, match):
    with pytest.raises(error, match=match):
        evaluate.load(METRIC_PATH, keep_in_memory=True, **settings)


def test_metric_rejects_bad_compute_settings(new_metric):
    good = {"predictions": [[-1.0, -2.0]], "references": [[1, 2]]}
    with pytest.raises(TypeError, match="`ignore_index`"):
        new_metric().compute(**good, ignore_index="pad")
    with pytest.raises(TypeError, match="model"):
        new_metric().compute(**good, model="gpt2")
    with pytest.raises(ValueError, match="config_name"):
        evaluate.load(METRIC_PATH, "texts", keep_in_memory=True)




@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), ("100", TypeError), (2.5, TypeError)])
def test_metric_rejects_bad_bootstrap_resamples(new_metric, value, error):
    good = {"predictions": [[-1.0, -2.0]], "references": [[1, 2]]}
    with pytest.raises(error, match="`bootstrap_resamples`"):
        new_metric().compute(**good, bootstrap_resamples=value)
    with pytest.raises(error, match="`bootstrap_resamples`"):
        new_metric(bootstrap_resamples=value).compute(**good)


def test_metric_empty_example_has_no_perplexity(new_metric):
    result = new_metric().compute(predictions=[[], [-1.0, -2.0]], references=[[], [1, 2]])
    assert result["perplexities"][0] is None and result["num_tokens"] == 2


# =======================================================================================
# Tiny model helpers
# =======================================================================================


def bare_tokenizer(tokenizer):
    """The tiny BPE without any special token: no pad, no BOS, no EOS."""
    return type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer)


def word_tokenizer():
    """A word-level tokenizer: whitespace-only text tokenizes to nothing; BOS '<s>' (id 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "the": 2, "cat": 3, "sat": 4, "on": 5, "mat": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")


def model_fingerprint(model):
    return (model.training, sum(float(p.detach().double().sum()) for p in model.parameters()))


def tokenizer_fingerprint(tokenizer):
    return (tokenizer.padding_side, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, len(tokenizer))


# =======================================================================================
# Runner: `score_texts`, `evaluate_texts`
# =======================================================================================


def _runner_cases():
    P = pytest.param
    return [
        # texts
        P(None, {}, TypeError, "`texts`", id="texts-None"),
        P(5, {}, TypeError, "`texts`", id="texts-int"),
        P("one string", {}, TypeError, "list of strings", id="texts-single-string"),
        P(["fine", b"bytes"], {}, TypeError, r"`texts\[1\]`", id="text-bytes"),
        P(["fine", None], {}, TypeError, r"`texts\[1\]`", id="text-None"),
        P(["fine", ""], {}, ValueError, r"`texts\[1\]`", id="text-empty"),
        P(["x"], {"add_start_token": False}, ValueError, r"`texts\[0\]`.*no start token", id="one-token-no-start-token"),
        P(["fine", "a \ud800 b"], {}, ValueError, r"`texts\[1\]`.*lone surrogate \(U\+D800\) at character 2", id="lone-surrogate"),
        # windows
        P(TEXTS, {"max_length": 8, "stride": 9}, ValueError, "`stride`", id="stride-over-max-length"),
        P(TEXTS, {"stride": 300}, ValueError, "`stride`", id="stride-over-default-max-length"),
        P(TEXTS, {"max_length": 8, "stride": 0}, ValueError, "`stride`", id="stride-zero"),
        P(TEXTS, {"max_length": 8, "stride": -2}, ValueError, "`stride`", id="stride-negative"),
        P(TEXTS, {"max_length": 0}, ValueError, "`max_length`", id="max-length-zero"),
        P(TEXTS, {"max_length": -8}, ValueError, "`max_length`", id="max-length-negative"),
        P(TEXTS, {"max_length": 257}, ValueError, "`max_length`.*context", id="max-length-over-context"),
        P(TEXTS, {"batch_size": 0}, ValueError, "`batch_size`", id="batch-size-zero"),
        P(TEXTS, {"padding_side": "middle"}, ValueError, "`padding_side`", id="padding-side"),
        P(TEXTS, {"max_batch_tokens": 0}, ValueError, "`max_batch_tokens`", id="max-batch-tokens-zero"),
        P(TEXTS, {"max_batch_tokens": -5}, ValueError, "`max_batch_tokens`", id="max-batch-tokens-negative"),
        P(TEXTS, {"max_batch_tokens": "64"}, TypeError, "`max_batch_tokens`", id="max-batch-tokens-str"),
        # wrong types: TypeError, not ValueError
        P(TEXTS, {"max_length": "8"}, TypeError, "`max_length`", id="max-length-str"),
        P(TEXTS, {"max_length": 8.0}, TypeError, "`max_length`", id="max-length-float"),
        P(TEXTS, {"max_length": 8, "stride": "4"}, TypeError, "`stride`", id="stride-str"),
        P(TEXTS, {"batch_size": "2"}, TypeError, "`batch_size`", id="batch-size-str"),
        P(TEXTS, {"foo": 1}, TypeError, "foo", id="unknown-option"),
    ]


def _runner_routes():
    def score(model, tokenizer, texts, **kwargs):
        return list(score_texts(model, tokenizer, texts, progress=False, **kwargs))

    def pooled(model, tokenizer, texts, **kwargs):
        return evaluate_texts(model, tokenizer, texts, progress=False, bootstrap_resamples=10, **kwargs)

    return [score, pooled]


@pytest.mark.parametrize("route", _runner_routes(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("texts, kwargs, error, match", _runner_cases())
def test_runner_rejects_bad_input(tiny, route, texts, kwargs, error, match):
    model, tokenizer = tiny
    before = snapshot(texts)
    fingerprints = model_fingerprint(model), tokenizer_fingerprint(tokenizer)
    with pytest.raises(error, match=match):
        route(model, tokenizer, texts, **kwargs)
    assert_unchanged(before, texts)
    assert (model_fingerprint(model), tokenizer_fingerprint(tokenizer)) == fingerprints


@pytest.mark.parametrize("route", _runner_routes(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("which, replacement", [
    pytest.param("model", None, id="model-None"),
    pytest.param("model", "gpt2", id="model-id-as-model"),
    pytest.param("tokenizer", None, id="tokenizer-None"),
    pytest.param("tokenizer", "gpt2", id="tokenizer-id-as-tokenizer"),
])
def test_runner_rejects_objects_that_are_not_loaded(tiny, route, which, replacement):
    objects = dict(zip(("model", "tokenizer"), tiny))
    objects[which] = replacement
    with pytest.raises(TypeError, match=f"`{which}`"):
        route(objects["model"], objects["tokenizer"], TEXTS)


def test_runner_empty_corpus(tiny):
    model, tokenizer = tiny
    assert list(score_texts(model, tokenizer, [], progress=False)) == []  # a stream may be empty
    with pytest.raises(ValueError, match="at least one text in `texts`"):
        evaluate_texts(model, tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="at least one text in `texts`"):
        evaluate_texts(model, tokenizer, iter([]), progress=False)


def test_runner_text_that_tokenizes_to_nothing(tiny):
    model, _ = tiny
    words = word_tokenizer()
    texts = ["the cat sat on the mat", " \t\n  "]
    assert words(texts[1], add_special_tokens=False)["input_ids"] == []
    before = snapshot(texts)
    for route in _runner_routes():
        with pytest.raises(ValueError, match=r"`texts\[1\]`.*(0 token|only whitespace)"):
            route(model, words, texts)
    assert_unchanged(before, texts)
    assert evaluate_texts(model, words, texts[:1], progress=False)["num_tokens"] == 6  # real text works


def test_runner_tokenizer_without_special_tokens(tiny):
    model, tokenizer = tiny
    bare = bare_tokenizer(tokenizer)
    assert (bare.pad_token_id, bare.bos_token_id, bare.eos_token_id) == (None, None, None)
    for route in _runner_routes():
        with pytest.raises(ValueError, match="neither a BOS nor an EOS.*`add_start_token=False`"):
            route(model, bare, TEXTS)
    # without a start token it runs, and the missing pad token changes nothing
    one = evaluate_texts(model, bare, TEXTS, add_start_token=False, batch_size=1, max_length=8, progress=False)
    many = evaluate_texts(model, bare, TEXTS, add_start_token=False, batch_size=3, max_length=8, progress=False)
    assert many["num_tokens"] == one["num_tokens"] == sum(len(bare(t)["input_ids"]) - 1 for t in TEXTS)
    assert many["perplexities"] == pytest.approx(one["perplexities"], rel=1e-5)
    assert tokenizer_fingerprint(bare)[1:] == (None, None, None, len(bare))


def test_runner_rejects_bad_bootstrap_resamples(tiny):
    with pytest.raises(ValueError, match="`bootstrap_resamples`"):
        evaluate_texts(*tiny, TEXTS, bootstrap_resamples=0, progress=False)


# =======================================================================================
# The evaluate metric, "text" configuration
# =======================================================================================


@pytest.fixture
def text_metric(metric_class):
    return metric_class(config_name="text", keep_in_memory=True)


def _text_cases():
    P = pytest.param
    return [
        P([], {}, ValueError, r"`texts`|`predictions`", id="no-texts"),
        P(["fine", ""], {}, ValueError, r"`texts\[1\]`|`predictions\[1\]`", id="empty-text"),
        P(["fine", None], {}, TypeError, r"`texts\[1\]`|`predictions\[1\]`", id="None-text"),
        P(["fine", "a \udfff"], {}, ValueError, r"`predictions\[1\]`.*lone surrogate \(U\+DFFF\) at character 2", id="lone-surrogate"),
        P([5, 6], {}, (TypeError, ValueError), "predictions", id="int-texts"),
        P([b"bytes"], {}, (TypeError, ValueError), "predictions", id="bytes-text"),
        P(TEXTS, {"max_length": 8, "stride": 9}, ValueError, "`stride`", id="stride-over-max-length"),
        P(TEXTS, {"stride": 0}, ValueError, "`stride`", id="stride-zero"),
        P(TEXTS, {"max_length": 1024}, ValueError, "`max_length`.*context", id="max-length-over-context"),
        P(TEXTS, {"batch_size": -1}, ValueError, "`batch_size`", id="batch-size-negative"),
        P(TEXTS, {"fooo": 1}, TypeError, "fooo", id="unknown-option"),
        P("one single text", {}, TypeError, "`predictions`", id="single-string"),
    ]


@pytest.mark.parametrize("texts, kwargs, error, match", _text_cases())
def test_text_mode_rejects_bad_input(tiny, text_metric, texts, kwargs, error, match):
    model, tokenizer = tiny
    before = snapshot(texts)
    with pytest.raises(error, match=match):
        text_metric.compute(predictions=texts, model=model, tokenizer=tokenizer, **kwargs)
    assert_unchanged(before, texts)


def test_text_mode_tokenizer_without_start_token(tiny, text_metric):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="add_start_token=False"):
        text_metric.compute(predictions=TEXTS, model=model, tokenizer=bare_tokenizer(tokenizer))


def test_text_mode_model_without_tokenizer(tiny, text_metric):
    with pytest.raises(ValueError, match="`tokenizer`"):
        text_metric.compute(predictions=TEXTS, model=tiny[0])


@pytest.fixture
def no_model_loading(text_metric, monkeypatch):
    """Replace `load_model` in the loaded metric's module: a call is recorded and refused."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise RuntimeError("load_model must not be called here")

    monkeypatch.setattr(sys.modules[type(text_metric).__module__], "load_model", refuse)
    return calls


def test_text_mode_tokenizer_without_model(tiny, text_metric, no_model_loading):
    with pytest.raises(ValueError, match="`model`"):
        text_metric.compute(predictions=TEXTS, tokenizer=tiny[1])
    assert no_model_loading == []


def test_text_mode_model_id_passed_as_model(tiny, text_metric, no_model_loading):
    with pytest.raises(TypeError, match="`model`"):
        text_metric.compute(predictions=TEXTS, model="gpt2", tokenizer=tiny[1])


def test_text_mode_rejects_references(tiny, text_metric):
    with pytest.raises(TypeError, match="`references`"):
        text_metric.compute(predictions=TEXTS, references=TEXTS, model=tiny[0], tokenizer=tiny[1])


def test_text_mode_failed_compute_leaves_no_data_behind(tiny, text_metric):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="`stride`"):
        text_metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, max_length=8, stride=0)
    result = text_metric.compute(predictions=TEXTS[:1], model=model, tokenizer=tokenizer, max_length=8)
    assert result["num_documents"] == 1


def test_text_mode_unknown_model_id_offline(text_metric, offline, connections):
    with pytest.raises(ValueError, match="Could not load model 'no-such-owner/no-such-model-4f1c'"):
        text_metric.compute(predictions=TEXTS, model_id="no-such-owner/no-such-model-4f1c")
    assert connections == []  # offline: refused without trying the network


# =======================================================================================
# Model loading: `load_model`
# =======================================================================================


@pytest.fixture(scope="module")
def offline():
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set in this process")


@pytest.fixture
def connections(monkeypatch):
    """Every host this process looks up or connects to during the test (both recorded, then done)."""
    import socket

    tried = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def recorded_connect(sock, address):
        tried.append(address)
        return connect(sock, address)

    def recorded_lookup(host, *args, **kwargs):
        tried.append(host)
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", recorded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", recorded_lookup)
    return tried


@pytest.fixture(scope="module")
def model_dirs(tiny, tmp_path_factory):
    """The tiny model saved to a folder, and two folders whose config asks for remote code:
    `remote-absent` names a module file that does not exist, `remote-present` ships one that
    would write `EXECUTED` next to it on import."""
    root = tmp_path_factory.mktemp("models")
    tiny_dir = root / "tiny"
    tiny[0].save_pretrained(tiny_dir)
    tiny[1].save_pretrained(tiny_dir)
    config = {
        "model_type": "remote-only-arch",
        "architectures": ["RemoteOnlyForCausalLM"],
        "auto_map": {"AutoConfig": "remote_arch.RemoteOnlyConfig", "AutoModelForCausalLM": "remote_arch.RemoteOnlyForCausalLM"},
    }
    dirs = {"tiny": tiny_dir}
    for name in ("remote-absent", "remote-present"):
        folder = root / name
        tiny[1].save_pretrained(folder)
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        dirs[name] = folder
    (dirs["remote-present"] / "remote_arch.py").write_text(
        f"open({str(dirs['remote-present'] / 'EXECUTED')!r}, 'w').close()\nraise SystemExit('remote code ran')\n",
        encoding="utf-8",
    )
    return dirs


def test_load_model_keeps_remote_code_off_by_default():
    parameter = inspect.signature(load_model).parameters["trust_remote_code"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is False


@pytest.mark.parametrize("folder", ["remote-absent", "remote-present"])
def test_load_model_refuses_remote_code(model_dirs, offline, folder):
    with pytest.raises(ValueError, match=r"Could not load model .*(trust_remote_code|custom code)"):
        load_model(str(model_dirs[folder]), device="cpu")
    assert not (model_dirs[folder] / "EXECUTED").exists()


@pytest.mark.parametrize("value", ["false", "no", "0"])
def test_load_model_trust_remote_code_must_be_a_bool(model_dirs, offline, value):
    with pytest.raises(TypeError, match="`trust_remote_code`"):
        load_model(str(model_dirs["remote-absent"]), device="cpu", trust_remote_code=value)


def test_load_model_unknown_model_id_offline_fails_without_network(offline, connections):
    with pytest.raises(ValueError, match="Could not load model 'no-such-owner/no-such-model-4f1c'"):
        load_model("no-such-owner/no-such-model-4f1c", device="cpu")
    assert connections == []


@pytest.mark.parametrize("model_id, kwargs, match", [
    ("MISSING", {}, "Could not load model '.*missing-folder'"),
    ("EMPTY", {}, "Could not load model '.*empty-folder'"),
    ("TINY", {"gguf_file": "absent.gguf"}, "Could not load model '.*tiny/absent.gguf': .*absent.gguf"),
    ("TINY", {"device": "tpu9"}, "`device`.*'tpu9'"),
    ("TINY", {"dtype": "int8"}, "`dtype`.*'int8'"),
])
def test_load_model_rejects_bad_input(model_dirs, tmp_path, offline, model_id, kwargs, match):
    (tmp_path / "empty-folder").mkdir()
    model_id = {"MISSING": str(tmp_path / "missing-folder"), "EMPTY": str(tmp_path / "empty-folder"),
                "TINY": str(model_dirs["tiny"])}[model_id]
    with pytest.raises(ValueError, match=match):
        load_model(model_id, device=kwargs.pop("device", "cpu"), **kwargs)


# =======================================================================================
# Corpora: `read_corpus`
# =======================================================================================


def _write_parquet(path, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: ["first text", "second text"]}), path)


CORPUS_FILES = {
    "bad.json": '[{"text": "a"}, ',
    "object.json": '{"text": "a single object"}',
    "numbers.json": "[1, 2, 3]",
    "empty-list.json": "[]",
    "non-object-line.jsonl": '{"text": "fine"}\n["a", "list"]\n',
    "number-line.jsonl": '{"text": "fine"}\n42\n',
    "bad-line.jsonl": '{"text": "fine"}\n{"text": \n',
    "missing-field.jsonl": '{"body": "no text field"}\n',
    "null-field.jsonl": '{"text": null}\n',
    "empty.jsonl": "",
    "binary.txt": b"\xff\xfe\x00\x81 not utf-8 \xc3\x28",
    "empty.txt": "",
    "blank.txt": "\n\n   \n\t\n",
    "missing-column.csv": "body\nsome text\n",
    "header-only.csv": "text\n",
    "empty.csv": "",
    "missing-column.parquet": None,  # written by _write_parquet
    "garbage.parquet": b"PAR1 this is not parquet",
}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    for name, content in CORPUS_FILES.items():
        path = root / name
        if content is None:
            _write_parquet(path, "body")
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    (root / "folder.txt").mkdir()
    (root / "folder").mkdir()
    (root / "good.txt").write_text("\n\n".join(TEXTS) + "\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("name, match", [
    ("bad.json", "Could not read corpus '.*bad.json'"),
    ("object.json", "JSON list"),
    ("numbers.json", "item 0 has no string field 'text'"),
    ("empty-list.json", "holds no text"),
    ("non-object-line.jsonl", "item 1 has no string field 'text'"),
    ("number-line.jsonl", "item 1 has no string field 'text'"),
    ("bad-line.jsonl", "Could not read corpus '.*bad-line.jsonl'"),
    ("missing-field.jsonl", "item 0 has no field .text. \\(the --text-field"),  # a wrong field, said at once
    ("null-field.jsonl", "holds no text"),
    ("empty.jsonl", "holds no text"),
    ("binary.txt", "Could not read corpus '.*binary.txt'.*utf-8"),
    ("empty.txt", "holds no text"),
    ("blank.txt", "holds no text"),
    ("missing-column.csv", "no column 'text'"),
    ("missing-column.parquet", "no column 'text'"),
    ("garbage.parquet", "Could not read corpus '.*garbage.parquet'"),
    ("header-only.csv", "header-only.csv"),
    pytest.param("empty.csv", "Could not read corpus '.*empty.csv'"),
    ("folder.txt", "folder.txt"),
    ("folder", "folder"),
    ("missing.txt", "not found.*missing.txt"),
])
def test_read_corpus_rejects_bad_files(corpus_dir, name, match):
    with pytest.raises(ValueError, match=match):
        read_corpus(str(corpus_dir / name))


def test_read_corpus_rejects_a_missing_text_field_by_name(corpus_dir):
    with pytest.raises(ValueError, match="no column 'content'"):
        read_corpus(str(corpus_dir / "missing-column.csv"), text_field="content")
    assert read_corpus(str(corpus_dir / "missing-column.csv"), text_field="body") == ["some text"]


@pytest.mark.parametrize("name, content", [
    ("locked.txt", "some text\n"),
    ("locked.jsonl", '{"text": "some text"}\n'),
    ("locked.csv", "text\nsome text\n"),
])
def test_read_corpus_unreadable_file_is_named(tmp_path, monkeypatch, name, content):
    # CI runs as root, which reads a file whatever its mode: the readers' open() fails here as
    # it does for a user without read permission, with the same PermissionError
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    builtin_open, denials = open, []

    def denied(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            denials.append(file)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return builtin_open(file, *args, **kwargs)

    monkeypatch.setattr(ppl_corpus, "open", denied, raising=False)  # the module's global shadows the builtin
    with pytest.raises(ValueError) as error:
        read_corpus(str(path))
    assert str(error.value) == f"Could not read corpus {str(path)!r}: [Errno 13] Permission denied: {str(path)!r}"
    assert len(denials) == 1
    monkeypatch.undo()
    assert read_corpus(str(path)) == ["some text"]  # readable, it is read: the denial alone failed it


def test_read_corpus_unknown_data_set_offline(offline):
    with pytest.raises(ValueError, match="Could not load corpus 'no-such-owner/no-such-dataset-4f1c'"):
        read_corpus("no-such-owner/no-such-dataset-4f1c")


@pytest.mark.parametrize("source", [5, ["a.txt"]])
def test_read_corpus_rejects_a_source_of_the_wrong_type(source):
    with pytest.raises(TypeError, match="`source`"):
        read_corpus(source)


# =======================================================================================
# Command line: one `error:` line, exit status 2, no traceback
# =======================================================================================


# Cases run by a real `python ppl_cli.py` (a few, since each costs seconds of imports); every
# case also runs in-process through `ppl_cli.main`, which is what the subprocess executes.
IN_SUBPROCESS = {"bad-json", "csv-empty", "unknown-model-offline", "remote-code-refused", "stride-zero",
                 "argparse-not-an-int"}


def _cli_cases(subprocess_only=False):
    P = pytest.param
    corpus = ["--corpus", "CORPUS/good.txt"]
    tiny = ["--model", "MODELS/tiny", "--device", "cpu"] + corpus
    cases = [
        P(["--corpus", "CORPUS/bad.json"], "Could not read corpus", id="bad-json"),
        P(["--corpus", "CORPUS/non-object-line.jsonl", "--bad-rows", "fail"], r"Expected document 1 \(id '1'\) to be a string",
          id="jsonl-non-object-line"),
        P(["--corpus", "CORPUS/binary.txt"], "utf-8", id="binary-txt"),
        P(["--corpus", "CORPUS/missing-column.csv"], "no column 'text'", id="csv-missing-column"),
        P(["--corpus", "CORPUS/missing-column.parquet"], "no column 'text'", id="parquet-missing-column"),
        P(["--corpus", "CORPUS/empty.csv"], "Could not read corpus", id="csv-empty"),
        P(["--corpus", "CORPUS/folder"], "folder", id="directory-as-corpus"),
        P(["--corpus", "CORPUS/blank.txt"], "holds no text", id="blank-corpus"),
        P(["--corpus", "CORPUS/good.txt", "--limit", "-1"], "--limit", id="negative-limit"),
        P(["--model", "no-such-owner/no-such-model-4f1c", "--limit", "1"],
          "Could not load model 'no-such-owner/no-such-model-4f1c'", id="unknown-model-offline"),
        P(["--model", "MODELS/remote-absent", "--device", "cpu"] + corpus, "trust_remote_code|custom code",
          id="remote-code-refused"),
        P(tiny + ["--stride", "0"], "`stride`", id="stride-zero"),
        P(tiny + ["--max-length", "8", "--stride", "9"], "`stride`", id="stride-over-max-length"),
        P(tiny + ["--max-length", "100000"], "`max_length`.*context", id="max-length-over-context"),
        P(tiny + ["--max-length", "0"], "`max_length`", id="max-length-zero"),
        P(tiny + ["--batch-size", "0"], "`batch_size`", id="batch-size-zero"),
        P(tiny + ["--dtype", "int8"], "`dtype`", id="bad-dtype"),
        P(tiny + ["--device", "tpu9"], "`device`", id="bad-device"),
        P(["--max-length", "abc"], "--max-length", id="argparse-not-an-int"),
    ]
    return [case for case in cases if case.id in IN_SUBPROCESS] if subprocess_only else cases


@pytest.fixture(scope="module")
def cli_paths(model_dirs, corpus_dir):
    """Turns the placeholders CORPUS and MODELS in a case's arguments into real paths."""
    models_root = model_dirs["tiny"].parent
    return lambda args: [a.replace("CORPUS", str(corpus_dir)).replace("MODELS", str(models_root)) for a in args]


def assert_one_error_line(stderr, match, from_argparse=False):
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr[-3000:]
    if not from_argparse:  # argparse writes its usage, then "ppl_cli.py: error: ..."
        assert errors[0].startswith("error: ")
    assert re.search(match, errors[0]), errors[0]


@pytest.mark.parametrize("args, match", _cli_cases())
def test_cli_main_bad_input_is_one_error_line(cli_paths, capsys, request, model_dirs, args, match):
    from_argparse = request.node.callspec.id == "argparse-not-an-int"
    try:
        status = ppl_cli.main(cli_paths(args) + ["--quiet"])
    except SystemExit as exit_:  # argparse exits by itself
        assert from_argparse
        status = exit_.code
    assert status == 2
    assert_one_error_line(capsys.readouterr().err, match, from_argparse)
    assert not (model_dirs["remote-absent"] / "EXECUTED").exists()


@pytest.fixture(scope="module")
def cli_runs(cli_paths):
    """The subprocess cases, run as `python ppl_cli.py ...`, two at a time."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    def run(case):
        command = [sys.executable, str(ROOT / "ppl_cli.py"), *cli_paths(case.values[0]), "--quiet"]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    cases = _cli_cases(subprocess_only=True)
    with ThreadPoolExecutor(2) as pool:
        return dict(zip((case.id for case in cases), pool.map(run, cases)))


@pytest.mark.parametrize("args, match", _cli_cases(subprocess_only=True))
def test_cli_subprocess_bad_input_is_one_error_line(cli_runs, request, model_dirs, args, match):
    case = request.node.callspec.id
    proc = cli_runs[case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_error_line(proc.stderr, match, from_argparse=case == "argparse-not-an-int")
    assert not (model_dirs["remote-absent"] / "EXECUTED").exists()


# =======================================================================================
# App: plain handlers
# =======================================================================================


@pytest.fixture
def recorded_loads(tiny, monkeypatch):
    """`app.load_model` replaced: records what the app asked for, and never loads anything."""
    calls = []

    def record(model_id=None, **kwargs):
        calls.append(model_id)
        return tiny

    monkeypatch.setattr(app, "load_model", record)
    return calls


def test_app_refuses_local_paths_and_unlisted_models(tiny, model_dirs, recorded_loads, tmp_path, monkeypatch):
    models = app.Models(*tiny, allowed=["owner/listed"])
    app.compute_text(models, TEXTS[0], "owner/listed")  # listed: the app asks load_model for it
    refused = [str(model_dirs["tiny"]), str(model_dirs["remote-absent"]), "/etc", "../owner/listed", "owner/unlisted",
               "./owner/listed", "owner/listed/../../etc"]
    for choice in refused:
        with pytest.raises(gr.Error, match="not offered by this Space"):
            app.compute_text(models, TEXTS[0], choice)
    # a listed id that also exists as a folder under the working directory is a path, so refused
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "listed").mkdir(parents=True)
    with pytest.raises(gr.Error, match="not offered by this Space"):
        app.compute_text(models, TEXTS[0], "owner/listed")
    with pytest.raises(ValueError, match="not a Hub model id"):
        app.allowed_models("owner/listed")
    assert recorded_loads == ["owner/listed"]  # nothing refused was ever loaded


def test_app_bounds_the_text(tiny, monkeypatch):
    scored = []
    monkeypatch.setattr(app, "score_text", lambda *a, **k: scored.append(a) or pytest.fail("scored"))
    models = app.Models(*tiny)
    assert 0 < app.DEFAULT_MAX_CHARS < 10**6
    with pytest.raises(gr.Error, match=f"has {app.DEFAULT_MAX_CHARS + 1} characters.*at most {app.DEFAULT_MAX_CHARS}"):
        app.compute_text(models, "a" * (app.DEFAULT_MAX_CHARS + 1))
    with pytest.raises(gr.Error, match="has 11 characters; this Space scores at most 10"):
        app.compute_text(models, "b" * 11, max_chars=10)
    for empty in ("", "  \n\t", None, 5):
        with pytest.raises(gr.Error, match="Enter a text"):
            app.compute_text(models, empty)
    with pytest.raises(gr.Error, match="takes at most 10"):
        app.compute_logprobs('{"predictions": [[-1.0]], "references": [[1]]}', max_chars=10)
    assert scored == []


@pytest.mark.parametrize("field, value, match", [
    ("max_length", 8.5, "`max_length`.*whole number"),
    ("max_length", True, "`max_length`.*whole number"),
    ("max_length", -8, "`max_length`"),
    ("max_length", 257, "`max_length`.*context"),
    ("stride", 9, "`stride`"),
    ("stride", -3, "`stride`"),
    pytest.param("max_length", "abc", "`max_length`"),
    pytest.param("max_length", math.nan, "`max_length`"),
    pytest.param("max_length", math.inf, "`max_length`"),
    pytest.param("stride", [4], "`stride`"),
])
def test_app_text_handler_rejects_bad_numbers(tiny, field, value, match):
    options = {"max_length": 8, "stride": 4}
    options[field] = value
    with pytest.raises(gr.Error, match=match):
        app.compute_text(app.Models(*tiny), TEXTS[0], None, options["max_length"], options["stride"], True)


def test_app_text_handler_tokenizer_without_start_token(tiny):
    models = app.Models(tiny[0], bare_tokenizer(tiny[1]))
    with pytest.raises(gr.Error, match="add_start_token=False"):
        app.compute_text(models, TEXTS[0])
    assert app.compute_text(models, TEXTS[0], None, 0, 0, False)[3]["num_tokens"] > 0


@pytest.mark.parametrize("payload, ignore_index, match", [
    ("{predictions: [", -100, "not valid JSON"),
    ("[1, 2]", -100, "Expected a JSON object"),
    ('{"predictions": [[-1.0]]}', -100, "Expected a JSON object"),
    (None, -100, "Expected a JSON object"),
    ('{"predictions": [], "references": []}', -100, "`predictions`"),
    ('{"predictions": "abc", "references": "x"}', -100, "`predictions`"),
    ('{"predictions": [[-1.0, -2.0]], "references": [[1]]}', -100, r"`predictions\[0\]` and `references\[0\]`"),
    ('{"predictions": [[-1.0]], "references": [[1], [2]]}', -100, "`predictions`.*`references`"),
    ('{"predictions": [[NaN]], "references": [[1]]}', -100, "finite.*`predictions`"),
    ('{"predictions": [[-Infinity]], "references": [[1]]}', -100, "finite.*`predictions`"),
    ('{"predictions": [[0.5]], "references": [[1]]}', -100, "<= 0.*`predictions`"),
    ('{"predictions": [[-1.0]], "references": [[-1]]}', -100, "`references`"),
    ('{"predictions": [[[0.1, 0.2]]], "references": [[2]]}', -100, r"`references\[0\]`.*\[0, 2\)"),
    ('{"predictions": [[-1.0]], "references": [[-100]]}', -100, "`ignore_index`"),
    ('{"predictions": [[-1.0]], "references": [[1]]}', 1.5, "`ignore_index`.*whole number"),
    pytest.param('{"predictions": [[-1.0]], "references": [[1]]}', "abc", "`ignore_index`"),
])
def test_app_logprobs_handler_rejects_bad_payloads(payload, ignore_index, match):
    with pytest.raises(gr.Error, match=match):
        app.compute_logprobs(payload, ignore_index)


def test_app_logprobs_handler_leaves_a_parsed_payload_alone():
    payload = {"predictions": [[-1.0, -2.0], [-0.5]], "references": [[1, 2], [3]]}
    before = snapshot(payload)
    app.compute_logprobs(payload)
    bad = {"predictions": [[-1.0, 2.0]], "references": [[1, 2]]}
    bad_before = snapshot(bad)
    with pytest.raises(gr.Error, match="<= 0"):
        app.compute_logprobs(bad)
    assert_unchanged(before, payload)
    assert_unchanged(bad_before, bad)


def test_app_upload_rejects_bad_files(tmp_path):
    path = tmp_path / "upload.txt"
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(gr.Error, match="not UTF-8"):
        app.read_upload(str(path))
    path.write_text("z" * 41, encoding="utf-8")
    with pytest.raises(gr.Error, match="limit of 10 characters"):
        app.read_upload(str(path), max_chars=10)
    path.write_text(" \n ", encoding="utf-8")
    with pytest.raises(gr.Error, match="Enter a text"):
        app.read_upload(str(path))
