"""Score corpora on a Ray cluster: the per-document scorer as a Ray Data stage.

    ds = ray.data.read_parquet("crawl/")
    ds = ds.map_batches(DocumentScorer, fn_constructor_kwargs={"max_length": 1024},
                        compute=ray.data.ActorPoolStrategy(size=8), num_gpus=1, batch_format="pandas",
                        **ACTOR_FAULT_TOLERANCE)
    ds.write_parquet("scores/")                  # every input column, plus SCORE_COLUMNS
    ppl_docs.pool_scores("scores/")              # the corpus result, as one process gives it

`DocumentScorer` is a plain callable class (no Ray needed to import or call it): it loads
the model once per actor and runs `ppl_runner.score_documents`, the scorer behind every
other route, on the rows of each batch. A row that `ppl_inputs` skips or flags gets null
scores and an `error` message; it never fails its batch. `score_dataset` adds the retries
and the `Ledger` that flags a row which kills its worker each time (the bare `map_batches`
above retries a batch at most 3 times, then fails the job). Ray itself is imported only
inside `run_cli`, behind `ppl_cli.py --engine ray`.
"""

import glob
import os
import re
import time
import warnings
from pathlib import Path

if __package__:
    from .ppl_docs import pool_scores
    from .ppl_inputs import SKIPPED
    from .ppl_runner import resolve_settings, score_documents
    from .ppl_sources import load_model, model_name
else:
    from ppl_docs import pool_scores
    from ppl_inputs import SKIPPED
    from ppl_runner import resolve_settings, score_documents
    from ppl_sources import load_model, model_name

# Columns each row gains; `nll` is the summed NLL in nats, `error` None for a scored row.
SCORE_COLUMNS = ("num_tokens", "nll", "perplexity", "num_words", "num_bytes", "error")
_DTYPES = {"num_tokens": "Int64", "nll": "Float64", "perplexity": "Float64", "num_words": "Int64",
           "num_bytes": "Int64", "error": "object"}
# Keywords for `map_batches` that make a killed actor come back and its batch run again (Ray's
# defaults: no actor restart, no task retry). Retries are bounded: a row that kills its worker
# every time (out of memory on one huge row) is found by `Ledger` on the second retry and flagged.
ACTOR_FAULT_TOLERANCE = {"max_restarts": -1, "max_task_retries": 3}
KILLED = "its worker died scoring it (out of memory?)"
_RUNNER_KEYS = ("batch_size", "max_length", "stride", "max_batch_tokens", "add_start_token", "head")
ROWS_PER_CALL = 64  # rows per `DocumentScorer` call in `run_cli`: a retried batch costs at most this
_READERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


class DocumentScorer:
    """A Ray Data stage: `ds.map_batches(DocumentScorer, fn_constructor_kwargs={...}, batch_format="pandas")`.

    Args:
        model_id, gguf_file, device, dtype, trust_remote_code: as for `ppl_sources.load_model`
            (default: the embedded SmolLM2-135M; `device` "auto" takes the actor's GPU if it has one).
        text_column: the column holding the texts.
        num_threads: torch threads in this actor (default: torch's own, which Ray sets from the
            actor's CPUs: one thread below one CPU).
        batch_size, max_length, stride, max_batch_tokens, add_start_token: the runner's
            settings, as for `ppl_runner.score_texts`; `runner_kwargs`: its other settings.

    Called with a pandas DataFrame, returns it with SCORE_COLUMNS added: every input column
    passes through, in order. Rows that `ppl_inputs.problem` skips (missing or whitespace-only
    texts) or flags (not a string, not valid Unicode, no token to score) get null scores and an
    `error` message, as on every route; a bad row never ends the job.

    Raises:
        ValueError, TypeError: bad settings or model (at construction, so a job fails before
            it reads anything); a batch without `text_column`, or with a column SCORE_COLUMNS
            would overwrite.
    """

    def __init__(self, model_id=None, *, gguf_file=None, device=None, dtype=None, trust_remote_code=False,
                 text_column="text", num_threads=None, batch_size=16, max_length=None, stride=None,
                 max_batch_tokens=None, add_start_token=True, ledger=None, **runner_kwargs):
        if not isinstance(text_column, str):
            raise TypeError(f"Expected `text_column` to be a column name (str), but got {type(text_column).__name__}.")
        if num_threads is not None:
            import torch

            torch.set_num_threads(num_threads)
        self.text_column, self.ledger = text_column, ledger
        self.model, self.tokenizer = load_model(model_id, gguf_file=gguf_file, device=device, dtype=dtype,
                                                trust_remote_code=trust_remote_code)
        # resolved once per actor: bad settings fail here, and the batch budget stays what it was (resolved per
        # call, a dip in free memory could fail a batch)
        self.settings = resolve_settings(self.model, self.tokenizer, batch_size=batch_size, max_length=max_length,
                                         stride=stride, max_batch_tokens=max_batch_tokens,
                                         add_start_token=add_start_token, **runner_kwargs)

    def __call__(self, batch):
        if self.text_column not in batch.columns:
            raise ValueError(f"Expected a column `text_column`={self.text_column!r}, but the batch has "
                             f"{list(batch.columns)}.")
        taken = [c for c in SCORE_COLUMNS if c in batch.columns]
        if taken:
            raise ValueError(f"The input already has column(s) {taken}, which the scores would overwrite; "
                             "rename or drop them first.")
        scores = {name: [None] * len(batch) for name in SCORE_COLUMNS}
        texts = [None if _missing(text) else text for text in batch[self.text_column].tolist()]
        index = batch["index"].tolist() if "index" in batch.columns else None  # the corpus index, on the CLI's route
        for row in self._rows(list(enumerate(texts)), index):
            for name in SCORE_COLUMNS:
                scores[name][row["index"]] = row.get(name)
        out = batch.copy()
        for name in SCORE_COLUMNS:
            out[name] = _column(scores[name], _DTYPES[name])
        return out

    def _rows(self, docs, index=None):
        """The rows of `(position, text)` documents. After an attempt at this batch died (Ray runs it
        again on a new actor), one document at a time, asking the ledger whether an attempt died
        while scoring it alone: that one is flagged, not tried again."""
        if self.ledger is None:
            return self._score(docs)
        import ray

        keys = [_row_key(position if index is None else index[position], text) for position, text in docs]
        batch = _row_key(None, tuple(keys))
        if ray.get(self.ledger.begin.remote(batch)) == 0:
            rows = self._score(docs)
        else:
            rows = []
            for (position, text), key in zip(docs, keys):
                if ray.get(self.ledger.start_row.remote(key)):
                    rows.append({"index": position, "error": KILLED})
                else:
                    rows.extend(self._score([(position, text)]))
                    ray.get(self.ledger.end_row.remote(key))
        self.ledger.end.remote(batch)
        return rows

    def _score(self, docs):
        """The one scorer and its one rule: empty rows skipped, bad ones flagged. A document the rule lets
        through that still fails (no token left after tokenizing) is found by scoring the batch's documents
        one at a time, and flagged: it never sinks the others or the job."""
        try:
            return [row for part in score_documents(self.model, self.tokenizer, ((i, None, text) for i, text in docs),
                                                    progress=False, bad_rows="flag", settings=self.settings) for row in part]
        except (ValueError, TypeError) as err:
            if len(docs) == 1:
                return [{"index": docs[0][0], "error": re.sub(r"`texts\[\d+\]`", "the text", str(err))}]
        return [row for doc in docs for row in self._score([doc])]


class Ledger:
    """A Ray actor that outlives the scoring actors of a job: which batches were attempted, and which
    rows an attempt was scoring alone, so that a row that kills its worker is flagged on the retry
    after the one that found it, instead of being retried until the job fails."""

    def __init__(self):
        self.attempts, self.open = {}, set()

    def begin(self, batch):
        """How many attempts at this batch came before (one that finished is never run again)."""
        self.attempts[batch] = self.attempts.get(batch, 0) + 1
        return self.attempts[batch] - 1

    def end(self, batch):
        self.attempts.pop(batch, None)  # finished: nothing to remember

    def start_row(self, key):
        """Whether an earlier attempt died while scoring this row alone."""
        died = key in self.open
        self.open.add(key)
        return died

    def end_row(self, key):
        self.open.discard(key)


def _row_key(position, text):
    """A row's key: its corpus index (or position in its batch) with its text, so equal texts differ."""
    import hashlib

    return hashlib.sha1(repr((position, text)).encode("utf-8", "surrogatepass")).hexdigest()


def _column(values, dtype):
    import pandas as pd

    return pd.Series(values, dtype=dtype) if dtype != "object" else pd.Series(values, dtype=object)


def _missing(value):
    import pandas as pd

    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))  # a list cell is not missing


def _read_files(batch, *, text_field, id_field):
    """Ray's read stage for JSON Lines, JSON and CSV files: `ppl_corpus.file_rows`, in blocks of
    ROWS_PER_CALL rows (a number or a lone surrogate in a text reaches the scorer, which flags it)."""
    import itertools

    import pandas as pd

    from ppl_corpus import file_rows  # the Ray route runs from the project's folder, never from evaluate's copy

    for path in batch["path"]:
        rows = file_rows(path, text_field=text_field, id_field=id_field)
        while block := list(itertools.islice(rows, ROWS_PER_CALL)):
            ids, texts = zip(*block)
            columns = {text_field: pd.Series(texts, dtype=object)}
            if id_field and id_field != text_field:
                columns[id_field] = pd.Series([None if i is None else str(i) for i in ids], dtype=object)
            yield pd.DataFrame(columns)


class _Numbering:
    """Adds `index`, the row's position in the corpus, to rows that arrive in corpus order
    (one actor, with `preserve_order`): the one process's document index."""

    def __init__(self, id_column=None):
        self.next, self.id_column = 0, id_column

    def __call__(self, batch):
        from ppl_corpus import document_id

        out = batch.copy()
        out["index"] = range(self.next, self.next + len(batch))
        ids = out[self.id_column].astype(object) if self.id_column else [None] * len(batch)
        # the local reader's rule; pandas turns a Parquet column of ints with nulls into floats
        out["id"] = [document_id(i, None if _missing(v) else int(v) if isinstance(v, float) and v.is_integer() else v)
                     for i, v in zip(out["index"], list(ids))]
        self.next += len(batch)
        return out


# ---------------------------------------------------------------------------------------
# The command line's Ray route: ppl_cli.py --engine ray


def corpus_files(source):
    """The files of a Parquet / JSON Lines / CSV corpus (a file, a folder or a glob), sorted, and their reader.

    Raises:
        ValueError: nothing found, a corpus of another kind, or files of mixed kinds.
    """
    source = str(source)
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _READERS
                       and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    elif any(ch in source for ch in "*?["):
        files = sorted(glob.glob(source, recursive=True))
    else:
        files = [source] if path.is_file() else []
    if not files:
        raise ValueError(f"Expected --corpus to be a Parquet, JSON Lines or CSV file, a folder or a glob of them "
                         f"for --engine ray, but found no such file at {source!r}.")
    kinds = {_READERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) > 1:
        raise ValueError(f"Expected --corpus files of one kind (.parquet, .jsonl, .csv) for --engine ray, "
                         f"but {source!r} holds {sorted(str(Path(f).suffix) for f in files[:5])}.")
    return files, kinds.pop()


def actor_resources(workers, total_cpus, gpus_per_worker=0.0):
    """(CPUs per actor, torch threads per actor) for `workers` actors on `total_cpus` CPUs.

    One CPU is left for reading and writing: actors holding every CPU starve the read
    tasks, and the job hangs without a warning (ray-project/ray#44687).

    >>> actor_resources(1, 2), actor_resources(2, 2), actor_resources(4, 16)
    ((1.0, 2), (0.5, 1), (1.0, 4))
    """
    if gpus_per_worker:
        return 1.0, None
    cpus = max(0.1, min(1.0, (total_cpus - 1) / workers))
    return round(cpus, 2), max(1, int(total_cpus // workers))


def init_ray(address=None):
    """Join the cluster at `address` (or $RAY_ADDRESS, as `ray job submit` sets it), else start a
    local one for this run: no dashboard, token auth off. Returns whether this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 turns token auth on by default
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return True


def score_dataset(ds, *, workers=1, gpus_per_worker=0.0, rows_per_call=ROWS_PER_CALL, scorer=None, **scorer_kwargs):
    """`ds` with the scores added by `workers` actors of `scorer` (default DocumentScorer), fault tolerant:
    a killed actor is replaced and its batch retried (at most 3 times), and a row that kills its worker
    each time is flagged with KILLED (through a `Ledger` actor shared by the job's scorers)."""
    import ray

    cpus, threads = actor_resources(workers, ray.cluster_resources().get("CPU", 1), gpus_per_worker)
    scorer_kwargs.setdefault("ledger", ray.remote(num_cpus=0)(Ledger).remote())
    with warnings.catch_warnings():  # Ray 2.60 deprecates passing actor options as keywords, but has no other way
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(scorer or DocumentScorer, fn_constructor_kwargs={"num_threads": threads, **scorer_kwargs},
                              compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus,
                              num_gpus=gpus_per_worker or None, batch_size=rows_per_call, batch_format="pandas",
                              **ACTOR_FAULT_TOLERANCE)


def _fail_on_flagged(scores, count):
    """--bad-rows fail on Ray: the job scored every row; the run fails naming the first bad one."""
    import pandas as pd

    frame = pd.read_parquet(scores, columns=["index", "id", "error"]) if isinstance(scores, str) else scores
    bad = frame[frame["error"].notna() & ~frame["error"].isin(SKIPPED)].sort_values("index")
    first = bad.iloc[0]
    raise ValueError(f"Document {first['index']} (id {first['id']!r}) could not be scored: {first['error']} ({count} row(s) "
                     "in all; with --bad-rows fail the run has no result: fix them, or pass --bad-rows flag).")


def run_cli(args, *, limit, report, write_outputs):
    """`ppl_cli.py --engine ray`: read the corpus as a Ray dataset, score it, write `--docs-out` through
    `write_parquet`, pool and report as one process does (`report`, `write_outputs`: ppl_cli's)."""
    import ray

    if args.resume:
        raise ValueError("--resume is not supported with --engine ray: give a new --docs-out folder.")
    if args.workers < 1:
        raise ValueError(f"Expected --workers >= 1, but got {args.workers}.")
    if args.gpus_per_worker < 0:
        raise ValueError(f"Expected --gpus-per-worker >= 0, but got {args.gpus_per_worker}.")
    files, kind = corpus_files(args.corpus)
    folder = Path(args.docs_out) if args.docs_out else None
    if folder and folder.exists() and (not folder.is_dir() or any(not p.name.startswith(".") for p in folder.iterdir())):
        raise ValueError(f"The --docs-out folder {str(folder)!r} must be new or empty for --engine ray "
                         "(nothing is overwritten).")
    scorer_kwargs = dict(model_id=args.model, gguf_file=args.gguf_file, device=args.device, dtype=args.dtype,
                         trust_remote_code=args.trust_remote_code, text_column=args.text_field,
                         batch_size=args.batch_size, max_length=args.max_length, stride=args.stride,
                         max_batch_tokens=args.max_batch_tokens, add_start_token=not args.no_start_token)
    # The report names the model and its windows: the driver loads it once, on its CPU, as ppl_cli does.
    model, tokenizer = load_model(args.model, gguf_file=args.gguf_file, device="cpu", dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code)
    if getattr(args, "head", None):
        scorer_kwargs["head"] = args.head
    settings = resolve_settings(model, tokenizer, **{k: v for k, v in scorer_kwargs.items() if k in _RUNNER_KEYS})
    start = tokenizer.convert_ids_to_tokens(settings["start_token_id"]) if settings["start_token_id"] is not None else "none"
    windows = f"max_length={settings['max_length']},stride={settings['stride']},start_token={start}"
    dtype = str(next(model.parameters()).dtype)
    del model, tokenizer

    clock = time.perf_counter()
    started_ray = init_ray(args.ray_address)
    startup = time.perf_counter() - clock
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order = True  # rows leave each stage in corpus order: `index`
    context.enable_progress_bars = not args.quiet
    try:
        if kind == "parquet":  # typed columns, read by row group in parallel
            ds = ray.data.read_parquet(files)
        else:  # the project's reader, file by file: the rows (and what is flagged) are those one process reads
            ds = ray.data.from_items([{"path": f} for f in files]).map_batches(
                _read_files, fn_kwargs={"text_field": args.text_field, "id_field": args.id_field}, batch_size=1,
                batch_format="pandas")
        if limit:
            ds = ds.limit(limit)
        # no restart: a new counter would number rows twice, so its loss fails the job; one call at a time: with
        # several in flight the actor was seen to number a file's second block before its first (3 runs in 24)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(_Numbering, fn_constructor_kwargs={"id_column": args.id_field},
                                compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1),
                                num_cpus=0, batch_format="pandas",
                                max_restarts=0)
        ds = ds.repartition(target_num_rows_per_block=ROWS_PER_CALL)  # a small file is one block: split it
        ds = score_dataset(ds, workers=args.workers, gpus_per_worker=args.gpus_per_worker, **scorer_kwargs)
        ds = ds.select_columns(["index", "id", *SCORE_COLUMNS])
        if folder:
            ds.write_parquet(str(folder))
            scores = str(folder)
        else:
            import pandas as pd

            scores = pd.concat(list(ds.iter_batches(batch_format="pandas", batch_size=None)), ignore_index=True)
        result = pool_scores(scores, bootstrap_resamples=args.bootstrap_resamples)
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        if started_ray:
            ray.shutdown()
    seconds = time.perf_counter() - clock - startup
    flagged = result.pop("errors")
    empty = sum(n for message, n in flagged.items() if message in SKIPPED)
    bad = {message: n for message, n in flagged.items() if message not in SKIPPED}
    if bad and args.bad_rows == "fail":
        _fail_on_flagged(scores, sum(bad.values()))
    name = model_name(args.model, args.gguf_file)
    # settings as the driver resolves them on its CPU; actors on GPUs size their own batches
    result.update(model=name, corpus=args.corpus, seconds=seconds, dtype=dtype,
                  device="cuda" if args.gpus_per_worker else "cpu", settings=settings, processes=args.workers,
                  engine="ray", ray_startup_seconds=startup, docs_out=args.docs_out, skipped_empty=empty,
                  flagged_rows=sum(bad.values()))
    report(args, result, [{"counts": {"resumed": 0}}], limit=limit, name=name, windows=windows,
           seconds=seconds, world_size=1, flagged=bad)
    if args.docs_out:
        del result["perplexities"]  # one per document: they are in the folder
    write_outputs(args, result, name=name, windows=windows)
    return result
