"""Connections and descriptors: the server raises its soft limit on open
files to the hard one, and when descriptors run out anyway its accept loop
pauses (logged, counted) instead of spinning, and serves again once
connections close. Measured from outside: /proc, the metrics endpoint, and a
gRPC health check."""

import os
import resource
import socket
import subprocess
import time

import grpc
import urllib.request
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import drain, free_port


def start(limits, *args):
    """The server with RLIMIT_NOFILE set to `limits` (soft, hard) before exec."""
    binary = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
    proc = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--durability", "none", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limits),
    )
    line = proc.stdout.readline()
    assert line.startswith("normserve listening on "), (line, proc.stderr.read())
    log = []
    drain(proc.stderr, log)
    drain(proc.stdout, log)
    return proc, line.split()[3], log


def open_files_limit(pid):
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open files line")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def healthy(address, timeout=10):
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def stop(proc):
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def test_the_soft_open_file_limit_is_raised_to_the_hard_one():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= 256:
        hard = 4096
    proc, address, _ = start((256, hard))
    try:
        assert open_files_limit(proc.pid) == (hard, hard)
        assert healthy(address)
    finally:
        stop(proc)


def test_out_of_descriptors_the_accept_loop_pauses_and_serves_again():
    metrics_port = free_port()
    limit = 96
    proc, address, log = start((limit, limit), "--metrics-addr", f"127.0.0.1:{metrics_port}")
    host, port = address.rsplit(":", 1)
    idle = []
    try:
        assert healthy(address)
        in_use = len(os.listdir(f"/proc/{proc.pid}/fd"))
        # More idle connections than descriptors are left: the last ones stay
        # in the listen backlog, where accept fails with EMFILE.
        for _ in range(limit - in_use + 40):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        time.sleep(0.5)  # let the server run into the limit
        before = cpu_seconds(proc.pid)
        time.sleep(2.0)
        spent = cpu_seconds(proc.pid) - before
        # A spinning accept loop burns a core (about 2 s here); pausing, next to nothing.
        assert spent < 0.4, f"the server used {spent:.2f} s of CPU in 2 s while out of descriptors"
        assert any("pausing accept" in line for line in log), log[-5:]

        for sock in idle:
            sock.close()
        idle.clear()
        # Served again once descriptors are free (the pause is at most 1 s).
        deadline = time.monotonic() + 30
        while True:
            try:
                if healthy(address, timeout=5):
                    break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        pauses = [line for line in text.splitlines() if line.startswith("normserve_accept_pauses_total ")]
        assert pauses and float(pauses[0].split()[1]) >= 1, pauses
    finally:
        for sock in idle:
            sock.close()
        stop(proc)


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING = 0x4, 0x6


def frame(kind, flags=0, payload=b"", stream=0):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def read_frame(sock):
    """(type, flags, payload) of the next HTTP/2 frame; None at end of stream."""
    header = b""
    while len(header) < 9:
        chunk = sock.recv(9 - len(header))
        if not chunk:
            return None
        header += chunk
    length = int.from_bytes(header[:3], "big")
    payload = b""
    while len(payload) < length:
        chunk = sock.recv(length - len(payload))
        if not chunk:
            return None
        payload += chunk
    return header[3], header[4], payload


def h2_connect(address):
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(PREFACE + frame(SETTINGS))
    kind, flags, payload = read_frame(sock)
    assert kind == SETTINGS and flags == 0
    settings = {int.from_bytes(payload[i:i + 2], "big"): int.from_bytes(payload[i + 2:i + 6], "big")
                for i in range(0, len(payload), 6)}
    sock.sendall(frame(SETTINGS, flags=0x1))  # ACK the server's settings
    return sock, settings


def test_a_connection_may_hold_a_bounded_number_of_streams():
    proc, address, _ = start((1024, 1024), "--max-streams-per-connection", "7")
    try:
        sock, settings = h2_connect(address)
        assert settings.get(0x3) == 7  # SETTINGS_MAX_CONCURRENT_STREAMS
        sock.close()
    finally:
        stop(proc)


def test_an_idle_peer_is_pinged_and_disconnected_when_it_does_not_answer():
    proc, address, _ = start((1024, 1024), "--http2-keepalive-seconds", "1")
    try:
        sock, _ = h2_connect(address)
        sock.settimeout(10)
        started, pinged = time.monotonic(), False
        while (got := read_frame(sock)) is not None:
            kind, flags, _ = got
            pinged = pinged or (kind == PING and not flags & 0x1)
        # Never answering the ping: the server closed the connection.
        assert pinged and time.monotonic() - started < 8
        sock.close()
        assert healthy(address)
    finally:
        stop(proc)
