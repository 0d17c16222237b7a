"""Fixtures for the Python conformance tests.

The tests talk to a real normserve binary (NORMSERVE_BIN, built by `make
test`) through the Python client in clients/python (its generated stubs,
`normserve.v1`, and its idiomatic layer, `normserve`), and use PyTorch from
the provisioned environment as the oracle.
"""

import os
import socket
import subprocess
import sys
import tempfile
import threading

import grpc
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# The client package from this checkout, ahead of any installed copy (and of
# stubs generated elsewhere, e.g. target/pygen on PYTHONPATH).
CLIENT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "clients", "python"))
sys.path.insert(0, CLIENT_DIR)

# The server runs libtorch with one intra-op thread; so does the oracle, so that
# both reduce in the same order and low-precision results agree to the last bit.
torch.set_num_threads(1)

import normserve  # noqa: E402
from normserve.v1 import (  # noqa: E402
    batch_norm_pb2_grpc,
    compare_pb2_grpc,
    server_pb2_grpc,
)

assert normserve.__file__.startswith(CLIENT_DIR), f"normserve imported from {normserve.__file__}, not {CLIENT_DIR}"


def drain(stream, sink, keep=200):
    """Reads a child's output in the background so a full pipe never blocks it;
    keeps the last lines for failure messages."""
    def run():
        for line in stream:
            sink.append(line)
            del sink[:-keep]
    threading.Thread(target=run, daemon=True).start()


class ServerProcess:
    """A normserve process on an ephemeral loopback port."""

    def __init__(self, *args, data_dir=None, listen="127.0.0.1:0"):
        binary = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
        # Each server gets its own data directory unless the test shares one.
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="normserve-test-")
        self.proc = subprocess.Popen(
            [binary, "--listen", listen, "--data-dir", self.data_dir, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # The server prints one line once it is bound; no sleeps, no polling.
        line = self.proc.stdout.readline()
        if not line.startswith("normserve listening on "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.address = line.split()[3]
        self.log = []
        drain(self.proc.stderr, self.log)
        drain(self.proc.stdout, self.log)

    def kill9(self):
        """SIGKILL: no drain, no flush; what was acknowledged must survive."""
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout=30):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server():
    proc = ServerProcess("--compute-threads", "2")
    yield proc
    code = proc.stop()
    assert code == 0, f"server exited with {code}"


@pytest.fixture(scope="session")
def channel(server):
    options = [
        ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ]
    with grpc.insecure_channel(server.address, options=options) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="session")
def client(channel):
    """The Python client on the shared channel."""
    return normserve.Client(channel)


@pytest.fixture(scope="session")
def bn_stub(channel):
    return batch_norm_pb2_grpc.BatchNormServiceStub(channel)


@pytest.fixture(scope="session")
def server_stub(channel):
    return server_pb2_grpc.ServerServiceStub(channel)


@pytest.fixture(scope="session")
def compare_stub(channel):
    return compare_pb2_grpc.CompareServiceStub(channel)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisProcess:
    """A private redis-server on a free loopback port, with the durability
    normserve documents for production (AOF, fsync always)."""

    def __init__(self):
        here = os.path.dirname(os.path.abspath(__file__))
        ensure = os.path.join(here, "..", "..", "scripts", "ensure-redis.sh")
        binary = subprocess.run([ensure], check=True, capture_output=True, text=True).stdout.strip()
        self.dir = tempfile.mkdtemp(prefix="normserve-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # redis-server logs this line once it accepts connections.
        for line in self.proc.stdout:
            if "Ready to accept connections" in line:
                break
        else:
            raise RuntimeError("redis-server did not start")
        drain(self.proc.stdout, [])
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def redis_server():
    proc = RedisProcess()
    yield proc
    proc.stop()
