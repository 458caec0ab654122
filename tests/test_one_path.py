"""One corpus through every route: the metric's text mode, its `distributed=True` under torchrun,
the command line on one process, under torchrun and on Ray, and the Space score the same
documents with the same token counts and values, and the corpus routes skip and flag the same
rows under the same ids (the one rule of `ppl_inputs`).

Every route runs the tiny GPT-2 with 32-token windows advancing by 16 and one window per batch,
so a document's float32 forward passes do not depend on its neighbours; 1e-6 relative leaves
room for other thread counts (Ray's actors, torchrun's ranks)."""

import json
import math
import os
import subprocess
import sys
import textwrap

import evaluate
import pandas as pd
import pytest

import app
import ppl_cli
from conftest import ROOT
from ppl_corpus import default_corpus
from ppl_sources import load_model

METRIC = str(ROOT / "perplexity_metric.py")
SETTINGS = {"max_length": 32, "stride": 16, "batch_size": 1}
CLI = ["--max-length", "32", "--stride", "16", "--batch-size", "1", "--bootstrap-resamples", "100", "--quiet",
       "--id-field", "doc_id", "--device", "cpu", "--timeout", "120"]
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
REL = 1e-6


def _rows():
    paragraphs = default_corpus()
    return [
        *((f"p{i}", paragraphs[3 + i][:300]) for i in range(3)),
        ("whitespace", " \n\t  "),
        ("one-char", "x"),
        ("non-ascii", "Café naïve — 東京 über Straße, déjà vu."),
        ("special-token", "Before <|endoftext|> after the separator, written out as text."),
        ("long", paragraphs[10][:1500]),  # many windows of 32
        ("null", None),
        ("empty-string", ""),
        ("number", 42),
        ("surrogate", "bad \ud800 text"),
    ]


ROWS = _rows()
SKIPPED = {"whitespace": "empty text", "null": "missing text", "empty-string": "empty text"}
FLAGGED = {"number": "expected a string, but got int",
           "surrogate": "not valid Unicode: a lone surrogate (U+D800) at character 4"}
SCORED = [doc_id for doc_id, _ in ROWS if doc_id not in SKIPPED and doc_id not in FLAGGED]
TEXTS = dict(ROWS)


def _child_env():
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _run(args, timeout=300):
    proc = subprocess.run(args, cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("one-path") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"doc_id": doc_id, "text": text}) + "\n" for doc_id, text in ROWS))
    return path


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(str(tiny_dir), device="cpu")


def _from_result(result, ids):
    """{id: (scored tokens, NLL sum)} from a text-mode result over the texts of `ids`, in order."""
    assert len(result["log_likelihoods"]) == len(ids)
    return {doc_id: (round(-ll / math.log(ppl)), -ll)
            for doc_id, ll, ppl in zip(ids, result["log_likelihoods"], result["perplexities"])}


def _from_folder(folder):
    """({id: (scored tokens, NLL sum)}, {id: error}) from a --docs-out folder, every row's id once."""
    frame = pd.read_parquet(folder).sort_values("index")
    assert frame["index"].tolist() == list(range(len(ROWS)))
    assert frame["id"].tolist() == [doc_id for doc_id, _ in ROWS]
    scored = frame[frame["error"].isna()]
    errors = frame[frame["error"].notna()]
    return ({r.id: (int(r.num_tokens), float(r.nll)) for r in scored.itertuples()},
            dict(zip(errors["id"], errors["error"])))


def _assert_same(got, want, route):
    assert list(got) == list(want), route
    for doc_id in want:
        assert got[doc_id][0] == want[doc_id][0], (route, doc_id)
        assert math.isclose(got[doc_id][1], want[doc_id][1], rel_tol=REL), (route, doc_id, got[doc_id], want[doc_id])


@pytest.fixture(scope="module")
def text_mode(model):
    metric = evaluate.load(METRIC, "text")
    result = metric.compute(predictions=[TEXTS[i] for i in SCORED], model=model[0], tokenizer=model[1],
                            bootstrap_resamples=100, progress=False, **SETTINGS)
    return _from_result(result, SCORED)


def test_text_mode_fails_fast_on_the_first_empty_or_bad_text(model):
    metric = evaluate.load(METRIC, "text")
    first = next(k for k, (doc_id, _) in enumerate(ROWS) if doc_id in SKIPPED)
    with pytest.raises(ValueError, match=rf"`predictions\[{first}\]`.*only whitespace"):
        metric.compute(predictions=[text for _, text in ROWS], model=model[0], tokenizer=model[1], **SETTINGS)


def test_distributed_text_mode_under_torchrun(tiny_dir, text_mode, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent("""
        import json, os, sys, evaluate
        from ppl_sources import load_model
        metric_path, model_dir, texts_file, out = sys.argv[1:]
        model, tokenizer = load_model(model_dir, device="cpu")
        metric = evaluate.load(metric_path, "text", experiment_id="rank" + os.environ["RANK"])
        result = metric.compute(predictions=json.load(open(texts_file)), model=model, tokenizer=tokenizer,
                                distributed=True, distributed_timeout=120, bootstrap_resamples=100, progress=False,
                                max_length=32, stride=16, batch_size=1)
        if os.environ["RANK"] == "0":
            json.dump(result, open(out, "w"))
    """))
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps([TEXTS[i] for i in SCORED]))
    out = tmp_path / "out.json"
    _run([*TORCHRUN_2, str(worker), METRIC, str(tiny_dir), str(texts), str(out)])
    _assert_same(_from_result(json.loads(out.read_text()), SCORED), text_mode, "distributed=True")


@pytest.mark.parametrize("route", ["one process", "torchrun", "ray"])
def test_command_line_routes(route, tiny_dir, corpus, text_mode, tmp_path, capsys):
    docs, out = tmp_path / "docs", tmp_path / "out.json"
    args = ["--model", str(tiny_dir), "--corpus", str(corpus), "--docs-out", str(docs), "--json", str(out), *CLI]
    if route == "one process":
        assert ppl_cli.main(args) == 0, capsys.readouterr().err
    elif route == "torchrun":
        _run([*TORCHRUN_2, str(ROOT / "ppl_cli.py"), *args])
    else:
        assert ppl_cli.main([*args, "--engine", "ray", "--workers", "2"]) == 0, capsys.readouterr().err
    scored, errors = _from_folder(docs)
    _assert_same(scored, text_mode, route)
    assert errors == {**SKIPPED, **FLAGGED}
    result = json.loads(out.read_text())
    assert (result["num_documents"], result["skipped_empty"], result["flagged_rows"]) == (len(SCORED), 3, 2)
    assert result["num_tokens"] == sum(tokens for tokens, _ in text_mode.values())


def test_space(model, text_mode):
    import gradio as gr

    models = app.Models(*model)
    got = {}
    for doc_id in SCORED:
        result = app.compute_text(models, TEXTS[doc_id], None, 32, 16, True)[3]
        got[doc_id] = (result["num_tokens"], -result["log_likelihoods"][0])
    _assert_same(got, text_mode, "the Space")
    for doc_id in [*SKIPPED, *FLAGGED]:  # refused, each as its kind
        with pytest.raises(gr.Error) as refused:
            app.compute_text(models, TEXTS[doc_id], None, 32, 16, True)
        message = str(refused.value)
        if doc_id in SKIPPED:
            assert message == "Enter a text to score (or upload a .txt file).", doc_id
        else:
            assert "expected `text` to be a string, but got int" in message or "lone surrogate (U+D800)" in message
