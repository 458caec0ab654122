"""Where texts come from, streamed: the default English text, text files (paragraphs, or
WikiText documents), JSON Lines / JSON / Parquet / CSV files, `datasets` data sets.

`iter_documents` yields `Document(index, id, text)` as it reads; nothing here holds a whole
corpus in memory (but `.json`, a single JSON value, and the built-in default). `index` is a
document's position in the corpus, the same whatever process reads it, so that shards
(`rank`, `world_size`), `limit` and resumed runs all agree on which document is which.
No math here.
"""

import csv
import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

DEFAULT_CORPUS = "pydoc"  # the standard library's own documentation topics: real English on every Python
TEXT_SUFFIXES = {".txt", ".md", ".tokens", ".raw"}
FILE_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".json", ".parquet", ".csv"}


class Document(NamedTuple):
    index: int  # position in the corpus (0-based), whoever reads it
    id: str  # the --id-field value as a string, else str(index)
    text: object  # as read: a string, or None/other for a bad row (the scorer says what is wrong)


def default_corpus():
    """The standard library's documentation topics (`pydoc_data.topics`), one text each, sorted by name."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def split_paragraphs(text):
    """Blank-line-separated paragraphs, stripped, empty ones dropped."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def read_corpus(source=None, *, text_field="text", split="test", config=None):
    """All non-empty texts of a corpus, as a list (for small corpora; `iter_documents` streams).

    Args:
        source: None or "pydoc" for the default corpus; a path to a `.txt` / `.md` file
            (blank-line-separated paragraphs; WikiText-style files: one document per article),
            `.jsonl` (one object per line, `text_field`), `.json` (a list of strings or of
            objects), `.parquet` or `.csv` (column `text_field`); a local data folder or a
            `datasets` data set name (Hub, online).
        text_field: the column or key holding the text.
        split, config: for `datasets` data sets.

    Raises:
        ValueError: a missing or unreadable file, a missing field, a corpus with no text.
    """
    texts = []
    for doc in iter_documents(source, text_field=text_field, split=split, config=config):
        if doc.text is None or (isinstance(doc.text, str) and not doc.text.strip()):
            continue
        if not isinstance(doc.text, str):
            raise ValueError(f"Could not read corpus {str(source)!r}: item {doc.index} has no string field {text_field!r}")
        texts.append(doc.text)
    if not texts:
        raise ValueError(f"The corpus {source!r} holds no text.")
    return texts


def corpus_kind(source):
    """"pydoc", "file" or "dataset" (a `datasets` name or a local data folder); checks the type."""
    if source in (None, DEFAULT_CORPUS):
        return "pydoc"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"Expected `source` to be a file path or a data set name, but got {type(source).__name__}.")
    path = Path(source)
    if path.suffix.lower() in FILE_SUFFIXES or path.is_file():
        if not path.is_file():
            raise ValueError(f"Corpus file not found: {source}")
        return "file"
    return "dataset"


def iter_documents(source=None, *, text_field="text", id_field=None, split="test", config=None, limit=None,
                   rank=0, world_size=1):
    """Stream a corpus as `Document(index, id, text)`, reading only what is asked for.

    Args:
        source, text_field, split, config: as for `read_corpus`.
        id_field: a column or key carried along as the document's id (default: its index).
        limit: read documents 0..limit-1 only (None or 0: all); the reader stops there.
        rank, world_size: yield only this process's share: documents with
            `index % world_size == rank`; for Parquet, whole row groups `g % world_size == rank`
            (each rank then reads only its own row groups).

    Yields documents in index order. Empty texts are yielded too (the caller skips them), so
    that every reader of the corpus numbers documents the same way.

    Raises:
        ValueError: a missing or unreadable file, a missing field or column.
    """
    kind = corpus_kind(source)
    for name, value, minimum in (("limit", limit or 0, 0), ("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"Expected `{name}` to be an int >= {minimum}, but got {value!r}.")
    if rank >= world_size:
        raise ValueError(f"Expected `rank` < world_size={world_size}, but got {rank}.")
    limit = limit or None
    if kind == "pydoc":
        rows = ((None, text) for text in default_corpus())
        return _select(rows, limit, rank, world_size)
    if kind == "dataset":
        return _select(_dataset_rows(source, text_field, id_field, split, config), limit, rank, world_size, path=source)
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_documents(path, text_field, id_field, limit, rank, world_size)
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}
    if suffix in readers:
        return _select(readers[suffix](path, text_field, id_field), limit, rank, world_size, path=path)
    return _select(((None, text) for text in _text_file_documents(path)), limit, rank, world_size, path=path)


def document_id(index, doc_id):
    """A document's id: its `--id-field` value as a string, else its index in the corpus."""
    return str(index) if doc_id is None else str(doc_id)


def file_rows(path, *, text_field="text", id_field=None):
    """`(id or None, text)` of each document of one corpus file (not Parquet), read as
    `iter_documents` reads it but not yet numbered: Ray's read stage, which numbers the rows of
    many files in corpus order. Texts come as they are; the scorer decides what it can score."""
    path = Path(path)
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}
    suffix = path.suffix.lower()
    rows = readers[suffix](path, text_field, id_field) if suffix in readers else (
        (None, text) for text in _text_file_documents(path))
    for doc in _select(rows, None, 0, 1, path=path, number=False):
        yield doc.id, doc.text


def _select(rows, limit, rank, world_size, path=None, number=True):
    """Number `(id, text)` rows, stop at `limit`, keep this rank's share. Rows are parsed lazily:
    a row that is a callable is called only when it is this rank's. `number=False` keeps a
    missing id as None (`file_rows`)."""
    try:
        for index, (doc_id, text) in enumerate(itertools.islice(rows, limit)):
            if index % world_size == rank:
                if callable(text):  # JSON Lines: parse only our own lines
                    doc_id, text = text()
                yield Document(index, document_id(index, doc_id) if number else doc_id, text)
    except (ValueError, csv.Error, OSError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        if str(err).startswith(("Could not read corpus", "Could not load corpus", "The data set")):
            raise
        raise ValueError(f"Could not read corpus {str(path)!r}: {err}") from None


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def _text_file_documents(path):
    with open(path, encoding="utf-8") as f:
        yield from _text_documents(f)


def _text_documents(lines):
    """The documents of one text file's lines (with their line ends). WikiText-style files (the
    first non-blank line is an article title " = Title = "): one document per article, as
    lm-evaluation-harness's `wikitext` task reads them (the title line and every line up to the
    next title, joined by newlines, exactly as in the file). Other text files: blank-line-separated
    paragraphs, stripped."""
    lines = iter(lines)
    head = []
    for line in lines:
        head.append(line)
        if line.strip():
            break
    lines = itertools.chain(head, lines)
    if head and _is_article_title(head[-1]):
        yield from _wikitext_articles(lines)
    else:
        yield from _paragraphs(lines)


def _is_article_title(line):
    """WikiText's " = Title = " (one "=" each side; " = = Section = = " is a section)."""
    line = line.strip()
    return line.startswith("= ") and line.endswith(" =") and not line.startswith("= =") and not line.endswith("= =")


def _wikitext_articles(lines):
    article = []
    for line in lines:
        if _is_article_title(line) and article:
            text = "".join(article)
            if text.strip():  # the blank lines before the first title are no article
                yield text[:-1] if text.endswith("\n") else text  # the newline before a title separates
            article = []
        article.append(line)
    text = "".join(article)
    if text.strip():
        yield text


def _paragraphs(lines):
    paragraph = []
    for line in itertools.chain(lines, [""]):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).strip()
            paragraph = []


def _json_row(row, text_field, id_field, i):
    """(id, text) of one JSON item: a string, or an object with `text_field`. A text that is
    missing or not a string is the scorer's to skip or flag (`ppl_inputs.problem`), as on Ray."""
    if not isinstance(row, dict):
        if id_field is not None:
            raise ValueError(f"item {i} is not an object with the field {id_field!r} (the --id-field)")
        return None, row
    if i == 0 and text_field not in row:  # a wrong --text-field, said now: not a corpus of empty documents
        raise ValueError(f"item 0 has no field {text_field!r} (the --text-field; it has {sorted(row)[:10]})")
    if id_field is not None and id_field not in row:
        raise ValueError(f"item {i} has no field {id_field!r} (the --id-field)")
    return (row[id_field] if id_field else None), row.get(text_field)


def _jsonl_rows(path, text_field, id_field):
    with open(path, encoding="utf-8") as f:
        lines = ((number, line) for number, line in enumerate(f, 1) if line.strip())  # numbered as an editor shows them
        for i, (number, line) in enumerate(lines):
            yield None, (lambda line=line, i=i, number=number: _json_row(_json_line(line, number), text_field, id_field, i))


def _json_line(line, number):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:  # its own "line 1" would be the line's, not the file's
        raise ValueError(f"line {number} is not JSON: {err.msg} (column {err.colno})") from None


def _json_rows(path, text_field, id_field):
    rows = json.loads(path.read_text(encoding="utf-8"))  # one JSON value: read whole
    if not isinstance(rows, list):
        raise ValueError(f"Could not read corpus {str(path)!r}: expected a JSON list of strings or objects")
    for i, row in enumerate(rows):
        yield _json_row(row, text_field, id_field, i)


def _csv_rows(path, text_field, id_field):
    csv.field_size_limit(2**31 - 1)  # documents longer than csv's default 128 KiB field limit
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for name in (text_field, id_field):
            if name is not None and name not in columns:
                raise ValueError(f"Could not read corpus {str(path)!r}: no column {name!r} (columns: {columns})")
        for row in reader:
            yield (row[id_field] if id_field else None), row[text_field]


def _parquet_documents(path, text_field, id_field, limit, rank, world_size):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        raise ValueError(f"Could not read corpus {str(path)!r}: {err}") from None
    columns = parquet.schema_arrow.names
    for name in (text_field, id_field):
        if name is not None and name not in columns:
            raise ValueError(f"Could not read corpus {str(path)!r}: no column {name!r} (columns: {columns})")
    wanted = [text_field] + ([id_field] if id_field and id_field != text_field else [])
    first = 0  # index of the row group's first row
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if limit is not None and first >= limit:
            return
        if group % world_size == rank and rows:
            table = parquet.read_row_group(group, columns=wanted)
            texts = table.column(text_field).to_pylist()
            ids = table.column(id_field).to_pylist() if id_field else [None] * len(texts)
            for k, (doc_id, text) in enumerate(zip(ids, texts)):
                index = first + k
                if limit is not None and index >= limit:
                    return
                yield Document(index, document_id(index, doc_id), text)
        first += rows


def _dataset_rows(name, text_field, id_field, split, config):
    """A `datasets` data set (a Hub name, or a local folder of data files), streamed."""
    import datasets

    # A local folder of .txt files: each file whole (`datasets` gives one row per line), split as a single file is
    text_folder = Path(name).is_dir() and all(p.suffix.lower() == ".txt" for p in _data_files(Path(name)))
    try:
        data = datasets.load_dataset(str(name), config, split=split, streaming=True,
                                     **({"sample_by": "document"} if text_folder else {}))
        columns = data.column_names or list(data.features or {})
    except Exception as err:  # datasets raises many kinds; the user needs one line
        first = (str(err).splitlines()[0] if str(err) else type(err).__name__).rstrip('.')
        hint = (f". Pass --split (the `split` argument) with one of those (this run asked for {split!r}; a local "
                "folder's data files form the 'train' split)" if "split" in first.lower() else "")
        raise ValueError(f"Could not load corpus {str(name)!r}: not a file, and `datasets` failed: {first}{hint}.") from None
    for field in (text_field, id_field):
        if field is not None and columns and field not in columns:
            raise ValueError(f"The data set {str(name)!r} has no column {field!r} (columns: {columns}).")
    for row in data:
        if text_folder:
            yield from ((None, text) for text in _text_documents(row["text"].splitlines(keepends=True)))
        else:
            yield (row.get(id_field) if id_field else None), row.get(text_field)


def _data_files(folder):
    """The files of a local data folder that `datasets` reads (it skips hidden ones, such as our manifests)."""
    return [p for p in folder.rglob("*") if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts)]


# ---------------------------------------------------------------------------------------
# Fingerprints: is this the corpus a resumed run started on?
# ---------------------------------------------------------------------------------------


def _add_file(digest, path):
    """Feed a file's size and its first and last MiB to `digest` (reading a multi-GB file whole
    to resume would cost minutes)."""
    size = os.path.getsize(path)
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest


def file_digest(path):
    """A short digest of a file's size and its first and last MiB."""
    return _add_file(hashlib.sha256(), path).hexdigest()[:16]


def content_digests(path, suffixes=None, recursive=True):
    """{name: file_digest} of a file, or of every file under a folder (names relative to it;
    hidden files and folders aside; only `suffixes` where given). {} where `path` is not local."""
    if path is None or not isinstance(path, (str, os.PathLike)) or not Path(path).exists():
        return {}
    path = Path(path)
    if path.is_file():
        return {path.name: file_digest(path)}
    return {str(p.relative_to(path)): file_digest(p) for p in sorted(path.rglob("*") if recursive else path.iterdir())
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and (suffixes is None or p.suffix.lower() in suffixes)}


def corpus_fingerprint(source, *, text_field="text", id_field=None, split="test", config=None):
    """A short digest that changes when the corpus or how it is read changes.

    Files: `file_digest`; a local data folder: that of every file in it, with config and split;
    the default corpus: its texts; a `datasets` name: name, config and split.
    """
    digest = hashlib.sha256(json.dumps([text_field, id_field]).encode())
    kind = corpus_kind(source)
    if kind == "pydoc":
        for text in default_corpus():
            digest.update(text.encode("utf-8", "surrogatepass"))
    elif kind == "dataset":
        files = content_digests(source)  # a local folder by what it holds, wherever it lies; {} for a Hub name
        digest.update(json.dumps([config, split, files] if files else [str(source), config, split]).encode())
    else:
        _add_file(digest, source)  # as earlier releases did: their --docs-out folders and saved references still resume
    return digest.hexdigest()[:16]
