"""Streamed corpora: every format read as it is scored, `--limit` reading only what it needs,
shards that cover every document once, WikiText split as lm-evaluation-harness splits it."""

import csv
import json

import pytest

from conftest import WIKITEXT
from ppl_corpus import corpus_fingerprint, iter_documents, read_corpus

TEXTS = ["First document.", "", "Third one, with a comma.", "Fourth: ünïcödé ✓.", "Fifth.", "Sixth and last."]


def _write(path, texts, fmt, ids=True, row_group_size=2):
    rows = [{"text": t, "doc": f"d{i}"} if ids else {"text": t} for i, t in enumerate(texts)]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_format_yields_documents_in_order_with_ids(tmp_path, fmt):
    path = _write(tmp_path / f"corpus.{fmt}", TEXTS, fmt)
    docs = list(iter_documents(str(path), id_field="doc"))
    assert [d.index for d in docs] == list(range(len(TEXTS)))
    assert [d.id for d in docs] == [f"d{i}" for i in range(len(TEXTS))]
    assert [d.text or "" for d in docs] == TEXTS
    without_ids = list(iter_documents(str(path)))
    assert [d.id for d in without_ids] == [str(i) for i in range(len(TEXTS))]
    assert read_corpus(str(path)) == [t for t in TEXTS if t]  # the empty document is left out


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_cover_every_document_once(tmp_path, fmt, world_size):
    path = _write(tmp_path / f"corpus.{fmt}", TEXTS * 3, fmt)
    for limit in (None, 7):
        shards = [list(iter_documents(str(path), limit=limit, rank=r, world_size=world_size)) for r in range(world_size)]
        everything = sorted((d for s in shards for d in s), key=lambda d: d.index)
        assert [d.index for d in everything] == list(range(limit or len(TEXTS) * 3))
        assert [d.text or "" for d in everything] == (TEXTS * 3)[:limit]
        if fmt != "parquet":  # documents dealt round-robin
            assert all(d.index % world_size == r for r, s in enumerate(shards) for d in s)
        else:  # whole row groups of 2 rows, dealt round-robin: each rank reads only its own
            assert all((d.index // 2) % world_size == r for r, s in enumerate(shards) for d in s)


def test_limit_reads_only_what_it_needs(tmp_path):
    path = tmp_path / "corpus.jsonl"  # a broken line after the limit is never parsed
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b"}) + "\n{broken\n", encoding="utf-8")
    assert [d.text for d in iter_documents(str(path), limit=2)] == ["a", "b"]
    with pytest.raises(ValueError, match="Could not read corpus"):
        list(iter_documents(str(path)))
    # another rank's broken line is not parsed either: each rank parses its own lines
    assert [d.text for d in iter_documents(str(path), rank=1, world_size=2)] == ["b"]


def test_parquet_limit_stops_before_later_row_groups(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    path = _write(tmp_path / "corpus.parquet", TEXTS * 4, "parquet", row_group_size=3)
    read = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, **kw: read.append(g) or original(self, g, **kw))
    assert [d.index for d in iter_documents(str(path), limit=4)] == [0, 1, 2, 3]
    assert read == [0, 1]  # of 8 row groups


def test_text_files_stream_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("  One paragraph\nover two lines. \n\n \t\nTwo.\n\n\n\nThree\n", encoding="utf-8")
    assert [d.text for d in iter_documents(str(path))] == ["One paragraph\nover two lines.", "Two.", "Three"]


def lm_eval_wikitext_documents(raw):
    """lm-evaluation-harness's `wikitext` documents (its `wikitext_document_level` data set):
    the file split at "\\n", a new page at each line that, with "= = =" and "= =" runs
    collapsed, reads "= ... =", pages joined back with "\\n", blank pages dropped."""
    pages, page = [], []
    for line in raw.split("\n"):
        collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
        if collapsed.startswith("= ") and collapsed.endswith(" ="):
            if "\n".join(page).strip():
                pages.append("\n".join(page))
            page = []
        page.append(line)
    if "\n".join(page).strip():
        pages.append("\n".join(page))
    return pages


def test_wikitext_split_as_lm_eval_on_a_small_file(tmp_path):
    raw = (" \n = Alpha = \n \n Alpha text @-@ here . \n \n = = Section = = \n \n More alpha . \n"
           " \n = Beta = \n \n = = = Deep = = = \n Beta text . \n")
    path = tmp_path / "wiki.test.tokens"
    path.write_text(raw, encoding="utf-8")
    docs = [d.text for d in iter_documents(str(path))]
    assert docs == lm_eval_wikitext_documents(raw)
    assert len(docs) == 2 and docs[0].startswith(" = Alpha = \n") and "= = Section = =" in docs[0]


def test_wikitext_split_as_lm_eval_on_the_real_test_split():
    if not WIKITEXT.is_file():
        pytest.skip("../shared/data/wikitext-2 is absent (it is not part of the repository)")
    expected = lm_eval_wikitext_documents(WIKITEXT.read_text(encoding="utf-8"))
    docs = list(iter_documents(str(WIKITEXT)))
    assert len(docs) == len(expected) == 62  # WikiText-2's test split has 62 articles
    assert [d.text for d in docs] == expected


def test_a_local_data_folder_streams_through_datasets(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write(folder / "test.jsonl", TEXTS, "jsonl")
    _write(folder / "train.jsonl", ["not this split"], "jsonl")
    docs = list(iter_documents(str(folder), split="test", id_field="doc", limit=4))
    assert [(d.index, d.id, d.text) for d in docs] == [(i, f"d{i}", t) for i, t in enumerate(TEXTS[:4])]
    with pytest.raises(ValueError, match="no column 'body'"):
        list(iter_documents(str(folder), text_field="body"))


def test_missing_id_field_is_named(tmp_path):
    for fmt in ("jsonl", "csv", "parquet"):
        path = _write(tmp_path / f"corpus.{fmt}", TEXTS, fmt, ids=False)
        with pytest.raises(ValueError, match="'doc'"):
            list(iter_documents(str(path), id_field="doc"))


def test_fingerprint_follows_the_content_not_the_name(tmp_path):
    a = _write(tmp_path / "a.jsonl", TEXTS, "jsonl")
    b = _write(tmp_path / "b.jsonl", TEXTS, "jsonl")
    c = _write(tmp_path / "c.jsonl", TEXTS[::-1], "jsonl")
    assert corpus_fingerprint(str(a)) == corpus_fingerprint(str(b)) != corpus_fingerprint(str(c))
    assert corpus_fingerprint(str(a)) != corpus_fingerprint(str(a), text_field="doc")


def test_csv_documents_longer_than_csvs_default_field_limit(tmp_path):
    path = _write(tmp_path / "big.csv", ["short", "x" * 150_000], "csv")
    assert [len(d.text) for d in iter_documents(str(path))] == [5, 150_000]


@pytest.mark.parametrize("kwargs, match", [({"world_size": 0}, "`world_size`"), ({"limit": -1}, "`limit`"),
                                           ({"rank": 2, "world_size": 2}, "`rank` < world_size=2")])
def test_bad_shard_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        list(iter_documents(None, **kwargs))
