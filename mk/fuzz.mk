# Property-based fuzzing (proptest, tests/fuzz/): the same suite `make test`
# runs with proptest's default 256 cases per target, here for a time.
# Included by the Makefile.

# Seconds of fuzzing in all: the targets run side by side until then (each
# at least one batch of 256 cases), then print how many cases they ran.
FUZZ_SECONDS ?= 60

.PHONY: fuzz

fuzz: setup ## fuzz tensor decoding, request validation, protobuf and .npy parsing for FUZZ_SECONDS (60)
	NORMSERVE_FUZZ_SECONDS="$(FUZZ_SECONDS)" LIBTORCH="$(LIBTORCH_DIR)" \
		$(CARGO) test --release --locked --test fuzz -- --nocapture --test-threads 64 2>&1 \
		| grep -v -e '^running [0-9]* tests' -e 'has been running for over' -e '^$$'
