"""Compare a model with a reference model on exactly the same windows: KL divergence, top-1
agreement, RMS delta-p, the paired perplexity ratio (llama.cpp's `--kl-divergence`, and more).

The runner (`ppl_runner`) plans and batches the windows; for each batch it hands the model's
logits at the scored positions, chunk by chunk (`ppl_head.scored_logits`), to a reference:

- `ModelReference`: a loaded reference model, run on the same batch (its own fused head);
- `SavedReference`: a file written by `ReferenceWriter` from an earlier run of the reference
  alone, holding per scored token its top-k log-probabilities plus tokens sampled from the
  rest of its distribution (an unbiased KL estimate, 16 + 8 (k + samples) bytes per token).

Each reference turns a chunk into per-token columns (`COLUMNS`); `token_stats` sums them per
document in float64, and `pool_comparison` turns the documents' sums into the result's keys.
No vocabulary-sized array outlives its chunk.
"""

import hashlib
import json
import math
from collections import deque
from functools import partial
from pathlib import Path

import numpy as np
import torch

if __package__:
    from .ppl_core import check_int
    from .ppl_head import bytes_per_token, chunk_rows, fused_head, scored_logits
else:
    from ppl_core import check_int
    from ppl_head import bytes_per_token, chunk_rows, fused_head, scored_logits

# Per scored token: the model's and the reference's target log-prob, the KL(reference || model)
# (an estimate from a saved reference), 1.0 where both models' most likely token is the same,
# and the KL estimate's sampling variance (0 when exact).
COLUMNS = ("logprob", "reference_logprob", "kl", "same_top1", "kl_variance")
TOP_K, SAMPLES = 32, 32  # a saved reference's defaults: 528 bytes per token
FORMAT = "perplexity_metric.reference/1"
CACHE_BYTES = 1 << 22  # rows of logits compared per step: ~4 MB, so the dozen passes over them hit the cache


# ---------------------------------------------------------------------------------------
# Per-chunk math: float32 over the vocabulary, float64 per token
# ---------------------------------------------------------------------------------------
# The logits are float32 at best, so float64 passes over the vocabulary (5x slower here) add
# little: the passes run in float32, a few rows at a time so they stay in cache (`CACHE_BYTES`),
# on logits shifted by their row maximum (so a constant offset between the models costs no
# precision), with KL = sum p (sx - sy) - (log total_x - log total_y); row sums, log-normalizers
# and every per-token value are float64. Against an all-float64 pass over the same logits: KL
# within 3e-8 nats per token (float32 exp's rounding; relative 1e-8 on the mean at 0.01-0.04
# nats per token, 5e-5 at 1e-5), target log-probs within 2e-8 nats; 7x faster.


def _working(logits):
    """What the passes over the vocabulary run in: float32 (float64 stays float64)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _normalized(logits):
    """Of working logits `(rows, vocab)`: `(exp(logits - row max), its float64 row sums, the
    float64 log-normalizers, the argmax per row)`."""
    top, argmax = logits.max(-1, keepdim=True)
    e = (logits - top).exp_()
    total = e.sum(-1, keepdim=True, dtype=torch.float64)  # a float32 sum: ~8e-7 relative, too coarse for KL ~1e-5
    return e, total, top.double() + total.log(), argmax[:, 0]


def _gather(logits, lse, ids):
    """float64 log-probabilities of `ids` (rows, n) from raw logits and their log-normalizers."""
    return logits.gather(-1, ids).double() - lse


def _in_steps(rows_fn, first, *others):
    """`rows_fn` over a few rows of the row-aligned tensors at a time (about `CACHE_BYTES` of
    `first` in float32): the dozen passes over each step's logits then hit the cache, not memory."""
    if not len(first):
        return rows_fn(first, *others).cpu()
    step = max(1, CACHE_BYTES // (first.shape[-1] * 4))
    return torch.cat([rows_fn(first[i : i + step], *(t[i : i + step] for t in others))
                      for i in range(0, len(first), step)]).cpu()


def compare_logits(logits, reference_logits, labels):
    """Per-token `COLUMNS` from both models' logits `(rows, vocab)` at the same positions."""
    return _in_steps(_compare_rows, logits, reference_logits.to(logits.device), labels.to(logits.device))


def _compare_rows(y, x, labels):
    y, x = _working(y), _working(x)
    top_y, argmax_y = y.max(-1, keepdim=True)
    top_x, argmax_x = x.max(-1, keepdim=True)
    # two buffers for the dozen passes: fresh large tensors cost page faults
    delta = y - top_y  # sy, the model's shifted logits
    work = delta.exp()
    total_y = work.sum(-1, keepdim=True, dtype=torch.float64)
    torch.sub(x, top_x, out=work)  # sx
    torch.sub(work, delta, out=delta)  # sx - sy = log p - log m + (log total_x - log total_y)
    work.exp_()  # the reference's unnormalized probabilities
    total_x = work.sum(-1, keepdim=True, dtype=torch.float64)
    # KL = sum p (sx - sy) - (log total_x - log total_y), p = work / total_x; where p = 0 the term
    # is 0, also against a -inf logit (0 * nan), while p > 0 against the model's -inf stays inf
    terms = work.mul_(delta).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    kl = terms.sum(-1, keepdim=True, dtype=torch.float64).div_(total_x).sub_(total_x.log() - total_y.log())[:, 0]
    lse_y, lse_x = top_y.double() + total_y.log(), top_x.double() + total_x.log()
    own, ref = _gather(y, lse_y, labels[:, None])[:, 0], _gather(x, lse_x, labels[:, None])[:, 0]
    return torch.stack([own, ref, kl, (argmax_y == argmax_x)[:, 0].double(), torch.zeros_like(kl)], 1)


def reference_record(reference_logits, labels, generator, top_k=TOP_K, samples=SAMPLES):
    """What a later comparison needs of the reference at each position, one float64 row each:
    target log-prob, tail mass q (outside the top k), the top-k ids and log-probs (most
    likely first: the same token as `compare_logits`'s top-1, also on ties), and `samples`
    ids drawn from the tail (with replacement, in proportion to the reference's
    probabilities) with their log-probs."""
    return _in_steps(partial(_record_rows, generator=generator, top_k=top_k, samples=samples), reference_logits,
                     labels.to(reference_logits.device))


def _record_rows(x, labels, *, generator, top_k, samples):
    x = _working(x)
    e, total, lse, argmax = _normalized(x)
    top_ids = x.topk(min(top_k, x.shape[-1]), -1).indices
    # on tied maxima max() may name another token than topk's first: put max()'s first (where it
    # is among the k, its slot takes topk's first; where it is not, more than k tokens tie)
    top_ids = torch.where(top_ids == argmax[:, None], top_ids[:, :1], top_ids)
    top_ids[:, 0] = argmax
    tail = e.scatter_(-1, top_ids, 0.0)
    q = tail.sum(-1, keepdim=True, dtype=torch.float64) / total
    weights = torch.where(q > 0, tail, torch.ones_like(tail))  # q = 0: any token, weighted by 0
    drawn = torch.multinomial(weights.cpu(), samples, replacement=True, generator=generator).to(x.device)
    target = _gather(x, lse, labels[:, None])
    return torch.cat([target, q, top_ids.double(), _gather(x, lse, top_ids), drawn.double(), _gather(x, lse, drawn)], 1)


def compare_record(logits, record, labels, top_k, samples):
    """Per-token `COLUMNS` from the model's logits and a saved `reference_record`:
    KL = sum over the top k of p (log p - log m) + q * mean over the samples of (log p - log m),
    whose expectation over the samples is the exact KL; the last column is its variance."""
    return _in_steps(partial(_compare_record_rows, top_k=top_k, samples=samples), logits,
                     record.to(logits.device), labels.to(logits.device))


def _compare_record_rows(y, record, labels, *, top_k, samples):
    y = _working(y)
    _, _, lse, top = _normalized(y)
    target, q = record[:, 0], record[:, 1]
    top_ids, top_lp = record[:, 2 : 2 + top_k].long(), record[:, 2 + top_k : 2 + 2 * top_k]
    drawn, drawn_lp = record[:, 2 + 2 * top_k : 2 + 2 * top_k + samples].long(), record[:, 2 + 2 * top_k + samples :]
    # tokens the reference gives probability 0 (-inf) add 0 (not 0 * nan); so does an empty tail
    head = torch.where(top_lp > -math.inf, top_lp.exp() * (top_lp - _gather(y, lse, top_ids)), 0.0).sum(-1)
    f = drawn_lp - _gather(y, lse, drawn)
    tail = q > 0
    kl = head + torch.where(tail, q * f.mean(-1), 0.0)
    variance = torch.where(tail, q**2 * f.var(-1) / samples, 0.0) if samples > 1 else torch.zeros_like(kl)
    own = _gather(y, lse, labels[:, None])[:, 0]
    return torch.stack([own, target, kl, (top == top_ids[:, 0]).double(), variance], 1)


def aligned(first, second):
    """Equal-length pieces `(start, a, b)` of two chunk streams over the same positions."""
    first, second = iter(first), iter(second)
    a = b = None
    start = 0
    while True:
        if a is None or not len(a):  # the spent chunk's storage is let go before the next is computed
            a = None
            a = next(first, (None, None))[1]
        if b is None or not len(b):
            b = None
            b = next(second, (None, None))[1]
        if a is None or b is None:
            if a is not None or b is not None:
                raise RuntimeError("The model and the reference returned logits for different numbers of positions.")
            return
        n = min(len(a), len(b))
        yield start, a[:n], b[:n]
        a, b, start = a[n:], b[n:], start + n


# ---------------------------------------------------------------------------------------
# References: what the runner calls for each chunk of texts and each batch
# ---------------------------------------------------------------------------------------


def logits_width(model):
    layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return weight.shape[0]
    return getattr(getattr(model, "config", None), "vocab_size", None)


def tokenizer_fingerprint(tokenizer):
    """A digest of the vocabulary (token -> id), which decides what every id means."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def check_same_vocabulary(tokenizer, reference_tokenizer, width, reference_width, name="reference_model"):
    """A `ValueError` naming the reference and what differs, unless both map the same tokens
    to the same ids and both output layers are as wide."""
    if reference_tokenizer is not None and reference_tokenizer is not tokenizer:
        ours, theirs = tokenizer.get_vocab(), reference_tokenizer.get_vocab()
        if ours != theirs:
            differ = sorted(set(ours.items()) ^ set(theirs.items()), key=str)[:3]
            raise ValueError(
                f"Expected `{name}` to have the model's vocabulary, but its tokenizer differs: {len(theirs):,} entries "
                f"against {len(ours):,}, e.g. {', '.join(f'{t!r}={i}' for t, i in differ)} is in one only. KL and top-1 "
                "agreement need the same token ids in both models."
            )
    if width is not None and reference_width is not None and width != reference_width:
        raise ValueError(f"Expected `{name}` to output as many logits as the model ({width:,} vocabulary entries), "
                         f"but it outputs {reference_width:,}.")


class ModelReference:
    """A loaded reference model scored on the model's batches (same windows, same inputs)."""

    kind = "model"

    def __init__(self, model, tokenizer=None, *, name="reference_model"):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Expected `{name}` to be a loaded causal LM (a torch.nn.Module), but got {type(model).__name__}.")
        self.model, self.tokenizer, self.name = model, tokenizer, name

    def check(self, model, tokenizer, settings):
        """Before anything is scored: the same vocabulary, and the reference's share of the budget."""
        check_same_vocabulary(tokenizer, self.tokenizer, logits_width(model), logits_width(self.model), self.name)
        self.head = fused_head(self.model) if settings["head"] == "fused" else None
        self.keeps_logits = "logits_to_keep" in __import__("inspect").signature(self.model.forward).parameters
        return bytes_per_token(self.model, self.head is not None, settings["max_length"])

    def expect(self, index):
        """The runner names each document before scoring it (a saved reference looks it up)."""

    def start_chunk(self, counts):
        """The next chunk's texts, with their numbers of scored targets."""

    def score_batch(self, model_chunks, inputs, mask, labels, windows):
        """Per-token `COLUMNS` of a batch's scored positions, in the runner's order."""
        rows = chunk_rows(logits_width(self.model) or 1)  # as many as the model alone: its weights are read once per chunk
        was_training = self.model.training
        self.model.eval()
        try:
            reference = scored_logits(self.model, self.head, inputs, mask, keeps_logits=self.keeps_logits, rows=rows)
            pieces = []
            for start, a, b in aligned(model_chunks(rows), reference):
                pieces.append(compare_logits(a, b, labels[start : start + len(a)]))
                del a, b  # one chunk of each model alive at a time
        finally:
            self.model.train(was_training)
        return torch.cat(pieces) if pieces else torch.zeros((0, len(COLUMNS)), dtype=torch.float64)


class SavedReference:
    """A reference read from a `ReferenceWriter` file: the model's logits are compared with the
    saved records of the same documents, without loading the reference model."""

    kind = "file"

    def __init__(self, path):
        import pyarrow.parquet as pq

        self.path = str(path)
        if not Path(path).is_file():
            raise ValueError(f"Expected a reference file written with --save-reference, but {self.path!r} does not exist.")
        try:
            self._file = pq.ParquetFile(path)
            meta = json.loads((self._file.schema_arrow.metadata or {}).get(b"perplexity_metric", b"{}"))
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line error
            raise ValueError(f"Could not read the reference file {self.path!r}: {err}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"Expected a reference file written with --save-reference ({FORMAT}), but {self.path!r} is not one.")
        self.meta = meta
        self.top_k, self.samples = meta["top_k"], meta["samples"]
        self._rows = self._iter_rows()
        self._expected, self._records = deque(), deque()

    def check(self, model, tokenizer, settings):
        problems = [f"{key}: {self.meta['settings'].get(key)!r} in the file, {settings.get(key)!r} here"
                    for key in ("max_length", "stride", "start_token_id") if self.meta["settings"].get(key) != settings.get(key)]
        if self.meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
            problems.append("the tokenizer's vocabulary differs")
        width = logits_width(model)
        if width is not None and width != self.meta["vocab_size"]:
            problems.append(f"vocab_size: {self.meta['vocab_size']:,} in the file, {width:,} here")
        if problems:
            raise ValueError(f"The reference file {self.path!r} was written with other settings: {'; '.join(problems)}.")
        return 0

    def identity(self):
        """What the file holds, for a `--docs-out` manifest: the same file under another path
        resumes, another file under the same path does not."""
        keys = ("model", "corpus", "settings", "tokenizer", "top_k", "samples", "seed")
        return json.dumps({key: self.meta.get(key) for key in keys}, sort_keys=True)

    def check_corpus(self, fingerprint):
        """The CLI's corpus (fingerprint of the source, the fields read and --limit) must be the file's."""
        if self.meta.get("corpus") != fingerprint:
            differ = [key for key in set(fingerprint) | set(self.meta.get("corpus") or {})
                      if fingerprint.get(key) != (self.meta.get("corpus") or {}).get(key)]
            raise ValueError(f"The reference file {self.path!r} was written for another corpus: "
                             + "; ".join(f"{key}: {(self.meta.get('corpus') or {}).get(key)!r} in the file, "
                                         f"{fingerprint.get(key)!r} here" for key in sorted(differ)) + ".")

    def _iter_rows(self):
        for batch in self._file.iter_batches(batch_size=64):
            yield from batch.to_pylist()

    def expect(self, index):
        self._expected.append(index)

    def start_chunk(self, counts):
        """Load the records of the next `len(counts)` expected documents, in order."""
        width = 2 + 2 * self.top_k + 2 * self.samples
        self._records.clear()
        self._offsets = []
        for count in counts:
            index = self._expected.popleft()
            row = next(self._rows, None)
            while row is not None and row["index"] < index:  # documents this run does not score
                row = next(self._rows, None)
            if row is None or row["index"] != index:
                raise ValueError(f"The reference file {self.path!r} has no record of document {index}: "
                                 "score the corpus (and --limit) it was written for.")
            if row["num_tokens"] != count:
                raise ValueError(f"Document {index} has {count} scored tokens here but {row['num_tokens']} in the reference "
                                 f"file {self.path!r}: it was tokenized or windowed differently.")
            self._records.append(_unpack(row, width))
        self._chunk = list(self._records)

    def score_batch(self, model_chunks, inputs, mask, labels, windows):
        # the saved rows of each window's scored targets, in the batch's order
        record = torch.cat([self._chunk[t][first : first + count] for t, first, count in windows])
        rows = chunk_rows(self.meta["vocab_size"])
        pieces = [compare_record(logits, record[start : start + len(logits)], labels[start : start + len(logits)],
                                 self.top_k, self.samples) for start, logits in model_chunks(rows)]
        return torch.cat(pieces) if pieces else torch.zeros((0, len(COLUMNS)), dtype=torch.float64)


class Recorder:
    """Runs the reference alone and returns its `reference_record` rows (for `ReferenceWriter`)."""

    kind = "record"

    def __init__(self, *, top_k=TOP_K, samples=SAMPLES, seed=0):
        check_int(top_k, "top_k", minimum=1)
        check_int(samples, "samples", minimum=2)
        self.top_k, self.samples, self.seed = top_k, samples, seed
        self.generator = torch.Generator().manual_seed(seed)

    def check(self, model, tokenizer, settings):
        return 0

    def expect(self, index):
        pass

    def start_chunk(self, counts):
        pass

    def score_batch(self, model_chunks, inputs, mask, labels, windows):
        pieces = [reference_record(logits, labels[start : start + len(logits)], self.generator, self.top_k, self.samples)
                  for start, logits in model_chunks(None)]
        return torch.cat(pieces)


def _unpack(row, width):
    k = len(row["top_ids"]) // max(1, row["num_tokens"])
    n = row["num_tokens"]
    s = len(row["sample_ids"]) // max(1, n)
    out = torch.empty((n, width), dtype=torch.float64)
    out[:, 0] = torch.tensor(row["target_logprobs"], dtype=torch.float64)
    out[:, 1] = torch.tensor(row["tail_mass"], dtype=torch.float64)
    out[:, 2 : 2 + k] = torch.tensor(row["top_ids"], dtype=torch.float64).view(n, k)
    out[:, 2 + k : 2 + 2 * k] = torch.tensor(row["top_logprobs"], dtype=torch.float64).view(n, k)
    out[:, 2 + 2 * k : 2 + 2 * k + s] = torch.tensor(row["sample_ids"], dtype=torch.float64).view(n, s)
    out[:, 2 + 2 * k + s :] = torch.tensor(row["sample_logprobs"], dtype=torch.float64).view(n, s)
    return out


class ReferenceWriter:
    """Writes a `Recorder` run's rows to PATH (Parquet: a row per document, per-token lists),
    under a temporary name renamed when complete, with what decides the numbers in its metadata."""

    def __init__(self, path, meta):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        if self.path.exists():
            raise ValueError(f"The --save-reference file {str(path)!r} exists: give a new path (nothing is overwritten).")
        self.meta = {"format": FORMAT, **meta}
        self.schema = pa.schema(
            [("index", pa.int64()), ("id", pa.string()), ("num_tokens", pa.int64()), ("target_logprobs", pa.list_(pa.float64())),
             ("tail_mass", pa.list_(pa.float64())), ("top_ids", pa.list_(pa.int32())), ("top_logprobs", pa.list_(pa.float32())),
             ("sample_ids", pa.list_(pa.int32())), ("sample_logprobs", pa.list_(pa.float32()))],
            metadata={"perplexity_metric": json.dumps(self.meta)},
        )
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.tmp, self.schema)
        self.tokens = 0

    def write(self, rows):
        """Rows of `score_documents` with a `record` (tokens x record width) each."""
        import pyarrow as pa

        k, s = self.meta["top_k"], self.meta["samples"]
        table = {name: [] for name in self.schema.names}
        for row in rows:
            record = row["record"]
            for name, value in (("index", row["index"]), ("id", None if row["id"] is None else str(row["id"])),
                                ("num_tokens", row["num_tokens"]), ("target_logprobs", record[:, 0].tolist()),
                                ("tail_mass", record[:, 1].tolist()), ("top_ids", record[:, 2 : 2 + k].int().flatten().tolist()),
                                ("top_logprobs", record[:, 2 + k : 2 + 2 * k].float().flatten().tolist()),
                                ("sample_ids", record[:, 2 + 2 * k : 2 + 2 * k + s].int().flatten().tolist()),
                                ("sample_logprobs", record[:, 2 + 2 * k + s :].float().flatten().tolist())):
                table[name].append(value)
            self.tokens += row["num_tokens"]
        if rows:
            self._writer.write_table(pa.table(table, schema=self.schema))

    def close(self, complete=True):
        self._writer.close()
        if complete:
            self.tmp.rename(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Per document and corpus
# ---------------------------------------------------------------------------------------


def token_stats(columns, keep_tokens=False):
    """A document's comparison sums (float64, fsum) from its per-token `COLUMNS`."""
    columns = columns.double()
    own, ref, kl, same, variance = (columns[:, i].tolist() for i in range(len(COLUMNS)))
    dp = (columns[:, 0].exp() - columns[:, 1].exp()).tolist()
    stats = {
        "reference_nll": -math.fsum(ref),
        "kl": math.fsum(kl),
        "kl_sq": math.fsum(x * x for x in kl),
        "kl_variance": math.fsum(variance),
        "same_top1": int(sum(same)),
        "dp_sq": math.fsum(x * x for x in dp),
        "nll_sq": math.fsum(x * x for x in own),
        "reference_nll_sq": math.fsum(x * x for x in ref),
        "nll_cross": math.fsum(x * y for x, y in zip(own, ref)),
        "token_kl": columns[:, 2].numpy().copy(),  # for the quantiles: 8 bytes per token, not a list's 32
    }
    stats["reference_perplexity"] = math.exp(stats["reference_nll"] / len(ref)) if ref else None
    if keep_tokens:
        stats.update(reference_logprobs=ref, token_same_top1=[bool(x) for x in same])
    return stats


def _mean_and_se(total, total_sq, n):
    """llama.cpp's mean and its standard error from a sum and a sum of squares."""
    mean = total / n
    variance = total_sq / n - mean * mean
    return mean, math.sqrt(variance / (n - 1)) if variance > 0 and n > 1 else 0.0


def paired_ratio_interval(nll, reference_nll, counts, *, resamples=1000, seed=0, level=0.95):
    """Percentile bootstrap of perplexity / reference perplexity, resampling documents with the
    same draw for both models (a consistent small loss is then seen as one)."""
    difference = np.asarray(nll, dtype=np.float64) - np.asarray(reference_nll, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n, values = len(counts), []
    per_draw = max(1, (1 << 22) // max(n, 1))
    for start in range(0, resamples, per_draw):
        idx = rng.integers(0, n, size=(min(per_draw, resamples - start), n))
        values.append(np.exp(difference[idx].sum(axis=1) / counts[idx].sum(axis=1)))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(np.concatenate(values), [tail, 100 - tail])
    return [float(low), float(high)]


def pool_comparison(rows, *, bootstrap_resamples=1000, seed=0):
    """The comparison keys of a corpus result from per-document rows (`nll`, `num_tokens` and
    `token_stats`'s sums), in index order."""
    rows = sorted(rows, key=lambda row: row["index"])
    n = sum(row["num_tokens"] for row in rows)
    total = lambda key: math.fsum(row[key] for row in rows)  # noqa: E731
    nll, ref_nll = total("nll"), total("reference_nll")
    kl, kl_se = _mean_and_se(total("kl"), total("kl_sq"), n)
    same = sum(row["same_top1"] for row in rows) / n
    diff_sq = total("nll_sq") + total("reference_nll_sq") - 2 * total("nll_cross")  # sum of (nll - reference nll)^2
    log_ratio, log_ratio_se = _mean_and_se(nll - ref_nll, diff_sq, n)
    x_var, y_var = total("nll_sq") / n - (nll / n) ** 2, total("reference_nll_sq") / n - (ref_nll / n) ** 2
    covariance = total("nll_cross") / n - (nll / n) * (ref_nll / n)
    token_kl = np.concatenate([np.asarray(row["token_kl"], dtype=np.float64) for row in rows])
    p50, p90, p99 = np.quantile(token_kl, [0.5, 0.9, 0.99])
    return {
        "reference_perplexity": math.exp(ref_nll / n),
        "reference_perplexities": [row["reference_perplexity"] for row in rows],
        "perplexity_ratio": math.exp((nll - ref_nll) / n),
        "perplexity_ratio_ci": paired_ratio_interval([row["nll"] for row in rows], [row["reference_nll"] for row in rows],
                                                     [row["num_tokens"] for row in rows], resamples=bootstrap_resamples,
                                                     seed=seed) if len(rows) >= 2 else None,
        "log_perplexity_ratio": log_ratio,
        "log_perplexity_ratio_se": log_ratio_se,
        "kl_divergence": kl,
        "kl_divergence_se": kl_se,
        "kl_divergence_sampling_se": math.sqrt(total("kl_variance")) / n,
        "kl_divergence_quantiles": {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(token_kl.max())},
        "top1_agreement": same,
        "top1_agreement_se": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
        "rms_delta_p": math.sqrt(total("dp_sq") / n),
        "nll_correlation": covariance / math.sqrt(x_var * y_var) if x_var > 0 and y_var > 0 else None,
    }
