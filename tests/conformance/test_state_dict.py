"""ExportState / ImportState interoperate with PyTorch's state_dict and
load_state_dict, including its strict-loading errors."""

import itertools

import grpc
import pytest
import safetensors.torch
import torch

from normserve.v1 import batch_norm_pb2 as bn

import wire
from sessions import assert_state_matches, create, forward, get, rpc_error, torch_error


def export(stub, sid):
    return safetensors.torch.load(stub.ExportState(bn.ExportStateRequest(session_id=sid)).safetensors)


def import_state(stub, sid, state, **fields):
    blob = safetensors.torch.save({k: v.contiguous() for k, v in state.items()})
    return stub.ImportState(bn.ImportStateRequest(session_id=sid, safetensors=blob, **fields))


CASES = list(itertools.product([True, False], [True, False], [0.1, None], [torch.float32, torch.float64, torch.bfloat16]))


@pytest.mark.parametrize("affine,track,momentum,dtype", CASES)
def test_exported_state_loads_into_pytorch(client, bn_stub, affine, track, momentum, dtype):
    module = torch.nn.BatchNorm2d(3, affine=affine, track_running_stats=track, momentum=momentum).to(dtype)
    sid = create(client, "2d", module, dtype).session_id
    for _ in range(3):
        x = torch.randn(4, 3, 2, 2).to(dtype)
        with torch.no_grad():
            module(x)
        forward(bn_stub, sid, x, bn.MODE_TRAIN)
    state = export(bn_stub, sid)
    assert sorted(state) == sorted(module.state_dict())
    fresh = torch.nn.BatchNorm2d(3, affine=affine, track_running_stats=track, momentum=momentum).to(dtype)
    fresh.load_state_dict(state)  # strict: every key present, none extra
    for key, value in module.state_dict().items():
        assert state[key].dtype == value.dtype, key
        assert state[key].shape == value.shape, key
        torch.testing.assert_close(state[key], value, rtol=0, atol=0 if dtype != torch.float32 else 1e-6)


@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_pytorch_state_imports_into_a_session(client, bn_stub, affine, track):
    module = torch.nn.BatchNorm1d(4, affine=affine, track_running_stats=track)
    sid = create(client, "1d", module).session_id
    trained = torch.nn.BatchNorm1d(4, affine=affine, track_running_stats=track)
    with torch.no_grad():
        if affine:
            trained.weight.uniform_(0.5, 2)
            trained.bias.normal_()
        for _ in range(5):
            trained(torch.randn(8, 4) * 2 + 3)
    reply = import_state(bn_stub, sid, trained.state_dict())
    assert reply.session.version == 2 and not reply.replayed
    assert_state_matches(reply.session, trained, torch.float32)
    x = torch.randn(6, 4)
    with torch.no_grad():
        expected = trained(x)
    torch.testing.assert_close(wire.from_proto(forward(bn_stub, sid, x, bn.MODE_TRAIN).output), expected)
    assert_state_matches(get(bn_stub, sid), trained, torch.float32)


def test_float64_state_converts_into_a_float32_session(client, bn_stub):
    module = torch.nn.BatchNorm1d(3)
    sid = create(client, "1d", module).session_id
    source = torch.nn.BatchNorm1d(3).double()
    with torch.no_grad():
        source(torch.randn(5, 3).double())
    module.load_state_dict(source.state_dict())  # PyTorch converts on copy_
    assert_state_matches(import_state(bn_stub, sid, source.state_dict()).session, module, torch.float32)


def broken_states():
    good = torch.nn.BatchNorm1d(5).state_dict()
    missing = {k: v for k, v in good.items() if k not in ("bias", "running_var")}
    unexpected = {**good, "extra.weight": torch.ones(1)}
    mismatched = {**good, "weight": torch.ones(3)}
    everything = {**missing, "zzz": torch.ones(1), "weight": torch.ones(3)}
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched, "everything": everything}


@pytest.mark.parametrize("name", list(broken_states()))
@pytest.mark.parametrize("strict", [True, False])
def test_broken_states_fail_as_load_state_dict_does_and_load_nothing(client, bn_stub, name, strict):
    state = broken_states()[name]
    sid = create(client, "1d", torch.nn.BatchNorm1d(5)).session_id
    before = get(bn_stub, sid)
    try:
        torch.nn.BatchNorm1d(5).load_state_dict(state, strict=strict)
        expected = None
    except RuntimeError as error:
        expected = str(error)
    if expected is None:
        # Non-strict loading of missing/unexpected keys succeeds in PyTorch too.
        reply = import_state(bn_stub, sid, state, strict=strict)
        reference = torch.nn.BatchNorm1d(5)
        reference.load_state_dict(state, strict=False)
        assert_state_matches(reply.session, reference, torch.float32)
        return
    error = rpc_error(import_state, bn_stub, sid, state, strict=strict)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    got_head, got_lines = normalized(error.details())
    want_head, want_lines = normalized(expected)
    assert want_head in got_head
    assert got_lines == want_lines
    assert get(bn_stub, sid) == before


def normalized(message):
    """load_state_dict's message as (first line, sorted lines), with the key
    lists sorted: the order of keys inside a line follows dict order, which a
    safetensors round trip does not keep."""
    head, *lines = message.split("\n\t")
    out = []
    for line in lines:
        if line.startswith(("Missing key(s)", "Unexpected key(s)")):
            prefix, keys = line.split(": ", 1)
            out.append((prefix, tuple(sorted(keys.rstrip(". ").split(", ")))))
        else:
            out.append((line, ()))
    return head, sorted(out)


def test_state_without_num_batches_tracked_keeps_the_count(client, bn_stub):
    module = torch.nn.BatchNorm1d(3)
    sid = create(client, "1d", module).session_id
    for _ in range(4):
        x = torch.randn(5, 3)
        with torch.no_grad():
            module(x)
        forward(bn_stub, sid, x, bn.MODE_TRAIN)
    plain = {k: v for k, v in torch.nn.BatchNorm1d(3).state_dict().items() if k != "num_batches_tracked"}
    module.load_state_dict(plain)
    assert int(module.num_batches_tracked) == 4
    assert_state_matches(import_state(bn_stub, sid, plain).session, module, torch.float32)


def test_garbage_bytes_are_an_invalid_argument(client, bn_stub):
    sid = create(client, "1d", torch.nn.BatchNorm1d(3)).session_id
    error = rpc_error(bn_stub.ImportState, bn.ImportStateRequest(session_id=sid, safetensors=b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = rpc_error(bn_stub.ImportState, bn.ImportStateRequest(session_id=sid, safetensors=b"\xff" * 16))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
