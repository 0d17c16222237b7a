"""Observability of the real binary: the Prometheus endpoint (--metrics-addr)
exposes every metric deploy/checks/metrics.txt lists, the build's versions
(normserve_build_info, as GetServerInfo reports them) and the process metrics
(as /proc shows the process to this test); each request is one JSON log line
(--log-format json) with its RPC, session id, status and duration, and no
tensor data: at DEBUG, or at INFO when sampled (--access-log-sample) or slow
(--slow-request-ms), at ERROR for a server fault."""

import json
import os
import re
import resource
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import torch

from test_durability import flip_in_file
from conftest import ServerProcess, free_port
from normserve.v1 import (batch_norm_pb2 as bn, batch_norm_pb2_grpc, compare_pb2, compare_pb2_grpc,
                          server_pb2, server_pb2_grpc, tensor_pb2)

import wire

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
    """A server logging every request at INFO (--access-log-sample 1)."""
    port = free_port()
    proc = ServerProcess("--metrics-addr", f"127.0.0.1:{port}", "--log-format", "json",
                         "--durability", "none", "--device", "cpu", "--access-log-sample", "1")
    with grpc.insecure_channel(proc.address) as channel:
        yield proc, f"http://127.0.0.1:{port}", batch_norm_pb2_grpc.BatchNormServiceStub(channel)
    assert proc.stop() == 0


def scrape(url):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def log_lines(proc, predicate, timeout=10.0, at_least=1, raw=False):
    """The JSON log lines matching `predicate`, once there are `at_least` (the
    log is read by a background thread); with `raw`, (text, parsed) pairs."""
    deadline = time.monotonic() + timeout
    while True:
        lines = []
        for line in list(proc.log):
            try:
                lines.append((line, json.loads(line)))
            except ValueError:
                continue
        found = [(text, line) for text, line in lines if predicate(line)]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found if raw else [line for _, line in found]
        time.sleep(0.05)


def finished(rpc, session_id=None):
    """Matches the request line of `rpc` (and `session_id`, when given)."""
    return lambda line: (line.get("fields", {}).get("message") == "request finished"
                         and line.get("span", {}).get("rpc") == rpc
                         and (session_id is None or line.get("span", {}).get("session_id") == session_id))


def duration_decimals(text):
    """Decimals of the duration_ms numbers in a JSON log line, as written."""
    return [len(fraction) for fraction in re.findall(r'"duration_ms":-?\d+(?:\.(\d+))?', text)]


def timed(call, *args):
    """`call(*args)` and its duration in ms as this client saw it: an upper
    bound of the server's own measure."""
    started = time.monotonic()
    reply = call(*args)
    return reply, (time.monotonic() - started) * 1e3




def samples(text):
    """{series: value} of an exposition, series as exposed (name and labels)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            values[series] = float(value)
    return values


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

    [(forward_text, forward)] = log_lines(proc, finished("Forward", "logged"), raw=True)
    assert forward["level"] == "INFO"
    # Rounded to the microsecond: at most 3 decimals in both places.
    assert duration_decimals(forward_text) and max(duration_decimals(forward_text)) <= 3, forward_text
    assert forward["span"]["status"] == "OK"
    assert forward["fields"]["status"] == "OK"
    assert forward["span"]["duration_ms"] > 0
    assert "tenant" in forward["span"]
    [not_found] = log_lines(proc, finished("GetSession", "nowhere"))
    assert not_found["span"]["status"] == "NOT_FOUND"
    everything = "\n".join(proc.log)
    for value in ("123456", "98765", "4242.1", "31337"):
        assert value not in everything


def test_the_access_log_at_rate_1_is_one_line_per_request(observed):
    proc, _, stub = observed
    before = len(log_lines(proc, finished("ListSessions"), timeout=0))
    for _ in range(7):
        stub.ListSessions(bn.ListSessionsRequest())
    found = log_lines(proc, finished("ListSessions"), at_least=before + 7, raw=True)
    assert len(found) == before + 7, [line for _, line in found]
    for text, line in found[before:]:
        assert line["level"] == "INFO", line
        assert line["span"]["status"] == "OK", line
        assert max(duration_decimals(text)) <= 3, text


SLOW_MS = 200


def test_at_the_default_level_only_slow_requests_and_server_faults_are_logged():
    """No line for a quick request, whatever its status; one at INFO for a
    request over --slow-request-ms (a Compare of 2M elements: about a second
    here, against a threshold of 200 ms); one at ERROR for DATA_LOSS (a
    record corrupted on disk, read again after a restart)."""
    proc = ServerProcess("--log-format", "json", "--device", "cpu", "--slow-request-ms", str(SLOW_MS))
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    marker = torch.tensor([1234.5, -777.25, 31.125, 4096.75])
    try:
        with grpc.insecure_channel(proc.address, options=options) as channel:
            stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
            quick = {}
            _, quick["CreateSession"] = timed(stub.CreateSession, bn.CreateSessionRequest(
                kind=bn.BATCH_NORM_1D, num_features=4, session_id="victim"))
            _, quick["UpdateParameters"] = timed(stub.UpdateParameters, bn.UpdateParametersRequest(
                session_id="victim", running_mean=wire.to_proto(marker)))
            with pytest.raises(grpc.RpcError) as missing:
                stub.GetSession(bn.GetSessionRequest(session_id="nowhere"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            x = torch.randn(1 << 18, 8)
            _, heavy_ms = timed(compare_pb2_grpc.CompareServiceStub(channel).Compare,
                                compare_pb2.CompareRequest(input=wire.to_proto(x), training=True))
            assert heavy_ms > SLOW_MS, f"the heavy Compare took only {heavy_ms:.1f} ms"
            [compare] = log_lines(proc, finished("Compare"))
            assert compare["level"] == "INFO", compare
            assert compare["span"]["status"] == "OK", compare
            assert SLOW_MS <= compare["span"]["duration_ms"] <= heavy_ms, compare
            for rpc, client_ms in quick.items():
                if client_ms < SLOW_MS:
                    assert log_lines(proc, finished(rpc), timeout=0) == [], rpc
            assert log_lines(proc, finished("GetSession"), timeout=0) == []
    finally:
        assert proc.stop() == 0

    assert flip_in_file(os.path.join(proc.data_dir, "sessions.redb"), marker.numpy().tobytes()) >= 1
    proc = ServerProcess("--log-format", "json", "--device", "cpu", data_dir=proc.data_dir)
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
            with pytest.raises(grpc.RpcError) as lost:
                stub.GetSession(bn.GetSessionRequest(session_id="victim"))
            assert lost.value.code() == grpc.StatusCode.DATA_LOSS
        [line] = log_lines(proc, finished("GetSession", "victim"))
        assert line["level"] == "ERROR", line
        assert line["span"]["status"] == "DATA_LOSS", line
    finally:
        assert proc.stop() == 0


def test_at_debug_every_request_is_logged():
    proc = ServerProcess("--log-format", "json", "--durability", "none", "--device", "cpu",
                         "--log", "debug")
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
            stub.CreateSession(bn.CreateSessionRequest(kind=bn.BATCH_NORM_1D, num_features=2, session_id="seen"))
            for _ in range(3):
                stub.GetSession(bn.GetSessionRequest(session_id="seen"))
        [create] = log_lines(proc, finished("CreateSession", "seen"))
        gets = log_lines(proc, finished("GetSession", "seen"), at_least=3)
        assert len(gets) == 3, gets
        for line in [create, *gets]:
            assert line["level"] == "DEBUG", line
            assert line["span"]["status"] == "OK", line
    finally:
        assert proc.stop() == 0


def test_build_info_and_process_metrics_agree_with_the_server_and_proc():
    """normserve_build_info's labels are GetServerInfo's versions; the
    process_* metrics are what /proc and the kernel tell this test about the
    server's process."""
    port = free_port()
    launched = time.time()
    proc = ServerProcess("--metrics-addr", f"127.0.0.1:{port}", "--durability", "none", "--device", "cpu")
    listening = time.time()
    pid = proc.proc.pid
    try:
        with grpc.insecure_channel(proc.address) as channel:
            info = server_pb2_grpc.ServerServiceStub(channel).GetServerInfo(server_pb2.GetServerInfoRequest())

        def vm_rss():
            with open(f"/proc/{pid}/status") as f:
                [kib] = [line.split()[1] for line in f if line.startswith("VmRSS:")]
            return int(kib) * 1024

        rss_before, fds_before = vm_rss(), len(os.listdir(f"/proc/{pid}/fd"))
        text = scrape(f"http://127.0.0.1:{port}")
        rss_after, fds_after = vm_rss(), len(os.listdir(f"/proc/{pid}/fd"))
        values = samples(text)

        [build] = [series for series in values if series.startswith("normserve_build_info{")]
        labels = dict(re.findall(r'(\w+)="([^"]*)"', build))
        assert labels == {"version": info.server_version, "libtorch": info.libtorch_version}, build
        assert values[build] == 1

        rss = values["process_resident_memory_bytes"]
        assert 0.8 * min(rss_before, rss_after) <= rss <= 1.2 * max(rss_before, rss_after), (rss, rss_before, rss_after)
        assert values["process_virtual_memory_bytes"] >= rss
        # The scrape's own connection may hold a descriptor or two.
        assert min(fds_before, fds_after) - 2 <= values["process_open_fds"] <= max(fds_before, fds_after) + 2, \
            (values["process_open_fds"], fds_before, fds_after)
        soft, _ = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        assert values["process_max_fds"] == soft
        assert launched - 1 <= values["process_start_time_seconds"] <= listening + 1, \
            (values["process_start_time_seconds"], launched, listening)
        threads = len(os.listdir(f"/proc/{pid}/task"))
        assert abs(values["process_threads"] - threads) <= 4, (values["process_threads"], threads)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        assert 0 < values["process_cpu_seconds_total"] <= cpu + 0.5, (values["process_cpu_seconds_total"], cpu)
    finally:
        assert proc.stop() == 0


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
