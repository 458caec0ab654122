"""`ppl_cli.py` comparing with a reference: `--reference-model`, `--reference-dtype`,
`--quantize`, `--save-reference` then `--reference-file`, `--docs-out` with a reference and its
resume. The numbers themselves are checked against an independent float64 loop in
test_compare.py (text mode); here the command line must give text mode's numbers on the same
documents, report them, and refuse what does not go together by name before any model loads.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, build_tiny_gpt2, build_tiny_tokenizer, one_intra_op_thread
from ppl_corpus import default_corpus, split_paragraphs
from ppl_runner import evaluate_texts, plan_windows
from test_compare import SCALAR_KEYS, float64_loop, noisy_copy

WINDOWS = ["--max-length", "64", "--stride", "32", "--batch-size", "4"]
RESAMPLES = 200


def _cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(ROOT / "ppl_cli.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    return proc


def _ok(*args):
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def texts():
    """24 real paragraphs of the standard library's docs, 8 of them longer than one window."""
    paragraphs = [p for text in default_corpus()[40:] for p in split_paragraphs(text) if len(p) > 80]
    long = [p for p in paragraphs if len(p) > 400][:8]
    return long + [p for p in paragraphs if p not in long][:16]


@pytest.fixture(scope="module")
def corpus(texts, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny GPT-2 (with peaked outputs) and a copy with 20% weight noise (same tokenizer), each saved to a folder."""
    model, tokenizer = build_tiny_gpt2(), build_tiny_tokenizer()
    with torch.no_grad():  # a random GPT-2 is near uniform (KL ~1e-5); larger logits make peaked distributions
        model.transformer.ln_f.weight.mul_(10)
    reference = noisy_copy(model, 0.2)
    folders = {}
    for name, m in (("model", model), ("reference", reference)):
        folders[name] = tmp_path_factory.mktemp(name)
        m.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return model, reference, tokenizer, folders


@pytest.fixture(scope="module")
def text_mode(models, texts):
    model, reference, tokenizer, _ = models
    return evaluate_texts(model, tokenizer, texts, reference_model=reference, max_length=64, stride=32, batch_size=4,
                          bootstrap_resamples=RESAMPLES)


@pytest.fixture(scope="module")
def loop(models, texts):
    """test_compare's float64 loop (one window per forward) on the same documents and windows."""
    model, reference, tokenizer, _ = models
    with one_intra_op_thread():
        return float64_loop(model, reference, tokenizer, texts, max_length=64, stride=32)


@pytest.fixture(scope="module")
def exact(models, corpus, tmp_path_factory):
    folders = models[3]
    out = tmp_path_factory.mktemp("exact") / "result.json"
    proc = _ok("--model", folders["model"], "--reference-model", folders["reference"], "--corpus", corpus, *WINDOWS,
               "--bootstrap-resamples", RESAMPLES, "--quiet", "--json", out)
    return json.loads(out.read_text()), proc.stdout


def assert_same_comparison(got, want, rel=1e-6):
    for key in SCALAR_KEYS:
        assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-9), key
    assert got["perplexities"] == pytest.approx(want["perplexities"], rel=rel)
    assert got["perplexity_ratio_ci"] == pytest.approx(want["perplexity_ratio_ci"], rel=rel)
    assert got["kl_divergence_quantiles"] == pytest.approx(want["kl_divergence_quantiles"], rel=rel, abs=1e-9)


def test_the_command_line_gives_text_modes_comparison_and_reports_it(models, exact, text_mode):
    result, stdout = exact
    assert_same_comparison(result, text_mode)
    assert result["reference_perplexities"] == pytest.approx(text_mode["reference_perplexities"], rel=1e-6)
    assert result["reference"] == str(models[3]["reference"]) and result["num_documents"] == 24
    assert result["perplexity_ratio_ci"][0] < result["perplexity_ratio"] < result["perplexity_ratio_ci"][1]
    lo, hi = result["perplexity_ratio_ci"]
    report = {line[:18].rstrip(): line[18:] for line in stdout.splitlines()}
    assert report["Reference ppl"] == f"{result['reference_perplexity']:.4f}"
    assert report["PPL ratio"].startswith(f"{result['perplexity_ratio']:.4f}   (95% CI {lo:.4f} - {hi:.4f}, paired")
    assert report["KL divergence"] == f"{result['kl_divergence']:.6f} ± {result['kl_divergence_se']:.6f} nats/token"
    assert report["Same top-1"].startswith(f"{100 * result['top1_agreement']:.2f} ± ")
    assert report["RMS Δp"] == f"{100 * result['rms_delta_p']:.3f} %"
    assert report["KL quantiles"].startswith(f"p50 {result['kl_divergence_quantiles']['p50']:.6f}")


def test_docs_out_with_a_reference_holds_the_comparison_and_resumes_to_the_whole_result(models, corpus, exact, loop,
                                                                                         tmp_path):
    import pandas as pd

    folders, out = models[3], tmp_path / "docs"
    args = ["--model", folders["model"], "--reference-model", folders["reference"], "--corpus", corpus, *WINDOWS,
            "--bootstrap-resamples", RESAMPLES, "--quiet", "--docs-out", out]
    _ok(*args, "--limit", 10)  # the first 10 documents, then a resumed run does the other 14
    refused = _cli("--model", folders["model"], "--corpus", corpus, *WINDOWS, "--quiet", "--docs-out", out, "--resume")
    assert refused.returncode == 2 and "reference:" in refused.stderr  # the folder was written with a reference
    resumed = _ok(*args, "--resume", "--json", tmp_path / "resumed.json")
    assert "10 scored by an earlier run" in resumed.stdout
    got, want = json.loads((tmp_path / "resumed.json").read_text()), exact[0]
    frame = pd.read_parquet(out)
    assert list(frame.sort_values("index")["reference_perplexity"]) == pytest.approx(want["reference_perplexities"], rel=1e-6)
    assert frame["token_kl"].map(len).sum() == want["num_tokens"]
    # each document's per-token KL, position by position, is the loop's (the quantiles would not
    # see a permuted or window-shifted one; documents span up to 13 windows, batches of 4 pack
    # several documents), and so are its sums. Measured: within 2.4e-7 nats (5e-6 relative) per
    # token, 4e-8 relative per document; neighbouring tokens' KL differ by 0.04 nats or more.
    assert max(len(plan_windows(len(d["kl"]) + 1, 64, 32)) for d in loop) >= 3 and len(frame) == len(loop)
    for (_, row), doc in zip(frame.sort_values("index").iterrows(), loop, strict=True):
        np.testing.assert_allclose(row["token_kl"], doc["kl"], rtol=1e-5, atol=1e-6)
        assert row["kl"] == pytest.approx(doc["kl"].sum(), rel=1e-6)
        assert row["reference_nll"] == pytest.approx(-doc["reference_logprob"].sum(), rel=1e-6)
    got["perplexities"] = list(frame.sort_values("index")["perplexity"])  # not kept in the JSON with --docs-out
    assert_same_comparison(got, want)


def test_torchrun_two_ranks_compare_as_one_process(models, corpus, exact, tmp_path):
    from test_distributed import _child_env, _finish, _start

    folders, out = models[3], tmp_path / "docs"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "ppl_cli.py"),
            "--model", folders["model"], "--reference-model", folders["reference"], "--corpus", corpus, *WINDOWS,
            "--bootstrap-resamples", RESAMPLES, "--quiet", "--json", tmp_path / "result.json"]
    rc, stdout, err = _finish(_start([str(a) for a in args], _child_env()))
    assert rc == 0, err[-3000:]
    assert "ppl_cli: rank 1 of 2 done" in err  # two ranks really ran
    got = json.loads((tmp_path / "result.json").read_text())
    assert_same_comparison(got, exact[0])
    assert got["processes"] == 2


@pytest.fixture(scope="module")
def saved(models, corpus, tmp_path_factory):
    folders = models[3]
    path = tmp_path_factory.mktemp("saved") / "reference.parquet"
    proc = _ok("--model", folders["reference"], "--save-reference", path, "--corpus", corpus, *WINDOWS, "--quiet",
               "--json", str(path) + ".json")
    return path, json.loads((path.parent / "reference.parquet.json").read_text()), proc.stdout


def test_a_saved_reference_gives_the_exact_comparison_and_its_kl_within_the_sampling_error(models, corpus, exact, saved,
                                                                                          tmp_path):
    path, written, stdout = saved
    want = exact[0]
    assert written["perplexity"] == pytest.approx(want["reference_perplexity"], rel=1e-6)
    assert written["reference_file_bytes"] / written["num_tokens"] <= 1024  # the bound
    assert "bytes per token: top 32 log-probs + 32 sampled tokens" in stdout
    out = tmp_path / "file.json"
    _ok("--model", models[3]["model"], "--reference-file", path, "--corpus", corpus, *WINDOWS,
        "--bootstrap-resamples", RESAMPLES, "--quiet", "--json", out)
    got = json.loads(out.read_text())
    for key in ("perplexity", "reference_perplexity", "perplexity_ratio", "log_perplexity_ratio", "top1_agreement",
                "rms_delta_p", "nll_correlation"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert got["perplexity_ratio_ci"] == pytest.approx(want["perplexity_ratio_ci"], rel=1e-6)
    assert 0 < got["kl_divergence_sampling_se"] < 0.05 * want["kl_divergence"]
    assert abs(got["kl_divergence"] - want["kl_divergence"]) < 4 * got["kl_divergence_sampling_se"]


@pytest.mark.parametrize("change, named", [(["--limit", "10"], "limit: "), (["--max-length", "48"], "max_length: "),
                                           (["--stride", "16"], "stride: "), (["--text-field", "url"], "text_field: ")])
def test_a_reference_file_for_other_documents_or_windows_is_refused_by_name(models, corpus, saved, change, named):
    args = dict(zip(WINDOWS[::2], WINDOWS[1::2]))
    args.update(dict(zip(change[::2], change[1::2])))
    proc = _cli("--model", models[3]["model"], "--reference-file", saved[0], "--corpus", corpus, "--quiet",
                *[x for kv in args.items() for x in kv])
    assert proc.returncode == 2 and named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("extra, message", [
    (["--reference-file", "r.parquet", "--reference-dtype", "float32"], "either --reference-file or"),
    (["--save-reference", "new.parquet", "--reference-file", "r.parquet"], "give one of them"),
    (["--save-reference", "EXISTING"], "exists: give a new path"),
    (["--save-reference", "new.parquet", "--docs-out", "folder"], "--save-reference runs on one process"),
    (["--reference-dtype", "float32", "--tokens-out", "t.parquet"], "--tokens-out and --words-out score one model"),
    (["--reference-dtype", "float32", "--engine", "ray"], "not on Ray"),
    (["--quantize", "dynamic-int8", "--engine", "ray"], "not on Ray"),
    (["--save-reference", "new.parquet", "--reference-dtype", "float32", "--quantize", "dynamic-int8"], "which it does not load"),
    (["--save-reference", "new.parquet", "--reference-model", "x", "--dtype", "bfloat16"], "which it does not load"),
])
def test_options_that_do_not_go_together_are_refused_before_loading(extra, message, tmp_path, capsys):
    import ppl_cli

    existing = tmp_path / "existing.parquet"
    existing.write_bytes(b"kept")
    argv = ["--model", str(tmp_path / "no-such-model"), "--quiet"] + [str(existing) if x == "EXISTING" else x for x in extra]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert ppl_cli.main(argv) == 2
    finally:
        os.chdir(cwd)
    assert message in capsys.readouterr().err
    assert existing.read_bytes() == b"kept" and not (tmp_path / "new.parquet").exists()


def test_save_reference_of_an_empty_corpus_writes_no_file(models, tmp_path):
    empty, path = tmp_path / "empty.jsonl", tmp_path / "reference.parquet"
    empty.write_text(json.dumps({"text": ""}) + "\n", encoding="utf-8")
    proc = _cli("--model", models[3]["reference"], "--save-reference", path, "--corpus", empty, "--quiet")
    assert proc.returncode == 2 and "no reference file was written" in proc.stderr, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == [empty]  # neither the file nor its temporary: a retry may use the path


@pytest.mark.slow
def test_quantize_against_the_models_own_float32_checkpoint_is_text_modes_comparison(smol, tmp_path):
    """The README's demo on three documents: the embedded model's dynamic int8 copy against
    the model itself (batch_size=1: int8's numbers move with what shares a batch)."""
    from ppl_corpus import DEFAULT_CORPUS, iter_documents
    from ppl_sources import quantize_dynamic_int8

    out = tmp_path / "int8.json"
    proc = _ok("--quantize", "dynamic-int8", "--reference-dtype", "float32", "--limit", 3, "--max-length", 128,
               "--batch-size", 1, "--bootstrap-resamples", RESAMPLES, "--json", out)
    got = json.loads(out.read_text())
    model, tokenizer = smol
    texts = [text for _, _, text in iter_documents(DEFAULT_CORPUS)][:3]
    want = evaluate_texts(quantize_dynamic_int8(model), tokenizer, texts, reference_model=model, max_length=128,
                          batch_size=1, bootstrap_resamples=RESAMPLES)
    assert_same_comparison(got, want, rel=1e-5)
    assert got["model"].endswith("(torch dynamic int8)") and got["reference"].endswith("(float32)")
    assert got["perplexity_ratio"] > 1 and "KL quantiles" in proc.stdout
