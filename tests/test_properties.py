"""Hypothesis properties of the metric, each against an independent reference.

- agreement with a float64 `exp(F.cross_entropy(...))` for random logits, targets, ignore
  masks and `ignore_index` values, whatever the input dtype, memory layout, chunk size and
  number of worker threads of the core;
- batch-split invariance of the corpus value (core `Perplexity` split over batch and
  sequence at once, fed by `update` and `forward`; the evaluate metric fed by `add`,
  `add_batch` and `compute(predictions=...)`, full distributions and log-probs mixed);
- permutation invariance: examples shuffled give the same corpus value, and the
  per-example values shuffled the same way;
- the model runner: per-text values do not depend on batch size, packing budget or padding
  side (checked against batch_size=1).

The window plan's "every target scored once, with at least max_length - stride tokens of
context" is a property test in test_runner.py already and is not repeated here.
"""

import contextlib
import math

import evaluate
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ppl_core
from conftest import ROOT, reference_ppl
from ppl_core import perplexity, target_nll
from ppl_torchmetrics import Perplexity
from ppl_runner import score_texts

METRIC_PATH = str(ROOT / "perplexity_metric.py")
MANY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """Tiny ops on 2 OpenMP threads cost ~10 ms each when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def core_chunking(elements_per_call, threads):
    """Run the core with another chunk size and worker-thread count, then restore both."""
    saved = ppl_core._ELEMENTS_PER_CALL, torch.get_num_threads()
    ppl_core._ELEMENTS_PER_CALL = elements_per_call
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        ppl_core._ELEMENTS_PER_CALL = saved[0]
        torch.set_num_threads(saved[1])


def random_batch(seed, shape, *, scale=3.0, ignore_index=None, ignore_fraction=0.3, dtype=torch.float32, shifted=False):
    """Logits `shape` (a non-contiguous view when `shifted`, like `logits[:, :-1]`) and targets;
    about `ignore_fraction` of the targets set to `ignore_index` (if any)."""
    gen = torch.Generator().manual_seed(seed)
    batch, seq_len, vocab = shape
    full = torch.randn(batch, seq_len + int(shifted), vocab, generator=gen, dtype=torch.float64) * scale
    preds = full.to(dtype)[:, :seq_len]
    target = torch.randint(vocab, (batch, seq_len), generator=gen)
    if ignore_index is not None:
        target[torch.rand(batch, seq_len, generator=gen) < ignore_fraction] = ignore_index
    return preds, target


shapes = st.tuples(st.integers(1, 5), st.integers(1, 7), st.integers(2, 12))
ignore_indices = st.sampled_from([None, -100, -1, 0, 1])


# ---------------------------------------------------------------------------------------
# Agreement with the float64 reference
# ---------------------------------------------------------------------------------------

TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


@MANY
@given(
    shape=shapes,
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from(list(TOLERANCE)),
    ignore_index=ignore_indices,
    ignore_fraction=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    scale=st.floats(0.01, 10.0),
    shifted=st.booleans(),
    elements_per_call=st.sampled_from([1, 5, 64, 1 << 20]),
    threads=st.sampled_from([1, 2]),
)
def test_core_agrees_with_float64_reference(shape, seed, dtype, ignore_index, ignore_fraction, scale, shifted,
                                            elements_per_call, threads):
    preds, target = random_batch(seed, shape, scale=scale, ignore_index=ignore_index,
                                 ignore_fraction=ignore_fraction, dtype=dtype, shifted=shifted)
    before = preds.clone(), target.clone()
    expected = reference_ppl(preds, target, ignore_index)
    with core_chunking(elements_per_call, threads):
        if math.isnan(expected):  # every target ignored: an error, never NaN
            with pytest.raises(ValueError, match="`ignore_index`"):
                perplexity(preds, target, ignore_index=ignore_index)
            return
        value = perplexity(preds, target, ignore_index=ignore_index)
        nll = target_nll(preds, target, ignore_index=ignore_index)
    assert value.dtype == torch.float64 and value.ndim == 0
    assert value.item() == pytest.approx(expected, rel=TOLERANCE[dtype])
    ignore = -100 if ignore_index is None else ignore_index
    per_token = F.cross_entropy(preds.double().transpose(1, 2), target, ignore_index=ignore, reduction="none")
    torch.testing.assert_close(nll, per_token, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    torch.testing.assert_close(preds, before[0], rtol=0, atol=0)
    assert torch.equal(target, before[1])


# ---------------------------------------------------------------------------------------
# Core: batch splits and permutations
# ---------------------------------------------------------------------------------------


def cuts(data, size):
    """Sorted cut points splitting range(size) into non-empty pieces."""
    if size < 2:
        return []
    return sorted(data.draw(st.sets(st.integers(1, size - 1), max_size=size - 1)))


def pieces(data, size):
    bounds = cuts(data, size)
    return list(zip([0, *bounds], [*bounds, size]))


@MANY
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), ignore_index=ignore_indices, data=st.data())
def test_core_class_is_invariant_to_batch_splits(shape, seed, ignore_index, data):
    preds, target = random_batch(seed, shape, ignore_index=ignore_index, dtype=torch.float64)
    scored = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    assume(scored.any())
    metric = Perplexity(ignore_index=ignore_index)
    for b0, b1 in pieces(data, shape[0]):  # rows, then positions inside each block of rows
        for t0, t1 in pieces(data, shape[1]):
            block = preds[b0:b1, t0:t1], target[b0:b1, t0:t1]
            has_scored = bool(scored[b0:b1, t0:t1].any())
            if has_scored and data.draw(st.booleans()):
                metric(*block)  # forward: accumulates and returns the block's own value
            else:
                metric.update(*block)  # a block of padding only is fine here
    whole = perplexity(preds, target, ignore_index=ignore_index).item()
    assert metric.count.item() == int(scored.sum())
    assert metric.compute().item() == pytest.approx(whole, rel=1e-12)
    assert whole == pytest.approx(reference_ppl(preds, target, ignore_index), rel=1e-12)


@MANY
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), ignore_index=ignore_indices, data=st.data())
def test_core_is_invariant_to_permuting_examples(shape, seed, ignore_index, data):
    preds, target = random_batch(seed, shape, ignore_index=ignore_index)
    assume(not (ignore_index is not None and bool((target == ignore_index).all())))
    order = torch.tensor(data.draw(st.permutations(range(shape[0]))))
    value = perplexity(preds, target, ignore_index=ignore_index).item()
    assert perplexity(preds[order], target[order], ignore_index=ignore_index).item() == pytest.approx(value, rel=1e-12)
    metric = Perplexity(ignore_index=ignore_index)
    for row in order.tolist():  # one example at a time, in the shuffled order
        metric.update(preds[row : row + 1], target[row : row + 1])
    assert metric.compute().item() == pytest.approx(value, rel=1e-12)


# ---------------------------------------------------------------------------------------
# The evaluate metric: batch splits, routes, forms, permutations
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def new_metric():
    """Fresh in-memory instances of the class `evaluate.load` builds."""
    cls = type(evaluate.load(METRIC_PATH, keep_in_memory=True))
    return lambda ignore_index: cls(keep_in_memory=True, ignore_index=ignore_index, bootstrap_resamples=20)


FORMS = ["full-tensor", "full-numpy", "full-list", "compact-tensor", "compact-numpy", "compact-list"]


@st.composite
def examples(draw):
    """(predictions, references, ignore_index): ragged examples, each in its own form."""
    ignore_index = draw(st.sampled_from([-100, 0, None]))
    vocab = draw(st.integers(2, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    predictions, references = [], []
    for _ in range(draw(st.integers(1, 7))):
        length = draw(st.integers(1, 6))
        logits = torch.randn(length, vocab, generator=gen, dtype=torch.float64) * 3
        ref = torch.randint(vocab, (length,), generator=gen)
        if ignore_index == -100:
            ref[torch.rand(length, generator=gen) < 0.3] = -100
        form = draw(st.sampled_from(FORMS))
        if form.startswith("compact"):
            scored = ref != ignore_index if ignore_index is not None else torch.ones_like(ref, dtype=torch.bool)
            logprobs = torch.log_softmax(logits, -1).gather(-1, ref.clamp(min=0)[:, None])[:, 0]
            pred = torch.where(scored, logprobs, -7.0)  # any value at an ignored position
        else:
            pred = logits
        as_form = {"tensor": lambda x: x, "numpy": lambda x: x.numpy(), "list": lambda x: x.tolist()}[form.split("-")[1]]
        predictions.append(as_form(pred))
        references.append(as_form(ref))
    first = references[0]
    first[0] = 1  # at least one scored token in the corpus, whatever the ignore_index
    return predictions, references, ignore_index


def assert_same_corpus_value(result, expected):
    assert result["num_tokens"] == expected["num_tokens"]
    for key in ("perplexity", "nll", "mean_perplexity"):
        assert result[key] == pytest.approx(expected[key], rel=1e-12), key


def assert_same_per_example(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a == pytest.approx(b, rel=1e-12)


@MANY
@given(case=examples(), data=st.data())
def test_metric_is_invariant_to_batch_splits_and_routes(new_metric, case, data):
    predictions, references, ignore_index = case
    whole = new_metric(ignore_index).compute(predictions=predictions, references=references)
    metric = new_metric(ignore_index)
    chunks = pieces(data, len(predictions))
    result = None
    for k, (lo, hi) in enumerate(chunks):
        route = data.draw(st.sampled_from(["add", "add_batch", "compute"] if k == len(chunks) - 1 else ["add", "add_batch"]))
        if route == "add":
            for pred, ref in zip(predictions[lo:hi], references[lo:hi]):
                metric.add(prediction=pred, reference=ref)
        elif route == "add_batch":
            metric.add_batch(predictions=predictions[lo:hi], references=references[lo:hi])
        else:
            result = metric.compute(predictions=predictions[lo:hi], references=references[lo:hi])
    result = result if result is not None else metric.compute()
    assert_same_corpus_value(result, whole)
    assert_same_per_example(result["perplexities"], whole["perplexities"])


@MANY
@given(case=examples(), data=st.data())
def test_metric_is_invariant_to_permuting_examples(new_metric, case, data):
    predictions, references, ignore_index = case
    order = data.draw(st.permutations(range(len(predictions))))
    whole = new_metric(ignore_index).compute(predictions=predictions, references=references)
    shuffled = new_metric(ignore_index).compute(predictions=[predictions[i] for i in order],
                                                references=[references[i] for i in order])
    assert_same_corpus_value(shuffled, whole)
    assert_same_per_example(shuffled["perplexities"], [whole["perplexities"][i] for i in order])


# ---------------------------------------------------------------------------------------
# The model runner: batching, packing and padding do not change per-text values
# ---------------------------------------------------------------------------------------

short_texts = st.lists(
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=60), min_size=1, max_size=5
)


@FEW
@given(
    texts=short_texts,
    max_length=st.integers(2, 24),
    batch_size=st.integers(2, 8),
    max_batch_tokens=st.one_of(st.none(), st.integers(1, 96)),
    padding_side=st.sampled_from(["left", "right"]),
    add_start_token=st.booleans(),
    data=st.data(),
)
def test_runner_per_text_values_match_batch_size_one(tiny, texts, max_length, batch_size, max_batch_tokens,
                                                      padding_side, add_start_token, data):
    model, tokenizer = tiny
    if not add_start_token:
        assume(all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) >= 2 for t in texts))
    stride = data.draw(st.integers(1, max_length))
    options = dict(max_length=max_length, stride=stride, add_start_token=add_start_token, progress=False)

    def run(**kwargs):
        preds, refs = [], []
        for batch in score_texts(model, tokenizer, list(texts), **options, **kwargs):
            preds += batch["predictions"]
            refs += batch["references"]
        return preds, refs

    want_preds, want_refs = run(batch_size=1)
    got_preds, got_refs = run(batch_size=batch_size, max_batch_tokens=max_batch_tokens, padding_side=padding_side)
    assert got_refs == want_refs  # the same targets, in input order
    for got, want in zip(got_preds, want_preds, strict=True):
        assert len(got) == len(want)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert math.exp(-math.fsum(got) / len(got)) == pytest.approx(math.exp(-math.fsum(want) / len(want)), rel=1e-5)
