# The two commands of the README, plus the benchmarks. Each one installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
NONSTOP := $(VENV)/bin/nonstop

.PHONY: setup demo test test-unit test-netns bench lint clean-labs

setup:
	@scripts/setup.sh all

demo: setup
	$(NONSTOP) demo

test: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-netns: setup
	$(PY) -m pytest -q tests/netns

# nonstop vs keepalived, 10 ms interval: 20 kills, 20 node deaths, a 60 s soak; JSON in bench/results/
bench: setup
	NONSTOP=$(NONSTOP) bench/run.sh 20 60

lint: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

# Removes every lab this machine still has (also those left by a killed run).
clean-labs: setup
	$(NONSTOP) lab down --all
