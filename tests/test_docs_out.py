"""`ppl_cli.py --docs-out`: per-document Parquet parts written as scoring goes, a run killed
part-way and resumed ending with the uninterrupted run's result, resumes refused when the
corpus, model or windows differ. Every run is a real process on the tiny GPT-2."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, build_tiny_gpt2, build_tiny_tokenizer
from ppl_corpus import default_corpus, split_paragraphs

PPL_CLI = str(ROOT / "ppl_cli.py")


@pytest.fixture(scope="module")
def paragraphs():
    """About 1,800 real paragraphs of the standard library's docs: several parts' worth."""
    return [p for text in default_corpus() for p in split_paragraphs(text)][:1800]


@pytest.fixture(scope="module")
def corpus_file(paragraphs, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": p, "url": f"doc://{i}"}) + "\n" for i, p in enumerate(paragraphs)),
                    encoding="utf-8")
    return path


def _cli(*args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, PPL_CLI, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600, **kw)


def _args(tiny_dir, corpus_file, out, *extra):
    return ["--model", str(tiny_dir), "--corpus", str(corpus_file), "--id-field", "url", "--batch-size", "1",
            "--bootstrap-resamples", "100", "--quiet", "--docs-out", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "whole"
    proc = _cli(*_args(tiny_dir, corpus_file, out, "--json", str(out) + ".json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(open(str(out) + ".json").read())


def test_docs_out_rows_match_an_independent_float64_loop(uninterrupted, tiny, paragraphs):
    import pandas as pd
    import torch

    folder, result = uninterrupted
    frame = pd.read_parquet(folder)  # every part, none of the manifest or temporary files
    assert list(frame.columns) == ["index", "id", "num_tokens", "nll", "perplexity", "num_words", "num_bytes", "error"]
    assert frame["error"].isna().all()  # every paragraph has text: none skipped or flagged
    frame = frame.sort_values("index").reset_index(drop=True)
    assert frame["index"].tolist() == list(range(len(paragraphs)))
    assert frame["id"].tolist() == [f"doc://{i}" for i in range(len(paragraphs))]
    assert len(list(folder.glob("part-*.parquet"))) >= 3  # written as it went, not once at the end
    model, tokenizer = tiny  # same weights as the saved folder
    reference = copy.deepcopy(model).double()
    checked = 0
    for i in range(0, len(paragraphs), 97):  # independent: one float64 forward pass, log-softmax, gather
        ids = [tokenizer.bos_token_id] + tokenizer(paragraphs[i], add_special_tokens=False)["input_ids"]
        if len(ids) > 256:  # longer than the tiny model's context: windows, tested elsewhere
            continue
        with torch.no_grad():
            logits = reference(torch.tensor([ids])).logits[0, :-1]  # (tokens - 1, vocab)
        nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
        checked += 1
        assert frame.loc[i, "num_tokens"] == len(ids) - 1
        assert frame.loc[i, "nll"] == pytest.approx(nll, rel=1e-5)
        assert frame.loc[i, "perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
        assert frame.loc[i, "num_bytes"] == len(paragraphs[i].encode())
    assert checked >= 15
    assert result["num_tokens"] == frame["num_tokens"].sum() and result["num_documents"] == len(paragraphs)
    assert result["perplexity"] == pytest.approx(math.exp(math.fsum(frame["nll"]) / frame["num_tokens"].sum()), rel=1e-12)
    assert "perplexities" not in result  # per document they are in the folder


def test_killed_run_resumes_to_the_uninterrupted_result(uninterrupted, tiny_dir, corpus_file, tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, PPL_CLI, *_args(tiny_dir, corpus_file, out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    import pandas as pd

    kept = len(pd.read_parquet(out))
    assert 0 < kept < 1800
    # A part another rank of a killed torchrun was writing: complete-looking Parquet, wrong numbers,
    # under the temporary name the resumed (one-process) run never writes itself. It must be deleted,
    # never read nor adopted as a part.
    import pyarrow as pa
    import pyarrow.parquet as pq

    stale = out / ".part-00007-rank0001.parquet.tmp"
    wrong = pq.read_table(sorted(out.glob("part-*.parquet"))[0]).slice(0, 5)
    pq.write_table(wrong.set_column(wrong.schema.get_field_index("nll"), "nll", pa.array([1e6] * 5)), stale)
    refused = _cli(*_args(tiny_dir, corpus_file, out))  # without --resume nothing is overwritten
    assert refused.returncode == 2 and "not empty: pass --resume" in refused.stderr
    resumed = _cli(*_args(tiny_dir, corpus_file, out, "--resume", "--json", str(tmp_path / "resumed.json")))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{kept:,} scored by an earlier run" in resumed.stdout
    folder, whole = uninterrupted
    got = json.loads((tmp_path / "resumed.json").read_text())
    for key in ("perplexity", "nll", "num_tokens", "word_perplexity", "byte_perplexity", "mean_perplexity", "perplexity_ci",
                "num_documents"):
        assert got[key] == whole[key], key  # batch size 1: bit for bit
    a = pd.read_parquet(out).sort_values("index").reset_index(drop=True)
    b = pd.read_parquet(folder).sort_values("index").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)  # each document exactly once, same values
    assert not stale.exists() and not list(out.glob(".*.tmp"))


@pytest.mark.parametrize("change, named", [
    (["--max-length", "32"], "windows"),
    (["--no-start-token"], "windows"),
    (["--model", "OTHER"], "model"),
    (["--corpus", "OTHER"], "corpus"),
    (["--id-field", "text"], "corpus_fingerprint"),
])
def test_resume_with_other_settings_is_refused_by_name(uninterrupted, tiny_dir, corpus_file, tmp_path, change, named):
    import shutil

    folder, _ = uninterrupted
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    if "OTHER" in change and change[0] == "--model":
        other = tmp_path / "other-model"
        build_tiny_gpt2(seed=1).save_pretrained(other)
        build_tiny_tokenizer().save_pretrained(other)
        change = ["--model", str(other)]
    if "OTHER" in change and change[0] == "--corpus":
        other = tmp_path / "other.jsonl"
        other.write_text(corpus_file.read_text(encoding="utf-8").replace("the", "a"), encoding="utf-8")
        change = ["--corpus", str(other)]
    before = sorted(p.name for p in copy.iterdir())
    proc = _cli(*_args(tiny_dir, corpus_file, copy, "--resume"), *change)
    assert proc.returncode == 2
    assert "Cannot resume" in proc.stderr and f"{named}:" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in copy.iterdir()) == before  # nothing written


def test_limit_and_resume_extend_a_run(tiny_dir, corpus_file, tmp_path):
    out = tmp_path / "growing"
    first = _cli(*_args(tiny_dir, corpus_file, out, "--limit", "40"))
    assert first.returncode == 0, first.stderr[-2000:]
    more = _cli(*_args(tiny_dir, corpus_file, out, "--limit", "100", "--resume", "--json", str(tmp_path / "a.json")))
    assert more.returncode == 0 and "40 scored by an earlier run" in more.stdout
    fresh = _cli(*_args(tiny_dir, corpus_file, tmp_path / "fresh", "--limit", "100", "--json", str(tmp_path / "b.json")))
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["num_documents"] == b["num_documents"] == 100 and a["perplexity"] == b["perplexity"]
    fewer = _cli(*_args(tiny_dir, corpus_file, out, "--limit", "10", "--resume", "--json", "-"))
    assert json.loads(fewer.stdout)["num_documents"] == 10  # the report pools the documents asked for


def test_docs_out_that_is_a_file_or_resume_without_it(tiny_dir, corpus_file, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    proc = _cli(*_args(tiny_dir, corpus_file, path))
    assert proc.returncode == 2 and "--docs-out to be a folder" in proc.stderr
    proc = _cli("--model", str(tiny_dir), "--corpus", str(corpus_file), "--resume")
    assert proc.returncode == 2 and "--resume continues a --docs-out folder" in proc.stderr
