# Quickstart: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_SHARDS := data/demo

.PHONY: demo test test-all test-interop lint clean

# torch only loads data: the CPU build (on this machine's disk) is the right one here.
# GPU/TPU users: see README ("Installing for GPU or TPU").
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(DEMO_SHARDS)/metadata.json: | $(STAMP)
	$(PY) -m saev_jax.synthetic --out $(DEMO_SHARDS) --d-vit 64 --n-features 256 --k 4 --n-imgs 2048 --n-patches-per-img 64 --n-patches-per-shard 33280 --seed 0

demo: $(STAMP) $(DEMO_SHARDS)/metadata.json
	rm -rf checkpoints/demo
	$(PY) -m saev_jax.train sweeps/demo.toml

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

# The exports loaded by the peers' own released code (SAELens, sparsify, saev): tests/test_interop.py
# in a venv of its own (.venv-interop), since sae-lens brings transformers and more. saev 0.1.0 is
# installed without its GPU/web dependencies.
INTEROP := .venv-interop
$(INTEROP)/.installed-stamp: pyproject.toml
	$(PYTHON) -m venv $(INTEROP)
	$(INTEROP)/bin/python -m pip install -q --upgrade pip
	$(INTEROP)/bin/python -m pip install -q torch==2.13.0
	$(INTEROP)/bin/python -m pip install -q -e '.[dev,interop]'
	$(INTEROP)/bin/python -m pip install -q --no-deps saev==0.1.0
	touch $@

test-interop: $(INTEROP)/.installed-stamp
	$(INTEROP)/bin/python -m pytest -q -rs tests/test_interop.py

# Lint and check the formatting (ruff, configured in pyproject.toml); `ruff format .` fixes the latter.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) $(INTEROP) data/demo checkpoints/demo
