"""Durable sessions: nothing acknowledged is lost across SIGKILL, retries are
applied exactly once, corrupt records are reported and not reset, a store
that went back in time (or is missing or empty where one was) is refused
unless the operator accepts it, and a newer record format is refused. The oracle is torch.nn.BatchNorm*d fed the
accepted batches in the order of the versions the server returned."""

import os
import random
import signal
import subprocess
import threading
import time

import grpc
import normserve
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from normserve.v1 import batch_norm_pb2 as bn, batch_norm_pb2_grpc

import wire
from conftest import ServerProcess
from sessions import TOLERANCE, assert_state_matches, create, get, rpc_error

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def stub_for(address):
    # Reconnect quickly after a restart (gRPC's default backoff grows to minutes).
    channel = grpc.insecure_channel(address, options=[
        ("grpc.initial_reconnect_backoff_ms", 50),
        ("grpc.min_reconnect_backoff_ms", 50),
        ("grpc.max_reconnect_backoff_ms", 300),
    ])
    return channel, batch_norm_pb2_grpc.BatchNormServiceStub(channel)


def replay_in_version_order(module, accepted):
    """Feeds `accepted` [(version, x, output or None)] to `module` in version
    order and checks each output the server returned."""
    module.train()
    for version, x, output in sorted(accepted, key=lambda a: a[0]):
        with torch.no_grad():
            expected = module(x)
        if output is not None:
            torch.testing.assert_close(output, expected)


SPECS = [
    ("1d", lambda: torch.nn.BatchNorm1d(4), (6, 4)),
    ("2d", lambda: torch.nn.BatchNorm2d(3, momentum=None), (4, 3, 2, 2)),
    ("1d", lambda: torch.nn.BatchNorm1d(5, momentum=0.3), (3, 5, 2)),
]


def test_state_survives_kill_9_and_retries_apply_exactly_once():
    server = ServerProcess()
    address, data_dir = server.address, server.data_dir
    channel, stub = stub_for(address)
    sessions = []
    for index, (kind, make, shape) in enumerate(SPECS):
        sid = create(normserve.Client(channel), kind, make(), session_id=f"crash-{index}").session_id
        sessions.append((sid, kind, make, shape))

    per_client = 120
    clients = 6
    rng = random.Random(7)
    plans = []  # per client: [(session index, request id, x)]
    for c in range(clients):
        plan = []
        for i in range(per_client):
            s = rng.randrange(len(sessions))
            x = torch.randn(sessions[s][3], generator=torch.Generator().manual_seed(c * 1000 + i)) * 2 + 1
            plan.append((s, f"client{c}-req{i}", x))
        plans.append(plan)
    accepted = {s: {} for s in range(len(sessions))}  # request id -> (version, x, output)
    lock = threading.Lock()
    failures = []
    interrupted = []  # calls cut by a kill and retried

    def client(plan):
        ch, st = stub_for(address)
        try:
            for s, request_id, x in plan:
                request = bn.ForwardRequest(session_id=sessions[s][0], input=wire.to_proto(x),
                                            mode=bn.MODE_TRAIN, request_id=request_id)
                while True:
                    try:
                        # wait_for_ready: while the server is down the call waits
                        # for it to come back instead of failing fast.
                        reply = st.Forward(request, timeout=60, wait_for_ready=True)
                        break
                    except grpc.RpcError as error:
                        if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                                grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                            raise
                        # The server died mid-call: retry the same request id.
                        interrupted.append(request_id)
                output = wire.from_proto(reply.output) if reply.HasField("output") else None
                with lock:
                    accepted[s][request_id] = (reply.version, x, output)
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(repr(error))
        finally:
            ch.close()

    threads = [threading.Thread(target=client, args=(plan,)) for plan in plans]
    for t in threads:
        t.start()
    kills = 0
    total = clients * per_client
    # Kill once a quarter, a half and three quarters of the calls have been
    # answered (a little later, at random): always while the clients are busy,
    # however fast the server answers them.
    for share in (0.25, 0.5, 0.75):
        while any(t.is_alive() for t in threads):
            with lock:
                answered = sum(len(done) for done in accepted.values())
            if answered >= share * total:
                break
            time.sleep(0.005)
        if not any(t.is_alive() for t in threads):
            break
        time.sleep(rng.uniform(0.0, 0.02))
        server.kill9()
        kills += 1
        server = ServerProcess(data_dir=data_dir, listen=address)
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures
    assert kills >= 2 and interrupted, (kills, len(interrupted))

    for s, (sid, kind, make, shape) in enumerate(sessions):
        done = accepted[s]
        versions = sorted(v for v, _, _ in done.values())
        # Exactly once: one version per distinct request, no gaps, no repeats.
        assert versions == list(range(2, 2 + len(done))), (sid, versions)
        module = make()
        replay_in_version_order(module, list(done.values()))
        session = get(stub, sid)
        assert session.num_batches_tracked == len(done)
        assert session.version == 1 + len(done)
        assert_state_matches(session, module, torch.float32)
    channel.close()
    assert server.stop() == 0


def test_sigterm_restart_keeps_every_session():
    server = ServerProcess()
    channel, stub = stub_for(server.address)
    module = torch.nn.BatchNorm2d(3)
    sid = create(normserve.Client(channel), "2d", module, labels={"team": "vision"}).session_id
    for _ in range(5):
        x = torch.randn(4, 3, 2, 2)
        with torch.no_grad():
            module(x)
        stub.Forward(bn.ForwardRequest(session_id=sid, input=wire.to_proto(x), mode=bn.MODE_TRAIN))
    before = get(stub, sid)
    channel.close()
    assert server.stop() == 0
    server = ServerProcess(data_dir=server.data_dir)
    channel, stub = stub_for(server.address)
    after = get(stub, sid)
    # The last use is kept in memory only: a restarted server counts from load.
    assert after.last_used_at.ToDatetime() >= before.last_used_at.ToDatetime()
    for session in (before, after):
        session.ClearField("last_used_at")
    assert after == before
    assert_state_matches(after, module, torch.float32)
    assert dict(after.config.labels) == {"team": "vision"}
    channel.close()
    assert server.stop() == 0


def test_make_run_restart_keeps_the_state(tmp_path):
    """The README's `make run`, stopped with SIGTERM and started again."""
    def make_run():
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "run", "LISTEN=127.0.0.1:0", f"DATA_DIR={tmp_path}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        for line in proc.stdout:
            if line.startswith("normserve listening on "):
                return proc, line.split()[3]
        raise RuntimeError("make run did not start the server")

    proc, address = make_run()
    channel, stub = stub_for(address)
    module = torch.nn.BatchNorm1d(3)
    sid = create(normserve.Client(channel), "1d", module).session_id
    x = torch.randn(5, 3)
    with torch.no_grad():
        module(x)
    stub.Forward(bn.ForwardRequest(session_id=sid, input=wire.to_proto(x), mode=bn.MODE_TRAIN))
    channel.close()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)

    proc, address = make_run()
    channel, stub = stub_for(address)
    assert_state_matches(get(stub, sid), module, torch.float32)
    channel.close()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def flip_in_file(path, needle):
    """Flips one bit in every copy of `needle` in the file; returns how many."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    count, start = 0, 0
    while (at := data.find(needle, start)) >= 0:
        data[at + len(needle) // 2] ^= 0x01
        count += 1
        start = at + 1
    with open(path, "wb") as f:
        f.write(data)
    return count


def test_corrupt_record_is_data_loss_and_the_rest_is_served():
    server = ServerProcess()
    channel, stub = stub_for(server.address)
    marker = torch.tensor([1234.5, -777.25, 31.125, 4096.75])
    victim = torch.nn.BatchNorm1d(4)
    victim.running_mean.copy_(marker)
    create(normserve.Client(channel), "1d", victim, session_id="victim")
    healthy = torch.nn.BatchNorm1d(4)
    create(normserve.Client(channel), "1d", healthy, session_id="healthy")
    channel.close()
    assert server.stop() == 0

    flipped = flip_in_file(os.path.join(server.data_dir, "sessions.redb"), marker.numpy().tobytes())
    assert flipped >= 1
    server = ServerProcess(data_dir=server.data_dir)
    channel, stub = stub_for(server.address)
    error = rpc_error(get, stub, "victim")
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert "victim" in error.details()
    # Forward on it fails the same way: statistics are never silently reset.
    error = rpc_error(stub.Forward, bn.ForwardRequest(
        session_id="victim", input=wire.to_proto(torch.randn(3, 4)), mode=bn.MODE_TRAIN))
    assert error.code() == grpc.StatusCode.DATA_LOSS
    # The rest is served.
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = healthy(x)
    reply = stub.Forward(bn.ForwardRequest(session_id="healthy", input=wire.to_proto(x), mode=bn.MODE_TRAIN))
    torch.testing.assert_close(wire.from_proto(reply.output), expected)
    assert "corrupt" in "".join(server.log)
    from normserve.v1 import server_pb2, server_pb2_grpc
    info = server_pb2_grpc.ServerServiceStub(channel).GetServerInfo(server_pb2.GetServerInfoRequest())
    assert (info.unreadable_sessions, info.sessions, info.store) == (1, 1, "embedded")
    # An operator can delete the unreadable session to clear it.
    stub.DeleteSession(bn.DeleteSessionRequest(session_id="victim"))
    assert rpc_error(get, stub, "victim").code() == grpc.StatusCode.NOT_FOUND
    channel.close()
    assert server.stop() == 0


def test_records_of_a_newer_format_are_refused_at_start():
    server = ServerProcess()
    channel, stub = stub_for(server.address)
    create(normserve.Client(channel), "1d", torch.nn.BatchNorm1d(2), session_id="future")
    channel.close()
    assert server.stop() == 0
    path = os.path.join(server.data_dir, "sessions.redb")
    with open(path, "rb") as f:
        data = f.read()
    # Record header: b"NSRC" then the format version (u32 little-endian).
    data = data.replace(b"NSRC\x01\x00\x00\x00", b"NSRC\x09\x00\x00\x00")
    with open(path, "wb") as f:
        f.write(data)
    binary = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
    done = subprocess.run([binary, "--listen", "127.0.0.1:0", "--data-dir", server.data_dir],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "newer normserve" in done.stderr and "refusing to start" in done.stderr


def test_durability_none_keeps_nothing_across_restarts():
    server = ServerProcess("--durability", "none")
    channel, stub = stub_for(server.address)
    sid = create(normserve.Client(channel), "1d", torch.nn.BatchNorm1d(2)).session_id
    channel.close()
    assert server.stop() == 0
    assert not os.path.exists(os.path.join(server.data_dir, "sessions.redb"))
    server = ServerProcess("--durability", "none", data_dir=server.data_dir)
    channel, stub = stub_for(server.address)
    assert rpc_error(get, stub, sid).code() == grpc.StatusCode.NOT_FOUND
    channel.close()
    assert server.stop() == 0


def start_refused(data_dir, *args):
    """Runs the server on `data_dir`, expecting it to refuse to start."""
    binary = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
    done = subprocess.run([binary, "--listen", "127.0.0.1:0", "--data-dir", data_dir, *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stdout
    return done.stderr


def update_running_mean(stub, sid, values):
    return stub.UpdateParameters(bn.UpdateParametersRequest(
        session_id=sid, running_mean=wire.to_proto(values)))


def test_a_store_repaired_back_to_an_older_commit_after_kill_9_is_refused():
    server = ServerProcess()
    channel, stub = stub_for(server.address)
    create(normserve.Client(channel), "1d", torch.nn.BatchNorm1d(4), session_id="victim")
    update_running_mean(stub, "victim", torch.tensor([11.5, 12.5, 13.5, 14.5]))
    # The newest acknowledged state: values found in its newest copy only.
    newest = torch.tensor([2718.25, -3141.5, 1414.125, 1732.0625])
    assert update_running_mean(stub, "victim", newest).session.version == 3
    channel.close()
    server.kill9()

    # One flipped bit in the newest copy: at the next start redb finds the
    # newest commit corrupt and repairs the file back to the one before it.
    assert flip_in_file(os.path.join(server.data_dir, "sessions.redb"), newest.numpy().tobytes()) >= 1
    stderr = start_refused(server.data_dir)
    assert "gone back in time" in stderr and "--accept-store-rollback" in stderr, stderr
    assert "refusing to start" in stderr.lower(), stderr

    # The operator accepts it: the older state is served, and said so in the log.
    server = ServerProcess("--accept-store-rollback", data_dir=server.data_dir)
    channel, stub = stub_for(server.address)
    session = get(stub, "victim")
    assert session.version == 2
    torch.testing.assert_close(wire.from_proto(session.running_mean),
                               torch.tensor([11.5, 12.5, 13.5, 14.5]))
    channel.close()
    assert server.stop() == 0
    assert "gone back in time" in "".join(server.log)
    # Accepted once: the next start needs no flag.
    server = ServerProcess(data_dir=server.data_dir)
    channel, stub = stub_for(server.address)
    assert get(stub, "victim").version == 2
    channel.close()
    assert server.stop() == 0


def test_an_older_copy_of_the_store_is_refused():
    server = ServerProcess()
    channel, stub = stub_for(server.address)
    create(normserve.Client(channel), "1d", torch.nn.BatchNorm1d(2), session_id="s")
    channel.close()
    assert server.stop() == 0
    path = os.path.join(server.data_dir, "sessions.redb")
    with open(path, "rb") as f:
        backup = f.read()
    server = ServerProcess(data_dir=server.data_dir)
    channel, stub = stub_for(server.address)
    stub.Forward(bn.ForwardRequest(session_id="s", input=wire.to_proto(torch.randn(3, 2)),
                                   mode=bn.MODE_TRAIN))
    channel.close()
    server.kill9()
    with open(path, "wb") as f:
        f.write(backup)
    assert "gone back in time" in start_refused(server.data_dir)


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_an_empty_or_missing_store_where_one_was_is_refused(damage):
    server = ServerProcess()
    channel, stub = stub_for(server.address)
    create(normserve.Client(channel), "1d", torch.nn.BatchNorm1d(2), session_id="kept")
    channel.close()
    assert server.stop() == 0
    path = os.path.join(server.data_dir, "sessions.redb")
    if damage == "truncated":
        os.truncate(path, 0)
    else:
        os.remove(path)
    stderr = start_refused(server.data_dir)
    assert "missing or empty" in stderr and "--accept-store-rollback" in stderr, stderr
    # Refusing changed nothing on disk.
    assert not os.path.exists(path) or os.path.getsize(path) == 0

    # Accepted through the environment variable: an empty store is served.
    os.environ["NORMSERVE_ACCEPT_STORE_ROLLBACK"] = "true"
    try:
        server = ServerProcess(data_dir=server.data_dir)
    finally:
        del os.environ["NORMSERVE_ACCEPT_STORE_ROLLBACK"]
    channel, stub = stub_for(server.address)
    assert rpc_error(get, stub, "kept").code() == grpc.StatusCode.NOT_FOUND
    channel.close()
    assert server.stop() == 0
    assert "missing or empty" in "".join(server.log)
