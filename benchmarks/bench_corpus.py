"""Corpus benchmark: a multi-GB corpus streamed with --limit in seconds and flat memory, and a
run killed part-way and resumed with the same result. The embedded SmolLM2-135M, real subprocesses
of `ppl_cli.py`, WikiText-2 test paragraphs.

In a temporary folder (deleted at the end):
  1. build   a JSON Lines corpus {"text", "id"} of about --gb GB by repeating the WikiText-2 test
             paragraphs, and a copy 1/100 of its size (the same first documents)
  2. stream  `ppl_cli.py --corpus BIG --limit N --id-field id --docs-out DIR --json OUT`, then the same
             on the 1/100 file: wall time and the child's peak RSS should not move with the file's size.
             Anchor: what the previous release did before scoring, reading the whole file into a list
             of texts (json.loads of every line). Also our reader alone (`iter_documents(limit=N)`).
  3. resume  on --paragraphs WikiText paragraphs: a run uninterrupted; the same run in a new folder,
             SIGKILLed as soon as its first part-*.parquet appears, then rerun with --resume; the final
             JSON and the per-document rows must equal the uninterrupted run's (--batch-size 1: bit for bit).

Each measured process runs alone, started by a bare launcher (`python -c`) that reports
getrusage(RUSAGE_CHILDREN).ru_maxrss: on Linux a child's ru_maxrss starts at the RSS of the process
that forked it, so forking from this script (torch and pandas imported) would inflate small peaks.
The machine's load average is printed: other work on the same cores moves the times.

    python benchmarks/bench_corpus.py [--gb 2] [--limit 32] [--paragraphs 400] [--cut 500]
Goals: streamed time and peak memory flat (BIG / small about 1x); the resumed result equal to the
uninterrupted one (max relative difference 0) with every document's row once.

Why the resume corpus is paragraphs cut to --cut characters: parts are written every 256 rows or
60 s, checked when the runner hands over a chunk (at most 512 texts / 64,000 characters). Paragraphs
of at most 500 characters put 268 rows in the first chunk, so the first part, and the kill, land
at the same document on any machine, part-way through; whole paragraphs (76k tokens for 300)
would need about 4 minutes per run here.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.test.tokens"
CLI = ROOT / "ppl_cli.py"
sys.path.insert(0, str(ROOT))
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
COMPARED = ("perplexity", "nll", "num_tokens", "perplexity_ci")


def paragraphs():
    from ppl_corpus import split_paragraphs

    return split_paragraphs(WIKITEXT.read_text(encoding="utf-8"))


def cut(text, chars):
    """`text` up to `chars` characters, ended at a word boundary."""
    if len(text) <= chars:
        return text
    head = text[:chars]
    return head[: head.rfind(" ")] if " " in head else head


def write_jsonl(path, texts, target_bytes=None):
    """`texts` as {"text", "id"} lines, repeated until the file holds `target_bytes`. Returns the line count."""
    encoded = [json.dumps(t) for t in texts]  # ASCII (ensure_ascii): characters == bytes
    written, count = 0, 0
    with open(path, "w", encoding="ascii") as f:
        while True:
            block = "".join(f'{{"text": {e}, "id": "wt-{count + k:08d}"}}\n' for k, e in enumerate(encoded))
            f.write(block)
            written, count = written + len(block), count + len(encoded)
            if target_bytes is None or written >= target_bytes:
                return count


# ---------------------------------------------------------------------------------------
# Measured processes
# ---------------------------------------------------------------------------------------


def child(kind, path, limit):
    """Runs in its own process: the anchor's read (the whole file) or our streamed read (`limit` documents)."""
    started = time.perf_counter()
    if kind == "anchor":  # the previous release: every line parsed, every text kept, then scoring began
        texts = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    texts.append(json.loads(line)["text"])
    else:
        from ppl_corpus import iter_documents

        texts = [doc.text for doc in iter_documents(path, id_field="id", limit=limit)]
    print(json.dumps({"seconds": time.perf_counter() - started, "texts": len(texts)}))


def spawn(args, log):
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)


# Runs the measured command and writes its peak RSS (KB) to argv[1]; small, so the child's count starts small.
LAUNCHER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
            "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
            "sys.exit(code)")


def measure(args, tmp, name):
    """Run `args` to the end: wall seconds, its peak RSS in MB, the last line it printed."""
    log_path, rss_path = tmp / f"{name}.log", tmp / f"{name}.rss"
    with open(log_path, "w") as log:
        started = time.perf_counter()
        code = spawn([sys.executable, "-c", LAUNCHER, str(rss_path), *args], log).wait()
        seconds = time.perf_counter() - started
    out = log_path.read_text(errors="replace")
    if code != 0:
        sys.exit(f"{name} failed (exit {code}):\n{out[-3000:]}")
    return {"seconds": seconds, "peak_mb": int(rss_path.read_text()) / 1024,
            "last": out.strip().splitlines()[-1] if out.strip() else ""}


def cli_args(corpus, docs_out, json_out, *extra):
    return [sys.executable, str(CLI), "--corpus", str(corpus), "--id-field", "id", "--max-length", "256",
            "--batch-size", "1", "--quiet", "--docs-out", str(docs_out), "--json", str(json_out), *extra]


def read_folder(folder):
    import pandas as pd

    return pd.read_parquet(folder)  # pyarrow skips _manifest.json and .part-*.tmp (names starting "_" or ".")


def max_rel_diff(a, b):
    def flat(r):
        return [float(x) for k in COMPARED for x in (r[k] if isinstance(r[k], list) else [r[k]])]

    return max(abs(x - y) / max(abs(x), abs(y), 1e-300) if x != y else 0.0 for x, y in zip(flat(a), flat(b)))


# ---------------------------------------------------------------------------------------
# The three parts
# ---------------------------------------------------------------------------------------


def build(tmp, gb):
    paras = paragraphs()
    started = time.perf_counter()
    big, small = tmp / "big.jsonl", tmp / "small.jsonl"
    lines_big = write_jsonl(big, paras, int(gb * 1e9))
    lines_small = write_jsonl(small, paras, int(gb * 1e9 / 100))
    seconds = time.perf_counter() - started
    size_big, size_small = big.stat().st_size, small.stat().st_size
    print(f"[build] {big.name}: {size_big / 1e9:.2f} GB, {lines_big:,} documents; {small.name}: "
          f"{size_small / 1e6:.1f} MB, {lines_small:,} documents ({len(paras):,} WikiText-2 test paragraphs "
          f"repeated); {seconds:.1f} s")
    return {"big": big, "small": small, "seconds": seconds, "size_big": size_big, "size_small": size_small,
            "lines_big": lines_big, "lines_small": lines_small}


def stream(tmp, files, limit):
    res = {}
    for name in ("big", "small"):
        out = tmp / f"stream-{name}.json"
        r = measure(cli_args(files[name], tmp / f"docs-{name}", out, "--limit", str(limit)), tmp, f"cli-{name}")
        r["result"] = json.loads(out.read_text())
        res[f"cli_{name}"] = r
        print(f"[stream] ppl_cli --limit {limit} on {name}: {r['seconds']:.1f} s wall "
              f"({r['result']['seconds']:.1f} s scoring), peak {r['peak_mb']:.0f} MB, "
              f"perplexity {r['result']['perplexity']:.4f}; load average {os.getloadavg()[0]:.1f}")
    for kind in ("stream", "anchor"):
        for name in ("big", "small"):
            r = measure([sys.executable, __file__, "--child", kind, str(files[name]), str(limit)], tmp, f"{kind}-{name}")
            r.update(json.loads(r.pop("last")))
            res[f"{kind}_{name}"] = r
            what = f"iter_documents(limit={limit})" if kind == "stream" else "read all + json.loads (anchor)"
            print(f"[stream] {what} on {name}: {r['seconds']:.2f} s, peak {r['peak_mb']:.0f} MB, {r['texts']:,} texts")
    return res


def resume(tmp, n, chars, poll):
    texts = [cut(t, chars) for t in paragraphs()[:n]]
    corpus = tmp / "resume.jsonl"
    write_jsonl(corpus, texts)
    tokens_note = f"{len(texts)} paragraphs, {sum(map(len, texts)):,} characters (each cut to <= {chars})"

    full = measure(cli_args(corpus, tmp / "full", tmp / "full.json"), tmp, "full")
    print(f"[resume] uninterrupted: {full['seconds']:.1f} s wall on {tokens_note}")

    killed_dir = tmp / "killed"
    with open(tmp / "killed.log", "w") as log:
        started = time.perf_counter()
        proc = spawn(cli_args(corpus, killed_dir, tmp / "killed.json"), log)
        while proc.poll() is None and not any(killed_dir.glob("part-*.parquet")):
            time.sleep(poll)
        finished_first = proc.returncode is not None
        if not finished_first:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = time.perf_counter() - started
    if finished_first:
        sys.exit(f"[resume] the run ended before any part appeared ({killed_at:.0f} s): give more --paragraphs")
    kept = len(read_folder(killed_dir))
    print(f"[resume] SIGKILL at {killed_at:.1f} s, as the first part appeared: {kept} of {n} rows kept")

    resumed = measure(cli_args(corpus, killed_dir, tmp / "resumed.json", "--resume"), tmp, "resumed")
    a, b = json.loads((tmp / "full.json").read_text()), json.loads((tmp / "resumed.json").read_text())
    diff = max_rel_diff(a, b)
    exact = all(a[k] == b[k] for k in COMPARED)
    rows_a = read_folder(tmp / "full").sort_values("index").reset_index(drop=True)
    rows_b = read_folder(killed_dir).sort_values("index").reset_index(drop=True)
    once = rows_b["index"].is_unique and rows_a["index"].is_unique
    same_rows = once and rows_a.equals(rows_b)
    print(f"[resume] resumed: {resumed['seconds']:.1f} s wall for the {n - kept} rows left; "
          f"{', '.join(COMPARED)} equal: {exact} (max relative difference {diff:.1e}); "
          f"folders hold the same rows, each index once: {same_rows} ({len(rows_a)} / {len(rows_b)} rows)")
    print(f"[resume] perplexity {a['perplexity']:.6f} uninterrupted, {b['perplexity']:.6f} killed + resumed; "
          f"CI {a['perplexity_ci']} / {b['perplexity_ci']}")
    return {"full": full, "killed_at": killed_at, "kept": kept, "n": n, "resumed": resumed, "diff": diff,
            "exact": exact, "same_rows": same_rows, "rows": (len(rows_a), len(rows_b))}


def machine():
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores (load average {load}), torch {torch.__version__} CPU capability {torch.backends.cpu.get_cpu_capability()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of the big JSON Lines corpus (default 2 GB)")
    parser.add_argument("--limit", type=int, default=32, help="documents scored from the big corpus (default 32)")
    parser.add_argument("--paragraphs", type=int, default=400, help="documents of the kill-and-resume corpus (default 400)")
    parser.add_argument("--cut", type=int, default=500, help="most characters per resume paragraph (default 500)")
    parser.add_argument("--poll", type=float, default=0.02, help="seconds between looks for the first part")
    parser.add_argument("--tmp", help="where the temporary folder goes (default: the system's)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]))
    if not WIKITEXT.is_file():
        print(f"skipped: {WIKITEXT} is absent (WikiText-2 lives in ../shared, beside the repository)")
        return
    print(f"CPU: {machine()}; SmolLM2-135M float32, ppl_cli.py --max-length 256 --batch-size 1")
    tmp = Path(tempfile.mkdtemp(prefix="bench_corpus-", dir=args.tmp))
    total = time.perf_counter()
    try:
        files = build(tmp, args.gb)
        s = stream(tmp, files, args.limit)
        r = resume(tmp, args.paragraphs, args.cut, args.poll)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    big, small = s["cli_big"], s["cli_small"]
    anchor, anchor_small, ours_read = s["anchor_big"], s["anchor_small"], s["stream_big"]
    gb, mb = files["size_big"] / 1e9, files["size_small"] / 1e6
    same = big["result"]["perplexity"] == small["result"]["perplexity"]
    print()
    print(f"Summary ({time.perf_counter() - total:.0f} s in all; load average now "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores)")
    rows = [
        ("build corpus", f"{files['seconds']:.1f} s", "", f"{gb:.2f} GB, {files['lines_big']:,} docs + {mb:.1f} MB copy"),
        (f"ppl_cli --limit {args.limit}, {gb:.1f} GB", f"{big['seconds']:.1f} s", f"{big['peak_mb']:.0f} MB",
         f"load + score; perplexity {big['result']['perplexity']:.4f}"),
        (f"ppl_cli --limit {args.limit}, {mb:.0f} MB", f"{small['seconds']:.1f} s", f"{small['peak_mb']:.0f} MB",
         f"same documents, same perplexity: {same}"),
        (f"iter_documents, {gb:.1f} GB", f"{ours_read['seconds']:.2f} s", f"{ours_read['peak_mb']:.0f} MB",
         f"our read of {args.limit} documents"),
        (f"anchor read all, {gb:.1f} GB", f"{anchor['seconds']:.1f} s", f"{anchor['peak_mb']:.0f} MB",
         f"{anchor['texts']:,} texts in a list, before any scoring"),
        (f"anchor read all, {mb:.0f} MB", f"{anchor_small['seconds']:.2f} s", f"{anchor_small['peak_mb']:.0f} MB", ""),
        ("resume: uninterrupted", f"{r['full']['seconds']:.1f} s", f"{r['full']['peak_mb']:.0f} MB",
         f"{r['n']} documents"),
        ("resume: killed", f"{r['killed_at']:.1f} s", "", f"SIGKILL at the first part, {r['kept']} rows kept"),
        ("resume: --resume", f"{r['resumed']['seconds']:.1f} s", f"{r['resumed']['peak_mb']:.0f} MB",
         f"{r['n'] - r['kept']} rows left; result equal: {r['exact']}, same rows: {r['same_rows']}"),
    ]
    print(f"{'step':<30}{'time':>9}{'peak':>10}  note")
    for step, t, m, note in rows:
        print(f"{step:<30}{t:>9}{m:>10}  {note}")
    print(f"flat, ppl_cli big / small:       time {big['seconds'] / small['seconds']:.2f}x, "
          f"peak {big['peak_mb'] / small['peak_mb']:.2f}x   (goal about 1x for a {files['size_big'] / files['size_small']:.0f}x file)")
    print(f"flat, iter_documents big / small: time {ours_read['seconds'] / s['stream_small']['seconds']:.2f}x, "
          f"peak {ours_read['peak_mb'] / s['stream_small']['peak_mb']:.2f}x")
    print(f"ours / anchor on {gb:.1f} GB, ppl_cli whole run / anchor's read alone: time "
          f"{big['seconds'] / anchor['seconds']:.2f}x, peak {big['peak_mb'] / anchor['peak_mb']:.2f}x")
    print(f"ours / anchor on {gb:.1f} GB, read stage (iter_documents / read all): time "
          f"{ours_read['seconds'] / anchor['seconds']:.4f}x, peak {ours_read['peak_mb'] / anchor['peak_mb']:.3f}x")
    print(f"anchor big / small: time {anchor['seconds'] / anchor_small['seconds']:.0f}x, "
          f"peak {anchor['peak_mb'] / anchor_small['peak_mb']:.1f}x   (it grows with the file)")
    print(f"resume: max relative difference {r['diff']:.1e} over {', '.join(COMPARED)}   (goal 0)")


if __name__ == "__main__":
    main()
