"""Several real processes on the CPU: evaluate's num_process mode, torchrun (gloo), accelerate
launch, and peers that never arrive or die. Every child runs with one thread and the same tiny
GPT-2 (saved once to a temporary folder), so results are compared with one process exactly."""

import json
import math
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import ROOT

TIMEOUT_S = 180  # a hung child fails the test instead of hanging CI
METRIC_SCRIPT = str(ROOT / "perplexity_metric.py")


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
           and not k.startswith(("TORCHELASTIC_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


def _launcher_env(**extra):
    """For `accelerate launch`: PET_STANDALONE (torchrun's environment form of --standalone) makes
    torchrun's agent host the rendezvous on a port the OS gives it, and hand that to the ranks:
    no port is picked by the test and then bound by another process, so none can be taken between."""
    return _child_env(PET_STANDALONE="1", **extra)


def _store_port(proc, timeout=TIMEOUT_S):
    """(port, when) rank 0's rendezvous store started listening. Rank 0 runs with MASTER_PORT=0,
    so its store binds a port the OS picks (no port chosen here that another process could take
    first); the peers are then started with that port."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            ports = {c.laddr.port for c in psutil.Process(proc.pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:  # exited meanwhile: reported below
            ports = set()
        if ports:
            assert len(ports) == 1, ports  # the store alone listens before the ranks have met
            return ports.pop(), time.monotonic()
        time.sleep(0.05)
    proc.kill()
    _, err = proc.communicate()
    pytest.fail(f"rank 0 ended (status {proc.returncode}) before its rendezvous was seen listening; stderr:\n{err[-3000:]}")


def _start(args, env, **kw):
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _finish(proc, timeout=TIMEOUT_S):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} did not finish in {timeout} s; stderr:\n{err[-3000:]}")
    return proc.returncode, out, err


def _assert_same_result(got, want, rel=1e-9):
    assert got["num_tokens"] == want["num_tokens"]
    assert (got["num_words"], got["num_bytes"]) == (want["num_words"], want["num_bytes"])
    assert len(got["perplexities"]) == len(want["perplexities"])
    for i, (a, b) in enumerate(zip(got["perplexities"], want["perplexities"])):
        assert math.isclose(a, b, rel_tol=rel), f"text {i}: {a} != {b}"
    for key in ("perplexity", "nll", "word_perplexity", "byte_perplexity", "mean_perplexity"):
        assert math.isclose(got[key], want[key], rel_tol=rel), key


@pytest.fixture(scope="module")
def corpus():
    from ppl_corpus import default_corpus

    return [text[: 120 + 37 * i] for i, text in enumerate(default_corpus()[30:42])]  # 12 texts, varied lengths


@pytest.fixture(scope="module")
def corpus_file(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------
# In-process: the sharding plan and the merge (no process group)
# ---------------------------------------------------------------------------------------


def test_shards_cover_every_text_once_and_merge_in_order():
    from ppl_dist import merge_shards, shard_indices

    lengths = [7, 3, 9, 9, 1, 4, 8]
    for world in (1, 2, 3, 7, 9):
        shards = [shard_indices(lengths, r, world) for r in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(len(lengths)))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        payloads = [(s, [float(i) for i in s], [10 * i for i in s]) for s in shards]
        assert merge_shards(payloads, len(lengths)) == ([float(i) for i in range(7)], [10 * i for i in range(7)])
    with pytest.raises(ValueError, match="more than one rank"):
        merge_shards([([0, 1], [0.0, 1.0], [1, 1]), ([1], [1.0], [1])], 2)
    with pytest.raises(ValueError, match="scored by no rank"):
        merge_shards([([0], [0.0], [1])], 2)


def test_shard_errors_name_the_text_in_the_whole_corpus():
    from ppl_dist import _original_indices

    assert _original_indices("Expected `texts[1]` to be a string", [4, 7]) == "Expected `texts[7]` to be a string"


def test_without_world_size_it_is_one_process(tiny, corpus, monkeypatch):
    from ppl_dist import score_corpus_distributed
    from ppl_runner import evaluate_texts

    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    model, tokenizer = tiny
    kwargs = dict(batch_size=4, progress=False, bootstrap_resamples=50)
    assert score_corpus_distributed(model, tokenizer, corpus, timeout=5, **kwargs) == evaluate_texts(model, tokenizer, corpus, **kwargs)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        score_corpus_distributed(model, tokenizer, ["a text", 3], timeout=5)
    with pytest.raises(ValueError, match="timeout"):
        score_corpus_distributed(model, tokenizer, corpus, timeout=0)


# ---------------------------------------------------------------------------------------
# torchrun and accelerate launch: rank 0's JSON equals one process
# ---------------------------------------------------------------------------------------

# batch_size 1: a text's float32 forward passes then do not depend on which other texts share
# its batch, so the sharded run must reproduce one process to the last bit (with larger batches
# the packing differs between runs and per-text values move by ~1e-8, in one process too).
CLI = ["--batch-size", "1", "--bootstrap-resamples", "200", "--timeout", "60", "--quiet", "--json", "-"]
PPL_CLI = str(ROOT / "ppl_cli.py")


@pytest.fixture(scope="module")
def one_process_result(tiny_dir, corpus_file):
    proc = _start([sys.executable, PPL_CLI, "--corpus", str(corpus_file), "--model", str(tiny_dir), *CLI], _child_env())
    rc, out, err = _finish(proc)
    assert rc == 0, err[-3000:]
    return json.loads(out)


def test_torchrun_two_ranks_equal_one_process(tiny_dir, corpus_file, one_process_result):
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            PPL_CLI, "--corpus", str(corpus_file), "--model", str(tiny_dir), *CLI]
    rc, out, err = _finish(_start(args, _child_env()))
    assert rc == 0, err[-3000:]
    assert "ppl_cli: rank 1 of 2 done" in err and "ppl_cli: rank 0 of 2 done" in err  # two ranks really ran
    (line,) = out.strip().splitlines()  # only rank 0 prints
    result = json.loads(line)
    _assert_same_result(result, one_process_result)
    assert result["perplexity_ci"] == pytest.approx(one_process_result["perplexity_ci"], rel=1e-9)


def _run_docs_out(launcher, tiny_dir, corpus_path, out, env=None):
    args = [*launcher, PPL_CLI, "--corpus", str(corpus_path), "--model", str(tiny_dir), "--docs-out", str(out), *CLI]
    rc, stdout, err = _finish(_start(args, env or _child_env()))
    assert rc == 0, err[-3000:]
    (line,) = stdout.strip().splitlines()  # only rank 0 prints
    return json.loads(line)


TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_torchrun_docs_out_by_parquet_row_group_equals_one_process(tiny_dir, corpus, tmp_path):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "texts.parquet"  # 4 row groups of 3: each rank reads two of them
    pq.write_table(pa.table({"text": corpus}), path, row_group_size=3)
    one = _run_docs_out([sys.executable], tiny_dir, path, tmp_path / "one")
    two = _run_docs_out(TORCHRUN_2, tiny_dir, path, tmp_path / "two")
    for key in ("perplexity", "nll", "num_tokens", "num_words", "num_bytes", "mean_perplexity", "perplexity_ci"):
        assert two[key] == one[key], key  # batch size 1: bit for bit
    assert two["processes"] == 2
    ranks = {p.name.split("rank")[1] for p in (tmp_path / "two").glob("part-*.parquet")}
    assert ranks == {"0000.parquet", "0001.parquet"}  # each rank wrote its own parts
    a, b = (pd.read_parquet(tmp_path / n).sort_values("index").reset_index(drop=True) for n in ("one", "two"))
    pd.testing.assert_frame_equal(a, b)


def test_accelerate_launch_runs_the_cli_unchanged(tiny_dir, corpus_file, one_process_result, tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = _run_docs_out(launcher, tiny_dir, corpus_file, tmp_path / "out", env=_launcher_env())
    assert result["processes"] == 2
    _assert_same_result({**result, "perplexities": one_process_result["perplexities"]}, one_process_result)


# The metric's text mode under `accelerate launch`. Each rank counts the texts its tokenizer
# sees, which shows that the texts were sharded, not scored twice.
_TEXT_MODE_WORKER = textwrap.dedent("""
    import json, os, sys, evaluate
    from ppl_corpus import read_corpus
    from ppl_sources import load_model
    script, model_dir, corpus_file = sys.argv[1:]
    model, tokenizer = load_model(model_dir, device="cpu")
    seen = []
    class Counting(type(tokenizer)):
        def __call__(self, texts, *args, **kwargs):
            seen.extend(texts)
            return super().__call__(texts, *args, **kwargs)
    tokenizer.__class__ = Counting
    metric = evaluate.load(script, "text", experiment_id="rank" + os.environ["RANK"])
    result = metric.compute(predictions=read_corpus(corpus_file), model=model, tokenizer=tokenizer, distributed=True,
                            distributed_timeout=60, batch_size=1, bootstrap_resamples=200, progress=False)
    # one write(2) of under 4 KB: the ranks share stdout, and the launcher may unbuffer it,
    # which lets print's separate newline interleave with the other rank's line
    os.write(1, (json.dumps({"rank": int(os.environ["RANK"]), "texts_seen": len(seen), "result": result}) + "\\n").encode())
""")


def test_accelerate_launch_text_mode_shards_and_equals_one_process(tiny_dir, corpus_file, one_process_result, tmp_path):
    # `--cpu --num_processes 2` starts ONE process (accelerate's multi-CPU mode wants mpirun);
    # `--multi_gpu` goes through torchrun and, without a GPU, ranks use gloo.
    script = METRIC_SCRIPT
    worker = tmp_path / "text_mode_worker.py"  # accelerate launch runs files or modules, not -c
    worker.write_text(_TEXT_MODE_WORKER)
    args = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            str(worker), script, str(tiny_dir), str(corpus_file)]
    rc, out, err = _finish(_start(args, _launcher_env(HF_MODULES_CACHE=str(tmp_path / "modules"))))
    assert rc == 0, err[-3000:]
    reports = sorted((json.loads(line) for line in out.splitlines() if line.startswith("{")), key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1]
    assert sum(r["texts_seen"] for r in reports) == len(one_process_result["perplexities"])  # each text once
    for report in reports:  # every rank returns the whole result
        _assert_same_result(report["result"], one_process_result)


def test_torchrun_bad_text_on_one_rank_fails_every_report(tiny_dir, corpus, tmp_path):
    path = tmp_path / "bad.jsonl"  # without a start token, "a" (one token) has nothing to score
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [corpus[0], "a", *corpus[1:3]]), encoding="utf-8")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            PPL_CLI, "--corpus", str(path), "--model", str(tiny_dir), "--no-start-token", "--bad-rows", "fail", "--timeout",
            "60", "--json", "-"]
    rc, out, err = _finish(_start(args, _child_env()))
    assert rc != 0 and out.strip() == ""  # no partial result
    assert "error (rank 0): On rank 1: " in err and "document 1 (id '1')" in err, err[-3000:]


# ---------------------------------------------------------------------------------------
# Peers that never arrive or die: rank 0 fails in time, names them, prints no result
# ---------------------------------------------------------------------------------------


def _rank_env(rank, port):
    return _child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def test_peer_that_never_joins_is_named_when_the_timeout_ends(tiny_dir, corpus_file):
    # `python -m ppl_dist` remains as an alias of ppl_cli.py
    args = [sys.executable, "-m", "ppl_dist", "--corpus", str(corpus_file), "--model", str(tiny_dir),
            "--batch-size", "1", "--timeout", "3", "--json", "-"]
    proc = _start(args, _rank_env(0, 0))
    lines = []  # (when, line) of rank 0's stderr as it is written

    def read_stderr():
        for line in proc.stderr:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        _, listening = _store_port(proc)  # the wait for the peers starts here (interpreter start-up is before)
        rc, out = proc.wait(timeout=60), proc.stdout.read()
    finally:
        proc.kill()
        reader.join(timeout=10)
    err = "".join(line for _, line in lines)
    assert rc != 0 and out.strip() == "", err[-2000:]
    named = [when for when, line in lines if "Rank(s) [1] of 2 did not join within 3 s" in line]
    assert named, err[-2000:]
    # named when the 3 s are over: not early (a peer still starting would be declared missing),
    # nor late (a timeout ignored, doubled, or the default's 30 min). Seen here: 2.94-3.01 s; the
    # listening socket is seen up to ~0.1 s late (polled), so the bounds leave 1 s below and 2 s above.
    assert 2.0 <= named[0] - listening <= 5.0, named[0] - listening


_DYING_PEER = textwrap.dedent("""
    import os, ppl_dist
    ppl_dist.setup_distributed(timeout=30)  # joins the group...
    os._exit(3)                             # ...and dies before scoring its shard
""")


def test_peer_that_dies_is_named(tiny_dir, corpus_file):
    args = [sys.executable, PPL_CLI, "--corpus", str(corpus_file), "--model", str(tiny_dir),
            "--batch-size", "1", "--timeout", "30", "--json", "-"]
    rank0 = _start(args, _rank_env(0, 0))
    port, _ = _store_port(rank0)
    rank1 = _start([sys.executable, "-c", _DYING_PEER], _rank_env(1, port))
    rc, out, err = _finish(rank0, timeout=120)
    assert _finish(rank1)[0] == 3
    assert rc != 0 and out.strip() == ""
    assert "Rank(s) [1] of 2 did not finish scoring" in err, err[-2000:]


# ---------------------------------------------------------------------------------------
# evaluate's own num_process mode (no torch.distributed): files in a shared cache folder
# ---------------------------------------------------------------------------------------

_EVALUATE_WORKER = textwrap.dedent("""
    import json, os, sys, evaluate
    script, cache_dir, experiment_id, process_id, data_file, timeout, die = sys.argv[1:]
    metric = evaluate.load(script, num_process=2, process_id=int(process_id), experiment_id=experiment_id,
                           cache_dir=cache_dir, timeout=int(timeout), bootstrap_resamples=200)
    shard = json.load(open(data_file))[int(process_id)]
    metric.add_batch(predictions=shard["predictions"], references=shard["references"])
    if die == "die":
        os._exit(3)  # added its shard, never finished it
    print(json.dumps(metric.compute()))
""")


def _evaluate_worker(script, cache, name, pid, data_file, env, timeout=120, die=False):
    args = [sys.executable, "-c", _EVALUATE_WORKER, script, str(cache), name, str(pid), str(data_file), str(timeout),
            "die" if die else "live"]
    return _start(args, env)


def test_evaluate_num_process_two_experiments_on_one_cache(tiny, corpus, tmp_path):
    import evaluate

    from ppl_runner import score_texts

    model, tokenizer = tiny
    script = METRIC_SCRIPT
    data = {}
    for name, texts in {"a": corpus[:7], "b": corpus[7:]}.items():  # two experiments, different data
        batch = {"predictions": [], "references": []}
        for part in score_texts(model, tokenizer, texts, batch_size=4, progress=False):
            for key in batch:
                batch[key] += part[key]
        half = len(texts) // 2 + 1  # contiguous shards keep the example order of one process
        shards = [{k: v[:half] for k, v in batch.items()}, {k: v[half:] for k, v in batch.items()}]
        (tmp_path / f"{name}.json").write_text(json.dumps(shards))
        reference = evaluate.load(script, keep_in_memory=True, bootstrap_resamples=200)
        data[name] = reference.compute(**batch)

    cache = tmp_path / "shared-cache"
    env = _child_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    procs = {(name, pid): _evaluate_worker(script, cache, f"exp-{name}", pid, tmp_path / f"{name}.json", env)
             for name in ("a", "b") for pid in (0, 1)}
    results = {}
    for key, proc in procs.items():
        rc, out, err = _finish(proc)
        assert rc == 0, f"{key}: {err[-3000:]}"
        results[key] = json.loads(out.strip().splitlines()[-1])
    for name in ("a", "b"):
        assert results[(name, 1)] is None
        got, want = results[(name, 0)], data[name]
        assert got["num_tokens"] == want["num_tokens"]
        assert math.isclose(got["nll"] * got["num_tokens"], want["nll"] * want["num_tokens"], rel_tol=1e-9)
        assert got["perplexities"] == pytest.approx(want["perplexities"], rel=1e-9)
        assert got["perplexity_ci"] == pytest.approx(want["perplexity_ci"], rel=1e-9)
    assert data["a"]["num_tokens"] != data["b"]["num_tokens"]  # so a mix-up could not go unseen


def test_evaluate_missing_or_dead_process_fails_process_0(tmp_path):
    script = METRIC_SCRIPT
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"predictions": [[-1.5] * 40] * 20, "references": [[1] * 40] * 20}] * 2))
    cache, env = tmp_path / "cache", _child_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    start = time.monotonic()
    alone = _evaluate_worker(script, cache, "alone", 0, data, env, timeout=3)  # process 1 never starts
    first = _evaluate_worker(script, cache, "dies", 0, data, env, timeout=60)
    dying = _evaluate_worker(script, cache, "dies", 1, data, env, timeout=60, die=True)
    rc, out, err = _finish(alone)
    assert rc != 0 and out.strip() == "" and "alone-2-1.arrow.lock" in err, err[-2000:]  # evaluate names the file
    assert time.monotonic() - start < 120  # process start-ups plus the 3 s timeout, never a hang
    assert _finish(dying)[0] == 3
    rc, out, err = _finish(first)
    # without the end-of-stream check, a cut shard fails inside pyarrow or, cut between
    # record batches, reads as a shorter shard: a partial result reported as complete
    assert rc != 0 and out.strip() == "", out
    assert "Process 1 of 2 did not finish its shard" in err, err[-2000:]
