"""The Space (app.py): its plain request functions on the tiny model, a real Gradio server
called through gradio_client (eight requests at once), `python app.py` itself, and a real
browser (Debian's chromium through playwright) on the embedded SmolLM2-135M.

Every number is checked against the metric's own text mode (or default configuration), or
for the compare tab against `ppl_runner.evaluate_texts(..., reference_model=...)`, on the
same model and options: the app must not have math of its own."""

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import evaluate
import gradio as gr
import pytest
import torch

import app
import ppl_compare
import ppl_runner
import ppl_sources
from conftest import AUTO_VS_CPU_REL

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]

TEXT = "The quick brown fox jumps over the lazy dog. Café, déjà vu — 東京.\n\nA second paragraph follows here."
OPTIONS = [{}, {"max_length": 8, "stride": 4}, {"add_start_token": False}]


@pytest.fixture(scope="module")
def text_metric():
    return evaluate.load(str(ROOT / "perplexity_metric.py"), "text")


@pytest.fixture(scope="module")
def logprobs_metric():
    return evaluate.load(str(ROOT / "perplexity_metric.py"))


# ---------------------------------------------------------------------------------------
# Plain functions, tiny model
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "strided", "no-start-token"])
def test_score_text_equals_metric_text_mode(tiny, text_metric, options):
    model, tokenizer = tiny
    result, tokens = app.score_text(TEXT, model, tokenizer, **options)
    assert result == text_metric.compute(predictions=[TEXT], model=model, tokenizer=tokenizer, **options)
    assert "".join(piece for piece, _ in tokens) == TEXT  # the per-token view covers the text exactly
    scored = [nll for _, nll in tokens if nll is not None]
    assert len(scored) == result["num_tokens"]
    assert math.isclose(math.fsum(scored) / len(scored), result["nll"], rel_tol=1e-12)
    assert (tokens[0][1] is None) == (options.get("add_start_token") is False)


def test_compute_text_outputs(tiny, text_metric):
    model, tokenizer = tiny
    models = app.Models(model, tokenizer)
    summary, highlighted, frame, result = app.compute_text(models, TEXT, models.default_label, 8.0, 4.0, True)
    expected = text_metric.compute(predictions=[TEXT], model=model, tokenizer=tokenizer, max_length=8, stride=4)
    assert result == expected
    assert summary.startswith(f"### Perplexity {expected['perplexity']:.4f}\n")
    assert f"| {expected['num_tokens']} |" in summary
    assert "".join(piece for piece, _ in highlighted) == TEXT
    assert {band for _, band in highlighted} <= set(app.SURPRISAL_COLOURS)
    assert list(frame.columns) == ["position", "token", "nll"] and len(frame) == expected["num_tokens"]
    # 0 in the number fields means "the default", as the page's empty fields arrive
    assert app.compute_text(models, TEXT, None, 0, 0, True)[3] == text_metric.compute(
        predictions=[TEXT], model=model, tokenizer=tokenizer
    )


def test_compute_text_refusals(tiny):
    models = app.Models(*tiny)
    with pytest.raises(gr.Error, match="has 31 characters; this Space scores at most 30"):
        app.compute_text(models, "x" * 31, max_chars=30)
    with pytest.raises(gr.Error, match="Enter a text"):
        app.compute_text(models, "  \n")
    with pytest.raises(gr.Error, match="whole number"):
        app.compute_text(models, TEXT, None, 8.5)
    with pytest.raises(gr.Error, match=r"stride.*\[1, max_length=8\]"):  # the runner's own message
        app.compute_text(models, TEXT, None, 8, 9)


WORK_TEXT = "word " * 59  # stride 1 with max_length 64 on it: refused by check_work, a Refusal in the library call
WORK_REFUSAL = ("`stride` 1 with `max_length` 64 would run 3520 tokens through the model for a text of 119; this Space "
                "allows 8x: raise `stride`.")
SURROGATE_REFUSAL = "Expected the text to be valid Unicode text, but it holds a lone surrogate (U+D800) at character 4."


def test_refusals_pass_unwrapped_without_quotes(tiny):
    """gr.Error is a ValueError: the handlers' `except ValueError` once wrapped it again, and
    the message arrived inside quotes (gr.Error's str() is its repr)."""
    models = app.Models(*tiny)
    calls = [lambda: app.compute_text(models, WORK_TEXT, None, 64, 1),
             lambda: app.compute_compare(models, WORK_TEXT, app.BFLOAT16, app.ORIGINAL, 64, 1)]
    for call in calls:
        with pytest.raises(app.Refusal) as refused:
            call()
        assert str(refused.value) == refused.value.message == WORK_REFUSAL
        assert refused.value.print_exception is False  # Gradio prints no traceback for it
    for call in [lambda text: app.compute_text(models, text), lambda text: app.compute_compare(models, text, app.BFLOAT16)]:
        with pytest.raises(app.Refusal) as refused:  # not the tokenizer's "TextEncodeInput must be Union[...]"
            call("abc \ud800 def")
        assert str(refused.value) == SURROGATE_REFUSAL


def test_models_allow_list(tiny, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(app, "load_model", lambda model_id=None, **kw: loaded.append(model_id) or tiny)
    models = app.Models(*tiny, allowed=["owner/listed"])
    assert models.get(None) is models.get(models.default_label)
    for refused in ["owner/unlisted", str(tmp_path), "../owner/listed"]:
        with pytest.raises(gr.Error, match="not offered by this Space"):
            models.get(refused)
    assert loaded == []  # nothing refused was ever loaded
    assert models.get("owner/listed") == tiny and loaded == ["owner/listed"]

    assert app.allowed_models(" a/b, c ,a/b,, ") == ["a/b", "c"]
    monkeypatch.setenv("PERPLEXITY_APP_MODELS", "HuggingFaceTB/SmolLM2-360M")
    assert app.allowed_models() == ["HuggingFaceTB/SmolLM2-360M"]
    for bad in [str(tmp_path), "/etc", "../x", "a/b/c", "https://huggingface.co/gpt2", "owner/na--me", "owner/m.git", "x" * 97]:
        with pytest.raises(ValueError, match="not a Hub model id"):
            app.allowed_models(bad)


def test_compute_logprobs_equals_metric(logprobs_metric):
    payload = {"predictions": [[-1.5, -0.25, -3.0], [-0.5, -2.0, -1.0, -9.0]], "references": [[4, 5, 6], [1, 2, 3, -100]]}
    summary, result = app.compute_logprobs(json.dumps(payload))
    assert result == logprobs_metric.compute(**payload)
    assert summary.startswith(f"### Perplexity {result['perplexity']:.4f}")
    # ignore_index from the page's number field (a float), or empty: none, so -100 is a bad id
    one = json.dumps({"predictions": [[-1.5, -0.25, -3.0]], "references": [[4, 5, 6]]})
    assert app.compute_logprobs(one, 6.0)[1]["num_tokens"] == 2
    assert app.compute_logprobs(one, None)[1]["num_tokens"] == 3
    with pytest.raises(gr.Error, match="token ids >= 0"):
        app.compute_logprobs(json.dumps(payload), None)
    with pytest.raises(gr.Error, match="not valid JSON"):
        app.compute_logprobs("{predictions: [")
    with pytest.raises(gr.Error, match="Expected a JSON object"):
        app.compute_logprobs('{"predictions": [[-1.0]]}')
    with pytest.raises(gr.Error, match="log-probabilities <= 0"):  # the metric's own check
        app.compute_logprobs('{"predictions": [[0.5]], "references": [[1]]}')
    with pytest.raises(gr.Error, match="takes at most 10"):
        app.compute_logprobs(json.dumps(payload), max_chars=10)


def test_read_card_and_upload(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\ntitle: Perplexity\ntags:\n- evaluate\n---\n\n# Perplexity\n\n![the app](assets/app.png)\nText.\n")
    assert app.read_card(card) == "# Perplexity\n\nText."
    assert app.read_card(tmp_path / "missing.md") is None

    upload = tmp_path / "text.txt"
    upload.write_text("Grüße aus Köln.\n", encoding="utf-8")
    assert app.read_upload(str(upload)) == "Grüße aus Köln.\n"
    upload.write_bytes(b"\xff\xfe bad")
    with pytest.raises(gr.Error, match="not UTF-8"):
        app.read_upload(str(upload))
    upload.write_text("x" * 50)
    with pytest.raises(gr.Error, match="at most 20"):
        app.read_upload(str(upload), max_chars=20)


# ---------------------------------------------------------------------------------------
# The compare tab, tiny model
# ---------------------------------------------------------------------------------------

CMP_SPAN = re.compile(r'<span class="cmp-tok" style="background-color: ([^"]+)" title="([^"]*)">(.*?)</span>', re.S)


def check_compare_view(view, tokens, text):
    """The token HTML: one span per token, joining back to the text, each with its KL on hover."""
    import html

    spans = CMP_SPAN.findall(view)
    assert len(spans) == len(tokens)
    assert "".join(html.unescape(piece) for _, _, piece in spans) == text
    for (colour, title, _), token in zip(spans, tokens):
        if token["kl"] is None:
            assert title == "not scored" and colour == "transparent"
        else:
            assert f"KL {token['kl']:.4g};" in html.unescape(title)
            assert colour.startswith("rgba(198, 40, 40," if token["delta_surprisal"] > 0 else "rgba(21, 101, 192,")


@pytest.mark.parametrize("options", [{}, {"max_length": 8, "stride": 4}], ids=["default", "strided"])
def test_compare_equals_evaluate_texts(tiny, options):
    model, tokenizer = tiny
    models = app.Models(model, tokenizer)
    summary, view, frame, result, tokens = app.compute_compare(
        models, TEXT, app.BFLOAT16, app.ORIGINAL, float(options.get("max_length", 0)), float(options.get("stride", 0)))
    bf16 = app.model_variant(model, app.BFLOAT16)
    assert bf16 is app.model_variant(model, app.BFLOAT16) and bf16.dtype == torch.bfloat16  # built once
    assert app.model_variant(model, app.ORIGINAL) is model
    expected = ppl_runner.evaluate_texts(bf16, tokenizer, [TEXT], reference_model=model, progress=False, **options)
    assert result == expected and result["kl_divergence"] > 0
    assert summary.startswith(f"### Perplexity ratio {expected['perplexity_ratio']:.4f}\n")
    assert f"| {expected['kl_divergence']:.4f} ± {expected['kl_divergence_se']:.4f} |" in summary
    assert f"| {expected['kl_divergence_quantiles']['max']:.4f} |" in summary
    (row,) = ppl_runner.text_rows(bf16, tokenizer, [TEXT], compare=ppl_compare.ModelReference(model), keep_logprobs=True,
                                  progress=False, **options)
    assert [t["kl"] for t in tokens] == row["token_kl"].tolist()
    assert [t["delta_surprisal"] for t in tokens] == [r - lp for lp, r in zip(row["logprobs"], row["reference_logprobs"])]
    check_compare_view(view, tokens, TEXT)
    assert list(frame.columns) == ["position", "token", "kl", "delta_surprisal"] and len(frame) == expected["num_tokens"]


def test_compare_refusals(tiny):
    model, tokenizer = tiny
    models = app.Models(model, tokenizer)
    with pytest.raises(gr.Error, match="'float16' is not offered"):
        app.compute_compare(models, TEXT, "float16", app.ORIGINAL)
    with pytest.raises(gr.Error, match="has 31 characters; this Space scores at most 30"):
        app.compute_compare(models, "x" * 31, max_chars=30)
    with pytest.raises(gr.Error, match=r"stride.*\[1, max_length=8\]"):
        app.compute_compare(models, TEXT, app.BFLOAT16, app.ORIGINAL, 8, 9)
    with pytest.raises(gr.Error, match="Could not build the dynamic int8 variant: .*float32 model on the CPU"):
        app.model_variant(app.model_variant(model, app.BFLOAT16), app.INT8)


# ---------------------------------------------------------------------------------------
# A real Gradio server, tiny model, gradio_client
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server(tiny):
    demo = app.build_demo(*tiny, models=["owner/listed"], max_chars=300, concurrency=2, card="# Card")
    # no server_port: Gradio binds the first free port from 7860 itself and moves on when another
    # process took it first (a port picked here and bound later could be taken in between)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        assert demo.local_url == f"http://127.0.0.1:{demo.server_port}/"
        yield demo, demo.local_url
    finally:
        demo.close()


def test_server_endpoints_are_named(tiny_server):
    from gradio_client import Client

    demo, url = tiny_server
    api = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == {"/compute_text", "/compute_logprobs", "/read_file", "/compare"}
    assert api["unnamed_endpoints"] == {}
    assert demo._queue.default_concurrency_limit == 2 and demo._queue.max_size == app.DEFAULT_QUEUE_SIZE


def test_server_eight_concurrent_text_requests_run_two_at_a_time(tiny_server, tiny, text_metric, monkeypatch):
    from gradio_client import Client

    demo, url = tiny_server
    model, tokenizer = tiny
    running, peak, started, lock = [0], [0], [0], threading.Lock()
    first_two = threading.Barrier(2, timeout=30)
    score_text = app.score_text

    def counted(*args, **kwargs):  # how many requests compute at once
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            started[0] += 1
            order = started[0]
        try:
            if order <= 2:
                # The first two wait for each other: served one at a time, the first waits alone
                # until the barrier breaks, and the peak stays 1. Together, they then hold both
                # slots for a second, in which a third request would raise the peak if it ran.
                try:
                    first_two.wait()
                except threading.BrokenBarrierError:
                    pass
                time.sleep(1.0)
            return score_text(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(app, "score_text", counted)
    texts = [f"Request number {i}: {TEXT[: 20 + 9 * i]}" for i in range(8)]
    clients = [Client(url, verbose=False) for _ in texts]  # connected first: the eight requests leave together

    def call(client, text):
        return client.predict(text, None, 0, 0, True, api_name="/compute_text")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, clients, texts))
    for text, (summary, highlighted, _plot, result) in zip(texts, answers):
        expected = text_metric.compute(predictions=[text], model=model, tokenizer=tokenizer)
        assert result == expected
        assert summary.startswith(f"### Perplexity {expected['perplexity']:.4f}")
        assert "".join(item["token"] for item in highlighted) == text
    assert peak[0] == 2  # two requests computed together, never more: the queue's concurrency limit


def test_server_refusals_and_logprobs(tiny_server, logprobs_metric, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    _, url = tiny_server
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match="has 301 characters; this Space scores at most 300"):
        client.predict("y" * 301, None, 0, 0, True, api_name="/compute_text")
    with pytest.raises(AppError, match="owner/unlisted"):
        client.predict("Some text.", "owner/unlisted", 0, 0, True, api_name="/compute_text")
    with pytest.raises(AppError, match="Could not load model 'owner/listed'"):  # listed, but offline
        client.predict("Some text.", "owner/listed", 0, 0, True, api_name="/compute_text")

    payload = {"predictions": [[-1.25, -0.5], [-2.0, -0.75, -0.1]], "references": [[3, 4], [5, 6, -100]]}
    summary, result = client.predict(json.dumps(payload), -100, api_name="/compute_logprobs")
    assert result == logprobs_metric.compute(**payload)
    assert summary.startswith(f"### Perplexity {result['perplexity']:.4f}")

    upload = tmp_path / "upload.txt"
    upload.write_text("Uploaded text, ünïcode.", encoding="utf-8")
    assert client.predict(handle_file(str(upload)), api_name="/read_file") == "Uploaded text, ünïcode."


GENERIC = "The upstream Gradio app has raised an exception"  # what any exception but a gr.Error becomes
LOGPROBS = '{"predictions": [[-1.0]], "references": [[1]]}'
JSON_SHAPE = ('Expected a JSON object {"predictions": [[log-probs of example 1], ...], "references": [[target ids of '
              'example 1], ...]}.')
NUMBER_REFUSALS = [(field, value, f"Expected `{field}` to be a whole number, but got {shown}.")
                   for field in ("max_length", "stride") for value, shown in [("abc", "'abc'"), ([1], "[1]"), (8.5, "8.5")]]
MALFORMED = [  # (api_name, arguments, the exact message); Gradio's preprocessing would round 8.5 and score the text 5
    *[("/compute_text", (TEXT, None, value, 0, True) if field == "max_length" else (TEXT, None, 0, value, True), message)
      for field, value, message in NUMBER_REFUSALS],
    *[("/compare", (TEXT, app.BFLOAT16, app.ORIGINAL, value, 0) if field == "max_length" else
       (TEXT, app.BFLOAT16, app.ORIGINAL, 0, value), message) for field, value, message in NUMBER_REFUSALS],
    ("/compute_text", (5, None, 0, 0, True), "Enter a text to score: expected `text` to be a string, but got int 5."),
    ("/compute_text", (["a", "b"], None, 0, 0, True),
     "Enter a text to score: expected `text` to be a string, but got list ['a', 'b']."),
    ("/compute_text", (None, None, 0, 0, True), "Enter a text to score (or upload a .txt file)."),
    ("/compute_text", (TEXT, None, 0, 0, "no"), "Expected `add_start_token` to be true or false, but got 'no'."),
    ("/compute_text", (TEXT, ["x"], 0, 0, True), "Model ['x'] is not offered by this Space; choose one of "
                                                 "'GPT2LMHeadModel (default)', 'owner/listed'."),
    ("/compute_text", (WORK_TEXT, None, 64, 1, True), WORK_REFUSAL),
    ("/compare", (WORK_TEXT, app.BFLOAT16, app.ORIGINAL, 64, 1), WORK_REFUSAL),
    ("/compare", (TEXT, 3, app.ORIGINAL, 0, 0), "Variant 3 is not offered by this Space; choose one of "
                                                "'float32 (original)', 'bfloat16', 'dynamic int8'."),
    ("/compare", ({"text": "abc"}, app.BFLOAT16, app.ORIGINAL, 0, 0),
     "Enter a text to score: expected `text` to be a string, but got dict {'text': 'abc'}."),
    ("/compute_text", (list(range(100)), None, 0, 0, True),  # a long value cut short in the message
     "Enter a text to score: expected `text` to be a string, but got list [0, 1, 2, 3, 4, 5, ...]."),
    ("/compute_logprobs", ("[" * 100_000 + "]" * 100_000, -100),  # RecursionError inside json.loads
     "The JSON is nested too deeply to read: expected lists of numbers, one list (or one [seq_len, vocab_size] list of "
     "lists) per example."),
    ("/compute_logprobs", (5, -100), JSON_SHAPE),
    ("/compute_logprobs", (LOGPROBS, "abc"), "Expected `ignore_index` to be a whole number, but got 'abc'."),
    ("/compute_logprobs", (LOGPROBS, [1]), "Expected `ignore_index` to be a whole number, but got [1]."),
]


@pytest.fixture(scope="module")
def client(tiny_server):
    from gradio_client import Client

    return Client(tiny_server[1], verbose=False)


@pytest.mark.parametrize("api_name, arguments, message", MALFORMED, ids=[f"{a}-{i}" for i, (a, *_) in enumerate(MALFORMED)])
def test_server_malformed_call_gets_its_message(client, api_name, arguments, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as refused:
        client.predict(*arguments, api_name=api_name)
    assert str(refused.value) == message  # once, no quotes, not Gradio's generic message


def post_call(url, api_name, body):
    """A raw call to the HTTP API (POST, then the event's stream): the events' text, or the HTTP error."""
    import urllib.error

    request = urllib.request.Request(f"{url}gradio_api/call{api_name}", body.encode(), {"Content-Type": "application/json"})
    try:
        event = json.load(urllib.request.urlopen(request, timeout=30))["event_id"]
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}: {err.read().decode()}"
    return urllib.request.urlopen(f"{url}gradio_api/call{api_name}/{event}", timeout=30).read().decode()


def test_server_raw_http_calls(tiny_server):
    """A lone surrogate cannot leave gradio_client (it encodes to UTF-8 first) but arrives in JSON
    as "\\ud800"; a body nested too deeply to parse is the HTTP layer's 400, before any handler."""
    _, url = tiny_server
    for api_name, rest in [("/compute_text", "null, 0, 0, true"), ("/compare", f'"{app.BFLOAT16}", "{app.ORIGINAL}", 0, 0')]:
        answer = post_call(url, api_name, '{"data": ["abc \\ud800 def", %s]}' % rest)
        assert answer.startswith("event: error\n")
        assert json.loads(answer.split("data: ", 1)[1])["error"] == SURROGATE_REFUSAL
    deep = "[" * 5000 + "]" * 5000
    answer = post_call(url, "/compute_logprobs", '{"data": [{"predictions": %s, "references": [[1]]}, -100]}' % deep)
    assert answer == 'HTTP 400: {"detail":"There was an error parsing the body"}'


def test_server_logs_a_refusal_as_one_line_and_a_bug_with_its_traceback(tiny_server, client, caplog, capfd, monkeypatch):
    from gradio_client.exceptions import AppError

    capfd.readouterr()
    with caplog.at_level("WARNING", logger="perplexity_app"), pytest.raises(AppError):
        client.predict(WORK_TEXT, None, 64, 1, True, api_name="/compute_text")
    assert [(r.getMessage(), r.exc_info) for r in caplog.records] == [(f"refused: {WORK_REFUSAL}", None)]
    assert "Traceback" not in capfd.readouterr().err  # Gradio prints none for it

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the scorer")

    monkeypatch.setattr(app, "score_text", broken)
    caplog.clear()
    with pytest.raises(AppError, match=GENERIC):  # a bug's details stay in the server log
        client.predict(TEXT, None, 0, 0, True, api_name="/compute_text")
    err = capfd.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: a bug in the scorer" in err
    assert caplog.records == []  # not logged as the user's mistake


def test_server_compare(tiny_server, tiny):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    _, url = tiny_server
    model, tokenizer = tiny
    client = Client(url, verbose=False)
    summary, view, _plot, result, tokens = client.predict(TEXT, app.BFLOAT16, app.ORIGINAL, 0, 0, api_name="/compare")
    expected = ppl_runner.evaluate_texts(app.model_variant(model, app.BFLOAT16), tokenizer, [TEXT], reference_model=model,
                                         progress=False)
    assert result == expected
    assert summary.startswith(f"### Perplexity ratio {expected['perplexity_ratio']:.4f}")
    check_compare_view(view, tokens, TEXT)
    with pytest.raises(AppError, match="int4"):
        client.predict(TEXT, "int4", app.ORIGINAL, 0, 0, api_name="/compare")


# ---------------------------------------------------------------------------------------
# `python app.py` with the embedded model, and a real browser
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_app(tmp_path_factory):
    """`python app.py` as a Space runs it, configured through the environment only. No
    GRADIO_SERVER_PORT: Gradio binds the first free port from 7860 itself (moving on when another
    process holds one) and prints the address, which is read from its output. Yields (url, the
    path of its output: stdout and stderr, the server's log)."""
    log_path = tmp_path_factory.mktemp("served_app") / "output.log"
    log = log_path.open("w+")
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_SERVER_PORT"}
    env.update(GRADIO_SERVER_NAME="127.0.0.1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False",
               PERPLEXITY_APP_MAX_CHARS="400", PERPLEXITY_APP_MODELS="owner/listed")
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    try:
        url = None
        while True:
            log.seek(0)
            output = log.read()
            if process.poll() is not None:
                pytest.fail(f"python app.py exited with {process.returncode}: {output[-2000:]}")
            url = url or next(iter(re.findall(r"Running on local URL: +(http://127\.0\.0\.1:\d+)", output)), None)
            try:
                if url:
                    urllib.request.urlopen(url + "/config", timeout=2)
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"python app.py did not serve within 180 s: {output[-2000:]}")
            time.sleep(0.5)
        yield url + "/", log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.mark.slow
def test_python_app_py_serves_embedded_model(served_app, smol, text_metric):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, log = served_app
    client = Client(url, verbose=False)
    text = "Paris is the capital of France."
    *_, result = client.predict(text, None, 0, 0, True, api_name="/compute_text")
    expected = text_metric.compute(predictions=[text], model=smol[0], tokenizer=smol[1])
    assert result["num_tokens"] == expected["num_tokens"]
    assert math.isclose(result["perplexity"], expected["perplexity"], rel_tol=AUTO_VS_CPU_REL)  # another process, same weights
    with pytest.raises(AppError, match="scores at most 400"):  # PERPLEXITY_APP_MAX_CHARS
        client.predict("z" * 401, None, 0, 0, True, api_name="/compute_text")
    # the user's mistake is one line of the server's log (logged before the answer leaves), no traceback
    refused = ("The text has 401 characters; this Space scores at most 400. Shorten it, or run the metric locally "
               "for long texts.")
    assert re.search(rf"^\S+ \S+ WARNING perplexity_app: refused: {re.escape(refused)}\n(?!\s)", log.read_text(), re.M)
    assert "Traceback" not in log.read_text()
    choices = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/compute_text"]
    assert "owner/listed" in json.dumps(choices)  # PERPLEXITY_APP_MODELS


@pytest.mark.slow
def test_browser_computes_perplexity(served_app, smol, text_metric):
    """A result, then a refusal: its message once in the toast, unquoted, and the result cleared
    (left beside the error, it read as the new answer); the same on the log-probabilities tab."""
    if not CHROMIUM.is_file():
        pytest.fail("/usr/bin/chromium is absent: install Debian's package `chromium` (`make browser`, or as root "
                    "`apt-get install chromium`); playwright cannot download its own browser here")
    from playwright.sync_api import sync_playwright

    url, log = served_app
    text = "The cat sat on the mat, and the dog slept by the fire."
    expected = text_metric.compute(predictions=[text], model=smol[0], tokenizer=smol[1])
    with pytest.raises(app.Refusal) as too_much_work:  # a refusal that the handler once wrapped again, quoted
        app.check_work("word " * 79, *smol, max_length=64, stride=1, add_start_token=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.get_by_role("textbox").first.fill(text)
            page.get_by_role("button", name="Compute", exact=True).click()
            headline = page.locator("#text-summary h3")
            headline.wait_for(timeout=60_000)
            shown = re.fullmatch(r"Perplexity ([0-9.]+)", headline.inner_text().strip())
            assert shown, headline.inner_text()
            assert shown.group(1) == f"{expected['perplexity']:.4f}"
            summary = page.locator("#text-summary").inner_text()
            assert str(expected["num_tokens"]) in summary and f"{expected['bits_per_byte']:.4f}" in summary
            assert page.locator("#text-tokens").get_by_text("< 1 nat").count() >= 1  # the surprisal legend

            page.get_by_role("textbox").first.fill("word " * 79)
            page.get_by_role("spinbutton", name="max_length").first.fill("64")
            page.get_by_role("spinbutton", name="stride").first.fill("1")
            page.get_by_role("button", name="Compute", exact=True).click()
            toast = page.get_by_text("raise `stride`")
            toast.first.wait_for(timeout=30_000)
            assert toast.all_inner_texts() == [too_much_work.value.message]  # once, without quotes
            headline.wait_for(state="detached", timeout=10_000)  # the last result is cleared
            assert page.locator("#text-summary").inner_text().strip() == ""
            assert page.locator("#text-tokens").get_by_text("< 1 nat").count() == 0
            assert f"Perplexity {expected['perplexity']:.4f}" not in page.locator("body").inner_text()

            page.get_by_role("textbox").first.fill("w" * 401)  # over the limit: a clear message
            page.get_by_role("button", name="Compute", exact=True).click()
            page.get_by_text("this Space scores at most 400").first.wait_for(timeout=30_000)

            page.get_by_role("tab", name="Log-probabilities").click()
            page.get_by_role("button", name="Compute metric").click()
            lp_headline = page.locator("#logprobs-summary h3")
            lp_headline.wait_for(timeout=30_000)
            page.locator(".cm-content").fill(  # the JSON editor
                '{"predictions": [[0.5]], "references": [[1]]}')
            page.get_by_role("button", name="Compute metric").click()
            page.get_by_text("Expected log-probabilities <= 0").first.wait_for(timeout=30_000)
            lp_headline.wait_for(state="detached", timeout=10_000)
        finally:
            browser.close()
    shown = log.read_text()
    assert f"WARNING perplexity_app: refused: {too_much_work.value.message}\n" in shown and "Traceback" not in shown


@pytest.mark.slow
def test_browser_compares_int8_with_original(served_app, smol):
    """The compare tab's defaults (dynamic int8 against the float32 original) on the embedded model."""
    if not CHROMIUM.is_file():
        pytest.fail("/usr/bin/chromium is absent: install Debian's package `chromium` (`make browser`)")
    from playwright.sync_api import sync_playwright

    model, tokenizer = smol
    if next(model.parameters()).device.type != "cpu" or AUTO_VS_CPU_REL > 1e-9:
        pytest.skip("the served app runs on an accelerator, where dynamic int8 is refused")
    text = "The cat sat on the mat, and the dog slept by the fire."
    int8 = ppl_sources.quantize_dynamic_int8(model)
    expected = ppl_runner.evaluate_texts(int8, tokenizer, [text], reference_model=model, progress=False)
    (row,) = ppl_runner.text_rows(int8, tokenizer, [text], compare=ppl_compare.ModelReference(model), keep_logprobs=True,
                                  progress=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(served_app[0])  # (url, log)
            page.get_by_role("tab", name="Compare").click()
            page.locator("#compare-input textarea").fill(text)
            page.get_by_role("button", name="Run comparison").click()
            headline = page.locator("#compare-summary h3")
            headline.wait_for(timeout=90_000)
            assert headline.inner_text().strip() == f"Perplexity ratio {expected['perplexity_ratio']:.4f}"
            summary = page.locator("#compare-summary").inner_text()
            assert "dynamic int8" in summary and "float32 (original)" in summary
            quantiles = expected["kl_divergence_quantiles"]
            for shown in [f"{expected['perplexity']:.4f}", f"{expected['reference_perplexity']:.4f}",
                          f"{expected['kl_divergence']:.4f} ± {expected['kl_divergence_se']:.4f}",
                          f"{100 * expected['top1_agreement']:.2f}%", f"{expected['rms_delta_p']:.4f}",
                          f"{expected['nll_correlation']:.4f}", *(f"{quantiles[q]:.4f}" for q in ("p50", "p90", "p99", "max"))]:
                assert shown in summary

            spans = page.locator("#compare-tokens span.cmp-tok")
            assert spans.count() == expected["num_tokens"]  # a start token: every token is scored
            assert "".join(spans.all_text_contents()) == text
            titles = [spans.nth(i).get_attribute("title") for i in range(spans.count())]
            assert [re.search(r"KL (\S+);", t).group(1) for t in titles] == [f"{kl:.4g}" for kl in row["token_kl"]]
            deltas = [r - lp for lp, r in zip(row["logprobs"], row["reference_logprobs"])]
            worst = max(range(len(deltas)), key=lambda i: abs(deltas[i]))  # coloured at full strength
            colour = spans.nth(worst).evaluate("el => getComputedStyle(el).backgroundColor")
            assert colour.startswith("rgba(198, 40, 40" if deltas[worst] > 0 else "rgba(21, 101, 192"), colour
            page.locator("#compare-kl-plot canvas, #compare-kl-plot svg").first.wait_for(timeout=30_000)

            page.locator("#compare-input textarea").fill("  ")  # refused: the comparison above is cleared
            page.get_by_role("button", name="Run comparison").click()
            page.get_by_text("Enter a text to score").first.wait_for(timeout=30_000)
            headline.wait_for(state="detached", timeout=10_000)
            assert spans.count() == 0
        finally:
            browser.close()


def test_window_settings_that_multiply_the_work_are_refused(tiny):
    model, tokenizer = tiny
    text = "word " * 200
    with pytest.raises(gr.Error, match="raise `stride`"):
        app.check_work(text, model, tokenizer, max_length=64, stride=1, add_start_token=True)
    app.check_work(text, model, tokenizer, max_length=64, stride=16, add_start_token=True)  # 4x: allowed
