"""Fixtures of the client's torch-free tests, which run in small
environments with the oldest and the newest grpcio/protobuf the client
supports (scripts/client-envs.sh; `make test` runs them with
`--confcutdir` on this folder, so the torch-based conftest above is not
loaded) and in the main test environment as well.

NORMSERVE_EXPECT_RUNTIME ("grpcio==X protobuf==Y"), when set, is the
runtime the environment must have: it makes sure the tests ran where they
were meant to.
"""

import os
import subprocess
import sys
import tempfile
import threading

import pytest

CLIENT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "clients", "python"))
sys.path.insert(0, CLIENT_DIR)

import normserve  # noqa: E402

assert normserve.__file__.startswith(CLIENT_DIR), f"normserve imported from {normserve.__file__}, not {CLIENT_DIR}"


class Server:
    """A normserve process on an ephemeral loopback port (NORMSERVE_BIN)."""

    def __init__(self, *args):
        binary = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
        self.data_dir = tempfile.mkdtemp(prefix="normserve-compat-")
        self.proc = subprocess.Popen([binary, "--listen", "127.0.0.1:0", "--data-dir", self.data_dir, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The server prints one line once it is bound; no sleeps, no polling.
        line = self.proc.stdout.readline()
        if not line.startswith("normserve listening on "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.address = line.split()[3]
        for stream in (self.proc.stdout, self.proc.stderr):  # a full pipe would block the server
            threading.Thread(target=lambda s=stream: [None for _ in s], daemon=True).start()

    def stop(self):
        self.proc.terminate()
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def compat_server():
    server = Server("--compute-threads", "2")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="session")
def compat_client(compat_server):
    with normserve.connect(compat_server.address) as client:
        client.wait_ready(timeout=30)
        yield client
