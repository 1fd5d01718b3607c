# Two entry points matter: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck pytest docs docs-serve pythons bench bench-quick clean

$(STAMP): pyproject.toml examples/predictions/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# A venv made before the rename to aio-batchkit holds a stale `batchkit` install: drop it.
	$(PY) -m pip uninstall --quiet --yes batchkit 2>/dev/null || true
	$(PY) -m pip install --quiet -e '.[dev,bench,docs]' -e examples/predictions
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m predictions demo

# .pre-commit-config.yaml's hooks over every tracked file (ruff, ruff format, codespell, pylint's
# duplicate-code check of _engine against _dask); mypy is `make typecheck`. The hooks run the venv's tools, so they go first on PATH.
lint: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" SKIP=mypy $(PY) -m pre_commit run --all-files --show-diff-on-failure

typecheck: $(STAMP)
	$(PY) -m mypy

pytest: $(STAMP)
	$(PY) -m pytest --cov --cov-report=term -p no:cacheprovider

# The site: MkDocs + Material, API reference from docstrings; --strict fails on any broken link.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir site

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

# The pytest suite on every other Python the package claims (noxfile.py; 3.11 is `pytest`).
pythons: $(STAMP)
	$(PY) -m nox --no-error-on-missing-interpreters

test: lint typecheck pytest docs

bench: $(STAMP)
	$(PY) -m benchmarks

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) .coverage .mypy_cache .pytest_cache .ruff_cache .hypothesis .nox site
