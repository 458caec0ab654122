"""Text mode's reference inputs through the real loader (`evaluate.load("perplexity_metric.py",
"text").compute(...)`): `reference_model_id`, `reference_gguf_file`, `reference_dtype` alone (the
model's own checkpoint in another dtype) and `reference_file` (written by `save_reference`), each
against a float64 loop written here over the two models as transformers loads them from disk; and
the refusals, each by its message.

The models: a tiny GPT-2 whose final layer norm is scaled by 8 (sharper distributions: a
near-uniform random model puts KL and half-precision effects under float32 rounding) and a copy
with 30% noise on its weight matrices, saved as a folder and as a float32 GGUF written here with
the `gguf` package (loads in ~0.2 s; the embedded SmolLM2 GGUF takes ~27 s to parse).
"""

import copy
import math
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch

from conftest import build_tiny_gpt2, build_tiny_tokenizer, one_intra_op_thread, write_gguf

ROOT = Path(__file__).resolve().parents[1]

# Public-domain English; 196 scored tokens with the tiny tokenizer, the first text in 4 windows of
# max_length=32, stride=16, so windows reach back and batches of 16 carry padding.
TEXTS = [
    ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, "
     "it was the epoch of belief, it was the epoch of incredulity."),
    "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about.",
    "Happy families are all alike; every unhappy family is unhappy in its own way.",
    "We hold these truths to be self-evident.",
]
WINDOWS = {"max_length": 32, "stride": 16}
SHARPEN = 8.0  # logits x8: per-token KL ~0.1 nats here, half-precision effects ~1e-2 nats


# ---------------------------------------------------------------------------------------
# Models on disk
# ---------------------------------------------------------------------------------------


def sharpened(model, factor=SHARPEN):
    """The tied GPT-2's logits times `factor` (its final layer norm scaled: inputs unchanged)."""
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(factor)
        model.transformer.ln_f.bias.mul_(factor)
    return model


def perturbed(model, scale=0.3, seed=1):
    """A copy with a fixed relative Gaussian noise on every weight matrix (the tied embedding too)."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            if param.ndim == 2:
                param.add_(torch.randn(param.shape, generator=generator) * scale * param.std())
    return other.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Paths: `model` and `reference` folders (tokenizer included), `gguf` (the reference as a GGUF)."""
    root = tmp_path_factory.mktemp("reference-inputs")
    tokenizer = build_tiny_tokenizer()
    model = sharpened(build_tiny_gpt2())
    paths = {"model": root / "model", "reference": root / "reference", "gguf": root / "gguf" / "reference.gguf"}
    for key, weights in (("model", model), ("reference", perturbed(model))):
        weights.save_pretrained(paths[key])
        tokenizer.save_pretrained(paths[key])
    paths["gguf"].parent.mkdir()
    write_gguf(perturbed(model), tokenizer, paths["gguf"])
    return paths


def from_disk(path, dtype=torch.float32):
    """A checkpoint as transformers loads it, without the project's loader."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Dozens of tiny forwards: on a shared 2-core machine one intra-op thread runs them ~20x faster."""
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def text_metric():
    return evaluate.load(str(ROOT / "perplexity_metric.py"), "text", keep_in_memory=True)


# ---------------------------------------------------------------------------------------
# The independent reference: each window alone, each model's own logits, float64
# ---------------------------------------------------------------------------------------


def windows(num_tokens, max_length, stride):
    """(start, stop, num_scored): the first window scores all it sees, later ones `stride` new
    targets with up to `max_length` tokens of input (the metric's documented plan)."""
    out, scored = [], 0
    while scored < num_tokens - 1:
        stop = min(scored + (max_length if not out else stride), num_tokens - 1)
        out.append((max(0, stop - max_length), stop, stop - scored))
        scored = stop
    return out


@torch.inference_mode()
def float64_loop(model, reference, tokenizer, texts, max_length=32, stride=16):
    """Per text, per scored token: log p(target) under the model (and the reference), KL(reference ||
    model) and argmax agreement, from each model's own logits in its own dtype upcast to float64."""
    docs = []
    for text in texts:
        seq = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        parts = []
        for start, stop, num_scored in windows(len(seq), max_length, stride):
            n = stop - start
            inputs = {"input_ids": torch.tensor([seq[start:stop]]), "attention_mask": torch.ones(1, n, dtype=torch.long),
                      "position_ids": torch.arange(n)[None]}
            targets = torch.tensor(seq[stop - num_scored + 1 : stop + 1])[:, None]
            logm = model(**inputs).logits[0, -num_scored:].double().log_softmax(-1)
            columns = [logm.gather(-1, targets)[:, 0]]
            if reference is not None:
                logp = reference(**inputs).logits[0, -num_scored:].double().log_softmax(-1)
                columns += [logp.gather(-1, targets)[:, 0], (logp.exp() * (logp - logm)).sum(-1),
                            (logm.argmax(-1) == logp.argmax(-1)).double()]
            parts.append(torch.stack(columns, 1))
        doc = torch.cat(parts).numpy()
        assert len(doc) == len(seq) - 1 and np.isfinite(doc).all()
        docs.append(doc)
    return docs


def se(values):
    """llama.cpp's standard error of a mean."""
    return math.sqrt((np.mean(values**2) - np.mean(values) ** 2) / (len(values) - 1))


def pooled(docs):
    """The result's keys from `float64_loop`'s documents, pooled with numpy."""
    cat = np.concatenate(docs)
    nll = -cat[:, 0]
    expected = {"num_tokens": len(nll), "perplexity": math.exp(nll.mean()),
                "perplexities": [math.exp(-d[:, 0].mean()) for d in docs], "log_likelihoods": [d[:, 0].sum() for d in docs]}
    if cat.shape[1] == 1:
        return expected
    ref_nll, kl, same = -cat[:, 1], cat[:, 2], cat[:, 3]
    p50, p90, p99 = np.quantile(kl, [0.5, 0.9, 0.99])
    return {**expected,
            "reference_perplexity": math.exp(ref_nll.mean()),
            "reference_perplexities": [math.exp(-d[:, 1].mean()) for d in docs],
            "perplexity_ratio": math.exp((nll - ref_nll).mean()),
            "log_perplexity_ratio": (nll - ref_nll).mean(),
            "log_perplexity_ratio_se": se(nll - ref_nll),
            "kl_divergence": kl.mean(),
            "kl_divergence_se": se(kl),
            "kl_divergence_quantiles": {"p50": p50, "p90": p90, "p99": p99, "max": kl.max()},
            "top1_agreement": same.mean(),
            "rms_delta_p": math.sqrt(np.mean((np.exp(-nll) - np.exp(-ref_nll)) ** 2)),
            "nll_correlation": np.corrcoef(nll, ref_nll)[0, 1]}


NATS = {"log_likelihoods", "log_perplexity_ratio", "log_perplexity_ratio_se", "kl_divergence", "kl_divergence_se",
        "kl_divergence_quantiles"}
EXACT_FROM_A_FILE = ("perplexity", "perplexities", "reference_perplexity", "reference_perplexities", "perplexity_ratio",
                     "log_perplexity_ratio", "log_perplexity_ratio_se", "top1_agreement", "rms_delta_p", "nll_correlation",
                     "log_likelihoods")


def assert_matches(result, expected, keys=None, rel=1e-6, nats=1e-6):
    """Every expected key (or `keys`) within `rel` relative, plus `nats` absolute for values in nats."""
    assert result["num_tokens"] == expected["num_tokens"]
    worst = {}
    for key in keys or expected:
        got, want = result[key], expected[key]
        if isinstance(want, dict):
            got, want = [got[q] for q in want], list(want.values())
        if key == "top1_agreement":  # a count of tokens: exactly the same ones agree
            assert round(got * expected["num_tokens"]) == round(want * expected["num_tokens"]), key
            continue
        got, want = np.atleast_1d(got).astype(float), np.atleast_1d(want).astype(float)
        absolute = nats if key in NATS else 1e-10 if key == "rms_delta_p" else 0.0  # a difference of probabilities ~3e-4
        worst[key] = float(np.max(np.abs(got - want) / (rel * np.abs(want) + absolute)))
    print("gaps as fractions of the tolerance:", {k: f"{v:.2g}" for k, v in worst.items()})
    assert max(worst.values()) <= 1, worst


COMMON = {"device": "cpu", "bootstrap_resamples": 100, **WINDOWS}


# ---------------------------------------------------------------------------------------
# Each way of naming a reference, against the loop over the two models
# ---------------------------------------------------------------------------------------


def test_reference_model_id_matches_the_float64_loop(text_metric, checkpoints):
    result = text_metric.compute(predictions=TEXTS, model_id=str(checkpoints["model"]),
                                 reference_model_id=str(checkpoints["reference"]), **COMMON)
    tokenizer = build_tiny_tokenizer()
    expected = pooled(float64_loop(from_disk(checkpoints["model"]), from_disk(checkpoints["reference"]), tokenizer, TEXTS))
    assert expected["num_tokens"] == 196 and expected["kl_divergence"] > 0.05  # a real difference to measure
    assert_matches(result, expected)
    low, high = result["perplexity_ratio_ci"]
    assert low <= result["perplexity_ratio"] <= high and result["kl_divergence_sampling_se"] == 0.0  # exact KL


def test_reference_gguf_file_matches_the_float64_loop(text_metric, checkpoints):
    # the loop runs the weights the GGUF was written from (the `reference` folder), not the GGUF
    result = text_metric.compute(predictions=TEXTS, model_id=str(checkpoints["model"]),
                                 reference_gguf_file=str(checkpoints["gguf"]), **COMMON)
    expected = pooled(float64_loop(from_disk(checkpoints["model"]), from_disk(checkpoints["reference"]),
                                   build_tiny_tokenizer(), TEXTS))
    assert expected["kl_divergence"] > 0.05
    assert_matches(result, expected)


@pytest.mark.parametrize("reference_dtype", ["bfloat16", "float16"])
def test_reference_dtype_alone_compares_with_the_models_own_checkpoint_in_that_dtype(text_metric, checkpoints, reference_dtype):
    # one window per forward, as in the loop: a padded half-precision batch moves the padded row's
    # values (here up to 2e-5 relative on the short text), as much as the dtype itself does
    result = text_metric.compute(predictions=TEXTS, model_id=str(checkpoints["model"]), reference_dtype=reference_dtype,
                                 batch_size=1, **COMMON)
    half = from_disk(checkpoints["model"], getattr(torch, reference_dtype))
    expected = pooled(float64_loop(from_disk(checkpoints["model"]), half, build_tiny_tokenizer(), TEXTS))
    # the half-precision copy differs from the float32 model by rounding alone (KL 3e-5 nats in bfloat16,
    # 5e-7 in float16; the ratio moves by 3e-5): small, but far above the tolerances
    assert 1e-7 < expected["kl_divergence"] < 1e-3 and abs(expected["log_perplexity_ratio"]) > 1e-5
    assert_matches(result, expected, nats=2e-8)


def test_reference_file_from_save_reference_matches_the_float64_loop(text_metric, checkpoints, tmp_path):
    from ppl_runner import save_reference

    tokenizer = build_tiny_tokenizer()
    reference = from_disk(checkpoints["reference"])
    path = tmp_path / "reference.parquet"
    save_reference(reference, tokenizer, ((i, None, text) for i, text in enumerate(TEXTS)), path, progress=False, **WINDOWS)
    result = text_metric.compute(predictions=TEXTS, model_id=str(checkpoints["model"]), reference_file=str(path), **COMMON)
    expected = pooled(float64_loop(from_disk(checkpoints["model"]), reference, tokenizer, TEXTS))
    # log-probs and top-1 are stored: exact; KL is estimated from the top 32 and 32 sampled tokens
    assert_matches(result, expected, keys=EXACT_FROM_A_FILE)
    sampling_se = result["kl_divergence_sampling_se"]
    assert 0 < sampling_se < 0.1 * expected["kl_divergence"]
    assert abs(result["kl_divergence"] - expected["kl_divergence"]) <= 4 * sampling_se


# ---------------------------------------------------------------------------------------
# Refusals, by their message, before anything is scored
# ---------------------------------------------------------------------------------------


def counting_forwards(model):
    calls = []
    return calls, model.get_input_embeddings().register_forward_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("loads", [{"reference_model_id": "REF"}, {"reference_gguf_file": "GGUF"},
                                   {"reference_dtype": "float32"}])
def test_a_loaded_reference_and_one_to_load_are_refused(text_metric, tiny, checkpoints, loads):
    model, tokenizer = tiny
    loads = {k: str(checkpoints["reference"]) if v == "REF" else str(checkpoints["gguf"]) if v == "GGUF" else v
             for k, v in loads.items()}
    calls, handle = counting_forwards(model)
    try:
        with pytest.raises(TypeError, match=r"either `reference_model` or `reference_model_id`/`reference_gguf_file`/"
                                             r"`reference_dtype`, but got both"):
            text_metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, reference_model=model, **loads)
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize("reference", ["reference_model", "reference_model_id"])
def test_a_reference_model_and_a_reference_file_are_refused(text_metric, tiny, checkpoints, tmp_path, reference):
    model, tokenizer = tiny
    given = {"reference_model": build_tiny_gpt2(seed=1)} if reference == "reference_model" else \
        {"reference_model_id": str(checkpoints["reference"])}
    calls, handle = counting_forwards(model)
    try:
        # the file need not exist: the pair is refused before anything is read or loaded, naming what was given
        with pytest.raises(ValueError, match=rf"either `reference_file` or a reference model, but got both: "
                                             rf"`reference_file` and `{reference}`\.$"):
            text_metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, reference_file=str(tmp_path / "ref.parquet"),
                                **given)
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize("reference", ["reference_model", "reference_model_id", "reference_gguf_file", "reference_dtype",
                                       "reference_file"])
def test_distributed_with_a_reference_is_refused(text_metric, tiny, checkpoints, tmp_path, reference):
    model, tokenizer = tiny
    value = {"reference_model": build_tiny_gpt2(seed=1), "reference_model_id": str(checkpoints["reference"]),
             "reference_gguf_file": str(checkpoints["gguf"]), "reference_dtype": "bfloat16",
             "reference_file": str(tmp_path / "ref.parquet")}[reference]
    model_args = {"model_id": str(checkpoints["model"])} if reference == "reference_dtype" else \
        {"model": model, "tokenizer": tokenizer}
    with pytest.raises(ValueError, match="A comparison with a reference runs on one process: pass it without `distributed=True`"):
        text_metric.compute(predictions=TEXTS, distributed=True, **model_args, **{reference: value})


def test_reference_dtype_with_a_loaded_model_is_refused(text_metric, tiny):
    model, tokenizer = tiny
    calls, handle = counting_forwards(model)
    try:
        with pytest.raises(ValueError, match=r"Expected `reference_model_id` or `reference_gguf_file` with a loaded `model`: "
                                             r"which checkpoint `reference_dtype` applies to"):
            text_metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, reference_dtype="bfloat16")
    finally:
        handle.remove()
    assert not calls
