"""Model-runner benchmark on WikiText-2 paragraphs with the embedded SmolLM2-135M.

Measured in one run, each method in its own process (so peak memory is its own):
  floor  bare `model(input_ids)` forward passes over the same windows, one at a time, no padding
  naive  evaluate's "perplexity" algorithm: the whole corpus padded to its longest text,
         batches of 16, full logits, cross-entropy per text
  ours   ppl_runner.evaluate_texts (length-sorted batches under a token budget, logits only
         where scored, chunked log-prob gather)
Then ours alone on the same paragraphs repeated twice and four times: the corpus grows while
its longest text (which sets the largest batch) stays, so peak memory should stay flat.

    python benchmarks/bench_runner.py [--paragraphs 48] [--repeat 1]
Goals: ours <= 1.15x the floor, >= 2x faster than naive, peak memory flat as the corpus grows.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.test.tokens"
sys.path.insert(0, str(ROOT))


def corpus(n, copies=1):
    """The first `n` paragraphs, `copies` times over (a larger corpus with the same longest text)."""
    from ppl_corpus import split_paragraphs

    return split_paragraphs(WIKITEXT.read_text(encoding="utf-8"))[:n] * copies


def floor(model, tokenizer, texts):
    import torch

    from ppl_runner import plan_windows

    max_length = model.config.max_position_embeddings
    for text in texts:
        seq = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        for start, stop, _ in plan_windows(len(seq), max_length, max_length):
            with torch.inference_mode():
                model(torch.tensor([seq[start:stop]]))
    return None


def naive(model, tokenizer, texts, batch_size=16):
    """evaluate's perplexity metric, reduced to its algorithm (start token, pad to the corpus's longest)."""
    import torch

    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt", return_attention_mask=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    ppls = []
    for start in range(0, len(ids), batch_size):
        batch, attn = ids[start : start + batch_size], mask[start : start + batch_size]
        bos = torch.full((batch.shape[0], 1), tokenizer.bos_token_id)
        batch = torch.cat([bos, batch], dim=1)
        attn = torch.cat([torch.ones_like(bos), attn], dim=1)
        with torch.no_grad():
            logits = model(batch, attention_mask=attn).logits
        shift_logits, shift_labels, shift_mask = logits[..., :-1, :], batch[..., 1:], attn[..., 1:]
        nll = (loss_fn(shift_logits.transpose(1, 2), shift_labels) * shift_mask).sum(1) / shift_mask.sum(1)
        ppls += torch.exp(nll).tolist()
    return sum(ppls) / len(ppls)


def ours(model, tokenizer, texts):
    from ppl_runner import evaluate_texts

    return evaluate_texts(model, tokenizer, texts, batch_size=16, progress=False)["perplexity"]


def child(method, n, copies):
    import torch

    from ppl_sources import load_model

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, tokenizer = load_model(device="cpu")
    texts = corpus(n, copies)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    value = {"floor": floor, "naive": naive, "ours": ours}[method](model, tokenizer, texts)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "extra_mb": (peak - rss_before) / 1024,
                      "tokens": tokens, "texts": len(texts), "value": value}))


def measure(method, n, repeat, copies=1):
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, __file__, "--child", method, str(n), str(copies)], capture_output=True, text=True,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"), check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda r: r["seconds"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paragraphs", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the fastest counts")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), int(args.child[2]))
    if not WIKITEXT.is_file():
        sys.exit(f"skipped: {WIKITEXT} is absent (WikiText-2 lives in ../shared, beside the repository)")
    n = args.paragraphs
    results = {m: measure(m, n, args.repeat) for m in ("floor", "naive", "ours")}
    lengths = [len(t) for t in corpus(n)]
    print(f"WikiText-2 test, first {n} paragraphs: {results['ours']['tokens']:,} tokens, "
          f"{min(lengths)}-{max(lengths)} characters each; SmolLM2-135M, CPU, {os.environ.get('BENCH_THREADS', '2')} threads")
    print(f"{'method':<8}{'seconds':>10}{'tokens/s':>10}{'peak MB':>10}{'extra MB':>10}")
    for name, r in results.items():
        print(f"{name:<8}{r['seconds']:>10.2f}{r['tokens'] / r['seconds']:>10.0f}{r['peak_mb']:>10.0f}{r['extra_mb']:>10.0f}")
    f, nv, o = (results[m]["seconds"] for m in ("floor", "naive", "ours"))
    print(f"ours / floor  = {o / f:.2f}x   (goal <= 1.15x)")
    print(f"naive / ours  = {nv / o:.2f}x   (goal >= 2x)")
    print(f"naive mean per-text perplexity {results['naive']['value']:.3f}; ours corpus perplexity {results['ours']['value']:.3f}")
    print("peak memory of ours as the corpus grows:")
    for copies in (1, 2, 4):  # the same paragraphs repeated: only the corpus grows, not its longest text
        r = results["ours"] if copies == 1 else measure("ours", n, 1, copies)
        print(f"  {copies} x {n} paragraphs {r['tokens']:>8,} tokens   peak {r['peak_mb']:7.0f} MB   extra {r['extra_mb']:6.0f} MB")


if __name__ == "__main__":
    main()
