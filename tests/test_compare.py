"""Comparing a model with a reference model (`evaluate_texts(reference_model=...)`,
`save_reference` + `reference_file=...`) against an independent float64 loop written here:
each window of `plan_windows` run alone through both models' plain `model(input_ids).logits`,
float64 log-softmax, KL(reference || model), argmax agreement and p(target) per token, pooled
with numpy. Real text is hard-coded (public-domain English) so the file runs without ../shared.

Measured on the 2-core CPU machines:
- the embedded SmolLM2's dynamic-int8 copy against the original, one window per forward: every
  key within 2e-7 relative of the loop (the fused head's float32 logits against the model's own);
- the int8 copy is not a function of its own window alone: torch's dynamic quantization scales
  activations per *tensor*, so the other windows of a batch (and its padding) move its logits,
  by tens of nats at single positions (on four short texts, perplexity 57.7 at batch_size=1
  against 72.8 at batch_size=4). A per-window loop can check it at batch_size=1 only; batches of
  4 padded left or right are checked with a float32 copy of the model whose weight matrices
  carry a fixed 2% noise (a mild variant that, like any float32 model, ignores its batch);
- such a padded float32 batch is within about 1e-6 relative of the loop (masked attention rounds
  otherwise than one window alone), one token's KL within a few 1e-6 nats.
"""

import copy
import math
import os

import numpy as np
import pytest
import torch

from conftest import build_tiny_gpt2, build_tiny_tokenizer, one_intra_op_thread
from ppl_compare import ModelReference
from ppl_head import fused_head
from ppl_runner import evaluate_texts, plan_windows, pool_rows, save_reference, text_rows

# Public-domain English (Dickens, Austen, Lincoln, Melville, the Declaration of Independence,
# Tolstoy in Garnett's translation, Darwin, Conan Doyle): 8 documents, 254 scored tokens for
# SmolLM2. The first is the long one: 74 scored tokens, four windows at max_length=32, stride=16.
TEXTS = [
    ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness, "
     "it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it was the season of "
     "Darkness, it was the spring of hope, it was the winter of despair."),
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in Liberty.",
    ("Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about a little and see the "
     "watery part of the world."),
    "We hold these truths to be self-evident, that all men are created equal.",
    "Happy families are all alike; every unhappy family is unhappy in its own way.",
    ("When we look to the individuals of the same variety or sub-variety of our older cultivated plants and animals, "
     "one of the first points which strikes us is that they generally differ much."),
    "To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any other name.",
]

# Keys whose values are plain numbers compared with `rel`; the rest are checked one by one.
SCALAR_KEYS = ("perplexity", "reference_perplexity", "perplexity_ratio", "log_perplexity_ratio", "log_perplexity_ratio_se",
               "kl_divergence", "kl_divergence_se", "top1_agreement", "top1_agreement_se", "rms_delta_p", "nll_correlation")


# ---------------------------------------------------------------------------------------
# The independent reference: one window at a time, float64, pooled with numpy
# ---------------------------------------------------------------------------------------


def first_token(tokenizer):
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


@torch.inference_mode()
def float64_loop(model, reference, tokenizer, texts, max_length, stride):
    """Per document, per scored token (in order): the model's and the reference's log p(target),
    KL(reference || model) in nats, and whether both argmaxes agree."""
    docs = []
    for text in texts:
        seq = [first_token(tokenizer)] + tokenizer(text, add_special_tokens=False)["input_ids"]
        parts = []
        for start, stop, num_scored in plan_windows(len(seq), max_length, stride):
            ids = torch.tensor([seq[start:stop]])
            targets = torch.tensor(seq[stop - num_scored + 1 : stop + 1])[:, None]
            logp = model(ids).logits[0, -num_scored:].double().log_softmax(-1)
            ref = reference(ids).logits[0, -num_scored:].double().log_softmax(-1)
            kl = (ref.exp() * (ref - logp)).sum(-1)
            same = (logp.argmax(-1) == ref.argmax(-1)).double()
            parts.append(torch.stack([logp.gather(-1, targets)[:, 0], ref.gather(-1, targets)[:, 0], kl, same], 1))
        doc = torch.cat(parts).numpy()
        assert len(doc) == len(seq) - 1 and np.isfinite(doc).all()
        docs.append({"logprob": doc[:, 0], "reference_logprob": doc[:, 1], "kl": doc[:, 2], "same": doc[:, 3]})
    return docs


def llama_se(values):
    """llama.cpp's standard error of a mean: sqrt((mean(x^2) - mean(x)^2) / (n - 1))."""
    values = np.asarray(values, dtype=np.float64)
    return math.sqrt((np.mean(values**2) - np.mean(values) ** 2) / (len(values) - 1))


def pooled(docs):
    """Every comparison key the runner reports, from `float64_loop`'s documents."""
    def cat(key):
        return np.concatenate([d[key] for d in docs])

    nll, ref_nll, kl, same = -cat("logprob"), -cat("reference_logprob"), cat("kl"), cat("same")
    p50, p90, p99 = np.quantile(kl, [0.5, 0.9, 0.99])
    return {
        "perplexity": math.exp(nll.mean()),
        "perplexities": [math.exp(-d["logprob"].mean()) for d in docs],
        "reference_perplexity": math.exp(ref_nll.mean()),
        "reference_perplexities": [math.exp(-d["reference_logprob"].mean()) for d in docs],
        "perplexity_ratio": math.exp((nll - ref_nll).mean()),
        "log_perplexity_ratio": (nll - ref_nll).mean(),
        "log_perplexity_ratio_se": llama_se(nll - ref_nll),
        "kl_divergence": kl.mean(),
        "kl_divergence_se": llama_se(kl),
        "kl_divergence_quantiles": {"p50": p50, "p90": p90, "p99": p99, "max": kl.max()},
        "top1_agreement": same.mean(),
        "top1_agreement_se": llama_se(same),
        "rms_delta_p": math.sqrt(np.mean((np.exp(-nll) - np.exp(-ref_nll)) ** 2)),
        "nll_correlation": np.corrcoef(nll, ref_nll)[0, 1],
        "num_tokens": len(nll),
    }


NATS = ("log_perplexity_ratio", "log_perplexity_ratio_se", "kl_divergence", "kl_divergence_se", "kl_divergence_quantiles")


def gaps(result, expected, rel, nats):
    """Each compared value's gap as a fraction of its tolerance: `rel` relative, plus `nats`
    absolute for values in nats (a log-ratio or a KL near 0 has no useful relative scale)."""
    pairs = {key: [(result[key], expected[key])] for key in SCALAR_KEYS}
    for key in ("perplexities", "reference_perplexities"):
        pairs[key] = list(zip(result[key], expected[key], strict=True))
    pairs["kl_divergence_quantiles"] = [(result["kl_divergence_quantiles"][q], expected["kl_divergence_quantiles"][q])
                                        for q in ("p50", "p90", "p99", "max")]
    return {key: max(abs(a - b) / (rel * abs(b) + (nats if key in NATS else 0.0)) for a, b in values)
            for key, values in pairs.items()}


def assert_matches_loop(result, expected, rel=1e-6, nats=0.0):
    assert result["num_tokens"] == expected["num_tokens"]
    assert set(result["kl_divergence_quantiles"]) == {"p50", "p90", "p99", "max"}
    # both agreement counts are integers: exactly the same tokens agree
    assert round(result["top1_agreement"] * result["num_tokens"]) == round(expected["top1_agreement"] * expected["num_tokens"])
    assert result["kl_divergence_sampling_se"] == 0.0  # exact KL: no sampling
    low, high = result["perplexity_ratio_ci"]
    assert low <= result["perplexity_ratio"] <= high
    worst = gaps(result, expected, rel, nats)
    print(f"gaps as fractions of rel={rel:g}" + (f" (+{nats:g} nats)" if nats else "") + ":",
          {k: f"{v:.2g}" for k, v in worst.items()})
    assert max(worst.values()) <= 1, worst


# ---------------------------------------------------------------------------------------
# Fixtures: the real model's variants (built once per module), its comparisons
# ---------------------------------------------------------------------------------------


def noisy_copy(model, scale, seed=0):
    """A float32 copy whose weight matrices carry a fixed relative Gaussian noise."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in other.named_parameters():
            if param.ndim == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale * param.std())
    return other.eval()


@pytest.fixture(scope="module")
def int8(smol):
    from ppl_sources import quantize_dynamic_int8

    return quantize_dynamic_int8(smol[0])


@pytest.fixture(scope="module")
def noisy(smol):
    return noisy_copy(smol[0], 0.02)


SMOL_WINDOWS = {"max_length": 32, "stride": 16}


@pytest.fixture(scope="module")
def int8_exact(smol, int8):
    """The int8 copy against the original on TEXTS, one window per forward, and the loop's values."""
    model, tokenizer = smol
    result = evaluate_texts(int8, tokenizer, TEXTS, reference_model=model, batch_size=1, padding_side="right",
                            progress=False, bootstrap_resamples=2000, seed=3, **SMOL_WINDOWS)
    docs = float64_loop(int8, model, tokenizer, TEXTS, **SMOL_WINDOWS)
    return result, docs


# ---------------------------------------------------------------------------------------
# 1. Every key against the float64 loop
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_int8_against_the_original_matches_the_float64_loop(int8_exact):
    result, docs = int8_exact
    expected = pooled(docs)
    assert len(plan_windows(len(docs[0]["kl"]) + 1, **SMOL_WINDOWS)) >= 4  # the long text spans several windows
    assert_matches_loop(result, expected, rel=1e-6)
    # a real lossy variant: clearly worse, clearly different
    assert result["perplexity_ratio"] > 1.5 and result["kl_divergence"] > 0.3 and result["top1_agreement"] < 0.8


def padded_rows(model):
    """Attention masks the body sees (to show that a batch really held padding)."""
    masks = []

    def hook(module, args, kwargs):
        if kwargs.get("attention_mask") is not None:
            masks.append(kwargs["attention_mask"].detach().clone())

    return masks, model.base_model.register_forward_pre_hook(hook, with_kwargs=True)


NOISY_TEXTS = [TEXTS[i] for i in (0, 1, 3, 7)]
NOISY_WINDOWS = {"max_length": 32, "stride": 24}  # windows of 32 (three of the long text), 31, 26, 22: batches padded


@pytest.fixture(scope="module")
def noisy_runs(smol, noisy):
    """The noisy copy against the original in batches of 4, padded on either side, and the loop's values."""
    model, tokenizer = smol
    runs = {}
    for side in ("left", "right"):
        masks, handle = padded_rows(noisy)
        try:
            runs[side] = evaluate_texts(noisy, tokenizer, NOISY_TEXTS, reference_model=model, batch_size=4, padding_side=side,
                                        progress=False, bootstrap_resamples=2000, seed=3, **NOISY_WINDOWS), masks
        finally:
            handle.remove()
    return runs, float64_loop(noisy, model, tokenizer, NOISY_TEXTS, **NOISY_WINDOWS)


@pytest.mark.slow
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batches_of_four_with_padding_match_the_float64_loop(noisy_runs, padding_side):
    (result, masks), docs = noisy_runs[0][padding_side], noisy_runs[1]
    padded = [m for m in masks if len(m) > 1 and (m == 0).any()]
    assert len(padded) == 2 and all((m[:, 0 if padding_side == "left" else -1] == 0).any() for m in padded)
    # float32 in a padded batch (masked attention) rounds otherwise than one window alone: ~1e-7
    # relative on the pooled values, up to 1e-6 on a document's, a few 1e-6 nats on one token's KL
    assert_matches_loop(result, pooled(docs), rel=1e-5, nats=1e-5)
    # a mild variant (2% weight noise: on these four texts it is even slightly better)
    assert abs(result["log_perplexity_ratio"]) < 0.1 and 0 < result["kl_divergence"] < 0.2 and result["top1_agreement"] > 0.8


@pytest.mark.parametrize("batch_size, padding_side, stride", [(1, "right", 24), (4, "left", 24), (4, "right", 48)])
def test_tiny_gpt2_against_a_perturbed_copy_matches_the_float64_loop(tiny, batch_size, padding_side, stride):
    model, tokenizer = tiny
    reference = noisy_copy(model, 1.0, seed=1)
    texts = [TEXTS[i] for i in (0, 1, 5, 7)]  # 138, 54, 39 and 42 tokens: windows of 48 (several), 41 and 38
    masks, handle = padded_rows(model)
    try:
        result = evaluate_texts(model, tokenizer, texts, reference_model=reference, max_length=48, stride=stride,
                                batch_size=batch_size, padding_side=padding_side, progress=False, bootstrap_resamples=200)
    finally:
        handle.remove()
    padded = [m for m in masks if len(m) > 1 and (m == 0).any()]
    assert bool(padded) == (batch_size > 1)
    assert all((m[:, 0 if padding_side == "left" else -1] == 0).any() for m in padded)
    expected = pooled(float64_loop(model, reference, tokenizer, texts, max_length=48, stride=stride))
    assert expected["num_tokens"] > 250
    assert_matches_loop(result, expected, rel=1e-6)
    assert result["kl_divergence"] > 1e-3


# ---------------------------------------------------------------------------------------
# 1b. Per-token values, document by document and in order
# ---------------------------------------------------------------------------------------
# The pooled keys (means, quantiles) do not depend on the order of the tokens: a per-token KL
# that is permuted, or whose windows are put back in the wrong order, passes them. Here each
# document's per-token columns (`text_rows(..., keep_logprobs=True)`, what the app and
# `--docs-out` show) are compared with the loop's, element by element.

PER_TOKEN_TEXTS = [TEXTS[i] for i in (0, 1, 5, 7)]  # 138, 54, 39 and 42 tiny-GPT-2 tokens
PER_TOKEN_WINDOWS = {"max_length": 48, "stride": 24}  # the first text: five windows, the second: two


def forward_rows(model):
    """The real (unpadded) input ids of each row of each forward through the model's body."""
    batches = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs["attention_mask"].bool()
        batches.append([tuple(row[keep].tolist()) for row, keep in zip(ids, mask)])

    return batches, model.base_model.register_forward_pre_hook(hook, with_kwargs=True)


def documents_of(batch, tokenizer, texts):
    """Which of `texts` each row of a batch is a window of (its ids are a slice of that text's)."""
    seqs = [(first_token(tokenizer), *tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    owners = []
    for row in batch:
        (owner,) = [d for d, seq in enumerate(seqs)
                    if any(seq[i : i + len(row)] == row for i in range(len(seq) - len(row) + 1))]
        owners.append(owner)
    return owners


def assert_tokens_match_loop(rows, docs, rel, nats):
    """Each document's per-token KL, log-probs and top-1 agreement equal the loop's, position by position."""
    assert len(rows) == len(docs)
    for row, doc in zip(rows, docs, strict=True):
        assert len(row["token_kl"]) == len(doc["kl"])
        np.testing.assert_allclose(row["token_kl"], doc["kl"], rtol=rel, atol=nats)
        np.testing.assert_allclose(row["logprobs"], doc["logprob"], rtol=rel, atol=nats)
        np.testing.assert_allclose(row["reference_logprobs"], doc["reference_logprob"], rtol=rel, atol=nats)
        assert row["token_same_top1"] == doc["same"].astype(bool).tolist()
        # and the document's sum is theirs
        assert row["kl"] == pytest.approx(doc["kl"].sum(), rel=rel, abs=len(doc["kl"]) * nats)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_each_documents_per_token_kl_matches_the_float64_loop_in_order(tiny, padding_side):
    model, tokenizer = tiny
    reference = noisy_copy(model, 1.0, seed=1)
    fused_head(model)  # the head's one-time probe (a forward on fixed ids) is not a batch of windows
    with one_intra_op_thread():  # tiny ops on 2 threads crawl when the other core is busy
        batches, handle = forward_rows(model)
        try:
            rows = text_rows(model, tokenizer, PER_TOKEN_TEXTS, compare=ModelReference(reference), keep_logprobs=True,
                             batch_size=4, padding_side=padding_side, progress=False, **PER_TOKEN_WINDOWS)
        finally:
            handle.remove()
        docs = float64_loop(model, reference, tokenizer, PER_TOKEN_TEXTS, **PER_TOKEN_WINDOWS)
    # several windows per document, and batches that pack windows of several documents
    assert [len(plan_windows(len(d["kl"]) + 1, **PER_TOKEN_WINDOWS)) for d in docs] == [5, 2, 1, 1]
    assert any(len(set(documents_of(batch, tokenizer, PER_TOKEN_TEXTS))) > 1 for batch in batches)
    # the per-token KL varies from token to token far more than the tolerance: a reordering shows
    assert min(np.abs(np.diff(d["kl"])).max() for d in docs) > 1e-4
    assert_tokens_match_loop(rows, docs, rel=1e-6, nats=1e-8)


# ---------------------------------------------------------------------------------------
# 1c. A model on the fused head against a reference on the logits fallback
# ---------------------------------------------------------------------------------------


def soft_capped(model, cap=3.0):
    """A copy of a GPT-2 whose forward soft-caps its logits (cap * tanh(logits / cap), as Gemma 2
    does, but without the config attribute): its logits are no longer its output layer's, so
    the head probe (`ppl_head.fused_head`) sends it to its own logits."""
    from transformers import GPT2LMHeadModel

    class SoftCappedGPT2(GPT2LMHeadModel):
        def forward(self, *args, logits_to_keep=0, **kwargs):  # keeps `logits_to_keep`: the runner trims with it
            out = super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = cap * torch.tanh(out.logits / cap)
            return out

    capped = SoftCappedGPT2(model.config)
    capped.load_state_dict(model.state_dict())
    return capped.eval()


def peaked_tiny_gpt2(seed):
    """A tiny GPT-2 with logits of a few nats (a random one is near uniform)."""
    model = build_tiny_gpt2(seed=seed)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(10)
    return model


@pytest.mark.parametrize("capped_side", ["reference", "model"])
def test_the_fused_head_against_the_logits_fallback_matches_the_float64_loop(tiny, monkeypatch, capped_side):
    import ppl_head

    tokenizer = tiny[1]
    plain, capped = peaked_tiny_gpt2(seed=0), soft_capped(noisy_copy(peaked_tiny_gpt2(seed=0), 0.3, seed=1))
    assert ppl_head.fused_head(plain) is not None and ppl_head.fused_head(capped) is None
    model, reference = (plain, capped) if capped_side == "reference" else (capped, plain)
    # 7 positions per chunk of logits: the fused head's chunks run over a batch's scored
    # positions, the fallback's restart at each row, so the two streams are cut at other places
    monkeypatch.setattr(ppl_head, "HEAD_CHUNK_BYTES", 7 * 1000 * 4)
    assert ppl_head.chunk_rows(1000) == 7
    compare = ModelReference(reference)
    with one_intra_op_thread():
        rows = text_rows(model, tokenizer, PER_TOKEN_TEXTS, compare=compare, keep_logprobs=True, batch_size=4,
                         padding_side="left", progress=False, **PER_TOKEN_WINDOWS)
        docs = float64_loop(model, reference, tokenizer, PER_TOKEN_TEXTS, **PER_TOKEN_WINDOWS)
    # a model on the fallback takes its reference there too (head="logits" for both)
    assert compare.head is None and (ppl_head.fused_head(model) is not None) == (capped_side == "reference")
    # logits of a few nats in a padded float32 batch: up to ~2e-6 relative per token measured
    assert_tokens_match_loop(rows, docs, rel=1e-5, nats=1e-6)
    result = pool_rows(rows, bootstrap_resamples=200)  # what evaluate_texts returns for these rows
    assert_matches_loop(result, pooled(docs), rel=1e-5, nats=1e-6)
    assert result["kl_divergence"] > 0.5  # the cap and the noise matter


# ---------------------------------------------------------------------------------------
# 2. The perplexity ratio's interval is paired
# ---------------------------------------------------------------------------------------


def bootstrap_ratio(nll, ref_nll, counts, *, paired, resamples=20000, seed=11):
    """Percentile bootstrap (95%) of perplexity / reference perplexity over documents: the
    same documents for both models (paired) or independent draws for each."""
    nll, ref_nll, counts = (np.asarray(x, dtype=np.float64) for x in (nll, ref_nll, counts))
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(counts), size=(resamples, len(counts)))
    j = i if paired else rng.integers(0, len(counts), size=(resamples, len(counts)))
    ratio = np.exp(nll[i].sum(1) / counts[i].sum(1) - ref_nll[j].sum(1) / counts[j].sum(1))
    return np.percentile(ratio, [2.5, 97.5])


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["int8, 8 documents", "noisy float32, 4 documents"])
def test_the_ratio_interval_is_paired_and_narrower_than_an_unpaired_one(request, pair):
    if pair.startswith("int8"):
        result, docs = request.getfixturevalue("int8_exact")
    else:
        runs, docs = request.getfixturevalue("noisy_runs")
        result = runs["left"][0]
    nll = [-d["logprob"].sum() for d in docs]
    ref_nll = [-d["reference_logprob"].sum() for d in docs]
    counts = [len(d["kl"]) for d in docs]
    correlation = np.corrcoef(np.array(nll) / counts, np.array(ref_nll) / counts)[0, 1]
    low, high = result["perplexity_ratio_ci"]
    paired = bootstrap_ratio(nll, ref_nll, counts, paired=True)
    unpaired = bootstrap_ratio(nll, ref_nll, counts, paired=False)
    print(f"{pair}: library {low:.4f}..{high:.4f}, paired {paired[0]:.4f}..{paired[1]:.4f}, "
          f"unpaired {unpaired[0]:.4f}..{unpaired[1]:.4f}; per-document NLL correlation {correlation:.3f}")
    assert correlation > 0.5  # documents hard for one model are hard for the other
    # the library's 2,000 draws land where 20,000 paired draws do (Monte Carlo error ~2% of the width)
    width = paired[1] - paired[0]
    assert abs(low - paired[0]) < 0.15 * width and abs(high - paired[1]) < 0.15 * width
    assert high - low < 0.6 * (unpaired[1] - unpaired[0])


# ---------------------------------------------------------------------------------------
# 3. A saved reference against the exact comparison
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(smol, tmp_path_factory):
    model, tokenizer = smol
    path = tmp_path_factory.mktemp("reference") / "smol.parquet"
    rows = save_reference(model, tokenizer, ((i, None, text) for i, text in enumerate(TEXTS)), path, batch_size=1,
                          progress=False, **SMOL_WINDOWS)
    return path, rows


@pytest.mark.slow
def test_the_saved_reference_agrees_with_the_exact_comparison(smol, int8, int8_exact, saved):
    exact, _ = int8_exact
    path, rows = saved
    _, tokenizer = smol
    assert [row["num_tokens"] for row in rows] == [len(d["kl"]) for d in int8_exact[1]]
    # batch_size=1 as in the exact run: the int8 model's logits depend on what shares its batch
    result = evaluate_texts(int8, tokenizer, TEXTS, reference_file=path, batch_size=1, padding_side="right",
                            progress=False, bootstrap_resamples=2000, seed=3, **SMOL_WINDOWS)
    for key in ("perplexity", "reference_perplexity", "perplexity_ratio", "top1_agreement", "rms_delta_p", "nll_correlation",
                "log_perplexity_ratio"):
        assert result[key] == pytest.approx(exact[key], rel=1e-9), key
    for key in ("perplexities", "reference_perplexities"):
        assert result[key] == pytest.approx(exact[key], rel=1e-9), key
    sampling_se = result["kl_divergence_sampling_se"]
    gap = abs(result["kl_divergence"] - exact["kl_divergence"])
    print(f"KL: file {result['kl_divergence']:.5f}, exact {exact['kl_divergence']:.5f}, gap {gap:.2e} = "
          f"{gap / sampling_se:.2f} sampling SE ({sampling_se:.2e}); {os.path.getsize(path) / exact['num_tokens']:.0f} B/token")
    assert sampling_se > 0 and gap <= 4 * sampling_se
    assert os.path.getsize(path) / exact["num_tokens"] < 1024


def counting_forwards(*models):
    """Count forward calls through each model's input embeddings (every route goes through them)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    return calls, [m.get_input_embeddings().register_forward_hook(hook) for m in models]


def other_vocabulary(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<an entirely new token>"])
    assert other.get_vocab() != tokenizer.get_vocab()
    return other


@pytest.mark.slow
@pytest.mark.parametrize("change, match", [({"max_length": 48}, "max_length"), ({"stride": 32}, "stride"),
                                           ({"tokenizer": True}, "tokenizer")])
def test_a_saved_reference_with_other_settings_is_refused_by_name(smol, saved, change, match):
    from ppl_head import fused_head

    model, tokenizer = smol
    path, _ = saved
    kwargs = {**SMOL_WINDOWS, **{k: v for k, v in change.items() if k != "tokenizer"}}
    fused_head(model)  # the head's one-time probe (a forward on fixed ids) is not scoring
    calls, handles = counting_forwards(model)
    try:
        with pytest.raises(ValueError, match=match) as err:
            evaluate_texts(model, other_vocabulary(tokenizer) if "tokenizer" in change else tokenizer, TEXTS[:2],
                           reference_file=path, progress=False, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert str(path) in str(err.value)
    assert calls[0] == 0


# ---------------------------------------------------------------------------------------
# 4. A reference of another vocabulary is refused before anything runs
# ---------------------------------------------------------------------------------------


def differently_trained_tokenizer():
    """A BPE of the same size (1000) as the tiny one (conftest), trained on other text: other ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ppl_corpus import default_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(default_corpus()[20:40], trainer)  # the tiny one: [:20]
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.mark.parametrize("case", ["wider output layer", "tokenizer with an added token", "tokenizer trained on other text"])
def test_a_reference_of_another_vocabulary_is_refused_before_scoring(tiny, case):
    from ppl_head import fused_head

    model, tokenizer = tiny
    reference, reference_tokenizer = build_tiny_gpt2(seed=1), None
    if case == "wider output layer":
        reference.resize_token_embeddings(1001)  # 1,001 logits against the model's 1,000
    elif case == "tokenizer with an added token":
        reference_tokenizer = other_vocabulary(tokenizer)
    else:
        reference_tokenizer = differently_trained_tokenizer()
        assert len(reference_tokenizer) == len(tokenizer) and reference_tokenizer.get_vocab() != tokenizer.get_vocab()
    fused_head(model)  # the model's one-time head probe (fixed ids, not a text) may run before the check
    calls, handles = counting_forwards(model, reference)
    try:
        with pytest.raises(ValueError, match="`reference_model`"):
            evaluate_texts(model, tokenizer, TEXTS[:2], reference_model=reference, reference_tokenizer=reference_tokenizer,
                           max_length=32, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert calls[0] == 0


def test_the_same_tokenizer_object_twice_and_an_equal_copy_are_accepted(tiny):
    model, tokenizer = tiny
    reference = build_tiny_gpt2(seed=1)
    results = [evaluate_texts(model, tokenizer, TEXTS[5:6], reference_model=reference, reference_tokenizer=t, max_length=32,
                              progress=False, bootstrap_resamples=10)
               for t in (None, tokenizer, build_tiny_tokenizer())]
    assert results[0]["kl_divergence"] == results[1]["kl_divergence"] == results[2]["kl_divergence"] > 0


# ---------------------------------------------------------------------------------------
# The per-chunk math on synthetic logits, against plain float64 formulas written here
# ---------------------------------------------------------------------------------------


def plain_kl(model_logits, reference_logits):
    """KL(reference || model) per row, float64, 0 log 0 = 0."""
    logm = model_logits.double().log_softmax(-1)
    logp = reference_logits.double().log_softmax(-1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logm), 0.0).sum(-1), logm, logp


def synthetic(rows=40, vocab=3000, noise=0.05, offset=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    reference = torch.randn(rows, vocab, generator=generator) * 3
    reference[:, :5] += 10  # peaked, like a language model's
    model = reference + noise * torch.randn(rows, vocab, generator=generator) + offset
    return model, reference, torch.randint(vocab, (rows,), generator=generator)


@pytest.mark.parametrize("offset", [0.0, 30.0])  # softmax ignores a constant offset; so must the precision
@pytest.mark.parametrize("noise", [0.3, 0.01])
def test_compare_logits_matches_a_float64_formula(noise, offset):
    from ppl_compare import compare_logits

    model, reference, labels = synthetic(noise=noise, offset=offset)
    kl, logm, logp = plain_kl(model, reference)
    got = compare_logits(model, reference, labels)
    assert got.dtype == torch.float64 and got.shape == (40, 5)
    assert got[:, 0].tolist() == pytest.approx(logm.gather(-1, labels[:, None])[:, 0].tolist(), abs=1e-6)
    assert got[:, 1].tolist() == pytest.approx(logp.gather(-1, labels[:, None])[:, 0].tolist(), abs=1e-6)
    # float32 exponentials bound it: within 3e-8 nats per token measured, whatever the offset
    assert got[:, 2].tolist() == pytest.approx(kl.tolist(), rel=1e-6, abs=6e-8)
    assert got[:, 2].mean().item() == pytest.approx(kl.mean().item(), rel=1e-6, abs=3e-8)
    assert got[:, 3].tolist() == (logm.argmax(-1) == logp.argmax(-1)).double().tolist()
    assert (got[:, 4] == 0).all()


def test_compare_logits_on_minus_infinity_half_precision_and_no_rows():
    from ppl_compare import compare_logits

    model, reference, labels = synthetic(rows=6, vocab=50)
    reference[0, 10:20] = -math.inf  # the reference rules tokens out: they add 0
    model[0, 10:20] = -math.inf
    reference[1, 30] = -math.inf  # only the reference does
    model[2, 7] = -math.inf  # the model rules out a token the reference allows: KL is infinite
    got = compare_logits(model, reference, labels)
    kl = plain_kl(model, reference)[0]
    assert torch.isinf(got[2, 2]) and torch.isinf(kl[2])
    assert torch.isfinite(got[[0, 1, 3, 4, 5], 2]).all()
    assert got[[0, 1, 3, 4, 5], 2].tolist() == pytest.approx(kl[[0, 1, 3, 4, 5]].tolist(), rel=1e-6, abs=6e-8)
    for dtype in (torch.bfloat16, torch.float16):  # as such models return them: the formula on the same values
        m, r = synthetic(rows=6, vocab=50)[:2]
        m, r = m.to(dtype), r.to(dtype)
        assert compare_logits(m, r, labels)[:, 2].tolist() == pytest.approx(plain_kl(m, r)[0].tolist(), rel=1e-6, abs=6e-8)
    assert compare_logits(model[:0], reference[:0], labels[:0]).shape == (0, 5)


def test_a_saved_record_estimates_kl_without_bias_and_keeps_what_is_exact():
    from ppl_compare import compare_logits, compare_record, reference_record

    model, reference, labels = synthetic(rows=400, vocab=2000, noise=0.5)
    exact = compare_logits(model, reference, labels)
    record = reference_record(reference, labels, torch.Generator().manual_seed(3), top_k=8, samples=16)
    got = compare_record(model, record, labels, 8, 16)
    assert got[:, [0, 1, 3]].tolist() == exact[:, [0, 1, 3]].tolist()  # log-probs and top-1: exact
    mean, sampling_se = got[:, 2].mean().item(), got[:, 4].sum().sqrt().item() / len(got)
    assert 0 < sampling_se < 0.05 * mean
    assert abs(mean - exact[:, 2].mean().item()) < 4 * sampling_se  # unbiased within its own error


def lm_like_logits(rows=128, vocab=1000, seed=0):
    """High-entropy reference logits shaped like a language model's (Zipf over the ranks plus
    noise: ~4.7 nats of entropy, ~40% of the mass outside the top 32), a model 0.5 nats of
    noise away (KL ~0.12 nats; the top 32 alone hold ~0.6 of it), and labels."""
    generator = torch.Generator().manual_seed(seed)
    zipf = -torch.arange(1, vocab + 1).log()
    reference = (zipf + torch.randn(rows, vocab, generator=generator))[:, torch.randperm(vocab, generator=generator)]
    model = reference + 0.5 * torch.randn(rows, vocab, generator=generator)
    return model, reference, torch.randint(vocab, (rows,), generator=generator)


SEEDS = 100


def test_the_saved_references_kl_is_unbiased_and_its_standard_error_is_its_spread_over_seeds():
    """A saved reference's KL is judged by its own sampling SE (`gap <= 4 * SE` above): that is
    only a check if the SE is right. Over SEEDS draws of the record (what `save_reference(seed=)`
    gives: a `Recorder(seed=)`), at the product's top_k and samples, the estimates must centre on
    the exact KL and spread as the reported SE says."""
    from ppl_compare import SAMPLES, TOP_K, Recorder, compare_record, pool_comparison, token_stats

    model, reference, labels = lm_like_logits()
    exact = plain_kl(model, reference)[0].mean().item()
    estimates, reported = [], []
    with one_intra_op_thread():
        for seed in range(SEEDS):
            record = Recorder(seed=seed).score_batch(lambda rows: iter([(0, reference)]), None, None, labels, None)
            columns = compare_record(model, record, labels, TOP_K, SAMPLES)
            row = {"index": 0, "nll": -columns[:, 0].sum().item(), "num_tokens": len(labels), **token_stats(columns)}
            result = pool_comparison([row])
            estimates.append(result["kl_divergence"])
            reported.append(result["kl_divergence_sampling_se"])
    estimates, reported = np.array(estimates), np.array(reported)
    spread = estimates.std(ddof=1)
    print(f"exact KL {exact:.5f}; over {SEEDS} seeds: mean {estimates.mean():.5f}, spread {spread:.2e}, "
          f"reported SE {reported.mean():.2e} (±{reported.std():.1e})")
    # (a) unbiased: the mean of the draws is within 4 of its own standard errors of the exact KL
    # (the top 32 alone would be ~0.6 of it, hundreds of standard errors away)
    assert abs(estimates.mean() - exact) <= 4 * spread / math.sqrt(SEEDS)
    # (b) the reported SE is the spread. Each estimate is a mean over 128 x 32 draws, so close to
    # normal: spread / sigma ~ sqrt(chi2(99) / 99), outside [0.68, 1.35] with probability ~2e-6.
    # The reported SE is itself an average over 128 tokens: it moves ~1% between seeds, so its
    # root mean square stands for sigma. An SE off by sqrt(samples) (5.7x) or one ignoring the
    # seed (spread 0) falls far outside.
    ratio = spread / math.sqrt(np.mean(reported**2))
    assert reported.std() < 0.05 * reported.mean()
    assert 0.68 <= ratio <= 1.35, ratio


def test_a_saved_record_with_an_empty_tail_ties_and_minus_infinity():
    from ppl_compare import compare_logits, compare_record, reference_record

    reference = torch.zeros(3, 12)
    reference[:, [2, 5, 9]] = 4.0  # three tied maxima: the exact path's top-1 is max()'s
    reference[1, 6:] = -math.inf  # six tokens with probability 0
    model = reference + 0.1 * torch.randn(3, 12, generator=torch.Generator().manual_seed(0)) * torch.isfinite(reference)
    labels = torch.tensor([0, 1, 2])
    for top_k in (2, 12):  # 12: the top k hold everything, the tail is empty (q = 0)
        record = reference_record(reference, labels, torch.Generator().manual_seed(0), top_k=top_k, samples=4)
        assert record[:, 2].long().tolist() == reference.max(-1).indices.tolist()
        got, exact = compare_record(model, record, labels, top_k, 4), compare_logits(model, reference, labels)
        assert torch.isfinite(got).all() and got[:, 3].tolist() == exact[:, 3].tolist()
        if top_k == 12:
            assert (record[:, 1] == 0).all() and (got[:, 4] == 0).all()
            assert got[:, 2].tolist() == pytest.approx(exact[:, 2].tolist(), rel=1e-6, abs=6e-8)
