"""The perplexity metric's Space: score a text with a language model, run the metric on
log-probabilities you already have, or compare a variant of the model (bfloat16, dynamic int8)
with a reference on the same text. No math here: every number comes from the library
(`ppl_runner.score_texts` / `pool_texts` / `text_rows` / `pool_rows`, `PerplexityMetric`), so
the text tab gives exactly what `evaluate.load("perplexity_metric.py", "text").compute(...)`
gives for the same text, model and options, and the compare tab what
`ppl_runner.evaluate_texts(model, tokenizer, [text], reference_model=reference)` gives.

    python app.py              # serves on GRADIO_SERVER_NAME:GRADIO_SERVER_PORT (Gradio's defaults)

Environment:
    PERPLEXITY_APP_MODELS       comma-separated Hub ids offered besides the embedded default
                                (the UI never loads a local path or an unlisted model)
    PERPLEXITY_APP_MAX_CHARS    longest text scored, in characters (default 20000)
    PERPLEXITY_APP_MAX_JSON_CHARS  longest log-probabilities JSON (default 2000000)
    PERPLEXITY_APP_CONCURRENCY  requests computed at once (default 2); more wait in a queue
    PERPLEXITY_APP_QUEUE_SIZE   requests that may wait (default 64)
"""

import contextlib
import copy
import functools
import html
import json
import logging
import math
import os
import re
import reprlib
import threading
import weakref
from pathlib import Path

import gradio as gr
import pandas as pd
import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id

from perplexity_metric import PerplexityMetric
from ppl_compare import ModelReference
from ppl_inputs import problem
from ppl_runner import plan_windows, pool_rows, pool_texts, resolve_settings, score_texts, text_rows
from ppl_sources import DEFAULT_MODEL, load_model, model_name, quantize_dynamic_int8
from ppl_tokens import token_spans

ROOT = Path(__file__).resolve().parent
DEFAULT_MAX_CHARS = 20_000
DEFAULT_MAX_JSON_CHARS = 2_000_000
DEFAULT_CONCURRENCY = 2
DEFAULT_QUEUE_SIZE = 64
MAX_WORK_FACTOR = 8  # most model input tokens per text token one request may ask for (stride >= max_length / 8)

# Per-token colours: the surprisal (NLL, nats) of each token, in four bands.
SURPRISAL_BANDS = [(1.0, "< 1 nat"), (3.0, "1-3 nats"), (6.0, "3-6 nats"), (math.inf, ">= 6 nats")]
SURPRISAL_COLOURS = {"< 1 nat": "#2e7d32", "1-3 nats": "#f9a825", "3-6 nats": "#ef6c00", ">= 6 nats": "#c62828"}

# The compare tab: variants of the default model, built once per process and model.
ORIGINAL, BFLOAT16, INT8 = "float32 (original)", "bfloat16", "dynamic int8"
VARIANTS = (ORIGINAL, BFLOAT16, INT8)
DELTA_SCALE = 3.0  # nats of |Δ surprisal| at which a token's colour is at full strength
DELTA_RED, DELTA_BLUE = (198, 40, 40), (21, 101, 192)

log = logging.getLogger("perplexity_app")

EXAMPLE_TEXT = (
    "Perplexity measures how well a language model predicts a text. It is the exponential of "
    "the average negative log-likelihood of the tokens: a model that spreads its probability "
    "evenly over a thousand tokens has a perplexity of a thousand, and a perfect model has a "
    "perplexity of one."
)
EXAMPLE_LOGPROBS = """{
  "predictions": [[-1.3863, -1.3863, -1.3863], [-0.6931, -2.0794, -1.3863, -0.1]],
  "references": [[1, 2, 3], [0, 1, 2, -100]]
}"""  # two examples; the last target of the second is padding


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------


def _env_int(name, default):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"Expected ${name} to be a positive integer, but got {raw!r}.") from None
    if value < 1:
        raise ValueError(f"Expected ${name} to be a positive integer, but got {value}.")
    return value


def allowed_models(spec=None):
    """Hub ids the UI may load besides the default, from `spec` or $PERPLEXITY_APP_MODELS.

    Entries that are not Hub ids (`name` or `owner/name`, as `huggingface_hub` validates
    them) or that name a local path are refused, so the UI can never be pointed at files on
    the server.
    """
    spec = os.environ.get("PERPLEXITY_APP_MODELS", "") if spec is None else spec
    ids = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        try:
            validate_repo_id(entry)
        except HFValidationError as err:
            raise ValueError(f"PERPLEXITY_APP_MODELS: not a Hub model id (owner/name): {err}") from None
        if os.path.exists(entry):
            raise ValueError(f"PERPLEXITY_APP_MODELS: {entry!r} is not a Hub model id (owner/name); local paths are not allowed.")
        if entry not in ids:
            ids.append(entry)
    return ids


def read_card(path=ROOT / "README.md"):
    """The metric card's Markdown without its YAML front matter, or None if there is no card.

    Relative image links (the card's screenshot) are dropped: the page cannot serve them.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    text = re.sub(r"\A---\s*\n.*?\n---\s*\n", "", text, count=1, flags=re.S)
    text = re.sub(r"!\[[^\]]*\]\((?![a-z]+:)[^)]*\)\s*", "", text)
    return text.strip() or None


# ---------------------------------------------------------------------------------------
# Refusals: a user's mistake, shown once as its message and logged as one line
# ---------------------------------------------------------------------------------------


class Refusal(gr.Error):
    """A request the Space refuses. Its str() is the message itself (gr.Error's is quoted), and
    Gradio prints no traceback for it: `refusals_logged` logs it as one line."""

    def __init__(self, message):
        super().__init__(message, print_exception=False)

    def __str__(self):
        return self.message


@contextlib.contextmanager
def library_errors():
    """The library's ValueError/TypeError (a bad option, nothing to score) as a Refusal with its
    message. A gr.Error passes as it is: it is a ValueError too, and wrapping it again would
    show its quoted str()."""
    try:
        yield
    except gr.Error:
        raise
    except (ValueError, TypeError) as err:
        raise Refusal(str(err)) from None


def refusals_logged(handler):
    """`handler` logging each gr.Error it raises as one warning line, without Gradio's traceback;
    any other exception still gets one (a bug, not the user's mistake)."""

    @functools.wraps(handler)  # Gradio reads the inputs from the signature
    def logged(*args):
        try:
            return handler(*args)
        except gr.Error as err:
            log.warning("refused: %s", " ".join(str(err.message).split()))
            err.print_exception = False
            raise

    return logged


def _shown(value):
    """A value from the request for a message, cut short (an API call may send a huge list)."""
    return reprlib.repr(value)


# ---------------------------------------------------------------------------------------
# Models: the default is loaded once and shared; others only from the allow-list
# ---------------------------------------------------------------------------------------


class Models:
    """The models a request may use: the default (shared) and the allow-listed Hub ids."""

    def __init__(self, model=None, tokenizer=None, *, allowed=(), default_label=None):
        if (model is None) != (tokenizer is None):
            raise ValueError("Expected `model` and `tokenizer` together, or neither.")
        self._default = (model, tokenizer) if model is not None else None
        self.default_label = default_label or (default_model_label() if model is None else _model_label(model))
        self.allowed = list(allowed)
        self._lock = threading.Lock()

    @property
    def choices(self):
        return [self.default_label, *self.allowed]

    def get(self, choice=None):
        """(model, tokenizer) for a dropdown choice; a Refusal for anything not offered."""
        if choice in (None, "", self.default_label):
            with self._lock:
                if self._default is None:
                    self._default = load_model()
            return self._default
        if choice not in self.allowed or os.path.exists(choice):
            offered = ", ".join(repr(c) for c in self.choices)
            raise Refusal(f"Model {_shown(choice)} is not offered by this Space; choose one of {offered}.")
        with self._lock, library_errors():  # one load at a time; load_model caches what it loaded
            return load_model(choice)


def default_model_label():
    """The dropdown's name for what `load_model()` loads: the embedded GGUF, or the Hub fallback."""
    name = model_name()
    return f"{name} (embedded)" if name == DEFAULT_MODEL else f"{name} (default)"


def _model_label(model):
    name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    return f"{name} (default)"


# ---------------------------------------------------------------------------------------
# Per-request logic: plain functions, called by the UI and by tests
# ---------------------------------------------------------------------------------------


def _optional_int(value, name, zero_is_none=False):
    """None for an empty field (or 0 where 0 means "the default"); the integer in it otherwise."""
    if value is None or value == "" or (zero_is_none and value == 0):
        return None
    try:
        number = float(value)
        whole = not isinstance(value, bool) and number == int(number)
    except (TypeError, ValueError, OverflowError):  # text, NaN, infinity, a list
        whole = False
    if not whole:
        raise Refusal(f"Expected `{name}` to be a whole number, but got {_shown(value)}.")
    return int(number)


def _flag(value, name, default):
    """A checkbox's value: True or False (None: `default`); anything else is refused, not read as truthy."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise Refusal(f"Expected `{name}` to be true or false, but got {_shown(value)}.")
    return value


def check_text(text, max_chars):
    """Refuse what is not a text to score, by the rule every route follows (`ppl_inputs.problem`):
    not a string, blank, or not valid Unicode (a lone surrogate, which the API's JSON can carry);
    and a text too long for this Space."""
    if text is not None and not isinstance(text, str):
        raise Refusal(f"Enter a text to score: expected `text` to be a string, but got "
                      f"{type(text).__name__} {_shown(text)}.")
    if len(text or "") > max_chars:
        raise Refusal(
            f"The text has {len(text)} characters; this Space scores at most {max_chars}. "
            "Shorten it, or run the metric locally for long texts."
        )
    found = problem(text)
    if found is not None and found.empty:
        raise Refusal("Enter a text to score (or upload a .txt file).")
    if found is not None:
        raise Refusal(str(found.error("the text")))


def score_text(text, model, tokenizer, *, max_length=None, stride=None, add_start_token=True):
    """Score one text: the metric's text-mode result plus the per-token view.

    Returns:
        (result, tokens): `result` is the dict `evaluate.load("perplexity_metric.py", "text")
        .compute(predictions=[text], model=model, tokenizer=tokenizer, ...)` returns, and
        `tokens` a list of `(piece, nll)` covering the text in order, `nll` None for an
        unscored token (the first one without a start token).

    Raises:
        ValueError, TypeError: from the runner (bad options, a text with nothing to score).
    """
    (batch,) = score_texts(
        model, tokenizer, [text], max_length=max_length, stride=stride, add_start_token=add_start_token, progress=False
    )
    logprobs = batch["predictions"][0]
    result = _text_result(logprobs, text)
    pieces = token_pieces(tokenizer, text)
    nlls = [None] * (len(pieces) - len(logprobs)) + [-lp for lp in logprobs]
    return result, list(zip(pieces, nlls))


def _text_result(logprobs, text):
    """The metric's text-mode result for one text from the runner's per-token log-probs."""
    return pool_texts([-math.fsum(logprobs)], [len(logprobs)], [text])


def token_pieces(tokenizer, text):
    """The text cut at its token boundaries (one piece per token, as the runner tokenizes it),
    with `ppl_tokens.token_spans`, the code behind `ppl_cli.py --tokens-out`: the pieces
    concatenate back to the text exactly (a token that only completes a multi-byte character
    gets an empty piece). A slow tokenizer's tokens are decoded one by one instead."""
    if getattr(tokenizer, "is_fast", False):
        _, spans = token_spans(tokenizer, text)
        return [text[start:end] for start, end in spans]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode([i]) for i in ids]


def surprisal_band(nll):
    if nll is None:
        return None
    return next(label for upper, label in SURPRISAL_BANDS if nll < upper)


def highlighted_tokens(tokens):
    """`gr.HighlightedText` value: each piece with its surprisal band."""
    return [(piece, surprisal_band(nll)) for piece, nll in tokens]


def nll_frame(tokens):
    """`gr.LinePlot` data: the NLL of each scored token by its position in the text."""
    rows = [(position, piece, nll) for position, (piece, nll) in enumerate(tokens, start=1) if nll is not None]
    return pd.DataFrame(rows, columns=["position", "token", "nll"])


def summary_markdown(result):
    """The headline and the other units, as Markdown ("Perplexity 12.3456" first)."""
    return (
        f"### Perplexity {result['perplexity']:.4f}\n\n"
        "| NLL (nats / token) | bits per token | bits per byte | tokens scored | word perplexity | byte perplexity |\n"
        "|---|---|---|---|---|---|\n"
        f"| {result['nll']:.4f} | {result['bits_per_token']:.4f} | {result['bits_per_byte']:.4f} | {result['num_tokens']} "
        f"| {result['word_perplexity']:.4f} | {result['byte_perplexity']:.4f} |"
    )


def check_work(text, model, tokenizer, max_length, stride, add_start_token):
    """Refuse window settings that would feed the model far more tokens than the text has:
    a stride of 1 re-reads up to `max_length` tokens for every token scored."""
    settings = resolve_settings(model, tokenizer, max_length=max_length, stride=stride, add_start_token=add_start_token)
    num_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + (settings["start_token_id"] is not None)
    work = sum(stop - start for start, stop, _ in plan_windows(num_tokens, settings["max_length"], settings["stride"]))
    if work > MAX_WORK_FACTOR * num_tokens:
        raise Refusal(
            f"`stride` {settings['stride']} with `max_length` {settings['max_length']} would run {work} tokens through the "
            f"model for a text of {num_tokens}; this Space allows {MAX_WORK_FACTOR}x: raise `stride`."
        )


def compute_text(models, text, choice=None, max_length=None, stride=None, add_start_token=True, *, max_chars=DEFAULT_MAX_CHARS):
    """The text tab's handler: (summary Markdown, highlighted tokens, NLL plot data, result dict)."""
    check_text(text, max_chars)
    max_length = _optional_int(max_length, "max_length", zero_is_none=True)
    stride = _optional_int(stride, "stride", zero_is_none=True)
    add_start_token = _flag(add_start_token, "add_start_token", True)
    model, tokenizer = models.get(choice)
    with library_errors():
        check_work(text, model, tokenizer, max_length, stride, add_start_token)
        result, tokens = score_text(text, model, tokenizer, max_length=max_length, stride=stride,
                                    add_start_token=add_start_token)
    return summary_markdown(result), highlighted_tokens(tokens), nll_frame(tokens), result


# ---------------------------------------------------------------------------------------
# The compare tab: a variant of the default model against a reference variant
# ---------------------------------------------------------------------------------------

_variants = weakref.WeakKeyDictionary()  # model -> {variant: built copy}; dies with the model
_variants_lock = threading.Lock()


def model_variant(model, variant):
    """`model` itself ("float32 (original)"), a bfloat16 copy, or a dynamic int8 copy
    (`ppl_sources.quantize_dynamic_int8`); each copy is built once per process and model."""
    if variant not in VARIANTS:
        offered = ", ".join(repr(v) for v in VARIANTS)
        raise Refusal(f"Variant {_shown(variant)} is not offered by this Space; choose one of {offered}.")
    if variant == ORIGINAL:
        return model
    with _variants_lock:  # one build at a time; a second request for it waits and reuses it
        built = _variants.setdefault(model, {})
        if variant not in built:
            try:
                built[variant] = (copy.deepcopy(model).to(torch.bfloat16).eval() if variant == BFLOAT16
                                  else quantize_dynamic_int8(model))
            except ValueError as err:  # e.g. int8 of a model that is not float32 on the CPU
                raise Refusal(f"Could not build the {variant} variant: {err}") from None
        return built[variant]


def compare_text(text, model, tokenizer, reference, *, max_length=None, stride=None):
    """Score one text with `model` against `reference` on the same windows.

    Returns:
        (result, tokens): `result` is the dict `ppl_runner.evaluate_texts(model, tokenizer, [text],
        reference_model=reference, max_length=..., stride=...)` returns (the comparison keys
        included), and `tokens` a list of dicts covering the text in order, one per token:
        `token` (its piece of the text), and for a scored token `logprob`,
        `reference_logprob`, `delta_surprisal` (model NLL minus reference NLL, nats), `kl`
        (KL(reference || model), nats) and `same_top1` (None where unscored).
    """
    (row,) = text_rows(model, tokenizer, [text], compare=ModelReference(reference), keep_logprobs=True,
                       max_length=max_length, stride=stride, progress=False)
    result = pool_rows([row])
    pieces = token_pieces(tokenizer, text)
    unscored = len(pieces) - len(row["logprobs"])
    tokens = [{"token": piece, "logprob": None, "reference_logprob": None, "delta_surprisal": None, "kl": None,
               "same_top1": None} for piece in pieces[:unscored]]
    for piece, lp, ref, kl, same in zip(pieces[unscored:], row["logprobs"], row["reference_logprobs"], row["token_kl"].tolist(),
                                        row["token_same_top1"]):
        tokens.append({"token": piece, "logprob": lp, "reference_logprob": ref, "delta_surprisal": ref - lp, "kl": kl,
                       "same_top1": same})
    return result, tokens


def _number(value, digits=4):
    return "n/a" if value is None else f"{value:.{digits}f}"


def compare_markdown(result, variant, reference):
    """The comparison's numbers as Markdown ("Perplexity ratio 1.2345" first)."""
    quantiles = result["kl_divergence_quantiles"]
    interval = result.get("perplexity_ratio_ci")
    spread = f" (95% interval [{interval[0]:.4f}, {interval[1]:.4f}])" if interval else ""
    return (
        f"### Perplexity ratio {result['perplexity_ratio']:.4f}\n\n"
        f"Model **{variant}** against the reference **{reference}**, on the same {result['num_tokens']} tokens{spread}. "
        "KL is KL(reference ‖ model) per token, in nats.\n\n"
        "| model perplexity | reference perplexity | perplexity ratio | KL divergence (mean ± SE) | top-1 agreement | RMS Δp | NLL correlation |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {result['perplexity']:.4f} | {result['reference_perplexity']:.4f} | {result['perplexity_ratio']:.4f} "
        f"| {result['kl_divergence']:.4f} ± {result['kl_divergence_se']:.4f} | {100 * result['top1_agreement']:.2f}% "
        f"| {result['rms_delta_p']:.4f} | {_number(result['nll_correlation'])} |\n\n"
        "| KL p50 | KL p90 | KL p99 | KL max |\n"
        "|---|---|---|---|\n"
        f"| {quantiles['p50']:.4f} | {quantiles['p90']:.4f} | {quantiles['p99']:.4f} | {quantiles['max']:.4f} |"
    )


def delta_colour(delta):
    """Background for a token's Δ surprisal: red where the model is more surprised than the
    reference, blue where less, stronger up to `DELTA_SCALE` nats; none for unscored tokens."""
    if delta is None:
        return "transparent"
    red, green, blue = DELTA_RED if delta > 0 else DELTA_BLUE
    return f"rgba({red}, {green}, {blue}, {min(abs(delta) / DELTA_SCALE, 1.0) * 0.8:.3f})"


def token_title(token):
    if token["kl"] is None:
        return "not scored"
    return (f"Δ surprisal {token['delta_surprisal']:+.4f} nats (model {-token['logprob']:.4f}, reference "
            f"{-token['reference_logprob']:.4f}); KL {token['kl']:.4g}; top-1 {'same' if token['same_top1'] else 'differs'}")


def compare_html(tokens):
    """The text as spans (class `cmp-tok`), one per token, coloured by Δ surprisal, with its
    per-token KL and surprisals in the `title` (shown on hover)."""
    spans = "".join(
        f'<span class="cmp-tok" style="background-color: {delta_colour(token["delta_surprisal"])}" '
        f'title="{html.escape(token_title(token))}">{html.escape(token["token"], quote=False)}</span>'
        for token in tokens
    )
    legend = (
        '<div class="cmp-legend" style="margin-bottom: 0.5em; font-size: 0.9em">'
        f'<span style="background-color: {delta_colour(DELTA_SCALE)}; padding: 0 0.3em">more surprised than the reference</span> '
        f'<span style="background-color: {delta_colour(-DELTA_SCALE)}; padding: 0 0.3em">less surprised</span> '
        f"(full colour at ±{DELTA_SCALE:g} nats of Δ surprisal = model NLL − reference NLL); hover a token for its KL.</div>"
    )
    return f'<div class="cmp-view">{legend}<div class="cmp-text" style="white-space: pre-wrap; line-height: 1.7">{spans}</div></div>'


def kl_frame(tokens):
    """`gr.LinePlot` data: the KL and Δ surprisal of each scored token by its position."""
    rows = [(position, token["token"], token["kl"], token["delta_surprisal"])
            for position, token in enumerate(tokens, start=1) if token["kl"] is not None]
    return pd.DataFrame(rows, columns=["position", "token", "kl", "delta_surprisal"])


def compute_compare(models, text, variant=INT8, reference=ORIGINAL, max_length=None, stride=None, *,
                    max_chars=DEFAULT_MAX_CHARS):
    """The compare tab's handler: (summary Markdown, token HTML, KL plot data, result dict,
    per-token values), for two variants of the default model."""
    check_text(text, max_chars)
    max_length = _optional_int(max_length, "max_length", zero_is_none=True)
    stride = _optional_int(stride, "stride", zero_is_none=True)
    base, tokenizer = models.get(None)
    model, reference_model = model_variant(base, variant), model_variant(base, reference)
    with library_errors():
        check_work(text, base, tokenizer, max_length, stride, True)
        result, tokens = compare_text(text, model, tokenizer, reference_model, max_length=max_length, stride=stride)
    return compare_markdown(result, variant, reference), compare_html(tokens), kl_frame(tokens), result, tokens


def parse_logprobs(payload, max_chars=DEFAULT_MAX_JSON_CHARS):
    """`{"predictions": [...], "references": [...]}` from JSON text (or an already parsed dict)."""
    if isinstance(payload, str):
        if len(payload) > max_chars:
            raise Refusal(f"The JSON has {len(payload)} characters; this Space takes at most {max_chars}.")
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as err:
            raise Refusal(f"The input is not valid JSON: {err}.") from None
        except RecursionError:  # json.loads recurses once per level of nesting
            raise Refusal("The JSON is nested too deeply to read: expected lists of numbers, "
                          "one list (or one [seq_len, vocab_size] list of lists) per example.") from None
    if not isinstance(payload, dict) or not {"predictions", "references"} <= set(payload):
        raise Refusal('Expected a JSON object {"predictions": [[log-probs of example 1], ...], "references": [[target ids of example 1], ...]}.')
    return payload["predictions"], payload["references"]


def compute_logprobs(payload, ignore_index=-100, *, max_chars=DEFAULT_MAX_JSON_CHARS):
    """The log-probabilities tab's handler: (summary Markdown, the metric's result dict).

    Runs the metric's default configuration on per-token log-probabilities (or full
    distributions) and target ids; each request gets its own in-memory metric instance.
    """
    predictions, references = parse_logprobs(payload, max_chars)
    ignore_index = _optional_int(ignore_index, "ignore_index")
    with library_errors():
        metric = PerplexityMetric(ignore_index=ignore_index, keep_in_memory=True)
        result = metric.compute(predictions=predictions, references=references)
    interval = result["perplexity_ci"]
    spread = f"95% bootstrap interval over examples [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "one example: no interval"
    summary = (
        f"### Perplexity {result['perplexity']:.4f}\n\n"
        f"NLL {result['nll']:.4f} nats per token over {result['num_tokens']} tokens; "
        f"{spread}; "
        f"mean of per-example perplexities {result['mean_perplexity']:.4f}."
    )
    return summary, result


def read_upload(path, max_chars=DEFAULT_MAX_CHARS):
    """The text of an uploaded UTF-8 file, for the text box."""
    if not path:
        return gr.skip()
    path = Path(path)
    if path.stat().st_size > 4 * max_chars:  # UTF-8 takes at most 4 bytes a character
        raise Refusal(f"The file is larger than this Space's limit of {max_chars} characters.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise Refusal("The file is not UTF-8 text.") from None
    check_text(text, max_chars)
    return text


# ---------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------


def on_click(button, handler, inputs, outputs, api_name):
    """`button` runs `handler` on the raw values (preprocess=False: the handlers check each field and
    name it, where Gradio's preprocessing would turn a text 5 into "5", round max_length 8.5 to 8 and
    answer max_length "abc" with its generic "upstream app raised an exception"). A failed run
    empties `outputs`: the last result left beside the error would read as the new answer."""
    event = button.click(handler, inputs, outputs, api_name=api_name, preprocess=False)
    event.failure(lambda: [None] * len(outputs), None, outputs, api_visibility="private", queue=False,
                  show_progress="hidden")


def window_fields():
    """The `max_length` and `stride` number fields, side by side (0: the default)."""
    with gr.Row():
        max_length = gr.Number(value=0, precision=0, label="max_length", info="tokens per window; 0: the model's context")
        stride = gr.Number(value=0, precision=0, label="stride", info="tokens a window advances; 0: max_length")
    return max_length, stride


def build_demo(model=None, tokenizer=None, *, models=None, max_chars=None, max_json_chars=None,
               concurrency=None, queue_size=None, card=None):
    """Build the Gradio app.

    Args:
        model, tokenizer: the default model (default: the embedded SmolLM2-135M, loaded now).
        models: allow-listed Hub ids (default: $PERPLEXITY_APP_MODELS).
        max_chars, max_json_chars, concurrency, queue_size: limits (default: the environment
            variables in this module's docstring, else their defaults).
        card: Markdown shown under "Metric card" (default: README.md without front matter).
    """
    label = None
    if model is None and tokenizer is None:
        model, tokenizer = load_model()
        label = default_model_label()
    allowed = allowed_models() if models is None else allowed_models(",".join(models))
    registry = Models(model, tokenizer, allowed=allowed, default_label=label)
    max_chars = max_chars or _env_int("PERPLEXITY_APP_MAX_CHARS", DEFAULT_MAX_CHARS)
    max_json_chars = max_json_chars or _env_int("PERPLEXITY_APP_MAX_JSON_CHARS", DEFAULT_MAX_JSON_CHARS)
    concurrency = concurrency or _env_int("PERPLEXITY_APP_CONCURRENCY", DEFAULT_CONCURRENCY)
    queue_size = queue_size or _env_int("PERPLEXITY_APP_QUEUE_SIZE", DEFAULT_QUEUE_SIZE)
    card = read_card() if card is None else card

    @refusals_logged
    def on_text(text, choice, max_length, stride, add_start_token):
        return compute_text(registry, text, choice, max_length, stride, add_start_token, max_chars=max_chars)

    @refusals_logged
    def on_logprobs(payload, ignore_index):
        return compute_logprobs(payload, ignore_index, max_chars=max_json_chars)

    @refusals_logged
    def on_upload(path):
        return read_upload(path, max_chars)

    @refusals_logged
    def on_compare(text, variant, reference, max_length, stride):
        return compute_compare(registry, text, variant, reference, max_length, stride, max_chars=max_chars)

    with gr.Blocks(title="Perplexity") as demo:
        gr.Markdown(
            "# Perplexity\n"
            "How well a language model predicts a text: `exp(mean negative log-likelihood per token)`; lower is better. "
            "The numbers are those of the `perplexity_metric` evaluate module."
        )
        with gr.Tabs():
            with gr.Tab("Text"):
                with gr.Row():
                    with gr.Column(scale=3):
                        text = gr.Textbox(
                            value=EXAMPLE_TEXT, label="Text", lines=7, max_lines=20, placeholder="Paste a text to score", elem_id="text-input",
                        )
                        upload = gr.UploadButton("Upload a text file (.txt, .md)", file_types=[".txt", ".md"],
                                                 type="filepath", size="sm", variant="secondary")
                    with gr.Column(scale=2):
                        choice = gr.Dropdown(registry.choices, value=registry.default_label, label="Model",
                                             allow_custom_value=False)
                        max_length, stride = window_fields()
                        add_start = gr.Checkbox(value=True, label="Start token (score the text's first token too)")
                        button = gr.Button("Compute", variant="primary")
                summary = gr.Markdown(label="Summary", elem_id="text-summary")
                tokens = gr.HighlightedText(
                    label="Tokens coloured by surprisal (negative log-likelihood)", color_map=SURPRISAL_COLOURS,
                    show_legend=True, show_inline_category=False, elem_id="text-tokens",
                )
                plot = gr.LinePlot(x="position", y="nll", tooltip=["position", "token", "nll"], x_title="token position",
                                   y_title="NLL (nats)", label="Negative log-likelihood along the text", height=260)
                with gr.Accordion("Full result (the metric's dict)", open=False):
                    text_result = gr.JSON(label="Result", show_label=False)
            with gr.Tab("Log-probabilities"):
                gr.Markdown(
                    "Per-token log-probabilities of the targets (natural log) and the target ids, one list per example, "
                    "run through the metric's default configuration. Full distributions (`[seq_len, vocab_size]` per "
                    "example) work too. Targets equal to `ignore_index` do not count."
                )
                payload = gr.Code(value=EXAMPLE_LOGPROBS, language="json", label="predictions and references (JSON)",
                                  lines=6, interactive=True)
                ignore_index = gr.Number(value=-100, precision=0, label="ignore_index",
                                         info="targets equal to it do not count (padding, prompt tokens)")
                lp_button = gr.Button("Compute metric", variant="primary")
                lp_summary = gr.Markdown(label="Summary", elem_id="logprobs-summary")
                lp_result = gr.JSON(label="Result")
            with gr.Tab("Compare"):
                gr.Markdown(
                    f"Compare a variant of **{registry.default_label}** with a reference variant on the same text and "
                    "windows: the perplexity ratio, the KL divergence of the model's next-token distribution from the "
                    "reference's, top-1 agreement and more. `bfloat16` is a bfloat16 copy; `dynamic int8` is torch's "
                    "dynamic int8 quantization of every linear layer but the output layer (CPU; lossy on this model). "
                    "Each variant is built once, on first use."
                )
                with gr.Row():
                    with gr.Column(scale=3):
                        cmp_text = gr.Textbox(value=EXAMPLE_TEXT, label="Text", lines=7, max_lines=20,
                                              placeholder="Paste a text to compare on", elem_id="compare-input")
                    with gr.Column(scale=2):
                        with gr.Row():
                            cmp_variant = gr.Dropdown(list(VARIANTS), value=INT8, label="Model", allow_custom_value=False)
                            cmp_reference = gr.Dropdown(list(VARIANTS), value=ORIGINAL, label="Reference",
                                                        allow_custom_value=False)
                        cmp_max_length, cmp_stride = window_fields()
                        cmp_button = gr.Button("Run comparison", variant="primary")
                cmp_summary = gr.Markdown(label="Comparison", elem_id="compare-summary")
                cmp_tokens = gr.HTML(label="Tokens coloured by Δ surprisal", elem_id="compare-tokens")
                cmp_plot = gr.LinePlot(x="position", y="kl", tooltip=["position", "token", "kl", "delta_surprisal"],
                                       x_title="token position", y_title="KL (nats)",
                                       label="KL(reference ‖ model) along the text", height=260,
                                       elem_id="compare-kl-plot")
                with gr.Accordion("Full result and per-token values", open=False):
                    cmp_result = gr.JSON(label="Result")
                    cmp_token_values = gr.JSON(label="Per token")
            if card:
                with gr.Tab("Metric card"):
                    gr.Markdown(card)

        on_click(button, on_text, [text, choice, max_length, stride, add_start], [summary, tokens, plot, text_result],
                 "compute_text")
        # preprocessed: Gradio hands over only a path in its own upload folder
        upload.upload(on_upload, upload, text, api_name="read_file")
        on_click(lp_button, on_logprobs, [payload, ignore_index], [lp_summary, lp_result], "compute_logprobs")
        on_click(cmp_button, on_compare, [cmp_text, cmp_variant, cmp_reference, cmp_max_length, cmp_stride],
                 [cmp_summary, cmp_tokens, cmp_plot, cmp_result, cmp_token_values], "compare")

    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size)
    return demo


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # refusals: one line each
    build_demo().launch()
