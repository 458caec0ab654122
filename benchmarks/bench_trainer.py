"""Peak memory of transformers' `Trainer.evaluate` with the metric's Trainer functions.

A 2-layer, 64-wide GPT-2 with SmolLM2's 49,152-token vocabulary (so logits dominate memory)
over real WikiText-2 test paragraphs (BOS + at most 128 tokens each), right-padded by a
collator with labels -100 at padding. Each method runs in its own process; its extra peak
memory is VmHWM after `Trainer.evaluate` minus VmHWM just before it (the peak reset by
writing 5 to /proc/self/clear_refs once the model, data and Trainer are built):
  floor   Trainer.evaluate without compute_metrics: Trainer's loop without metrics (loss only)
  ours    preprocess_logits_for_metrics + compute_metrics from perplexity_metric
  naive   compute_metrics receiving the full logits (Trainer keeps every batch's logits, padded
          to the longest batch) and computing perplexity from them
Then exp(eval_loss) against eval_perplexity at several eval batch sizes (one process).

    python benchmarks/bench_trainer.py [--paragraphs 48] [--batch-size 8]
Goal: ours within 1.1x of the floor's extra memory.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

import bench_memory  # also puts the repository on sys.path
from bench_memory import WIKITEXT, _hwm_mb, _reset_peak, cpu_name

MAX_TOKENS = 128


def build(paragraphs):
    """The model (random weights, seed 0), its dataset and the padding collator."""
    import torch
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel

    from ppl_corpus import split_paragraphs
    from ppl_sources import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    texts = split_paragraphs(WIKITEXT.read_text(encoding="utf-8"))[:paragraphs]
    sequences = [[tokenizer.bos_token_id] + s[:MAX_TOKENS] for s in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=len(tokenizer), n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    collate = DataCollatorForLanguageModeling(tokenizer, mlm=False)  # right padding, labels -100 at padding
    return model, [{"input_ids": s} for s in sequences], collate


def naive_compute_metrics(eval_pred):
    """What a compute_metrics over full logits does: shift, log-softmax, mean over labelled tokens."""
    import torch
    import torch.nn.functional as F

    logits = torch.from_numpy(eval_pred.predictions)  # (sequences, longest, vocab), padded with -100
    labels = torch.from_numpy(eval_pred.label_ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return {"perplexity": math.exp(loss.item())}


def trainer_for(model, dataset, collate, method, batch_size, out):
    from transformers import Trainer, TrainingArguments

    from perplexity_metric import compute_metrics, preprocess_logits_for_metrics

    args = TrainingArguments(output_dir=out, per_device_eval_batch_size=batch_size, report_to=[], use_cpu=True, disable_tqdm=True)
    extra = {
        "floor": {},
        "ours": {"preprocess_logits_for_metrics": preprocess_logits_for_metrics, "compute_metrics": compute_metrics},
        "naive": {"compute_metrics": naive_compute_metrics},
    }[method]
    return Trainer(model=model, args=args, eval_dataset=dataset, data_collator=collate, **extra)


def run_one(method, paragraphs, batch_size):
    """In a child: build everything, reset the peak, evaluate, report seconds and extra MB."""
    import torch
    import transformers

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    transformers.logging.set_verbosity_error()
    model, dataset, collate = build(paragraphs)
    with tempfile.TemporaryDirectory() as out:
        if method == "loss-vs-ppl":
            rows = {}
            for bs in (1, 4, 16, 48):
                r = trainer_for(model, dataset, collate, "ours", bs, out).evaluate()
                rows[bs] = {"exp_loss": math.exp(r["eval_loss"]), "ppl": r["eval_perplexity"], "tokens": r["eval_num_tokens"]}
            return rows
        trainer = trainer_for(model, dataset, collate, method, batch_size, out)
        _reset_peak()
        base = _hwm_mb()
        started = time.perf_counter()
        result = trainer.evaluate()
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "extra_mb": _hwm_mb() - base, "perplexity": result.get("eval_perplexity"),
            "sequences": len(dataset), "longest": max(len(d["input_ids"]) for d in dataset)}


def measure(*args):
    return bench_memory.measure(*args, script=__file__)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paragraphs", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(*json.loads(args.child))))
        return
    if not WIKITEXT.is_file():
        sys.exit(f"skipped: {WIKITEXT} is absent (WikiText-2 lives in ../shared, beside the repository)")
    import transformers

    print(f"{cpu_name()}; {os.environ.get('BENCH_THREADS', '2')} threads; transformers {transformers.__version__}")
    r = {m: measure(m, args.paragraphs, args.batch_size) for m in ("floor", "ours", "naive")}
    first = r["floor"]
    print(f"GPT-2 2x64, vocab 49,152, {first['sequences']} WikiText-2 paragraphs (BOS + <= {MAX_TOKENS} tokens, "
          f"longest {first['longest']}), eval batch size {args.batch_size}:")
    print(f"{'method':<8}{'seconds':>9}{'extra MB':>10}{'vs floor':>10}  eval_perplexity")
    for m, v in r.items():
        ppl = "-" if v["perplexity"] is None else f"{v['perplexity']:.6f}"
        print(f"{m:<8}{v['seconds']:>9.2f}{v['extra_mb']:>10.0f}{v['extra_mb'] / first['extra_mb']:>9.2f}x  {ppl}")
    print(f"ours / floor = {r['ours']['extra_mb'] / first['extra_mb']:.2f}x (goal <= 1.1x); "
          f"naive / ours = {r['naive']['extra_mb'] / r['ours']['extra_mb']:.2f}x")
    rows = measure("loss-vs-ppl", args.paragraphs, args.batch_size)
    print("\nexp(eval_loss) against eval_perplexity (same runs):")
    print(f"{'batch':>6}{'eval_perplexity':>20}{'exp(eval_loss)':>16}{'off by':>9}")
    for bs, v in rows.items():
        print(f"{bs:>6}{v['ppl']:>20.9f}{v['exp_loss']:>16.3f}{v['exp_loss'] / v['ppl'] - 1:>+9.2%}")
    values = [v["ppl"] for v in rows.values()]
    print(f"eval_perplexity spread across batch sizes: {max(values) / min(values) - 1:.1e} relative")


if __name__ == "__main__":
    main()
