# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= signalprop-demo

.PHONY: setup demo test lint typecheck docs unit bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# mup (the muP reference, compared against in tests/fix/test_mup_package.py): without the plotting
	# dependencies it declares (torchvision would pull a CUDA torch).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt mup
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/signalprop demo --out $(OUT)

lint: setup
	$(VENV)/bin/ruff check src tests bench

typecheck: setup
	$(VENV)/bin/mypy

# The docs site (mkdocs-material + mkdocstrings), built with --strict so that a broken reference fails.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d build/site

# Two workers, one thread each: on the 2 cores CI has, torch's own threads would only contend.
unit: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -n 2 -q tests --doctest-modules src/signalprop

test: lint typecheck docs unit

# Runs every benchmark and writes bench/RESULTS.md from this run's output (commit, cores, numbers).
bench: setup
	$(PY) bench/results.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache signalprop-demo
