"""Observability of the real binary: the Prometheus endpoint (--metrics-addr)
exposes every metric deploy/checks/metrics.txt lists, and each request is one
JSON log line (--log-format json) with its RPC, session id, status and
duration, and no tensor data."""

import json
import os
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import torch

from conftest import ServerProcess, free_port
from normserve.v1 import batch_norm_pb2 as bn, batch_norm_pb2_grpc, tensor_pb2

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def listed_metrics():
    metrics = {}
    with open(os.path.join(ROOT, "deploy", "checks", "metrics.txt")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, kind, *_ = line.split()
                metrics[name] = kind
    return metrics


@pytest.fixture(scope="module")
def observed():
    port = free_port()
    proc = ServerProcess("--metrics-addr", f"127.0.0.1:{port}", "--log-format", "json",
                         "--durability", "none", "--device", "cpu")
    with grpc.insecure_channel(proc.address) as channel:
        yield proc, f"http://127.0.0.1:{port}", batch_norm_pb2_grpc.BatchNormServiceStub(channel)
    assert proc.stop() == 0


def scrape(url):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def log_lines(proc, predicate, timeout=10.0):
    """The JSON log lines matching `predicate`, once there is one (the log is
    read by a background thread)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = []
        for line in list(proc.log):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        found = [line for line in lines if predicate(line)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_every_listed_metric_is_exposed(observed):
    proc, url, stub = observed
    stub.CreateSession(bn.CreateSessionRequest(kind=bn.BATCH_NORM_1D, num_features=3, session_id="scraped"))
    x = torch.randn(4, 3)
    stub.Forward(bn.ForwardRequest(session_id="scraped", mode=bn.MODE_TRAIN, input=tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=x.shape, raw=x.numpy().tobytes())))
    text = scrape(url)
    assert text.rstrip().endswith("# EOF")
    for name, kind in listed_metrics().items():
        if name == "normserve_cuda_memory_bytes":
            # Documented: the gauge has series only for CUDA devices the server
            # uses, and this one runs on the CPU (--device cpu), so no lines;
            # test_cuda_memory_is_exposed_for_a_device_in_use covers CUDA.
            assert "normserve_cuda_memory_bytes" not in text
            continue
        # OpenMetrics describes a counter without its `_total` suffix.
        family = name[: -len("_total")] if kind == "counter" else name
        assert f"# TYPE {family} {kind}\n" in text, name
        assert f"# HELP {family} " in text, name
        assert any(line.startswith(name) for line in text.splitlines() if not line.startswith("#")), name
    assert 'normserve_requests_total{rpc="Forward",code="OK"} 1' in text
    assert "normserve_sessions 1" in text


def test_other_paths_are_404(observed):
    _, url, _ = observed
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "/", timeout=10)
    assert refused.value.code == 404


def test_a_request_is_one_json_line_without_tensor_data(observed):
    proc, _, stub = observed
    stub.CreateSession(bn.CreateSessionRequest(kind=bn.BATCH_NORM_1D, num_features=2, session_id="logged"))
    values = np.array([[123456.75, -98765.25], [4242.125, 31337.5]], dtype="<f4")
    stub.Forward(bn.ForwardRequest(session_id="logged", mode=bn.MODE_TRAIN, input=tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=values.shape, float_values=tensor_pb2.FloatValues(
            values=values.ravel().tolist()))))
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetSession(bn.GetSessionRequest(session_id="nowhere"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    def finished(rpc, session_id):
        return lambda line: (line.get("fields", {}).get("message") == "request finished"
                             and line.get("span", {}).get("rpc") == rpc
                             and line.get("span", {}).get("session_id") == session_id)

    [forward] = log_lines(proc, finished("Forward", "logged"))
    assert forward["level"] == "INFO"
    assert forward["span"]["status"] == "OK"
    assert forward["fields"]["status"] == "OK"
    assert forward["span"]["duration_ms"] > 0
    assert "tenant" in forward["span"]
    [not_found] = log_lines(proc, finished("GetSession", "nowhere"))
    assert not_found["span"]["status"] == "NOT_FOUND"
    everything = "\n".join(proc.log)
    for value in ("123456", "98765", "4242.1", "31337"):
        assert value not in everything


def test_a_metrics_address_in_use_is_exit_code_2():
    import socket
    import subprocess
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        binary = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
        result = subprocess.run([binary, "--listen", "127.0.0.1:0", "--durability", "none",
                                 "--metrics-addr", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"--metrics-addr 127.0.0.1:{port}" in result.stderr


def test_an_expired_idle_session_is_one_log_line_and_the_binary_refuses_evict_without_a_store():
    """--session-ttl-seconds: the expiry is logged with the session, its tenant,
    how long it was idle and the action; a session in use is not expired. And
    `evict` with --durability none is a configuration error (exit 2)."""
    import subprocess
    port = free_port()
    proc = ServerProcess("--metrics-addr", f"127.0.0.1:{port}", "--log-format", "json",
                         "--durability", "none", "--device", "cpu",
                         "--session-ttl-seconds", "1", "--session-ttl-action", "delete")
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
            for name in ("forgotten", "kept"):
                stub.CreateSession(bn.CreateSessionRequest(
                    kind=bn.BATCH_NORM_1D, num_features=2, session_id=name))
            x = np.arange(8, dtype=np.float32).reshape(4, 2)
            request = bn.ForwardRequest(session_id="kept", mode=bn.MODE_TRAIN, input=tensor_pb2.Tensor(
                dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[4, 2], raw=x.tobytes()))
            deadline = time.monotonic() + 15
            expired = []
            while not expired and time.monotonic() < deadline:
                stub.Forward(request)
                time.sleep(0.1)
                expired = [line for line in log_lines(proc, lambda l: True, timeout=0)
                           if line.get("fields", {}).get("message") == "idle session expired"]
            [line] = expired
            fields = line["fields"]
            assert fields["session"] == "forgotten", line
            assert fields["action"] == "delete", line
            assert fields["idle_seconds"] >= 1.0, line
            assert line["level"] == "INFO", line
            with pytest.raises(grpc.RpcError) as gone:
                stub.GetSession(bn.GetSessionRequest(session_id="forgotten"))
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
            assert stub.GetSession(bn.GetSessionRequest(session_id="kept")).session.num_batches_tracked >= 1
        assert 'normserve_session_evictions_total{action="delete"} 1' in scrape(f"http://127.0.0.1:{port}")
    finally:
        assert proc.stop() == 0

    binary = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
    refused = subprocess.run([binary, "--listen", "127.0.0.1:0", "--durability", "none",
                              "--session-ttl-seconds", "60"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused
    assert "--session-ttl-action delete" in refused.stderr, refused.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_is_exposed_for_a_device_in_use():
    """normserve_cuda_memory_bytes{device="cuda:0"}: memory in use on the device
    (total - free, as nvidia-smi's used) once a session lives there; at least
    what the server's own tensors hold, at most the device's memory."""
    port = free_port()
    proc = ServerProcess("--metrics-addr", f"127.0.0.1:{port}", "--durability", "none",
                         "--device", "cuda")
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
            stub.CreateSession(bn.CreateSessionRequest(kind=bn.BATCH_NORM_1D, num_features=3,
                                                       session_id="on-gpu", device="cuda:0"))
            x = torch.randn(4096, 3)
            stub.Forward(bn.ForwardRequest(session_id="on-gpu", mode=bn.MODE_TRAIN, input=tensor_pb2.Tensor(
                dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=x.shape, raw=x.numpy().tobytes())))
            text = scrape(f"http://127.0.0.1:{port}")
        [line] = [l for l in text.splitlines() if l.startswith('normserve_cuda_memory_bytes{device="cuda:0"}')]
        used = float(line.split()[-1])
        total = torch.cuda.get_device_properties(0).total_memory
        assert 4096 * 3 * 4 <= used <= total, (used, total)
    finally:
        assert proc.stop() == 0
