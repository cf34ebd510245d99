# The two set-up commands of the README. Each installs what it needs first.
#   make run   - the service on its embedded default (SQLite everywhere, no server needed)
#   make test  - lint, type-check, validate the Dagster definitions, run every test
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install install-test services check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

run: install
	$(BIN)/tenantctl serve

services:
	scripts/services
	scripts/browser

check: install-test
	$(BIN)/ruff check tenant_pipelines tests bench
	$(BIN)/ruff format --check tenant_pipelines tests bench
	$(BIN)/mypy
	TP_DATA_DIR=$$(mktemp -d) $(BIN)/python scripts/validate_definitions.py

test: check services
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)
