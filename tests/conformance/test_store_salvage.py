"""The operator's store commands, offline: `normserve store check` reports
every record and the commit mark against the store; `normserve store
salvage` exports every readable session into a fresh store, also from a file
redb can no longer open, and names what was lost or is older than
acknowledged. A store damaged beyond redb's repair is refused at start with
a message naming them. The oracle is torch.nn.BatchNorm1d fed the same
batches (the state after each acknowledged step is kept)."""

import json
import os
import subprocess

import grpc
import normserve
import torch

from normserve.v1 import batch_norm_pb2 as bn

import wire
from conftest import ServerProcess
from sessions import assert_state_matches, create, get, rpc_error
from test_durability import flip_in_file, start_refused, stub_for, update_running_mean

BINARY = os.environ.get("NORMSERVE_BIN", "target/release/normserve")


def store(*args):
    """Runs `normserve store ...`; returns (exit code, JSON report or None, stderr)."""
    done = subprocess.run([BINARY, "store", *args], capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout) if "--json" in args and done.stdout.strip() else None
    return done.returncode, report, done.stderr if report is not None else done.stdout + done.stderr


class Trained:
    """Sessions trained through the server beside their torch modules; the
    module's state after every step is kept, by the version it produced."""

    def __init__(self, stub, client, names):
        self.stub = stub
        self.modules = {}
        self.states = {}  # name -> {version: state_dict}
        for index, name in enumerate(names):
            module = torch.nn.BatchNorm1d(4, momentum=[0.1, None, 0.3][index % 3])
            create(client, "1d", module, session_id=name)
            self.modules[name] = module
            self.states[name] = {1: {k: v.clone() for k, v in module.state_dict().items()}}

    def step(self, name, seed):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed)) * 3 + 2
        module = self.modules[name]
        module.train()
        with torch.no_grad():
            module(x)
        reply = self.stub.Forward(bn.ForwardRequest(session_id=name, input=wire.to_proto(x), mode=bn.MODE_TRAIN))
        self.states[name][reply.version] = {k: v.clone() for k, v in module.state_dict().items()}

    def module_at(self, name, version):
        module = torch.nn.BatchNorm1d(4, momentum=self.modules[name].momentum)
        module.load_state_dict(self.states[name][version])
        return module


def test_check_reports_every_session_of_a_whole_store_and_refuses_a_running_server():
    server = ServerProcess()
    channel, stub = stub_for(server.address)
    trained = Trained(stub, normserve.Client(channel), ["a", "b", "c"])
    for i in range(7):
        trained.step("abc"[i % 3], i)
    code, _, text = store("check", "--data-dir", server.data_dir)
    assert code == 2 and "locked by a running normserve" in text, text
    channel.close()
    assert server.stop() == 0

    code, report, _ = store("check", "--data-dir", server.data_dir, "--json")
    assert code == 0, report
    assert report["whole"] and report["redb"]["opens"] and not report["redb"]["repaired"]
    # 3 creations and 7 steps, one commit each (one client, one at a time).
    assert report["redb"]["commits"] == report["commit_mark"] == 10
    versions = {s["id"]: (s["verdict"], s["index_version"], s["kept_version"]) for s in report["sessions"]}
    expected = {name: max(states) for name, states in trained.states.items()}
    assert versions == {name: ("whole", v, v) for name, v in expected.items()}
    # The table says the same to a person.
    code, _, text = store("check", "--data-dir", server.data_dir)
    assert code == 0 and "readable, version 4" in text and "3 whole" in text, text


def test_an_unreadable_record_after_a_clean_stop_is_named_by_check():
    server = ServerProcess()
    channel, stub = stub_for(server.address)
    create(normserve.Client(channel), "1d", torch.nn.BatchNorm1d(4), session_id="healthy")
    create(normserve.Client(channel), "1d", torch.nn.BatchNorm1d(4), session_id="victim")
    update_running_mean(stub, "victim", torch.tensor([1234.5, -777.25, 31.125, 4096.75]))
    channel.close()
    assert server.stop() == 0
    assert flip_in_file(os.path.join(server.data_dir, "sessions.redb"),
                        torch.tensor([1234.5, -777.25, 31.125, 4096.75]).numpy().tobytes()) >= 1
    code, report, _ = store("check", "--data-dir", server.data_dir, "--json")
    assert code == 1 and not report["whole"]
    by_id = {s["id"]: s for s in report["sessions"]}
    assert by_id["healthy"]["verdict"] == "whole" and by_id["healthy"]["unreadable"] is None
    assert "checksum mismatch" in by_id["victim"]["unreadable"]
    assert by_id["victim"]["verdict"] in ("older", "lost")
    # The server serves the rest and DATA_LOSS for the victim.
    server = ServerProcess(data_dir=server.data_dir)
    channel, stub = stub_for(server.address)
    assert rpc_error(get, stub, "victim").code() == grpc.StatusCode.DATA_LOSS
    assert get(stub, "healthy").version == 1
    channel.close()
    assert server.stop() == 0


def test_both_copies_corrupted_after_kill_9_is_refused_naming_salvage_which_restores_the_rest():
    server = ServerProcess()
    channel, stub = stub_for(server.address)
    names = ["s0", "s1", "s2", "victim"]
    trained = Trained(stub, normserve.Client(channel), names)
    for i in range(12):
        trained.step(names[i % 3], 100 + i)
    # The victim's values, then more commits of the others: its record is in
    # the newest commit and in the one before (both roots redb could use).
    marker = torch.tensor([2718.25, -3141.5, 1414.125, 1732.0625])
    update_running_mean(stub, "victim", marker)
    for i in range(3):
        trained.step(names[i], 200 + i)
    channel.close()
    server.kill9()
    data_dir = server.data_dir
    assert flip_in_file(os.path.join(data_dir, "sessions.redb"), marker.numpy().tobytes()) >= 2

    stderr = start_refused(data_dir)
    assert "damaged beyond what redb can repair" in stderr, stderr
    assert f"normserve store salvage --data-dir {data_dir}" in stderr and "store check" in stderr, stderr

    code, report, _ = store("check", "--data-dir", data_dir, "--json")
    assert code == 1 and not report["whole"] and not report["redb"]["opens"]
    assert "corrupted" in report["redb"]["error"]
    # Refusing and checking changed nothing: the server still refuses.
    assert "damaged beyond" in start_refused(data_dir)

    out = data_dir + "-salvaged"
    code, report, _ = store("salvage", "--data-dir", data_dir, "--out", out, "--json")
    assert code == 1, report  # the victim's acknowledged state is not there
    by_id = {s["id"]: s for s in report["sessions"]}
    assert set(by_id) == set(names)
    for name in names[:3]:
        # Without redb's index nothing says these are the newest steps
        # acknowledged; they are (nothing else was damaged).
        assert by_id[name]["verdict"] == "unconfirmed"
        assert by_id[name]["kept_version"] == max(trained.states[name])
    victim = by_id["victim"]
    assert victim["verdict"] in ("older", "lost"), victim
    if victim["verdict"] == "older":
        assert victim["kept_version"] == 1 and victim["newer_version"] == 2
    assert report["salvaged"]["written"] == 3 + (victim["verdict"] == "older")

    server = ServerProcess(data_dir=out)
    channel, stub = stub_for(server.address)
    for name in names[:3]:
        session = get(stub, name)
        assert session.version == max(trained.states[name])
        assert_state_matches(session, trained.modules[name], torch.float32)
    if victim["verdict"] == "older":
        session = get(stub, "victim")
        assert session.version == 1
        assert_state_matches(session, trained.module_at("victim", 1), torch.float32)
    else:
        assert rpc_error(get, stub, "victim").code() == grpc.StatusCode.NOT_FOUND
    # The salvaged store is a store like any other: training goes on.
    trained.stub = stub
    trained.step("s0", 300)
    assert_state_matches(get(stub, "s0"), trained.modules["s0"], torch.float32)
    channel.close()
    assert server.stop() == 0
    assert store("check", "--data-dir", out)[0] == 0
    # Salvage never writes over a store.
    code, _, text = store("salvage", "--data-dir", data_dir, "--out", out)
    assert code == 2 and "already holds a store" in text, text


def test_a_store_cut_short_is_refused_and_salvage_keeps_what_the_bytes_still_hold():
    server = ServerProcess()
    channel, stub = stub_for(server.address)
    names = [f"cut-{i}" for i in range(6)]
    trained = Trained(stub, normserve.Client(channel), names)
    for i in range(18):
        trained.step(names[i % 6], 400 + i)
    channel.close()
    server.kill9()
    path = os.path.join(server.data_dir, "sessions.redb")
    os.truncate(path, os.path.getsize(path) // 2)

    stderr = start_refused(server.data_dir)
    assert "store salvage" in stderr or "--accept-store-rollback" in stderr, stderr
    out = server.data_dir + "-salvaged"
    code, report, _ = store("salvage", "--data-dir", server.data_dir, "--out", out, "--json")
    assert code in (0, 1), report
    server = ServerProcess(data_dir=out)
    channel, stub = stub_for(server.address)
    for entry in report["sessions"]:
        name = entry["id"]
        if entry["verdict"] == "lost":
            assert rpc_error(get, stub, name).code() == grpc.StatusCode.NOT_FOUND
            continue
        session = get(stub, name)
        # Whatever was kept is a state the session really had, at the version named.
        assert session.version == entry["kept_version"]
        assert_state_matches(session, trained.module_at(name, session.version), torch.float32)
        # redb cannot open the file: nothing is confirmed as acknowledged.
        assert entry["verdict"] in ("unconfirmed", "older"), entry
    # Exactly the sessions the report lists as kept are served (a session
    # of which no byte survived cannot be named by anyone: the limit of a
    # store cut short).
    listed = {s.session_id for s in stub.ListSessions(bn.ListSessionsRequest()).sessions}
    assert listed == {s["id"] for s in report["sessions"] if s["verdict"] != "lost"}
    channel.close()
    assert server.stop() == 0
