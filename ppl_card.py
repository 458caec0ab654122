"""Write perplexity results into a model card's `model-index` metadata, offline.

Uses `huggingface_hub`'s ModelCard / EvalResult, the same metadata that
`evaluate.push_to_hub` and `huggingface_hub.metadata_update` write online.
"""

import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard

# result key -> (metric type, readable name); the keys the metric returns that make sense in a card
_CARD_METRICS = {
    "perplexity": ("perplexity", "Perplexity"),
    "word_perplexity": ("word_perplexity", "Word perplexity"),
    "byte_perplexity": ("byte_perplexity", "Byte perplexity"),
    "bits_per_byte": ("bits_per_byte", "Bits per byte"),
}


def update_model_card(
    path,
    results,
    *,
    model_name,
    dataset_type,
    dataset_name,
    dataset_split=None,
    dataset_config=None,
    task_type="text-generation",
    metrics=None,
    metric_config=None,
):
    """Record perplexity results in the model card at `path` (a README.md or its folder).

    Creates the card if it is missing; keeps its other metadata and its text; replaces an
    existing entry that differs only in its value (`EvalResult.is_equal_except_value`: same
    task, data set, split, metric and `metric_config`) instead of adding a duplicate.

    Args:
        path: the card file, or a folder (its README.md).
        results: the metric's result dict (`perplexity`, optionally `word_perplexity`, ...).
        model_name: the model-index name; `ppl_sources.model_name(model_id, gguf_file)` names
            what `load_model` loaded.
        dataset_type, dataset_name, dataset_split, dataset_config: which data set was scored.
        metrics: which result keys to record (default: those of `perplexity`,
            `word_perplexity`, `byte_perplexity`, `bits_per_byte` present in `results`).
        metric_config: the settings behind the numbers, e.g. "max_length=2048,stride=512";
            entries with other settings are kept beside these, not replaced.

    Returns:
        The path of the card written.

    Raises:
        ValueError: no recordable metric in `results`, or a non-finite value.
    """
    path = Path(path)
    if path.is_dir() or path.suffix.lower() != ".md":
        path = path / "README.md"
    keys = metrics or [k for k in _CARD_METRICS if k in results]
    if not keys:
        raise ValueError(f"Expected `results` to hold one of {sorted(_CARD_METRICS)}, but got keys {sorted(results)}.")
    new = []
    for key in keys:
        if key not in _CARD_METRICS or key not in results:
            raise ValueError(f"Expected `metrics` among the keys of `results` and {sorted(_CARD_METRICS)}, but got {key!r}.")
        value = float(results[key])
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"Expected a finite `results[{key!r}]`, but got {value}.")
        metric_type, metric_name = _CARD_METRICS[key]
        new.append(
            EvalResult(
                task_type=task_type,
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_config=dataset_config,
                dataset_split=dataset_split,
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=value,
                metric_config=metric_config,
            )
        )
    if path.is_file():
        card = read_model_card(path)
    else:
        card = ModelCard(f"---\n{{}}\n---\n\n# {model_name}\n")  # "{}": an empty metadata block that parses
    data = card.data
    kept = [old for old in (data.eval_results or []) if not any(n.is_equal_except_value(old) for n in new)]
    data.eval_results = kept + new
    data.model_name = model_name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # then a rename: a crash never leaves half a card
    try:
        card.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_model_card(path):
    """The card at `path`; a card whose YAML front matter does not parse is a ValueError naming it."""
    try:
        return ModelCard.load(path)
    except Exception as err:  # huggingface_hub raises yaml's own errors, or ValueError for a non-dict
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"Cannot read the model card {str(path)!r}: its metadata (the YAML between the --- lines) "
                         f"does not parse: {first}") from err
