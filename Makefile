# KLIP: `make demo` sets up .venv and trains the `tiny` config end to end; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data
DEMO_CHIPS ?= 4000
DEMO_WORKDIR ?= workdirs/tiny
# Transparent huge pages for XLA:CPU's per-step temporaries (klip/host_memory.py; the effect on
# B1 in bench/README.md). glibc reads it at process start, so every target's Python gets it.
GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
export GLIBC_TUNABLES

.PHONY: venv venv-tpu demo eval test test-fast clean bench

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

# Optional: .venv-tpu, the pinned stack plus libtpu (about 0.7 GB), for `klip.compile_ahead
# --topology` (compiles for a TPU topology on this CPU). Never needed by `make test`.
.venv-tpu/.installed: requirements.txt requirements-tpu.txt
	$(PYTHON) -m venv .venv-tpu
	.venv-tpu/bin/python -m pip install -q --upgrade pip
	.venv-tpu/bin/python -m pip install -q -r requirements-tpu.txt
	touch $@

venv-tpu: .venv-tpu/.installed

demo: venv
	$(PY) -m klip.data.prepare --dataset=synthetic --data_dir=$(DATA_DIR) \
	    --num_chips=$(DEMO_CHIPS) --image_size=64 --channels=2 --seed=0
	$(PY) -m klip.train --config=configs/pretrain.py:tiny --workdir=$(DEMO_WORKDIR) \
	    --config.data.data_dir=$(DATA_DIR)

eval: venv
	$(PY) -m evals.run --config=configs/eval.py:tiny --workdir=$(DEMO_WORKDIR) --once \
	    --config.data_dir=$(DATA_DIR)

# Two pytest-xdist workers (TEST_WORKERS=0: one process): tests sharing a module-scoped fixture
# or the real archives stay on one worker (xdist_group marks, tests/conftest.py).
TEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder)

test: venv
	$(PY) -m pytest -q -rs --durations=15 $(PYTEST_PARALLEL) tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_PARALLEL) tests

# Benchmarks B1-B6 (bench/README.md). The open_clip side runs in .venv-bench (PyTorch, about
# 5.6 GB), created here when missing or older than requirements-bench.txt; never by `make test`.
# BENCH_ARGS=--quick for one round of each.
bench: venv
	@if [ ! -f .venv-bench/.installed ] || [ requirements-bench.txt -nt .venv-bench/.installed ]; then \
	  $(PYTHON) -m venv .venv-bench && \
	  .venv-bench/bin/python -m pip install -q --upgrade pip && \
	  .venv-bench/bin/python -m pip install -q -r requirements-bench.txt && \
	  touch .venv-bench/.installed; fi
	PYTHONPATH=. $(PY) -m bench.run_all $(BENCH_ARGS)

clean:
	rm -rf $(DEMO_WORKDIR) .cache .pytest_cache
