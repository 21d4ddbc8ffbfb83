# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build on CPU machines.
TORCH  ?= torch==2.13.0

.PHONY: install run test test-postgres lint format bench tiny-model clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev,postgres]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/smolcord run

test: $(STAMP)
	$(VENV)/bin/pytest -q

# The feedback store's tests against a throwaway PostgreSQL server (installed from Debian's packages if missing).
test-postgres: $(STAMP)
	bash .ci/postgres.sh

# ruff (lint + format), mypy, and the layering of DESIGN.md as import-linter contracts (pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m bench

tiny-model: $(STAMP)
	$(VENV)/bin/smolcord tiny-model data/tiny-model --arch tiny

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
