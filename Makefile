# The two commands of the README are `make demo` and `make test`; both set everything up first.
.PHONY: setup demo test test-fast lint bench clean

VENV ?= .venv
BIN := $(VENV)/bin

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/neurofm demo $(ARGS)

# Tests run in one worker process per core (pytest-xdist, at most 4), each worker on its share of the cores'
# threads (tests/conftest.py); a long test is taken up by whichever worker is free.
PYTEST := $(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist worksteal

test: setup
	$(BIN)/ruff check src tests benchmarks scripts experiments
	$(PYTEST) --durations=15 $(ARGS)

test-fast: setup
	$(PYTEST) -m "not slow" $(ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks scripts experiments
	$(BIN)/ruff format --check src tests benchmarks scripts experiments

bench: setup
	$(BIN)/python benchmarks/run_all.py $(ARGS)

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache
