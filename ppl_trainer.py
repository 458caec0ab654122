"""Token-weighted perplexity inside transformers' `Trainer`, with no logits kept.

Trainer's `eval_loss` is a mean of per-batch mean losses, so `exp(eval_loss)` moves with the
eval batch size (a batch of short sequences weighs as much as one of long ones); and a
`compute_metrics` that wants logits makes Trainer keep every batch's `[batch, seq_len, vocab]`
logits until the end. The two functions here avoid both:

    trainer = Trainer(model=model, args=args, eval_dataset=ds, data_collator=collate,
                      preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                      compute_metrics=compute_metrics)
    trainer.evaluate()["eval_perplexity"]

`preprocess_logits_for_metrics` reduces each batch at once, on the logits' device, to a
`[batch, 2]` float64 tensor of per-sequence (NLL sum, scored-token count); that is all Trainer
keeps. `compute_metrics` pools those rows token-weighted. Trainer gathers the rows of every
process (dropping the duplicates its sampler adds to even out the last batch) before calling
`compute_metrics`, and the pool is an exactly rounded sum (`math.fsum`), so the result depends
neither on the eval batch size nor on the number of processes, beyond each sequence's own
float rounding in the forward pass.
"""

import math

import numpy as np
import torch

if __package__:  # loaded by evaluate.load, beside perplexity_metric.py
    from .ppl_core import check_full_inputs, pooled_perplexity, scored_mask, sequence_sums, target_nll
else:
    from ppl_core import check_full_inputs, pooled_perplexity, scored_mask, sequence_sums, target_nll

IGNORE_INDEX = -100  # transformers' label for positions that do not count (padding, prompts)
_COLUMNS = 2  # per sequence: NLL sum (nats), scored-token count


def preprocess_logits_for_metrics(logits, labels, ignore_index=IGNORE_INDEX):
    """Reduce one eval batch to per-sequence (NLL sum, token count), keeping no logits.

    Causal shift as transformers' language-model loss: `logits[:, t]` predicts `labels[:, t + 1]`.
    The chunked core reads the shifted view `logits[:, :-1]` in place (no copy of the logits).

    Args:
        logits: `[batch, seq_len, vocab]` tensor (any float dtype, any device), or a tuple/list
            whose first element is that tensor (models returning more than logits).
        labels: `[batch, seq_len]` integer tensor, `ignore_index` where a token does not count.
        ignore_index: label value that is not scored (default -100).

    Returns:
        float64 tensor `[batch, 2]` on the logits' device: column 0 the NLL sum in nats,
        column 1 the number of scored tokens (0 for a sequence with none).

    Raises:
        TypeError: `logits` or `labels` is not a tensor (e.g. no labels in the eval batch).
        ValueError: wrong dimensions, `logits` and `labels` disagreeing on [batch, seq_len],
            label ids outside the vocabulary, or a non-finite log-probability at a scored token.

    Example (uniform logits over 4 tokens: each scored token costs ln 4):
        >>> logits = torch.zeros(2, 3, 4)
        >>> labels = torch.tensor([[1, 2, 3], [1, 2, -100]])
        >>> preprocess_logits_for_metrics(logits, labels) / torch.tensor([math.log(4), 1])
        tensor([[2., 2.],
                [1., 1.]], dtype=torch.float64)
    """
    if isinstance(logits, (tuple, list)):
        if not logits:
            raise ValueError("Expected `logits` to be a tensor or a non-empty tuple whose first element is the logits, but got an empty one.")
        logits = logits[0]
    if not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"Expected `labels` to be a torch.Tensor, but got {type(labels).__name__}: the eval batches need "
            "a `labels` column (the input ids, with -100 where a token does not count)."
        )
    try:
        check_full_inputs(logits, labels, ignore_index)  # before the shift, so shapes read as they were given
        rows = torch.zeros(labels.shape[0], _COLUMNS, dtype=torch.float64, device=logits.device)
        if labels.shape[1] < 2:  # no position has a next token to predict
            return rows
        nll = target_nll(logits[:, :-1], labels[:, 1:], ignore_index)  # (batch, seq_len - 1), float64
    except (TypeError, ValueError) as err:  # name this function's arguments, not the core's
        raise type(err)(str(err).replace("`preds`", "`logits`").replace("`target`", "`labels`")) from None
    nll_sum, count = sequence_sums(nll, scored_mask(labels[:, 1:], ignore_index).to(nll.device))
    rows[:, 0], rows[:, 1] = nll_sum, count.double()
    return rows


def compute_metrics(eval_pred, compute_result=None):
    """Token-weighted perplexity from the rows `preprocess_logits_for_metrics` returned.

    Args:
        eval_pred: transformers' `EvalPrediction` (or a `(predictions, label_ids)` pair) whose
            `predictions` are the `[num_sequences, 2]` rows of every eval batch, as numpy
            (a list of per-batch arrays, with `eval_do_concat_batches=False`, works too).
        compute_result: set by Trainer only with `batch_eval_metrics=True`, which is refused:
            the rows are 16 bytes per sequence, so Trainer may as well keep them.

    Returns:
        {"perplexity": exp(total NLL / total tokens), "nll": mean NLL per token in nats,
        "num_tokens": scored tokens}; Trainer reports them as `eval_perplexity`, `eval_nll`,
        `eval_num_tokens`.

    Raises:
        ValueError: predictions that are not such rows (e.g. full logits, because
            `preprocess_logits_for_metrics` was not given to Trainer), or no scored token at all.

    Example (two sequences: 3 tokens costing 6 nats in all, 1 token costing 0):
        >>> round(compute_metrics((np.array([[6.0, 3], [0.0, 1]]), None))["perplexity"], 6)
        4.481689
    """
    if compute_result is not None:
        raise ValueError(
            "Expected `batch_eval_metrics=False` (the default): compute_metrics pools the rows of all batches, "
            "which preprocess_logits_for_metrics already made 16 bytes per sequence."
        )
    predictions = eval_pred[0] if isinstance(eval_pred, tuple) else eval_pred.predictions
    if isinstance(predictions, (list, tuple)):  # per-batch arrays (eval_do_concat_batches=False)
        predictions = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, _COLUMNS) for p in predictions])
    rows = np.asarray(predictions, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] != _COLUMNS:
        raise ValueError(
            f"Expected `eval_pred.predictions` of shape [num_sequences, 2] (NLL sum, token count) from "
            f"preprocess_logits_for_metrics, but got shape {list(rows.shape)}: pass "
            "`preprocess_logits_for_metrics=preprocess_logits_for_metrics` to the Trainer as well."
        )
    nll_sums, counts = rows[:, 0], rows[:, 1]
    if not (np.isfinite(nll_sums).all() and (counts >= 0).all() and (counts == np.round(counts)).all()):
        raise ValueError(
            "Expected `eval_pred.predictions` rows of (finite NLL sum, whole token count >= 0) from "
            "preprocess_logits_for_metrics, but found other values."
        )
    total_nll, total = math.fsum(nll_sums), int(counts.sum())
    perplexity = pooled_perplexity(total_nll, total)  # raises when no token was scored
    return {"perplexity": perplexity, "nll": total_nll / total, "num_tokens": total}
