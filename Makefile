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

bench: setup
	$(NONSTOP) bench failover --runs 20 --interval-ms 10 --fault kill --baseline keepalived --format json
	$(NONSTOP) bench failover --runs 20 --interval-ms 10 --fault node --baseline keepalived --format json

lint: setup
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench

# Removes every lab this machine still has (also those left by a killed run).
clean-labs: setup
	$(NONSTOP) lab down --all
