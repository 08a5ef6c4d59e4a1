# Two entry points for a fresh machine: `make quickstart` (train -> evaluate on the built-in corpus) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart baseline test test-fast bench

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(BIN)/hf-signlock train --config recipes/quickstart.yaml

baseline: setup
	$(BIN)/hf-signlock train --config recipes/baseline.yaml

test: setup
	$(BIN)/python -m pytest -m "not gpu"

test-fast: setup
	$(BIN)/python -m pytest -m "not gpu and not slow"

bench: setup
	$(BIN)/python bench/bench_signs.py
