"""Models in bfloat16 and float16 scored end to end through text mode (`evaluate.load(...,
"text").compute(...)`), against a float64 loop over each model's OWN half-precision logits:
the forward in the model's dtype, its logits upcast to float64, log-softmax, gather. The
metric must neither compute in the half dtype (a log-softmax in bfloat16 / float16 is off by
1.2e-2 / 1.5e-3 nats per token on the sharpened tiny GPT-2) nor score another precision than
the model's (float32 moves its log-probs by 5.8e-3 / 8e-4 nats per token): either is far
outside the tolerances below (1e-6 relative), which the metric meets by 10-100x.

Every run here feeds one window per forward (`batch_size=1`), as the loop does: in a padded
half-precision batch the padded row's values move (up to 2e-5 relative on a short text, measured
here), as much as the dtype itself moves the tiny model's, so padding is tested in float32
(test_compare.py, test_metric_reference.py).
"""

import math

import numpy as np
import pytest
import torch

from conftest import build_tiny_gpt2, build_tiny_tokenizer
from test_metric_reference import (TEXTS, WINDOWS, _one_thread, assert_matches, float64_loop, from_disk,  # noqa: F401
                                   pooled, sharpened, text_metric)

HALF = [torch.bfloat16, torch.float16]
ONE_WINDOW_PER_FORWARD = {"batch_size": 1, "bootstrap_resamples": 100, **WINDOWS}
BY_ID = {"device": "cpu", **ONE_WINDOW_PER_FORWARD}  # (a loaded model takes no `device`)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The sharpened tiny GPT-2 (see test_metric_reference.py) saved with its tokenizer."""
    path = tmp_path_factory.mktemp("half-precision") / "model"
    sharpened(build_tiny_gpt2()).save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


def name(dtype):
    return str(dtype).removeprefix("torch.")


def assert_far_from(result, other, tolerance_factor=100, rel=1e-6):
    """The dtype matters: the result is farther from another precision's values than the tolerance, by a margin."""
    gap = max(abs(a / b - 1) for a, b in zip(result["perplexities"], other["perplexities"]))
    assert gap > tolerance_factor * rel, gap


# ---------------------------------------------------------------------------------------
# One model in half precision
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["auto", "logits"])  # the fused head and the model's own logits
@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_a_half_precision_model_object_is_scored_in_its_own_precision(text_metric, tiny_checkpoint, dtype, head):
    model, tokenizer = from_disk(tiny_checkpoint, dtype), build_tiny_tokenizer()
    expected = pooled(float64_loop(model, None, tokenizer, TEXTS))
    result = text_metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, head=head, **ONE_WINDOW_PER_FORWARD)
    assert next(model.parameters()).dtype == dtype  # scored as given, not converted
    assert_matches(result, expected)
    assert_far_from(result, pooled(float64_loop(from_disk(tiny_checkpoint), None, tokenizer, TEXTS)))


@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_a_model_id_loaded_in_half_precision_is_scored_in_that_precision(text_metric, tiny_checkpoint, dtype):
    result = text_metric.compute(predictions=TEXTS, model_id=str(tiny_checkpoint), dtype=name(dtype), **BY_ID)
    expected = pooled(float64_loop(from_disk(tiny_checkpoint, dtype), None, build_tiny_tokenizer(), TEXTS))
    assert_matches(result, expected)
    assert_far_from(result, pooled(float64_loop(from_disk(tiny_checkpoint), None, build_tiny_tokenizer(), TEXTS)))


SMOL_TEXTS = TEXTS[:2]  # 66 scored tokens, the first text in 3 windows


@pytest.mark.slow
def test_the_embedded_smollm2_in_bfloat16_is_scored_in_bfloat16(text_metric, smol):
    from ppl_sources import default_model_dir

    float32, tokenizer = smol  # its tokenizer starts documents with <|endoftext|>
    model = from_disk(default_model_dir(), torch.bfloat16)  # the float copy of the embedded GGUF, in bfloat16
    expected = pooled(float64_loop(model, None, tokenizer, SMOL_TEXTS))
    result = text_metric.compute(predictions=SMOL_TEXTS, model=model, tokenizer=tokenizer, **ONE_WINDOW_PER_FORWARD)
    assert expected["num_tokens"] == 66 and 5 < result["perplexity"] < 100  # a real model on plain English
    # the core's float32 log-softmax over 49,152 logits runs high by ~7e-6 nats per token against
    # float64 (torch's CPU kernel; its logsumexp is within 6e-8): perplexities ~8e-6 relative low
    assert_matches(result, expected, rel=3e-5)
    # bfloat16 rounding moves this real model by 4-8% per text: 1000x the tolerance
    assert_far_from(result, pooled(float64_loop(float32, None, tokenizer, SMOL_TEXTS)), rel=3e-5, tolerance_factor=1000)


# ---------------------------------------------------------------------------------------
# Half precision on either side of a comparison
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_a_half_precision_model_against_its_float32_checkpoint_matches_the_loop(text_metric, tiny_checkpoint, dtype):
    # README's example: the model loaded in half precision, `reference_dtype="float32"`
    result = text_metric.compute(predictions=TEXTS, model_id=str(tiny_checkpoint), dtype=name(dtype), reference_dtype="float32",
                                 **BY_ID)
    expected = pooled(float64_loop(from_disk(tiny_checkpoint, dtype), from_disk(tiny_checkpoint), build_tiny_tokenizer(), TEXTS))
    # rounding alone: KL 3e-5 (bfloat16) and 5e-7 nats (float16) per token, the ratio 1 +- 3e-5
    assert 1e-7 < expected["kl_divergence"] < 1e-3 and abs(expected["log_perplexity_ratio"]) > 1e-5
    assert_matches(result, expected, nats=2e-8)


@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_a_float32_model_against_a_half_precision_reference_object_matches_the_loop(text_metric, tiny_checkpoint, dtype):
    model, reference, tokenizer = from_disk(tiny_checkpoint), from_disk(tiny_checkpoint, dtype), build_tiny_tokenizer()
    expected = pooled(float64_loop(model, reference, tokenizer, TEXTS))
    result = text_metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, reference_model=reference,
                                 **ONE_WINDOW_PER_FORWARD)
    assert next(reference.parameters()).dtype == dtype
    assert 1e-7 < expected["kl_divergence"] < 1e-3 and abs(expected["log_perplexity_ratio"]) > 1e-5
    assert_matches(result, expected, nats=2e-8)
    # the reverse pair: the same tokens, KL(model || reference) instead, ratio inverted
    swapped = text_metric.compute(predictions=TEXTS, model=reference, tokenizer=tokenizer, reference_model=model,
                                  **ONE_WINDOW_PER_FORWARD)
    assert_matches(swapped, pooled(float64_loop(reference, model, tokenizer, TEXTS)), nats=2e-8)
    assert math.isclose(swapped["perplexity_ratio"] * result["perplexity_ratio"], 1, rel_tol=1e-9)
    assert np.isclose(swapped["perplexity"], result["reference_perplexity"], rtol=1e-9)
