# The Python client (clients/python) beyond the main conformance run:
# mypy --strict on its modules (all but the generated normserve/v1), and its
# torch-free tests (tests/conformance/client_compat) with the oldest and the
# newest grpcio/protobuf it supports, in two small environments that
# scripts/client-envs.sh provisions in ${XDG_CACHE_HOME:-~/.cache}/normserve.
# Both run before the main conformance tests (test-python).

CLIENT_ENVS := scripts/client-envs.sh
NORMSERVE_CACHE_DIR = $(or $(NORMSERVE_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/normserve)

.PHONY: python-client-typecheck python-client-compat

test-python: python-client-typecheck python-client-compat

python-client-typecheck: setup ## mypy --strict on the Python client
	cd clients/python && "$(PYTHON)" -m mypy --cache-dir "$(NORMSERVE_CACHE_DIR)/mypy" -p normserve

python-client-compat: ## the Python client's tests with the oldest and newest grpcio/protobuf it supports
	@for env in oldest newest; do \
	  python=$$($(CLIENT_ENVS) --python $$env); \
	  runtime=$$(grep -E '^(grpcio|protobuf)==' scripts/client-$$env-requirements.txt | paste -sd ' '); \
	  echo "python client, $$env supported runtime: $$runtime"; \
	  NORMSERVE_BIN="$${NORMSERVE_BIN:-$(CURDIR)/target/release/normserve}" NORMSERVE_EXPECT_RUNTIME="$$runtime" \
	    "$$python" -m pytest -q -p no:cacheprovider --confcutdir tests/conformance/client_compat \
	    tests/conformance/client_compat; \
	done
