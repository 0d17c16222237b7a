#!/usr/bin/env bash
# Regenerates the gRPC stubs this package ships (normserve/v1/*_pb2*.py and
# their .pyi type stubs) from the contract in proto/, with grpcio-tools from
# the project's Python environment. The stubs are checked in so that
# `pip install clients/python` needs neither protoc nor the network; a
# conformance test (test_client.py) regenerates them into a temporary folder
# and fails when the checked-in files differ.
#
#   clients/python/generate.sh          rewrite the stubs in the package
#   clients/python/generate.sh DIR      write them to DIR/normserve/v1 instead
#
# The generated code is then post-processed (postprocess_stubs.py) so that
# it runs on every protobuf and grpcio the package supports, not only on
# versions as new as the generator.
#
# PYTHON selects the interpreter (default: scripts/provision.sh --python).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$here}
python=${PYTHON:-$("$repo/scripts/provision.sh" --python)}

mkdir -p "$out/normserve/v1"
# Remove stubs of protos that no longer exist; __init__.py is not generated.
rm -f "$out"/normserve/v1/*_pb2.py "$out"/normserve/v1/*_pb2.pyi "$out"/normserve/v1/*_pb2_grpc.py
cd "$repo"
# `-Iproto` makes the modules normserve/v1/<name>_pb2.py with imports
# `from normserve.v1 import tensor_pb2`: exactly this package's layout.
# `python -m grpc_tools.protoc` adds grpcio-tools' copy of the well-known
# types (google/protobuf/timestamp.proto) to the include path.
"$python" -m grpc_tools.protoc -Iproto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/normserve/v1/*.proto
# Drop the generators' runtime version guards, which would refuse the older
# protobuf and grpcio runtimes the package supports (see the script).
"$python" "$here/postprocess_stubs.py" "$out/normserve/v1"
