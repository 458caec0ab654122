"""What a document is, on every route: the one rule for which texts are scored, which are empty
(skipped and counted) and which are bad rows (`--bad-rows`: flagged in an `error` column, or
the run fails naming the document), and the words that name each.

The metric's explicit `texts` fail fast on both empty and bad ones (`check_texts`); corpus
routes (the command line on one process, torchrun or Ray) skip empty documents and apply the
bad-row policy, so every route scores the same documents of the same corpus.
"""

import collections.abc
import math
from typing import NamedTuple

MISSING, EMPTY = "missing text", "empty text"  # the `error` words of rows skipped as empty
SKIPPED = (MISSING, EMPTY)
BAD_ROWS = ("flag", "fail")


class Problem(NamedTuple):
    """Why a document cannot be scored: `flag` is what its `error` column says; `error(label)`
    the exception that names it when it must fail."""

    flag: str
    expected: str
    found: str
    error_type: type = ValueError

    @property
    def empty(self):
        return self.flag in SKIPPED

    def error(self, label):
        return self.error_type(f"Expected {label} {self.expected}, but {self.found}.")


def problem(text, *, tokenizer=None):
    """Why `text` cannot be scored, or None.

    Missing (None or NaN) and whitespace-only texts are empty: nothing in them is a document.
    A non-string, a lone surrogate (tokenizers reject it with a type error that names neither
    the text nor the character) and, when `tokenizer` is given (texts scored without a start
    token), a text of a single token are bad rows.
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return Problem(MISSING, "to be a string", f"it is missing ({text})", TypeError)
    if not isinstance(text, str):
        name = type(text).__name__
        return Problem(f"expected a string, but got {name}", "to be a string", f"got {name}", TypeError)
    if not text.strip():
        found = "it is empty" if not text else f"it holds only whitespace: {text[:20]!r}"
        return Problem(EMPTY, "to have at least one token to score", found)
    found = _surrogate(text)
    if found is not None:
        return found
    if tokenizer is not None:
        num_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if num_tokens < 2:
            return Problem(f"no token to score: {num_tokens} token and no start token",
                           "to have at least one token to score",
                           f"it has {num_tokens} token(s) and no start token: {text[:40]!r}")
    return None


def _surrogate(text):
    """The Problem of the first lone surrogate in `text` (as `json.loads` gives for "\\ud800"), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        where = f"a lone surrogate (U+{ord(text[err.start]):04X}) at character {err.start}"
        return Problem(f"not valid Unicode: {where}", "to be valid Unicode text", f"it holds {where}")
    return None


def check_unicode(text, label):
    """Refuse a lone surrogate in a string that is about to be tokenized, naming it by `label`."""
    found = _surrogate(text) if isinstance(text, str) else None
    if found is not None:
        raise found.error(label)


def check_text(text, label):
    """Refuse an explicit text that is empty or bad (`problem`), naming it by `label`: explicit
    texts fail fast, where a corpus route would skip or flag them."""
    found = problem(text)
    if found is not None:
        raise found.error(label)


def check_texts(texts, name="texts"):
    """`texts` as a new list (the caller's object is left alone), checked before any scoring:
    at least one, and none empty or bad. A bad text at index 10,000 fails now, not after hours."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, collections.abc.Iterable):
        raise TypeError(f"Expected `{name}` to be a list of strings, but got {type(texts).__name__}.")
    texts = list(texts)
    if not texts:
        raise ValueError(f"Expected at least one text in `{name}`, but got none.")
    for i, text in enumerate(texts):
        check_text(text, f"`{name}[{i}]`")
    return texts


def check_bad_rows(policy):
    if policy not in BAD_ROWS:
        raise ValueError(f"Expected `bad_rows` to be one of {list(BAD_ROWS)}, but got {policy!r}.")
    return policy
