"""Run a transformers causal LM over texts and yield the metric's compact features.

Each text becomes a token sequence `s` (the start token first, when asked for). Every
target `s[1:]` is scored exactly once, in windows of at most `max_length` input tokens
that advance by `stride` (`plan_windows`, a pure function). Windows from many texts are
sorted by length and packed into batches under a token budget, so padding stays small and
memory is bounded by one batch; results are reassembled per text, in input order.
"""

import collections.abc
import inspect
import itertools
import math
import re
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

if __package__:
    from .ppl_compare import (SAMPLES, TOP_K, ModelReference, Recorder, ReferenceWriter, SavedReference, logits_width,
                              pool_comparison, token_stats, tokenizer_fingerprint)
    from .ppl_core import check_int, summarize, target_nll, text_units, unit_metrics
    from .ppl_head import bytes_per_token, fused_head, memory_budget, scored_logits
    from .ppl_inputs import check_bad_rows, check_text, check_texts, check_unicode, problem
else:
    from ppl_compare import (SAMPLES, TOP_K, ModelReference, Recorder, ReferenceWriter, SavedReference, logits_width,
                             pool_comparison, token_stats, tokenizer_fingerprint)
    from ppl_core import check_int, summarize, target_nll, text_units, unit_metrics
    from ppl_head import bytes_per_token, fused_head, memory_budget, scored_logits
    from ppl_inputs import check_bad_rows, check_text, check_texts, check_unicode, problem

TEXTS_PER_CHUNK = 512  # texts tokenized and scored together; bounds memory on huge corpora
# A chunk also ends past this many characters (~16k tokens: well under a minute on a CPU), so
# per-document results arrive, and can be saved, at least that often.
CHARS_PER_CHUNK = 64_000


class Pair(NamedTuple):
    """A continuation scored after a context that is fed but not scored (lm-evaluation-harness's
    `loglikelihood` request)."""

    context: str
    continuation: str


class Chat(NamedTuple):
    """A conversation (`{"role", "content"}` messages) of which only the assistant turns are scored."""

    messages: list


def plan_windows(num_tokens, max_length, stride):
    """Windows that score targets 1..num_tokens-1 of a sequence exactly once.

    A window `(start, stop, num_scored)` feeds tokens `s[start:stop]` to the model, whose
    logits predict `s[start + 1 : stop + 1]`; only the last `num_scored` of those count.
    The first window scores everything it sees; later ones advance by `stride` and reach
    back to a full `max_length` of input, so each scored token has at least
    `max_length - stride` tokens of context. With `stride == max_length` these are
    lm-evaluation-harness's rolling windows (context length 1).

    >>> plan_windows(10, max_length=4, stride=4)
    [(0, 4, 4), (4, 8, 4), (5, 9, 1)]
    >>> plan_windows(10, max_length=4, stride=2)
    [(0, 4, 4), (2, 6, 2), (4, 8, 2), (5, 9, 1)]
    """
    if max_length < 1:
        raise ValueError(f"Expected `max_length` >= 1, but got {max_length}.")
    if not 1 <= stride <= max_length:
        raise ValueError(f"Expected `stride` in [1, max_length={max_length}], but got {stride}.")
    last, scored, windows = num_tokens - 1, 0, []
    while scored < last:
        stop = min(scored + (max_length if scored == 0 else stride), last)
        windows.append((max(0, stop - max_length), stop, stop - scored))
        scored = stop
    return windows


def pack_batches(lengths, batch_size, max_batch_tokens, max_padding=0.1):
    """Group item indices, longest first, so a batch has at most `batch_size` items, its
    padded size (items x longest) stays within `max_batch_tokens`, and padding is at most
    `max_padding` of it (one item always fits). Padding is not free: padded positions are
    computed, and a padded batch needs an attention mask, which is slower than a causal-only one.

    >>> pack_batches([10, 3, 9, 10, 3], batch_size=4, max_batch_tokens=100)
    [[0, 3, 2], [1, 4]]
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, real = [], [], 0
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        padded = (len(current) + 1) * longest
        full = len(current) == batch_size or padded > max_batch_tokens
        if current and (full or padded - (real + lengths[i]) > max_padding * padded):
            batches.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    if current:
        batches.append(current)
    return batches


def start_token_id(tokenizer):
    """BOS, else EOS (as lm-evaluation-harness does), else a clear error."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError(
        "The tokenizer has neither a BOS nor an EOS token to start texts with; pass `add_start_token=False` "
        "(the first token of each text is then not scored)."
    )


def context_length(model, tokenizer=None):
    """The longest input the model takes, from its config (None if it does not say)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**8 else None


def _input_device(model):
    """Where input ids must go: the embedding's device (right for `device_map` models too)."""
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device if embeddings is not None else next(model.parameters()).device


def _batch_tensors(sequences, masks, windows, pad_id, left_pad):
    """Model inputs (on the CPU), labels (-100: not scored) and the scored mask of one batch of
    windows. `masks[t]` (None: every target) says which targets of sequence t are scored."""
    lengths = [stop - start for _, start, stop, _ in windows]
    width = max(lengths)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(windows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(windows), width), dtype=torch.long)
    for row, (t, start, stop, num_scored) in enumerate(windows):
        seq = sequences[t]
        n = stop - start
        cols = slice(width - n, width) if left_pad else slice(0, n)
        input_ids[row, cols] = torch.tensor(seq[start:stop])
        attention[row, cols] = 1
        row_labels = torch.tensor(seq[start + 1 : stop + 1])
        row_labels[: n - num_scored] = -100  # context only: seen, not scored
        if masks[t] is not None:  # a prompt or a user turn: seen, not scored
            row_labels[~torch.tensor(masks[t][start + 1 : stop + 1])] = -100
        labels[row, cols] = row_labels
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)  # positions restart in each window
    inputs = {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids}
    return inputs, labels, labels != -100


def _score_batch(model, inputs, labels, mask, device, keeps_logits, head):
    """Target log-probs of one batch of windows: a float64 tensor per window."""
    inputs = {name: value.to(device) for name, value in inputs.items()}
    if head is not None:  # the body once, then the head chunk by chunk over the scored positions only
        hidden = head.hidden_states(**inputs)  # (batch, width, hidden)
        logprobs = head.target_logprobs(hidden[mask.to(hidden.device)], labels[mask])
        return list(logprobs.split(mask.sum(-1).tolist()))
    kwargs = {}
    if keeps_logits:  # only the trailing positions that hold a scored label need logits
        first_scored = int(mask.int().argmax(-1).min())
        kwargs["logits_to_keep"] = labels.shape[1] - first_scored
        labels, mask = labels[:, first_scored:], mask[:, first_scored:]
    logits = model(**inputs, **kwargs).logits  # (batch, kept positions, vocab)
    logprobs = -target_nll(logits, labels.to(logits.device), ignore_index=-100).cpu()
    return [logprobs[row][mask[row]] for row in range(len(labels))]


def score_texts(
    model,
    tokenizer,
    texts,
    *,
    batch_size=16,
    add_start_token=True,
    max_length=None,
    stride=None,
    max_batch_tokens=None,
    padding_side=None,
    head="auto",
    contexts=None,
    compare=None,
    progress=True,
    settings=None,
):
    """Score texts with a causal LM: an iterator of `{"predictions", "references"}` batches for the metric.

    `predictions[i]` is the log-probability (float, nats) of each target token of text i and
    `references[i]` the target ids, in input order, so `metric.add_batch(**batch)` takes them.
    Texts are tokenized without special tokens; with `add_start_token` the tokenizer's BOS
    (or EOS) is prepended and the first real token is scored too.

    Args:
        model: a loaded `AutoModelForCausalLM` (any device placement; never moved here).
        tokenizer: its tokenizer.
        texts: an iterable of strings (streamed `TEXTS_PER_CHUNK` at a time).
        batch_size: most windows per forward pass.
        add_start_token: prepend BOS/EOS so the first token is scored.
        max_length: most input tokens per window (default and maximum: the model's context).
        stride: tokens a window advances (default `max_length`, i.e. disjoint windows).
        max_batch_tokens: most padded tokens per forward pass. Default: what a memory budget
            holds (a quarter of the available RAM, or 70% of the free CUDA memory) at the
            model's bytes per token (`ppl_head.bytes_per_token`: activations, plus a row of
            logits without the fused head), at most `batch_size` full windows; a window
            longer than an explicit value still runs, alone.
        padding_side: "left" or "right" (default: the tokenizer's); results do not depend on it.
        head: "auto" runs the body once and the output layer chunk by chunk over the scored
            positions (`ppl_head`), where a probe shows that equals the model's own logits;
            "logits" always takes the model's own logits.
        contexts: one string per text, fed before it but not scored (lm-evaluation-harness's
            `loglikelihood`: `predictions` then hold only the continuation's log-probs).
            Texts may also be `Pair(context, continuation)` or `Chat(messages)` items.
        compare: a `ppl_compare` reference (a model, a saved file, or a recorder) run on the
            same batches; each batch then also has `columns`: per text, a float64 tensor
            `(targets, len(ppl_compare.COLUMNS))` (a recorder: its records).
        progress: show a tqdm bar (on terminals) counting scored tokens.
        settings: `resolve_settings`'s result, resolved once by a caller that reports it (the
            command line, a Ray actor, a saved reference); it replaces every option above that
            it resolves (`batch_size`, `add_start_token`, `head` too), which are then ignored.

    Raises:
        ValueError: bad `max_length`/`stride`/`batch_size`, a text that is empty or has no
            token to score, no start token available.
        TypeError: a text that is not a string.
    """
    if settings is None:
        settings = resolve_settings(model, tokenizer, batch_size=batch_size, add_start_token=add_start_token,
                                    max_length=max_length, stride=stride, max_batch_tokens=max_batch_tokens,
                                    padding_side=padding_side, head=head, compare=compare)
    else:
        given = [name for name, value in (("max_length", max_length), ("stride", stride), ("padding_side", padding_side),
                                          ("max_batch_tokens", max_batch_tokens)) if value is not None]
        if given:
            raise TypeError(f"Expected either `settings` or the options they resolve, but got both ({given}).")
    if isinstance(texts, str):
        raise TypeError("Expected `texts` to be a list of strings, but got a single string; wrap it in a list.")
    if not hasattr(texts, "__iter__"):
        raise TypeError(f"Expected `texts` to be a list of strings, but got {type(texts).__name__}.")
    if contexts is not None:
        if isinstance(contexts, str) or not hasattr(contexts, "__iter__"):
            raise TypeError(f"Expected `contexts` to be a list of strings, but got {type(contexts).__name__}.")
        texts = _pairs(contexts, texts)
    return _score_stream(model, tokenizer, texts, settings, progress, compare)  # checks above run now, not at the first next()


_SETTING_NAMES = ("batch_size", "add_start_token", "max_length", "stride", "max_batch_tokens", "padding_side", "head")


def resolve_settings(model, tokenizer, *, batch_size=16, add_start_token=True, max_length=None, stride=None,
                     max_batch_tokens=None, padding_side=None, head="auto", compare=None):
    """The scoring settings `score_texts` will use, checked, with defaults filled in.

    Returns a dict with `max_length`, `stride`, `batch_size`, `max_batch_tokens`,
    `padding_side`, `start_token_id` (None without a start token), `head` ("fused" or
    "logits") and `bytes_per_token` (the budget's estimate): what to report next to a
    number so that it can be reproduced.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Expected `model` to be a loaded causal LM (a torch.nn.Module), but got {type(model).__name__}; "
                        "load one by its id with `ppl_sources.load_model` (text mode: pass `model_id`).")
    if not callable(tokenizer) or not hasattr(tokenizer, "bos_token_id"):
        raise TypeError(f"Expected `tokenizer` to be a loaded tokenizer, but got {type(tokenizer).__name__}.")
    limit = context_length(model, tokenizer)
    if max_length is None:
        max_length = limit or 1024
    check_int(max_length, "max_length", minimum=1)
    if limit is not None and max_length > limit:
        raise ValueError(f"Expected `max_length` <= {limit} (the model's context length), but got {max_length}.")
    stride = max_length if stride is None else stride
    check_int(stride, "stride", minimum=1)
    if stride > max_length:
        raise ValueError(f"Expected `stride` to be an int in [1, max_length={max_length}], but got {stride}.")
    check_int(batch_size, "batch_size", minimum=1)
    if head not in ("auto", "logits"):
        raise ValueError(f"Expected `head` 'auto' (the fused head where it is exact) or 'logits' (the model's own), "
                         f"but got {head!r}.")
    fused = head == "auto" and fused_head(model) is not None
    per_token = bytes_per_token(model, fused, max_length)
    start_id = start_token_id(tokenizer) if add_start_token else None
    if compare is not None:  # a reference of another vocabulary fails here, before anything runs
        per_token += compare.check(model, tokenizer, {"max_length": max_length, "stride": stride, "start_token_id": start_id,
                                                      "head": "fused" if fused else "logits"})
    if max_batch_tokens is None:  # as many tokens as the memory budget holds, up to batch_size full windows
        budget = memory_budget(_input_device(model))
        if budget < per_token * max_length:
            raise ValueError(
                f"One window of max_length={max_length} tokens needs about {per_token * max_length / 2**30:.2f} GiB "
                f"({per_token / 1024:.0f} KiB per token), but the batch budget on {_input_device(model)} is "
                f"{budget / 2**30:.2f} GiB; lower `max_length`, or set `max_batch_tokens` to run anyway."
            )
        max_batch_tokens = min(budget // per_token, batch_size * max_length)
    check_int(max_batch_tokens, "max_batch_tokens", minimum=1)
    padding_side = padding_side or getattr(tokenizer, "padding_side", "right")
    if padding_side not in ("left", "right"):
        raise ValueError(f"Expected `padding_side` 'left' or 'right', but got {padding_side!r}.")
    return {
        "max_length": max_length,
        "stride": stride,
        "batch_size": batch_size,
        "max_batch_tokens": max_batch_tokens,
        "padding_side": padding_side,
        "start_token_id": start_id,
        "head": "fused" if fused else "logits",
        "bytes_per_token": per_token,
    }


def _score_stream(model, tokenizer, texts, settings, progress, compare=None):
    start_id = settings["start_token_id"]
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None))
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    head = fused_head(model) if settings["head"] == "fused" else None
    device = _input_device(model)

    def score_batch(inputs, labels, mask, spans):
        if compare is None:
            return _score_batch(model, inputs, labels, mask, device, keeps_logits, head)
        chunks = lambda rows: scored_logits(model, head, inputs, mask, keeps_logits=keeps_logits, rows=rows)  # noqa: E731
        return list(compare.score_batch(chunks, inputs, mask, labels[mask], spans).split(mask.sum(-1).tolist()))

    was_training = model.training
    model.eval()
    bar = tqdm(total=0, unit="tok", desc="scoring", disable=None if progress else True)
    try:
        offset = 0
        for chunk in _chunks(texts):
            sequences, masks = _tokenize(tokenizer, chunk, offset, start_id)
            counts = [len(s) - 1 if m is None else sum(m) for s, m in zip(sequences, masks)]
            bar.total += sum(counts)
            bar.refresh()
            if compare is not None:
                compare.start_chunk(counts)
            with torch.inference_mode():
                values = _score_chunk(sequences, masks, offset, settings, pad_id, score_batch, bar)
            offset += len(chunk)
            batch = {"predictions": [(v if v.ndim == 1 else v[:, 0]).tolist() for v in values],
                     "references": [seq[1:] if mask is None else [x for x, m in zip(seq, mask) if m]
                                    for seq, mask in zip(sequences, masks)]}
            if compare is not None:
                batch["columns"] = values
            yield batch  # outside inference mode: the caller's loop body must not run in it
    finally:
        bar.close()
        model.train(was_training)


def _pairs(contexts, texts):
    missing = object()
    for i, (context, text) in enumerate(itertools.zip_longest(contexts, texts, fillvalue=missing)):
        if context is missing or text is missing:
            raise ValueError(f"Expected one context per text in `contexts`, but they differ in length at item {i}.")
        if not isinstance(context, str) or not isinstance(text, str):
            name, value = ("contexts", context) if not isinstance(context, str) else ("texts", text)
            raise TypeError(f"Expected `{name}[{i}]` to be a string, but got {type(value).__name__}.")
        yield Pair(context, text)


def _chunks(texts):
    """Lists of at most TEXTS_PER_CHUNK texts, ending early once past CHARS_PER_CHUNK characters."""
    chunk, chars = [], 0
    for text in texts:
        chunk.append(text)
        chars += len(text) if isinstance(text, str) else len(str(text))
        if len(chunk) == TEXTS_PER_CHUNK or chars >= CHARS_PER_CHUNK:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _tokenize(tokenizer, texts, offset, start_id):
    """Token sequences and their scored targets (`masks[t][i]`: is token i scored; None: all but
    the first) for plain texts, `Pair`s and `Chat`s."""
    plain = [i for i, item in enumerate(texts) if isinstance(item, str)]
    for i, item in enumerate(texts):
        if not isinstance(item, (str, Pair, Chat)):
            raise TypeError(f"Expected `texts[{offset + i}]` to be a string, but got {type(item).__name__}.")
        strings = (item.context, item.continuation) if isinstance(item, Pair) else (
            [m["content"] for m in item.messages] if isinstance(item, Chat) else [item])
        for text in strings:
            check_unicode(text, f"`texts[{offset + i}]`")
    ids = tokenizer([texts[i] for i in plain], add_special_tokens=False)["input_ids"] if plain else []
    encoded = dict(zip(plain, ids))
    sequences, masks = [], []
    for i, item in enumerate(texts):
        if isinstance(item, str):
            seq, mask = ([start_id] if start_id is not None else []) + list(encoded[i]), None
        elif isinstance(item, Pair):
            seq, mask = _encode_pair(tokenizer, item, start_id)
        else:
            seq, mask = _encode_chat(tokenizer, item.messages)
        scored = len(seq) - 1 if mask is None else sum(mask)
        if scored < 1:
            if isinstance(item, str):
                has = f"it has {len(encoded[i])} token(s){'' if start_id is not None else ' and no start token'}"
            else:
                has = f"its {'continuation' if isinstance(item, Pair) else 'assistant turns'} have none"
            raise ValueError(f"Expected `texts[{offset + i}]` to have at least one token to score, but {has}: {str(item)[:40]!r}.")
        sequences.append(seq)
        masks.append(mask)
    return sequences, masks


def split_pair(tokenizer, context, continuation):
    """(context ids, continuation ids) as lm-evaluation-harness encodes a `loglikelihood` pair:
    the context's trailing whitespace moves to the continuation, the pair is tokenized whole,
    and split after the context's own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    split = len(tokenizer(context, add_special_tokens=False)["input_ids"]) if context else 0
    return list(whole[:split]), list(whole[split:])


def _encode_pair(tokenizer, pair, start_id):
    context, continuation = split_pair(tokenizer, pair.context, pair.continuation)
    seq = ([start_id] if start_id is not None else []) + context + continuation
    first = len(seq) - len(continuation)
    return seq, [i >= max(first, 1) for i in range(len(seq))]


def _encode_chat(tokenizer, messages):
    """The conversation rendered by the tokenizer's chat template; scored: the tokens of each
    assistant message as rendered after its generation prompt (content and end-of-turn marker),
    each with the whole conversation before it as context."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []  # character spans of the assistant turns in `text`
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            if i == 0:
                raise ValueError("Expected a conversation in `conversations` to start with a turn before its first "
                                 "assistant message (the context it answers), but it starts with the assistant.")
            prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            turn = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not (turn.startswith(prompt) and text.startswith(turn)):
                raise ValueError(
                    "The tokenizer's chat template does not render a conversation as the prefix of its continuation "
                    f"(message {i} of a conversation in `conversations`), so its assistant turns cannot be told apart: "
                    "score such conversations as `contexts` and continuations instead."
                )
            spans.append((len(prompt), len(turn)))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= begin < b for a, b in spans) for begin, _ in encoding["offset_mapping"]]
    return list(encoding["input_ids"]), [False] + mask[1:]


def _score_chunk(sequences, masks, offset, settings, pad_id, score_batch, bar):
    """Per-text results of one chunk: float64 tensors, `(targets,)` or `(targets, columns)`."""
    windows, spans, seen = [], [], [0] * len(sequences)
    for t, (seq, mask) in enumerate(zip(sequences, masks)):
        for start, stop, num_scored in plan_windows(len(seq), settings["max_length"], settings["stride"]):
            count = num_scored if mask is None else sum(mask[stop - num_scored + 1 : stop + 1])
            if count:  # windows with nothing to score are skipped
                windows.append((t, start, stop, num_scored))
                spans.append((t, seen[t], count))  # which of text t's scored targets this window holds
                seen[t] += count
    pieces = [None] * len(windows)
    lengths = [stop - start for _, start, stop, _ in windows]
    for batch in pack_batches(lengths, settings["batch_size"], settings["max_batch_tokens"]):
        try:
            tensors = _batch_tensors(sequences, masks, [windows[i] for i in batch], pad_id, settings["padding_side"] == "left")
            scored = score_batch(*tensors, [spans[i] for i in batch])
        except ValueError as err:  # name the texts, not the batch's rows
            texts = sorted({offset + windows[i][0] for i in batch})
            raise ValueError(f"Scoring `texts` {texts} failed (with float16, try bfloat16 or float32): {err}") from None
        for i, values in zip(batch, scored):
            pieces[i] = values
        bar.update(sum(len(x) for x in scored))
    per_text = [[] for _ in sequences]
    for (t, *_), values in zip(windows, pieces):  # windows are in text order, then position order
        per_text[t].append(values)
    return [torch.cat(parts) for parts in per_text]


def score_documents(model, tokenizer, documents, *, keep_logprobs=False, bad_rows="fail", **runner_kwargs):
    """Per-document results, streamed: `score_texts` over `(index, id, text)` triples.

    Yields lists of rows (as soon as a chunk of texts is scored), each a dict with `index` and
    `id` as given, `num_tokens` (scored tokens), `nll` (their summed negative log-likelihood in
    nats, summed exactly in float64), `perplexity`, and lm-evaluation-harness's `num_words` and
    `num_bytes`. This is the one scorer behind text mode, the command line's `--docs-out`, Ray
    and every multi-process route. With `keep_logprobs`, rows also hold `text` and the
    per-token `logprobs`. With a `compare` reference (`ppl_compare`), rows also hold its
    `token_stats` (a recorder: `record`).

    Documents follow `ppl_inputs.problem`: an empty one (missing, or only whitespace) gets a
    row with only `index`, `id` and `error` ("missing text", "empty text"); so does a bad one
    with `bad_rows="flag"`, while "fail" (the default) raises.

    Raises:
        TypeError, ValueError: with `bad_rows="fail"`, a text that is not a string, is not
            valid Unicode, or has no token to score; the message names the document's index
            and id (`texts[i]` where the id is None).
    """
    check_bad_rows(bad_rows)
    pending = collections.deque()  # documents handed to score_texts whose rows are not out yet
    skipped = []  # rows of documents that are not scored, yielded with the next batch
    compare = runner_kwargs.get("compare")
    settings = runner_kwargs.get("settings")
    starts = settings["start_token_id"] is not None if settings else runner_kwargs.get("add_start_token", True)
    token_check = None if starts else tokenizer  # without a start token, one token is nothing to score

    def texts():
        for index, doc_id, text in documents:
            found = None if isinstance(text, (Pair, Chat)) else problem(text, tokenizer=token_check)
            if found is not None and not found.empty and bad_rows == "fail":
                raise found.error(_label(index, doc_id))
            if found is not None:
                skipped.append({"index": index, "id": doc_id, "error": found.flag})
                continue
            pending.append((index, doc_id, text))
            if compare is not None:
                compare.expect(index)
            yield text

    stream = score_texts(model, tokenizer, texts(), **runner_kwargs)
    consumed = 0
    while True:
        try:
            batch = next(stream)
        except StopIteration:
            if skipped:
                yield skipped
            return
        except ValueError as err:  # `texts[k]` counts the stream: name the document instead
            def name(match):
                k = int(match.group(1)) - consumed
                return _label(*pending[k][:2]) if 0 <= k < len(pending) else match.group(0)
            raise ValueError(re.sub(r"`texts\[(\d+)\]`", name, str(err))) from None
        rows = []
        for k, logprobs in enumerate(batch["predictions"]):
            index, doc_id, text = pending.popleft()
            nll, count = -math.fsum(logprobs), len(logprobs)
            words, num_bytes = text_units(_scored_text(text))
            rows.append({"index": index, "id": doc_id, "num_tokens": count, "nll": nll,
                         "perplexity": math.exp(nll / count), "num_words": words, "num_bytes": num_bytes})
            if keep_logprobs:
                rows[-1].update(text=text, logprobs=logprobs)
            if compare is not None and compare.kind == "record":
                rows[-1]["record"] = batch["columns"][k]
            elif compare is not None:
                rows[-1].update(token_stats(batch["columns"][k], keep_tokens=keep_logprobs))
        consumed += len(rows)
        rows, skipped[:] = skipped + rows, []
        yield rows


def _scored_text(item):
    """The text whose tokens are scored: a text, a pair's continuation, a chat's assistant turns."""
    if isinstance(item, Pair):
        return item.continuation
    if isinstance(item, Chat):
        return "\n".join(m["content"] for m in item.messages if m["role"] == "assistant")
    return item


def _label(index, doc_id):
    """How errors name a document: by corpus index and id, or (id None) as an item of `texts`."""
    return f"`texts[{index}]`" if doc_id is None else f"document {index} (id {doc_id!r})"


def evaluate_texts(model, tokenizer, texts=None, *, contexts=None, conversations=None, reference_model=None,
                   reference_tokenizer=None, reference_file=None, bootstrap_resamples=1000, seed=0, **runner_kwargs):
    """The metric's text-mode result for `texts`: `score_documents` pooled by the core.

    With `contexts` (one string per text) each text is a continuation scored after its
    context (`Pair`); with `conversations` (instead of `texts`) only the assistant turns of
    each conversation are scored (`Chat`).

    Returns the core's keys (`perplexity`, `nll`, `bits_per_token`, `num_tokens`,
    `perplexities`, `mean_perplexity`, `perplexity_ci`), `log_likelihoods` (per text, the
    sum of its scored log-probabilities in nats) plus lm-evaluation-harness's
    `word_perplexity`, `byte_perplexity`, `bits_per_byte` (of the scored text) and
    `num_documents`; `seed` seeds the bootstrap.

    With `reference_model` (and `reference_tokenizer`, default `tokenizer`) or a
    `reference_file` (written by the command line's `--save-reference`), both score the same
    windows and the result also has `ppl_compare.pool_comparison`'s keys.
    """
    texts = check_items(texts, contexts=contexts, conversations=conversations, tokenizer=tokenizer)
    if reference_model is not None and reference_file is not None:
        raise ValueError("Expected either `reference_model` or `reference_file`, but got both.")
    if reference_tokenizer is not None and reference_model is None:
        raise ValueError("Expected `reference_model` together with `reference_tokenizer`.")
    if reference_model is not None:
        runner_kwargs["compare"] = ModelReference(reference_model, reference_tokenizer)
    elif reference_file is not None:
        runner_kwargs["compare"] = SavedReference(reference_file)
    return pool_rows(text_rows(model, tokenizer, texts, **runner_kwargs), bootstrap_resamples=bootstrap_resamples, seed=seed)


def text_rows(model, tokenizer, texts, **runner_kwargs):
    """`score_documents`'s rows for a list of texts, in order. Explicit texts fail fast on an
    empty or bad one, naming `texts[i]` (a corpus route would skip or flag it)."""
    for i, text in enumerate(texts):
        if not isinstance(text, (Pair, Chat)):  # those were checked when they were built
            check_text(text, f"`texts[{i}]`")
    documents = ((i, None, text) for i, text in enumerate(texts))
    return [row for part in score_documents(model, tokenizer, documents, **runner_kwargs) for row in part]


def check_items(texts=None, *, contexts=None, conversations=None, tokenizer=None, name="texts"):
    """`texts`, `Pair`s of `contexts` and `texts`, or `Chat`s of `conversations`, checked before
    any scoring (a new list; the caller's objects are left alone)."""
    if conversations is not None:
        if texts is not None or contexts is not None:
            raise ValueError(f"Expected either `{name}` (with `contexts`) or `conversations`, but got both.")
        return check_conversations(conversations, tokenizer)
    texts = check_texts(texts, name=name)
    if contexts is None:
        return texts
    if isinstance(contexts, (str, bytes)) or not isinstance(contexts, collections.abc.Iterable):
        raise TypeError(f"Expected `contexts` to be a list of strings, but got {type(contexts).__name__}.")
    contexts = list(contexts)
    if len(contexts) != len(texts):
        raise ValueError(f"Expected `contexts` to hold one string per item of `{name}` ({len(texts)}), but got {len(contexts)}.")
    for i, context in enumerate(contexts):
        if not isinstance(context, str):
            raise TypeError(f"Expected `contexts[{i}]` to be a string, but got {type(context).__name__}.")
    return [Pair(c, t) for c, t in zip(contexts, texts)]


def check_conversations(conversations, tokenizer):
    """Conversations as `Chat`s: lists of {"role", "content"} messages with at least one
    assistant turn, for a tokenizer that has a chat template."""
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("Expected a tokenizer with a chat template for `conversations`, but this one has none "
                         "(`tokenizer.chat_template` is empty): score plain texts instead, or set a template.")
    if isinstance(conversations, (str, bytes, dict)) or not isinstance(conversations, collections.abc.Iterable):
        raise TypeError(f"Expected `conversations` to be a list of conversations, but got {type(conversations).__name__}.")
    chats = []
    for i, messages in enumerate(conversations):
        if isinstance(messages, (str, dict)) or not isinstance(messages, collections.abc.Iterable):
            raise TypeError(f"Expected `conversations[{i}]` to be a list of messages, but got {type(messages).__name__}.")
        messages = [dict(m) if isinstance(m, dict) else m for m in messages]
        for j, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise TypeError(f"Expected `conversations[{i}][{j}]` to be a {{'role': str, 'content': str}} message, but got {m!r}.")
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            raise ValueError(f"Expected `conversations[{i}]` to hold an assistant message with content to score, but it has none.")
        chats.append(Chat(messages))
    if not chats:
        raise ValueError("Expected at least one conversation in `conversations`, but got none.")
    return chats


def nll_per_text(model, tokenizer, texts, **runner_kwargs):
    """Per-text NLL sums (summed exactly with fsum) and scored-token counts, in input order."""
    rows = text_rows(model, tokenizer, texts, **runner_kwargs)
    return [row["nll"] for row in rows], [row["num_tokens"] for row in rows]


def pool_rows(rows, *, bootstrap_resamples=1000, seed=0):
    """The corpus result from per-document rows (dicts with `index`, `nll`, `num_tokens`,
    `num_words`, `num_bytes`), in index order whatever order they come in: the result of
    one process, however the documents were split between processes, runs or chunks.

    Raises:
        ValueError: no rows, or a document index that appears twice.
    """
    rows = sorted(rows, key=lambda row: row["index"])
    if not rows:
        raise ValueError("Expected at least one scored document, but got none.")
    for a, b in zip(rows, rows[1:]):
        if a["index"] == b["index"]:
            raise ValueError(f"Document {a['index']} was scored twice (ids {a['id']!r}, {b['id']!r}).")
    nll_sums = [row["nll"] for row in rows]
    result = summarize(nll_sums, [row["num_tokens"] for row in rows], bootstrap_resamples=bootstrap_resamples, seed=seed)
    result.update(unit_metrics(math.fsum(nll_sums), sum(row["num_words"] for row in rows),
                               sum(row["num_bytes"] for row in rows)))
    result["log_likelihoods"] = [-nll for nll in nll_sums]
    result["num_documents"] = len(rows)
    if "reference_nll" in rows[0]:  # scored against a reference
        result.update(pool_comparison(rows, bootstrap_resamples=bootstrap_resamples, seed=seed))
    return result


def pool_texts(nll_sums, counts, texts, *, bootstrap_resamples=1000, seed=0):
    """The metric's text-mode result from per-text NLL sums and scored-token counts."""
    if not nll_sums:
        raise ValueError("Expected at least one text in `texts`, but got none.")
    rows = [{"index": i, "id": None, "nll": nll, "num_tokens": count, **dict(zip(("num_words", "num_bytes"), text_units(text)))}
            for i, (nll, count, text) in enumerate(zip(nll_sums, counts, texts))]
    return pool_rows(rows, bootstrap_resamples=bootstrap_resamples, seed=seed)


def reference_recorder(top_k=None, samples=None, seed=0):
    """What `save_reference` keeps per token: the top `top_k` log-probs and `samples` tokens drawn from the rest."""
    return Recorder(top_k=TOP_K if top_k is None else top_k, samples=SAMPLES if samples is None else samples, seed=seed)


def save_reference(model, tokenizer, documents, path, *, meta=None, top_k=None, samples=None, seed=0, recorder=None,
                   **runner_kwargs):
    """Score `(index, id, text)` documents with the reference model alone and write, per scored
    token, what a later comparison needs (`ppl_compare.ReferenceWriter`: the top-k log-probs and
    tokens sampled from the rest, 16 + 8 (top_k + samples) bytes per token) to `path`, with the
    window settings, the tokenizer's fingerprint and `meta` (e.g. the corpus's). Returns the
    rows (without their records); `evaluate_texts(..., reference_file=path)` and the command
    line's `--reference-file` compare a model against the file. A caller that resolved the
    settings itself passes them with the `recorder` (`reference_recorder`) they were resolved for.
    """
    recorder = recorder or reference_recorder(top_k, samples, seed)
    if runner_kwargs.get("settings") is None:  # resolved here, once, for this recorder
        options = {k: runner_kwargs.pop(k) for k in _SETTING_NAMES if k in runner_kwargs}
        runner_kwargs["settings"] = resolve_settings(model, tokenizer, **options, compare=recorder)
    settings = runner_kwargs["settings"]
    header = {"top_k": recorder.top_k, "samples": recorder.samples, "seed": recorder.seed, "vocab_size": logits_width(model),
              "tokenizer": tokenizer_fingerprint(tokenizer), "settings": {k: settings[k] for k in ("max_length", "stride", "start_token_id")},
              **(meta or {})}
    writer = ReferenceWriter(path, header)
    rows, complete = [], False
    try:
        for part in score_documents(model, tokenizer, documents, compare=recorder, **runner_kwargs):
            part = [row for row in part if "error" not in row]  # empty or flagged: nothing to record
            writer.write(part)
            for row in part:
                del row["record"]
            rows.extend(part)
        complete = bool(rows)  # no file for a corpus with nothing to score: a retry may use the path
    finally:
        writer.close(complete)
    if not rows:
        raise ValueError("Expected documents with text to score, but none had any: no reference file was written.")
    return rows
