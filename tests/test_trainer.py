"""transformers' Trainer with the metric's `preprocess_logits_for_metrics` and `compute_metrics`.

A real `Trainer.evaluate` of a tiny GPT-2 with a 12,000-token vocabulary over right-padded
batches of real paragraphs, at several eval batch sizes, against a float64 loop that runs the
model over each paragraph alone; and the two functions on their own against a five-line
float64 reference.
"""

import doctest
import math
import tempfile

import evaluate
import numpy as np
import pytest
import torch

import ppl_trainer
from conftest import ROOT, build_tiny_tokenizer
from perplexity_metric import compute_metrics, preprocess_logits_for_metrics

BATCH_SIZES = (1, 3, 8)
VOCAB = 12_000  # the tiny tokenizer's 1,000 ids are scored against all 12,000 logits


def reference_sums(logits, labels):
    """Five lines in float64: log-softmax, gather the next token's log-prob, sum per sequence."""
    logprobs = torch.log_softmax(logits.double()[:, :-1], dim=-1)
    target = labels[:, 1:]
    mask = target != -100
    picked = logprobs.gather(-1, torch.where(mask, target, 0)[..., None])[..., 0]
    return torch.stack([-(picked * mask).sum(-1), mask.sum(-1).double()], dim=1)


def collate(rows):
    """Right padding; labels are the input ids with -100 at padding (the model shifts them)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = labels[i, :n] = torch.tensor(r["input_ids"])
        attention[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


@pytest.fixture(scope="module")
def trainer_runs():
    """Trainer.evaluate at each batch size, and the float64 loop over the same sequences."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from ppl_corpus import default_corpus, split_paragraphs

    tokenizer = build_tiny_tokenizer()  # trained on default_corpus()[:20]; the paragraphs come from later documents
    paragraphs = [p for p in split_paragraphs("\n\n".join(default_corpus()[20:40])) if len(p) >= 20][:40]
    sequences = [[0] + tokenizer(p, add_special_tokens=False)["input_ids"][:200] for p in paragraphs]
    sequences.append([0])  # a start token alone: nothing to score
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=VOCAB, n_positions=256, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    metric = evaluate.load(str(ROOT / "perplexity_metric.py"), keep_in_memory=True)
    dataset = [{"input_ids": s} for s in sequences]
    results = {}
    for batch_size in BATCH_SIZES:
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(output_dir=out, per_device_eval_batch_size=batch_size, report_to=[], use_cpu=True,
                                     disable_tqdm=True)
            trainer = Trainer(model=model, args=args, eval_dataset=dataset, data_collator=collate,
                              preprocess_logits_for_metrics=metric.preprocess_logits_for_metrics,
                              compute_metrics=metric.compute_metrics)
            results[batch_size] = trainer.evaluate()
    model64 = GPT2LMHeadModel(config)
    model64.load_state_dict(model.state_dict())
    model64 = model64.double().eval()
    nll, count = [], 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            logprobs = torch.log_softmax(model64(ids).logits[0, :-1], dim=-1)  # (len - 1, vocab), float64
            nll.append(-logprobs.gather(1, ids[0, 1:, None]).sum().item())
            count += len(seq) - 1
    return results, {"nll": math.fsum(nll) / count, "num_tokens": count}


def test_trainer_perplexity_equals_float64_loop_at_every_batch_size(trainer_runs):
    results, ref = trainer_runs
    for batch_size, r in results.items():
        assert r["eval_num_tokens"] == ref["num_tokens"]
        assert r["eval_nll"] == pytest.approx(ref["nll"], rel=1e-6), batch_size
        assert r["eval_perplexity"] == pytest.approx(math.exp(ref["nll"]), rel=1e-6), batch_size


def test_trainer_perplexity_does_not_depend_on_batch_size(trainer_runs):
    results, _ = trainer_runs
    values = [r["eval_perplexity"] for r in results.values()]
    # Differently padded batches are different float32 computations (other matrix shapes, masked or
    # unmasked attention), rounded differently on each CPU: measured ~1e-9 relative here. Perplexity
    # is exp(nll) with nll ~ 9.4, so rel 1e-5 on it is ~1e-6 on the nll, ~8 float32 ulps (eps 1.2e-7) even if
    # every token's rounding leaned the same way; what this guards against, exp(eval_loss)'s mean of
    # per-batch means, moves by more than 1% (test_exp_eval_loss_is_not_the_corpus_perplexity).
    assert max(values) / min(values) - 1 < 1e-5, values


def test_exp_eval_loss_is_not_the_corpus_perplexity(trainer_runs):
    """Trainer's eval_loss is a mean of per-batch means, so its exp moves with the batch size."""
    results, ref = trainer_runs
    corpus = math.exp(ref["nll"])
    off = {bs: math.exp(r["eval_loss"]) / corpus - 1 for bs, r in results.items()}
    assert all(abs(v) > 0.01 for v in off.values()), off
    assert max(off.values()) - min(off.values()) > 0.01, off


def test_loaded_metric_offers_the_trainer_functions():
    metric = evaluate.load(str(ROOT / "perplexity_metric.py"), keep_in_memory=True)
    logits = torch.randn(2, 5, 7, generator=torch.manual_seed(0))
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 1, -100, -100]])
    rows = metric.preprocess_logits_for_metrics(logits, labels)
    assert torch.allclose(rows, reference_sums(logits, labels), rtol=1e-6, atol=0)
    assert metric.compute_metrics((rows.numpy(), labels.numpy()))["num_tokens"] == 6


def test_rows_equal_reference_for_float_dtypes():
    labels = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, -100, -100], [-100, 5, 8, 9, 7, 9]])
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits = (4 * torch.randn(3, 6, 10, generator=torch.manual_seed(1))).to(dtype)
        rows = preprocess_logits_for_metrics(logits, labels)
        assert rows.dtype == torch.float64 and rows.shape == (3, 2)
        assert torch.allclose(rows, reference_sums(logits, labels), rtol=1e-6, atol=0), dtype


def test_tuple_outputs_use_the_first_element():
    logits = torch.randn(2, 4, 9, generator=torch.manual_seed(2))
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, -100, -100]])
    extra = torch.randn(2, 4, 64)  # e.g. hidden states a model also returned
    assert torch.equal(preprocess_logits_for_metrics((logits, extra), labels), preprocess_logits_for_metrics(logits, labels))
    assert torch.equal(preprocess_logits_for_metrics([logits], labels), preprocess_logits_for_metrics(logits, labels))


def test_a_logits_view_is_read_in_place(monkeypatch):
    """A non-contiguous view reaches the chunked core as a view of the same storage: no copy."""
    storage = torch.randn(2, 6, 2 * 11, generator=torch.manual_seed(3))
    logits = storage[:, :, ::2]  # (2, 6, 11), non-contiguous
    assert not logits.is_contiguous()
    labels = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, -100, -100]])
    seen = []

    def spy(preds, target, ignore_index=None):
        seen.append(preds)
        return ppl_core_target_nll(preds, target, ignore_index)

    ppl_core_target_nll = ppl_trainer.target_nll
    monkeypatch.setattr(ppl_trainer, "target_nll", spy)
    rows = ppl_trainer.preprocess_logits_for_metrics(logits, labels)
    assert len(seen) == 1 and seen[0].untyped_storage().data_ptr() == storage.untyped_storage().data_ptr()
    assert seen[0].shape == (2, 5, 11)
    assert torch.allclose(rows, reference_sums(logits, labels), rtol=1e-6, atol=0)


def test_rows_with_no_scored_token():
    logits = torch.randn(3, 4, 5, generator=torch.manual_seed(4))
    labels = torch.tensor([[1, 2, 3, 4], [-100, -100, -100, -100], [2, -100, -100, -100]])  # the last scores nothing after the shift
    rows = preprocess_logits_for_metrics(logits, labels)
    assert rows[1].tolist() == [0.0, 0.0] and rows[2].tolist() == [0.0, 0.0]
    result = compute_metrics((rows.numpy(), None))
    assert result["num_tokens"] == 3
    assert result["perplexity"] == pytest.approx(math.exp(reference_sums(logits, labels)[0, 0].item() / 3), rel=1e-6)
    assert preprocess_logits_for_metrics(logits[:, :1], labels[:, :1]).tolist() == [[0.0, 0.0]] * 3  # one position
    with pytest.raises(ValueError, match="No token was scored"):
        compute_metrics((rows[1:].numpy(), None))


def test_pooling_is_independent_of_batches_and_processes():
    """Trainer hands compute_metrics every process's rows, in gather order; the pool is a sum."""
    rows = np.abs(np.random.default_rng(0).normal(50, 30, size=(37, 2))).round()
    from transformers import EvalPrediction

    whole = compute_metrics(EvalPrediction(predictions=rows, label_ids=None))
    two_processes = np.concatenate([rows[0::2], rows[1::2]])  # what rank-interleaved gathering yields
    assert compute_metrics(EvalPrediction(predictions=two_processes, label_ids=None)) == whole
    per_batch = [rows[i : i + 5] for i in range(0, 37, 5)]  # eval_do_concat_batches=False
    assert compute_metrics(EvalPrediction(predictions=per_batch, label_ids=None)) == whole
    assert whole["num_tokens"] == int(rows[:, 1].sum())
    assert whole["nll"] == pytest.approx(rows[:, 0].sum() / rows[:, 1].sum(), rel=1e-12)


@pytest.mark.parametrize(
    "logits, labels, error, message",
    [
        (torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long), ValueError, r"`logits` and `labels` to agree on \[batch_size, seq_len\], but got \[2, 5\] and \[2, 4\]"),
        (torch.zeros(3, 5, 7), torch.zeros(2, 5, dtype=torch.long), ValueError, r"`logits` and `labels` to agree"),
        (torch.zeros(5, 7), torch.zeros(1, 5, dtype=torch.long), ValueError, r"`logits` is expected to have 3 dimensions"),
        (torch.zeros(1, 5, 7), torch.zeros(5, dtype=torch.long), ValueError, r"`labels` is expected to have 2 dimensions"),
        (torch.zeros(1, 5, 7), None, TypeError, r"`labels` to be a torch.Tensor, but got NoneType"),
        (np.zeros((1, 5, 7)), torch.zeros(1, 5, dtype=torch.long), TypeError, r"`logits` to be a torch.Tensor"),
        ((), torch.zeros(1, 5, dtype=torch.long), ValueError, r"`logits` .* non-empty tuple"),
        (torch.zeros(1, 5, 7), torch.tensor([[1, 2, 7, 0, 0]]), ValueError, r"`labels` ids in \[0, 7\)"),
        (torch.zeros(1, 5, 7), torch.zeros(1, 5), TypeError, r"`labels` to hold integer token ids"),
    ],
)
def test_preprocess_refuses_bad_inputs(logits, labels, error, message):
    with pytest.raises(error, match=message):
        preprocess_logits_for_metrics(logits, labels)


def test_compute_metrics_refuses_what_preprocess_did_not_make():
    with pytest.raises(ValueError, match=r"but got shape \[4, 6, 9\]: pass `preprocess_logits_for_metrics="):
        compute_metrics((np.zeros((4, 6, 9), dtype=np.float32), np.zeros((4, 6))))  # full logits
    with pytest.raises(ValueError, match="whole token count"):
        compute_metrics((np.array([[3.0, 2.0], [-100.0, -100.0]]), None))
    with pytest.raises(ValueError, match="batch_eval_metrics"):
        compute_metrics((np.array([[3.0, 2.0]]), None), compute_result=False)


def test_docstring_examples():
    failures, tried = doctest.testmod(ppl_trainer)
    assert tried >= 2 and failures == 0
