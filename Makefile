# Targets bootstrap a virtual environment in $(VENV) on first use.
#   make train            train configs/tiny_cpu.yaml on 2 CPU ranks (torchx local_cwd)
#   make test             install (if needed) and run the test suite
#   make install VARIANT=cuda   the same environment with the CUDA fbgemm-gpu
VENV ?= .venv
VARIANT ?= cpu
PYTHON ?= python3
TORCHREC_VERSION ?= 1.8.0
# the versions the suite last passed with (empty: whatever pip resolves today)
CONSTRAINTS ?= requirements/constraints.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(VARIANT)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install train test test-all test-gpu-machine-releases lint bench clean

$(STAMP): requirements/$(VARIANT).txt requirements/common.txt requirements/dev.txt $(CONSTRAINTS) setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=70.1"  # builds the editable install (no isolation)
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -r requirements/$(VARIANT).txt -r requirements/dev.txt
	# torchrec declares the CUDA fbgemm-gpu as a dependency; its real ones are in common.txt
	$(PY) -m pip install -q --no-deps torchrec==$(TORCHREC_VERSION)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# prepare_mlperf's compiled loops (C, built with cc into ~/.cache/dlrm_torchrec); without
	# a compiler the rest still installs, and prepare_mlperf says what it lacks
	$(PY) -m dlrm_torchrec.data.converters.native || echo "warning: prepare_mlperf's C loops not built (above); training is unaffected" >&2
	touch $@

install: $(STAMP)

train: install
	torchx run -s local_cwd dist.ddp -j 1x2 -m dlrm_torchrec.train -- --config configs/tiny_cpu.yaml

# Test files run in TEST_WORKERS processes (pytest-xdist), a file's tests in one of them so
# its module fixtures (a trained run, a checkpoint) are built once; 0 runs them in this one
TEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: install
	$(PY) -m ruff check dlrm_torchrec launch tests bench
	$(PY) -m pytest -q -m "not slow and not alone" $(PYTEST_PARALLEL) --durations=15 tests  # the slowest last: regressions show
	$(PY) -m pytest -q -m "alone and not slow" tests  # tests that time things, with no other test beside them

# The GPU machine runs torch 2.11, fbgemm-gpu 1.6.0 and torchrec 1.6.1: the suite on those
# releases (on CPU), so code keeps to what both release trains have
test-gpu-machine-releases:
	$(MAKE) test VENV=.venv-gpu-machine VARIANT=gpu-machine TORCHREC_VERSION=1.6.1

test-all: install
	$(PY) -m pytest -q -m "not alone" $(PYTEST_PARALLEL) tests
	$(PY) -m pytest -q -m alone tests

bench: install
	$(PY) bench/bench_cpu.py

clean:
	rm -rf $(VENV) .venv-gpu-machine .venv-torchrec161 runs .pytest_cache
