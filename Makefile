# Two entry points for a fresh machine: `make quickstart` (train -> export the whole model at 1.25 bits per parameter ->
# evaluate -> analyze, on the built-in corpus) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart baseline test test-fast bench

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e ".[test]"
	$(BIN)/python -c "from hf_signlock.kernels import extension; extension.report()"
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(BIN)/hf-signlock train --config recipes/quickstart.yaml
	$(BIN)/hf-signlock export runs/quickstart runs/quickstart-export --bits_per_parameter 1.25 --refine_steps 200 --refine_loss teacher --overwrite
	$(BIN)/hf-signlock eval runs/quickstart-export --output runs/quickstart-export/eval.json
	$(BIN)/hf-signlock analyze runs/quickstart-export --output runs/quickstart-export/analysis
	$(BIN)/hf-signlock inspect runs/quickstart-export

baseline: setup
	$(BIN)/hf-signlock train --config recipes/baseline.yaml

test: setup
	$(BIN)/python -m pytest -m "not gpu"

test-fast: setup
	$(BIN)/python -m pytest -m "not gpu and not slow"

bench: setup
	$(BIN)/python bench/bench_signs.py
	$(BIN)/python bench/bench_import.py
