# rtdetr_lit developer commands. Every target installs what it needs first (once).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pins for the project machines (see constraints.txt); `make install CONSTRAINTS=` lifts them.
CONSTRAINTS ?= constraints.txt
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train test test-slow test-all lint format bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install the package (editable) with its dev extras

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $@

train: install ## run the main job: train on the embedded synthetic dataset (ARGS="key=value ...")
	$(BIN)/python -m rtdetr_lit.train $(ARGS)

test: install ## run the default test suite (everything not marked slow)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install ## run only the slow tests
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: install ## run every test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install ## ruff lint and format check
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: install ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

bench: install ## run the benchmark scripts (numbers go to BENCHMARKS.md)
	@set -e; for b in scripts/bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b; done

clean: ## remove build artefacts and caches (keeps .venv and data/)
	rm -rf build dist .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
