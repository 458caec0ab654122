"""Shared fixtures: a tiny random GPT-2 with a small BPE tokenizer (built offline in about a
second), the real embedded SmolLM2-135M, and WikiText-2 where ../shared has it."""

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.test.tokens"


# Runs on device="auto" (the CLI's, the app's and text mode's default) compared with runs on the CPU:
# the same kernels where "auto" is the CPU; on a GPU other float32 kernels (and blockings) move
# per-text values by ~1e-6 relative, so those comparisons get 1e-4 there.
AUTO_VS_CPU_REL = 1e-9 if not torch.cuda.is_available() and not torch.backends.mps.is_available() else 1e-4


def reference_ppl(preds, target, ignore_index=None):
    """The five-line reference: exp of the mean cross-entropy, all in float64."""
    ignore = -100 if ignore_index is None else ignore_index  # None: no target equals -100 in the tests
    logits = preds.double().reshape(-1, preds.shape[-1])
    return torch.exp(F.cross_entropy(logits, target.reshape(-1), ignore_index=ignore)).item()


@contextlib.contextmanager
def one_intra_op_thread():
    """Tiny ops on 2 OpenMP threads cost ~10 ms each when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_tiny_tokenizer():
    """A byte-level BPE of 1000 tokens trained on the standard library's docs; '<|endoftext|>' is
    id 0 and serves as BOS and EOS; no pad token (the runner must cope)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ppl_corpus import default_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(default_corpus()[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def build_tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=1000, n_positions=256, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): random 2-layer GPT-2, context 256, vocab 1000."""
    return build_tiny_gpt2(), build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny GPT-2 and its tokenizer saved once, for processes that load the same weights."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    build_tiny_gpt2().save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer): the real embedded SmolLM2-135M (converted once, then cached)."""
    from ppl_sources import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def wikitext_paragraphs():
    if not WIKITEXT.is_file():
        pytest.skip("../shared/data/wikitext-2 is absent (it is not part of the repository)")
    from ppl_corpus import split_paragraphs

    return split_paragraphs(WIKITEXT.read_text(encoding="utf-8"))


def write_gguf(model, tokenizer, path):
    """A float32 GGUF of a GPT-2 as llama.cpp's converter writes one (its tensor names, Conv1D weights
    transposed, the head tied to the embedding), with the byte-level BPE tokenizer in its metadata:
    loads in a fraction of a second, where the embedded SmolLM2 GGUF takes ~27 s."""
    import json

    import gguf
    import numpy as np

    config = model.config
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name(path.stem)
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_token_types([gguf.TokenType.CONTROL if t in tokenizer.all_special_tokens else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding: no output.weight in the file
            continue
        base, suffix = name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        array = tensor.float().numpy()
        if suffix == "weight" and any(k in gguf_name for k in ("attn_qkv", "attn_output", "ffn_up", "ffn_down")):
            array = array.T  # GPT-2's Conv1D stores (in, out); transformers transposes these back
        if name == "transformer.wpe.weight":  # transformers reads n_positions as GPT-2's default 1024
            array = np.concatenate([array, np.zeros((1024 - len(array), array.shape[1]), np.float32)])
        writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
