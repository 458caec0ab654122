"""The torch core (`ppl_core`, re-exported by `perplexity_metric`) against independent references:
torchmetrics 1.9.0 and a five-line float64 `exp(cross_entropy)`."""

import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.functional.text import perplexity as tm_perplexity
from torchmetrics.text import Perplexity as TMPerplexity

from conftest import one_intra_op_thread, reference_ppl
from perplexity_metric import Perplexity, perplexity
from ppl_core import bootstrap_interval, check_int, summarize, target_nll

ROOT = Path(__file__).resolve().parents[1]


def seed_example():
    preds = torch.rand(2, 8, 5, generator=torch.manual_seed(22))
    target = torch.randint(5, (2, 8), generator=torch.manual_seed(22))
    target[0, 6:] = -100
    return preds, target


def random_batch(shape, seed=0, scale=3.0, dtype=torch.float32, ignore_index=None):
    """Logits `shape` and targets; every third position is set to `ignore_index` (if any)."""
    gen = torch.Generator().manual_seed(seed)
    preds = (torch.randn(shape, generator=gen) * scale).to(dtype)
    target = torch.randint(shape[-1], shape[:2], generator=gen)
    if ignore_index is not None:
        target.view(-1)[2::3] = ignore_index
        target[0, 0] = 1 if ignore_index == 0 else 0  # at least one scored token
    return preds, target


def assert_unchanged(before, after):
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------


def test_seed_example_gives_torchmetrics_value():
    preds, target = seed_example()
    ours = perplexity(preds, target, ignore_index=-100)
    ours_class = Perplexity(ignore_index=-100)(preds, target)
    theirs = tm_perplexity(preds, target, ignore_index=-100)
    theirs_class = TMPerplexity(ignore_index=-100)(preds, target)
    assert ours.ndim == 0 and ours.dtype == torch.float64
    assert [round(float(v), 4) for v in (ours, ours_class, theirs, theirs_class)] == [5.2545] * 4
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    assert float(ours_class) == pytest.approx(float(theirs_class), rel=1e-6)
    assert float(ours) == pytest.approx(reference_ppl(preds, target, -100), rel=1e-6)


SHAPES = [(1, 1, 2), (2, 7, 5), (3, 16, 101), (2, 33, 1000)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("ignore_index", [None, -100, 0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_logits_match_float64_reference_and_torchmetrics(shape, dtype, ignore_index):
    preds, target = random_batch(shape, seed=sum(shape), dtype=dtype, ignore_index=ignore_index)
    before = (preds.clone(), target.clone())
    rel = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    ours = perplexity(preds, target, ignore_index=ignore_index).item()
    assert ours == pytest.approx(reference_ppl(preds, target, ignore_index), rel=rel)
    theirs = tm_perplexity(preds, target, ignore_index=ignore_index).item()
    if math.isfinite(theirs):
        assert ours == pytest.approx(theirs, rel=rel)
    assert_unchanged(before, (preds, target))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_log_probabilities_give_the_same_value_as_logits(dtype):
    logits, target = random_batch((2, 9, 50), seed=3, ignore_index=-100)
    logprobs = torch.log_softmax(logits.double(), dim=-1).to(dtype)
    rel = 1e-6 if dtype != torch.bfloat16 else 2e-2
    assert perplexity(logprobs, target, -100).item() == pytest.approx(perplexity(logits, target, -100).item(), rel=rel)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_half_precision_logits_stay_finite_where_torchmetrics_gives_inf(dtype):
    # Scale 100 puts most target probabilities below the half types' smallest value (softmax
    # then log gives -inf), while the mean NLL (~250) keeps exp() finite in float64.
    preds, target = random_batch((2, 16, 50), seed=1, scale=100.0, dtype=dtype)
    reference = reference_ppl(preds, target)
    assert math.isfinite(reference)
    assert perplexity(preds, target).item() == pytest.approx(reference, rel=2e-2)
    assert tm_perplexity(preds, target).item() == math.inf


def test_perplexity_beyond_float64_range_is_inf_not_an_exception():
    preds, target = random_batch((2, 16, 50), seed=1, scale=1000.0)
    assert reference_ppl(preds, target) == math.inf
    assert perplexity(preds, target).item() == math.inf


def test_float64_inputs_keep_float64_precision():
    preds, target = random_batch((2, 33, 1000), seed=5, dtype=torch.float64)
    assert perplexity(preds, target).item() == pytest.approx(reference_ppl(preds, target), rel=1e-12)


def test_minus_inf_at_an_untargeted_position_is_a_valid_log_probability():
    preds, target = random_batch((2, 5, 20), seed=4)
    masked = preds.clone()
    masked[..., 10:] = -math.inf  # top-k style masking; every target kept below 10
    target = target % 10
    value = perplexity(masked, target).item()
    assert math.isfinite(value)
    assert value == pytest.approx(reference_ppl(masked, target), rel=1e-5)


def test_nan_at_an_ignored_position_is_allowed_and_scores_zero():
    preds, target = random_batch((2, 6, 7), seed=2)
    target[1, 3] = -100
    poisoned = preds.clone()
    poisoned[1, 3] = math.nan
    nll = target_nll(poisoned, target, ignore_index=-100)
    assert nll[1, 3].item() == 0.0
    assert perplexity(poisoned, target, -100).item() == pytest.approx(perplexity(preds, target, -100).item(), rel=1e-12)


def test_target_nll_is_per_token_float64():
    preds, target = random_batch((3, 4, 9), seed=6, ignore_index=-100)
    nll = target_nll(preds, target, ignore_index=-100)
    expected = F.cross_entropy(preds.double().transpose(1, 2), target, ignore_index=-100, reduction="none")
    assert nll.dtype == torch.float64 and nll.shape == target.shape
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# The Perplexity class
# ---------------------------------------------------------------------------------------


def test_class_follows_torchmetrics_forward_update_compute_reset():
    batches = [random_batch((2, 6, 13), seed=s, ignore_index=-100) for s in range(3)]
    ours, theirs = Perplexity(ignore_index=-100), TMPerplexity(ignore_index=-100)
    for preds, target in batches[:2]:
        batch_value = ours(preds, target).item()  # forward: this batch's value, and accumulates
        assert batch_value == pytest.approx(theirs(preds, target).item(), rel=1e-5)
        assert batch_value == pytest.approx(reference_ppl(preds, target, -100), rel=1e-5)
    ours.update(*batches[2])
    theirs.update(*batches[2])
    everything = [torch.cat(parts) for parts in zip(*batches)]
    assert ours.compute().item() == pytest.approx(reference_ppl(*everything, -100), rel=1e-5)
    assert ours.compute().item() == pytest.approx(theirs.compute().item(), rel=1e-5)
    ours.reset()
    ours.update(*batches[1])
    assert ours.compute().item() == pytest.approx(reference_ppl(*batches[1], -100), rel=1e-5)


def test_class_state_is_float64_sums():
    metric = Perplexity(ignore_index=-100)
    preds, target = random_batch((2, 5, 8), seed=7, ignore_index=-100)
    metric.update(preds, target)
    nll = F.cross_entropy(preds.double().reshape(-1, 8), target.reshape(-1), ignore_index=-100, reduction="sum")
    assert metric.nll_sum.dtype == torch.float64 and metric.count.dtype == torch.int64
    assert metric.nll_sum.item() == pytest.approx(nll.item(), rel=1e-6)
    assert metric.count.item() == (target != -100).sum().item()


def test_compute_with_nothing_added_raises():
    metric = Perplexity()
    with pytest.raises(ValueError, match="No token was scored"):
        metric.compute()
    metric.update(*random_batch((1, 3, 4)))
    metric.reset()
    with pytest.raises(ValueError, match="No token was scored"):
        metric.compute()


@settings(max_examples=300, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(2, 9)),
    seed=st.integers(0, 2**16),
    dim=st.sampled_from([0, 1]),
    data=st.data(),
)
def test_any_batch_split_gives_the_same_value(shape, seed, dim, data):
    preds, target = random_batch(shape, seed=seed, ignore_index=-100)
    size = shape[dim]
    cuts = sorted(data.draw(st.sets(st.integers(1, size - 1), max_size=size - 1) if size > 1 else st.just(set())))
    metric = Perplexity(ignore_index=-100)
    with one_intra_op_thread():
        for lo, hi in zip([0, *cuts], [*cuts, size]):
            metric.update(preds.narrow(dim, lo, hi - lo), target.narrow(dim, lo, hi - lo))
        whole = perplexity(preds, target, ignore_index=-100).item()
    assert metric.compute().item() == pytest.approx(whole, rel=1e-12)
    assert whole == pytest.approx(reference_ppl(preds, target, -100), rel=1e-5)


# ---------------------------------------------------------------------------------------
# Memory: no full-size copy of `preds`
# ---------------------------------------------------------------------------------------

_MEMORY_SCRIPT = r"""
import json, sys, torch
import torch.nn.functional as F
from ppl_core import target_nll

def rss(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

def extra_peak(fn):
    base = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
    fn()
    return rss("VmHWM") - base

torch.set_num_threads(2)  # the working set is a few rows per thread
B, T, V = 4, 512, 32000  # 262 MB: per-thread overheads (a few MB) stay well under 10%
x = torch.randn(B, T + 1, V)
target = torch.randint(V, (B, T))
target_nll(torch.randn(B, 64, V), target[:, :64])  # warm-up: thread pool, allocator
contiguous = x[:, 1:].contiguous()
print(json.dumps({
    "input": contiguous.numel() * 4,
    "contiguous": extra_peak(lambda: target_nll(contiguous, target)),
    "sliced": extra_peak(lambda: target_nll(x[:, :-1], target)),
    "full_cross_entropy": extra_peak(lambda: F.cross_entropy(contiguous.transpose(1, 2), target)),
}))
"""


@pytest.fixture(scope="module")
def peak_memory():
    """Extra peak RSS of target_nll on [4, 512, 32000] float32 (262 MB), in a fresh process."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    # glibc's adaptive mmap threshold keeps freed multi-MB chunks in the heap, so RSS would
    # count memory already freed; a fixed threshold returns them and RSS tracks live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _allowance(input_bytes):
    return 0.10 * input_bytes + 8e6  # the goal, plus a few MB of per-thread chunks and bookkeeping


def test_target_nll_makes_no_full_size_copy(peak_memory):
    assert peak_memory["full_cross_entropy"] > 0.9 * peak_memory["input"]  # the measurement sees a copy
    assert peak_memory["contiguous"] < _allowance(peak_memory["input"])


def test_target_nll_makes_no_copy_of_shifted_logits(peak_memory):
    assert peak_memory["sliced"] < _allowance(peak_memory["input"])


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def _bad_inputs():
    preds, target = random_batch((2, 5, 7), seed=8)
    nan, inf = preds.clone(), preds.clone()
    nan[0, 2, 3] = math.nan
    inf[1, 4, 0] = math.inf
    out_of_vocab, negative = target.clone(), target.clone()
    out_of_vocab[1, 1] = 7
    negative[0, 3] = -1
    return [
        ("preds-numpy", preds.numpy(), target, None, TypeError, "`preds`"),
        ("target-list", preds, target.tolist(), None, TypeError, "`target`"),
        ("int-preds", preds.long(), target, None, TypeError, "`preds`"),
        ("preds-2d", preds[0], target, None, ValueError, "`preds`"),
        ("preds-4d", preds[None], target, None, ValueError, "`preds`"),
        ("target-1d", preds, target[0], None, ValueError, "`target`"),
        ("target-3d", preds, target[..., None], None, ValueError, "`target`"),
        ("shape-mismatch", preds, target[:, :4], None, ValueError, "`preds` and `target`"),
        ("float-target", preds, target.float(), None, TypeError, "`target`"),
        ("bool-target", preds, target.bool(), None, TypeError, "`target`"),
        ("target-out-of-vocab", preds, out_of_vocab, None, ValueError, "`target`"),
        ("negative-target", preds, negative, -100, ValueError, "`target`"),
        ("ignore-value-without-ignore-index", preds, torch.where(negative < 0, -100, negative), None, ValueError, "`target`"),
        ("nan-scored", nan, target, None, ValueError, "`preds`"),
        ("inf-scored", inf, target, None, ValueError, "`preds`"),
        ("all-ignored", preds, torch.full_like(target, -100), -100, ValueError, "`ignore_index`"),
        ("empty-batch", preds[:0], target[:0], None, ValueError, "`preds`"),
        ("empty-seq", preds[:, :0], target[:, :0], None, ValueError, "`preds`"),
        ("empty-vocab", preds[..., :0], target, None, ValueError, "`preds`"),
        ("float-ignore-index", preds, target, 1.5, TypeError, "`ignore_index`"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: case[0])
def test_bad_input_names_the_argument(case):
    _, preds, target, ignore_index, error, name = case
    before = [x.clone() for x in (preds, target) if isinstance(x, torch.Tensor)]
    with pytest.raises(error, match=name):
        perplexity(preds, target, ignore_index=ignore_index)
    with pytest.raises(error, match=name):
        Perplexity(ignore_index=ignore_index)(preds, target)
    assert_unchanged(before, [x for x in (preds, target) if isinstance(x, torch.Tensor)])


# ---------------------------------------------------------------------------------------
# Corpus summary: bootstrap interval and result dict
# ---------------------------------------------------------------------------------------


def _corpus(n=40, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(5, 200, size=n)
    nll_sums = counts * rng.normal(3.0, 0.4, size=n)  # per-document mean NLL around 3 nats
    return nll_sums, counts


def test_bootstrap_is_deterministic_for_a_seed():
    nll_sums, counts = _corpus()
    first = bootstrap_interval(nll_sums, counts, seed=1)
    assert first == bootstrap_interval(nll_sums, counts, seed=1)
    assert first != bootstrap_interval(nll_sums, counts, seed=2)


def test_bootstrap_interval_brackets_the_corpus_value():
    nll_sums, counts = _corpus()
    low, high = bootstrap_interval(nll_sums, counts, resamples=2000, seed=0)
    point = math.exp(nll_sums.sum() / counts.sum())
    per_example = np.exp(nll_sums / counts)
    assert per_example.min() <= low < point < high <= per_example.max()
    # An independent percentile bootstrap with another stream lands close by.
    rng = np.random.default_rng(12345)
    idx = rng.integers(0, len(counts), size=(4000, len(counts)))
    ref = np.percentile(np.exp(nll_sums[idx].sum(1) / counts[idx].sum(1)), [2.5, 97.5])
    assert [low, high] == pytest.approx(ref, rel=0.01)


def test_bootstrap_of_one_example_is_degenerate():
    assert summarize([30.0], [10])["perplexity_ci"] is None  # the result says so rather than show [p, p]
    low, high = bootstrap_interval([30.0], [10])
    assert low == high == pytest.approx(math.exp(3.0))


def test_summarize_by_hand():
    # One token at p=1/2 and three at p=1/8: pooled 2**2.5, per example 2 and 8.
    result = summarize([math.log(2), 3 * math.log(8)], [1, 3], seed=0)
    assert result["perplexity"] == pytest.approx(2**2.5)
    assert result["nll"] == pytest.approx(2.5 * math.log(2))
    assert result["bits_per_token"] == pytest.approx(2.5)
    assert result["num_tokens"] == 4
    assert result["perplexities"] == pytest.approx([2.0, 8.0])
    assert result["mean_perplexity"] == pytest.approx(5.0)
    assert result["perplexity_ci"] == pytest.approx([2.0, 8.0])  # 1/4 of resamples are all-A, 1/4 all-B


def test_summarize_skips_examples_without_scored_tokens():
    result = summarize([math.log(2), 0.0, 3 * math.log(8)], [1, 0, 3], seed=0)
    assert result["perplexities"][1] is None
    assert result["perplexities"][0] == pytest.approx(2.0) and result["perplexities"][2] == pytest.approx(8.0)
    assert result["num_tokens"] == 4 and result["mean_perplexity"] == pytest.approx(5.0)
    assert result["perplexity_ci"] == summarize([math.log(2), 3 * math.log(8)], [1, 3], seed=0)["perplexity_ci"]


def test_summarize_with_no_scored_token_raises():
    with pytest.raises(ValueError, match="No token was scored"):
        summarize([0.0, 0.0], [0, 0])


def test_accumulators_stay_float64_when_a_parent_is_cast():
    metric = Perplexity(ignore_index=-100)
    parent = torch.nn.Sequential(metric).half()
    assert parent[0].nll_sum.dtype == torch.float64 and parent[0].count.dtype == torch.int64


def test_forward_on_an_all_ignored_batch_raises_and_adds_nothing():
    metric = Perplexity(ignore_index=-100)
    preds = torch.full((1, 2, 4), math.log(1 / 4))
    with pytest.raises(ValueError, match="ignore_index"):
        metric(preds, torch.full((1, 2), -100))
    assert metric.count.item() == 0
    assert metric(preds, torch.tensor([[1, 2]])).item() == pytest.approx(4.0)


def test_text_metrics_overflow_to_inf_not_an_exception():
    from ppl_core import text_metrics

    result = text_metrics(5000.0, ["一二三四五六七八九十" * 50])  # one "word", thousands of nats
    assert result["word_perplexity"] == math.inf and math.isfinite(result["byte_perplexity"])


@pytest.mark.parametrize("value, minimum, error, message", [
    (2.0, None, TypeError, "Expected `batch_size` to be an int, but got 2.0."),
    (True, None, TypeError, "Expected `batch_size` to be an int, but got True."),
    ("8", 1, TypeError, "Expected `batch_size` to be an int, but got '8'."),
    (None, 1, TypeError, "Expected `batch_size` to be an int, but got None."),
    (0, 1, ValueError, "Expected `batch_size` to be an int >= 1, but got 0."),
    (-3, 0, ValueError, "Expected `batch_size` to be an int >= 0, but got -3."),
])
def test_check_int_names_the_argument(value, minimum, error, message):
    with pytest.raises(error) as raised:
        check_int(value, "batch_size", minimum=minimum)
    assert str(raised.value) == message


def test_check_int_accepts_ints_at_and_above_the_minimum():
    assert check_int(1, "max_length", minimum=1) is None
    assert check_int(-5, "ignore_index") is None  # no minimum: any int
