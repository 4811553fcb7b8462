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

.PHONY: venv demo test test-extended test-oldest-lightning lint bench bench-adacomm bench-decentralized bench-redundancy bench-compression bench-overhead bench-codecs bench-cluster bench-diloco bench-ps bench-scaling bench-ft clean distclean

venv: $(STAMP)

# torch's CPU build first (no CUDA libraries to download); plain torch where no +cpu wheel is on offer.
$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" || $(VPY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(VPY) -m pip install -q -e ".[examples,dev,ft]"
	touch $@

# make test pip-installs torchft 0.2.0 (test-only, not in pyproject) into .venv/torchft-ref for test_torchft_parity.py.
TORCHFT_REF := $(VENV)/torchft-ref
$(TORCHFT_REF)/.installed: $(STAMP) tests/reference/install_torchft_ref.sh
	PY=$(VPY) TORCHFT_REF_DIR=$(TORCHFT_REF) bash tests/reference/install_torchft_ref.sh
	touch $@

demo: venv
	$(VPY) examples/demo.py

lint: venv
	$(VPY) -m ruff check $(LINT_PATHS)

test: venv $(TORCHFT_REF)/.installed
	$(VPY) -m ruff check $(LINT_PATHS)
	$(VPY) -m pytest -x -q --durations=50 -m "not fault_matrix and not extended" tests

# What make test leaves to CI, to stay near 15 minutes: the rest of the fault-injection matrix (every rank x
# crash/kill/hang x mid-period/in a round, every kind of damaged checkpoint under Lightning), the
# parameter-server worker deaths, and the longer variants of tests whose core case make test runs.
test-extended: venv
	$(VPY) -m pytest -x -q --durations=20 -m "fault_matrix or extended" tests

# The oldest Lightning pyproject.toml declares ("lightning>=X,<=Y"), installed without its dependencies into a
# folder of the venv (the venv's torch and the rest are reused) and put first on PYTHONPATH: the
# lightning_smoke tests, which exercise every private Lightning name the package patches
# (lightning_commsgd/internals.py), must pass on it as on the newest. Fails if that Lightning is not the one
# imported.
LIGHTNING_OLDEST := $(shell sed -n 's/^ *"lightning>=\([0-9][0-9.]*\),.*/\1/p' pyproject.toml)
OLDEST_LIGHTNING_DIR := $(abspath $(VENV))/lightning-oldest
test-oldest-lightning: venv
	@test -n "$(LIGHTNING_OLDEST)" || { echo "no lightning>=X,<=Y requirement in pyproject.toml" >&2; exit 1; }
	rm -rf $(OLDEST_LIGHTNING_DIR)
	$(VPY) -m pip install -q --no-deps --target $(OLDEST_LIGHTNING_DIR) "lightning==$(LIGHTNING_OLDEST)"
	@found=$$(PYTHONPATH=$(OLDEST_LIGHTNING_DIR) $(VPY) -c 'import lightning; print(lightning.__version__)'); \
	if [ "$$found" != "$(LIGHTNING_OLDEST)" ]; then \
		echo "test-oldest-lightning: expected lightning $(LIGHTNING_OLDEST), imported $$found" >&2; exit 1; \
	fi; echo "lightning_smoke tests on lightning $$found"
	PYTHONPATH=$(OLDEST_LIGHTNING_DIR) $(VPY) -m pytest -x -q --durations=10 -m lightning_smoke tests

bench: venv
	$(VPY) -m benchmarks.bench_local_sgd $(BENCH_ARGS)

bench-ps: venv
	$(VPY) -m benchmarks.bench_parameter_server $(BENCH_ARGS)

bench-adacomm: venv
	$(VPY) -m benchmarks.bench_adacomm $(BENCH_ARGS)

bench-decentralized: venv
	$(VPY) -m benchmarks.bench_decentralized $(BENCH_ARGS)

bench-redundancy: venv
	$(VPY) -m benchmarks.bench_redundancy $(BENCH_ARGS)

bench-compression: venv
	$(VPY) -m benchmarks.bench_compression $(BENCH_ARGS)

bench-overhead: venv
	$(VPY) -m benchmarks.bench_overhead $(BENCH_ARGS)

# Encode / decode GB/s of every compressor and payload format on one thread, bits per value against entropy.
bench-codecs: venv
	$(VPY) -m benchmarks.bench_codecs $(BENCH_ARGS)

# Needs root: network namespaces and tc rate limits emulate the nodes and their links.
bench-cluster: venv
	$(VPY) -m benchmarks.bench_cluster $(BENCH_ARGS)

# Needs root, as bench-cluster: goodput of replica groups (torchft) under failures against stop and resume.
bench-ft: venv
	$(VPY) -m benchmarks.bench_ft $(BENCH_ARGS)

# Needs root, as bench-cluster: DDP, local SGD, DiLoCo and Streaming DiLoCo on a small LM and the digits MLP.
bench-diloco: venv
	$(VPY) -m benchmarks.bench_diloco $(BENCH_ARGS)

# The scaling model's predicted curves (no root, seconds); BENCH_ARGS="--validate" checks it against emulated
# clusters of 2, 3 and 4 nodes (root, as bench-cluster; a few minutes).
bench-scaling: venv
	$(VPY) -m benchmarks.bench_scaling $(BENCH_ARGS)

# Caches and build leftovers; the virtualenv stays (see distclean).
clean:
	rm -rf .pytest_cache .ruff_cache lightning_logs build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
