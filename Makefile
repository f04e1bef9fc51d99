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

# two workers, each taking whole test files (a file's tests share its set-ups and
# their order): most of the suite's wall is waits (timeouts, peers' deaths, one
# process importing torch), not CPU, so two overlap on two cores; TEST_JOBS=0 runs
# it in one process
TEST_JOBS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra $(if $(filter-out 0,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile)

bench: $(STAMP)
	$(BIN)/python -m mesh.bench
	$(BIN)/python -m collectives.tools.bench --op all_reduce -n 4 --sizes 8:64M

clean:
	rm -rf $(VENV) build *.egg-info
