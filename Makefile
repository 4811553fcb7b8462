# Developer entry points. Every recipe runs under bash -euo pipefail, so any failing step stops make.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
BENCH_ARGS ?=
VENV := .venv
VPY := $(VENV)/bin/python
# Touched after a successful install; reinstalls only when pyproject.toml changes.
STAMP := $(VENV)/.installed
LINT_PATHS := lightning_commsgd tests examples benchmarks

.PHONY: venv demo test test-extended lint bench bench-adacomm bench-decentralized bench-redundancy bench-compression bench-overhead bench-cluster bench-ps clean distclean

venv: $(STAMP)

# torch's CPU build first (no CUDA libraries to download); plain torch where no +cpu wheel is on offer.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" || $(VPY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(VPY) -m pip install -q -e ".[examples,dev]"
	touch $@

demo: venv
	$(VPY) examples/demo.py

lint: venv
	$(VPY) -m ruff check $(LINT_PATHS)

test: venv
	$(VPY) -m ruff check $(LINT_PATHS)
	$(VPY) -m pytest -x -q --durations=50 -m "not fault_matrix and not extended" tests

# What make test leaves to CI, to stay near 15 minutes: the rest of the fault-injection matrix (every rank x
# crash/kill/hang x mid-period/in a round, every kind of damaged checkpoint under Lightning), the
# parameter-server worker deaths, and the longer variants of tests whose core case make test runs.
test-extended: venv
	$(VPY) -m pytest -x -q --durations=20 -m "fault_matrix or extended" tests

bench: venv
	$(VPY) benchmarks/bench_local_sgd.py $(BENCH_ARGS)

bench-ps: venv
	$(VPY) benchmarks/bench_parameter_server.py $(BENCH_ARGS)

bench-adacomm: venv
	$(VPY) benchmarks/bench_adacomm.py $(BENCH_ARGS)

bench-decentralized: venv
	$(VPY) benchmarks/bench_decentralized.py $(BENCH_ARGS)

bench-redundancy: venv
	$(VPY) benchmarks/bench_redundancy.py $(BENCH_ARGS)

bench-compression: venv
	$(VPY) benchmarks/bench_compression.py $(BENCH_ARGS)

bench-overhead: venv
	$(VPY) benchmarks/bench_overhead.py $(BENCH_ARGS)

# Needs root: network namespaces and tc rate limits emulate the nodes and their links.
bench-cluster: venv
	$(VPY) benchmarks/bench_cluster.py $(BENCH_ARGS)

# Caches and build leftovers; the virtualenv stays (see distclean).
clean:
	rm -rf .pytest_cache .ruff_cache lightning_logs build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
