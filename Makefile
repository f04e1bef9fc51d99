# Quick start: `make demo` and `make test` create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
CORE := $(VENV)/.installed

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(CORE)

# the demo needs the core only (pyzmq, msgpack, numpy): no torch
$(CORE): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

demo: $(CORE)
	$(BIN)/meshrun -n 4 examples/train_pipeline.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP)
	$(BIN)/python -m mesh.bench
	$(BIN)/python -m collectives.tools.bench --op all_reduce -n 4 --sizes 8:64M

clean:
	rm -rf $(VENV) build *.egg-info
