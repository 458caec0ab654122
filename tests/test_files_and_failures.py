"""The command line with a careless user's files: outputs checked before anything loads (never an
input, never another output, never silently replaced), results written all or nothing, and one
`error:` line with exit status 2 (130 for Ctrl-C) for every failure a user can cause."""

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import ppl_cli
import ppl_sources

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["The cat sat on the mat and looked at the door.", "A short second document about rain in the hills.",
         "Numbers like 12 and 345 are tokens too.", "The last one, with a comma, and an end."]


# `ppl_cli.py` with chunks and parts of 8 documents (not 512 and 256): its first part is on disk long
# before the end, however fast the CPU, so a test can act on a run that is still scoring. Ctrl-C raises
# KeyboardInterrupt in it as in a terminal, also where the tests run in the background (a shell's `&`
# makes its jobs, and their children, ignore SIGINT).
SMALL_PARTS = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "import ppl_cli, ppl_docs, ppl_runner; ppl_runner.TEXTS_PER_CHUNK = 8; "
               "ppl_docs.PartWriter.__init__.__kwdefaults__['flush_rows'] = 8; sys.exit(ppl_cli.main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """A saved tiny GPT-2 and a JSON Lines corpus of four documents."""
    root = tmp_path_factory.mktemp("files")
    model = root / "tiny"
    tiny[0].save_pretrained(model)
    tiny[1].save_pretrained(model)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    return {"model": model, "corpus": corpus}


def digest(path):
    """Bytes of a file, or of every file under a folder, as one hash: 'unchanged' is checked byte for byte."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the model is loaded: these refusals must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(ppl_cli, "load_model", refuse)


def run_cli(capsys, files, *args):
    status = ppl_cli.main(["--model", str(files["model"]), "--device", "cpu", "--corpus", str(files["corpus"]),
                           "--quiet", *map(str, args)])
    return status, capsys.readouterr()


def one_error_line(err, pattern):
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]


# ---------------------------------------------------------------------------------------
# Outputs checked before the model loads
# ---------------------------------------------------------------------------------------


def test_json_onto_the_corpus_is_refused_and_the_corpus_is_unchanged(files, capsys, no_loading):
    before = digest(files["corpus"])
    status, out = run_cli(capsys, files, "--json", files["corpus"])
    assert status == 2
    one_error_line(out.err, r"^error: --json '.*corpus\.jsonl' is the corpus, an input of this run")
    assert digest(files["corpus"]) == before


def test_the_models_own_files_are_refused_and_its_card_is_written(files, capsys, tmp_path):
    import shutil

    model = tmp_path / "my-model"
    shutil.copytree(files["model"], model)
    (model / "README.md").write_text("---\nlicense: mit\n---\n\n# my-model\n")  # its card, as save_pretrained users keep one
    weights = digest(model / "model.safetensors")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ppl_cli, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
        status = ppl_cli.main(["--model", str(model), "--device", "cpu", "--corpus", str(files["corpus"]), "--quiet",
                               "--json", str(model / "config.json"), "--force"])
    assert status == 2
    one_error_line(capsys.readouterr().err, r"^error: --json '.*config\.json' is --model \(its file config\.json\), an input")
    # what the loader does not read is the user's to write: the model's own card, before pushing it
    status = ppl_cli.main(["--model", str(model), "--device", "cpu", "--corpus", str(files["corpus"]), "--quiet",
                           "--model-card", str(model), "--tokens-out", str(model / "tokens.csv")])
    assert status == 0, capsys.readouterr().err
    assert "perplexity" in (model / "README.md").read_text() and (model / "tokens.csv").is_file()
    assert digest(model / "model.safetensors") == weights


def test_json_naming_a_folder_is_refused_before_loading(files, capsys, no_loading, tmp_path):
    (tmp_path / "jdir").mkdir()
    status, out = run_cli(capsys, files, "--json", tmp_path / "jdir")
    assert status == 2
    one_error_line(out.err, r"^error: Expected --json to be a file, but '.*jdir' is a folder\.$")


def test_json_under_a_file_is_refused_before_loading(files, capsys, no_loading, tmp_path):
    (tmp_path / "plain").write_text("x")
    status, out = run_cli(capsys, files, "--json", tmp_path / "plain" / "out.json")
    assert status == 2
    one_error_line(out.err, r"^error: Cannot write --json .*: '.*plain' is a file, not a folder\.$")


def test_two_outputs_on_one_file_are_refused(files, capsys, no_loading, tmp_path):
    same = tmp_path / "same.csv"
    status, out = run_cli(capsys, files, "--tokens-out", same, "--words-out", same)
    assert status == 2
    one_error_line(out.err, r"^error: --tokens-out and --words-out name the same path '.*same\.csv': give each its own\.$")
    assert not same.exists()


def test_an_existing_json_is_refused_without_force_and_replaced_with_it(files, capsys, tmp_path):
    target = tmp_path / "out.json"
    target.write_text("keep me")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ppl_cli, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
        status, out = run_cli(capsys, files, "--json", target)
    assert status == 2
    one_error_line(out.err, r"^error: The --json file '.*out\.json' exists: give a new path, or --force to replace it")
    assert target.read_text() == "keep me"
    status, out = run_cli(capsys, files, "--json", target, "--force")
    assert status == 0, out.err
    assert json.loads(target.read_text())["num_documents"] == len(TEXTS)
    assert not list(tmp_path.glob(".out.json.*"))  # no temporary file left beside it


def test_force_never_replaces_an_input(files, capsys, no_loading):
    before = digest(files["corpus"])
    status, out = run_cli(capsys, files, "--json", files["corpus"], "--force")
    assert status == 2 and "an input of this run" in out.err
    assert digest(files["corpus"]) == before


def test_json_in_a_missing_folder_is_created_with_the_result(files, capsys, tmp_path):
    target = tmp_path / "new" / "deeper" / "out.json"
    status, out = run_cli(capsys, files, "--json", target)
    assert status == 0, out.err
    assert json.loads(target.read_text())["num_tokens"] > 0


def test_a_model_card_with_broken_metadata_fails_before_the_run(files, capsys, no_loading, tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: [mit\n---\n\n# A card\n")
    before = digest(card)
    status, out = run_cli(capsys, files, "--model-card", card)
    assert status == 2
    one_error_line(out.err, r"^error: Cannot read the model card '.*README\.md': its metadata .* does not parse")
    assert digest(card) == before


# ---------------------------------------------------------------------------------------
# Files written while scoring: all or nothing
# ---------------------------------------------------------------------------------------


def test_a_run_stopped_by_a_bad_row_leaves_no_empty_tokens_file(files, capsys, tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text(json.dumps({"text": 600}) + "\n" + json.dumps({"text": TEXTS[0]}) + "\n")
    tokens = tmp_path / "tokens.csv"
    status = ppl_cli.main(["--model", str(files["model"]), "--device", "cpu", "--corpus", str(corpus), "--quiet",
                           "--tokens-out", str(tokens), "--bad-rows", "fail"])
    assert status == 2
    assert not tokens.exists() and not list(tmp_path.glob(".tokens.csv.*"))  # a rerun is not blocked


def test_a_lone_surrogate_is_named_by_document_and_leaves_no_tokens_file(files, capsys, tmp_path):
    corpus = tmp_path / "surrogate.jsonl"  # json.dumps writes "\\ud800", which json.loads reads back as a lone surrogate
    corpus.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate([TEXTS[0], "bad \ud800 text"])))
    before = digest(corpus)
    tokens = tmp_path / "tokens.csv"
    args = ["--model", str(files["model"]), "--device", "cpu", "--corpus", str(corpus), "--quiet", "--id-field", "id"]
    assert ppl_cli.main([*args, "--tokens-out", str(tokens), "--bad-rows", "fail"]) == 2
    one_error_line(capsys.readouterr().err, r"^error: Expected document 1 \(id 'doc-1'\) to be valid Unicode text, but it "
                                            r"holds a lone surrogate \(U\+D800\) at character 4\.$")
    assert not tokens.exists() and digest(corpus) == before
    # by default the row is flagged (in --docs-out's `error` column) and the others are scored
    assert ppl_cli.main([*args, "--docs-out", str(tmp_path / "docs"), "--json", str(tmp_path / "out.json")]) == 0
    assert capsys.readouterr().err.strip() == ("ppl_cli: 1 row(s) could not be scored and are flagged in their `error` "
                                               "column: 1 x not valid Unicode")
    rows = pd.read_parquet(tmp_path / "docs").sort_values("index")
    assert rows["error"].isna().tolist() == [True, False]
    assert rows["error"].iloc[1] == "not valid Unicode: a lone surrogate (U+D800) at character 4"
    assert rows["id"].tolist() == ["doc-0", "doc-1"] and pd.isna(rows["nll"].iloc[1])
    result = json.loads((tmp_path / "out.json").read_text())
    assert (result["num_documents"], result["flagged_rows"], result["skipped_empty"]) == (1, 1, 0)
    assert all(type(result[k]) is int for k in ("num_tokens", "num_words", "num_bytes"))  # not 12.0 from the folder
    # a resume that asks to fail on bad rows does not pool past the one flagged before
    assert ppl_cli.main([*args, "--docs-out", str(tmp_path / "docs"), "--resume", "--bad-rows", "fail"]) == 2
    one_error_line(capsys.readouterr().err, r"^error: 1 row\(s\) of the --docs-out folder were flagged by an earlier run "
                                            r"\(not valid Unicode\); with --bad-rows fail the run has no result")


def test_tokens_out_is_renamed_into_place_only_when_complete(files, capsys, tmp_path, monkeypatch):
    tokens = tmp_path / "tokens.jsonl"
    seen = []
    original = ppl_cli._write_surprisal

    def spy(writers, tokenizer, rows):
        original(writers, tokenizer, rows)
        seen.append((tokens.exists(), writers["tokens"].tmp.exists()))

    monkeypatch.setattr(ppl_cli, "_write_surprisal", spy)
    status, out = run_cli(capsys, files, "--tokens-out", tokens, "--batch-size", "1")
    assert status == 0, out.err
    assert seen and all(pair == (False, True) for pair in seen)  # while scoring: only the hidden temporary file
    rows = [json.loads(line) for line in tokens.read_text().splitlines()]
    assert {row["document"] for row in rows} == set(range(len(TEXTS)))


# ---------------------------------------------------------------------------------------
# Failures a user can cause: one line, exit 2
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA has the device")
def test_device_cuda_without_cuda_is_one_line(files, capsys):
    status, out = ppl_cli.main(["--model", str(files["model"]), "--device", "cuda", "--corpus", str(files["corpus"]),
                                "--quiet"]), capsys.readouterr()
    assert status == 2
    one_error_line(out.err, r"^error: Expected a `device` this machine has, but got 'cuda': CUDA is not available here")


@pytest.mark.parametrize("damage", ["truncated-safetensors", "bin-not-weights"])
def test_damaged_weights_are_one_line(files, capsys, tmp_path, damage):
    import shutil

    model = tmp_path / "damaged"
    shutil.copytree(files["model"], model)
    weights = model / "model.safetensors"
    if damage == "truncated-safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
        (model / "pytorch_model.bin").write_bytes(b"this is not a pickle of weights\n" * 10)
    status = ppl_cli.main(["--model", str(model), "--device", "cpu", "--corpus", str(files["corpus"]), "--quiet"])
    assert status == 2
    one_error_line(capsys.readouterr().err, r"^error: Could not load model '.*damaged': ")


def test_debug_shows_the_traceback(files, capsys, no_loading):
    with pytest.raises(ValueError, match="an input of this run"):
        run_cli(capsys, files, "--json", files["corpus"], "--debug")


def test_quantize_refuses_a_model_without_linear_layers(files, capsys):
    status, out = run_cli(capsys, files, "--quantize", "dynamic-int8")
    assert status == 2
    one_error_line(out.err, r"^error: --quantize dynamic-int8 converts torch\.nn\.Linear layers, and this model has none "
                            r"besides its output layer \(its weight layers are Conv1D(, Embedding)?\): nothing would be")


def test_quantize_converts_every_linear_layer_but_the_output():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    assert ppl_sources.int8_label(model) == "torch dynamic int8"  # every weight layer but the output converted
    quantized = ppl_sources.quantize_dynamic_int8(model)
    kinds = [type(m).__module__ for m in quantized.modules() if "Linear" in type(m).__name__]
    assert sum(k.startswith("torch.ao.nn.quantized.dynamic") for k in kinds) == 2 * 7  # q, k, v, o, gate, up, down
    assert type(quantized.lm_head) is torch.nn.Linear  # the output layer stays float


def test_quantize_names_how_many_layers_it_converted_when_some_stay_float(tiny):
    import copy

    model = copy.deepcopy(tiny[0])
    conv = model.transformer.h[0].mlp.c_fc  # transformers' Conv1D: y = x @ W + b, W of shape (in, out)
    linear = torch.nn.Linear(*conv.weight.shape)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    model.transformer.h[0].mlp.c_fc = linear
    assert ppl_sources.int8_label(model) == "torch dynamic int8 of 1 of 8 weight layers; 7 Conv1D stay float32"
    quantized = ppl_sources.quantize_dynamic_int8(model)
    assert type(quantized.transformer.h[0].mlp.c_fc).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert type(quantized.transformer.h[1].mlp.c_fc).__name__ == "Conv1D"


# ---------------------------------------------------------------------------------------
# Ctrl-C: exit 130, one line, and a resume to the uninterrupted result
# ---------------------------------------------------------------------------------------


def test_ctrl_c_exits_130_with_one_line_and_the_run_resumes_to_the_whole_result(files, tmp_path, capsys):
    corpus = tmp_path / "long.jsonl"
    n = 1500
    corpus.write_text("".join(json.dumps({"text": f"{TEXTS[i % 4]} Document {i}."}) + "\n" for i in range(n)))
    base = [sys.executable, "-c", SMALL_PARTS, "--model", str(files["model"]), "--device", "cpu",
            "--corpus", str(corpus), "--limit", str(n), "--batch-size", "1", "--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    docs = tmp_path / "docs"
    proc = subprocess.Popen([*base, "--docs-out", str(docs)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(docs.glob("part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # a part on disk: the run is scoring
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.fail("the run finished before it could be interrupted: give it a longer corpus")
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"interrupted: the documents scored so far are in {docs}: run the same command with --resume to "
                     "continue."], err
    assert ppl_cli.main([*base[3:], "--docs-out", str(docs), "--resume", "--json", str(tmp_path / "resumed.json")]) == 0
    assert ppl_cli.main([*base[3:], "--json", str(tmp_path / "whole.json")]) == 0
    capsys.readouterr()
    resumed, whole = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("resumed", "whole"))
    assert resumed["num_documents"] == whole["num_documents"] == n
    assert resumed["num_tokens"] == whole["num_tokens"]
    assert resumed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-12)


# ---------------------------------------------------------------------------------------
# Two runs on one --docs-out folder
# ---------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_while_the_first_runs_and_accepted_once_it_is_killed(files, tmp_path, capsys):
    corpus = tmp_path / "long.jsonl"
    n = 1500
    corpus.write_text("".join(json.dumps({"text": f"{TEXTS[i % 4]} Document {i}."}) + "\n" for i in range(n)))
    args = ["--model", str(files["model"]), "--device", "cpu", "--corpus", str(corpus), "--limit", str(n),
            "--batch-size", "1", "--quiet", "--docs-out", str(tmp_path / "docs")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    first = subprocess.Popen([sys.executable, "-c", SMALL_PARTS, *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "docs").glob("part-*.parquet")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the second could start: give it a longer corpus"
        assert ppl_cli.main([*args, "--resume"]) == 2
        one_error_line(capsys.readouterr().err, rf"^error: The --docs-out folder '.*docs' is being written by another "
                                                rf"run \(pid {first.pid} on .+\): wait for it to end, or give another folder\.$")
        first.kill()  # SIGKILL: no cleanup runs, and the operating system drops the lock with the process
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert ppl_cli.main([*args, "--resume", "--json", str(tmp_path / "out.json")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out.json").read_text())["num_documents"] == n


# ---------------------------------------------------------------------------------------
# Installed with pip: the `perplexity` command is `python ppl_cli.py`
# ---------------------------------------------------------------------------------------


def test_pip_install_gives_a_perplexity_command_equal_to_the_script(files, tmp_path):
    import shutil

    source = tmp_path / "src"  # a copy of the tracked files: the build leaves nothing in the checkout
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if not name.startswith(("tests/", "benchmarks/", "assets/")):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(source)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"  # neither the checkout nor the copy on the path: only the installed modules
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = ["--model", str(files["model"]), "--device", "cpu", "--corpus", str(files["corpus"]), "--quiet"]
    command = subprocess.run([str(target / "bin" / "perplexity"), *args, "--json", "-"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=300)
    assert command.returncode == 0, command.stderr[-3000:]
    script = subprocess.run([sys.executable, str(ROOT / "ppl_cli.py"), *args, "--json", "-"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    installed, direct = json.loads(command.stdout.splitlines()[-1]), json.loads(script.stdout.splitlines()[-1])
    assert installed["perplexity"] == direct["perplexity"] and installed["num_tokens"] == direct["num_tokens"]
    where = subprocess.run([sys.executable, "-c", "import ppl_cli, ppl_torchmetrics; print(ppl_cli.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).parent == target
    refused = subprocess.run([str(target / "bin" / "perplexity"), *args, "--json", str(files["corpus"])], cwd=elsewhere,
                             env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --json")


# ---------------------------------------------------------------------------------------
# Resume checks what it would mix, by content
# ---------------------------------------------------------------------------------------


def test_resume_refuses_new_weights_saved_into_the_same_folder(files, tiny, capsys, tmp_path):
    import shutil

    from conftest import build_tiny_gpt2

    model = tmp_path / "out"  # as a Trainer's output_dir, retrained in place
    shutil.copytree(files["model"], model)
    args = ["--model", str(model), "--device", "cpu", "--corpus", str(files["corpus"]), "--quiet",
            "--docs-out", str(tmp_path / "docs")]
    assert ppl_cli.main([*args, "--limit", "2"]) == 0
    build_tiny_gpt2(seed=7).save_pretrained(model)
    before = digest(tmp_path / "docs")
    capsys.readouterr()
    assert ppl_cli.main([*args, "--limit", "4", "--resume"]) == 2
    one_error_line(capsys.readouterr().err, r"model_files: the model's files changed since the run began "
                                            r"\(model\.safetensors changed\)")
    assert digest(tmp_path / "docs") == before


def test_resume_refuses_new_weights_of_the_reference_model(files, capsys, tmp_path):
    import shutil

    from conftest import build_tiny_gpt2

    reference = tmp_path / "ref"
    shutil.copytree(files["model"], reference)
    args = ["--model", str(files["model"]), "--reference-model", str(reference), "--device", "cpu", "--corpus",
            str(files["corpus"]), "--quiet", "--docs-out", str(tmp_path / "docs")]
    assert ppl_cli.main([*args, "--limit", "2"]) == 0
    build_tiny_gpt2(seed=7).save_pretrained(reference)
    before = digest(tmp_path / "docs")
    capsys.readouterr()
    assert ppl_cli.main([*args, "--limit", "4", "--resume"]) == 2
    one_error_line(capsys.readouterr().err, r"reference_files: the reference model's files changed since the run began "
                                            r"\(model\.safetensors changed\)")
    assert digest(tmp_path / "docs") == before


def test_a_bad_row_is_flagged_not_the_end_of_the_run_and_its_fix_is_named_as_a_changed_corpus(files, capsys, tmp_path):
    corpus = tmp_path / "bad.jsonl"
    rows = [{"text": f"{TEXTS[i % 4]} Document {i}."} for i in range(700)]
    rows[600] = {"text": 600}  # the row that ended a run after 512 documents
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    docs, out = tmp_path / "docs", tmp_path / "out.json"
    args = ["--model", str(files["model"]), "--device", "cpu", "--corpus", str(corpus), "--quiet", "--docs-out", str(docs)]
    assert ppl_cli.main([*args, "--json", str(out)]) == 0
    assert "1 row(s) could not be scored and are flagged in their `error` column: 1 x expected a string, but got int" in \
        capsys.readouterr().err
    result = json.loads(out.read_text())
    assert (result["num_documents"], result["flagged_rows"]) == (699, 1)
    rows[600] = {"text": "six hundred"}  # fixed: the folder no longer matches the corpus, and says so
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    before = digest(docs)
    assert ppl_cli.main([*args, "--resume"]) == 2
    one_error_line(capsys.readouterr().err, r"corpus_fingerprint: the corpus changed since the run began \(bad\.jsonl "
                                            r"changed\).*Give a new --docs-out folder to score afresh\.$")
    assert digest(docs) == before


def test_resume_refuses_a_changed_file_of_a_folder_corpus_by_name(files, capsys, tmp_path):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    for name, texts in (("a.jsonl", TEXTS[:2]), ("b.jsonl", TEXTS[2:])):
        (crawl / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = ["--model", str(files["model"]), "--device", "cpu", "--corpus", str(crawl), "--split", "train", "--quiet",
            "--docs-out", str(tmp_path / "docs")]
    assert ppl_cli.main([*args, "--limit", "2"]) == 0
    (crawl / "a.jsonl").write_text("".join(json.dumps({"text": t.upper()}) + "\n" for t in TEXTS[:2]))
    capsys.readouterr()
    assert ppl_cli.main([*args, "--resume"]) == 2
    one_error_line(capsys.readouterr().err, r"corpus_fingerprint: the corpus changed since the run began \(a\.jsonl changed\)")


def test_resume_accepts_the_same_model_and_corpus_under_other_paths(files, capsys, tmp_path, monkeypatch):
    import shutil

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(files["model"], elsewhere / "tiny")
    shutil.copy(files["corpus"], elsewhere / "corpus.jsonl")
    docs = tmp_path / "docs"
    common = ["--device", "cpu", "--quiet", "--batch-size", "1"]
    assert ppl_cli.main(["--model", str(files["model"]), "--corpus", str(files["corpus"]), *common,
                         "--docs-out", str(docs), "--limit", "2"]) == 0
    monkeypatch.chdir(elsewhere)  # relative paths to copies: the same content
    assert ppl_cli.main(["--model", "tiny", "--corpus", "corpus.jsonl", *common, "--docs-out", str(docs), "--resume",
                         "--json", str(tmp_path / "resumed.json")]) == 0, capsys.readouterr().err
    assert ppl_cli.main(["--model", str(files["model"]), "--corpus", str(files["corpus"]), *common,
                         "--json", str(tmp_path / "whole.json")]) == 0
    resumed, whole = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("resumed", "whole"))
    assert resumed["num_documents"] == len(TEXTS) and resumed["perplexity"] == whole["perplexity"]


def test_a_saved_references_kl_below_zero_is_printed_with_its_interval_and_why():
    result = {"perplexity_ratio_ci": [0.999, 1.001], "kl_divergence_quantiles": {"p50": -2e-5, "p90": 1e-5, "p99": 4e-5,
              "max": 9e-5}, "kl_divergence_sampling_se": 2e-5, "kl_divergence": -1.2e-5, "kl_divergence_se": 1e-6,
              "reference": "base.parquet (m)", "reference_perplexity": 10.0, "perplexity_ratio": 1.0,
              "log_perplexity_ratio": 0.0, "log_perplexity_ratio_se": 1e-5, "top1_agreement": 1.0,
              "top1_agreement_se": 0.0, "rms_delta_p": 0.001, "nll_correlation": 1.0}
    lines = dict(ppl_cli.comparison_lines(result))
    assert lines["KL divergence"] == ("-0.000012 ± 0.000001 nats/token   (estimated from the file; sampling SE 0.000020, "
                                      "95% CI -0.000051 - 0.000027)")
    assert lines["KL note"] == "below 0 only by the file's sampling error: the true KL is >= 0; read the interval"
    result.update(kl_divergence=3e-5, kl_divergence_quantiles={"p50": 1e-5, "p90": 2e-5, "p99": 4e-5, "max": 9e-5})
    assert "KL note" not in dict(ppl_cli.comparison_lines(result))


def test_a_folder_corpus_without_split_names_the_split_to_pass(files, capsys, tmp_path):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    (crawl / "a.jsonl").write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    status = ppl_cli.main(["--model", str(files["model"]), "--device", "cpu", "--corpus", str(crawl), "--quiet"])
    assert status == 2
    one_error_line(capsys.readouterr().err, r"Bad split: test\. Available splits: \['train'\]\. Pass --split \(the `split` "
                                            r"argument\) with one of those \(this run asked for 'test'; a local folder's "
                                            r"data files form the 'train' split\)\.$")


def test_a_folder_of_text_files_is_split_as_each_file_alone(files, capsys, tmp_path):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    a = f"{TEXTS[0]}\n{TEXTS[1]}\n\n\n{TEXTS[2]}\n"  # two paragraphs, the first of two lines
    b = f" = Title = \n\n{TEXTS[3]}\n\n = Other = \n\n{TEXTS[0]}\n"  # WikiText-style: two articles
    (crawl / "a.txt").write_text(a)
    (crawl / "b.txt").write_text(b)
    outputs = {}
    for name, corpus in (("folder", crawl), ("a", crawl / "a.txt"), ("b", crawl / "b.txt")):
        docs = tmp_path / f"docs-{name}"
        status = ppl_cli.main(["--model", str(files["model"]), "--device", "cpu", "--corpus", str(corpus), "--split",
                               "train", "--quiet", "--docs-out", str(docs)])
        assert status == 0, capsys.readouterr().err
        outputs[name] = pd.read_parquet(docs).sort_values("index")
    folder, alone = outputs["folder"], pd.concat([outputs["a"], outputs["b"]])
    assert len(folder) == 4
    assert folder["num_tokens"].tolist() == alone["num_tokens"].tolist()
    assert folder["nll"].tolist() == pytest.approx(alone["nll"].tolist(), rel=1e-6)


def test_a_malformed_json_lines_line_is_named_by_its_line_in_the_file(files, capsys, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": TEXTS[0]}) + "\n\n" + json.dumps({"text": TEXTS[1]}) + "\n{\"text\": oops}\n")
    status = ppl_cli.main(["--model", str(files["model"]), "--device", "cpu", "--corpus", str(corpus), "--quiet"])
    assert status == 2
    one_error_line(capsys.readouterr().err, r"^error: Could not read corpus '.*c\.jsonl': line 4 is not JSON: Expecting "
                                            r"value \(column 10\)$")


def test_an_empty_corpus_leaves_no_folder_that_blocks_a_plain_rerun(files, capsys, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    docs = tmp_path / "docs"
    common = ["--model", str(files["model"]), "--device", "cpu", "--quiet", "--docs-out", str(docs)]
    assert ppl_cli.main([*common, "--corpus", str(blank)]) == 2
    one_error_line(capsys.readouterr().err, r"holds no text")
    assert ppl_cli.main([*common, "--corpus", str(files["corpus"]), "--json", str(tmp_path / "out.json")]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["num_documents"] == len(TEXTS)


def test_a_gguf_that_is_not_one_and_an_empty_model_folder_are_named_whole(files, capsys, tmp_path):
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    assert ppl_cli.main(["--gguf-file", str(binary), "--device", "cpu", "--corpus", str(files["corpus"]), "--quiet"]) == 2
    one_error_line(capsys.readouterr().err, rf"^error: Could not load model '{re.escape(str(tmp_path))}/binary\.bin': ")
    (tmp_path / "empty").mkdir()
    assert ppl_cli.main(["--model", str(tmp_path / "empty"), "--device", "cpu", "--corpus", str(files["corpus"]),
                         "--quiet"]) == 2
    line = capsys.readouterr().err.strip()
    one_error_line(line, r"^error: Could not load model '.*empty': ")
    assert not line.endswith("from one of: ") and not line.endswith(":"), line  # not cut off mid-sentence


def test_only_rank_0_removes_a_half_written_part(tmp_path):
    from ppl_docs import MANIFEST, prepare, write_manifest

    manifest = {"model": "m", "windows": "w"}
    write_manifest(tmp_path, manifest)
    stale = tmp_path / ".part-00003-rank0000.parquet.tmp"
    stale.write_bytes(b"half")
    prepare(tmp_path, manifest, resume=True, rank=1)  # another run's rank 1 may get its own lock: it must not touch it
    assert stale.exists() and (tmp_path / MANIFEST).exists()
    prepare(tmp_path, manifest, resume=True, rank=0)
    assert not stale.exists()


def test_force_with_no_rows_removes_the_earlier_file(tmp_path):
    from ppl_tokens import TOKEN_COLUMNS, TableWriter

    for replace in (False, True):
        path = tmp_path / f"t{replace}.csv"
        path.write_text("an earlier run's rows\n")
        TableWriter(path, TOKEN_COLUMNS, replace=replace).close()
        assert path.exists() is not replace  # kept unless replacing: then it must not pass for this run's rows


def test_the_gradient_is_zero_on_ignored_rows_even_where_their_logits_are_not_finite():
    from ppl_core import perplexity

    preds = torch.randn(1, 3, 5, dtype=torch.float64)
    preds[0, 1, 2] = math.inf
    preds.requires_grad_()
    perplexity(preds, torch.tensor([[1, -100, 4]]), ignore_index=-100).backward()
    assert torch.isfinite(preds.grad).all() and (preds.grad[0, 1] == 0).all()
