"""Benchmark of the torch core (issue 2): time and peak extra memory against torchmetrics'
`Perplexity` and `F.cross_entropy` on the whole tensor (the functional core, the stateful
class, and forward + backward where `preds` requires grad), and the evaluate metric path
against the core on the same data.

Every measurement runs in its own subprocess, so one method's peak memory never mixes with
another's. "Extra memory" is the peak RSS during the call minus the RSS just before it (Linux
`/proc/self/clear_refs` resets the peak between repeats). glibc's allocator runs with its
defaults, as users have it: blocks above its mmap threshold (at most 32 MB) go back to the
system when freed, so full-size copies show in the peak; a fixed low threshold would instead
turn every few-MB chunk into an mmap and page faults, timing the allocator, not the method.
`--busy` keeps another core busy with a spinning process during the measurement (small
chunks that lean on torch's intra-op threads can collapse under load); by default both the
quiet and the busy machine are measured.

    .venv/bin/python benchmarks/bench_core.py            # [4, 512, 49152] and 8 x 512 x 32000
    .venv/bin/python benchmarks/bench_core.py --quick    # tiny sizes, a smoke run
"""

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRIC_PATH = str(ROOT / "perplexity_metric.py")
IGNORE_INDEX = -100

GOAL_SPEEDUP = 1.3  # at least this many times faster than torchmetrics
GOAL_EXTRA = 0.05  # extra memory at most this fraction of the input (without grad)
GOAL_METRIC_RATIO = 2.0  # metric path at most this many times the core's time on the same data

SIZES = {  # (core shape [batch, seq_len, vocab], metric-path shape)
    "full": ((4, 512, 49152), (8, 512, 32000)),
    "quick": ((2, 64, 2048), (2, 64, 1024)),
}

# ---------------------------------------------------------------------------------------
# Worker side: one method, one process
# ---------------------------------------------------------------------------------------


def make_inputs(shape, seed=0):
    """float32 logits and targets; the last eighth of the first sequence is padding."""
    import torch

    batch, seq_len, vocab = shape
    gen = torch.Generator().manual_seed(seed)
    preds = torch.randn(shape, generator=gen)
    target = torch.randint(vocab, (batch, seq_len), generator=gen)
    target[0, seq_len - max(1, seq_len // 8) :] = IGNORE_INDEX
    return preds, target


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return float(value), time.perf_counter() - start


def measure_core(preds, target):
    import ppl_core

    return _timed(lambda: ppl_core.perplexity(preds, target, ignore_index=IGNORE_INDEX))


def measure_torchmetrics(preds, target):
    from torchmetrics.text import Perplexity

    metric = Perplexity(ignore_index=IGNORE_INDEX)
    return _timed(lambda: (metric.update(preds, target), metric.compute())[1])


def measure_class(preds, target):
    from ppl_torchmetrics import Perplexity

    metric = Perplexity(ignore_index=IGNORE_INDEX)
    return _timed(lambda: (metric.update(preds, target), metric.compute())[1])


def _with_backward(value_fn, preds, target):
    """Time value + backward; the gradient itself (the input's size) is counted in the extra memory."""
    preds.requires_grad_()
    preds.grad = None

    def run():
        value = value_fn(preds, target)
        value.backward()
        return value.detach()

    return _timed(run)


def measure_core_grad(preds, target):
    import ppl_core

    return _with_backward(lambda p, t: ppl_core.perplexity(p, t, ignore_index=IGNORE_INDEX), preds, target)


def measure_torchmetrics_grad(preds, target):
    from torchmetrics.functional.text import perplexity

    return _with_backward(lambda p, t: perplexity(p, t, ignore_index=IGNORE_INDEX), preds, target)


def measure_cross_entropy(preds, target):
    import torch
    import torch.nn.functional as F

    vocab = preds.shape[-1]
    return _timed(lambda: torch.exp(F.cross_entropy(preds.view(-1, vocab), target.view(-1), ignore_index=IGNORE_INDEX)))


def measure_metric(preds, target):
    import evaluate

    # A private cache dir (removed at exit) and experiment id: no other run shares its file.
    cache_dir = tempfile.mkdtemp(prefix="bench_metric_")
    atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
    metric = evaluate.load(METRIC_PATH, cache_dir=cache_dir, experiment_id=uuid.uuid4().hex)

    def run():
        metric.add_batch(predictions=preds, references=target)
        return metric.compute(bootstrap_resamples=1000)["perplexity"]

    return _timed(run)


MEASURES = {
    "core": measure_core,
    "class": measure_class,
    "torchmetrics": measure_torchmetrics,
    "core_grad": measure_core_grad,
    "torchmetrics_grad": measure_torchmetrics_grad,
    "cross_entropy": measure_cross_entropy,
    "metric": measure_metric,
}


def _status_bytes(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _reset_peak():
    """Reset the peak RSS to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_since(base, reset_ok, start_maxrss):
    if reset_ok:
        return _status_bytes("VmHWM") - base
    import resource

    # Fallback: the lifetime peak, meaningful for the first repeat only.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_maxrss


def worker(method, shape, repeats):
    import resource

    import torch

    sys.path.insert(0, str(ROOT))
    measure = MEASURES[method]
    measure(*make_inputs((shape[0], 8, shape[2])))  # warm-up: imports, thread pools, allocator
    preds, target = make_inputs(shape)
    start_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, extras = [], []
    for _ in range(repeats):
        base = _status_bytes("VmRSS")
        reset_ok = _reset_peak()
        value, seconds = measure(preds, target)
        extras.append(_peak_since(base, reset_ok, start_maxrss))
        times.append(seconds)
    report = {
        "method": method,
        "shape": list(shape),
        "input_bytes": preds.numel() * preds.element_size(),
        "value": value,
        "times": times,
        "extra_bytes": max(extras),
        "peak_reset": reset_ok,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report))


# ---------------------------------------------------------------------------------------
# Parent side: run the workers, print the table
# ---------------------------------------------------------------------------------------


def run_method(method, shape, repeats, busy):
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    command = [sys.executable, __file__, "--worker", method, "--shape", ",".join(map(str, shape)), "--repeats", str(repeats)]
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run(command, env=env, capture_output=True, text=True)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if out.returncode != 0:
        raise SystemExit(f"worker {method} {shape} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(condition, label, report, core_value=None, tm_median=None):
    median = statistics.median(report["times"])
    extra_mb = report["extra_bytes"] / 1e6
    extra_pct = 100 * report["extra_bytes"] / report["input_bytes"]
    speedup = f"{tm_median / median:6.2f}x" if tm_median else "      "
    rel = f"{abs(report['value'] / core_value - 1):.1e}" if core_value else "       "
    return (
        f"{condition:<6} {label:<36} {median:8.3f} {min(report['times']):8.3f} {extra_mb:9.1f} {extra_pct:8.1f}%"
        f"  {speedup}  {report['value']:14.6g}  {rel}"
    )


def _verdict(ok):
    return "OK  " if ok else "MISS"


def bench(condition, busy, sizes, repeats):
    core_shape, metric_shape = sizes
    methods = ("core", "class", "torchmetrics", "cross_entropy", "core_grad", "torchmetrics_grad")
    reports = {m: run_method(m, core_shape, repeats, busy) for m in methods}
    reports["metric"] = run_method("metric", metric_shape, repeats, busy)
    reports["core_on_metric_data"] = run_method("core", metric_shape, repeats, busy)
    return condition, reports


def print_table(results, sizes):
    core_shape, metric_shape = sizes
    header = (
        f"{'cond':<6} {'method':<36} {'median_s':>8} {'min_s':>8} {'extra_MB':>9} {'extra_in%':>9}"
        f"  {'vs_tm':>7}  {'perplexity':>14}  rel_to_core"
    )
    print(header)
    print("-" * len(header))
    for condition, reports in results:
        core_value = reports["core"]["value"]
        tm_median = statistics.median(reports["torchmetrics"]["times"])
        for method in ("core", "class", "torchmetrics", "cross_entropy"):
            label = f"{method} {'x'.join(map(str, core_shape))}"
            print(_row(condition, label, reports[method], core_value, tm_median))
        tm_grad_median = statistics.median(reports["torchmetrics_grad"]["times"])
        for method in ("core_grad", "torchmetrics_grad"):  # extra includes the gradient (100% of the input)
            label = f"{method} +backward {'x'.join(map(str, core_shape))}"
            print(_row(condition, label, reports[method], core_value, tm_grad_median))
        metric_core = reports["core_on_metric_data"]["value"]
        print(_row(condition, f"metric add_batch+compute {'x'.join(map(str, metric_shape))}", reports["metric"], metric_core))
        print(_row(condition, f"core {'x'.join(map(str, metric_shape))}", reports["core_on_metric_data"], metric_core))
    print()
    print("Goals:")
    for condition, reports in results:
        core, tm = reports["core"], reports["torchmetrics"]
        speedup = statistics.median(tm["times"]) / statistics.median(core["times"])
        extra = core["extra_bytes"] / core["input_bytes"]
        ratio = statistics.median(reports["metric"]["times"]) / statistics.median(reports["core_on_metric_data"]["times"])
        print(f"  [{condition}] {_verdict(speedup >= GOAL_SPEEDUP)} core vs torchmetrics: {speedup:.2f}x faster (goal >= {GOAL_SPEEDUP}x)")
        print(f"  [{condition}] {_verdict(extra <= GOAL_EXTRA)} core extra memory: {100 * extra:.1f}% of input (goal <= {100 * GOAL_EXTRA:.0f}%)")
        print(f"  [{condition}] {_verdict(ratio <= GOAL_METRIC_RATIO)} metric path: {ratio:.2f}x the core's time (goal <= {GOAL_METRIC_RATIO}x)")
        cls = statistics.median(tm["times"]) / statistics.median(reports["class"]["times"])
        print(f"  [{condition}] {_verdict(cls >= GOAL_SPEEDUP)} Perplexity class vs torchmetrics': {cls:.2f}x faster (goal >= {GOAL_SPEEDUP}x)")
        grad, tm_grad = reports["core_grad"], reports["torchmetrics_grad"]
        beyond = (grad["extra_bytes"] - grad["input_bytes"]) / grad["input_bytes"]
        tm_beyond = (tm_grad["extra_bytes"] - tm_grad["input_bytes"]) / tm_grad["input_bytes"]
        print(f"  [{condition}] with backward: {statistics.median(tm_grad['times']) / statistics.median(grad['times']):.2f}x "
              f"torchmetrics' speed; extra memory beyond the gradient {100 * beyond:.1f}% of input (torchmetrics {100 * tm_beyond:.0f}%)")
    if sizes == SIZES["quick"]:
        print("note: --quick sizes are a smoke run; the goals are stated for the full sizes")
    if not all(r["peak_reset"] for _, reports in results for r in reports.values()):
        print("note: /proc/self/clear_refs unavailable; extra memory is from ru_maxrss (first repeat only)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--busy", action="store_true", help="only the busy machine (default: quiet and busy)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, tuple(int(x) for x in args.shape.split(",")), args.repeats)
    sizes = SIZES["quick" if args.quick else "full"]
    conditions = [("busy", True)] if args.busy else [("quiet", False), ("busy", True)]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, load average {load}; median and min of {args.repeats} repeats; "
          f"extra = peak RSS during the call minus RSS before it")
    results = [bench(name, busy, sizes, args.repeats) for name, busy in conditions]
    print_table(results, sizes)


if __name__ == "__main__":
    main()
