# trioserve: `make run` serves the example, `make test` runs every check CI runs.
# Both create .venv when it is missing and install what they need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PYTHONPATH := $(CURDIR)

.PHONY: run test lint typecheck unit sim-ci sim bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

# Serves examples/app.py at http://127.0.0.1:8000 until Ctrl-C.
run: $(VENV)/.installed
	$(BIN)/python examples/app.py

test: $(VENV)/.installed-test lint typecheck unit sim-ci

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy --strict trioserve

unit: $(VENV)/.installed-test
	$(BIN)/pytest tests -q

# The CI simulation budget: a fixed, derandomized set of scenarios.
sim-ci: $(VENV)/.installed-test
	HYPOTHESIS_PROFILE=ci $(BIN)/pytest simulations -q -p no:cacheprovider

# The long simulation profile, on demand.
sim: $(VENV)/.installed-test
	HYPOTHESIS_PROFILE=long $(BIN)/pytest simulations -q -p no:cacheprovider

# The whole suite: one Markdown table on stdout (progress on stderr); see benchmarks/__main__.py.
bench: $(VENV)/.installed-test
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
