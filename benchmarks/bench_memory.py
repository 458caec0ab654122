"""Memory and speed of the fused, chunked head (`ppl_head`) against bare forward passes.

Each measurement runs in its own process; extra peak memory is read from VmHWM after the
model is loaded and the peak reset (writing 5 to /proc/self/clear_refs), so it is what the
scoring itself added. Methods, on one long text of real English (WikiText-2 articles joined):
  floor      a forward that keeps one position's logits (`logits_to_keep=1`): the model's own
             activations, the least any scorer can need
  full       a bare forward returning every position's logits, then cross-entropy
  fused      ppl_runner.score_texts at default settings (the fused head)
  logits     ppl_runner.score_texts with head="logits" (the model's own logits, chunked NLL)
Also: the extra memory of fused and logits at 1k/2k/4k/8k-token windows (the vocabulary
term is flat with the fused head); tokens/s of a small model with a large vocabulary (GPT-2,
2 layers, 64 wide, SmolLM2's 49,152 tokens) against bare full-logits forward passes over the
same batches; and SmolLM2 in bfloat16 against float32 (tokens/s and the change in perplexity).

    python benchmarks/bench_memory.py [--tokens 8000]
Goals: fused memory <= 1.25x the floor, fused time <= 1.1x the full-logits forward.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.test.tokens"
sys.path.insert(0, str(ROOT))


def _hwm_mb():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def long_ids(tokenizer, n):
    from ppl_corpus import iter_documents

    text = "\n".join(d.text for d in iter_documents(str(WIKITEXT), limit=12))
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= n + 1, f"need {n + 1} tokens, the first articles hold {len(ids)}"
    return ids[: n + 1]


def paragraphs(n):
    from ppl_corpus import split_paragraphs

    return split_paragraphs(WIKITEXT.read_text(encoding="utf-8"))[:n]


def run_one(method, tokens, dtype="float32"):
    """Runs in a child: load the model, reset the peak, score, report seconds and extra MB."""
    import torch
    import torch.nn.functional as F

    from ppl_runner import evaluate_texts, score_texts
    from ppl_sources import load_model

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if method.startswith("small"):
        return run_small(method)
    model, tokenizer = load_model(device="cpu", dtype=dtype)
    if method == "dtype":
        texts = paragraphs(40)
        started = time.perf_counter()
        result = evaluate_texts(model, tokenizer, texts, progress=False)
        return {"seconds": time.perf_counter() - started, "tokens": result["num_tokens"], "value": result["perplexity"]}
    ids = long_ids(tokenizer, tokens)
    text = tokenizer.decode(ids[1:])
    _reset_peak()
    base = _hwm_mb()
    started = time.perf_counter()
    with torch.inference_mode():
        inputs = torch.tensor([ids[:-1]])
        if method == "floor":
            model(inputs, logits_to_keep=1)
        elif method == "full":
            logits = model(inputs).logits[0]
            F.cross_entropy(logits.float(), torch.tensor(ids[1:]))
            del logits
    if method in ("fused", "logits"):
        list(score_texts(model, tokenizer, [text], head="auto" if method == "fused" else "logits", progress=False))
    return {"seconds": time.perf_counter() - started, "extra_mb": _hwm_mb() - base, "tokens": tokens}


def run_small(method):
    """A 2-layer, 64-wide GPT-2 with a 49,152-token vocabulary over real paragraphs."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from ppl_runner import pack_batches, plan_windows, resolve_settings, score_texts
    from ppl_sources import default_model_dir

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=len(tokenizer), n_positions=1024,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    texts = paragraphs(600)
    settings = resolve_settings(model, tokenizer, max_length=1024)
    started = time.perf_counter()
    if method == "small-ours":
        n = sum(len(lp) for b in score_texts(model, tokenizer, texts, max_length=1024, progress=False) for lp in b["predictions"])
    else:  # the same windows and batches, each a bare forward with full logits, then cross-entropy
        seqs = [[tokenizer.bos_token_id] + s for s in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        windows = [(t, *w) for t, s in enumerate(seqs) for w in plan_windows(len(s), 1024, 1024)]
        n = 0
        for batch in pack_batches([b - a for _, a, b, _ in windows], settings["batch_size"], settings["max_batch_tokens"]):
            width = max(windows[i][2] - windows[i][1] for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                t, a, b, _ = windows[i]
                ids[row, : b - a], attention[row, : b - a] = torch.tensor(seqs[t][a:b]), 1
                labels[row, : b - a] = torch.tensor(seqs[t][a + 1 : b + 1])
            with torch.inference_mode():
                logits = model(ids, attention_mask=attention).logits  # (batch, width, 49152)
                F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
            n += int((labels != -100).sum())
    return {"seconds": time.perf_counter() - started, "tokens": n}


def measure(*args, script=__file__):
    """`script --child ARGS` in its own process (so its peak memory is its own); its last line, parsed."""
    out = subprocess.run([sys.executable, script, "--child", json.dumps(args)], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if out.returncode:
        sys.exit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_name():
    import torch

    with open("/proc/cpuinfo") as f:
        model = re.search(r"model name\s*:\s*(.*)", f.read())
    return f"{model.group(1) if model else 'unknown CPU'}, capability {torch.backends.cpu.get_cpu_capability()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(*json.loads(args.child))))
        return
    if not WIKITEXT.is_file():
        sys.exit(f"skipped: {WIKITEXT} is absent (WikiText-2 lives in ../shared, beside the repository)")
    print(f"{cpu_name()}; {os.environ.get('BENCH_THREADS', '2')} threads; SmolLM2-135M float32")
    n = args.tokens
    r = {m: measure(m, n) for m in ("floor", "full", "fused", "logits")}
    print(f"\nOne {n:,}-token text (one window):")
    print(f"{'method':<8}{'seconds':>9}{'extra MB':>10}")
    for m, v in r.items():
        print(f"{m:<8}{v['seconds']:>9.2f}{v['extra_mb']:>10.0f}")
    print(f"fused memory / floor = {r['fused']['extra_mb'] / r['floor']['extra_mb']:.2f}x (goal <= 1.25x); "
          f"fused time / full-logits forward = {r['fused']['seconds'] / r['full']['seconds']:.2f}x (goal <= 1.1x); "
          f"full-logits memory / fused = {r['full']['extra_mb'] / r['fused']['extra_mb']:.2f}x")
    print("\nExtra MB by window length (the fused head's memory has no window x vocabulary term):")
    print(f"{'tokens':>8}{'fused':>9}{'logits':>9}{'floor':>9}")
    for k in (1000, 2000, 4000):
        f, lo, fl = (measure(m, k)["extra_mb"] for m in ("fused", "logits", "floor"))
        print(f"{k:>8,}{f:>9.0f}{lo:>9.0f}{fl:>9.0f}")
    print(f"{n:>8,}{r['fused']['extra_mb']:>9.0f}{r['logits']['extra_mb']:>9.0f}{r['floor']['extra_mb']:>9.0f}")
    ours, bare = measure("small-ours", 0), measure("small-bare", 0)
    print(f"\nSmall model, large vocabulary (GPT-2 2x64, 49,152 tokens), 600 WikiText-2 paragraphs: ours "
          f"{ours['tokens'] / ours['seconds']:,.0f} tokens/s, bare full-logits forward {bare['tokens'] / bare['seconds']:,.0f} "
          f"tokens/s ({bare['seconds'] / ours['seconds']:.2f}x)")
    f32, bf16 = measure("dtype", 0, "float32"), measure("dtype", 0, "bfloat16")
    print(f"\nSmolLM2 on 40 WikiText-2 paragraphs ({f32['tokens']:,} tokens): float32 {f32['tokens'] / f32['seconds']:,.0f} "
          f"tokens/s, bfloat16 {bf16['tokens'] / bf16['seconds']:,.0f} tokens/s ({f32['seconds'] / bf16['seconds']:.2f}x); "
          f"perplexity {f32['value']:.4f} -> {bf16['value']:.4f} ({bf16['value'] / f32['value'] - 1:+.4%})")


if __name__ == "__main__":
    main()
