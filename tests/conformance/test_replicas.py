"""Several normserve replicas share sessions through Redis: interleaved
concurrent train forwards through two replicas end in the state PyTorch
reaches replaying the accepted batches in version order, with nothing lost
or applied twice; a replica started later serves sessions it never saw."""

import threading

import grpc
import normserve
import pytest
import torch

from normserve.v1 import batch_norm_pb2 as bn, batch_norm_pb2_grpc

import wire
from conftest import ServerProcess
from sessions import assert_state_matches, create, get


def stub_for(address):
    channel = grpc.insecure_channel(address)
    return channel, batch_norm_pb2_grpc.BatchNormServiceStub(channel)


def test_two_replicas_share_sessions_without_lost_or_double_updates(redis_server):
    replicas = [ServerProcess("--store", redis_server.url) for _ in range(2)]
    channels = [stub_for(r.address) for r in replicas]
    stubs = [s for _, s in channels]
    specs = [("1d", torch.nn.BatchNorm1d(4), (6, 4)), ("2d", torch.nn.BatchNorm2d(2, momentum=None), (3, 2, 2, 2))]
    sessions = []
    for index, (kind, module, shape) in enumerate(specs):
        sid = create(normserve.Client(channels[0][0]), kind, module, session_id=f"shared-{index}").session_id
        sessions.append((sid, kind, module, shape))

    accepted = {index: [] for index in range(len(sessions))}
    lock = threading.Lock()
    failures = []

    def client(c):
        ch, stub = stub_for(replicas[c % 2].address)  # clients alternate replicas
        try:
            for i in range(25):
                s = (c + i) % len(sessions)
                x = torch.randn(sessions[s][3], generator=torch.Generator().manual_seed(c * 100 + i)) + c
                reply = stub.Forward(bn.ForwardRequest(
                    session_id=sessions[s][0], input=wire.to_proto(x), mode=bn.MODE_TRAIN,
                    request_id=f"c{c}-{i}"), timeout=60)
                with lock:
                    accepted[s].append((reply.version, x, wire.from_proto(reply.output)))
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(repr(error))
        finally:
            ch.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures

    for s, (sid, kind, module, shape) in enumerate(sessions):
        done = sorted(accepted[s], key=lambda a: a[0])
        assert [v for v, _, _ in done] == list(range(2, 2 + len(done))), sid
        module.train()
        for version, x, output in done:
            with torch.no_grad():
                expected = module(x)
            # Each reply was computed on exactly the state committed before it.
            torch.testing.assert_close(output, expected)
        for stub in stubs:
            session = get(stub, sid)
            assert session.version == 1 + len(done)
            assert_state_matches(session, module, torch.float32)

    # Eval through one replica sees what a train through the other committed.
    sid, kind, module, shape = sessions[0]
    x = torch.randn(shape)
    stubs[1].Forward(bn.ForwardRequest(session_id=sid, input=wire.to_proto(x), mode=bn.MODE_TRAIN))
    with torch.no_grad():
        module.train()
        module(x)
        module.eval()
        probe = torch.randn(shape)
        expected = module(probe)
    reply = stubs[0].Forward(bn.ForwardRequest(session_id=sid, input=wire.to_proto(probe), mode=bn.MODE_EVAL))
    torch.testing.assert_close(wire.from_proto(reply.output), expected)

    # A third replica, started later, serves sessions it never saw.
    late = ServerProcess("--store", redis_server.url)
    late_channel, late_stub = stub_for(late.address)
    listed = late_stub.ListSessions(bn.ListSessionsRequest()).sessions
    assert {s.session_id for s in listed} >= {sid for sid, *_ in sessions}
    assert_state_matches(get(late_stub, sid), module, torch.float32)
    x = torch.randn(shape)
    with torch.no_grad():
        module.train()
        expected = module(x)
    reply = late_stub.Forward(bn.ForwardRequest(session_id=sid, input=wire.to_proto(x), mode=bn.MODE_TRAIN))
    torch.testing.assert_close(wire.from_proto(reply.output), expected)
    assert_state_matches(get(stubs[0], sid), module, torch.float32)

    # A delete through one replica is seen by the others.
    late_stub.DeleteSession(bn.DeleteSessionRequest(session_id=sid))
    for stub in stubs:
        try:
            get(stub, sid)
            raise AssertionError("deleted session still served")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND

    late_channel.close()
    for channel, _ in channels:
        channel.close()
    for server in [late, *replicas]:
        assert server.stop() == 0


def test_a_retry_through_another_replica_is_not_applied_twice(redis_server):
    replicas = [ServerProcess("--store", redis_server.url) for _ in range(2)]
    (c0, s0), (c1, s1) = stub_for(replicas[0].address), stub_for(replicas[1].address)
    module = torch.nn.BatchNorm1d(3)
    sid = create(normserve.Client(c0), "1d", module, session_id="retry-across").session_id
    x = torch.randn(4, 3)
    request = bn.ForwardRequest(session_id=sid, input=wire.to_proto(x), mode=bn.MODE_TRAIN, request_id="once")
    first = s0.Forward(request)
    again = s1.Forward(request)
    assert again.replayed and again.version == first.version
    with torch.no_grad():
        module(x)
    assert_state_matches(get(s1, sid), module, torch.float32)
    c0.close()
    c1.close()
    for server in replicas:
        assert server.stop() == 0


def test_a_session_recreated_through_another_replica_is_not_mistaken_for_the_old_one(redis_server):
    replicas = [ServerProcess("--store", redis_server.url) for _ in range(2)]
    (c0, s0), (c1, s1) = stub_for(replicas[0].address), stub_for(replicas[1].address)
    old = torch.nn.BatchNorm1d(3)
    create(normserve.Client(c0), "1d", old, session_id="reborn", labels={"generation": "1"})
    get(s0, "reborn")  # replica 0 now caches generation 1 at version 1
    s1.DeleteSession(bn.DeleteSessionRequest(session_id="reborn"))
    new = torch.nn.BatchNorm1d(3, momentum=0.5)
    with torch.no_grad():
        new.running_mean.fill_(10.0)
    create(normserve.Client(c1), "1d", new, session_id="reborn", labels={"generation": "2"})  # version 1 again
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = new(x)
    reply = s0.Forward(bn.ForwardRequest(session_id="reborn", input=wire.to_proto(x), mode=bn.MODE_TRAIN))
    torch.testing.assert_close(wire.from_proto(reply.output), expected)
    for stub in (s0, s1):
        session = get(stub, "reborn")
        assert dict(session.config.labels) == {"generation": "2"}
        assert_state_matches(session, new, torch.float32)
    c0.close()
    c1.close()
    for server in replicas:
        assert server.stop() == 0


def redis_command(url, *args):
    """One command to Redis over RESP, its reply as Python values (enough
    for HGETALL and HSET)."""
    import socket
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        reader = sock.makefile("rb")

        def read():
            line = reader.readline()
            kind, rest = line[:1], line[1:-2]
            if kind in (b"+", b":"):
                return rest
            if kind == b"-":
                raise RuntimeError(rest.decode())
            if kind == b"$":
                return None if rest == b"-1" else reader.read(int(rest) + 2)[:-2]
            if kind == b"*":
                return [read() for _ in range(int(rest))]
            raise RuntimeError(f"unexpected reply {line!r}")
        return read()


def assert_data_loss(stub, sid, x, modes, *fragments):
    """GetSession and a Forward in each of `modes` all answer DATA_LOSS (with
    `fragments` in the message): nothing is served or computed."""
    calls = [lambda: get(stub, sid)] + [
        lambda mode=mode: stub.Forward(bn.ForwardRequest(session_id=sid, input=wire.to_proto(x), mode=mode))
        for mode in modes]
    for call in calls:
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.DATA_LOSS, error.value
        for fragment in fragments:
            assert fragment in error.value.details()


def test_a_store_that_went_back_in_time_is_data_loss_not_a_silent_rollback(redis_server):
    replica = ServerProcess("--store", redis_server.url)
    channel, stub = stub_for(replica.address)
    module = torch.nn.BatchNorm1d(3)
    sid = create(normserve.Client(channel), "1d", module, session_id="rolled-back").session_id
    x = torch.randn(4, 3)
    stub.Forward(bn.ForwardRequest(session_id=sid, input=wire.to_proto(x), mode=bn.MODE_TRAIN))
    key = f"normserve:session:{sid}"
    older = redis_command(redis_server.url, "HGETALL", key)
    assert stub.Forward(bn.ForwardRequest(session_id=sid, input=wire.to_proto(x),
                                          mode=bn.MODE_TRAIN)).version == 3
    # Redis loses the last acknowledged write (a restart from an older
    # snapshot, a failover to a replica that lagged): the hash goes back.
    redis_command(redis_server.url, "HSET", key, *older)
    assert_data_loss(stub, sid, x, [bn.MODE_TRAIN], "went back in time", "version 2")
    assert redis_command(redis_server.url, "HGET", key, "v").endswith(b":2")  # nothing applied on it
    # A replica that never saw version 3 accepts what Redis holds and trains
    # it to a version 3 of its own (other data: another history).
    other = ServerProcess("--store", redis_server.url)
    other_channel, other_stub = stub_for(other.address)
    theirs = torch.randn(4, 3) * 5 + 2
    assert other_stub.Forward(bn.ForwardRequest(session_id=sid, input=wire.to_proto(theirs),
                                                mode=bn.MODE_TRAIN)).version == 3
    stored = redis_command(redis_server.url, "HGETALL", key)
    # The first replica's lost version 3 has the same number, not the same
    # contents: it stays DATA_LOSS there (no answer from the lost history, no
    # replay of a lost request, no write over the other replica's step).
    assert_data_loss(stub, sid, x, [bn.MODE_EVAL, bn.MODE_TRAIN])
    assert redis_command(redis_server.url, "HGETALL", key) == stored
    # The other replica's state is PyTorch's on the history Redis holds.
    with torch.no_grad():
        module(x)
        module(theirs)
    state = get(other_stub, sid)
    torch.testing.assert_close(wire.from_proto(state.running_mean), module.running_mean)
    torch.testing.assert_close(wire.from_proto(state.running_var), module.running_var)
    # Deleting the session ends it on every replica; created again, it is new.
    stub.DeleteSession(bn.DeleteSessionRequest(session_id=sid))
    with pytest.raises(grpc.RpcError) as gone:
        get(other_stub, sid)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    other_channel.close()
    assert other.stop() == 0
    channel.close()
    assert replica.stop() == 0
