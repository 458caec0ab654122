"""`ppl_cli.py --docs-out` killed at seeded random points (SIGKILL and SIGINT, three seeds each), its
resume killed again on some seeds, then resumed to the end: the result and the folder's rows equal
an uninterrupted run's, each document exactly once, and nothing half written is left behind.

The runs under test are `ppl_cli.main` in real processes with two changes that only move time:
chunks and parts of 8 documents (instead of 512 and 256), so a few seconds of scoring write dozens
of parts, and a slow disk (each part written in two halves 15 ms apart, each rename 15 ms late, the
manifest's 200 ms late), so a kill lands mid-write or between a write and its rename, states a real
disk passes through in microseconds. Batch size 1: every document's numbers are bit for bit the same
whichever run scored it."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import ppl_cli
from conftest import ROOT, one_intra_op_thread
from ppl_docs import MANIFEST, read_rows

N = 320  # documents: 40 parts of 8
PER_PART = 8
SLOW = """
import io, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also under a shell's `&` (SIGINT ignored)
import pyarrow.parquet as pq
import ppl_docs, ppl_runner

ppl_runner.TEXTS_PER_CHUNK = {per_part}
ppl_docs.PartWriter.__init__.__kwdefaults__["flush_rows"] = {per_part}
write_table, replace = pq.write_table, os.replace

def slow_write_table(table, where, *args, **kwargs):
    buffer = io.BytesIO()
    write_table(table, buffer, *args, **kwargs)
    data = buffer.getvalue()
    with open(where, "wb") as file:
        file.write(data[: len(data) // 2])
        file.flush()
        time.sleep(0.015)
        file.write(data[len(data) // 2:])

def slow_replace(src, dst, *args, **kwargs):
    time.sleep(0.2 if os.path.basename(dst) == "{manifest}" else 0.015)
    replace(src, dst, *args, **kwargs)

pq.write_table, os.replace = slow_write_table, slow_replace
import ppl_cli
sys.exit(ppl_cli.main(sys.argv[1:]))
""".format(per_part=PER_PART, manifest=MANIFEST)
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
# Where the first kill lands, by case: (signal, seed) picks one, the seed draws the delay or part within it.
PHASES = ("mid-write", "start", "between", "manifest", "end")
SIGNALS = (signal.SIGKILL, signal.SIGINT)


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    """The corpus, the command's arguments, and an uninterrupted run (its folder, result and timeline)."""
    root = tmp_path_factory.mktemp("kill-resume")
    texts = ["The cat sat on the mat and looked at the door.", "A short second document about rain in the hills.",
             "Numbers like 12 and 345 are tokens too.", "The last one, with a comma, and an end."]
    corpus = root / "corpus.jsonl"
    lines = (json.dumps({"text": f"{texts[i % 4]} Document {i}." + " More." * (i % 7), "url": f"doc://{i}"})
             for i in range(N))
    corpus.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    args = ["--model", str(tiny_dir), "--device", "cpu", "--corpus", str(corpus), "--id-field", "url",
            "--batch-size", "1", "--bootstrap-resamples", "100", "--quiet"]
    docs = root / "whole"
    proc, timeline = start(args, docs, root / "whole.json"), {}
    started = time.monotonic()
    while proc.poll() is None and time.monotonic() - started < 240:
        names = os.listdir(docs) if docs.is_dir() else []
        now = time.monotonic() - started
        if docs.is_dir():
            timeline.setdefault("folder", now)
        if any(name.startswith("part-") for name in names):
            timeline.setdefault("first_part", now)
            timeline["last_part"] = now
        time.sleep(0.005)
    timeline["exit"] = time.monotonic() - started
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert len(list(docs.glob("part-*.parquet"))) == N // PER_PART  # the small parts took: kills have places to land
    return {"args": args, "docs": docs, "result": json.loads((root / "whole.json").read_text()), "timeline": timeline}


def start(args, docs, json_out):
    """`ppl_cli.py ARGS --docs-out DOCS --json JSON_OUT` with small parts on a slow disk, started."""
    return subprocess.Popen([sys.executable, "-c", SLOW, *args, "--docs-out", str(docs), "--json", str(json_out)],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_at(proc, docs, phase, rng, timeline, sig):
    """Send `sig` to `proc` when its run reaches `phase` (drawn further by `rng`); wait for it to end.
    Returns (exit status, stderr, where it landed: what the folder held just before the signal, whether
    the run touched the folder: its names changed)."""
    before = sorted(os.listdir(docs)) if docs.is_dir() else []
    parts_before = sum(name.startswith("part-") for name in before)
    to_write = math.ceil((N - len(read_rows(docs, columns=["index"]))) / PER_PART)
    k = rng.randint(1, max(1, to_write - 2))  # parts this run writes before the kill
    delay = {"start": rng.uniform(0, timeline["folder"]),  # importing, loading: before the folder
             "between": rng.uniform(0, 0.04),
             "end": rng.uniform(0, timeline["exit"] - timeline["last_part"])}.get(phase, 0.0)

    def reached(names, elapsed):
        new = sum(name.startswith("part-") for name in names) - parts_before
        writing = any(name.startswith(".part-") for name in names)
        if phase == "manifest":  # written under its temporary name, or just renamed
            return any(name.startswith(f".{MANIFEST}.tmp") or name == MANIFEST for name in names)
        if phase == "mid-write":  # a part's temporary file is there (half or wholly written, not renamed)
            return (new >= k and writing) or new > k
        if phase == "between":
            return new >= k
        if phase == "end":
            return new >= to_write - 1
        return elapsed >= delay or sorted(names) != before  # "start": at the latest when the run touches the folder

    started, landed = time.monotonic(), None
    while proc.poll() is None and time.monotonic() - started < 120:
        names = os.listdir(docs) if docs.is_dir() else []
        if reached(names, time.monotonic() - started):
            time.sleep(0 if phase == "start" else delay)
            names = sorted(os.listdir(docs)) if docs.is_dir() else []
            parts = [name for name in names if name.startswith("part-")]
            landed = f"{len(parts)} parts, {[name for name in names if name not in parts]}"
            proc.send_signal(sig)
            break
        time.sleep(0.003)
    _, err = proc.communicate(timeout=120)
    touched = (sorted(os.listdir(docs)) if docs.is_dir() else []) != before
    return proc.returncode, err, landed, touched


def check_stopped(sig, docs, json_out, status, err, landed, touched):
    """SIGKILL: -9; SIGINT: 130 and one line, or Python's own -2 outside `ppl_cli.main` (still importing:
    the folder untouched; or exiting: the result written); either: 0 when the run ended before the signal."""
    if status == 0:
        return
    if sig == signal.SIGKILL:
        assert status == -signal.SIGKILL, err[-3000:]
    elif status == -signal.SIGINT:
        assert not touched or json_out.is_file(), err[-3000:]
    else:
        assert status == 130, err[-3000:]
        assert [line for line in err.splitlines() if line.strip()] == [
            f"interrupted: the documents scored so far are in {docs}: run the same command with --resume to continue."]


@pytest.mark.parametrize("sig", SIGNALS, ids=["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_run_killed_at_random_points_resumes_to_the_uninterrupted_result(setup, tmp_path, capsys, sig, seed):
    rng = random.Random(f"{sig.name}-{seed}")
    docs, timeline = tmp_path / "docs", setup["timeline"]
    phase = PHASES[(3 * SIGNALS.index(sig) + seed) % len(PHASES)]
    first = tmp_path / "first.json"
    stopped = kill_at(start(setup["args"], docs, first), docs, phase, rng, timeline, sig)
    check_stopped(sig, docs, first, *stopped)
    print(f"{sig.name} seed {seed}: {phase} -> exit {stopped[0]}, folder held {stopped[2]}")
    if seed > 0:  # its resume is killed too
        again = rng.choice(("start", "between", "mid-write"))
        second = tmp_path / "second.json"
        stopped = kill_at(start([*setup["args"], "--resume"], docs, second), docs, again, rng, timeline, sig)
        check_stopped(sig, docs, second, *stopped)
        print(f"  its resume: {again} -> exit {stopped[0]}, folder held {stopped[2]}")

    # a run that wrote no part yet is simply run again (nothing to lose); else it is resumed
    resume = ["--resume"] if list(docs.glob("part-*.parquet")) else []
    with one_intra_op_thread():
        status = ppl_cli.main([*setup["args"], "--docs-out", str(docs), *resume, "--json", str(tmp_path / "out.json")])
    assert status == 0, capsys.readouterr().err
    got, whole = json.loads((tmp_path / "out.json").read_text()), setup["result"]
    assert got["num_documents"] == whole["num_documents"] == N
    assert got["num_tokens"] == whole["num_tokens"]
    assert got["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-12)
    rows, reference = read_rows(docs), read_rows(setup["docs"])
    assert rows["index"].tolist() == list(range(N))  # each document once: none missing, none twice
    assert rows["id"].tolist() == reference["id"].tolist()
    assert rows["num_tokens"].tolist() == reference["num_tokens"].tolist()
    assert rows["nll"].tolist() == pytest.approx(reference["nll"].tolist(), rel=1e-12)
    stray = [p.name for p in docs.iterdir() if p.name != MANIFEST and not p.name.startswith(".lock-rank")
             and not (p.name.startswith("part-") and p.name.endswith(".parquet"))]
    assert not stray  # no part or manifest left half written by a killed run
