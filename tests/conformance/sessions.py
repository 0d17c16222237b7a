"""Helpers shared by the session conformance tests: a remote session next to
a local torch.nn.BatchNorm*d oracle. Sessions are created through the Python
client (clients/python); forwards and reads go through the raw stubs, so the
tests see the wire protocol itself."""

import grpc
import torch

from normserve.v1 import batch_norm_pb2 as bn

import wire

KINDS = {
    "1d": (bn.BATCH_NORM_1D, torch.nn.BatchNorm1d),
    "2d": (bn.BATCH_NORM_2D, torch.nn.BatchNorm2d),
    "3d": (bn.BATCH_NORM_3D, torch.nn.BatchNorm3d),
}

# Tolerances: torch.testing.assert_close's defaults, except float64 (1e-7).
TOLERANCE = {
    torch.float32: {},
    torch.float64: {"rtol": 1e-7, "atol": 1e-7},
    torch.float16: {},
    torch.bfloat16: {},
}


def create(client, kind, module, dtype=torch.float32, **options):
    """A session with `module`'s configuration, current state and mode, made
    by the client (normserve.Client.create_session_from_module); returns the
    CreateSession reply's Session message. options: the client's names
    (device, session_id, labels, training, reject_non_finite)."""
    assert isinstance(module, KINDS[kind][1]), (kind, type(module))
    session = client.create_session_from_module(module, dtype=dtype, **options)
    return session.initial_info.proto


def forward(stub, session_id, x, mode, **fields):
    request = bn.ForwardRequest(session_id=session_id, input=wire.to_proto(x), mode=mode, **fields)
    return stub.Forward(request)


def get(stub, session_id):
    return stub.GetSession(bn.GetSessionRequest(session_id=session_id)).session


def assert_state_matches(session, module, dtype):
    """The remote state equals the module's, tensor by tensor."""
    tol = TOLERANCE[dtype]
    state = {key: value.detach().cpu() for key, value in module.state_dict().items()}
    if module.affine:
        torch.testing.assert_close(wire.from_proto(session.weight), state["weight"], **tol)
        torch.testing.assert_close(wire.from_proto(session.bias), state["bias"], **tol)
    else:
        assert not session.HasField("weight") and not session.HasField("bias")
    if module.track_running_stats:
        for key in ["running_mean", "running_var"]:
            torch.testing.assert_close(wire.from_proto(getattr(session, key)), state[key], equal_nan=True, **tol)
        assert session.num_batches_tracked == int(state["num_batches_tracked"])
    else:
        assert not session.HasField("running_mean") and not session.HasField("running_var")
        assert session.num_batches_tracked == 0


def rpc_error(call, *args, **kwargs):
    """The grpc.RpcError a call raises (fails the test if it succeeds)."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        return error
    raise AssertionError("the call succeeded but should have failed")


def torch_error(fn, *args):
    """The text of the exception PyTorch raises."""
    try:
        fn(*args)
    except (ValueError, RuntimeError) as error:
        return str(error)
    raise AssertionError("PyTorch accepted what it should refuse")
