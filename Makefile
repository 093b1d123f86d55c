# Every target sets itself up: a fresh machine needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test
# The hot-path modules are compiled in place by mypyc (setup.py): any change to a top-level module of
# either package rebuilds them, so tests and benchmarks never run stale compiled code.
SOURCES := setup.py pyproject.toml $(wildcard gateway/*.py policies/*.py)

.PHONY: run test lint typecheck pytest bench bench-sim bench-proxies bench-routing bench-gateway clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP_RUN): $(SOURCES) | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP_TEST): $(SOURCES) | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(STAMP_RUN)

run: $(STAMP_RUN)
	$(BIN)/llm-gateway demo

lint: $(STAMP_TEST)
	$(BIN)/ruff check setup.py gateway policies tests loadtests
	$(BIN)/ruff format --check setup.py gateway policies tests loadtests

typecheck: $(STAMP_TEST)
	$(BIN)/mypy

pytest: $(STAMP_TEST)
	$(BIN)/pytest -q -ra

test: lint typecheck pytest

bench: bench-sim bench-proxies bench-routing

bench-sim: $(STAMP_TEST)
	$(BIN)/python loadtests/bench_sim.py

bench-proxies: $(STAMP_TEST)
	$(BIN)/python loadtests/bench_proxies.py
	$(BIN)/python loadtests/bench_scrape.py

bench-gateway: $(STAMP_TEST)
	$(BIN)/python loadtests/bench_gateway.py

bench-routing: $(STAMP_TEST)
	$(BIN)/python loadtests/bench_decision.py
	$(BIN)/python loadtests/bench_routing.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info *.so gateway/*.so policies/*.so
