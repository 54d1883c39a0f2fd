# KLIP: `make demo` sets up .venv and trains the `tiny` config end to end; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data
DEMO_CHIPS ?= 4000
DEMO_WORKDIR ?= workdirs/tiny

.PHONY: venv demo eval test test-fast clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m klip.data.prepare --dataset=synthetic --data_dir=$(DATA_DIR) \
	    --num_chips=$(DEMO_CHIPS) --image_size=64 --channels=2 --seed=0
	$(PY) -m klip.train --config=configs/pretrain.py:tiny --workdir=$(DEMO_WORKDIR) \
	    --config.data.data_dir=$(DATA_DIR)

eval: venv
	$(PY) -m evals.run --config=configs/eval.py:tiny --workdir=$(DEMO_WORKDIR) --once \
	    --config.data_dir=$(DATA_DIR)

test: venv
	$(PY) -m pytest -q -rs --durations=15 tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(DEMO_WORKDIR) .cache .pytest_cache
