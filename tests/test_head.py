"""The fused, chunked head (`ppl_head`): used where it equals the model's own logits, refused
where the model does more than a linear layer (soft-capping, scaled logits), the same numbers
as the model's own logits and as a float64 loop; byte budgets that honour `batch_size`;
`device_map` placements that give `device="cpu"`'s numbers."""

import copy

import pytest
import torch

import ppl_head
import ppl_runner
from ppl_runner import resolve_settings, score_texts

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Perplexity measures how well a model predicts text.",
         "A third, rather longer text: it runs over several windows when max_length is small, so that windows are tested."]


def float64_logprobs(model, tokenizer, text, start_id):
    """Independent reference: the whole text in one float64 forward pass, log-softmax, gather."""
    reference = copy.deepcopy(model).double().eval()
    ids = [start_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0, :-1]  # (tokens - 1, vocab)
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def scored(model, tokenizer, **kwargs):
    return [lp for batch in score_texts(model, tokenizer, TEXTS, progress=False, **kwargs) for lp in batch["predictions"]]


def tiny_gemma2(softcap):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                          final_logit_softcapping=softcap, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # random logits are tiny; make the soft-cap bite
        model.lm_head.weight.mul_(40.0) if not config.tie_word_embeddings else model.model.embed_tokens.weight.mul_(40.0)
    return model


class ScaledGPT2:
    """A GPT-2 whose forward halves its logits in code the config does not describe."""

    @staticmethod
    def build():
        from transformers import GPT2LMHeadModel

        from conftest import build_tiny_gpt2

        class Scaled(GPT2LMHeadModel):
            def forward(self, *args, **kwargs):
                out = super().forward(*args, **kwargs)
                out.logits = out.logits * 0.5
                return out

        model = Scaled(build_tiny_gpt2().config).eval()
        model.load_state_dict(build_tiny_gpt2().state_dict())
        return model


def test_fused_head_is_used_and_equals_the_models_own_logits(tiny):
    model, tokenizer = tiny
    assert isinstance(ppl_head.fused_head(model), ppl_head.FusedHead)
    assert resolve_settings(model, tokenizer)["head"] == "fused"
    fused, own = scored(model, tokenizer, max_length=16, batch_size=4), scored(model, tokenizer, max_length=16, head="logits")
    for a, b, text in zip(fused, own, TEXTS):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    for a, text in zip(scored(model, tokenizer), TEXTS):  # one window each: the float64 loop applies
        assert a == pytest.approx(float64_logprobs(model, tokenizer, text, 0), rel=1e-5, abs=1e-5)


def test_fused_head_chunks_do_not_change_values(tiny, monkeypatch):
    model, tokenizer = tiny
    whole = scored(model, tokenizer, max_length=16)
    monkeypatch.setattr(ppl_head, "HEAD_CHUNK_BYTES", 3 * 1000 * 4)  # three positions per chunk
    for a, b in zip(scored(model, tokenizer, max_length=16), whole):  # other matmul shapes: float32 rounding
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("build, reason", [
    (lambda: tiny_gemma2(softcap=30.0), "logit soft-capping (Gemma 2)"),
    (ScaledGPT2.build, "logits scaled in the model's own code"),
])
def test_heads_that_are_not_one_linear_layer_fall_back(tiny, build, reason):
    _, tokenizer = tiny
    model = build()
    assert ppl_head.fused_head(model) is None, reason
    assert resolve_settings(model, tokenizer)["head"] == "logits"
    for a, text in zip(scored(model, tokenizer), TEXTS):  # the model's own numbers
        assert a == pytest.approx(float64_logprobs(model, tokenizer, text, 0), rel=1e-5, abs=1e-5)


def test_the_probe_alone_sees_a_changed_head(tiny, monkeypatch):
    """Without the config check, comparing logits on the probe input refuses the soft-capped head,
    while the same architecture without a cap is fused and exact."""
    _, tokenizer = tiny
    monkeypatch.setattr(ppl_head, "_LOGIT_TRANSFORMS", ())
    assert ppl_head._probe(tiny_gemma2(softcap=30.0)) is None
    plain = tiny_gemma2(softcap=None)
    assert isinstance(ppl_head.fused_head(plain), ppl_head.FusedHead)
    for a, text in zip(scored(plain, tokenizer), TEXTS):
        assert a == pytest.approx(float64_logprobs(plain, tokenizer, text, 0), rel=1e-5, abs=1e-5)


def test_a_scaled_config_head_falls_back_by_its_attribute():
    from transformers import CohereConfig, CohereForCausalLM

    config = CohereConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, logit_scale=0.0625)
    assert ppl_head.fused_head(CohereForCausalLM(config).eval()) is None


def test_budget_honours_batch_size(tiny, monkeypatch):
    model, tokenizer = tiny
    ppl_head.fused_head(model)  # the probe runs once, before the hook counts forward passes
    calls = []
    hook = model.transformer.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                                   with_kwargs=True)
    try:
        texts = [TEXTS[0]] * 8  # eight equal windows
        list(score_texts(model, tokenizer, texts, batch_size=4, max_length=64, progress=False))
    finally:
        hook.remove()
    assert [shape[0] for shape in calls] == [4, 4]  # two forward passes of batch_size windows
    settings = resolve_settings(model, tokenizer, batch_size=4, max_length=64)
    assert settings["max_batch_tokens"] == 4 * 64
    monkeypatch.setattr(ppl_runner, "memory_budget", lambda device: 2 * 64 * settings["bytes_per_token"])
    assert resolve_settings(model, tokenizer, batch_size=4, max_length=64)["max_batch_tokens"] == 2 * 64  # what fits


def test_budget_too_small_for_one_window_names_max_length(tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(ppl_runner, "memory_budget", lambda device: 1000)
    with pytest.raises(ValueError, match="One window of max_length=64 tokens needs .* lower `max_length`"):
        resolve_settings(model, tokenizer, max_length=64)
    assert resolve_settings(model, tokenizer, max_length=64, max_batch_tokens=64)["max_batch_tokens"] == 64  # explicit
    with pytest.raises(ValueError, match="`head`"):
        resolve_settings(model, tokenizer, head="fast")


def test_device_map_placements_give_device_cpus_numbers(tiny_dir):
    from ppl_sources import load_model

    texts = TEXTS
    want = ppl_runner.evaluate_texts(*load_model(str(tiny_dir), device="cpu"), texts, progress=False)
    for placement in ("cpu", "auto", {"": "cpu"}):
        got = ppl_runner.evaluate_texts(*load_model(str(tiny_dir), device_map=placement), texts, progress=False)
        assert got["perplexities"] == pytest.approx(want["perplexities"], rel=1e-6), placement


@pytest.mark.parametrize("kwargs, error, match", [
    ({"device_map": "everywhere"}, ValueError, "`device_map`"),
    ({"device_map": {"": 1.5}}, ValueError, "`device_map`"),
    ({"device_map": "auto", "device": "cpu"}, ValueError, "either `device` or `device_map`"),
    ({"dtype": "float8"}, ValueError, "`dtype`"),
])
def test_bad_placement_fails_before_loading(kwargs, error, match, monkeypatch):
    import ppl_sources

    monkeypatch.setattr(ppl_sources, "_load_model_cached", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(error, match=match):
        ppl_sources.load_model("some/model", **kwargs)


def test_a_dtype_the_device_cannot_run_is_named():
    from ppl_sources import check_dtype_runs

    check_dtype_runs(torch.float32, "cpu")
    with pytest.raises(RuntimeError) as torch_error:  # torch's own words for the failure, to be quoted
        torch.ones((2, 2), device="meta").sum().item()
    cause = str(torch_error.value).splitlines()[0]
    with pytest.raises(ValueError) as error:
        check_dtype_runs(torch.float32, "meta")
    # the argument, the device, the dtype as the user spells it, and why
    assert str(error.value) == f"Expected a `dtype` that meta can run, but float32 fails there: {cause}"


@pytest.mark.slow
def test_fused_head_on_the_real_model_and_real_text(smol, wikitext_paragraphs):
    model, tokenizer = smol
    assert resolve_settings(model, tokenizer)["head"] == "fused"
    texts = [p for p in wikitext_paragraphs if 200 < len(p) < 900][:4]
    fused = [lp for b in score_texts(model, tokenizer, texts, max_length=64, stride=32, progress=False) for lp in b["predictions"]]
    own = [lp for b in score_texts(model, tokenizer, texts, max_length=64, stride=32, head="logits", progress=False)
           for lp in b["predictions"]]
    for a, b in zip(fused, own):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    start = tokenizer.bos_token_id  # one window per text: compare with the float64 loop
    whole = [lp for b in score_texts(model, tokenizer, texts[:2], progress=False) for lp in b["predictions"]]
    for a, text in zip(whole, texts[:2]):
        assert a == pytest.approx(float64_logprobs(model, tokenizer, text, start), rel=1e-4, abs=1e-4)


def test_cli_device_map_and_the_batching_line(tiny_dir, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import AUTO_VS_CPU_REL, ROOT

    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n\n".join(TEXTS) + "\n", encoding="utf-8")

    def cli(*extra):
        args = [sys.executable, str(ROOT / "ppl_cli.py"), "--model", str(tiny_dir), "--corpus", str(corpus), "--quiet", *extra]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**__import__("os").environ,
                              "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    placed = json.loads(cli("--device-map", "auto", "--json", "-"))
    on_cpu = cli("--device", "cpu", "--batch-size", "2")
    assert "Batching          batch_size=2, max_batch_tokens=512 (12 KiB/token), head=fused, float32 on cpu" in on_cpu
    shown = float(on_cpu.split("Perplexity")[1].split()[0])
    assert placed["perplexity"] == pytest.approx(shown, rel=max(AUTO_VS_CPU_REL, 5e-5))  # the report prints 4 decimals
    assert placed["settings"]["head"] == "fused"


def test_cpu_budget_is_shared_by_the_processes_of_a_machine(monkeypatch):
    import types

    import psutil

    # a fixed reading of available RAM (the real one moves with other jobs between two calls);
    # a power of two, so that every share below is exact
    available = 2**34
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=available, total=2 * available))
    assert 0 < ppl_head.CPU_BUDGET_FRACTION < 1
    alone = int(available * ppl_head.CPU_BUDGET_FRACTION)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert ppl_head.memory_budget("cpu") == alone
    for processes in (1, 4):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
        assert ppl_head.memory_budget("cpu") == alone // processes


def test_eager_attention_adds_its_scores_to_the_budget(tiny):
    model, tokenizer = tiny
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    base = resolve_settings(model, tokenizer, max_length=64)["bytes_per_token"]
    assert resolve_settings(eager, tokenizer, max_length=64)["bytes_per_token"] == base + 2 * 4 * 2 * 64  # 2 heads
