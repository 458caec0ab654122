"""Models whose forward has no `logits_to_keep` (older or custom architectures): the runner
then takes logits for every position and scores only the targets, with the same numbers as
the trimmed path and as a float64 loop over the texts."""

import inspect

import pytest
import torch

from ppl_runner import score_texts

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A second, longer text: it has more words, so it spans several windows when they are short.",
    "Short.",
]


class PlainForward(torch.nn.Module):
    """A causal LM whose forward takes only ids, mask and positions: no `logits_to_keep`."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.train(inner.training)  # the runner restores this mode afterwards, on `inner` too

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def float64_logprobs(model, tokenizer, text):
    """Target log-probs of one text in one window (start token first), log-softmax in float64."""
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()  # (seq_len - 1, vocab)
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def predictions(model, tokenizer, **options):
    return [lp for batch in score_texts(model, tokenizer, TEXTS, progress=False, **options) for lp in batch["predictions"]]


def test_the_wrapper_has_no_logits_to_keep(tiny):
    assert "logits_to_keep" in inspect.signature(tiny[0].forward).parameters
    assert "logits_to_keep" not in inspect.signature(PlainForward(tiny[0]).forward).parameters


@pytest.mark.parametrize("options", [{}, {"max_length": 8, "stride": 4, "batch_size": 3}, {"padding_side": "left"}],
                         ids=["one-window", "strided", "left-padded"])
def test_plain_forward_equals_the_trimmed_path(tiny, options):
    model, tokenizer = tiny
    plain, trimmed = predictions(PlainForward(model), tokenizer, **options), predictions(model, tokenizer, **options)
    assert [len(p) for p in plain] == [len(p) for p in trimmed]
    for p, t in zip(plain, trimmed):
        assert p == pytest.approx(t, rel=1e-5, abs=1e-5)


def test_plain_forward_equals_a_float64_loop(tiny):
    model, tokenizer = tiny
    for text, scored in zip(TEXTS, predictions(PlainForward(model), tokenizer)):
        assert scored == pytest.approx(float64_logprobs(model, tokenizer, text), rel=1e-5, abs=1e-5)
