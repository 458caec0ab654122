"""Perplexity of language models: an `evaluate` metric over log-probabilities, or over texts.

Layout: this file is the `evaluate` glue and the metric card; the math lives in
`ppl_core.py`, the model runner in `ppl_runner.py`, model and corpus loading in
`ppl_sources.py`, model-card writing in `ppl_card.py`, torchmetrics' stateful `Perplexity`
in `ppl_torchmetrics.py`. `evaluate.load` copies sibling files only when this file names
them in a top-level relative import, which a plain `import perplexity_metric` cannot
execute, so the real imports below pick the form that fits how the module was imported.
"""

import math
import os

import datasets
import evaluate
import numpy as np
import torch

# evaluate.load scans this file's text for top-level relative imports and copies the files
# they name next to it; its scanner skips only double-quoted docstrings, so these lines are
# read by it and never executed by Python.
_SIBLING_FILES_FOR_EVALUATE_LOAD = '''
from .ppl_core import perplexity
from .ppl_torchmetrics import Perplexity
from .ppl_compare import pool_comparison
from .ppl_head import fused_head
from .ppl_runner import score_texts
from .ppl_inputs import check_text
from .ppl_sources import load_model
from .ppl_card import update_model_card
from .ppl_dist import score_corpus_distributed
from .ppl_trainer import compute_metrics
from .ppl_docs import pool_scores
from .ppl_ray import DocumentScorer
'''

if __package__:  # loaded by evaluate.load, from its module cache
    from .ppl_card import update_model_card
    from .ppl_core import check_bootstrap_resamples, check_compact_inputs, check_int, check_ignore_index, perplexity, scored_mask, summarize, target_nll
    from .ppl_dist import distributed_session, score_corpus_distributed
    from .ppl_docs import pool_scores
    from .ppl_ray import DocumentScorer  # a plain class: Ray is imported only by ppl_ray.run_cli
    from .ppl_inputs import check_text
    from .ppl_runner import evaluate_texts, score_texts
    from .ppl_sources import load_model
    from .ppl_torchmetrics import Perplexity
    from .ppl_trainer import compute_metrics, preprocess_logits_for_metrics
else:  # imported plainly: tests, app.py, the command line
    from ppl_card import update_model_card
    from ppl_core import check_bootstrap_resamples, check_compact_inputs, check_int, check_ignore_index, perplexity, scored_mask, summarize, target_nll
    from ppl_dist import distributed_session, score_corpus_distributed
    from ppl_docs import pool_scores
    from ppl_ray import DocumentScorer  # a plain class: Ray is imported only by ppl_ray.run_cli
    from ppl_inputs import check_text
    from ppl_runner import evaluate_texts, score_texts
    from ppl_sources import load_model
    from ppl_torchmetrics import Perplexity
    from ppl_trainer import compute_metrics, preprocess_logits_for_metrics

__all__ = ["PerplexityMetric", "Perplexity", "perplexity", "score_texts", "evaluate_texts", "load_model", "update_model_card",
           "DocumentScorer", "pool_scores", "preprocess_logits_for_metrics", "compute_metrics"]

_CITATION = """\
@misc{perplexity_metric,
  title  = {Perplexity metric for Hugging Face evaluate},
  note   = {Token-weighted corpus perplexity with bootstrap interval; word and byte
            perplexity as defined by lm-evaluation-harness (Gao et al., 2023)},
  year   = {2026}
}
"""

_DESCRIPTION = """\
Perplexity is the exponential of the mean negative log-likelihood a language model gives
the tokens of a text: `exp(sum NLL / number of scored tokens)`. Lower is better; a model
that spreads its probability evenly over V tokens has perplexity V.

Two configurations:
- default: feed what your model produced. `predictions` are either full distributions
  (`[seq_len, vocab_size]` logits or log-probabilities per example) or compact per-token
  log-probabilities of the targets (`[seq_len]`); `references` are the target token ids.
  Full distributions are reduced to the compact form before anything is cached.
- "text": feed texts and a model (a Hub id, a local folder, a GGUF file or loaded
  objects; by default the embedded SmolLM2-135M); long texts are scored in sliding windows.

The headline `perplexity` is token-weighted over the whole corpus. `mean_perplexity` is
the plain mean of per-example values, which is what evaluate's own "perplexity" metric
calls its result: it weighs a two-token example like a thousand-token one.
"""

_KWARGS_DESCRIPTION = """
Args (default configuration):
    predictions: per example, `[seq_len, vocab_size]` logits / log-probabilities, or
        `[seq_len]` log-probabilities of the targets. A torch tensor or numpy array holding
        a whole batch (`[batch, seq_len, vocab_size]` or `[batch, seq_len]`), or a list
        of per-example tensors, arrays or nested lists (lengths may differ).
    references: per example, `[seq_len]` integer target ids.
    ignore_index (int, default -100, also settable in `evaluate.load`): targets equal to
        it do not count (padding, prompt tokens).
    bootstrap_resamples (int, default 1000): resamples for `perplexity_ci`; the bootstrap
        draws with `evaluate.load(..., seed=...)`'s seed, 0 when none is given.

Args ("text" configuration):
    predictions: list of texts.
    model_id (str, optional): Hub id or local folder; the embedded default when absent.
    model, tokenizer (optional): already loaded objects (never moved with `.to()`).
    gguf_file (str, optional): GGUF file name inside `model_id`.
    batch_size (int, default 16), add_start_token (bool, default True),
    max_length (int, default: the model's context), stride (int, default max_length),
    device (str, optional), dtype (str, optional), trust_remote_code (bool, default False),
    device_map (str or dict, optional: accelerate's placement for big models, e.g. "auto"),
    head ("auto": the fused, chunked head where it is exact; "logits": the model's own logits).
    contexts (list of str, optional): one per prediction, fed before it but not scored
        (lm-evaluation-harness's loglikelihood; see `log_likelihoods` in the result).
    conversations (list of message lists, instead of predictions): only the assistant turns
        are scored, through the tokenizer's chat template.
    distributed (bool, default False): under torchrun / accelerate launch, every rank calls
        compute with the same texts, scores its shard, and returns the whole result (the
        same numbers as one process); a peer missing for `distributed_timeout` seconds
        (default 1800) is an error naming its rank. Not with `num_process` > 1.
    reference_model, reference_tokenizer (optional; the tokenizer defaults to `tokenizer`), or
        reference_model_id / reference_gguf_file / reference_dtype (default: the model's own
        checkpoint, e.g. `reference_dtype="float32"` against a bfloat16 model), or
        reference_file (written by `ppl_cli.py --save-reference`): compare the model with a
        reference on the same windows; the result gains the keys below.

Returns:
    perplexity: token-weighted corpus perplexity, exp(total NLL / total tokens).
    nll: mean negative log-likelihood per token, in nats.
    bits_per_token: nll / ln 2.
    num_tokens: number of scored tokens.
    perplexities: one per example (None for an example with no scored token).
    mean_perplexity: plain mean of `perplexities` (evaluate's "perplexity" headline).
    perplexity_ci: 95% percentile-bootstrap interval over examples, [low, high]
        (None with fewer than two examples).
    Text mode adds word_perplexity, byte_perplexity and bits_per_byte
    (lm-evaluation-harness definitions), num_words, num_bytes and num_documents.
    With a reference: reference_perplexity, reference_perplexities, perplexity_ratio
    (perplexity / reference_perplexity) and perplexity_ratio_ci (paired bootstrap over
    documents), log_perplexity_ratio(_se), kl_divergence (mean KL(reference || model) per
    token, nats), kl_divergence_se, kl_divergence_sampling_se (0 unless from a file),
    kl_divergence_quantiles (p50, p90, p99, max), top1_agreement(_se), rms_delta_p,
    nll_correlation.

Examples:
    Log-probabilities of log(1/4) everywhere give perplexity 4:

    >>> import math, evaluate
    >>> metric = evaluate.load("perplexity_metric.py")
    >>> result = metric.compute(predictions=[[math.log(1 / 4)] * 3, [math.log(1 / 4)] * 5],
    ...                         references=[[1, 2, 3], [0, 1, 2, 3, -100]])
    >>> round(result["perplexity"], 6), result["num_tokens"]
    (4.0, 7)

    Full distributions; the seed example of torchmetrics' Perplexity:

    >>> import torch
    >>> preds = torch.rand(2, 8, 5, generator=torch.manual_seed(22))
    >>> target = torch.randint(5, (2, 8), generator=torch.manual_seed(22))
    >>> target[0, 6:] = -100
    >>> round(metric.compute(predictions=preds, references=target)["perplexity"], 4)
    5.2545
"""

_COMPACT_FEATURES = datasets.Features(
    {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Sequence(datasets.Value("int64"))}
)
_TEXT_FEATURES = datasets.Features({"predictions": datasets.Value("string")})
_ARROW_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # what a finished Arrow IPC stream ends with
_BASE_INIT_ARGS = {
    "keep_in_memory", "cache_dir", "num_process", "process_id", "seed", "experiment_id", "hash",
    "max_concurrent_cache_files", "timeout",
}


def _as_tensor(value, name):
    """A tensor view of a tensor, numpy array or nested list, without touching the caller's data.

    Lists go through numpy so Python floats stay float64 (torch would make them float32).
    """
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError
        return torch.from_numpy(array)
    except (TypeError, ValueError):
        raise TypeError(
            f"Expected `{name}` to be a tensor, array or (nested) list of numbers of one shape, but got {type(value).__name__}."
        ) from None


def _split_batch(values, name, batch_ndims):
    """A batch as a list of per-example tensors: a stacked tensor/array is split along dim 0."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        tensor = _as_tensor(values, name)
        if tensor.ndim not in batch_ndims:
            raise ValueError(f"Expected `{name}` as a batch with {' or '.join(map(str, batch_ndims))} dimensions, but got {tensor.ndim}.")
        return list(tensor)
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"Expected `{name}` to be a list, tensor or array, but got {type(values).__name__}.")
    return [_as_tensor(v, f"{name}[{i}]") for i, v in enumerate(values)]


_STORED_IGNORED = -1  # how an ignored position is cached: its log-prob 0.0, its target -1


def to_compact(predictions, references, ignore_index):
    """Reduce a batch to per-example float64 target log-probs and int64 targets (numpy).

    Full distributions go through the chunked core; nothing vocabulary-sized is kept.
    Positions ignored now are stored as target -1 with log-prob 0, so they stay ignored
    whatever `compute` is later told (and NaN at padding never reaches the sums).
    """
    preds = _split_batch(predictions, "predictions", (2, 3))
    refs = _split_batch(references, "references", (1, 2))
    if len(preds) != len(refs):
        raise ValueError(f"Expected as many `predictions` as `references`, but got {len(preds)} and {len(refs)}.")
    if not preds:
        raise ValueError("Expected at least one example in `predictions`, but got none.")
    out = []
    for i, (pred, ref) in enumerate(zip(preds, refs)):
        if ref.numel() == 0:  # `[]` arrives as floats: an example with nothing to score, like all padding
            ref = ref.long()
        if ref.ndim != 1:
            raise ValueError(f"Expected `references[{i}]` to have 1 dimension, [seq_len], but got {ref.ndim}.")
        if pred.ndim not in (1, 2):
            raise ValueError(
                f"Expected `predictions[{i}]` to have 2 dimensions, [seq_len, vocab_size], or 1, [seq_len], but got {pred.ndim}."
            )
        if pred.shape[0] != ref.shape[0]:
            raise ValueError(
                f"Expected `predictions[{i}]` and `references[{i}]` to have the same length, but got {pred.shape[0]} and {ref.shape[0]}."
            )
        try:
            if pred.ndim == 2:
                logprobs = -target_nll(pred[None], ref[None], ignore_index)[0]
            else:
                check_compact_inputs(pred, ref, ignore_index)
                logprobs = pred.double()
        except (TypeError, ValueError) as err:  # name the metric's arguments, not the core's
            message = str(err).replace("`preds`", f"`predictions[{i}]`").replace("`target`", f"`references[{i}]`")
            raise type(err)(f"In example {i}: {message.replace('[batch 0, position', '[position')}") from None
        scored = scored_mask(ref, ignore_index)
        logprobs = torch.where(scored.to(logprobs.device), logprobs, 0.0)
        ref = torch.where(scored, ref.long(), _STORED_IGNORED)
        out.append((logprobs.cpu().numpy(), ref.cpu().numpy()))
    return out


def _check_text_inputs(predictions, references):
    if references is not None:
        raise TypeError("The 'text' configuration takes no `references`: pass the texts as `predictions`.")
    if isinstance(predictions, str):
        raise TypeError("Expected `predictions` to be a list of texts, but got a single string; wrap it in a list.")
    if isinstance(predictions, (list, tuple)):  # the one rule, before evaluate's Arrow cache (no lone surrogates there)
        for i, text in enumerate(predictions):
            check_text(text, f"`predictions[{i}]`")  # the argument the user passed


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PerplexityMetric(evaluate.Metric):
    """Token-weighted perplexity over log-probabilities and targets, or over texts."""

    def __init__(self, config_name=None, ignore_index=-100, bootstrap_resamples=1000, **kwargs):
        unknown = sorted(set(kwargs) - _BASE_INIT_ARGS)
        if unknown:
            raise TypeError(
                f"Unknown setting(s) {unknown} for the perplexity metric; it takes `ignore_index` and `bootstrap_resamples`."
            )
        if config_name not in (None, "default", "text"):
            raise ValueError(f"Expected config_name 'default' or 'text', but got {config_name!r}.")
        check_ignore_index(ignore_index)
        check_bootstrap_resamples(bootstrap_resamples)
        seed = kwargs.get("seed")
        if seed is not None:
            check_int(seed, "seed", minimum=0)
        super().__init__(config_name=config_name or "default", **kwargs)
        self.ignore_index = ignore_index
        self.bootstrap_resamples = bootstrap_resamples
        # evaluate draws a random `self.seed` when none is given; the bootstrap keeps seed 0 then
        self.bootstrap_seed = 0 if seed is None else seed

    @property
    def text_mode(self):
        return self.config_name == "text"

    # For transformers' Trainer: `Trainer(..., preprocess_logits_for_metrics=metric.preprocess_logits_for_metrics,
    # compute_metrics=metric.compute_metrics)` reports eval_perplexity, eval_nll and eval_num_tokens, token-weighted
    # over the whole eval set, keeping per-sequence sums instead of logits (see ppl_trainer.py; labels -100 at padding).
    preprocess_logits_for_metrics = staticmethod(preprocess_logits_for_metrics)
    compute_metrics = staticmethod(compute_metrics)

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_TEXT_FEATURES if self.config_name == "text" else _COMPACT_FEATURES,
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    # evaluate's process 0 reads each process's cache file as soon as it can lock it, and the
    # lock of a process that died is free too: a cut file would then read as a short shard
    # (a partial result reported as complete) or fail deep inside pyarrow. A finished Arrow
    # stream ends with the end-of-stream marker; a file without one never finished.
    def _finalize(self):
        try:
            super()._finalize()
        except (OSError, ValueError):
            self._check_shards_finished()
            raise
        self._check_shards_finished()

    def _check_shards_finished(self):
        if self.num_process == 1 or self.process_id != 0 or self.keep_in_memory:
            return
        for process_id in range(self.num_process):
            path = os.path.join(self.data_dir, f"{self.experiment_id}-{self.num_process}-{process_id}.arrow")
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - len(_ARROW_END_OF_STREAM)))
                finished = f.read() == _ARROW_END_OF_STREAM
            if not finished:
                raise ValueError(
                    f"Process {process_id} of {self.num_process} did not finish its shard ({path} has no end marker): "
                    f"it died or was stopped before calling compute(); no result."
                )

    # Full distributions are reduced before evaluate encodes anything into Arrow.
    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of examples (full distributions are reduced to target log-probs first)."""
        if self.text_mode:
            _check_text_inputs(predictions, references)
            return super().add_batch(predictions=predictions, **kwargs)
        examples = to_compact(predictions, references, kwargs.pop("ignore_index", self.ignore_index))
        return super().add_batch(
            predictions=[lp.tolist() for lp, _ in examples], references=[r.tolist() for _, r in examples], **kwargs
        )

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one example (a full distribution is reduced to target log-probs first)."""
        if self.text_mode:
            _check_text_inputs([prediction], reference)
            return super().add(prediction=prediction, **kwargs)
        ((logprobs, ref),) = to_compact([prediction], [reference], kwargs.pop("ignore_index", self.ignore_index))
        return super().add(prediction=logprobs.tolist(), reference=ref.tolist(), **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Compute the metric over everything added (plus `predictions`/`references` if given)."""
        if predictions is None and references is None and self.keep_in_memory and self.buf_writer is None:
            raise ValueError("Nothing to compute: call `add` or `add_batch` first, or pass `predictions` to compute().")
        if not self.text_mode and (predictions is not None or references is not None):
            self.add_batch(predictions=predictions, references=references, ignore_index=kwargs.get("ignore_index", self.ignore_index))
            predictions = references = None
        if self.text_mode:
            if kwargs.get("conversations") is not None:  # evaluate's cache wants strings: one stand-in per conversation
                if predictions is not None:
                    raise ValueError("Expected either `predictions` (texts) or `conversations`, but got both.")
                conversations = kwargs["conversations"]
                if isinstance(conversations, (str, bytes, dict)) or not hasattr(conversations, "__iter__"):
                    raise TypeError(f"Expected `conversations` to be a list of conversations, but got {type(conversations).__name__}.")
                kwargs["conversations"] = conversations = list(conversations)
                predictions = [f"conversation {i}" for i in range(len(conversations))]
            _check_text_inputs(predictions, references)
            return super().compute(predictions=predictions, **kwargs)
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references=None, ignore_index="default", bootstrap_resamples=None, **text_kwargs):
        resamples = self.bootstrap_resamples if bootstrap_resamples is None else bootstrap_resamples
        if self.text_mode:
            if ignore_index != "default":
                raise TypeError("`ignore_index` applies to token ids; the 'text' configuration scores every token of each text.")
            return self._compute_texts(predictions, resamples, **text_kwargs)
        if text_kwargs:
            raise TypeError(f"Unknown argument(s) {sorted(text_kwargs)} for compute(); model arguments need the 'text' configuration.")
        ignore_index = self.ignore_index if ignore_index == "default" else ignore_index
        nll_sums, counts = [], []
        for logprobs, ref in zip(predictions, references):
            ref = np.asarray(ref, dtype=np.int64)
            mask = ref >= 0  # ignored when added (stored as -1)
            if ignore_index is not None and ignore_index >= 0:  # a real id may also be left out here
                mask &= ref != ignore_index
            nll_sums.append(-math.fsum(np.asarray(logprobs, dtype=np.float64)[mask]))
            counts.append(int(mask.sum()))
        return summarize(nll_sums, counts, bootstrap_resamples=resamples, seed=self.bootstrap_seed)

    def _compute_texts(self, texts, resamples, model_id=None, model=None, tokenizer=None, gguf_file=None,
                       device=None, dtype=None, trust_remote_code=False, device_map=None, distributed=False, distributed_timeout=1800,
                       contexts=None, conversations=None, reference_model=None, reference_tokenizer=None,
                       reference_model_id=None, reference_gguf_file=None, reference_dtype=None, reference_file=None, **runner_kwargs):
        if model is not None and tokenizer is None:
            raise ValueError("Expected a `tokenizer` together with `model`.")
        if model is None and tokenizer is not None:
            raise ValueError("Expected a `model` together with `tokenizer` (or `model_id` alone).")
        loading = {"model_id": model_id, "gguf_file": gguf_file, "device": device, "dtype": dtype, "device_map": device_map,
                   "trust_remote_code": trust_remote_code or None}
        if model is not None and any(v is not None for v in loading.values()):
            given = sorted(k for k, v in loading.items() if v is not None)
            raise TypeError(f"{given} would be ignored with a loaded `model`: pass either `model`/`tokenizer` or the loading options.")
        runner_kwargs["seed"] = self.bootstrap_seed
        loads_reference = any(v is not None for v in (reference_model_id, reference_gguf_file, reference_dtype))
        if reference_model is not None and loads_reference:
            raise TypeError("Expected either `reference_model` or `reference_model_id`/`reference_gguf_file`/`reference_dtype`, "
                            "but got both.")
        if reference_file is not None and (reference_model is not None or loads_reference):
            given = [k for k, v in (("reference_model", reference_model), ("reference_model_id", reference_model_id),
                                    ("reference_gguf_file", reference_gguf_file), ("reference_dtype", reference_dtype))
                     if v is not None]
            raise ValueError(f"Expected either `reference_file` or a reference model, but got both: `reference_file` and "
                             f"{', '.join(f'`{k}`' for k in given)}.")
        if distributed and (reference_model is not None or loads_reference or reference_file is not None):
            raise ValueError("A comparison with a reference runs on one process: pass it without `distributed=True`.")
        if not distributed:
            if model is None:
                model, tokenizer = load_model(model_id, gguf_file=gguf_file, device=device, dtype=dtype,
                                              trust_remote_code=trust_remote_code, device_map=device_map)
            elif loads_reference and reference_model_id is None and reference_gguf_file is None:
                raise ValueError("Expected `reference_model_id` or `reference_gguf_file` with a loaded `model`: which checkpoint "
                                 "`reference_dtype` applies to is known only when the model was loaded by id.")
            if loads_reference:  # by default the model's own checkpoint, e.g. in another dtype
                same = reference_model_id is None and reference_gguf_file is None
                reference_model, reference_tokenizer = load_model(
                    model_id if same else reference_model_id, gguf_file=gguf_file if same else reference_gguf_file,
                    device=device, dtype=reference_dtype, trust_remote_code=trust_remote_code, device_map=device_map)
            runner_kwargs.update(reference_model=reference_model, reference_tokenizer=reference_tokenizer,
                                 reference_file=reference_file)
            if conversations is not None:
                return evaluate_texts(model, tokenizer, conversations=conversations, bootstrap_resamples=resamples, **runner_kwargs)
            return evaluate_texts(model, tokenizer, texts, contexts=contexts, bootstrap_resamples=resamples, **runner_kwargs)
        if contexts is not None or conversations is not None:
            raise ValueError("`contexts` and `conversations` run on one process: pass them without `distributed=True`.")
        if self.num_process != 1:
            raise ValueError(
                f"Expected `distributed=True` (texts sharded over torch.distributed ranks) with num_process=1, but got "
                f"num_process={self.num_process}: shard with one or the other."
            )
        with distributed_session(timeout=distributed_timeout) as ctx:  # joins torchrun's group, or runs alone
            if model is None:
                model, tokenizer = load_model(model_id, gguf_file=gguf_file, device=device or ctx["device"], dtype=dtype,
                                              trust_remote_code=trust_remote_code)
            return score_corpus_distributed(model, tokenizer, texts, timeout=distributed_timeout, all_ranks=True,
                                            bootstrap_resamples=resamples, **runner_kwargs)
