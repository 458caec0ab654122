"""Per-token and per-word surprisal (`ppl_tokens`, `ppl_cli.py --tokens-out/--words-out`):
values against a float64 loop, offsets that give the text back, non-ASCII text, every format."""

import copy
import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import ROOT
from ppl_tokens import score_tokens, token_spans, word_rows

TEXTS = ["Plain English words, and punctuation.", "Ünïcödé café — naïve 東京 text,\n  with  spaces\tand a tab. ",
         "  leading spaces and a trailing newline\n"]


def float64_token_logprobs(model, tokenizer, text):
    reference = copy.deepcopy(model).double().eval()
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(torch.tensor([ids])).logits[0, :-1], -1)
    return ids[1:], [logprobs[t - 1, ids[t]].item() for t in range(1, len(ids))]


def test_token_rows_match_a_float64_loop_and_give_the_text_back(tiny):
    from ppl_corpus import default_corpus

    model, tokenizer = tiny
    texts = TEXTS + [default_corpus()[5][:700]]  # and real English from the standard library's docs
    for (document, rows), text in zip(score_tokens(model, tokenizer, texts, progress=False), texts):
        ids, expected = float64_token_logprobs(model, tokenizer, text)
        assert [r["token_id"] for r in rows] == ids and [r["position"] for r in rows] == list(range(len(ids)))
        assert [r["logprob"] for r in rows] == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert [r["surprisal"] for r in rows] == pytest.approx([-x / math.log(2) for x in expected], rel=1e-5, abs=1e-5)
        assert "".join(r["token"] for r in rows) == text  # whitespace included
        assert all(text[r["start"]:r["end"]] == r["token"] for r in rows)
        assert rows[0]["start"] == 0 and rows[-1]["end"] == len(text)


def test_word_rows_follow_whitespace_words():
    text = "  The café,  naïve\n"
    tokens = [  # hand-made tokens: a leading-space token, a word split in two, a whitespace-only token
        {"token": "  The", "start": 0, "end": 5, "surprisal": 1.0},
        {"token": " caf", "start": 5, "end": 9, "surprisal": 2.0},
        {"token": "é,", "start": 9, "end": 11, "surprisal": 3.0},
        {"token": "  ", "start": 11, "end": 13, "surprisal": 4.0},
        {"token": "naïve", "start": 13, "end": 18, "surprisal": 5.0},
        {"token": "\n", "start": 18, "end": 19, "surprisal": 6.0},
    ]
    rows = word_rows(7, text, tokens)
    assert [(r["word"], r["text"], r["start"], r["end"], r["num_tokens"], r["surprisal"]) for r in rows] == [
        (0, "The", 2, 5, 1, 1.0), (1, "café,", 6, 11, 2, 5.0), (2, "naïve", 13, 18, 3, 15.0)]
    assert all(r["document"] == 7 for r in rows)


def test_spans_split_a_multibyte_character_without_losing_it(tiny):
    _, tokenizer = tiny
    text = "東京"  # byte-level BPE: several tokens per character
    ids, spans = token_spans(tokenizer, text)
    assert len(ids) >= 2 and "".join(text[a:b] for a, b in spans) == text


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_cli_tokens_and_words_out(tiny_dir, tiny, tmp_path, suffix):
    corpus = tmp_path / "texts.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    tokens_out, words_out = tmp_path / f"tokens{suffix}", tmp_path / f"words{suffix}"
    proc = subprocess.run([sys.executable, str(ROOT / "ppl_cli.py"), "--model", str(tiny_dir), "--corpus", str(corpus),
                           "--tokens-out", str(tokens_out), "--words-out", str(words_out), "--quiet", "--json", "-"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    read = {".parquet": pd.read_parquet, ".csv": lambda p: pd.read_csv(p, keep_default_na=False),
            ".jsonl": lambda p: pd.read_json(p, lines=True)}[suffix]
    tokens, words = read(tokens_out), read(words_out)
    assert list(tokens.columns) == ["document", "position", "token_id", "token", "start", "end", "logprob", "surprisal"]
    assert list(words.columns) == ["document", "word", "text", "start", "end", "num_tokens", "surprisal"]
    result = json.loads(proc.stdout)
    assert -tokens["logprob"].sum() == pytest.approx(result["nll"] * result["num_tokens"], rel=1e-9)
    assert words["surprisal"].sum() == pytest.approx(tokens["surprisal"].sum(), rel=1e-9)
    for d, text in enumerate(TEXTS):
        assert "".join(tokens[tokens.document == d].token.astype(str)) == text
        assert list(words[words.document == d].text.astype(str)) == text.split()


def test_cli_refuses_bad_or_existing_output_files_before_loading(tmp_path):
    existing = tmp_path / "tokens.csv"
    existing.write_text("keep me")
    for args, match in ([("--tokens-out", str(existing)), "exists"], [("--words-out", str(tmp_path / "w.txt")), ".parquet, .csv or .jsonl"]):
        proc = subprocess.run([sys.executable, str(ROOT / "ppl_cli.py"), "--model", str(tmp_path / "no-such-model"), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 2 and match in proc.stderr and "Could not load model" not in proc.stderr, proc.stderr
    assert existing.read_text() == "keep me"
