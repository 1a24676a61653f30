# Every target sets up what it needs on a fresh machine (Python 3.11 + pip).
VENV ?= .venv
PYTHON ?= python3
# CPU build first: installing it before anything that depends on torch keeps pip from pulling
# the newest CUDA build. GPU users: TORCH="torch==<version>" with their CUDA index.
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: install quickstart text-example test test-fast lint format clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip check
	touch $@

# The text example (and its test) read Debian's fortunes package: real short texts by topic.
FORTUNES = /usr/share/games/fortunes/computers
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo) DEBIAN_FRONTEND=noninteractive

$(FORTUNES):
	$(SUDO) apt-get install -y -qq fortunes >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq fortunes >/dev/null)

install: $(BIN)/.installed $(FORTUNES)

quickstart: install
	$(BIN)/mergeline run examples/quickstart.yaml --summary .mergeline/quickstart-summary.json

text-example: install
	$(BIN)/python examples/make_text_data.py
	$(BIN)/mergeline run examples/text-minilm.yaml --summary .mergeline/text-summary.json

# Three pytest workers: the integration and e2e tiers spend much of their time waiting on Ray,
# MLflow and subprocesses; two workers left a fifth of 2 cores idle. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 3

test: install
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal

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
