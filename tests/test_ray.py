"""The Ray Data route: DocumentScorer as a stage, pool_scores, and `ppl_cli.py --engine ray`, on a real
local Ray cluster (one per session, 2 CPUs, no dashboard), each against a one-process run."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, one_intra_op_thread
from ppl_corpus import default_corpus
from ppl_docs import hold, pool_scores, read_rows
from ppl_ray import ACTOR_FAULT_TOLERANCE, SCORE_COLUMNS, DocumentScorer
from ppl_runner import pool_rows, score_documents

# Ray 2.60 deprecates actor options (max_restarts, max_task_retries) as map_batches keywords, with no other way yet
pytestmark = pytest.mark.filterwarnings("ignore:`ray_remote_args` is deprecated")
BAD = [None, 7, "", "   "]  # missing, a number, empty, only whitespace


def one_process_rows(model, tokenizer, texts, **kwargs):
    docs = [(i, None, t) for i, t in enumerate(texts)]
    return [row for part in score_documents(model, tokenizer, docs, progress=False, **kwargs) for row in part]


def assert_rows_equal(got, expected, rel):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g["num_tokens"], g["num_words"], g["num_bytes"]) == (e["num_tokens"], e["num_words"], e["num_bytes"])
        assert math.isclose(g["nll"], e["nll"], rel_tol=rel) and math.isclose(g["perplexity"], e["perplexity"], rel_tol=rel)


def assert_results_equal(got, expected, rel):
    for key in ("perplexity", "nll", "word_perplexity", "byte_perplexity", "bits_per_byte", "mean_perplexity"):
        assert math.isclose(got[key], expected[key], rel_tol=rel), key
    assert all(math.isclose(a, b, rel_tol=rel) for a, b in zip(got["perplexity_ci"], expected["perplexity_ci"]))
    assert (got["num_tokens"], got["num_documents"]) == (expected["num_tokens"], expected["num_documents"])


# ---------------------------------------------------------------------------------------------
# Without Ray: the stage is a plain callable class


def test_importing_the_metric_never_imports_ray():
    code = "import sys, perplexity_metric; assert perplexity_metric.DocumentScorer and perplexity_metric.pool_scores; " \
           "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_scorer_flags_bad_rows_and_scores_the_rest_as_the_runner(tiny, tiny_dir):
    texts = default_corpus()[:3]
    # "x" is one token: without a start token it has nothing to score, and must not sink its batch
    batch = pd.DataFrame({"text": [texts[0], *BAD, "x", texts[1], texts[2]], "url": list("abcdefgh")})
    out = DocumentScorer(str(tiny_dir), add_start_token=False)(batch)
    assert list(out.columns) == ["text", "url", *SCORE_COLUMNS]
    assert out["url"].tolist() == list("abcdefgh") and out["text"].tolist()[5:] == batch["text"].tolist()[5:]
    assert out["error"].tolist()[1:5] == ["missing text", "expected a string, but got int", "empty text", "empty text"]
    assert out["error"][5] == "no token to score: 1 token and no start token"
    assert out.loc[1:5, ["num_tokens", "nll", "perplexity", "num_words", "num_bytes"]].isna().all().all()
    good = out.loc[[0, 6, 7]].to_dict("records")
    assert all(row["error"] is None for row in good)
    # The bad rows are left out before packing, so the three texts share batches as in the runner; rel 1e-5
    # on the summed NLL (~80 float32 ulps) allows other thread counts; a wrong mask or window is off by far more.
    assert_rows_equal(good, one_process_rows(*tiny, [texts[0], texts[1], texts[2]], add_start_token=False), rel=1e-5)


def test_scorer_flags_a_list_cell_as_one_process_does(tiny_dir):
    import numpy as np

    batch = pd.DataFrame({"text": ["A good text to score.", ["a", "b"], np.array(["a", "b"], dtype=object), np.array([])]})
    out = DocumentScorer(str(tiny_dir))(batch)  # Ray hands list cells over as numpy arrays
    assert out["error"].isna().tolist() == [True, False, False, False]
    assert out["error"].tolist()[1:] == ["expected a string, but got list", "expected a string, but got ndarray",
                                         "expected a string, but got ndarray"]


def test_scorer_errors_name_the_argument(tiny_dir):
    with pytest.raises(TypeError, match="`text_column`"):
        DocumentScorer(str(tiny_dir), text_column=3)
    with pytest.raises(ValueError, match="`stride`"):
        DocumentScorer(str(tiny_dir), max_length=8, stride=9)
    scorer = DocumentScorer(str(tiny_dir))
    with pytest.raises(ValueError, match="`text_column`='text'"):
        scorer(pd.DataFrame({"body": ["a b c"]}))
    with pytest.raises(ValueError, match=r"\['nll'\]"):
        scorer(pd.DataFrame({"text": ["a b c"], "nll": [1.0]}))


def test_pool_scores_from_a_frame_and_a_folder_equals_pool_rows(tiny, tmp_path):
    texts = default_corpus()[:6]
    rows = one_process_rows(*tiny, texts)
    expected = pool_rows(rows, bootstrap_resamples=200, seed=3)
    frame = pd.DataFrame(rows).iloc[::-1]  # any order: pooled in index order
    bad = pd.DataFrame([{"index": 6, "id": None, "error": "missing text"}, {"index": 7, "id": None, "error": "empty text"}])
    frame = pd.concat([frame, bad], ignore_index=True)
    got = pool_scores(frame, bootstrap_resamples=200, seed=3)
    assert got.pop("num_errors") == 2 and got.pop("errors") == {"missing text": 1, "empty text": 1}
    assert got == expected
    folder = tmp_path / "scores"
    folder.mkdir()
    frame.iloc[:4].to_parquet(folder / "a.parquet")
    frame.iloc[4:].to_parquet(folder / "b.parquet")
    (folder / "_manifest.json").write_text("{}")
    from_folder = pool_scores(folder, bootstrap_resamples=200, seed=3)
    assert from_folder["num_errors"] == 2 and from_folder["perplexity"] == expected["perplexity"]
    with pytest.raises(TypeError, match="`scores`"):
        pool_scores([1, 2])
    with pytest.raises(ValueError, match="`scores`.*nll"):
        pool_scores(pd.DataFrame({"num_tokens": [1]}))
    with pytest.raises(ValueError, match="scored twice"):
        pool_scores(pd.concat([frame, frame]))


# ---------------------------------------------------------------------------------------------
# On a real local Ray cluster


@pytest.fixture(scope="session")
def ray_cluster():
    try:
        import ray
    except ImportError:
        pytest.fail("Ray is not installed: `pip install -r requirements-ray.txt` (make test installs it)")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # PidScorer: the workers cannot import tests/
    yield ray
    ray.shutdown()


def short_documents(n, most_chars=700):
    return [t for t in default_corpus() if len(t) <= most_chars][:n]


@pytest.mark.slow
def test_ray_stage_on_real_text_equals_one_process(ray_cluster, smol):
    ray = ray_cluster
    texts = short_documents(8)
    cells = texts[:4] + BAD + texts[4:]
    ds = ray.data.from_pandas(pd.DataFrame({"text": pd.Series(cells, dtype=object), "row": range(len(cells))}))
    ds = ds.repartition(4)  # two blocks per actor
    # One torch thread in each actor, set here: Ray only fills in OMP_NUM_THREADS (1 below one CPU)
    # where the environment leaves it unset; a CI that exports it would give the actors its count.
    out = ds.map_batches(DocumentScorer, fn_constructor_kwargs={"batch_size": 1, "num_threads": 1},
                         batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5,
                         **ACTOR_FAULT_TOLERANCE)
    got = out.to_pandas().sort_values("row").reset_index(drop=True)
    assert got["row"].tolist() == list(range(len(cells)))
    assert got["error"].tolist()[4:8] == ["missing text", "expected a string, but got int", "empty text", "empty text"]
    good = got[got["error"].isna()]
    # The same computation (one window per forward) at the actors' thread count: the same float32
    # log-probs, summed alike. On some CPUs (an Intel Xeon) float32 matrix products round by thread count.
    with one_intra_op_thread():
        expected = one_process_rows(*smol, texts, batch_size=1)
    assert_rows_equal(good.to_dict("records"), expected, rel=1e-9)
    frame = good.assign(index=range(len(good)))
    assert pool_scores(frame) | {"num_errors": 0, "errors": {}} == pool_rows(expected) | {"num_errors": 0, "errors": {}}
    from_ray = pool_scores(out)  # a Ray dataset: pooled in row order (no `index` column)
    assert from_ray["num_errors"] == 4 and math.isclose(from_ray["perplexity"], pool_rows(expected)["perplexity"], rel_tol=1e-12)


class PidScorer(DocumentScorer):
    """A DocumentScorer that says which process runs each batch, slowly enough to be killed mid-job."""

    def __init__(self, pid_dir, **kwargs):
        super().__init__(**kwargs)
        self.pid_dir = Path(pid_dir)

    def __call__(self, batch):
        (self.pid_dir / f"{os.getpid()}-{time.monotonic_ns()}").touch()
        time.sleep(0.3)
        return super().__call__(batch)


class KillerScorer(DocumentScorer):
    """A DocumentScorer whose process dies whenever it scores the text "KILL", as a worker does that runs
    out of memory on one huge row."""

    def _score(self, docs):
        if any(text == "KILL" for _, text in docs):
            os._exit(1)
        return super()._score(docs)


def test_a_row_that_kills_its_worker_every_time_is_flagged_and_the_job_ends(ray_cluster, tiny, tiny_dir):
    from ppl_ray import KILLED, score_dataset

    texts = default_corpus()[:6]
    texts[3] = "KILL"
    ds = ray_cluster.data.from_pandas(pd.DataFrame({"text": texts}))
    out = score_dataset(ds, workers=1, rows_per_call=3, scorer=KillerScorer, model_id=str(tiny_dir), batch_size=1)
    got = out.to_pandas()  # ends: retries are bounded, and the second retry of the batch flags the row
    assert got["error"].isna().tolist() == [True, True, True, False, True, True] and got["error"][3] == KILLED
    good = got.drop(index=3).to_dict("records")
    with one_intra_op_thread():
        expected = one_process_rows(*tiny, [t for i, t in enumerate(texts) if i != 3], batch_size=1)
    assert_rows_equal(good, expected, rel=1e-5)


def test_killed_actor_is_replaced_and_every_row_is_written_once(ray_cluster, tiny, tiny_dir, tmp_path):
    ray = ray_cluster
    texts = default_corpus()[:48]
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    killed, done = [], threading.Event()

    def kill_first_actor():  # as soon as an actor has started a batch, SIGKILL it by its PID
        while not killed and not done.is_set():
            started = sorted(pid_dir.iterdir())
            if started:
                pid = int(started[0].name.split("-")[0])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    ds = ray.data.from_pandas(pd.DataFrame({"text": texts, "index": range(len(texts))})).repartition(12)
    out = ds.map_batches(PidScorer, fn_constructor_kwargs={"pid_dir": str(pid_dir), "model_id": str(tiny_dir), "batch_size": 1,
                                                           "num_threads": 1},
                         batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
                         **ACTOR_FAULT_TOLERANCE)
    killer = threading.Thread(target=kill_first_actor, daemon=True)
    killer.start()
    try:
        out.write_parquet(str(tmp_path / "scores"))
    finally:
        done.set()
        killer.join()
    pids = {int(p.name.split("-")[0]) for p in pid_dir.iterdir()}
    assert killed and len(pids) >= 2, "the actor was not killed and replaced"
    got = pd.read_parquet(tmp_path / "scores").sort_values("index")
    assert got["index"].tolist() == list(range(len(texts)))  # each row exactly once
    with one_intra_op_thread():  # the same computation (batch_size=1) at the actors' one thread: the same values
        expected = one_process_rows(*tiny, texts, batch_size=1)
    assert_rows_equal(got.to_dict("records"), expected, rel=1e-9)


def test_cli_engine_ray_reports_as_one_process(ray_cluster, tiny_dir, tmp_path, capsys):
    import ppl_cli

    texts = default_corpus()[:30]
    corpus = tmp_path / "crawl.jsonl"
    lines = [{"text": t, "url": f"https://x/{i}"} for i, t in enumerate(texts[:10] + ["", "  "] + texts[10:])]
    corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))
    common = ["--model", str(tiny_dir), "--corpus", str(corpus), "--id-field", "url", "--quiet", "--bootstrap-resamples", "300"]
    assert ppl_cli.main([*common, "--docs-out", str(tmp_path / "local"), "--json", str(tmp_path / "local.json")]) == 0
    local_report = capsys.readouterr().out
    assert ppl_cli.main([*common, "--engine", "ray", "--workers", "1", "--docs-out", str(tmp_path / "ray"),
                         "--json", str(tmp_path / "ray.json")]) == 0
    ray_report = capsys.readouterr().out
    local, got = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("local", "ray"))
    rows = pd.read_parquet(tmp_path / "ray").sort_values("index").reset_index(drop=True)
    scored = rows[rows["error"].isna()].reset_index(drop=True)
    expected = read_rows(tmp_path / "local")  # the numbering first: the interval resamples documents by index
    assert expected["error"].tolist()[10:12] == ["empty text", "empty text"]  # every row, the skipped ones too
    expected = expected[expected["error"].isna()].reset_index(drop=True)
    assert scored["index"].tolist() == expected["index"].tolist() and scored["id"].tolist() == expected["id"].tolist()
    assert_results_equal(got, local, rel=1e-5)  # batches pack other documents together: float32 rounding
    assert (got["skipped_empty"], got["flagged_rows"], got["num_errors"]) == (2, 0, 2)

    def strip(report):  # the same report, but for the folder and the time
        return [line for line in report.splitlines() if not line.startswith(("Time", "Per document"))]

    assert strip(ray_report) == strip(local_report)
    assert_rows_equal(scored.to_dict("records"), expected.to_dict("records"), rel=1e-5)
    assert rows.loc[rows["error"].notna(), "index"].tolist() == [10, 11]
    assert ppl_cli.main([*common, "--engine", "ray", "--docs-out", str(tmp_path / "ray")]) == 2
    assert "must be new or empty" in capsys.readouterr().err
    lock = hold(tmp_path / "held")  # another run writing that folder
    try:
        assert ppl_cli.main([*common, "--engine", "ray", "--docs-out", str(tmp_path / "held")]) == 2
        assert f"is being written by another run (pid {os.getpid()} on" in capsys.readouterr().err
    finally:
        lock.release()
