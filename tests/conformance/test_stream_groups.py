"""ForwardStream at --durability sync (the default): the messages a stream
has already received are committed as groups, and nothing changes for the
client. Every output and the final running statistics equal
torch.nn.BatchNorm*d applied to the batches one by one, in order; a message's
own error answers only that message; every acknowledged message survives
kill -9; a request id is applied once, also within a group."""

import re
import threading
import urllib.request

import grpc
import normserve
import torch

from normserve.v1 import batch_norm_pb2 as bn, batch_norm_pb2_grpc

import wire
from conftest import ServerProcess, free_port
from sessions import assert_state_matches, create, get


def stream(stub, requests, **kwargs):
    """The replies of a ForwardStream whose requests are all sent at once
    (gRPC writes them as fast as flow control allows: pipelined)."""
    return list(stub.ForwardStream(iter(requests), timeout=120, **kwargs))


def train(session_id, x, **fields):
    return bn.ForwardRequest(session_id=session_id, input=wire.to_proto(x), mode=bn.MODE_TRAIN, **fields)


def batches(count, shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * 3 + 1 for _ in range(count)]


def store_puts(url):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(r'^normserve_store_operation_duration_seconds_count\{op="put"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_pipelined_train_stream_equals_batchnorm_applied_in_order():
    port = free_port()
    server = ServerProcess("--metrics-addr", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
            module = torch.nn.BatchNorm1d(64, momentum=0.2)
            sid = create(normserve.Client(channel), "1d", module, session_id="pipelined").session_id
            inputs = batches(256, (4, 64), seed=1)
            puts_before = store_puts(url)
            replies = stream(stub, [train(sid, x, request_id=f"p{i}") for i, x in enumerate(inputs)])
            puts = store_puts(url) - puts_before

            assert [r.index for r in replies] == list(range(len(inputs)))
            module.train()
            for i, (reply, x) in enumerate(zip(replies, inputs)):
                assert reply.WhichOneof("result") == "response", reply
                with torch.no_grad():
                    expected = module(x)
                torch.testing.assert_close(wire.from_proto(reply.response.output), expected)
                assert (reply.response.version, reply.response.num_batches_tracked) == (i + 2, i + 1)
            assert_state_matches(get(stub, sid), module, torch.float32)
            # The messages in flight shared commits (here 26 to 67 commits
            # for the 256 messages; how many depends on how fast the disk
            # syncs against how fast the client sends, so only "some" is
            # checked).
            assert 1 <= puts < len(inputs), puts
    finally:
        assert server.stop() == 0


def test_each_error_in_a_group_answers_only_its_own_message(client, bn_stub):
    a_module = torch.nn.BatchNorm1d(3)
    b_module = torch.nn.BatchNorm1d(5, momentum=None)
    a = create(client, "1d", a_module, session_id="group-a").session_id
    b = create(client, "1d", b_module, session_id="group-b").session_id
    xa = batches(4, (6, 3), seed=2)
    xb = batches(4, (4, 5), seed=3)
    requests = [
        train(a, xa[0], request_id="a0"),                         # 0 applied: A v2
        train(b, xb[0]),                                          # 1 applied: B v2
        train(a, torch.randn(4, 4)),                              # 2 wrong channels
        train("group-missing", xa[1]),                            # 3 no such session
        train(a, xa[1], expected_version=2),                      # 4 applied: A v3
        train(a, xa[2], expected_version=2),                      # 5 A is at v3 now
        bn.ForwardRequest(session_id=b, input=wire.to_proto(xb[1]), mode=bn.MODE_EVAL),  # 6
        train(a, xa[0], request_id="a0"),                         # 7 replay of 0
        train(b, torch.randn(1, 5)),                              # 8 one value per channel
        train(b, xb[2], step=bn.StepSpec(step=1, world_size=1, rank=0)),  # 9 a step of one rank: B v3
        train(b, xb[3]),                                          # 10 after the step: B v4
        train(a, xa[3]),                                          # 11 applied: A v4
    ]
    replies = stream(bn_stub, requests)
    assert [r.index for r in replies] == list(range(len(requests)))

    def output(i):
        assert replies[i].WhichOneof("result") == "response", replies[i]
        return replies[i].response

    def error_code(i):
        assert replies[i].WhichOneof("result") == "error", replies[i]
        return replies[i].error.code

    a_module.train()
    b_module.train()
    with torch.no_grad():
        torch.testing.assert_close(wire.from_proto(output(0).output), a_module(xa[0]))
        torch.testing.assert_close(wire.from_proto(output(1).output), b_module(xb[0]))
        assert error_code(2) == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert error_code(3) == grpc.StatusCode.NOT_FOUND.value[0]
        torch.testing.assert_close(wire.from_proto(output(4).output), a_module(xa[1]))
        assert output(4).version == 3
        assert error_code(5) == grpc.StatusCode.ABORTED.value[0]
        b_module.eval()
        torch.testing.assert_close(wire.from_proto(output(6).output), b_module(xb[1]))
        b_module.train()
        assert output(7).replayed and output(7).version == 2
        torch.testing.assert_close(wire.from_proto(output(7).output), wire.from_proto(output(0).output))
        assert error_code(8) == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "Expected more than 1 value per channel when training" in replies[8].error.message
        torch.testing.assert_close(wire.from_proto(output(9).output), b_module(xb[2]))
        torch.testing.assert_close(wire.from_proto(output(10).output), b_module(xb[3]))
        assert output(10).version == 4
        torch.testing.assert_close(wire.from_proto(output(11).output), a_module(xa[3]))
        assert output(11).version == 4
    assert_state_matches(get(bn_stub, a), a_module, torch.float32)
    assert_state_matches(get(bn_stub, b), b_module, torch.float32)


def test_every_acknowledged_stream_message_survives_kill_9():
    server = ServerProcess()
    address, data_dir = server.address, server.data_dir
    module = torch.nn.BatchNorm1d(64)
    channel = grpc.insecure_channel(address)
    stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
    sid = create(normserve.Client(channel), "1d", module, session_id="killed").session_id
    inputs = batches(256, (4, 64), seed=4)
    module.train()
    with torch.no_grad():
        expected = [module(x) for x in inputs]

    # All replies received, then kill -9: every one of them was durable.
    first = 64
    replies = stream(stub, [train(sid, x, request_id=f"k{i}") for i, x in enumerate(inputs[:first])])
    assert len(replies) == first and all(r.WhichOneof("result") == "response" for r in replies)
    server.kill9()
    channel.close()
    server = ServerProcess(data_dir=data_dir, listen=address)
    channel = grpc.insecure_channel(address)
    stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
    assert get(stub, sid).num_batches_tracked == first

    # Killed while the stream is in flight: whatever was acknowledged is
    # there. The client sends 150 messages and keeps the stream open; the
    # server is killed once 100 replies have arrived.
    sent, kill_at = 150, 100
    killed = threading.Event()

    def requests():
        for i, x in enumerate(inputs[first:first + sent]):
            yield train(sid, x, request_id=f"k{first + i}")
        killed.wait(timeout=120)

    acknowledged = []
    try:
        for reply in stub.ForwardStream(requests(), timeout=120):
            acknowledged.append(reply)
            if len(acknowledged) == kill_at:
                server.kill9()
                killed.set()
    except grpc.RpcError as error:
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), error
    finally:
        killed.set()
    assert kill_at <= len(acknowledged) <= sent, len(acknowledged)
    channel.close()
    server = ServerProcess(data_dir=data_dir, listen=address)
    try:
        channel = grpc.insecure_channel(address)
        stub = batch_norm_pb2_grpc.BatchNormServiceStub(channel)
        session = get(stub, sid)
        applied = session.num_batches_tracked
        # The stream applies in order and commits whole groups: the store
        # holds a prefix of the messages, at least every acknowledged one.
        assert first + len(acknowledged) <= applied <= first + sent, (applied, len(acknowledged))
        assert session.version == applied + 1
        for i, reply in enumerate(acknowledged):
            assert reply.index == i and reply.response.version == first + i + 2
            torch.testing.assert_close(wire.from_proto(reply.response.output), expected[first + i])
        oracle = torch.nn.BatchNorm1d(64)
        oracle.train()
        with torch.no_grad():
            for x in inputs[:applied]:
                oracle(x)
        assert_state_matches(session, oracle, torch.float32)
        # The last applied request id is known after the restart: replayed,
        # not applied again; the next one applies.
        last = stub.Forward(train(sid, inputs[applied - 1], request_id=f"k{applied - 1}"))
        assert last.replayed and last.version == applied + 1
        nxt = stub.Forward(train(sid, inputs[applied], request_id=f"k{applied}"))
        assert not nxt.replayed and nxt.version == applied + 2
        torch.testing.assert_close(wire.from_proto(nxt.output), expected[applied])
        channel.close()
    finally:
        assert server.stop() == 0


def test_an_exact_statistics_session_fed_by_a_pipelined_stream_keeps_exact_sums(client):
    # Grouped messages accumulate into the exact sums one after another, as
    # unary calls do: the statistics are those of every value, rounded once.
    from test_exact import assert_exact, new_exact, wide_batches

    session = new_exact(client, 4)
    inputs = wide_batches(seed=5, count=48, rows=8, channels=4)
    outputs = list(session.forward_stream(inputs, train=True))
    assert len(outputs) == len(inputs)
    info = session.info()
    assert (info.version, info.num_batches_tracked) == (1 + len(inputs), len(inputs))
    assert_exact(info, inputs, "float64")
