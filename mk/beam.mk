# normserve.beam (clients/python/normserve/beam.py) on Apache Beam's
# DirectRunner in multi-processing mode against the server just built, in
# the environment scripts/beam-env.sh provisions in
# ${XDG_CACHE_HOME:-~/.cache}/normserve (apache-beam, the client's runtimes,
# no torch). Runs before the main conformance tests (test-python).

BEAM_ENV := scripts/beam-env.sh

.PHONY: test-beam beam-example

test-python: test-beam

test-beam: ## normserve.beam's pipelines (DirectRunner, several worker processes) against a real server
	python=$$($(BEAM_ENV) --python); \
	NORMSERVE_BIN="$${NORMSERVE_BIN:-$(CURDIR)/target/release/normserve}" \
	  "$$python" -m pytest -q -p no:cacheprovider tests/beam
