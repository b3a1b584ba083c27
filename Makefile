# Two commands set everything up on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MODELS := build/models
CODE := edgefleet edge_runtime cloud_sync tests bench models protos examples

# The device side must run on JetPack 6's Python 3.10: `make test` also runs its tests there when a
# Python 3.10 is installed (pyenv's or the system's).
PY310 ?= $(shell for p in python3.10 /usr/bin/python3.10 $$(ls -d $$HOME/.pyenv/versions/3.10*/bin/python3.10 2>/dev/null); do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1 && echo $$p && break; done)
VENV310 := .venv310
STAMP310 := $(VENV310)/.installed-stamp

.PHONY: all install models demo test test-fast pytest pytest-py310 lint format bench protos clean

all: test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

models: $(STAMP)
	$(BIN)/python -m models.build --out $(MODELS)

# To watch and steer the demo's rollouts in the dashboard: make demo DEMO_ARGS="--bake-s 30 --stay-s 600"
demo: models
	$(BIN)/python -m examples.demo --models $(MODELS) $(DEMO_ARGS)

test: lint pytest pytest-py310

# Several test processes (pytest-xdist; a module's tests stay together, so its fixtures start once): most
# tests wait on real processes, brokers and databases, so 3 workers on 2 cores halve the wall time.
# PYTEST_WORKERS=0 runs them in this process. The dashboard's browser tests run after the rest, alone:
# Chromium beside three workers starved the tests that time their event loops.
PYTEST_WORKERS ?= 3
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadscope)

pytest: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) --ignore=tests/dashboard --durations=25
	$(BIN)/python -m pytest tests/dashboard

# The inner loop: every test but the slow fault tests (real processes killed, brokers and databases restarted).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q $(XDIST)

$(STAMP310): pyproject.toml
	test -x $(VENV310)/bin/python || $(PY310) -m venv $(VENV310)
	$(VENV310)/bin/python -m pip install --quiet --upgrade pip
	$(VENV310)/bin/python -m pip install --quiet -e ".[test]"
	touch $(STAMP310)

pytest-py310:
ifeq ($(PY310),)
	@echo "pytest-py310: no Python 3.10 found; the device-side tests ran on $$($(BIN)/python --version) only"
else
	$(MAKE) $(STAMP310)
	$(VENV310)/bin/python -m pytest tests/edge_runtime tests/models -q -p no:cacheprovider $(XDIST)
endif

lint: $(STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/mypy
	$(BIN)/python protos/generate.py --check

format: $(STAMP)
	$(BIN)/ruff format $(CODE)
	$(BIN)/ruff check --fix $(CODE)

bench: models
	$(BIN)/python -m bench --models $(MODELS)

protos: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) $(VENV310) build bench/results .pytest_cache .mypy_cache .ruff_cache
