"""Prompt-masked and chat scoring: `contexts=` against the real lm-evaluation-harness package,
long pairs, conversations against a hand-built mask on a real chat template, and bad input."""

import copy

import evaluate
import pytest
import torch

from conftest import ROOT
from ppl_runner import Chat, evaluate_texts, score_texts, split_pair

PAIRS = [
    ("The capital of France is", " Paris."),
    ("Question: what is two plus two? Answer: ", "Four."),  # trailing space moves to the continuation
    ("Trailing whitespace\n\n", "Next paragraph, after two newlines."),
    ("", "No context at all: with a start token the first word is scored too."),
    ("Unicode context: café, naïve,", " et voilà — ünïcödé."),
]
# SmolLM2-Instruct's chat template (as its tokenizer ships it), without the default system prompt
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is perplexity?"},
    {"role": "assistant", "content": "The exponential of the mean negative log-likelihood."},
    {"role": "user", "content": "And lower is better?"},
    {"role": "assistant", "content": "Yes: lower means the model was less surprised."},
]


@pytest.fixture(scope="module")
def text_metric():
    return evaluate.load(str(ROOT / "perplexity_metric.py"), "text")


def float64_scored_sum(model, ids, scored):
    """Independent reference: one float64 forward pass, log-softmax, the scored targets summed."""
    reference = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(torch.tensor([ids])).logits[0, :-1], -1)
    return sum(logprobs[t - 1, ids[t]].item() for t in range(1, len(ids)) if scored[t])


def test_log_likelihoods_equal_lm_eval_loglikelihood(tiny):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny
    pairs = [p for p in PAIRS if p[0]]  # lm-eval puts its own end-of-text token before an empty context
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu")
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    theirs = [loglikelihood for loglikelihood, _ in harness.loglikelihood(requests)]
    ours = evaluate_texts(model, tokenizer, [c for _, c in pairs], contexts=[x for x, _ in pairs], add_start_token=False,
                          batch_size=3, progress=False)
    assert ours["log_likelihoods"] == pytest.approx(theirs, rel=1e-5, abs=1e-4)
    assert ours["num_documents"] == len(pairs)


def test_text_mode_contexts_against_a_float64_loop(text_metric, tiny):
    model, tokenizer = tiny
    result = text_metric.compute(predictions=[c for _, c in PAIRS], contexts=[x for x, _ in PAIRS], model=model,
                                 tokenizer=tokenizer)
    for (context, continuation), got in zip(PAIRS, result["log_likelihoods"]):
        stripped = context.rstrip()  # lm-eval's split, written out by hand
        whole = tokenizer(stripped + context[len(stripped):] + continuation, add_special_tokens=False)["input_ids"]
        split = len(tokenizer(stripped, add_special_tokens=False)["input_ids"]) if stripped else 0
        ids = [tokenizer.bos_token_id] + whole
        scored = [i > split for i in range(len(ids))]
        assert got == pytest.approx(float64_scored_sum(model, ids, scored), rel=1e-5, abs=1e-5)


def test_a_long_pair_scores_the_continuation_in_the_windows_of_the_whole_text_as_a_float64_loop(tiny):
    from lm_eval.utils import get_rolling_token_windows

    model, tokenizer = tiny
    context = " ".join(["The context goes on and on."] * 20)  # far longer than max_length=32
    continuation = " and then the continuation, itself longer than one window of thirty-two tokens, ends here."
    (pair,) = score_texts(model, tokenizer, [continuation], contexts=[context], max_length=32, stride=16, progress=False)
    context_ids, cont_ids = split_pair(tokenizer, context, continuation)
    assert context_ids == tokenizer(context, add_special_tokens=False)["input_ids"] and len(cont_ids) > 32
    assert pair["references"][0] == cont_ids
    # Reference: the whole text's windows as lm-eval draws them (stride 16 of 32 is its context_len
    # 32 - 16 + 1: each scored token conditioned on >= 17 tokens), one float64 forward per window;
    # the continuation's tokens are the last len(cont_ids) targets of the whole text.
    reference = copy.deepcopy(model).double().eval()
    logprobs = []
    for fed, predicted in get_rolling_token_windows(context_ids + cont_ids, tokenizer.bos_token_id, 32, context_len=17):
        with torch.no_grad():
            window = torch.log_softmax(reference(torch.tensor([fed])).logits[0, -len(predicted):], -1)
        logprobs += window.gather(-1, torch.tensor(predicted)[:, None])[:, 0].tolist()
    assert pair["predictions"][0] == pytest.approx(logprobs[-len(cont_ids):], rel=1e-5, abs=1e-5)


def test_chat_scores_the_assistant_turns_only(text_metric, tiny):
    model, tokenizer = tiny
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    result = text_metric.compute(conversations=[CONVERSATION], model=model, tokenizer=tokenizer)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CONVERSATION)  # rendered by hand
    spans = []
    for m in CONVERSATION:
        if m["role"] == "assistant":
            start = text.index(f"<|im_start|>assistant\n{m['content']}") + len("<|im_start|>assistant\n")
            spans.append((start, start + len(m["content"]) + len("<|im_end|>\n")))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    scored = [any(a <= begin < b for a, b in spans) for begin, _ in encoding["offset_mapping"]]
    assert result["num_tokens"] == sum(scored) > 0
    assert result["log_likelihoods"][0] == pytest.approx(float64_scored_sum(model, encoding["input_ids"], scored), rel=1e-5)


@pytest.mark.slow
def test_chat_on_the_real_template_scores_exactly_the_assistant_content_and_end_of_turn(smol):
    """The mask built from the rendered text alone: each assistant message's content, found by
    string search, plus the end of its turn as the README documents it ('<|im_end|>' and the
    newline the template writes after it); never the '<|im_start|>assistant\\n' header."""
    model, tokenizer = smol
    assert tokenizer.chat_template  # SmolLM2-Instruct's own, from the GGUF
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    spans, searched = [], 0
    for m in CONVERSATION:
        if m["role"] == "assistant":
            start = text.index(m["content"] + "<|im_end|>\n", searched)
            assert text[:start].endswith("<|im_start|>assistant\n")  # the header, just before, stays unscored
            searched = start + len(m["content"] + "<|im_end|>\n")
            spans.append((start, searched))
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    assert not any(begin < edge < end for begin, end in offsets for span in spans for edge in span)  # none straddles
    scored = [t for t, (begin, end) in enumerate(offsets) if any(a <= begin and end <= b for a, b in spans)]
    turns = "".join(m["content"] + "<|im_end|>\n" for m in CONVERSATION if m["role"] == "assistant")
    assert tokenizer.decode([ids[t] for t in scored]) == turns  # the mask covers those characters, no more
    (result,) = score_texts(model, tokenizer, [Chat(CONVERSATION)], progress=False)
    assert result["references"][0] == [ids[t] for t in scored]
    with torch.no_grad():  # each scored token with the whole conversation before it
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    expected = [logprobs[t - 1, ids[t]].item() for t in scored]
    assert result["predictions"][0] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    summary = evaluate_texts(model, tokenizer, conversations=[CONVERSATION], progress=False)
    assert summary["num_tokens"] == len(scored) and summary["log_likelihoods"][0] == pytest.approx(sum(expected), rel=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"predictions": ["a", "b"], "contexts": ["only one"]}, ValueError, "`contexts` to hold one string per item"),
    ({"predictions": ["a"], "contexts": [3]}, TypeError, r"`contexts\[0\]` to be a string"),
    ({"predictions": [""], "contexts": ["context"]}, ValueError, r"`predictions\[0\]` to have at least one token"),
    ({"conversations": [[{"role": "user", "content": "hi"}]]}, ValueError, "assistant message"),
    ({"conversations": [[{"role": "assistant"}]]}, TypeError, r"`conversations\[0\]\[0\]`"),
    ({"conversations": "not a list"}, TypeError, "`conversations`"),
])
def test_bad_prompt_input_is_named(text_metric, tiny, kwargs, error, match):
    model, tokenizer = tiny
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    with pytest.raises(error, match=match):
        text_metric.compute(model=model, tokenizer=tokenizer, **kwargs)


def test_a_tokenizer_without_a_chat_template_is_named(text_metric, tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="chat template"):
        text_metric.compute(conversations=[CONVERSATION], model=model, tokenizer=tokenizer)


def test_conversations_the_template_cannot_split_are_refused(tiny):
    model, tokenizer = tiny
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    with pytest.raises(ValueError, match="starts with the assistant"):
        evaluate_texts(model, tokenizer, conversations=[CONVERSATION[2:]], progress=False)
    # a generation prompt that is not how an assistant turn renders: the turns cannot be found
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'][0]|upper + ': ' + m['content'] + '\\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'Assistant says: ' }}{% endif %}")
    with pytest.raises(ValueError, match="prefix of its continuation"):
        evaluate_texts(model, tokenizer, conversations=[CONVERSATION], progress=False)


def test_a_bad_text_in_the_per_text_helpers_is_named_not_an_index_error(tiny):
    from ppl_runner import nll_per_text

    for texts in (["hello world", ""], ["", "x"]):
        with pytest.raises(ValueError, match=r"`texts\[\d\]`"):
            nll_per_text(*tiny, texts, progress=False)
