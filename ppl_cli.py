"""Command line: score a corpus with a causal LM and report its perplexity.

    python ppl_cli.py                       # embedded SmolLM2-135M on the default corpus, offline
    python ppl_cli.py --model gpt2 --corpus notes.txt --max-length 512 --stride 256 --json out.json
    python ppl_cli.py --corpus crawl.jsonl --docs-out scores/ [--resume]     # per-document Parquet
    python ppl_cli.py --quantize dynamic-int8 --reference-dtype float32      # against the float original
    python ppl_cli.py --model base --save-reference base.parquet             # the reference alone, once
    python ppl_cli.py --model tuned --reference-file base.parquet            # then compare without loading it
    torchrun --nproc_per_node 8 ppl_cli.py --corpus crawl.parquet --docs-out scores/

The corpus is streamed: each process reads only its own share (documents i with
i mod world_size == rank; Parquet row groups g mod world_size == rank). Every number comes
from the library (`ppl_runner.score_documents`, pooled by `ppl_runner.pool_rows`); this file
only parses arguments, reads inputs and prints. Under torchrun or `accelerate launch` (found
from the environment) rank 0 prints the report and writes the outputs.
"""

import argparse
import collections
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from ppl_card import read_model_card, update_model_card
from ppl_corpus import DEFAULT_CORPUS, content_digests, corpus_fingerprint, corpus_kind, iter_documents
from ppl_dist import DEFAULT_TIMEOUT, DistributedScoringError, barrier, distributed_session, gather_payloads
from ppl_docs import PartWriter, hold, prepare, read_rows, write_manifest
from ppl_outputs import atomic_write_text, card_file, check_outputs
from ppl_compare import ModelReference, SavedReference
from ppl_inputs import BAD_ROWS, SKIPPED
from ppl_runner import pool_rows, reference_recorder, resolve_settings, save_reference, score_documents
from ppl_sources import MODEL_FILE_SUFFIXES, int8_label, load_model, model_location, model_name, quantize_dynamic_int8
from ppl_tokens import TOKEN_COLUMNS, WORD_COLUMNS, TableWriter, document_token_rows, word_rows

DEFAULT_LIMIT = 16  # documents of the default corpus scored when no --limit is given (about 25 s on 2 CPU cores)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="ppl_cli.py", description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="Hub id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    model.add_argument("--gguf-file", help="GGUF file inside --model, or a path to a GGUF file")
    model.add_argument("--device", help="cpu, cuda, cuda:1, mps or auto (default; under torchrun: cuda:LOCAL_RANK or cpu)")
    model.add_argument("--dtype", default="auto", help="float32 (default on CPU), bfloat16, float16, float64 or auto")
    model.add_argument("--device-map", help="accelerate's placement for models larger than one device, e.g. auto "
                                            "(instead of --device)")
    model.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model (off by default)")
    model.add_argument("--quantize", choices=["dynamic-int8"],
                       help="score torch's dynamic int8 quantization of the model (CPU, float32 models); its activations "
                            "are quantized per batch, so its numbers move with what shares a batch: --batch-size 1 for "
                            "numbers that do not")
    ref = parser.add_argument_group("comparison with a reference model (KL divergence, top-1 agreement, paired ratio)")
    ref.add_argument("--reference-model", help="Hub id or local folder of the reference (default: --model's checkpoint)")
    ref.add_argument("--reference-gguf-file", help="GGUF file of the reference (inside --reference-model, or a path)")
    ref.add_argument("--reference-dtype", help="the reference's dtype (default: auto); with neither option above, "
                                               "compares the model with its own checkpoint in this dtype")
    ref.add_argument("--reference-file", metavar="PATH", help="compare with a file written by --save-reference "
                                                              "(the reference model is not loaded)")
    ref.add_argument("--save-reference", metavar="PATH",
                     help="score only the reference (--reference-* if given, else --model) and write, per scored token, its "
                          "top-k log-probs and tokens sampled from the rest (.parquet) for later --reference-file runs")
    ref.add_argument("--save-top-k", type=int, default=32, help="log-probs kept per token by --save-reference (default: 32)")
    ref.add_argument("--save-samples", type=int, default=32, help="tail tokens sampled per token (default: 32)")
    data = parser.add_argument_group("corpus (streamed)")
    data.add_argument("--corpus", default=DEFAULT_CORPUS,
                      help="'pydoc' (the standard library's documentation topics, default), a .txt/.md/.tokens file "
                           "(blank-line-separated paragraphs; WikiText files: one document per article), .jsonl, .json, "
                           ".parquet, .csv, a local data folder or a datasets name")
    data.add_argument("--text-field", default="text", help="column or key holding the text (default: text)")
    data.add_argument("--id-field", help="column or key carried to --docs-out as `id` (default: the document's index)")
    data.add_argument("--split", default="test", help="split of a datasets corpus (default: test)")
    data.add_argument("--dataset-config", help="configuration of a datasets corpus")
    data.add_argument("--bad-rows", choices=BAD_ROWS, default="flag",
                      help="a row that cannot be scored (not a string, not valid Unicode, no token to score): flag it in "
                           "the `error` column and go on (default), or fail the run naming it; empty rows are skipped")
    data.add_argument("--limit", type=int, help=f"read only the first N documents (default: {DEFAULT_LIMIT} "
                                                "for the default corpus, all otherwise; 0 = all)")
    run = parser.add_argument_group("scoring")
    run.add_argument("--batch-size", type=int, default=16)
    run.add_argument("--max-length", type=int, help="window length in tokens (default: the model's context)")
    run.add_argument("--stride", type=int, help="tokens a window advances (default: max-length)")
    run.add_argument("--max-batch-tokens", type=int,
                     help="most padded tokens per forward pass (default: what a quarter of the free RAM, or 70%% of the "
                          "free GPU memory, holds, at most batch-size full windows)")
    run.add_argument("--no-start-token", action="store_true", help="do not prepend BOS/EOS (the first token is then unscored)")
    run.add_argument("--bootstrap-resamples", type=int, default=1000, help="resamples for the interval (default: 1000)")
    procs = parser.add_argument_group("several processes (torchrun / accelerate launch)")
    procs.add_argument("--backend", choices=["gloo", "nccl"], help="default: nccl when CUDA is available, else gloo")
    procs.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT.total_seconds(),
                       help="seconds to wait for peers to join, and for the others once a rank is done (default: 1800)")
    cluster = parser.add_argument_group("Ray cluster (--engine ray; pip install -r requirements-ray.txt)")
    cluster.add_argument("--engine", choices=["local", "ray"], default="local",
                         help="local: this process (or torchrun's ranks); ray: a Ray Data job over Parquet/JSON Lines/CSV files")
    cluster.add_argument("--ray-address", help="join this running cluster (default: $RAY_ADDRESS, else a local one for the run)")
    cluster.add_argument("--workers", type=int, default=1, help="scoring actors, each with its own model (default: 1)")
    cluster.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (default: 0, CPU)")
    out = parser.add_argument_group("output")
    out.add_argument("--docs-out", metavar="DIR", help="write per-document results as Parquet parts while scoring")
    out.add_argument("--resume", action="store_true", help="continue the --docs-out folder of a run that stopped")
    out.add_argument("--tokens-out", metavar="PATH", help="per-token surprisal rows (.parquet, .csv or .jsonl), written as it goes")
    out.add_argument("--words-out", metavar="PATH", help="per-word surprisal rows (.parquet, .csv or .jsonl), written as it goes")
    out.add_argument("--json", metavar="PATH", help="also write the result as JSON ('-': to stdout, instead of the report)")
    out.add_argument("--model-card", metavar="PATH", help="record the result in this model card (README.md or its folder)")
    out.add_argument("--card-model-name", help="model-index name (default: the model's name)")
    out.add_argument("--card-dataset-name", help="data set name in the card (default: the corpus)")
    out.add_argument("--card-dataset-type", help="data set type, e.g. a Hub id (default: the corpus)")
    out.add_argument("--force", action="store_true", help="replace an existing --json, --tokens-out or --words-out file "
                     "(never an input of the run; --save-reference and --docs-out are never replaced)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    out.add_argument("--debug", action="store_true", help="show the traceback of an error (for bug reports)")
    return parser.parse_args(argv)


def format_report(result, *, model_name, corpus_name, seconds, windows, notes=()):
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
        *notes,
        ("Time", f"{seconds:.1f} s   ({result['num_tokens'] / seconds:,.0f} tokens/s)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv=None):
    args = parse_args(argv)
    if args.quiet:  # also transformers' own bars (loading weights)
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    rank = os.environ.get("RANK")
    try:
        with distributed_session(timeout=args.timeout, backend=args.backend) as ctx, ExitStack() as held:
            run(args, ctx, held)
    except (DistributedScoringError, ValueError, TypeError, OSError) as err:
        if args.debug:
            raise
        print(f"error{'' if rank is None else f' (rank {rank})'}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        kept = (f"the documents scored so far are in {args.docs_out}: run the same command with --resume to continue"
                if args.docs_out else "no result was written")
        print(f"interrupted: {kept}.", file=sys.stderr)
        return 130
    if ctx["world_size"] > 1:
        print(f"ppl_cli: rank {ctx['rank']} of {ctx['world_size']} done", file=sys.stderr)
    return 0


def run(args, ctx, held):
    """Score this rank's share, gather the rows on rank 0, pool, report. Returns the result on rank 0.
    `held` (an ExitStack) keeps the --docs-out folder's lock until the run ends."""
    rank, world_size = ctx["rank"], ctx["world_size"]
    limit = args.limit if args.limit is not None else (DEFAULT_LIMIT if args.corpus == DEFAULT_CORPUS else 0)
    if limit < 0:
        raise ValueError(f"Expected --limit >= 0, but got {limit}.")
    loads_reference = any(v is not None for v in (args.reference_model, args.reference_gguf_file, args.reference_dtype))
    surprisal_paths = _surprisal_paths(args, rank, world_size)
    _check_outputs(args, surprisal_paths, rank)  # before anything loads: never an input, never overwritten
    if args.engine == "ray":  # Ray schedules the actors; this process is the driver
        if loads_reference or args.reference_file or args.save_reference or args.quantize:
            raise ValueError("A comparison with a reference (and --quantize) runs with --engine local (one process or "
                             "torchrun), not on Ray.")
        from ppl_ray import run_cli

        if args.docs_out:  # a second run into the same folder is refused while this one writes
            held.callback(hold(args.docs_out).release)
        return run_cli(args, limit=limit, report=_report, write_outputs=_write_outputs)
    if args.resume and not args.docs_out:
        raise ValueError("--resume continues a --docs-out folder: give --docs-out DIR too.")
    corpus_kind(args.corpus)  # a missing file fails now, before the model loads
    corpus = dict(source=args.corpus, text_field=args.text_field, id_field=args.id_field, split=args.split,
                  config=args.dataset_config)
    _check_comparison(args, loads_reference, world_size)
    device = args.device or (None if args.device_map else ctx["device"])
    if not (args.save_reference and loads_reference):  # else only the reference is scored
        model, tokenizer = load_model(args.model, gguf_file=args.gguf_file, device=device, dtype=args.dtype,
                                      trust_remote_code=args.trust_remote_code, device_map=args.device_map)
        name = model_name(args.model, args.gguf_file)
        if args.quantize:
            model, name = quantize_dynamic_int8(model), f"{name} ({int8_label(model)})"
    compare, reference_name, scored_files = None, None, (args.model, args.gguf_file)
    if loads_reference:  # by default the model's own checkpoint (e.g. in another dtype)
        same = args.reference_model is None and args.reference_gguf_file is None
        ref_id, ref_gguf = (args.model, args.gguf_file) if same else (args.reference_model, args.reference_gguf_file)
        reference, reference_tokenizer = load_model(ref_id, gguf_file=ref_gguf, device=device, dtype=args.reference_dtype or "auto",
                                                    trust_remote_code=args.trust_remote_code, device_map=args.device_map)
        reference_name = model_name(ref_id, ref_gguf) + (f" ({args.reference_dtype})" if args.reference_dtype else "")
        if args.save_reference:  # the reference is the model this run scores
            model, tokenizer, name = reference, reference_tokenizer, reference_name
            scored_files = (ref_id, ref_gguf)
        else:
            compare = ModelReference(reference, reference_tokenizer, name="--reference-model")
    elif args.reference_file:
        compare = SavedReference(args.reference_file)
        compare.check_corpus(_corpus_meta(corpus, limit))
        reference_name = f"{args.reference_file} ({compare.meta.get('model', 'unnamed model')})"
    if args.save_reference:  # what the saved file keeps per token: resolved with the settings
        compare = reference_recorder(args.save_top_k, args.save_samples)
    # resolved once, here: what the report shows is what the scorer (and the reference) runs
    settings = resolve_settings(model, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                                stride=args.stride, max_batch_tokens=args.max_batch_tokens,
                                add_start_token=not args.no_start_token, compare=compare)
    options = {"settings": settings}
    if compare is not None and not args.save_reference:
        options["compare"] = compare
    start = tokenizer.convert_ids_to_tokens(settings["start_token_id"]) if settings["start_token_id"] is not None else "none"
    windows = f"max_length={settings['max_length']},stride={settings['stride']},start_token={start}"

    done, first_part = set(), 0
    if args.docs_out:
        manifest = {"corpus": args.corpus if isinstance(args.corpus, str) else str(args.corpus),
                    "corpus_fingerprint": corpus_fingerprint(**corpus), "model": name,
                    "corpus_files": content_digests(args.corpus) if corpus_kind(args.corpus) != "pydoc" else {},
                    "model_files": content_digests(model_location(*scored_files), MODEL_FILE_SUFFIXES, recursive=False),
                    "dtype": str(next(model.parameters()).dtype), "windows": windows}
        if reference_name:  # a saved reference by what it holds, not where it lies
            manifest["reference"] = compare.identity() if args.reference_file else reference_name
        if isinstance(compare, ModelReference):  # its weights decide the KL columns as the model's decide the rest
            manifest["reference_files"] = content_digests(model_location(ref_id, ref_gguf), MODEL_FILE_SUFFIXES, recursive=False)
        held.callback(hold(args.docs_out, rank).release)  # a second run on the folder is refused while this one writes
        done, first_part = prepare(args.docs_out, manifest, resume=args.resume, rank=rank)  # every rank checks first
        barrier(ctx, timeout=args.timeout)
        if rank == 0:
            write_manifest(args.docs_out, manifest)

    counts = {"resumed": 0}

    def todo():  # this rank's documents that still need scoring (the scorer skips or flags what it cannot score)
        for doc in iter_documents(**corpus, limit=limit, rank=rank, world_size=world_size):
            if doc.index in done:
                counts["resumed"] += 1
            else:
                yield doc

    started = time.perf_counter()
    if args.save_reference:
        return _save_reference(args, model, tokenizer, todo(), compare, corpus=_corpus_meta(corpus, limit), name=name,
                               windows=windows, settings=settings, started=started)
    rows, payload = [], {"rank": rank}
    writer = PartWriter(args.docs_out, rank=rank, first_part=first_part) if args.docs_out else None
    surprisal = {}
    try:
        for kind, (path, columns) in surprisal_paths.items():
            surprisal[kind] = TableWriter(path, columns, replace=args.force)
        for part in score_documents(model, tokenizer, todo(), progress=not args.quiet and rank == 0,
                                    keep_logprobs=bool(surprisal), bad_rows=args.bad_rows, **options):
            if surprisal:
                _write_surprisal(surprisal, tokenizer, part)
            if not args.docs_out:  # with --docs-out the rows are on disk, however large the corpus
                rows.extend(part)
            if writer:
                writer.add(part)
    except (ValueError, TypeError) as err:  # reported through the gather, so no rank waits for a timeout
        if world_size == 1:
            raise
        payload["error"] = (type(err).__name__, str(err))
    finally:
        if writer:
            writer.flush()  # what was scored is kept, also when a bad document stops the run
        for table in surprisal.values():
            table.close()
    payload.update(counts=counts, rows=None if args.docs_out else rows)
    gathered = gather_payloads(payload, ctx, timeout=args.timeout) if world_size > 1 else [payload]
    if gathered is None:  # ranks other than 0 are done
        return None
    for other in gathered:
        if "error" in other:
            kind, message = other["error"]
            raise (TypeError if kind == "TypeError" else ValueError)(f"On rank {other['rank']}: {message}")
    if args.docs_out:  # the folder holds every rank's rows and those of earlier runs (with any --limit)
        rows = [row for row in read_rows(args.docs_out).to_dict("records") if not limit or row["index"] < limit]
    else:
        rows = [row for other in gathered for row in other["rows"]]
    rows, skipped, flagged = split_rows(rows)
    if flagged and args.bad_rows == "fail":  # flagged by an earlier run of a resumed folder
        raise ValueError(f"{sum(flagged.values())} row(s) of the --docs-out folder were flagged by an earlier run "
                         f"({'; '.join(sorted(flagged))}); with --bad-rows fail the run has no result: fix them and "
                         "score afresh, or pass --bad-rows flag.")
    if not rows:
        raise ValueError(f"The corpus {args.corpus!r} holds no text" + (f" in its first {limit} documents" if limit else "")
                         + (f" that could be scored ({sum(flagged.values())} row(s) flagged)." if flagged else "."))
    result = pool_rows(rows, bootstrap_resamples=args.bootstrap_resamples)
    seconds = time.perf_counter() - started
    result.update(model=name, corpus=args.corpus, seconds=seconds, dtype=str(next(model.parameters()).dtype),
                  device=str(next(model.parameters()).device), settings=settings, processes=world_size,
                  docs_out=args.docs_out, skipped_empty=skipped, flagged_rows=sum(flagged.values()))
    if reference_name:
        result["reference"] = reference_name
    _report(args, result, gathered, limit=limit, name=name, windows=windows, seconds=seconds, world_size=world_size,
            flagged=flagged)
    if args.docs_out:  # one per document: they are in the folder, however large the corpus
        del result["perplexities"]
        result.pop("reference_perplexities", None)
    _write_outputs(args, result, name=name, windows=windows)
    return result


def _check_comparison(args, loads_reference, world_size):
    """Comparison options that cannot go together fail before any model loads."""
    if args.reference_file and loads_reference:
        raise ValueError("Expected either --reference-file or --reference-model/--reference-gguf-file/--reference-dtype, but got both.")
    if args.save_reference and args.reference_file:
        raise ValueError("--save-reference writes a reference file; --reference-file reads one: give one of them.")
    if args.save_reference:
        if world_size > 1 or args.docs_out or args.tokens_out or args.words_out:
            raise ValueError("--save-reference runs on one process and writes only its file (no --docs-out, --tokens-out, "
                             "--words-out, torchrun).")
        if loads_reference and (args.quantize or args.dtype != "auto"):
            raise ValueError("--save-reference with --reference-model/--reference-gguf-file/--reference-dtype scores only "
                             "that reference: --quantize and --dtype apply to --model, which it does not load (give the "
                             "reference's dtype with --reference-dtype).")
        if Path(args.save_reference).exists():
            raise ValueError(f"The --save-reference file {args.save_reference!r} exists: give a new path (nothing is overwritten).")
    if (args.reference_file or loads_reference) and (args.tokens_out or args.words_out):
        raise ValueError("--tokens-out and --words-out score one model: run them without a reference.")


def _corpus_meta(corpus, limit):
    """What decides which documents a reference file covers (the fingerprint covers a file's
    content, so the same corpus under another path is accepted)."""
    return {"fingerprint": corpus_fingerprint(**corpus), "limit": limit,
            "text_field": corpus["text_field"], "id_field": corpus["id_field"], "split": corpus["split"], "config": corpus["config"]}


def _save_reference(args, model, tokenizer, documents, recorder, *, corpus, name, windows, settings, started):
    meta = {"model": name, "corpus": corpus, "corpus_source": str(args.corpus)}
    rows = save_reference(model, tokenizer, documents, args.save_reference, meta=meta, recorder=recorder, settings=settings,
                          progress=not args.quiet, bad_rows=args.bad_rows)  # refuses an empty corpus
    result = pool_rows(rows, bootstrap_resamples=args.bootstrap_resamples)
    seconds = time.perf_counter() - started
    size = Path(args.save_reference).stat().st_size
    result.update(model=name, corpus=args.corpus, seconds=seconds, dtype=str(next(model.parameters()).dtype),
                  settings=settings, reference_file=args.save_reference, reference_file_bytes=size)
    notes = [("Saved", f"{args.save_reference}   ({size / result['num_tokens']:,.0f} bytes per token: top {args.save_top_k} "
                       f"log-probs + {args.save_samples} sampled tokens)")]
    if args.json != "-":
        print(format_report(result, model_name=name, corpus_name=args.corpus, seconds=seconds, windows=windows, notes=notes))
    _write_outputs(args, result, name=name, windows=windows)
    return result


def comparison_lines(result):
    """The report's comparison block (as llama.cpp's --kl-divergence prints, plus the paired ratio)."""
    ratio_ci = result["perplexity_ratio_ci"]
    spread = f"95% CI {ratio_ci[0]:.4f} - {ratio_ci[1]:.4f}, paired bootstrap over documents" if ratio_ci else "one document: no interval"
    q = result["kl_divergence_quantiles"]
    sampled = result["kl_divergence_sampling_se"]
    kl = f"{result['kl_divergence']:.6f} ± {result['kl_divergence_se']:.6f} nats/token" + (
        f"   (estimated from the file; sampling SE {sampled:.6f}, 95% CI {result['kl_divergence'] - 1.96 * sampled:.6f}"
        f" - {result['kl_divergence'] + 1.96 * sampled:.6f})" if sampled else "")
    # the file's estimator is unbiased, so where the true KL (>= 0) is tiny it can come out below 0
    below_zero = sampled and min(result["kl_divergence"], *q.values()) < 0
    note = [("KL note", "below 0 only by the file's sampling error: the true KL is >= 0; read the interval")] if below_zero else []
    return [
        ("Reference", result["reference"]),
        ("Reference ppl", f"{result['reference_perplexity']:.4f}"),
        ("PPL ratio", f"{result['perplexity_ratio']:.4f}   ({spread})"),
        ("ln(PPL ratio)", f"{result['log_perplexity_ratio']:.6f} ± {result['log_perplexity_ratio_se']:.6f}"),
        ("KL divergence", kl),
        ("KL quantiles", f"p50 {q['p50']:.6f}, p90 {q['p90']:.6f}, p99 {q['p99']:.6f}, max {q['max']:.6f}"),
        ("Same top-1", f"{100 * result['top1_agreement']:.2f} ± {100 * result['top1_agreement_se']:.2f} %"),
        ("RMS Δp", f"{100 * result['rms_delta_p']:.3f} %"),
        ("NLL correlation", f"{result['nll_correlation']:.4f}" if result["nll_correlation"] is not None else "n/a"),
        *note,
    ]


def _surprisal_paths(args, rank, world_size):
    """`--tokens-out` / `--words-out` paths and columns, with a known suffix. Under several
    processes each rank writes PATH's stem + `.rankNNNN` + suffix."""
    paths = {}
    for kind, path, columns in (("tokens", args.tokens_out, TOKEN_COLUMNS), ("words", args.words_out, WORD_COLUMNS)):
        if path:
            path = Path(path)
            if path.suffix.lower() not in (".parquet", ".csv", ".jsonl"):
                raise ValueError(f"Expected --{kind}-out to end in .parquet, .csv or .jsonl, but got {str(path)!r}.")
            if world_size > 1:
                path = path.with_name(f"{path.stem}.rank{rank:04d}{path.suffix}")
            paths[kind] = (path, columns)
    return paths


def _check_outputs(args, surprisal_paths, rank):
    """Every output of this rank against the run's inputs and each other (see ppl_outputs), and a
    model card whose metadata cannot be read, all before the model loads."""
    outputs = [(f"--{kind}-out", path, "file") for kind, (path, _) in surprisal_paths.items()]
    if rank == 0:
        outputs += [("--json", None if args.json == "-" else args.json, "file"), ("--save-reference", args.save_reference, "keep"),
                    ("--model-card", args.model_card and card_file(args.model_card), "update")]
    outputs.append(("--docs-out", args.docs_out, "folder"))
    inputs = [("the corpus", args.corpus), ("--model", model_location(args.model, args.gguf_file), MODEL_FILE_SUFFIXES),
              ("--reference-file", args.reference_file)]
    if args.reference_model or args.reference_gguf_file:
        inputs.append(("--reference-model", model_location(args.reference_model, args.reference_gguf_file),
                       MODEL_FILE_SUFFIXES))
    check_outputs(outputs, inputs, force=args.force)
    if rank == 0 and args.model_card and card_file(args.model_card).is_file():
        read_model_card(card_file(args.model_card))  # a broken card fails now, not after the whole run


def _write_surprisal(writers, tokenizer, rows):
    """Token and word rows of scored documents; the texts and log-probs leave the rows after."""
    for row in rows:
        if "error" in row:  # empty or flagged: no tokens
            continue
        tokens = document_token_rows(tokenizer, row)
        if "tokens" in writers:
            writers["tokens"].write(tokens)
        if "words" in writers:
            writers["words"].write(word_rows(row["index"], row["text"], tokens))
        del row["text"], row["logprobs"]


def split_rows(rows):
    """(the scored rows, how many were skipped as empty, {error: rows} of the flagged ones)."""
    scored, skipped, flagged = [], 0, collections.Counter()
    for row in rows:
        error = row.get("error")
        if error is None or error != error:  # NaN: a scored row read back from a folder
            # counts read back from a folder with null rows are floats: whole numbers again
            scored.append({**row, **{k: int(row[k]) for k in ("num_tokens", "num_words", "num_bytes") if k in row}})
        elif error in SKIPPED:
            skipped += 1
        else:
            flagged[error.split(":")[0]] += 1
    return scored, skipped, dict(flagged)


def report_flagged(flagged):
    if flagged:
        print(f"ppl_cli: {sum(flagged.values())} row(s) could not be scored and are flagged in their `error` column: "
              + "; ".join(f"{n} x {message}" for message, n in sorted(flagged.items())), file=sys.stderr)


def _report(args, result, gathered, *, limit, name, windows, seconds, world_size, flagged=None):
    empty = result.get("skipped_empty", 0)
    resumed = sum(o["counts"]["resumed"] for o in gathered)
    corpus_name = f"{args.corpus}" + (f" (first {limit} documents)" if limit else "")
    notes = [("Skipped", f"{empty:,} empty documents")] if empty else []
    if result.get("flagged_rows"):
        notes.append(("Flagged", f"{result['flagged_rows']:,} rows that could not be scored (their `error` column)"))
    if args.docs_out:
        notes.append(("Per document", f"{args.docs_out}" + (f"   ({resumed:,} scored by an earlier run)" if resumed else "")))
    if world_size > 1:
        notes.append(("Processes", f"{world_size}"))
    if "kl_divergence" in result:
        notes.extend(comparison_lines(result))
    settings = result.get("settings") or {}
    if "bytes_per_token" in settings:
        notes.append(("Batching", f"batch_size={settings['batch_size']}, max_batch_tokens={settings['max_batch_tokens']:,} "
                                  f"({settings['bytes_per_token'] / 1024:.0f} KiB/token), head={settings['head']}, "
                                  f"{result['dtype'].removeprefix('torch.')} on {result['device']}"))
    if args.json != "-":
        print(format_report(result, model_name=name, corpus_name=corpus_name, seconds=seconds, windows=windows, notes=notes))
    report_flagged(flagged)


def _write_outputs(args, result, *, name, windows):
    if args.json == "-":
        print(json.dumps(result))
    elif args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    if args.model_card:
        path = update_model_card(args.model_card, result, model_name=args.card_model_name or name,
                                 dataset_type=args.card_dataset_type or args.corpus,
                                 dataset_name=args.card_dataset_name or args.corpus,
                                 dataset_split=args.split if corpus_kind(args.corpus) == "dataset" else None,
                                 dataset_config=args.dataset_config, metric_config=windows)
        print(f"Model card updated: {path}")


if __name__ == "__main__":
    sys.exit(main())
