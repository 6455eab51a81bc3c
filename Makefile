# The two commands of the README are `make demo` and `make test`; both set everything up first.
.PHONY: setup demo test test-fast lint bench clean

VENV ?= .venv
BIN := $(VENV)/bin

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/neurofm demo $(ARGS)

test: setup
	$(BIN)/ruff check src tests benchmarks scripts experiments
	$(BIN)/python -m pytest -q --durations=15 $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts experiments
	$(BIN)/ruff format --check src tests benchmarks scripts experiments

bench: setup
	$(BIN)/python benchmarks/run_all.py $(ARGS)

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache
