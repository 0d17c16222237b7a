# normserve — the two commands: `make run` and `make test`. Each installs what
# is missing (scripts/provision.sh: libtorch via the torch==2.11.0 wheel and the
# Python test dependencies, in ${XDG_CACHE_HOME:-~/.cache}/normserve), builds,
# then serves or tests. Set LIBTORCH to build against your own libtorch 2.11.0.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CARGO ?= cargo
PROVISION := scripts/provision.sh
# Resolved lazily, so `make help` installs nothing.
LIBTORCH_DIR = $(shell $(PROVISION) --libtorch)
PYTHON = $(shell $(PROVISION) --python)
LISTEN ?= 127.0.0.1:50051
DATA_DIR ?= data

.PHONY: help setup build run test test-rust test-python pystubs bench lint fmt clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

setup: ## install libtorch and the Python test environment (idempotent)
	@$(PROVISION)

build: setup ## release build of the server and of normserve-ctl (the operator commands and health probe, no libtorch)
	LIBTORCH="$(LIBTORCH_DIR)" $(CARGO) build --release --locked --workspace

run: build ## build and serve on 127.0.0.1:50051 (override LISTEN=, DATA_DIR=)
	./target/release/normserve --listen "$(LISTEN)" --data-dir "$(DATA_DIR)"

pystubs: setup ## regenerate the Python client's stubs (clients/python/normserve/v1) from proto/
	PYTHON="$(PYTHON)" clients/python/generate.sh

test: build ## run every test: proto lint/breaking, deployment files, Rust unit + integration, Python conformance (Node.js client included)
	$(MAKE) --no-print-directory proto-check deploy-check test-rust test-python

test-rust:
	LIBTORCH="$(LIBTORCH_DIR)" $(CARGO) test --release --locked --workspace

test-python:
	NORMSERVE_BIN="$(CURDIR)/target/release/normserve" \
		"$(PYTHON)" -m pytest -q tests/conformance

bench: build ## benchmarks: normserve-bench scenarios vs in-process libtorch (table + JSON), CPU kernels, durability
	@scripts/ensure-redis.sh >/dev/null
	./target/release/normserve-bench --json target/bench/normserve-bench.json
	LIBTORCH="$(LIBTORCH_DIR)" $(CARGO) bench --locked --bench forward --bench durability

lint: setup ## clippy with warnings as errors, and rustfmt check
	LIBTORCH="$(LIBTORCH_DIR)" $(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings
	$(CARGO) fmt --all --check

fmt: ## format the Rust code
	$(CARGO) fmt --all

clean: ## remove build outputs (the cached Python environment stays)
	$(CARGO) clean

include mk/deploy.mk
include mk/others.mk
include mk/soak.mk
include mk/chaos.mk
include mk/fuzz.mk
include mk/python-client.mk
include mk/beam.mk
include mk/bench-peer.mk
include mk/gpu.mk
