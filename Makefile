# Every target bootstraps .venv from pyproject.toml when it is missing or stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint clean bytecode

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The package is installed editable, so pip compiled none of its modules; when the environment
# sets PYTHONDONTWRITEBYTECODE (as some CI images do), every dvx-dr command would compile its
# modules from source at start-up (about 10 ms for `dvx-dr status`, more for the store's
# commands). Compiling them here, as a regular install does, keeps commands fast; a module
# edited later is recompiled by Python in memory until the next run of this step.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q src

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test: lint bytecode
	$(BIN)/python -m pytest -q tests

demo: bytecode
	PATH="$(CURDIR)/$(BIN):$$PATH" bash deploy/demo.sh

bench: bytecode
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/ingest.py --runs 3
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/replicate.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
