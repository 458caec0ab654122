"""Per-document results on disk: a folder of Parquet parts, written as scoring goes, that a
killed run resumes and `pandas.read_parquet(folder)` reads whole. No math here.

    folder/_manifest.json                  what was scored: corpus fingerprint, model, window settings
    folder/part-00000-rank0000.parquet     index, id, num_tokens, nll, perplexity, num_words, num_bytes, error
                                           (+ COMPARE_COLUMNS when compared with a reference); `error` is
                                           null, or why the document was skipped or flagged (`ppl_inputs`)
    folder/.part-00001-rank0000.parquet.tmp   a part being written (readers skip names starting with "." or "_")

A part is written under its temporary name and renamed when complete, so it is whole or
absent; parts are cut every `flush_rows` documents or `flush_seconds`, whichever comes first,
which bounds what a kill loses.
"""

import json
import os
import re
import socket
import time
from pathlib import Path

MANIFEST = "_manifest.json"
_PART = re.compile(r"^part-(\d+)-rank(\d+)\.parquet$")
COLUMNS = ("index", "id", "num_tokens", "nll", "perplexity", "num_words", "num_bytes", "error")
# with a reference model: `ppl_compare.token_stats`'s per-document sums, and the per-token KL for its quantiles
COMPARE_COLUMNS = ("reference_nll", "reference_perplexity", "kl", "kl_sq", "kl_variance", "same_top1", "dp_sq", "nll_sq",
                   "reference_nll_sq", "nll_cross", "token_kl")


def _schema(compare=False):
    import pyarrow as pa

    fields = [("index", pa.int64()), ("id", pa.string()), ("num_tokens", pa.int64()), ("nll", pa.float64()),
              ("perplexity", pa.float64()), ("num_words", pa.int64()), ("num_bytes", pa.int64()), ("error", pa.string())]
    if compare:
        types = {"same_top1": pa.int64(), "token_kl": pa.list_(pa.float64())}  # the others: float64 sums
        fields += [(name, types.get(name, pa.float64())) for name in COMPARE_COLUMNS]
    return pa.schema(fields)


def _parts(folder):
    return sorted(p for p in Path(folder).iterdir() if _PART.match(p.name)) if Path(folder).is_dir() else []


def hold(folder, rank=0):
    """Hold `folder` for this run's `rank` until `release()` (or the process ends): a second run
    writing the same folder at the same time is refused, naming the process that holds it.

    The lock is the operating system's (`filelock`: flock on a hidden `.lock-rankNNNN` file), so
    a run that dies, even by SIGKILL, leaves no stale lock behind.
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"Expected --docs-out to be a folder, but {str(folder)!r} is a file.")
    folder.mkdir(parents=True, exist_ok=True)
    lock, owner = FileLock(folder / f".lock-rank{rank:04d}"), folder / f".lock-rank{rank:04d}.owner"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner.read_text(encoding="utf-8").strip() if owner.is_file() else "another process"
        raise ValueError(f"The --docs-out folder {str(folder)!r} is being written by another run ({holder}): wait "
                         "for it to end, or give another folder.") from None
    owner.write_text(f"pid {os.getpid()} on {socket.gethostname()}", encoding="utf-8")
    return lock


# A path or name is compared only where the content behind it is not known: the same corpus or
# model under another path resumes. Content keys of folders written before they existed are skipped.
_CONTENT_OF = {"corpus": "corpus_fingerprint", "model": "model_files", "reference": "reference_files"}
_ADDED_LATER = {"corpus_files", "model_files", "reference_files"}


def _changed_files(there, now):
    """'a.jsonl changed; b.jsonl is new; c.jsonl is gone' from two {name: digest} dicts."""
    words = [f"{name} changed" for name in sorted(set(there) & set(now)) if there[name] != now[name]]
    words += [f"{name} is new" for name in sorted(set(now) - set(there))]
    words += [f"{name} is gone" for name in sorted(set(there) - set(now))]
    return "; ".join(words)


def _differences(saved, manifest):
    """What differs between a folder's manifest and this run's, each named, in words where it can be."""
    differ = []
    for key in sorted(set(saved) | set(manifest)):
        there, now = saved.get(key), manifest.get(key)
        if there == now or key == "corpus_files" or (key in _ADDED_LATER and key not in saved):
            continue
        content = _CONTENT_OF.get(key)
        if content and saved.get(content) and saved.get(content) == manifest.get(content):
            continue  # the same content under another path or name
        if key == "corpus_fingerprint" and saved.get("corpus_files") and saved.get("corpus_files") != manifest.get("corpus_files"):
            differ.append(f"{key}: the corpus changed since the run began ({_changed_files(saved['corpus_files'], manifest.get('corpus_files') or {})})")
        elif key in ("model_files", "reference_files") and there and now:
            whose = "model" if key == "model_files" else "reference model"
            differ.append(f"{key}: the {whose}'s files changed since the run began ({_changed_files(there, now)})")
        else:
            differ.append(f"{key}: {there!r} there, {now!r} now")
    return differ


def prepare(folder, manifest, *, resume, rank=0):
    """Check `folder` before anything is scored; read what a resumed run has done already.

    Args:
        folder: the `--docs-out` folder.
        manifest: a JSON-able dict of what decides the numbers (corpus fingerprint, model,
            window settings); a resumed folder must have been written with the same.
        resume: continue a folder that holds parts; without it a non-empty folder is an error.
        rank: this process's rank; rank 0 removes the parts (and manifest) a killed run left half written.

    Returns:
        (indices already scored, the first free part number).

    Raises:
        ValueError: a non-empty folder without `resume`, a path that is a file, a resumed
            folder written with other settings (each difference named).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"Expected --docs-out to be a folder, but {str(folder)!r} is a file.")
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    if not entries or [p.name for p in entries] == [MANIFEST] and not resume:
        _remove_half_written(folder, rank)
        return set(), 0  # nothing there, or a run that scored nothing (an empty corpus): nothing to lose
    if not resume:
        raise ValueError(f"The --docs-out folder {str(folder)!r} is not empty: pass --resume to continue that run, "
                         "or give a new folder (nothing is overwritten).")
    try:
        saved = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ValueError(f"Cannot resume {str(folder)!r}: it has no readable {MANIFEST}, so it was not written "
                         "by --docs-out.") from None
    differ = _differences(saved, manifest)
    if differ:
        raise ValueError(f"Cannot resume {str(folder)!r}: it was written with other settings ({'; '.join(differ)}); "
                         "its rows would not pool with this run's. Give a new --docs-out folder to score afresh.")
    _remove_half_written(folder, rank)
    parts = _parts(folder)
    done = set(read_rows(folder, columns=["index"])["index"].tolist()) if parts else set()
    return done, 1 + max((int(_PART.match(p.name).group(1)) for p in parts), default=-1)


def _remove_half_written(folder, rank):
    """The temporary files of a part or manifest that a killed run was writing: never complete."""
    if rank == 0:  # rank 0's lock is the whole run's: another run's other ranks never delete a part being written
        for stale in [*Path(folder).glob(".part-*.tmp"), *Path(folder).glob(f".{MANIFEST}.tmp*")]:
            stale.unlink(missing_ok=True)


def write_manifest(folder, manifest):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)


def read_rows(folder, columns=None):
    """Every complete part of a `--docs-out` folder as one pandas DataFrame, in index order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = _parts(folder)
    if not parts:
        return _schema().empty_table().to_pandas()[columns or list(COLUMNS)]
    # parts written before the `error` column existed lack it: null there
    table = pa.concat_tables((pq.read_table(p, columns=columns) for p in parts), promote_options="default")
    return table.to_pandas().sort_values("index", kind="stable").reset_index(drop=True)


class PartWriter:
    """Buffers rows and writes them as parts of `folder`, named with `rank` and increasing numbers.

    `flush_rows` and `flush_seconds` bound what a kill loses: the rows scored since the last part.
    """

    def __init__(self, folder, *, rank=0, first_part=0, flush_rows=256, flush_seconds=60.0):
        self.folder, self.rank, self.part = Path(folder), rank, first_part
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.rows, self.last_flush = [], time.monotonic()
        self.folder.mkdir(parents=True, exist_ok=True)

    def add(self, rows):
        self.rows.extend(rows)
        if len(self.rows) >= self.flush_rows or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.last_flush = time.monotonic()
        if not self.rows:
            return
        compare = any("reference_nll" in row for row in self.rows)
        columns = COLUMNS + (COMPARE_COLUMNS if compare else ())
        # rows of empty or flagged documents hold only index, id and error: the rest is null
        table = pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in self.rows], schema=_schema(compare))
        name = f"part-{self.part:05d}-rank{self.rank:04d}.parquet"
        tmp = self.folder / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.folder / name)  # atomic: a reader sees the whole part or none
        self.part += 1
        self.rows = []


def pool_scores(scores, *, bootstrap_resamples=1000, seed=0):
    """The corpus result from per-document scores: what one process gives for the same documents.

    Args:
        scores: a pandas DataFrame, a Ray dataset, or a folder of Parquet files (a `--docs-out`
            folder, or what Ray's `write_parquet` wrote from `ppl_ray.DocumentScorer` rows), with
            the columns `nll`, `num_tokens`, `num_words`, `num_bytes`, and optionally `index`
            (the document's position; default the row's position), `id` and `error`.
        bootstrap_resamples, seed: as for `ppl_runner.pool_rows`.

    Rows with an `error` or no `nll` are left out and counted: the result holds
    `ppl_runner.pool_rows`'s keys plus `num_errors` and `errors` (rows per error kind).

    Raises:
        ValueError: a missing column, a folder without Parquet files, no scored row, a document
            index that appears twice.
        TypeError: `scores` of another type.
    """
    if __package__:
        from .ppl_runner import pool_rows
    else:
        from ppl_runner import pool_rows
    import pandas as pd

    wanted = ["index", "id", "num_tokens", "nll", "num_words", "num_bytes", "error"]
    if isinstance(scores, (str, os.PathLike)):
        import pyarrow.dataset as pads

        if not Path(scores).is_dir():
            raise ValueError(f"Expected `scores` to be a folder of Parquet files, but {str(scores)!r} is not a folder.")
        data = pads.dataset(str(scores), format="parquet")  # skips names starting with "." or "_"
        if not data.files:
            raise ValueError(f"Expected `scores` to be a folder of Parquet files, but {str(scores)!r} holds none.")
        frame = data.to_table(columns=[c for c in wanted if c in data.schema.names]).to_pandas()
    elif isinstance(scores, pd.DataFrame):
        frame = scores
    elif callable(getattr(scores, "iter_batches", None)) and callable(getattr(scores, "columns", None)):  # Ray
        present = [c for c in wanted if c in scores.columns()]
        batches = list(scores.select_columns(present).iter_batches(batch_format="pandas", batch_size=None))
        frame = pd.concat(batches, ignore_index=True) if batches else pd.DataFrame(columns=present)
    else:
        raise TypeError(f"Expected `scores` to be a pandas DataFrame, a Ray dataset or a folder, but got "
                        f"{type(scores).__name__}.")
    missing = [c for c in ("num_tokens", "nll", "num_words", "num_bytes") if c not in frame.columns]
    if missing:
        raise ValueError(f"Expected `scores` to have the columns {missing}, but it has {list(frame.columns)}.")
    failed = frame["nll"].isna()
    if "error" in frame.columns:
        failed |= frame["error"].notna()
    errors = frame.loc[failed, "error"] if "error" in frame.columns else pd.Series([], dtype=object)
    kinds = errors.fillna("no score").map(lambda message: str(message).split(":")[0]).value_counts()
    good = frame[~failed]
    index = good["index"].tolist() if "index" in good.columns else good.index.tolist()
    ids = good["id"].tolist() if "id" in good.columns else [None] * len(good)
    rows = [{"index": int(i), "id": doc_id, "nll": float(nll), "num_tokens": int(tokens), "num_words": int(words),
             "num_bytes": int(num_bytes)}
            for i, doc_id, nll, tokens, words, num_bytes in zip(index, ids, good["nll"], good["num_tokens"],
                                                                 good["num_words"], good["num_bytes"])]
    result = pool_rows(rows, bootstrap_resamples=bootstrap_resamples, seed=seed)
    result.update(num_errors=int(failed.sum()), errors={str(k): int(n) for k, n in kinds.items()})
    return result
