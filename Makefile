# Two entry points matter: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck pytest bench bench-quick clean

$(STAMP): pyproject.toml examples/predictions/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip uninstall --quiet --yes batchkit 2>/dev/null || true
	$(PY) -m pip install --quiet -e '.[dev,bench,docs]' -e examples/predictions
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m predictions demo

lint: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m ruff format --check src tests examples benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy

pytest: $(STAMP)
	$(PY) -m pytest --cov --cov-report=term -p no:cacheprovider

test: lint typecheck pytest

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) .coverage .mypy_cache .pytest_cache .ruff_cache .hypothesis
