# The chaos test (tests/chaos/chaos.py): rounds of kill -9 under load, damage
# to the store (flipped bits, a flipped record, truncation, deletion) and
# restarts, each checked against a PyTorch replay of the acknowledged steps:
# nothing acknowledged lost, nothing applied twice, nothing rolled back
# silently. Included by the Makefile; `make test` runs a short version
# (tests/conformance/test_chaos.py).

# At most CHAOS_ROUNDS rounds, stopping after CHAOS_SECONDS.
CHAOS_ROUNDS ?= 30
CHAOS_SECONDS ?= 600
# More flags for tests/chaos/chaos.py, e.g. CHAOS_FLAGS="--clients 4 --seed 7".
CHAOS_FLAGS ?=

.PHONY: chaos

chaos: build ## chaos test: CHAOS_ROUNDS (30) of kill -9 under load, store damage and restarts, within CHAOS_SECONDS (600) (target/chaos/chaos.json)
	@mkdir -p target/chaos
	NORMSERVE_BIN="$(CURDIR)/target/release/normserve" \
		"$(PYTHON)" tests/chaos/chaos.py --rounds "$(CHAOS_ROUNDS)" --seconds "$(CHAOS_SECONDS)" \
		--json target/chaos/chaos.json $(CHAOS_FLAGS)
