"""Comparing a model with a reference model (`ppl_compare`): time, memory, saved-file size, accuracy.

Model: the embedded SmolLM2-135M with torch's dynamic int8 quantization
(`ppl_sources.quantize_dynamic_int8`); reference: the float32 original. Measured in one run:
  cost      on the first WikiText-2 test paragraphs, in one process after a warm-up on one
            paragraph (loading and first-call probes excluded), the best of --repeat runs of:
            the model alone, the reference alone, the comparison (`reference_model=`),
            `save_reference` (the reference alone, writing its top-k + sampled records) and the
            comparison against that file (`reference_file=`)
  memory    on one long window of real English (WikiText-2 articles joined, max_length 2048),
            each run in its own process (the smallest of --memory-runs): extra peak memory
            (VmHWM, reset by writing 5 to /proc/self/clear_refs once both models and pyarrow
            are loaded, the models probed and the heap's free pages handed back with
            malloc_trim) of the model alone, the reference alone, the comparison,
            save_reference and the comparison against its file
  file      bytes per scored token of the saved file against llama.cpp's --kl-divergence-base
            file (every position's full distribution as 16-bit values: 2 x 49,152 bytes)
  accuracy  the KL divergence estimated from the file against the exact one, in units of the
            file's own sampling standard error (`kl_divergence_sampling_se`)

    python benchmarks/bench_compare.py [--paragraphs 24] [--repeat 1] [--tokens 2048] [--memory-runs 2]
Goals: comparison <= the two models scored one after the other; its extra memory <= the model
alone's plus the reference alone's (one batch of each).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench_memory  # also puts the repository on sys.path
from bench_memory import WIKITEXT, _hwm_mb, _reset_peak, cpu_name, long_ids, paragraphs

LLAMA_CPP_BYTES_PER_TOKEN = 2 * 49152  # uint16 per vocabulary entry and position
MAX_LENGTH, BATCH_SIZE = 1024, 16  # the cost runs' settings (paragraphs fit one window each)


def models():
    """(int8 model, float32 reference, tokenizer), on the CPU with BENCH_THREADS threads."""
    import torch

    from ppl_sources import load_model, quantize_dynamic_int8

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    reference, tokenizer = load_model(device="cpu", dtype="float32")
    return quantize_dynamic_int8(reference), reference, tokenizer


def runs(model, reference, tokenizer, folder, saved, **settings):
    """Each way of scoring, as a function of the texts: "save" writes a new file in `folder`
    per call and appends its path to `saved`; "file" compares against `saved[-1]`."""
    from ppl_runner import evaluate_texts, save_reference

    def save(texts):
        saved.append(Path(folder) / f"reference-{len(saved)}.parquet")
        rows = save_reference(reference, tokenizer, ((i, None, t) for i, t in enumerate(texts)), saved[-1], **settings)
        return {"num_tokens": sum(row["num_tokens"] for row in rows), "bytes": saved[-1].stat().st_size}

    return {
        "model": lambda texts: evaluate_texts(model, tokenizer, texts, **settings),
        "reference": lambda texts: evaluate_texts(reference, tokenizer, texts, **settings),
        "compare": lambda texts: evaluate_texts(model, tokenizer, texts, reference_model=reference, **settings),
        "save": save,
        "file": lambda texts: evaluate_texts(model, tokenizer, texts, reference_file=saved[-1], **settings),
    }


KEEP = ("num_tokens", "bytes", "perplexity", "reference_perplexity", "perplexity_ratio", "kl_divergence",
        "kl_divergence_se", "kl_divergence_sampling_se", "top1_agreement", "rms_delta_p")


def run_costs(n, repeat):
    """In a child: every way of scoring the first `n` paragraphs, warmed up, the best of `repeat`."""
    model, reference, tokenizer = models()
    texts = paragraphs(n)
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        ways = runs(model, reference, tokenizer, folder, [], max_length=MAX_LENGTH, batch_size=BATCH_SIZE, progress=False)
        for way in ways.values():  # warm-up: first-call probes, allocator, kernels
            way(texts[:1])
        for _ in range(repeat):
            for name, way in ways.items():
                started = time.perf_counter()
                result = way(texts)
                seconds = time.perf_counter() - started
                if name not in out or seconds < out[name]["seconds"]:
                    out[name] = {"seconds": seconds, **{k: result[k] for k in KEEP if k in result}}
    return out


def release_free_heap():
    """Hand the heap's free pages back to the OS (glibc's malloc_trim). Loading and quantizing
    leave some 400 MB freed but resident; without this, a run reuses them unseen and the
    peak above the reset misses its first 400 MB."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then be understated
        pass


def run_memory(method, tokens, folder):
    """In a child: extra peak MB of one way of scoring one `tokens`-token window. A "save"
    child leaves FOLDER/reference.parquet; a "file" child (run after it) compares against it.
    Only the fused-head probes run before the peak is reset (a warm-up of the scoring itself
    would leave freed buffers in the allocator and hide part of the peak), after the free heap
    is handed back."""
    import pyarrow.parquet  # noqa: F401 - loaded before the reset in every run: some 350 MB of libraries

    from ppl_head import fused_head

    model, reference, tokenizer = models()
    text = tokenizer.decode(long_ids(tokenizer, tokens - 1)[1:])  # with the start token, one window
    saved = [Path(folder) / "reference.parquet"] if method == "file" else []
    ways = runs(model, reference, tokenizer, folder, saved, max_length=tokens, progress=False)
    fused_head(model), fused_head(reference)
    release_free_heap()
    _reset_peak()
    base = _hwm_mb()
    started = time.perf_counter()
    result = ways[method]([text])
    out = {"seconds": time.perf_counter() - started, "extra_mb": _hwm_mb() - base, "base_mb": base,
           "num_tokens": result["num_tokens"]}
    if method == "save":  # the file the "file" runs read (each save run writes its own)
        saved[-1].replace(Path(folder) / "reference.parquet")
    return out


def child(task, *args):
    return {"costs": run_costs, "memory": run_memory}[task](*args)


def measure(*args):
    return bench_memory.measure(*args, script=__file__)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paragraphs", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=1, help="cost runs per way of scoring; the fastest counts")
    parser.add_argument("--tokens", type=int, default=2048, help="the memory runs' window (max_length)")
    parser.add_argument("--memory-runs", type=int, default=2, help="processes per memory run; the smallest peak counts "
                        "(one process's peak varies by up to ~90 MB from run to run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    if not WIKITEXT.is_file():
        sys.exit(f"skipped: {WIKITEXT} is absent (WikiText-2 lives in ../shared, beside the repository)")
    threads = os.environ.get("BENCH_THREADS", "2")
    print(f"{cpu_name()}; {threads} threads; model SmolLM2-135M dynamic int8, reference SmolLM2-135M float32")

    c = measure("costs", args.paragraphs, args.repeat)
    n = c["model"]["num_tokens"]
    pair = c["model"]["seconds"] + c["reference"]["seconds"]
    saved = c["save"]["seconds"] + c["file"]["seconds"]
    print(f"\nCost: first {args.paragraphs} WikiText-2 test paragraphs, {n:,} scored tokens, max_length {MAX_LENGTH}, "
          f"batch_size {BATCH_SIZE}, best of {args.repeat} after a warm-up:")
    print(f"{'run':<40}{'seconds':>9}{'tokens/s':>10}{'/ model+ref':>13}")
    for label, seconds in (("model alone (int8)", c["model"]["seconds"]), ("reference alone (float32)", c["reference"]["seconds"]),
                           ("model + reference, one after the other", pair), ("comparison (reference_model=)", c["compare"]["seconds"]),
                           ("save_reference (reference, writes file)", c["save"]["seconds"]),
                           ("comparison against file (reference_file=)", c["file"]["seconds"]),
                           ("save_reference + against file", saved)):
        print(f"{label:<40}{seconds:>9.2f}{n / seconds:>10.0f}{seconds / pair:>12.2f}x")
    print(f"comparison / (model + reference) = {c['compare']['seconds'] / pair:.2f}x (goal <= 1x); "
          f"against file / model alone = {c['file']['seconds'] / c['model']['seconds']:.2f}x; "
          f"save_reference / reference alone = {c['save']['seconds'] / c['reference']['seconds']:.2f}x")

    with tempfile.TemporaryDirectory() as folder:
        def smallest(way, folder=folder):
            return min((measure("memory", way, args.tokens, folder) for _ in range(args.memory_runs)), key=lambda r: r["extra_mb"])

        with ThreadPoolExecutor(2) as pool:  # memory only: two children at a time
            m = dict(zip(("model", "reference", "compare", "save"), pool.map(smallest, ("model", "reference", "compare", "save"))))
        m["file"] = smallest("file")  # against the save runs' file
    print(f"\nMemory: one window of {m['model']['num_tokens']:,} scored tokens (WikiText-2 articles joined, max_length "
          f"{args.tokens}), each run in its own process; extra peak MB above both loaded models "
          f"({m['model']['base_mb']:.0f} MB):")
    print(f"{'run':<40}{'extra MB':>9}")
    for label, key in (("model alone (int8)", "model"), ("reference alone (float32)", "reference"),
                       ("comparison (reference_model=)", "compare"), ("save_reference", "save"),
                       ("comparison against file", "file")):
        print(f"{label:<40}{m[key]['extra_mb']:>9.0f}")
    alone = m["model"]["extra_mb"] + m["reference"]["extra_mb"]
    print(f"comparison / (model alone + reference alone) = {m['compare']['extra_mb'] / alone:.2f}x "
          f"(goal <= 1x: one batch of each); comparison / max(model, reference) = "
          f"{m['compare']['extra_mb'] / max(m['model']['extra_mb'], m['reference']['extra_mb']):.2f}x")

    per_token = c["save"]["bytes"] / c["save"]["num_tokens"]
    print(f"\nSaved file: {c['save']['bytes']:,} bytes for {c['save']['num_tokens']:,} tokens = {per_token:,.0f} bytes/token "
          f"(top-32 + 32 samples); llama.cpp's full-vocabulary file {LLAMA_CPP_BYTES_PER_TOKEN:,} bytes/token = "
          f"{LLAMA_CPP_BYTES_PER_TOKEN / per_token:,.0f}x larger")

    exact, est = c["compare"], c["file"]
    diff = est["kl_divergence"] - exact["kl_divergence"]
    sampling = est["kl_divergence_sampling_se"]
    print(f"\nAccuracy of the saved path ({n:,} tokens):")
    print(f"{'':<22}{'exact':>12}{'from file':>12}")
    for label, key, fmt in (("KL divergence", "kl_divergence", ".5f"), ("  its SE over tokens", "kl_divergence_se", ".5f"),
                            ("  sampling SE", "kl_divergence_sampling_se", ".5f"), ("top-1 agreement", "top1_agreement", ".4f"),
                            ("perplexity ratio", "perplexity_ratio", ".5f"), ("RMS delta-p", "rms_delta_p", ".5f")):
        print(f"{label:<22}{exact[key]:>12{fmt}}{est[key]:>12{fmt}}")
    print(f"KL from file - exact = {diff:+.5f} ({diff / exact['kl_divergence']:+.3%}) = "
          f"{diff / sampling if sampling else float('nan'):+.2f} sampling SE; perplexity int8 {exact['perplexity']:.3f}, "
          f"float32 {exact['reference_perplexity']:.3f}")


if __name__ == "__main__":
    main()
