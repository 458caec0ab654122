"""The math of perplexity: input checks, chunked target log-probabilities, pooled sums.

Everything here is a pure function of tensors (`ppl_torchmetrics.Perplexity` is the thin
stateful class on top). The evaluate glue, the model runner and the app all call these, so
there is one formula in one place:

    perplexity = exp(sum of NLL over scored tokens / number of scored tokens)

with NLL_i = -log p(target_i | context) and a token scored unless its target equals
`ignore_index`.
"""

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

# Elements handled per cross-entropy call: small enough that the float32 working copy of a
# chunk stays a few MB, large enough that the per-call overhead is noise.
_ELEMENTS_PER_CALL = 1 << 19
_INTERNAL_IGNORE = -100  # what F.cross_entropy skips; user targets are remapped onto it


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------


def _check_target(target, name="target", ignore_index=None):
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(target).__name__}.")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"Expected `{name}` to hold integer token ids, but got dtype {target.dtype}.")
    negative = (target < 0) if ignore_index is None else (target < 0) & (target != ignore_index)
    if negative.any():
        bad = target[negative][0].item()
        raise ValueError(
            f"Expected `{name}` to hold token ids >= 0 (or ignore_index={ignore_index}), but got {bad}."
        )


def check_int(value, name, minimum=None):
    """Refuse anything but an int (a bool is not one) and, with `minimum`, an int below it.

    Raises:
        TypeError: `value` is not an int, e.g. "Expected `batch_size` to be an int, but got 2.5."
        ValueError: `value` < `minimum`, e.g. "Expected `max_length` to be an int >= 1, but got 0."
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int, but got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}, but got {value}.")


def check_ignore_index(ignore_index):
    if ignore_index is not None:
        check_int(ignore_index, "ignore_index")


def check_full_inputs(preds, target, ignore_index=None):
    """Validate `preds [batch, seq_len, vocab]` (logits or log-probs) and `target [batch, seq_len]`.

    Raises:
        TypeError: a non-tensor, a non-float `preds` or a non-integer `target`.
        ValueError: wrong dimensions, mismatched shapes, empty input, ids outside the vocabulary.
    """
    check_ignore_index(ignore_index)
    if not isinstance(preds, torch.Tensor):
        raise TypeError(f"Expected `preds` to be a torch.Tensor, but got {type(preds).__name__}.")
    if not preds.dtype.is_floating_point:
        raise TypeError(f"Expected `preds` to hold floating point logits or log-probabilities, but got dtype {preds.dtype}.")
    if preds.ndim != 3:
        raise ValueError(
            f"Input tensor `preds` is expected to have 3 dimensions, [batch_size, seq_len, vocab_size], but got {preds.ndim}."
        )
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"Expected `target` to be a torch.Tensor, but got {type(target).__name__}.")
    if target.ndim != 2:
        raise ValueError(f"Input tensor `target` is expected to have 2 dimensions, [batch_size, seq_len], but got {target.ndim}.")
    if preds.shape[:2] != target.shape:
        raise ValueError(
            f"Expected `preds` and `target` to agree on [batch_size, seq_len], but got {list(preds.shape[:2])} and {list(target.shape)}."
        )
    if preds.numel() == 0:
        raise ValueError(f"Expected non-empty `preds`, but got shape {list(preds.shape)}.")
    _check_target(target, "target", ignore_index)
    scored = target if ignore_index is None else target[target != ignore_index]
    if scored.numel() and scored.max().item() >= preds.shape[-1]:
        raise ValueError(
            f"Expected `target` ids in [0, {preds.shape[-1]}) (the vocab_size of `preds`), but got {scored.max().item()}."
        )


def check_compact_inputs(logprobs, target, ignore_index=None):
    """Validate per-token target log-probabilities and their target ids, both `[batch, seq_len]`."""
    check_ignore_index(ignore_index)
    if not isinstance(logprobs, torch.Tensor) or not logprobs.dtype.is_floating_point:
        raise TypeError("Expected `predictions` (per-token log-probabilities) to be floating point.")
    if logprobs.shape != target.shape:
        raise ValueError(
            f"Expected `predictions` and `references` to have the same shape, but got {list(logprobs.shape)} and {list(target.shape)}."
        )
    _check_target(target, "references", ignore_index)
    mask = scored_mask(target, ignore_index)
    values = logprobs[mask]
    if not torch.isfinite(values).all():
        raise ValueError("Expected finite log-probabilities in `predictions`, but found NaN or inf.")
    if (values > 1e-6).any():
        raise ValueError(
            f"Expected log-probabilities <= 0 in `predictions`, but got {values.max().item():.6g}: "
            "pass log-probabilities, not probabilities or logits."
        )


# ---------------------------------------------------------------------------------------
# Per-token and per-sequence quantities
# ---------------------------------------------------------------------------------------


def scored_mask(target, ignore_index=None):
    """True where a token counts: every position unless its target equals `ignore_index`."""
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool)
    return target != ignore_index


@torch.inference_mode()  # grad and inference modes are thread-local: set them in each worker
def _nll_rows(logits, target, out, start, stop, rows_per_call):
    for lo in range(start, stop, rows_per_call):
        hi = min(lo + rows_per_call, stop)
        # log-softmax fused into cross_entropy, in float32 at least: no softmax-then-log underflow.
        out[lo:hi] = F.cross_entropy(
            logits[lo:hi].to(out.dtype), target[lo:hi], reduction="none", ignore_index=_INTERNAL_IGNORE
        )


def _nll_block(logits, target, out):
    """NLL of each row of `logits [rows, vocab]` into `out`, a few rows per call on worker threads."""
    rows_per_call = max(1, _ELEMENTS_PER_CALL // logits.shape[-1])
    n_rows = logits.shape[0]
    workers = 1 if logits.device.type != "cpu" else max(1, min(torch.get_num_threads(), n_rows // rows_per_call))
    if workers == 1:
        _nll_rows(logits, target, out, 0, n_rows, rows_per_call)
    else:
        bounds = [(n_rows * k // workers, n_rows * (k + 1) // workers) for k in range(workers)]
        list(_worker_pool(workers).map(lambda b: _nll_rows(logits, target, out, b[0], b[1], rows_per_call), bounds))


_pools = {}


def _worker_pool(workers):
    """A thread pool kept per process and size: starting threads on every call cost more than
    the work on small inputs. Keyed by pid, since threads do not survive a fork."""
    key = (os.getpid(), workers)
    if key not in _pools:
        _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix="ppl_core")
    return _pools[key]


def target_nll(preds, target, ignore_index=None):
    """Per-token negative log-likelihood of `target` under `preds`, without a full-size copy.

    `preds [batch, seq_len, vocab]` holds logits or log-probabilities (log-softmax makes them
    equal). Rows are processed a few at a time on `torch.get_num_threads()` Python threads:
    the extra memory is a few float32 rows per thread, and the work holds up when other
    processes load the machine (NOTES.md measured chunks on intra-op threads collapsing).

    Returns:
        float64 tensor `[batch, seq_len]`, 0 where the target is ignored.

    Raises:
        ValueError: NaN, inf, or a -inf target log-probability at a scored position.
    """
    check_full_inputs(preds, target, ignore_index)
    target = target.to(preds.device)  # labels often stay on the CPU while logits are on the GPU
    vocab = preds.shape[-1]
    mask = scored_mask(target, ignore_index).reshape(-1)
    flat_target = torch.where(mask, target.reshape(-1), _INTERNAL_IGNORE).long()
    # float64 stays float64; half types are computed in float32
    out = torch.empty(target.numel(), dtype=torch.promote_types(preds.dtype, torch.float32), device=preds.device)
    try:
        blocks = [preds.view(-1, vocab)]  # one block of rows when batch and seq_len merge without a copy
    except RuntimeError:
        blocks = list(preds)  # e.g. the shifted logits[:, :-1]: a view per sequence, never a full copy
    first = 0
    for rows in blocks:
        _nll_block(rows, flat_target[first : first + len(rows)], out[first : first + len(rows)])
        first += len(rows)
    nll = out.double().view(target.shape)
    bad = ~torch.isfinite(nll) & mask.view(target.shape)
    if bad.any():
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"Expected finite values in `preds`, but the log-probability of target {int(target[b, t])} at "
            f"[batch {b}, position {t}] is not finite (NaN or inf in the input)."
        )
    return nll


def sequence_sums(nll, mask):
    """Per-sequence NLL sum (float64) and scored-token count (int64) from `[batch, seq_len]` tensors."""
    nll = torch.where(mask, nll.double(), 0.0)
    return nll.sum(dim=-1), mask.sum(dim=-1)


def pooled_perplexity(nll_sum, count):
    """exp(total NLL / total count) as a float; refuses an empty count instead of returning NaN."""
    _check_scored(count)
    return _exp(float(nll_sum) / int(count))


def _check_scored(count):
    if int(count) == 0:
        raise ValueError("No token was scored: every target equals `ignore_index` (or the input is empty).")


def _exp(mean_nll):
    """exp that gives inf past float64's range (a mean NLL above ~709) instead of OverflowError."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


class _TargetNLL(torch.autograd.Function):
    """`target_nll` with a gradient, for `preds` that require one.

    The forward pass is the chunked inference path; the backward pass writes
    d NLL_i / d preds_i = (softmax(preds_i) - onehot(target_i)) * grad_i a few rows at a time,
    so no full-size float copy of `preds` is made beyond the gradient itself.
    """

    @staticmethod
    def forward(ctx, preds, target, ignore_index):
        ctx.save_for_backward(preds, target)
        ctx.ignore_index = ignore_index
        return target_nll(preds, target, ignore_index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll):
        preds, target = ctx.saved_tensors
        target = target.to(preds.device)
        mask = scored_mask(target, ctx.ignore_index)
        ids = torch.where(mask, target, 0).long()  # any valid id where ignored: its row is zeroed below
        weight = grad_nll.to(preds.device)
        working = torch.promote_types(preds.dtype, torch.float32)
        grad = torch.empty_like(preds)
        rows_per_call = max(1, _ELEMENTS_PER_CALL // preds.shape[-1])
        for b in range(preds.shape[0]):
            for lo in range(0, preds.shape[1], rows_per_call):
                hi = min(lo + rows_per_call, preds.shape[1])
                probs = torch.softmax(preds[b, lo:hi].to(working), dim=-1)
                probs[torch.arange(hi - lo, device=preds.device), ids[b, lo:hi]] -= 1.0
                # ignored rows get 0, also where their logits are NaN or inf (0 * inf would be NaN)
                grad[b, lo:hi] = torch.where(mask[b, lo:hi, None], probs.mul_(weight[b, lo:hi, None].to(working)), 0.0)
        return grad, None, None


def pooled_sums(preds, target, ignore_index=None):
    """Total NLL (float64) and scored-token count (int64) of a batch, torchmetrics' update step.

    The NLL carries `preds`' gradient when `preds` requires one and grad mode is on;
    otherwise the chunked inference path runs, at no extra cost.
    """
    if isinstance(preds, torch.Tensor) and preds.requires_grad and torch.is_grad_enabled():
        nll = _TargetNLL.apply(preds, target, ignore_index)
    else:
        nll = target_nll(preds, target, ignore_index)
    nll_sums, counts = sequence_sums(nll, scored_mask(target, ignore_index).to(nll.device))
    return nll_sums.sum(), counts.sum()


def perplexity_from_sums(nll_sum, count):
    """exp(nll_sum / count) as a float64 tensor that keeps `nll_sum`'s gradient; refuses count 0."""
    _check_scored(count)
    return torch.exp(nll_sum.double() / count)  # inf past float64's range (mean NLL above ~709), as _exp


def perplexity(preds, target, ignore_index=None):
    """Perplexity of `target` under `preds`, as torchmetrics' functional `perplexity`.

    Args:
        preds: `[batch_size, seq_len, vocab_size]` logits or log-probabilities (any float dtype).
        target: `[batch_size, seq_len]` integer token ids.
        ignore_index: target value whose positions do not count (e.g. -100 for padding).

    Returns:
        0-d float64 tensor, differentiable with respect to `preds` when it requires grad.

    Raises:
        TypeError, ValueError: see `check_full_inputs`; also when every token is ignored.

    Example (log-probabilities of log(1/4) everywhere: perplexity 4):
        >>> preds = torch.full((2, 3, 4), math.log(1 / 4))
        >>> round(perplexity(preds, torch.zeros(2, 3, dtype=torch.long)).item(), 6)
        4.0
    """
    return perplexity_from_sums(*pooled_sums(preds, target, ignore_index))


# ---------------------------------------------------------------------------------------
# Corpus summary
# ---------------------------------------------------------------------------------------


def bootstrap_interval(nll_sums, counts, *, resamples=1000, seed=0, level=0.95):
    """Percentile bootstrap over examples of the pooled perplexity.

    Examples are resampled with replacement, so the interval reflects how much the corpus
    value moves with the choice of documents (tokens inside a document are not independent).
    """
    nll_sums = np.asarray(nll_sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    n = len(nll_sums)
    rng = np.random.default_rng(seed)
    values = []
    per_draw = max(1, (1 << 22) // max(n, 1))  # bounds the index matrix to ~32 MB
    for start in range(0, resamples, per_draw):
        idx = rng.integers(0, n, size=(min(per_draw, resamples - start), n))
        tokens = counts[idx].sum(axis=1)
        nll = nll_sums[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            values.append(np.exp(nll[tokens > 0] / tokens[tokens > 0]))
    values = np.concatenate(values)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def check_bootstrap_resamples(value):
    check_int(value, "bootstrap_resamples", minimum=1)


def summarize(nll_sums, counts, *, bootstrap_resamples=1000, seed=0):
    """The metric's result dict from per-example NLL sums and token counts.

    `perplexities[i]` is None for an example with no scored token; it is left out of
    `mean_perplexity` and the bootstrap, and its tokens count nowhere. `perplexity_ci` is
    None with fewer than two such examples: one document says nothing about the spread.
    """
    check_bootstrap_resamples(bootstrap_resamples)
    nll_sums = [float(x) for x in nll_sums]
    counts = [int(c) for c in counts]
    total_nll, total = math.fsum(nll_sums), sum(counts)
    ppl = pooled_perplexity(total_nll, total)
    perplexities = [_exp(s / c) if c else None for s, c in zip(nll_sums, counts)]
    kept = [p for p in perplexities if p is not None]
    nll = total_nll / total
    return {
        "perplexity": ppl,
        "nll": nll,
        "bits_per_token": nll / math.log(2),
        "num_tokens": total,
        "perplexities": perplexities,
        "mean_perplexity": math.fsum(kept) / len(kept),
        "perplexity_ci": bootstrap_interval(
            [s for s, c in zip(nll_sums, counts) if c],
            [c for c in counts if c],
            resamples=bootstrap_resamples,
            seed=seed,
        )
        if len(kept) >= 2
        else None,
    }


def text_metrics(total_nll, texts):
    """Word and byte perplexity and bits per byte, as lm-evaluation-harness defines them.

    Words are `len(re.split(r"\\s+", text))` per text and bytes its UTF-8 length; the
    NLL is the same total that token perplexity uses, so only the unit changes.
    """
    counts = [text_units(text) for text in texts]
    return unit_metrics(total_nll, sum(w for w, _ in counts), sum(b for _, b in counts))


def text_units(text):
    """(words, UTF-8 bytes) of one text, as lm-evaluation-harness counts them.

    >>> text_units(" = Title = \\n")
    (5, 12)
    """
    return len(re.split(r"\s+", text)), len(text.encode("utf-8"))


def unit_metrics(total_nll, words, num_bytes):
    """`text_metrics` from the corpus's word and byte counts."""
    return {
        "word_perplexity": _exp(total_nll / words),
        "byte_perplexity": _exp(total_nll / num_bytes),
        "bits_per_byte": total_nll / (num_bytes * math.log(2)),
        "num_words": words,
        "num_bytes": num_bytes,
    }
