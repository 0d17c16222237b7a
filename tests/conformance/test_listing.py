"""Listing is honest: an owner's ListSessions shows its unreadable (DATA_LOSS)
sessions, marked as such; GetServerInfo counts a tenant's own sessions only;
a page with tensors ends before it would exceed one message, and a session
too large for any page is RESOURCE_EXHAUSTED naming the limit. The oracle is
what the test itself sent and corrupted."""

import os

import grpc
import pytest
import torch

import normserve
import wire
from conftest import ServerProcess
from normserve.v1 import batch_norm_pb2 as bn, batch_norm_pb2_grpc, server_pb2, server_pb2_grpc
from test_durability import flip_in_file

ACME, GLOBEX = "acme-Token-1", "globex-Token-2"


def stubs(address, token):
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    metadata = (("authorization", f"Bearer {token}"),)
    return (channel, batch_norm_pb2_grpc.BatchNormServiceStub(channel),
            server_pb2_grpc.ServerServiceStub(channel), metadata)


def all_pages(stub, metadata, **fields):
    """Every page of ListSessions: (sessions, unreadable) in order."""
    sessions, unreadable, token = [], [], ""
    while True:
        page = stub.ListSessions(bn.ListSessionsRequest(page_token=token, **fields), metadata=metadata)
        sessions += list(page.sessions)
        unreadable += list(page.unreadable)
        token = page.next_page_token
        if not token:
            return sessions, unreadable


def test_an_owner_lists_its_unreadable_sessions_and_counts_only_its_own(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ACME} acme user\n{GLOBEX} globex user\n")
    server = ServerProcess("--auth-tokens", str(tokens))
    marker = torch.tensor([4321.5, -987.25, 55.125])
    for token, names in ((ACME, ["a-1", "a-2", "victim", "z-last"]), (GLOBEX, ["g-1"])):
        client = normserve.connect(server.address, token=token, timeout=30)
        for name in names:
            module = torch.nn.BatchNorm1d(3)
            if name == "victim":
                module.running_mean.copy_(marker)
            client.create_session_from_module(module, session_id=name, labels={"team": "x"})
        client.close()
    assert server.stop() == 0
    assert flip_in_file(os.path.join(server.data_dir, "sessions.redb"), marker.numpy().tobytes()) >= 1

    server = ServerProcess("--auth-tokens", str(tokens), data_dir=server.data_dir)
    try:
        channel, stub, info, acme = stubs(server.address, ACME)
        # The owner sees it, marked, on every page size, also under a label selector.
        for page_size in (1, 2, 100):
            sessions, unreadable = all_pages(stub, acme, page_size=page_size)
            assert [s.session_id for s in sessions] == ["a-1", "a-2", "z-last"], page_size
            assert [(u.session_id, "corrupt" in u.reason) for u in unreadable] == [("victim", True)]
        _, unreadable = all_pages(stub, acme, label_selector={"team": "x"})
        assert [u.session_id for u in unreadable] == ["victim"]
        with pytest.raises(grpc.RpcError) as error:
            stub.GetSession(bn.GetSessionRequest(session_id="victim"), metadata=acme)
        assert error.value.code() == grpc.StatusCode.DATA_LOSS
        facts = info.GetServerInfo(server_pb2.GetServerInfoRequest(), metadata=acme)
        assert (facts.sessions, facts.unreadable_sessions) == (3, 1)

        # Another tenant sees neither the session nor its count.
        _, stub_g, info_g, globex = stubs(server.address, GLOBEX)
        sessions, unreadable = all_pages(stub_g, globex)
        assert ([s.session_id for s in sessions], unreadable) == (["g-1"], [])
        facts = info_g.GetServerInfo(server_pb2.GetServerInfoRequest(), metadata=globex)
        assert (facts.sessions, facts.unreadable_sessions) == (1, 0)

        # Deleting it clears it from the listing.
        stub.DeleteSession(bn.DeleteSessionRequest(session_id="victim"), metadata=acme)
        assert all_pages(stub, acme)[1] == []
        channel.close()
    finally:
        assert server.stop() == 0


MAX_MESSAGE = 1280 * 1024  # pages carry at most three quarters of it in tensors


def test_pages_with_tensors_end_before_they_exceed_one_message():
    server = ServerProcess("--durability", "none", "--max-message-bytes", str(MAX_MESSAGE))
    try:
        client = normserve.connect(server.address, timeout=30)
        expected = {}
        # 4 tensors x 16384 float32 = 256 KiB a session: three fit in a page.
        for index in range(7):
            module = torch.nn.BatchNorm1d(16384)
            module.running_mean.copy_(torch.full((16384,), float(index)))
            client.create_session_from_module(module, session_id=f"big-{index}")
            expected[f"big-{index}"] = module.running_mean.clone()
        channel, stub, _, metadata = stubs(server.address, "unused")
        pages, token = [], ""
        while True:
            page = stub.ListSessions(bn.ListSessionsRequest(page_token=token, include_tensors=True),
                                     metadata=metadata)
            pages.append([s.session_id for s in page.sessions])
            for session in page.sessions:
                torch.testing.assert_close(wire.from_proto(session.running_mean), expected[session.session_id])
            token = page.next_page_token
            if not token:
                break
        assert [len(p) for p in pages] == [3, 3, 1]
        assert sorted(sum(pages, [])) == sorted(expected)
        # Without tensors one page holds them all.
        page = stub.ListSessions(bn.ListSessionsRequest(), metadata=metadata)
        assert len(page.sessions) == 7 and not page.next_page_token
        channel.close()
    finally:
        assert server.stop() == 0


def test_a_session_too_large_for_any_page_is_resource_exhausted():
    server = ServerProcess("--durability", "none", "--max-message-bytes", str(MAX_MESSAGE))
    try:
        client = normserve.connect(server.address, timeout=30)
        # 4 x 65536 float32 = 1 MiB of tensors: one message, but not a page.
        client.create_session_from_module(torch.nn.BatchNorm1d(65536), session_id="huge")
        channel, stub, _, metadata = stubs(server.address, "unused")
        with pytest.raises(grpc.RpcError) as error:
            stub.ListSessions(bn.ListSessionsRequest(include_tensors=True), metadata=metadata)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_message_bytes" in error.value.details()
        assert [s.session_id for s in stub.ListSessions(bn.ListSessionsRequest(), metadata=metadata).sessions] == ["huge"]
        channel.close()
    finally:
        assert server.stop() == 0
