# The GPU check, for building on one host and testing on another with a GPU
# (docs/operations.md, "Checking a GPU host"): `make gpu-bundle` puts the
# stripped release binaries, the Python client and the conformance tests into
# target/gpu-bundle; its gpu-check.sh runs there.

.PHONY: gpu-bundle gpu-check

gpu-bundle: build ## target/gpu-bundle: stripped binaries, Python client, conformance tests and gpu-check.sh, for a GPU host
	scripts/gpu-bundle.sh target/gpu-bundle

gpu-check: gpu-bundle ## run the bundle's gpu-check.sh here (without CUDA its GPU parts report no CUDA)
	PYTHON="$(PYTHON)" target/gpu-bundle/gpu-check.sh target/gpu-bundle/results
