"""Command line: score a corpus with a causal LM and report its perplexity.

    python ppl_cli.py                       # embedded SmolLM2-135M on the default corpus, offline
    python ppl_cli.py --model gpt2 --corpus notes.txt --max-length 512 --stride 256 --json out.json

Every number comes from the library (`ppl_runner.evaluate_texts`); this file only parses
arguments, reads inputs and prints.
"""

import argparse
import json
import sys
import time

from ppl_card import update_model_card
from ppl_runner import evaluate_texts, resolve_settings
from ppl_corpus import DEFAULT_CORPUS, read_corpus
from ppl_sources import DEFAULT_MODEL, load_model

DEFAULT_LIMIT = 16  # documents of the default corpus scored when no --limit is given (about 25 s on 2 CPU cores)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="ppl_cli.py", description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--model", help=f"Hub id or local folder (default: the embedded {DEFAULT_MODEL})")
    model.add_argument("--gguf-file", help="GGUF file inside --model, or a path to a GGUF file")
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default)")
    model.add_argument("--dtype", default="auto", help="float32, bfloat16, float16, float64 or auto (default)")
    model.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model (off by default)")
    data = parser.add_argument_group("corpus")
    data.add_argument("--corpus", default=DEFAULT_CORPUS,
                      help="'pydoc' (the standard library's documentation topics, default), a .txt/.md file "
                           "(blank-line-separated paragraphs), .jsonl, .json, .parquet, .csv, or a datasets name")
    data.add_argument("--text-field", default="text", help="column or key holding the text (default: text)")
    data.add_argument("--split", default="test", help="split of a datasets corpus (default: test)")
    data.add_argument("--dataset-config", help="configuration of a datasets corpus")
    data.add_argument("--limit", type=int, help=f"score only the first N documents (default: {DEFAULT_LIMIT} "
                                                "for the default corpus, all otherwise; 0 = all)")
    run = parser.add_argument_group("scoring")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--max-length", type=int, help="window length in tokens (default: the model's context)")
    run.add_argument("--stride", type=int, help="tokens a window advances (default: max-length)")
    run.add_argument("--max-batch-tokens", type=int,
                     help="most padded tokens per forward pass (default: 64 per batch item on CPU, up to 256 elsewhere)")
    run.add_argument("--no-start-token", action="store_true", help="do not prepend BOS/EOS (the first token is then unscored)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="also write the result (with per-document perplexities) as JSON")
    out.add_argument("--model-card", metavar="PATH", help="record the result in this model card (README.md or its folder)")
    out.add_argument("--card-model-name", help="model-index name (default: the model's name)")
    out.add_argument("--card-dataset-name", help="data set name in the card (default: the corpus)")
    out.add_argument("--card-dataset-type", help="data set type, e.g. a Hub id (default: the corpus)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def format_report(result, *, model_name, corpus_name, seconds, windows):
    interval = result["perplexity_ci"]
    spread = f"95% CI {interval[0]:.4f} - {interval[1]:.4f}, bootstrap over documents" if interval else "one document: no interval"
    rows = [
        ("Model", model_name),
        ("Corpus", corpus_name),
        ("Windows", windows),
        ("Perplexity", f"{result['perplexity']:.4f}   ({spread})"),
        ("NLL", f"{result['nll']:.4f} nats/token"),
        ("Bits per token", f"{result['bits_per_token']:.4f}"),
        ("Word perplexity", f"{result['word_perplexity']:.4f}"),
        ("Byte perplexity", f"{result['byte_perplexity']:.4f}"),
        ("Bits per byte", f"{result['bits_per_byte']:.4f}"),
        ("Mean per-doc ppl", f"{result['mean_perplexity']:.4f}   (unweighted, as evaluate's perplexity metric)"),
        ("Tokens", f"{result['num_tokens']:,}"),
        ("Documents", f"{result['num_documents']:,}"),
        ("Time", f"{seconds:.1f} s   ({result['num_tokens'] / seconds:,.0f} tokens/s)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv=None):
    args = parse_args(argv)
    try:
        texts = read_corpus(args.corpus, text_field=args.text_field, split=args.split, config=args.dataset_config)
        limit = args.limit if args.limit is not None else (DEFAULT_LIMIT if args.corpus == DEFAULT_CORPUS else 0)
        if limit < 0:
            raise ValueError(f"Expected --limit >= 0, but got {limit}.")
        total = len(texts)
        texts = texts[:limit] if limit else texts
        model, tokenizer = load_model(args.model, gguf_file=args.gguf_file, device=args.device, dtype=args.dtype,
                                      trust_remote_code=args.trust_remote_code)
        options = dict(batch_size=args.batch_size, max_length=args.max_length, stride=args.stride,
                       max_batch_tokens=args.max_batch_tokens, add_start_token=not args.no_start_token)
        settings = resolve_settings(model, tokenizer, **options)
        started = time.perf_counter()
        result = evaluate_texts(model, tokenizer, texts, progress=not args.quiet, **options)
        seconds = time.perf_counter() - started
        model_name = args.model or args.gguf_file or DEFAULT_MODEL
        corpus_name = f"{args.corpus}: {len(texts)} of {total} documents"
        start = tokenizer.convert_ids_to_tokens(settings["start_token_id"]) if settings["start_token_id"] is not None else "none"
        windows = f"max_length={settings['max_length']},stride={settings['stride']},start_token={start}"
        print(format_report(result, model_name=model_name, corpus_name=corpus_name, seconds=seconds, windows=windows))
        result.update(model=model_name, corpus=args.corpus, seconds=seconds, dtype=str(next(model.parameters()).dtype),
                      settings=settings)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
        if args.model_card:
            path = update_model_card(args.model_card, result, model_name=args.card_model_name or model_name,
                                     dataset_type=args.card_dataset_type or args.corpus,
                                     dataset_name=args.card_dataset_name or args.corpus,
                                     dataset_split=args.split if args.corpus != DEFAULT_CORPUS else None,
                                     dataset_config=args.dataset_config, metric_config=windows)
            print(f"Model card updated: {path}")
    except (ValueError, TypeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
