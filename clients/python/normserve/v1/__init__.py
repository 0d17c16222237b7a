"""Stubs generated from proto/normserve/v1 (the contract). Do not edit them:
clients/python/generate.sh rewrites them, and a conformance test fails when
they differ from what the proto files generate."""
