# The same commands run locally and in CI. Every target sets up .venv first if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench-generate bench-train bench-quality clean

# Re-install when pyproject.toml changes. torch is pinned to 2.13.0 (a CPU build on local disk).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev,redis]'
	touch $(STAMP)

## Main job on embedded defaults: synthetic world, validation, training, evaluation (the API when it lands).
demo: $(STAMP)
	$(BIN)/finrec demo

## The whole test suite, slow and integration tests included (what CI runs).
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -m "" -q

## Quick tests only (slow and integration skipped).
test-fast: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench-generate: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/bench_quality.py

clean:
	rm -rf $(VENV) finrec-workspace .pytest_cache .ruff_cache .mypy_cache
