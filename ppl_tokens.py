"""Per-token and per-word surprisal: which characters of a text each token stands for, token
rows and word rows from the runner's log-probabilities, and files written as scoring goes.
The Space's per-token view and `ppl_cli.py --tokens-out/--words-out` use these functions."""

import bisect
import csv
import json
import math
import os
import re
from pathlib import Path

if __package__:
    from .ppl_runner import score_documents
else:
    from ppl_runner import score_documents

TOKEN_COLUMNS = ("document", "position", "token_id", "token", "start", "end", "logprob", "surprisal")
WORD_COLUMNS = ("document", "word", "text", "start", "end", "num_tokens", "surprisal")


def token_spans(tokenizer, text):
    """`(ids, spans)`: the text's token ids (as the runner tokenizes it) and, per token, the
    character span `(start, end)` it stands for. Spans tile the text: each starts where the
    previous ended (so whitespace before a word belongs to its token) and the last runs to the
    end, so the tokens' texts joined give the text back; a token that only completes a
    multi-byte character gets an empty span. Needs a fast tokenizer (offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("Expected a fast tokenizer (with offset mappings) for per-token output, but got a slow one.")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, previous = [], 0
    for _, end in encoding["offset_mapping"]:
        end = max(end, previous)
        spans.append((previous, end))
        previous = end
    if spans:
        spans[-1] = (spans[-1][0], len(text))
    return list(encoding["input_ids"]), spans


def token_rows(document, text, ids, spans, logprobs):
    """Rows for the scored tokens of one text: the last `len(logprobs)` tokens (all of them with
    a start token; all but the first without). `position` 0 is the first scored token."""
    first = len(ids) - len(logprobs)
    rows = []
    for position, (i, logprob) in enumerate(zip(range(first, len(ids)), logprobs)):
        start, end = spans[i]
        rows.append({"document": document, "position": position, "token_id": int(ids[i]), "token": text[start:end],
                     "start": start, "end": end, "logprob": float(logprob), "surprisal": -float(logprob) / math.log(2)})
    return rows


def word_rows(document, text, tokens):
    """Rows for the whitespace-separated words of one text from its token rows. A token belongs
    to the word in which its first non-space character falls; a whitespace-only token to the
    next word (to the last word when none follows), so word surprisals add up to the tokens'."""
    words = [m.span() for m in re.finditer(r"\S+", text)]
    if not words:
        return []
    starts = [a for a, _ in words]
    totals = [[0, 0.0] for _ in words]
    for row in tokens:
        piece = row["token"]
        stripped = len(piece) - len(piece.lstrip())
        if stripped < len(piece):  # the word holding its first non-space character
            k = bisect.bisect_right(starts, row["start"] + stripped) - 1
        else:  # whitespace only: the next word
            k = min(bisect.bisect_left(starts, row["end"]), len(words) - 1)
        totals[max(k, 0)][0] += 1
        totals[max(k, 0)][1] += row["surprisal"]
    return [{"document": document, "word": k, "text": text[a:b], "start": a, "end": b, "num_tokens": n, "surprisal": s}
            for k, ((a, b), (n, s)) in enumerate(zip(words, totals))]


def document_token_rows(tokenizer, row):
    """Token rows of one `score_documents` row scored with `keep_logprobs` (its `text` and `logprobs`)."""
    ids, spans = token_spans(tokenizer, row["text"])
    return token_rows(row["index"], row["text"], ids, spans, row["logprobs"])


def score_tokens(model, tokenizer, texts, **runner_kwargs):
    """Per-token rows of every text, streamed: yields `(document index, token rows)` per text."""
    documents = ((i, None, text) for i, text in enumerate(texts))
    for part in score_documents(model, tokenizer, documents, keep_logprobs=True, **runner_kwargs):
        for row in part:
            yield row["index"], document_token_rows(tokenizer, row)


class TableWriter:
    """Rows appended to a `.parquet`, `.csv` or `.jsonl` file (by its suffix) as they come.

    They go to a hidden temporary file beside `path`, renamed onto `path` by `close` when it
    holds rows (a run that stops early keeps the rows of the documents it finished); a file
    without rows is removed (and with `replace`, an earlier file at `path` too), and a killed
    run leaves no half file under `path`."""

    def __init__(self, path, columns, replace=False):
        self.path, self.columns, self.replace = Path(path), columns, replace
        self.suffix = self.path.suffix.lower()
        if self.suffix not in (".parquet", ".csv", ".jsonl"):
            raise ValueError(f"Expected a .parquet, .csv or .jsonl path, but got {str(path)!r}.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.rows = 0
        self._parquet = None
        self._file = None if self.suffix == ".parquet" else open(self.tmp, "w", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=columns) if self.suffix == ".csv" else None
        if self._csv:
            self._csv.writeheader()

    def write(self, rows):
        if not rows:
            return
        self.rows += len(rows)
        if self.suffix == ".jsonl":
            self._file.write("".join(json.dumps({k: r[k] for k in self.columns}, ensure_ascii=False) + "\n" for r in rows))
        elif self._csv:
            self._csv.writerows({k: r[k] for k in self.columns} for r in rows)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist([{k: r[k] for k in self.columns} for r in rows])
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.tmp, table.schema)
            self._parquet.write_table(table.cast(self._parquet.schema))

    def close(self):
        if self._parquet is not None:
            self._parquet.close()
        if self._file is not None:
            self._file.close()
        if self.rows:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
            if self.replace:  # --force: an earlier run's file must not pass for this run's rows
                self.path.unlink(missing_ok=True)
