"""The `evaluate` metric (`perplexity_metric.py`): loading offline, input forms and routes,
result values, batch-split invariance, what reaches the Arrow cache, bad input."""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import build_tiny_gpt2, build_tiny_tokenizer, one_intra_op_thread, reference_ppl

ROOT = Path(__file__).resolve().parents[1]
METRIC_PATH = str(ROOT / "perplexity_metric.py")


def full_batch(seed=0, batch=3, seq_len=6, vocab=11):
    """Logits `[batch, seq_len, vocab]` and targets; example 1 ends in two -100 pads."""
    gen = torch.Generator().manual_seed(seed)
    preds = torch.randn(batch, seq_len, vocab, generator=gen)
    target = torch.randint(vocab, (batch, seq_len), generator=gen)
    target[1, seq_len - 2 :] = -100
    return preds, target


def reference_logprobs(preds, target, ignore_index=-100):
    """Float64 log-probabilities of the targets (0 where ignored), computed without the core."""
    scored = target != ignore_index
    logprobs = torch.log_softmax(preds.double(), dim=-1).gather(-1, torch.where(scored, target, 0)[..., None])[..., 0]
    return torch.where(scored, logprobs, 0.0)


def assert_same_result(result, expected, rel=1e-9):
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=rel), key


def assert_same_input(before, after):
    if isinstance(before, torch.Tensor):
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)
    elif isinstance(before, np.ndarray):
        np.testing.assert_array_equal(after, before)
    elif isinstance(before, (list, tuple)):
        assert type(after) is type(before) and len(after) == len(before)
        for a, b in zip(before, after):
            assert_same_input(a, b)
    else:
        assert after == before or (after != after and before != before)  # NaN == NaN here


@pytest.fixture(scope="module")
def loaded():
    """The metric as `evaluate.load` builds it: a copy in the module cache, relative imports."""
    return evaluate.load(METRIC_PATH, keep_in_memory=True)


@pytest.fixture(scope="module")
def new_metric(loaded):
    """Fresh instances of the loaded class; in memory, so no cache file is shared with other runs."""
    return lambda **kwargs: type(loaded)(keep_in_memory=True, **kwargs)


@pytest.fixture(scope="module")
def expected():
    """The metric's result for `full_batch()`, through the plainest route."""
    preds, target = full_batch()
    return evaluate.load(METRIC_PATH, keep_in_memory=True).compute(predictions=preds, references=target)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------

_LOAD_SCRIPT = r"""
import json, sys
import evaluate, torch

path = sys.argv[1]
metric = evaluate.load(path)
preds = torch.rand(2, 8, 5, generator=torch.manual_seed(22))
target = torch.randint(5, (2, 8), generator=torch.manual_seed(22))
target[0, 6:] = -100
result = metric.compute(predictions=preds, references=target)
text = evaluate.load(path, "text")
print(json.dumps({
    "perplexity": result["perplexity"],
    "file": sys.modules[type(metric).__module__].__file__,
    "plain_core_imported": "ppl_core" in sys.modules,
    "text_config": text.config_name,
    "text_features": list(text.features),
}))
"""


def _tracked_python_files():
    try:
        out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the top-level modules
        return [p.name for p in ROOT.glob("*.py")]


def test_evaluate_load_offline_from_a_fresh_copy(tmp_path):
    repo = tmp_path / "repo"
    for name in _tracked_python_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    elsewhere = tmp_path / "elsewhere"  # cwd without the modules: only evaluate's copy can import them
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(repo / "perplexity_metric.py")],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert round(report["perplexity"], 4) == 5.2545
    module_file = Path(report["file"])
    assert module_file.is_relative_to(tmp_path / "hf")
    assert (module_file.parent / "ppl_core.py").is_file() and not report["plain_core_imported"]
    assert report["text_config"] == "text" and report["text_features"] == ["predictions"]


def test_load_settings_reach_the_metric():
    metric = evaluate.load(METRIC_PATH, ignore_index=0, bootstrap_resamples=50, keep_in_memory=True)
    assert (metric.ignore_index, metric.bootstrap_resamples) == (0, 50)


def test_unknown_load_setting_raises():
    with pytest.raises(TypeError, match="ignore_indx"):
        evaluate.load(METRIC_PATH, ignore_indx=0, keep_in_memory=True)


def test_unknown_config_name_raises():
    with pytest.raises(ValueError, match="config_name.*'texts'"):
        evaluate.load(METRIC_PATH, "texts", keep_in_memory=True)


# ---------------------------------------------------------------------------------------
# Input forms and routes
# ---------------------------------------------------------------------------------------


def _forms():
    preds, target = full_batch()
    logprobs = reference_logprobs(preds, target)
    lengths = [6, 4, 6]  # example 1 without its padding

    def ragged(rows, as_type=lambda x: x):
        return [as_type(row[:n]) for row, n in zip(rows, lengths)]

    return {
        "tensor": (preds, target),
        "numpy": (preds.numpy(), target.numpy()),
        "nested-lists": (preds.tolist(), target.tolist()),
        "list-of-tensors": (list(preds), list(target)),
        "ragged-tensors": (ragged(preds), ragged(target)),
        "ragged-arrays": (ragged(preds, torch.Tensor.numpy), ragged(target, torch.Tensor.numpy)),
        "compact-tensor": (logprobs, target),
        "compact-numpy": (logprobs.numpy(), target.numpy()),
        "compact-ragged-lists": (ragged(logprobs, torch.Tensor.tolist), ragged(target, torch.Tensor.tolist)),
    }


def via_compute(metric, preds, refs):
    return metric.compute(predictions=preds, references=refs)


def via_add_batch(metric, preds, refs):
    metric.add_batch(predictions=preds[:1], references=refs[:1])
    metric.add_batch(predictions=preds[1:], references=refs[1:])
    return metric.compute()


def via_add(metric, preds, refs):
    for pred, ref in zip(preds, refs):
        metric.add(prediction=pred, reference=ref)
    return metric.compute()


@pytest.mark.parametrize("route", [via_compute, via_add_batch, via_add], ids=lambda f: f.__name__)
@pytest.mark.parametrize("form", list(_forms()))
def test_every_form_and_route_gives_the_same_result(new_metric, expected, form, route):
    preds, refs = _forms()[form]
    before = copy.deepcopy((preds, refs))
    # `expected` comes from float32 logits, reduced in float32. Python floats are float64 and
    # the metric keeps them so (nested lists are reduced in float64), and the compact forms
    # hold float64 reference log-probs: those agree to float32's precision, the rest exactly.
    rel = 1e-6 if form == "nested-lists" or form.startswith("compact") else 1e-9
    assert_same_result(route(new_metric(), preds, refs), expected, rel=rel)
    assert_same_input(before, (preds, refs))


def test_mixed_routes_and_forms_in_one_run(new_metric, expected):
    preds, target = full_batch()
    logprobs = reference_logprobs(preds, target)
    metric = new_metric()
    metric.add_batch(predictions=[preds[0], logprobs[1]], references=[target[0], target[1].numpy()])
    metric.add(prediction=preds[2].numpy(), reference=target[2].tolist())
    assert_same_result(metric.compute(), expected, rel=1e-6)
    metric = new_metric()
    metric.add(prediction=logprobs[0].tolist(), reference=target[0])
    assert_same_result(metric.compute(predictions=preds[1:].numpy(), references=target[1:]), expected, rel=1e-6)


def test_result_equals_the_float64_reference(expected):
    preds, target = full_batch()
    assert expected["perplexity"] == pytest.approx(reference_ppl(preds, target, -100), rel=1e-6)
    per_example = [reference_ppl(preds[i : i + 1], target[i : i + 1], -100) for i in range(3)]
    assert expected["perplexities"] == pytest.approx(per_example, rel=1e-6)
    assert expected["num_tokens"] == int((target != -100).sum()) == 16


# ---------------------------------------------------------------------------------------
# Result values
# ---------------------------------------------------------------------------------------


def test_result_by_hand(new_metric):
    # One token at p=1/2 and three at p=1/8 (one more ignored): pooled 2**2.5, per example 2 and 8.
    result = new_metric().compute(
        predictions=[[math.log(1 / 2)], [math.log(1 / 8)] * 4], references=[[1], [1, 2, 3, -100]]
    )
    assert result["perplexity"] == pytest.approx(2**2.5)
    assert result["nll"] == pytest.approx(2.5 * math.log(2))
    assert result["bits_per_token"] == pytest.approx(2.5)
    assert result["num_tokens"] == 4
    assert result["perplexities"] == pytest.approx([2.0, 8.0])
    assert result["mean_perplexity"] == pytest.approx(5.0)  # the plain mean: not the corpus value
    assert result["perplexity_ci"] == pytest.approx([2.0, 8.0])  # 1/4 of resamples all-first, 1/4 all-second
    assert set(result) == {"perplexity", "nll", "bits_per_token", "num_tokens", "perplexities", "mean_perplexity", "perplexity_ci"}


def test_mean_perplexity_is_the_plain_mean_and_differs_on_unequal_lengths(expected):
    assert expected["mean_perplexity"] == pytest.approx(np.mean(expected["perplexities"]), rel=1e-12)
    assert abs(expected["mean_perplexity"] - expected["perplexity"]) > 1e-3 * expected["perplexity"]


def test_perplexity_ci_is_seeded(new_metric, expected):
    preds, target = full_batch(seed=1, batch=12)
    first = new_metric().compute(predictions=preds, references=target)["perplexity_ci"]
    assert first == new_metric().compute(predictions=preds, references=target)["perplexity_ci"]
    low, high = first
    assert low < new_metric().compute(predictions=preds, references=target)["perplexity"] < high
    assert expected["perplexity_ci"][0] <= expected["perplexity"] <= expected["perplexity_ci"][1]


def test_evaluate_seed_drives_the_bootstrap(new_metric):
    preds, target = full_batch(seed=1, batch=12)

    def interval(**kwargs):
        return new_metric(**kwargs).compute(predictions=preds, references=target)["perplexity_ci"]

    assert interval(seed=1) == interval(seed=1)
    assert interval(seed=1) != interval(seed=2)
    assert interval() == interval(seed=0)  # no seed: the bootstrap's fixed 0, whatever evaluate drew
    loaded = evaluate.load(METRIC_PATH, seed=2, keep_in_memory=True)  # the setting as users pass it
    assert loaded.compute(predictions=preds, references=target)["perplexity_ci"] == interval(seed=2)


def test_evaluate_seed_drives_the_text_mode_bootstrap():
    model, tokenizer = build_tiny_gpt2(), build_tiny_tokenizer()
    texts = [f"Text number {i} says something about the weather in spring." * (1 + i % 3) for i in range(8)]

    def interval(**kwargs):
        metric = evaluate.load(METRIC_PATH, "text", keep_in_memory=True, **kwargs)
        return metric.compute(predictions=texts, model=model, tokenizer=tokenizer)["perplexity_ci"]

    assert interval(seed=3) == interval(seed=3)
    assert interval(seed=3) != interval(seed=4)
    assert interval() == interval(seed=0)


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (1.5, TypeError), ("1", TypeError)])
def test_bad_seed_names_the_argument(seed, error):
    with pytest.raises(error, match="`seed`"):
        evaluate.load(METRIC_PATH, seed=seed, keep_in_memory=True)


# ---------------------------------------------------------------------------------------
# ignore_index
# ---------------------------------------------------------------------------------------


def _zero_padded():
    preds, target = full_batch()
    return preds, torch.where(target == -100, 0, target)


def test_ignore_index_defaults_to_minus_100(new_metric, expected):
    assert new_metric().ignore_index == -100
    assert expected["num_tokens"] == 16


def test_ignore_index_set_at_load():
    preds, target = _zero_padded()
    result = evaluate.load(METRIC_PATH, ignore_index=0, keep_in_memory=True).compute(predictions=preds, references=target)
    assert result["perplexity"] == pytest.approx(reference_ppl(preds, target, ignore_index=0), rel=1e-6)
    assert result["num_tokens"] == int((target != 0).sum())


def test_ignore_index_set_at_compute(new_metric):
    preds, target = _zero_padded()
    result = new_metric().compute(predictions=preds, references=target, ignore_index=0)
    assert result["perplexity"] == pytest.approx(reference_ppl(preds, target, ignore_index=0), rel=1e-6)
    assert result["num_tokens"] == int((target != 0).sum())
    every_token = new_metric().compute(predictions=preds, references=target, ignore_index=None)
    assert every_token["num_tokens"] == target.numel()
    assert every_token["perplexity"] == pytest.approx(reference_ppl(preds, target), rel=1e-6)  # no target is -100


def test_positions_ignored_when_added_stay_ignored(new_metric, expected):
    preds, target = full_batch()
    preds = preds.clone()
    preds[target == -100] = math.nan  # padding is never read
    for ignore_index in (None, -100, 7_000):
        metric = new_metric()
        metric.add_batch(predictions=preds, references=target)
        assert_same_result(metric.compute(ignore_index=ignore_index), expected)


def test_compute_may_leave_out_a_real_id(new_metric):
    logprobs, refs = [[-1.0, -2.0, -4.0]], [[5, 0, 6]]
    metric = new_metric()
    metric.add_batch(predictions=logprobs, references=refs)
    result = metric.compute(ignore_index=0)
    assert result["num_tokens"] == 2 and result["perplexity"] == pytest.approx(math.exp(2.5))


# ---------------------------------------------------------------------------------------
# Batch splits and the Arrow cache
# ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    vocab=st.integers(2, 6),
    compact=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_any_batch_split_gives_identical_results(new_metric, lengths, vocab, compact, seed, data):
    gen = torch.Generator().manual_seed(seed)
    refs = [torch.randint(vocab, (n,), generator=gen) for n in lengths]
    for ref in refs[1:]:
        ref[-1] = -100  # some padding; every example keeps its first token
    preds = [torch.randn(n, vocab, generator=gen) for n in lengths]
    if compact:
        preds = [reference_logprobs(p, r) for p, r in zip(preds, refs)]
    n = len(lengths)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
    with one_intra_op_thread():
        whole = new_metric(bootstrap_resamples=200).compute(predictions=preds, references=refs)
        metric = new_metric(bootstrap_resamples=200)
        for lo, hi in zip([0, *cuts], [*cuts, n]):
            metric.add_batch(predictions=preds[lo:hi], references=refs[lo:hi])
        assert metric.compute() == whole


def test_only_seq_len_floats_reach_the_arrow_cache(new_metric):
    preds, target = full_batch(vocab=1000)
    metric = new_metric()
    metric.add_batch(predictions=preds, references=target)
    # evaluate's own first step of compute(): close the writer and read the cached rows back.
    metric._finalize()
    table = metric.data.data
    assert table.schema.field("predictions").type == pa.list_(pa.float64())
    assert table.schema.field("references").type == pa.list_(pa.int64())
    rows = table.column("predictions").to_pylist()
    assert [len(row) for row in rows] == [6, 6, 6]
    np.testing.assert_allclose(rows, reference_logprobs(preds, target).numpy(), rtol=1e-6, atol=1e-6)
    assert table.nbytes < preds.numel() * preds.element_size() / 100


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def _bad_inputs():
    preds, target = full_batch()
    logprobs = reference_logprobs(preds, target)
    nan, compact_nan = preds.clone(), logprobs.clone()
    nan[2, 1, 3] = math.nan
    compact_nan[0, 1] = math.nan
    out_of_vocab, negative = target.clone(), target.clone()
    out_of_vocab[0, 2] = 11
    negative[0, 2] = -1
    P = pytest.param
    return [
        P(preds[None], target, ValueError, r"`predictions`", id="predictions-4d"),
        P(preds, target[..., None], ValueError, r"`references`", id="references-3d"),
        P([preds[0][None]], [target[0]], ValueError, r"`predictions\[0\]`", id="example-predictions-3d"),
        P([preds[0]], [target[:2]], ValueError, r"`references\[0\]`", id="example-references-2d"),
        P(list(preds), [target[0], target[1, :5], target[2]], ValueError, r"`predictions\[1\]` and `references\[1\]`", id="length-mismatch"),
        P(list(preds), list(target[:2]), ValueError, r"`predictions`.*`references`", id="count-mismatch"),
        P("not a batch", target, TypeError, r"`predictions`", id="predictions-string"),
        P(preds, None, TypeError, r"`references`", id="references-missing"),
        P(logprobs, target.float(), TypeError, r"`references`", id="compact-float-references"),
        P([[-0.1, -0.2]], [["a", "b"]], TypeError, r"`references\[0\]`", id="string-references"),
        P(logprobs.abs() + 0.5, target, ValueError, r"`predictions`", id="positive-log-prob"),
        P(compact_nan, target, ValueError, r"`predictions`", id="compact-nan"),
        P(logprobs, negative, ValueError, r"`references`", id="compact-negative-reference"),
        P(logprobs.long(), target, TypeError, r"`predictions`", id="compact-int-predictions"),
        P([], [], ValueError, r"`predictions`", id="empty"),
        P(preds, target.float(), TypeError, r"`references", id="full-float-references"),
        P(preds, out_of_vocab, ValueError, r"`references", id="full-out-of-vocab"),
        P(preds, negative, ValueError, r"`references", id="full-negative-reference"),
        P(nan, target, ValueError, r"`predictions", id="full-nan"),
    ]


@pytest.mark.parametrize("predictions, references, error, match", _bad_inputs())
def test_bad_input_names_the_argument(new_metric, predictions, references, error, match):
    before = copy.deepcopy((predictions, references))
    with pytest.raises(error, match=match):
        new_metric().compute(predictions=predictions, references=references)
    with pytest.raises(error, match=match):
        new_metric().add_batch(predictions=predictions, references=references)
    assert_same_input(before, (predictions, references))


@pytest.mark.parametrize("compact", [False, True], ids=["full", "compact"])
def test_every_token_ignored_raises_at_compute(new_metric, compact):
    preds, target = full_batch()
    predictions = reference_logprobs(preds, target) if compact else preds
    metric = new_metric()
    metric.add_batch(predictions=predictions, references=torch.full_like(target, -100))  # one batch may be all padding
    with pytest.raises(ValueError, match="`ignore_index`"):
        metric.compute()


def test_nan_at_an_ignored_position_is_allowed(new_metric, expected):
    preds, target = full_batch()
    preds[1, -1] = math.nan  # a padded position
    logprobs = reference_logprobs(preds, target)
    logprobs[1, -1] = math.nan
    assert_same_result(new_metric().compute(predictions=preds, references=target), expected)
    assert_same_result(new_metric().compute(predictions=logprobs, references=target), expected, rel=1e-6)
