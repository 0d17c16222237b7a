"""Bad input: each malformed request, sent through the raw stubs, gets exactly
its documented status code; afterwards the server is healthy and a session
that existed before is untouched (same version, same state)."""

import math
import struct

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ServerProcess
from normserve.v1 import batch_norm_pb2, batch_norm_pb2_grpc, tensor_pb2

MAX_MESSAGE_BYTES = 4 << 20
MAX_NUM_FEATURES = 1024
INV = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
F32 = tensor_pb2.DATA_TYPE_FLOAT32
I64_MAX = (1 << 63) - 1


@pytest.fixture(scope="module")
def bad_server():
    proc = ServerProcess(
        "--compute-threads", "1",
        "--max-message-bytes", str(MAX_MESSAGE_BYTES),
        "--max-num-features", str(MAX_NUM_FEATURES),
    )
    yield proc
    assert proc.stop() == 0, "server did not exit cleanly"


@pytest.fixture(scope="module")
def channel(bad_server):
    options = [("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(bad_server.address, options=options) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return batch_norm_pb2_grpc.BatchNormServiceStub(channel)


def f32(shape, values=None):
    n = math.prod(shape)
    values = [float(i % 7) for i in range(n)] if values is None else values
    return tensor_pb2.Tensor(dtype=F32, shape=shape, raw=struct.pack(f"<{n}f", *values))


def raw(shape, nbytes, dtype=F32):
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, raw=b"\0" * nbytes)


def create(**fields):
    fields.setdefault("kind", batch_norm_pb2.BATCH_NORM_1D)
    fields.setdefault("num_features", 2)
    return batch_norm_pb2.CreateSessionRequest(**fields)


def train(session_id, tensor, **fields):
    return batch_norm_pb2.ForwardRequest(
        session_id=session_id, input=tensor, mode=batch_norm_pb2.MODE_TRAIN, **fields
    )


@pytest.fixture(scope="module")
def target(stub):
    """A session, trained once, that every bad forward below aims at."""
    stub.CreateSession(create(session_id="target", num_features=2))
    stub.Forward(train("target", f32([4, 2])))
    return "target"


# (name, request, exact code expected). Momentum outside [0, 1] is accepted,
# as by torch.nn.BatchNorm, so it is not here.
CREATE_CASES = [
    ("kind_unspecified", create(kind=batch_norm_pb2.BATCH_NORM_KIND_UNSPECIFIED), INV),
    ("kind_unknown", create(kind=99), INV),
    ("num_features_zero", create(num_features=0), INV),
    ("num_features_negative", create(num_features=-3), INV),
    ("num_features_above_max", create(num_features=MAX_NUM_FEATURES + 1), EXHAUSTED),
    ("num_features_i64_max", create(num_features=I64_MAX), EXHAUSTED),
    ("eps_nan", create(eps=float("nan")), INV),
    ("eps_inf", create(eps=float("inf")), INV),
    ("eps_zero", create(eps=0.0), INV),
    ("eps_negative", create(eps=-1e-5), INV),
    ("momentum_nan", create(momentum=float("nan")), INV),
    ("momentum_inf", create(momentum=float("inf")), INV),
    ("momentum_with_cumulative_average", create(momentum=0.1, cumulative_average=True), INV),
    ("param_dtype_unknown", create(param_dtype=42), INV),
    ("default_mode_unknown", create(default_mode=7), INV),
    ("session_id_too_long", create(session_id="a" * 129), INV),
    ("session_id_bad_character", create(session_id="a/b"), INV),
    ("session_id_space", create(session_id="a b"), INV),
    ("session_id_unicode", create(session_id="séance"), INV),
    ("label_value_1mb", create(labels={"k": "v" * (1 << 20)}), INV),
    ("label_key_too_long", create(labels={"k" * 129: "v"}), INV),
    ("label_key_empty", create(labels={"": "v"}), INV),
    ("labels_too_many", create(labels={f"k{i}": "v" for i in range(65)}), INV),
    ("running_mean_wrong_length", create(running_mean=raw([2], 4)), INV),
    ("weight_wrong_shape", create(weight=f32([3])), INV),
    ("above_max_message_bytes", create(labels={"k": "v" * (MAX_MESSAGE_BYTES + 1)}), EXHAUSTED),
]

FORWARD_CASES = [
    ("raw_too_short", lambda t: train(t, raw([4, 2], 31)), INV),
    ("raw_too_long", lambda t: train(t, raw([4, 2], 33)), INV),
    ("raw_odd_bytes_float16", lambda t: train(t, raw([4, 2], 15, tensor_pb2.DATA_TYPE_FLOAT16)), INV),
    ("raw_without_dtype", lambda t: train(t, raw([4, 2], 32, tensor_pb2.DATA_TYPE_UNSPECIFIED)), INV),
    ("dtype_unknown", lambda t: train(t, raw([4, 2], 32, 77)), INV),
    ("negative_dim", lambda t: train(t, raw([-4, 2], 32)), INV),
    ("huge_dims", lambda t: train(t, raw([1 << 40, 2], 32)), EXHAUSTED),
    ("overflowing_numel", lambda t: train(t, raw([I64_MAX, I64_MAX, 2], 32)), EXHAUSTED),
    ("more_than_8_dims", lambda t: train(t, raw([1, 2] + [1] * 7, 8)), INV),
    ("no_input", lambda t: batch_norm_pb2.ForwardRequest(session_id=t, mode=batch_norm_pb2.MODE_TRAIN), INV),
    ("wrong_channels", lambda t: train(t, f32([4, 3])), INV),
    ("mode_unknown", lambda t: batch_norm_pb2.ForwardRequest(session_id=t, input=f32([4, 2]), mode=9), INV),
    ("empty_session_id", lambda t: train("", f32([4, 2])), INV),
    ("bad_session_id", lambda t: train("../etc", f32([4, 2])), INV),
    ("unknown_session", lambda t: train("ghost", f32([4, 2])), NOT_FOUND),
    ("request_id_too_long", lambda t: train(t, f32([4, 2]), request_id="r" * 129), INV),
    ("above_max_message_bytes", lambda t: train(t, raw([MAX_MESSAGE_BYTES // 4 + 1], MAX_MESSAGE_BYTES + 4)), EXHAUSTED),
]


def snapshot(stub, session_id):
    session = stub.GetSession(batch_norm_pb2.GetSessionRequest(session_id=session_id)).session
    state = stub.ExportState(batch_norm_pb2.ExportStateRequest(session_id=session_id))
    return session.version, session.num_batches_tracked, state.SerializeToString(deterministic=True)


@pytest.mark.parametrize("name,request_,code", CREATE_CASES, ids=[c[0] for c in CREATE_CASES])
def test_bad_create_is_refused_with_its_code(stub, target, name, request_, code):
    before = snapshot(stub, target)
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateSession(request_)
    assert refused.value.code() == code, refused.value.details()
    assert snapshot(stub, target) == before


@pytest.mark.parametrize("name,make,code", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_bad_forward_is_refused_with_its_code(stub, target, name, make, code):
    before = snapshot(stub, target)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Forward(make(target))
    assert refused.value.code() == code, refused.value.details()
    assert snapshot(stub, target) == before


def test_non_finite_input_is_refused_when_the_session_rejects_it(stub):
    stub.CreateSession(create(session_id="strict", num_features=2, reject_non_finite=True))
    before = snapshot(stub, "strict")
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(grpc.RpcError) as refused:
            stub.Forward(train("strict", f32([2, 2], [1.0, bad, 2.0, 3.0])))
        assert refused.value.code() == INV, refused.value.details()
    assert snapshot(stub, "strict") == before


def test_server_is_healthy_and_the_session_untouched_after_bad_input(stub, channel, target):
    before = snapshot(stub, target)
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # The target was trained exactly once (by its fixture): nothing above applied.
    version, tracked, _ = before
    assert (version, tracked) == (2, 1)
    # And it still works.
    reply = stub.Forward(train(target, f32([4, 2])))
    assert (reply.version, reply.num_batches_tracked) == (3, 2)


# Bytes that are no protobuf message at all: a field whose varint never ends,
# a wire type that does not exist, a length past the end, a string field that
# is not UTF-8.
MALFORMED = {
    "unterminated_varint": b"\x08\xff\xff\xff",
    "wire_type_7": b"\x0f\x01",
    "length_past_the_end": b"\x0a\x7fab",
    "invalid_utf8_string": b"\x0a\x02\xff\xfe",
}
UNARY_RPCS = [
    "/normserve.v1.BatchNormService/" + name for name in (
        "CreateSession", "GetSession", "ListSessions", "DeleteSession", "ResetRunningStats",
        "UpdateParameters", "Forward", "ExportState", "ImportState")
] + ["/normserve.v1.SharedMemoryService/" + name for name in (
    "RegisterSharedMemory", "UnregisterSharedMemory", "SharedMemoryStatus")
] + ["/normserve.v1.CompareService/Compare", "/normserve.v1.ServerService/GetServerInfo",
     "/grpc.health.v1.Health/Check"]


@pytest.mark.parametrize("payload", sorted(MALFORMED))
@pytest.mark.parametrize("method", UNARY_RPCS)
def test_malformed_protobuf_is_invalid_argument_on_every_call(channel, method, payload):
    # Raw bytes through a real gRPC call: no serializer, the server's decoder sees them.
    call = channel.unary_unary(method)
    if (method, payload) == ("/normserve.v1.ServerService/GetServerInfo", "invalid_utf8_string"):
        # GetServerInfoRequest has no field 1: the bytes are a valid message
        # with an unknown field, which protobuf skips.
        assert call(MALFORMED[payload], timeout=30)
        return
    with pytest.raises(grpc.RpcError) as refused:
        call(MALFORMED[payload], timeout=30)
    assert refused.value.code() == INV, (method, refused.value.code(), refused.value.details())
    assert "malformed request" in refused.value.details()


@pytest.mark.parametrize("payload", sorted(MALFORMED))
def test_malformed_protobuf_ends_a_stream_with_invalid_argument(channel, stub, payload):
    target = f"stream-{payload}".replace("_", "-")
    stub.CreateSession(create(session_id=target, num_features=2))
    before = snapshot(stub, target)
    call = channel.stream_stream("/normserve.v1.BatchNormService/ForwardStream")
    good = train(target, f32([4, 2])).SerializeToString()
    replies = call(iter([good, MALFORMED[payload], good]), timeout=30)
    first = next(replies)  # the good message is answered before the bad one
    assert first
    with pytest.raises(grpc.RpcError) as refused:
        for _ in replies:
            pass
    assert refused.value.code() == INV, refused.value.details()
    assert "malformed request" in refused.value.details()
    # Exactly the message before the malformed one was applied.
    version, tracked, _ = snapshot(stub, target)
    assert (version, tracked) == (before[0] + 1, before[1] + 1)
