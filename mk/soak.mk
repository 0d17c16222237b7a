# The soak test (tests/soak/soak.py): a fresh server under mixed load from
# many clients, with failures and cancellations, then status codes, RSS growth
# and session consistency (against PyTorch, and across a restart) are checked.
# Included by the Makefile; `make test` runs a short version
# (tests/conformance/test_soak.py).

SOAK_SECONDS ?= 60
# More flags for tests/soak/soak.py, e.g. SOAK_FLAGS="--processes 4 --threads 12".
SOAK_FLAGS ?=

.PHONY: soak

soak: build ## soak test: SOAK_SECONDS (60) of mixed load, then codes, RSS, consistency (target/soak/soak.json)
	NORMSERVE_BIN="$(CURDIR)/target/release/normserve" \
		"$(PYTHON)" tests/soak/soak.py --duration "$(SOAK_SECONDS)" $(SOAK_FLAGS)
