# Every target sets up what it needs on a fresh machine (Python 3.11 + pip).
VENV ?= .venv
PYTHON ?= python3
# CPU build first: installing it before anything that depends on torch keeps pip from pulling
# the newest CUDA build. GPU users: TORCH="torch==<version>" with their CUDA index.
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: install quickstart test test-fast lint format clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip check
	touch $@

install: $(BIN)/.installed

quickstart: install
	$(BIN)/mergeline run examples/quickstart.yaml --summary .mergeline/quickstart-summary.json

test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow and not integration and not e2e"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf .mergeline .pytest_cache .ruff_cache
