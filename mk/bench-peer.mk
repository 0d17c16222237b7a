# Side by side: normserve against a Python server of the same API (grpcio +
# PyTorch, sessions in a dict: what a user would write instead), both driven
# by normserve-bench with the same scenarios, rounds and device. Included by
# the Makefile. The peer is not part of this repository: BENCH_PEER_DIR names
# a directory holding its `server.py` (speaking proto/normserve/v1 through the
# stubs in clients/python) and `side_by_side.sh` (which starts each server,
# runs `normserve-bench --addr` against it and writes the ratio tables).

BENCH_PEER_DIR ?=
# Passed to side_by_side.sh, e.g. BENCH_PEER_FLAGS="--scenarios latency_1k,throughput_16m".
BENCH_PEER_FLAGS ?= --rounds 3 --round-seconds 1
BENCH_PEER_OUT ?= target/bench-peer/$(shell date -u +%Y%m%dT%H%M%SZ)

.PHONY: bench-peer

bench-peer: build ## normserve vs a Python peer server, same load generator (BENCH_PEER_DIR=dir with server.py and side_by_side.sh; tables under target/bench-peer/)
	@if [ -z "$(BENCH_PEER_DIR)" ] || [ ! -f "$(BENCH_PEER_DIR)/side_by_side.sh" ]; then \
		echo "bench-peer: set BENCH_PEER_DIR to a directory holding side_by_side.sh and server.py" >&2; exit 2; fi
	NORMSERVE_BIN_DIR="$(CURDIR)/target/release" PEER_PYTHON="$(PYTHON)" \
		NORMSERVE_STUBS="$(CURDIR)/clients/python" \
		bash "$(BENCH_PEER_DIR)/side_by_side.sh" $(BENCH_PEER_FLAGS) --out "$(BENCH_PEER_OUT)"
	@echo "tables: $(BENCH_PEER_OUT)/side_by_side*.md"
