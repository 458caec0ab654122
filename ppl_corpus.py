"""Where texts come from: the default English text, text / JSON Lines / JSON / Parquet / CSV
files, `datasets` data sets. No math here."""

import json
import os
import re
from pathlib import Path

DEFAULT_CORPUS = "pydoc"  # the standard library's own documentation topics: real English on every Python


def default_corpus():
    """The standard library's documentation topics (`pydoc_data.topics`), one text each, sorted by name."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def split_paragraphs(text):
    """Blank-line-separated paragraphs, stripped, empty ones dropped."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def read_corpus(source=None, *, text_field="text", split="test", config=None):
    """Texts to score.

    Args:
        source: None or "pydoc" for the default corpus; a path to a `.txt` / `.md` file
            (blank-line-separated paragraphs), `.jsonl` (one object per line, `text_field`),
            `.json` (a list of strings or of objects), `.parquet` or `.csv` (column
            `text_field`); otherwise a `datasets` data set name (Hub, online).
        text_field: the column or key holding the text.
        split, config: for `datasets` data sets.

    Raises:
        ValueError: a missing or unreadable file, a missing field, a corpus with no text.
    """
    if source in (None, DEFAULT_CORPUS):
        return default_corpus()
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"Expected `source` to be a file path or a data set name, but got {type(source).__name__}.")
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in {".txt", ".md", ".tokens", ".raw", ".jsonl", ".json", ".parquet", ".csv"} or path.exists():
        if not path.is_file():
            raise ValueError(f"Corpus file not found: {source}")
        texts = _read_file(path, suffix, text_field)
    else:
        texts = _read_dataset(source, text_field, split, config)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"The corpus {source!r} holds no text.")
    return texts


def _read_file(path, suffix, text_field):
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return [_field(row, text_field, path, i) for i, row in enumerate(rows)]
        if suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise ValueError("expected a JSON list of strings or objects")
            return [_field(row, text_field, path, i) for i, row in enumerate(rows)]
        if suffix in (".parquet", ".csv"):
            import datasets

            from datasets.exceptions import DatasetGenerationError

            try:
                data = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
            except DatasetGenerationError as err:  # an empty or malformed file; the cause says which
                raise ValueError(f"{err}: {err.__cause__}" if err.__cause__ else str(err)) from None
            if text_field not in data.column_names:
                raise ValueError(f"no column {text_field!r} (columns: {data.column_names})")
            return [t or "" for t in data[text_field]]
        return split_paragraphs(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError, ValueError) as err:
        raise ValueError(f"Could not read corpus {str(path)!r}: {err}") from None


def _field(row, text_field, path, i):
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get(text_field), str):
        return row[text_field]
    raise ValueError(f"item {i} has no string field {text_field!r}")


def _read_dataset(name, text_field, split, config):
    import datasets

    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many kinds; the user needs one line
        raise ValueError(f"Could not load corpus {name!r}: not a file, and `datasets` failed: {str(err).splitlines()[0]}") from None
    if text_field not in data.column_names:
        raise ValueError(f"The data set {name!r} has no column {text_field!r} (columns: {data.column_names}).")
    return [t or "" for t in data[text_field]]
