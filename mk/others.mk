# The API as a contract, and clients in other languages. Included by the
# Makefile; `make test` runs proto-check (the Node.js client runs inside
# test-python: tests/conformance/test_node_client.py).

.PHONY: proto-check proto-baseline node-example

proto-check: ## buf lint + buf breaking (released image, merge base with main), and their self-test
	scripts/proto-check.sh
	scripts/proto-check-selftest.sh

proto-baseline: ## at a release: record proto/ as the released API (proto/baseline/normserve-v1.json)
	scripts/proto-check.sh --update-baseline

ADDR ?= 127.0.0.1:50051

node-example: ## run the Node.js example client (examples/node) against a running server at ADDR
	NODE_PATH="$$(scripts/ensure-node-packages.sh)" node examples/node/client.js --addr "$(ADDR)"
