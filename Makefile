# Two commands: `make run` and `make test`. Each sets up .venv on a fresh machine by itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: run test test-fast build setup clean bench mutants

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# torch first, pinned: this pin resolves to the local CPU wheel (a looser one pulls a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q Cython numpy
	$(PY) -m pip install -q --no-build-isolation -e '.[test,bench,dmc,plot]'
	touch $@

setup: $(STAMP)

build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# Single-host dev mode with the `dev` preset on Pong.
run: build
	$(VENV)/bin/gorila-zmq dev --preset dev

# The whole suite with the Cython kernels, then the fast tier again on the NumPy fallbacks.
test: build
	$(PY) -m pytest -q --durations=12 $(PYTEST_ARGS)
	GORILA_PUREPYTHON=1 $(PY) -m pytest -q --durations=8 -m "not slow" $(PYTEST_ARGS)

# What a developer runs locally: skips the slow end-to-end tier.
test-fast: build
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Mutation testing of the algorithms and the protocol (tools/mutants.py; ~10 minutes, not in CI).
mutants: build
	$(PY) tools/mutants.py

# Every benchmark, one after another, each writing docs/bench/NAME.json (about 22 minutes; run it on
# an otherwise idle machine: each compares against its baseline in the same run, but 2 cores are few).
bench: build
	mkdir -p docs/bench
	$(VENV)/bin/gorila-zmq bench adagrad --json docs/bench/adagrad.json
	$(VENV)/bin/gorila-zmq bench ps --curve --json docs/bench/ps.json
	$(VENV)/bin/gorila-zmq bench preprocess --json docs/bench/preprocess.json
	$(VENV)/bin/gorila-zmq bench replay --json docs/bench/replay.json
	$(VENV)/bin/gorila-zmq bench learner --json docs/bench/learner.json
	$(VENV)/bin/gorila-zmq bench e2e --json docs/bench/e2e.json
	$(VENV)/bin/gorila-zmq bench drqv2 --json docs/bench/drqv2.json
	$(VENV)/bin/gorila-zmq bench scale --quick --json docs/bench/scale.json --plot docs/bench/scale.png

clean:
	rm -rf build gorila_zmq/_ext/*.so ext/*.c
