"""Model-card reporting (`update_model_card`): written offline, read back with
huggingface_hub exactly, replaced rather than duplicated, the card's own text and other
metadata kept, bad results refused."""

import math

import pytest
from huggingface_hub import ModelCard

from perplexity_metric import update_model_card

RESULTS = {"perplexity": 12.345678901234567, "word_perplexity": 30.5, "byte_perplexity": 1.75, "bits_per_byte": 0.8073549220576041,
           "nll": 2.5, "num_tokens": 1000, "perplexities": [12.0, 13.0]}
WHERE = {"model_name": "tiny-model", "dataset_type": "wikitext", "dataset_name": "WikiText-2", "dataset_config": "wikitext-2-raw-v1"}


def entries(path):
    """(split, metric type) -> value, failing on duplicates."""
    found = {}
    for r in ModelCard.load(path).data.eval_results:
        key = (r.dataset_split, r.metric_type)
        assert key not in found, f"duplicate entry {key}"
        found[key] = r.metric_value
    return found


def test_new_card_reads_back_exactly(tmp_path):
    path = update_model_card(tmp_path / "README.md", RESULTS, dataset_split="test", **WHERE)
    assert path == tmp_path / "README.md" and path.is_file()
    card = ModelCard.load(path)
    assert card.data.model_name == "tiny-model"
    results = card.data.eval_results
    assert {r.metric_type: r.metric_value for r in results} == {
        k: RESULTS[k] for k in ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
    }
    for r in results:
        assert (r.task_type, r.dataset_type, r.dataset_name, r.dataset_config, r.dataset_split) == (
            "text-generation", "wikitext", "WikiText-2", "wikitext-2-raw-v1", "test"
        )
        assert r.metric_name  # a readable name for the Hub's widget


def test_new_card_has_one_metadata_block(tmp_path):
    path = update_model_card(tmp_path / "README.md", RESULTS, **WHERE)
    written = path.read_text(encoding="utf-8")
    assert written.startswith("---\nmodel-index:") and written.count("---\n") == 2, written
    assert ModelCard.load(path).text.strip() == "# tiny-model"


def test_card_without_metadata_gets_it(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# Hand-written card\n\nNo metadata yet.\n", encoding="utf-8")
    update_model_card(path, RESULTS, dataset_split="test", **WHERE)
    card = ModelCard.load(path)
    assert card.text.strip() == "# Hand-written card\n\nNo metadata yet."
    assert entries(path)[("test", "perplexity")] == RESULTS["perplexity"]


def test_folder_path_and_chosen_metrics(tmp_path):
    path = update_model_card(tmp_path, RESULTS, metrics=["perplexity"], **WHERE)
    assert path == tmp_path / "README.md"
    assert entries(path) == {(None, "perplexity"): RESULTS["perplexity"]}


def test_same_entry_is_replaced_other_split_added(tmp_path):
    path = tmp_path / "README.md"
    update_model_card(path, RESULTS, dataset_split="test", **WHERE)
    update_model_card(path, {"perplexity": 11.0}, dataset_split="test", **WHERE)
    found = entries(path)
    assert found[("test", "perplexity")] == 11.0  # replaced, not duplicated
    assert found[("test", "bits_per_byte")] == RESULTS["bits_per_byte"]  # untouched: not in the new results
    update_model_card(path, {"perplexity": 14.25}, dataset_split="validation", **WHERE)
    found = entries(path)
    assert found[("validation", "perplexity")] == 14.25 and found[("test", "perplexity")] == 11.0
    assert len(found) == 5


def test_existing_text_and_metadata_kept(tmp_path):
    path = tmp_path / "README.md"
    text = "# My model\n\nA model card written by hand.\n\n## Training\n\nDetails here.\n"
    path.write_text("---\nlicense: apache-2.0\ntags:\n- causal-lm\n- tiny\nlanguage: en\n---\n\n" + text, encoding="utf-8")
    update_model_card(path, RESULTS, dataset_split="test", **WHERE)
    update_model_card(path, {"perplexity": 9.5}, dataset_split="test", **WHERE)
    card = ModelCard.load(path)
    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["causal-lm", "tiny"]
    assert card.data.language == "en"
    assert card.text.strip() == text.strip()
    assert entries(path)[("test", "perplexity")] == 9.5


@pytest.mark.parametrize(
    "results, message",
    [
        ({"nll": 2.5, "num_tokens": 10}, "to hold one of"),
        ({}, "to hold one of"),
        ({"perplexity": math.nan}, "finite"),
        ({"perplexity": math.inf}, "finite"),
        ({"perplexity": 3.0, "bits_per_byte": -math.inf}, "finite"),
    ],
    ids=["no-metric-key", "empty", "nan", "inf", "one-bad-of-two"],
)
def test_bad_results_refused(tmp_path, results, message):
    path = tmp_path / "README.md"
    with pytest.raises(ValueError, match=message):
        update_model_card(path, results, **WHERE)
    assert not path.exists()  # nothing half-written


def test_bad_metric_choice_refused_and_card_untouched(tmp_path):
    path = tmp_path / "README.md"
    update_model_card(path, RESULTS, dataset_split="test", **WHERE)
    before = path.read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="'nll'"):
        update_model_card(path, RESULTS, metrics=["nll"], dataset_split="test", **WHERE)
    with pytest.raises(ValueError, match="finite"):
        update_model_card(path, {"perplexity": math.nan}, dataset_split="test", **WHERE)
    assert path.read_text(encoding="utf-8") == before


def test_entries_with_other_window_settings_are_kept_beside(tmp_path):
    card = tmp_path / "README.md"
    for config, value in [("max_length=1024,stride=1024", 20.0), ("max_length=1024,stride=512", 18.0),
                          ("max_length=1024,stride=1024", 19.0)]:
        update_model_card(card, {"perplexity": value}, model_name="m", dataset_type="wikitext",
                          dataset_name="WikiText-2", metric_config=config)
    results = ModelCard.load(card).data.eval_results
    assert sorted((r.metric_config, r.metric_value) for r in results) == [
        ("max_length=1024,stride=1024", 19.0), ("max_length=1024,stride=512", 18.0)]
