"""Documents/s on a local Ray cluster with 1 and 2 scoring actors against the one-process CLI, on the
same documents and the embedded SmolLM2-135M; Ray's start-up (cluster, then actors importing torch and
loading the model) apart from scoring; resident memory per actor.

    .venv/bin/python benchmarks/bench_ray.py [--docs 96] [--max-chars 1500]

Each configuration runs in its own process (`ppl_cli.main`). Scoring throughput with Ray is measured
from the first row an actor returns to the last (`PidTimedScorer` stamps each batch), so actor start-up
is reported separately; the goal is one actor within 1.2x of the plain CLI once started.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.test.tokens"

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import pandas as pd
mode, corpus, workers, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if mode == "cli":
    import ppl_cli
    t = time.perf_counter()
    ppl_cli.main(["--corpus", corpus, "--quiet", "--json", out + ".json", "--max-length", "512"])
    print(json.dumps({{"wall": time.perf_counter() - t}}))
    sys.exit()
os.environ["RAY_AUTH_MODE"] = "disabled"
import ray
import ppl_ray
t0 = time.perf_counter()
ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
t_init = time.perf_counter() - t0

class Stamped(ppl_ray.DocumentScorer):
    def __call__(self, batch):
        start = time.time()
        out = super().__call__(batch)
        out["t_start"], out["t_end"], out["pid"] = start, time.time(), os.getpid()
        hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
        out["hwm"] = hwm
        return out

ds = ray.data.read_json(corpus, lines=True).repartition(target_num_rows_per_block=8)
t1 = time.time()
ds = ppl_ray.score_dataset(ds, workers=workers, rows_per_call=8, scorer=Stamped, max_length=512)
frame = ds.to_pandas()
t_job = time.time() - t1
ray.shutdown()
print(json.dumps({{"init": t_init, "job": t_job, "first_start": frame.t_start.min() - t1,
                  "scoring": frame.t_end.max() - frame.t_start.min(), "rows": len(frame),
                  "errors": int(frame.error.notna().sum()), "hwm_per_actor": frame.groupby("pid").hwm.max().tolist(),
                  "ppl_tokens": int(frame.num_tokens.sum())}}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=96)
    parser.add_argument("--max-chars", type=int, default=1500, help="keep paragraphs up to this length")
    args = parser.parse_args()
    from ppl_corpus import default_corpus, split_paragraphs

    texts = split_paragraphs(WIKITEXT.read_text(encoding="utf-8")) if WIKITEXT.is_file() else default_corpus()
    texts = [t for t in texts if 200 <= len(t) <= args.max_chars][: args.docs]
    import torch

    print(f"{len(texts)} documents, {sum(map(len, texts)):,} characters; {os.cpu_count()} CPUs, "
          f"capability {torch.backends.cpu.get_cpu_capability()}; SmolLM2-135M float32, max_length 512")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "docs.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        child = CHILD.format(root=str(ROOT))
        results = {}
        for label, mode, workers in [("CLI, one process", "cli", 1), ("Ray, 1 actor", "ray", 1), ("Ray, 2 actors", "ray", 2)]:
            out = subprocess.run([sys.executable, "-c", child, mode, str(corpus), str(workers), str(Path(tmp) / mode)],
                                 capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode:
                sys.exit(f"{label} failed:\n{out.stderr[-3000:]}")
            results[label] = json.loads(out.stdout.strip().splitlines()[-1])
            if mode == "cli":
                report = json.loads((Path(tmp) / "cli.json").read_text())
                results[label]["scoring"] = report["seconds"]
        base = results["CLI, one process"]["scoring"]
        print(f"{'':18} {'docs/s':>8} {'scoring s':>10} {'vs CLI':>7}   start-up")
        for label, r in results.items():
            rate = len(texts) / r["scoring"]
            if "init" in r:
                extra = (f"ray.init {r['init']:.1f} s, first batch after {r['first_start']:.1f} s (actors import torch, "
                         f"load the model); job {r['job']:.1f} s; peak RSS per actor "
                         + ", ".join(f"{b / 2**20:,.0f} MB" for b in r["hwm_per_actor"]))
            else:
                extra = f"(model load and report: {r['wall'] - r['scoring']:.1f} s)"
            print(f"{label:18} {rate:8.2f} {r['scoring']:10.1f} {r['scoring'] / base:6.2f}x   {extra}")


if __name__ == "__main__":
    main()
