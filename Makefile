# tfm: every target sets up its own virtual environment (.venv) on first use.
#   make test           the whole test suite (CPU, then CUDA kernels under Numba's simulator)
#   make studies        every study on the default grid -> results/ (tables, figures, REPORT.md);
#                       rows already measured by the same tfm sources are reused
#                       (STUDIES_ARGS=--fresh measures everything again)
#   make studies-quick  a small grid in a few minutes (into $(QUICK_OUT))
#   make bench          the pytest-benchmark suite, saved under this machine's name; its
#                       tfm-vs-PyTorch table -> results/tables/benchmarks.csv (in the report)
#   make bench-compare  compare with the saved baseline; fail on a slowdown > $(BENCH_FAIL)
#   make gpu-check      the GPU run (studies/gpu.py): smoke, correctness, the studies on the GPU
#                       -> $(GPU_OUT). On a machine with preinstalled packages and no network:
#                         make gpu-check GPU_PYTHON=python3 GPU_OUT=/some/dir
#                       (no virtual environment, nothing installed). GPU_ARGS adds options,
#                       e.g. GPU_ARGS="--budget-s 300"; under NUMBA_ENABLE_CUDASIM=1, --smoke.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
# Compiled Numba kernels are cached between runs (cache=True), in a directory keyed by a hash
# of tfm's sources: Numba checks only the file of the function it compiled, so a kernel that
# calls a changed helper in another module would otherwise run its stale cached code.
SRC_HASH := $(shell cat $(sort $(wildcard tfm/*.py tfm/*/*.py tfm/*/*/*.py)) | sha1sum | cut -c1-12)
# The GPU run with GPU_PYTHON set uses that interpreter as it is: no .venv, not even for the cache.
GPU_PYTHON ?=
GPU_OUT ?= results/gpu
GPU_ARGS ?=
ifeq ($(strip $(GPU_PYTHON)),)
export NUMBA_CACHE_DIR ?= $(CURDIR)/.venv/numba-cache/$(SRC_HASH)
else
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba-cache/$(SRC_HASH)
endif

QUICK_OUT ?= $(CURDIR)/results-quick
BENCH_NAME ?= $(shell uname -m)-$(shell nproc)cpu
BENCH_FAIL ?= median:25%
BENCH_ARGS ?=
STUDIES_ARGS ?=

.PHONY: all venv test test-cpu test-cudasim test-cudasim-log bench bench-compare bench-baseline studies studies-quick gpu-check clean

all: test

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test,torch]'
	touch $(STAMP)

# The two suites run side by side: the CPU suite is mostly Numba compiling on one core, the
# simulator suite is Python threads under one GIL. The last CI run before this (2 cores, and
# before the simulator's barrier fix in tfm/backends/cuda/_simulator.py) took 13.3 + 10.3
# minutes in sequence; side by side, after the fix, a fresh clone's .ci/run took 16.8 in all.
# The CPU suite shows its progress; the simulator suite's output follows when it ends.
test: $(STAMP)
	@echo "make test: the CPU suite and the CUDA-simulator suite run side by side (log: $(VENV)/test-cudasim.log)"
	@$(MAKE) --no-print-directory -j2 test-cpu test-cudasim-log

test-cpu: $(STAMP)
	$(PY) -m pytest -q --ignore=tests/cuda --benchmark-disable -p no:cacheprovider

# Numba reads NUMBA_ENABLE_CUDASIM when it is first imported: this must be its own process.
test-cudasim: $(STAMP)
	NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest -q tests/cuda --benchmark-disable -p no:cacheprovider

test-cudasim-log: $(STAMP)
	@$(MAKE) --no-print-directory test-cudasim > $(VENV)/test-cudasim.log 2>&1; rc=$$?; \
		echo "---- the CUDA-simulator suite (tests/cuda) ----"; cat $(VENV)/test-cudasim.log; exit $$rc

bench: $(STAMP)
	$(PY) -m pytest tests/benchmarks --benchmark-only --benchmark-save=$(BENCH_NAME) \
		--benchmark-columns=min,median,iqr,ops,rounds --benchmark-sort=fullname $(BENCH_ARGS)
	$(PY) -m studies.benchmarks  # the saved run's tfm-vs-PyTorch table -> results/tables/benchmarks.csv

bench-compare: $(STAMP)
	$(PY) -m pytest tests/benchmarks --benchmark-only --benchmark-compare \
		--benchmark-compare-fail=$(BENCH_FAIL) --benchmark-columns=min,median,iqr,rounds \
		--benchmark-sort=fullname $(BENCH_ARGS)

studies: $(STAMP)
	$(PY) -m studies.run_all $(STUDIES_ARGS)

studies-quick: $(STAMP)
	$(PY) -m studies.run_all --quick --out $(QUICK_OUT)

ifeq ($(strip $(GPU_PYTHON)),)
gpu-check: $(STAMP)
	$(PY) -m studies.gpu --out $(GPU_OUT) $(GPU_ARGS)
else
gpu-check:
	$(GPU_PYTHON) -m studies.gpu --out $(GPU_OUT) $(GPU_ARGS)
endif

clean:
	rm -rf $(VENV) .numba-cache .pytest_cache .benchmarks results-quick
