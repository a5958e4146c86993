# `make demo` runs the whole pipeline on the embedded default (tiny models, CPU).
# `make test` runs the test suite. Both create or reuse .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build available locally; a GPU cluster installs its own torch first.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,mpi,real]"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/kdcl-dist demo --out runs/demo

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check kdcl_dist tests
	$(VENV)/bin/ruff format --check kdcl_dist tests

bench: venv
	$(VENV)/bin/kdcl-dist bench all

clean:
	rm -rf runs build *.egg-info .pytest_cache
