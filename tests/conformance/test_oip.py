"""The Open Inference Protocol (KServe v2 / Triton) through Triton's own,
unmodified client (tritonclient, gRPC and HTTP), against the real binary:
sessions created with the normserve client are models; their inferences must
equal torch.nn.BatchNorm1d/2d step by step, update the running statistics as
the module does, fail as Forward fails, and stay inside the caller's tenant.
"""

import http.client
import json
import os
import queue
import socket
import tempfile
import time

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

import normserve
from conftest import ServerProcess, free_port

TRANSPORTS = ["grpc", "http"]


class Oip:
    """A server with its HTTP API on, and clients of all three kinds."""

    def __init__(self, *args):
        self.http_port = free_port()
        self.server = ServerProcess("--compute-threads", "2", "--durability", "none",
                                    "--http-addr", f"127.0.0.1:{self.http_port}", *args)
        self.http_address = f"127.0.0.1:{self.http_port}"

    def normserve(self, token=None):
        client = normserve.connect(self.server.address, token=token)
        client.wait_ready(timeout=30)  # the HTTP port is bound before gRPC answers
        return client

    def triton(self, transport):
        if transport == "grpc":
            return tgrpc.InferenceServerClient(self.server.address)
        return thttp.InferenceServerClient(self.http_address)


@pytest.fixture(scope="module")
def oip():
    server = Oip()
    yield server
    assert server.server.stop() == 0


@pytest.fixture(scope="module")
def client(oip):
    return oip.normserve()


def triton_input(transport, x, binary=True):
    """INPUT holding numpy array `x`, as tritonclient builds it."""
    from tritonclient.utils import np_to_triton_dtype
    module = tgrpc if transport == "grpc" else thttp
    tensor = module.InferInput("INPUT", list(x.shape), np_to_triton_dtype(x.dtype))
    if transport == "grpc":
        tensor.set_data_from_numpy(x)
    else:
        tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def infer(oip, transport, model, x, mode=None, binary=True, request_id=None, headers=None):
    """One inference; returns (OUTPUT as a torch tensor, the response's
    parameters as a dict)."""
    triton = oip.triton(transport)
    parameters = {}
    if mode is not None:
        parameters["mode"] = mode
    if request_id is not None:
        parameters["request_id"] = request_id
    kwargs = {"parameters": parameters} if parameters else {}
    if transport == "http":
        kwargs["outputs"] = [thttp.InferRequestedOutput("OUTPUT", binary_data=binary)]
    result = triton.infer(model, [triton_input(transport, x, binary)], headers=headers,
                          request_id="req-7", **kwargs)
    response = result.get_response()
    if transport == "grpc":
        assert response.id == "req-7"
        params = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()}
    else:
        assert response["id"] == "req-7"
        assert ("data" in response["outputs"][0]) == (not binary)
        params = response["parameters"]
    return torch.from_numpy(result.as_numpy("OUTPUT").copy()), params


def triton_error(call):
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_health_and_metadata_describe_sessions(oip, client, transport):
    triton = oip.triton(transport)
    s2 = client.create_session("2d", num_features=3)
    s1 = client.create_session("1d", num_features=5, dtype="float64")
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(s2.session_id)
    assert not triton.is_model_ready("no-such-session")
    assert triton.get_server_metadata(as_json=True)["name"] == "normserve" if transport == "grpc" \
        else triton.get_server_metadata()["name"] == "normserve"
    metadata = triton.get_model_metadata(s2.session_id, **({"as_json": True} if transport == "grpc" else {}))
    assert metadata["name"] == s2.session_id
    assert metadata["versions"] == ["1"]
    assert metadata["platform"] == "pytorch_batchnorm"
    for tensor, name in ((metadata["inputs"][0], "INPUT"), (metadata["outputs"][0], "OUTPUT")):
        assert tensor["name"] == name
        assert tensor["datatype"] == "FP32"
        assert [int(d) for d in tensor["shape"]] == [-1, 3, -1, -1]
    metadata = triton.get_model_metadata(s1.session_id, **({"as_json": True} if transport == "grpc" else {}))
    assert metadata["inputs"][0]["datatype"] == "FP64"
    assert [int(d) for d in metadata["inputs"][0]["shape"]] == [-1, 5]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_train_steps_equal_batchnorm_and_update_running_stats(oip, client, transport, kind):
    gen = torch.Generator().manual_seed(7)
    c = 4
    module = torch.nn.BatchNorm1d(c) if kind == "1d" else torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        module.bias.copy_(torch.randn(c, generator=gen))
    session = client.create_session_from_module(module)
    shape = (8, c) if kind == "1d" else (6, c, 3, 5)
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(shape, generator=gen) * (step + 1) + step
            # The first step names the mode, the others take the session's default (train).
            y, params = infer(oip, transport, session.session_id, x.numpy(),
                              mode="train" if step == 0 else None, binary=step != 1)
            torch.testing.assert_close(y, module.train()(x))
            assert params["num_batches_tracked"] == step + 1
            assert params["replayed"] is False
        info = session.info()
        torch.testing.assert_close(torch.from_numpy(np.array(info.running_mean)), module.running_mean)
        torch.testing.assert_close(torch.from_numpy(np.array(info.running_var)), module.running_var)
        assert info.num_batches_tracked == module.num_batches_tracked.item() == 3
        version = info.version
        x = torch.randn(shape, generator=gen)
        y, _ = infer(oip, transport, session.session_id, x.numpy(), mode="eval")
        torch.testing.assert_close(y, module.eval()(x))
        assert session.info().version == version  # eval changes nothing


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fp64_and_fp16_inputs(oip, client, transport):
    gen = torch.Generator().manual_seed(11)
    module64 = torch.nn.BatchNorm2d(3).double()
    s64 = client.create_session_from_module(module64)
    module32 = torch.nn.BatchNorm2d(3)
    s32 = client.create_session_from_module(module32)
    with torch.no_grad():
        for binary in ([True, False] if transport == "http" else [True]):
            x = torch.randn(4, 3, 2, 3, generator=gen, dtype=torch.float64)
            y, _ = infer(oip, transport, s64.session_id, x.numpy(), binary=binary)
            assert y.dtype == torch.float64
            torch.testing.assert_close(y, module64(x), rtol=0, atol=0)
            # A float32 layer takes float16 input and answers in float16, as PyTorch does.
            h = torch.randn(4, 3, 2, 3, generator=gen).half()
            y, _ = infer(oip, transport, s32.session_id, h.numpy(), binary=binary)
            assert y.dtype == torch.float16
            torch.testing.assert_close(y, module32(h))
        torch.testing.assert_close(torch.from_numpy(np.array(s32.info().running_mean)), module32.running_mean)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_model_is_not_found(oip, transport):
    x = np.zeros((2, 3), np.float32)
    error = triton_error(lambda: infer(oip, transport, "no-such-session", x))
    assert "session no-such-session not found" in error.message()
    assert error.status() == ("StatusCode.NOT_FOUND" if transport == "grpc" else "404")
    if transport == "http":
        error = triton_error(lambda: oip.triton(transport).get_model_metadata("no-such-session"))
        assert error.status() == "404"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("bad", ["channels", "dtype", "rank"])
def test_bad_input_fails_with_forwards_text_and_changes_nothing(oip, client, transport, bad):
    session = client.create_session("2d", num_features=3)
    x = {
        "channels": np.ones((4, 5, 2, 2), np.float32),
        "dtype": np.ones((4, 3, 2, 2), np.float64),
        "rank": np.ones((4, 3), np.float32),
    }[bad]
    with pytest.raises(normserve.InvalidArgument) as forward_error:
        session.forward(x)
    error = triton_error(lambda: infer(oip, transport, session.session_id, x))
    assert error.message() == forward_error.value.details
    assert error.status() == ("StatusCode.INVALID_ARGUMENT" if transport == "grpc" else "400")
    assert session.info().version == 1 and session.info().num_batches_tracked == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_request_id_parameter_makes_a_retry_a_replay(oip, client, transport):
    session = client.create_session("1d", num_features=2)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    first, params = infer(oip, transport, session.session_id, x, request_id="step-1")
    again, replay = infer(oip, transport, session.session_id, x, request_id="step-1")
    assert (params["replayed"], replay["replayed"]) == (False, True)
    torch.testing.assert_close(again, first)
    assert session.info().num_batches_tracked == 1


def test_http_json_and_binary_bodies_give_the_same_numbers(oip, client):
    gen = torch.Generator().manual_seed(3)
    module = torch.nn.BatchNorm2d(2)
    session = client.create_session_from_module(module)
    x = torch.randn(3, 2, 4, 4, generator=gen)
    json_out, _ = infer(oip, "http", session.session_id, x.numpy(), mode="eval", binary=False)
    binary_out, _ = infer(oip, "http", session.session_id, x.numpy(), mode="eval", binary=True)
    torch.testing.assert_close(json_out, binary_out, rtol=0, atol=0)
    torch.testing.assert_close(binary_out, module.eval()(x))


def test_stream_infer_answers_in_order_with_errors_in_band(oip, client):
    gen = torch.Generator().manual_seed(5)
    module = torch.nn.BatchNorm2d(3)
    session = client.create_session_from_module(module)
    triton = oip.triton("grpc")
    results = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        inputs = [torch.randn(4, 3, 2, 2, generator=gen) for _ in range(3)]
        for i, x in enumerate(inputs):
            triton.async_stream_infer(session.session_id, [triton_input("grpc", x.numpy())],
                                      request_id=f"s{i}", parameters={"mode": "train"})
            if i == 0:  # a bad request in the middle: answered in-band, the stream goes on
                triton.async_stream_infer(session.session_id,
                                          [triton_input("grpc", np.ones((4, 2, 2, 2), np.float32))],
                                          request_id="bad")
        replies = [results.get(timeout=30) for _ in range(4)]
    finally:
        triton.stop_stream()
    with pytest.raises(normserve.InvalidArgument) as forward_error:
        session.forward(np.ones((4, 2, 2, 2), np.float32))
    assert replies[1][0] is None
    assert replies[1][1].message() == forward_error.value.details
    good = [r for r, e in replies if e is None]
    assert [r.get_response().id for r in good] == ["s0", "s1", "s2"]
    with torch.no_grad():
        for result, x in zip(good, inputs):
            torch.testing.assert_close(torch.from_numpy(result.as_numpy("OUTPUT").copy()), module(x))
    torch.testing.assert_close(torch.from_numpy(np.array(session.info().running_var)), module.running_var)


# ---- tenants, tokens and limits --------------------------------------------

ALICE, BOB = "alice-oip-token", "bob-oip-token"


@pytest.fixture(scope="module")
def tenants():
    tokens = os.path.join(tempfile.mkdtemp(prefix="normserve-oip-"), "tokens")
    with open(tokens, "w") as f:
        f.write(f"{ALICE} acme user\n{BOB} globex user\n")
    server = Oip("--auth-tokens", tokens, "--max-message-bytes", str(1 << 20))
    yield server
    assert server.server.stop() == 0


def bearer(token):
    return {"authorization": f"Bearer {token}"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_tenant_cannot_reach_another_tenants_session(tenants, transport):
    alice = tenants.normserve(ALICE)
    session = alice.create_session("1d", num_features=2, session_id=f"private-{transport}")
    triton = tenants.triton(transport)
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    assert triton.is_model_ready(session.session_id, headers=bearer(ALICE))
    assert not triton.is_model_ready(session.session_id, headers=bearer(BOB))
    error = triton_error(lambda: infer(tenants, transport, session.session_id, x, headers=bearer(BOB)))
    assert error.status() == ("StatusCode.NOT_FOUND" if transport == "grpc" else "404")
    infer(tenants, transport, session.session_id, x, headers=bearer(ALICE))
    assert session.info().num_batches_tracked == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tokens_are_required_except_for_http_health(tenants, transport):
    triton = tenants.triton(transport)
    error = triton_error(lambda: triton.get_model_metadata("anything"))
    assert error.status() == ("StatusCode.UNAUTHENTICATED" if transport == "grpc" else "401")
    error = triton_error(lambda: triton.get_model_metadata("anything", headers=bearer("wrong")))
    assert error.status() == ("StatusCode.UNAUTHENTICATED" if transport == "grpc" else "401")
    if transport == "http":
        assert triton.is_server_live() and triton.is_server_ready()


def raw_http(server, method, path, body=b"", headers=()):
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=dict(headers))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def raw_exchange(server, head, body_chunks=()):
    """Sends a request head and body chunks on a plain socket (a send the
    server cut short is not an error) and returns the response's status and
    body."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        try:
            sock.sendall(head)
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


def test_http_bodies_over_the_message_limit_are_refused(tenants):
    head = (f"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
            f"Content-Length: {2 << 20}\r\n\r\n").encode()
    # Refused on the declared length, before the body is read.
    status, body = raw_exchange(tenants, head)
    assert status == 413
    assert "max_message_bytes" in json.loads(body)["error"]
    # A chunked body with no declared length is cut off at the limit.
    head = (f"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    status, body = raw_exchange(tenants, head, [chunk] * 32)
    assert status == 413


def test_http_heads_over_the_limit_are_refused(tenants):
    head = (f"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Padding: {'p' * (128 << 10)}\r\n\r\n").encode()
    status, _ = raw_exchange(tenants, head)
    assert status == 431


def test_http_malformed_requests_are_400_not_crashes(tenants):
    alice = tenants.normserve(ALICE)
    session = alice.create_session("1d", num_features=2, session_id="malformed")
    path = f"/v2/models/{session.session_id}/infer"
    auth = list(bearer(ALICE).items())
    for body, headers in [
        (b"{not json", []),
        (b"[]", []),
        (json.dumps({"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [2, 2],
                                 "parameters": {"binary_data_size": 64}}]}).encode(), []),
        (b'{"inputs": []}', [("Inference-Header-Content-Length", "999")]),
        (json.dumps({"inputs": [{"name": "INPUT", "datatype": "INT8", "shape": [2, 2],
                                 "data": [1, 2, 3, 4]}]}).encode(), []),
        (json.dumps({"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [2, 2],
                                 "data": [1, 2, 3]}]}).encode(), []),
    ]:
        status, reply = raw_http(tenants, "POST", path, body=body, headers=auth + headers)
        assert status == 400, (body, reply)
        assert json.loads(reply)["error"]
    assert raw_http(tenants, "GET", path, headers=auth)[0] == 405
    assert raw_http(tenants, "GET", "/metrics")[0] == 404
    assert session.info().version == 1


def test_http_json_data_may_be_nested(tenants):
    alice = tenants.normserve(ALICE)
    session = alice.create_session("1d", num_features=2, session_id="nested", training=False)
    module = torch.nn.BatchNorm1d(2).eval()
    x = [[1.5, -2.0], [0.25, 4.0], [3.0, 1.0]]
    replies = []
    for data in (x, [v for row in x for v in row]):
        body = json.dumps({"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [3, 2], "data": data}]})
        status, reply = raw_http(tenants, "POST", f"/v2/models/{session.session_id}/infer", body=body.encode(),
                                 headers=bearer(ALICE).items())
        assert status == 200, reply
        replies.append(json.loads(reply)["outputs"][0]["data"])
    assert replies[0] == replies[1]
    with torch.no_grad():
        expected = module(torch.tensor(x)).flatten()
    torch.testing.assert_close(torch.tensor(replies[0]), expected, rtol=0, atol=0)


def test_http_idle_connections_are_closed_after_the_request_timeout():
    server = Oip("--http-request-timeout-seconds", "1")
    try:
        server.normserve().wait_ready(timeout=30)
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
            sock.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n")  # the head never ends
            started = time.monotonic()
            assert sock.recv(1024) is not None  # closed (b"") or answered, not left hanging
            assert time.monotonic() - started < 5
    finally:
        assert server.server.stop() == 0


def test_http_json_output_over_the_message_limit_is_refused_before_applying(tenants):
    alice = tenants.normserve(ALICE)
    session = alice.create_session("1d", num_features=2, session_id="json-limit")
    n = 40_000  # 80 000 values: a 160 kB request, up to 1.28 MB of JSON output (limit 1 MiB)
    body = json.dumps({"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [n, 2],
                                   "data": [0] * (2 * n)}]}).encode()
    status, reply = raw_http(tenants, "POST", f"/v2/models/{session.session_id}/infer", body=body,
                             headers=bearer(ALICE).items())
    assert status == 400
    assert "binary_data" in json.loads(reply)["error"]
    assert session.info().num_batches_tracked == 0
    # The same request asking for binary output is answered.
    request = json.loads(body)
    request["outputs"] = [{"name": "OUTPUT", "parameters": {"binary_data": True}}]
    status, reply = raw_http(tenants, "POST", f"/v2/models/{session.session_id}/infer",
                             body=json.dumps(request).encode(), headers=bearer(ALICE).items())
    assert status == 200
    assert session.info().num_batches_tracked == 1


def test_a_revoked_token_ends_its_open_model_stream_before_the_next_request():
    import signal
    tokens = os.path.join(tempfile.mkdtemp(prefix="normserve-oip-"), "tokens")
    with open(tokens, "w") as f:
        f.write(f"{ALICE} acme user\n")
    oip = Oip("--auth-tokens", tokens)
    try:
        module = torch.nn.BatchNorm1d(2)
        session = oip.normserve(ALICE).create_session_from_module(module)
        triton = oip.triton("grpc")
        results = queue.Queue()
        triton.start_stream(callback=lambda result, error: results.put((result, error)), headers=bearer(ALICE))
        x = np.arange(8, dtype=np.float32).reshape(4, 2)
        triton.async_stream_infer(session.session_id, [triton_input("grpc", x)], parameters={"mode": "train"})
        result, error = results.get(timeout=30)
        assert error is None
        # Revoke Alice while the stream is open; the next request ends it.
        with open(tokens, "w") as f:
            f.write(f"{BOB} globex user\n")
        seen = sum("tokens file reloaded" in line for line in list(oip.server.log))
        oip.server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while sum("tokens file reloaded" in line for line in list(oip.server.log)) <= seen:
            assert time.monotonic() < deadline, "no reload"
            time.sleep(0.02)
        triton.async_stream_infer(session.session_id, [triton_input("grpc", x)], parameters={"mode": "train"})
        result, error = results.get(timeout=30)
        assert result is None and "revoked" in error.message()
        triton.stop_stream()
        # Only the request before the revocation was applied.
        with open(tokens, "w") as f:
            f.write(f"{ALICE} acme user\n")
        oip.server.proc.send_signal(signal.SIGHUP)
        client = oip.normserve(ALICE)
        deadline = time.monotonic() + 30
        while True:
            try:
                info = client.get_session(session.session_id).info()
                break
            except normserve.Unauthenticated:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert (info.version, info.num_batches_tracked) == (2, 1)
    finally:
        assert oip.server.stop() == 0


def test_http_bodies_are_charged_to_the_memory_budget():
    """The HTTP port's request bodies count in --memory-budget as gRPC
    messages do: a declared length that does not fit is refused before the
    body is read, a chunked body as soon as it outgrows the budget; both
    429 naming the budget, and a small call is served afterwards."""
    server = Oip("--memory-budget", "8MiB", "--max-message-bytes", str(32 << 20))
    try:
        client = server.normserve()
        session = client.create_session("1d", num_features=4, session_id="budgeted")
        path = f"/v2/models/{session.session_id}/infer"
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {16 << 20}\r\n\r\n").encode()
        status, body = raw_exchange(server, head)
        assert status == 429, body
        assert "--memory-budget" in json.loads(body)["error"]
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
        chunk = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"
        status, body = raw_exchange(server, head, [chunk] * 16)
        assert status == 429, body
        assert "--memory-budget" in json.loads(body)["error"]
        # Nothing stays charged: a small inference is served, as PyTorch computes it.
        x = torch.randn(8, 4)
        request = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [8, 4],
                               "data": x.flatten().tolist()}]}
        status, body = raw_http(server, "POST", path, json.dumps(request).encode(),
                                [("Content-Type", "application/json")])
        assert status == 200, body
        output = json.loads(body)["outputs"][0]
        expected = torch.nn.BatchNorm1d(4)(x).detach()
        got = torch.tensor(output["data"], dtype=torch.float32).reshape(8, 4)
        torch.testing.assert_close(got, expected)
    finally:
        assert server.server.stop() == 0
