# The two commands of the README's quickstart: `make demo` and `make test`.
# Each creates .venv with what it needs first (a fresh machine needs only Python 3.11 and make).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export MLFLOW_ALLOW_FILE_STORE := true

.PHONY: demo test test-min lint bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-core

demo: $(VENV)/.installed-core
	$(BIN)/steplog demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

# The core suite (no mlflow, no torch) on the lowest versions pyproject.toml declares, in .venv-min.
.venv-min/.installed: pyproject.toml .ci/min_requirements.py
	$(PYTHON) -m venv .venv-min
	.venv-min/bin/python -m pip install -q --upgrade pip
	$(PYTHON) .ci/min_requirements.py > .venv-min/requirements.txt
	.venv-min/bin/python -m pip install -q -r .venv-min/requirements.txt
	.venv-min/bin/python -m pip install -q --no-deps -e .
	touch $@

test-min: .venv-min/.installed
	.venv-min/bin/python -m pytest -q -m "not mlflow and not torch"

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed-core

bench: $(VENV)/.installed-bench
	$(BIN)/steplog bench

bench-quick: $(VENV)/.installed-bench
	$(BIN)/steplog bench --quick

clean:
	rm -rf $(VENV) .venv-min mlruns .pytest_cache .mypy_cache .ruff_cache
