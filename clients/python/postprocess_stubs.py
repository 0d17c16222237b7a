"""Lets the generated stubs run on every runtime the package supports
(protobuf >= 5.26, < 8; grpcio >= 1.62); generate.sh runs it on what protoc
wrote.

protoc stamps each *_pb2.py with a guard that refuses a protobuf runtime
older than protoc itself (`ValidateProtobufRuntimeVersion`, a module that
protobuf 5.26 does not even have), and grpcio-tools stamps each
*_pb2_grpc.py with a check that refuses grpcio older than grpcio-tools.
Both are removed. The generated service code also uses "registered
methods", an optimization of grpcio >= 1.63 (`_registered_method=True`,
`server.add_registered_method_handlers`) that grpcio 1.62 rejects; without
it the stubs and servicers work the same on every grpcio, through the
generic handlers registered beside it. The rest of the code uses only APIs
that protobuf 5.26 and grpcio 1.62 already have; the conformance tests
import and run these stubs at both ends of the range
(tests/conformance/client_compat). The supported ranges are the package's
dependencies (pyproject.toml), which pip enforces.

    python postprocess_stubs.py DIR     rewrites DIR/*_pb2.py and DIR/*_pb2_grpc.py
"""

import pathlib
import re
import sys

PB2_IMPORT = re.compile(r"^from google\.protobuf import runtime_version as _runtime_version\n", re.M)
PB2_GUARD = re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:    .*\n)+?\)\n", re.M)
PB2_NOTE = ("# (normserve: protoc's runtime version guard removed by postprocess_stubs.py;\n"
            "# this code runs on protobuf >= 5.26, < 8, the package's dependency.)\n")
GRPC_CHECK = re.compile(
    r"^GRPC_GENERATED_VERSION = .*\n(?:.*\n)*?if _version_not_supported:\n(?:    .*\n)+?    \)\n", re.M)
REGISTERED_ARGUMENT = re.compile(r",\n +_registered_method=True\)")
REGISTERED_HANDLERS = re.compile(r"^    server\.add_registered_method_handlers\(.*\)\n", re.M)
GRPC_NOTE = ("# (normserve: grpcio-tools' version check removed by postprocess_stubs.py;\n"
             "# this code runs on grpcio >= 1.62, the package's dependency.)\n")


def substitute(pattern, replacement, text, path, expected=1):
    """`text` with the matches of `pattern` replaced; an error naming `path`
    when there are not `expected` of them (the generator's output changed)."""
    result, count = pattern.subn(replacement, text)
    if count != expected:
        raise SystemExit(f"postprocess_stubs: {path}: expected {expected} matches of {pattern.pattern!r}, found "
                         f"{count}; the generator's output changed: update postprocess_stubs.py")
    return result


def main(directory):
    for path in sorted(pathlib.Path(directory).glob("*_pb2.py")):
        text = substitute(PB2_IMPORT, "", path.read_text(), path)
        path.write_text(substitute(PB2_GUARD, PB2_NOTE, text, path))
    for path in sorted(pathlib.Path(directory).glob("*_pb2_grpc.py")):
        # Files of protos without services carry the check too.
        text = substitute(GRPC_CHECK, GRPC_NOTE, path.read_text(), path)
        # Each method: its stub, and its static call in the experimental API.
        methods = len(re.findall(r"^ {16}'/normserve\.v1\.", text, re.M))
        text = substitute(REGISTERED_ARGUMENT, ")", text, path, expected=methods * 2)
        services = text.count("    generic_handler = grpc.method_handlers_generic_handler(")
        path.write_text(substitute(REGISTERED_HANDLERS, "", text, path, expected=services))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
