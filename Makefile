# One-command setup and tests. TORCH pins the CPU build that this kind of machine has on local disk;
# a bare `torch` could pull a multi-GB CUDA wheel. On a GPU box: make setup TORCH="torch==2.13.0 --index-url <your CUDA index>".
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: setup test test-fast lint repro

# setuptools notes every editable install of a package-dir layout ("Editable installation..."): information,
# not a problem, so it is filtered out.
setup:
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e ".[dev]"

test:
	$(PY) -m pytest -q

# The fast tier: every module at tiny size, float32 only, no subprocess or multi-rank runs (-m 'not slow').
test-fast:
	$(PY) -m pytest -q -m "not slow"

lint:
	$(VENV)/bin/ruff check .

# The stages call the console scripts (harvest, train, evaluate), so the venv's bin goes first on PATH.
repro:
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc repro
