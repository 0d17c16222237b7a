"""Sessions behave exactly like torch.nn.BatchNorm{1,2,3}d, step after step.

The oracle is a local PyTorch module fed the same batches; after every step
the remote output and state must equal the module's.
"""

import itertools
import math

import grpc
import pytest
import torch

import normserve
from conftest import ServerProcess
from normserve.v1 import batch_norm_pb2 as bn, batch_norm_pb2_grpc as bn_grpc

import wire
from sessions import KINDS, TOLERANCE, assert_state_matches, create, forward, get, rpc_error, torch_error

TRAIN, EVAL = bn.MODE_TRAIN, bn.MODE_EVAL
SPATIAL_RANK = {"1d": None, "2d": 2, "3d": 3}


def random_shape(kind, n, c, gen):
    def size(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))
    if kind == "1d":
        return (n, c) if size(0, 1) == 0 else (n, c, size(1, 4))
    return (n, c) + tuple(size(1, 3) for _ in range(SPATIAL_RANK[kind]))


def one_value_shape(kind, c):
    return {"1d": (1, c), "2d": (1, c, 1, 1), "3d": (1, c, 1, 1, 1)}[kind]


def local_module(kind, c, momentum, affine, track, dtype, gen):
    module = KINDS[kind][1](c, momentum=momentum, affine=affine, track_running_stats=track)
    with torch.no_grad():
        if affine:
            module.weight.copy_(torch.randn(c, generator=gen) + 1)
            module.bias.copy_(torch.randn(c, generator=gen))
        if track:
            module.running_mean.copy_(torch.randn(c, generator=gen))
            module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return module.to(dtype)


MATRIX = list(itertools.product(
    ["1d", "2d", "3d"],
    [0.37, None],
    [True, False],
    [True, False],
    [torch.float32, torch.float64, torch.float16, torch.bfloat16],
))


def matrix_id(case):
    kind, momentum, affine, track, dtype = case
    m = "cumulative" if momentum is None else f"m{momentum}"
    return f"{kind}-{m}-{'affine' if affine else 'noaffine'}-{'track' if track else 'notrack'}-{str(dtype)[6:]}"


@pytest.mark.parametrize("case", MATRIX, ids=[matrix_id(c) for c in MATRIX])
def test_session_matches_pytorch_step_after_step(client, bn_stub, case):
    run_sequence(client, bn_stub, case, "cpu")


def test_cuda_sessions_match_pytorch_step_after_step(client, bn_stub, server_stub):
    from normserve.v1 import server_pb2
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA conformance run needs a GPU")
    assert server_stub.GetServerInfo(server_pb2.GetServerInfoRequest()).cuda_device_count > 0
    for case in MATRIX:
        run_sequence(client, bn_stub, case, "cuda")


def run_sequence(client, bn_stub, case, device):
    """A fixed mix of train/eval/empty/error/reset steps with random sizes and
    values, compared with the module after every step."""
    kind, momentum, affine, track, dtype = case
    # A stable seed per case (str hashes are salted per process).
    gen = torch.Generator().manual_seed(sum(map(ord, matrix_id(case))))
    c = int(torch.randint(2, 5, (1,), generator=gen))
    module = local_module(kind, c, momentum, affine, track, dtype, gen).to(device)
    session = create(client, kind, module, dtype, device=device)
    assert session.device == ("cpu" if device == "cpu" else "cuda:0")
    sid = session.session_id
    assert_state_matches(session, module, dtype)

    steps = ["train", "train", "eval", "empty", "one_value", "train", "reset", "train", "eval", "train"]
    for step in steps:
        before = get(bn_stub, sid)
        if step == "reset":
            module.reset_running_stats()
            reply = bn_stub.ResetRunningStats(bn.ResetRunningStatsRequest(session_id=sid))
            assert_state_matches(reply.session, module, dtype)
        elif step == "one_value":
            x = torch.randn(one_value_shape(kind, c), generator=gen).to(dtype).to(device)
            saved = module.num_batches_tracked.clone() if track else None
            expected = torch_error(module.train(), x)
            if track:
                # PyTorch counts the batch before it refuses it; normserve does not.
                module.num_batches_tracked.copy_(saved)
            error = rpc_error(forward, bn_stub, sid, x, TRAIN)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert expected in error.details()
            assert get(bn_stub, sid).version == before.version
        else:
            n = 0 if step == "empty" else int(torch.randint(2, 6, (1,), generator=gen))
            x = (torch.randn(random_shape(kind, n, c, gen), generator=gen) * 3 + 1).to(dtype).to(device)
            training = step != "eval"
            module.train(training)
            with torch.no_grad():
                expected = module(x)
            reply = forward(bn_stub, sid, x, TRAIN if training else EVAL)
            got = wire.from_proto(reply.output)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            torch.testing.assert_close(got, expected.cpu(), **TOLERANCE[dtype])
            mutated = training and track
            assert reply.version == before.version + (1 if mutated else 0)
        assert_state_matches(get(bn_stub, sid), module, dtype)


def test_forum_example_batchnorm1d_of_randn_3_5(bn_stub):
    """The classic: BatchNorm1d(5) on torch.randn(3, 5)."""
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    module = torch.nn.BatchNorm1d(5)
    sid = bn_stub.CreateSession(bn.CreateSessionRequest(kind=bn.BATCH_NORM_1D, num_features=5)).session.session_id
    reply = forward(bn_stub, sid, x, TRAIN)
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(wire.from_proto(reply.output), expected)
    # Normalization uses the biased variance, the running update the unbiased one.
    manual = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(wire.from_proto(reply.output), manual)
    session = get(bn_stub, sid)
    torch.testing.assert_close(wire.from_proto(session.running_var), 0.9 + 0.1 * x.var(0, unbiased=True))
    assert_state_matches(session, module, torch.float32)


@pytest.mark.parametrize("input_dtype", [torch.float16, torch.bfloat16])
def test_float32_session_accepts_half_input_and_answers_in_its_dtype(client, bn_stub, input_dtype):
    module = torch.nn.BatchNorm2d(3)
    sid = create(client, "2d", module).session_id
    for training in [True, False, True]:
        x = torch.randn(4, 3, 2, 2).to(input_dtype)
        module.train(training)
        with torch.no_grad():
            expected = module(x)
        got = wire.from_proto(forward(bn_stub, sid, x, TRAIN if training else EVAL).output)
        assert got.dtype == input_dtype
        torch.testing.assert_close(got, expected)
        assert_state_matches(get(bn_stub, sid), module, torch.float32)


@pytest.mark.parametrize("session_dtype,input_dtype", [
    (torch.float32, torch.float64),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float16),
    (torch.float64, torch.float32),
])
def test_dtype_mixes_pytorch_refuses_are_refused_with_its_text(client, bn_stub, session_dtype, input_dtype):
    module = torch.nn.BatchNorm1d(4).to(session_dtype)
    x = torch.randn(3, 4).to(input_dtype)
    expected = torch_error(module, x)
    sid = create(client, "1d", torch.nn.BatchNorm1d(4), session_dtype).session_id
    before = get(bn_stub, sid)
    error = rpc_error(forward, bn_stub, sid, x, TRAIN)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()
    after = get(bn_stub, sid)
    assert (after.version, after.num_batches_tracked) == (before.version, before.num_batches_tracked)


@pytest.mark.parametrize("kind,shape", [
    ("1d", (4,)), ("1d", (2, 4, 3, 3)), ("2d", (2, 4, 3)), ("2d", (2, 4)), ("3d", (2, 4, 3, 3)), ("3d", (2, 4, 1, 1, 1, 1)),
])
def test_wrong_rank_is_refused_with_pytorchs_text(client, bn_stub, kind, shape):
    module = KINDS[kind][1](4)
    x = torch.randn(shape)
    expected = torch_error(module, x)
    sid = create(client, kind, KINDS[kind][1](4)).session_id
    error = rpc_error(forward, bn_stub, sid, x, TRAIN)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()


@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_count_is_refused_with_pytorchs_text(client, bn_stub, affine, track, training):
    module = torch.nn.BatchNorm1d(5, affine=affine, track_running_stats=track).train(training)
    x = torch.randn(4, 3)
    expected = torch_error(module, x)
    sid = create(client, "1d", torch.nn.BatchNorm1d(5, affine=affine, track_running_stats=track)).session_id
    error = rpc_error(forward, bn_stub, sid, x, TRAIN if training else EVAL)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()


def test_wrong_channel_count_is_refused_even_where_pytorch_lets_it_through(client, bn_stub):
    # No weight and no running stats: ATen never checks; empty batches skip it too.
    sid = create(client, "1d", torch.nn.BatchNorm1d(5, affine=False, track_running_stats=False)).session_id
    error = rpc_error(forward, bn_stub, sid, torch.randn(4, 3), TRAIN)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "5 channels" in error.details()
    sid = create(client, "1d", torch.nn.BatchNorm1d(5)).session_id
    error = rpc_error(forward, bn_stub, sid, torch.randn(0, 3), TRAIN)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert get(bn_stub, sid).num_batches_tracked == 0


@pytest.mark.parametrize("session_dtype,input_dtype", [
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.float16, torch.float32),
])
def test_dtype_is_checked_even_where_pytorch_lets_it_through(client, bn_stub, session_dtype, input_dtype):
    # No weight and no running stats: PyTorch normalizes any dtype. The
    # session's dtype is refused exactly as the same layer with parameters
    # refuses it (PyTorch's own text), in both modes.
    x = torch.randn(3, 4).to(input_dtype)
    expected = torch_error(torch.nn.BatchNorm1d(4).to(session_dtype), x)
    bare = torch.nn.BatchNorm1d(4, affine=False, track_running_stats=False).to(session_dtype)
    with torch.no_grad():
        assert bare(x).dtype == input_dtype  # what PyTorch lets through
    sid = create(client, "1d", torch.nn.BatchNorm1d(4, affine=False, track_running_stats=False),
                 session_dtype).session_id
    for mode in (TRAIN, EVAL):
        error = rpc_error(forward, bn_stub, sid, x, mode)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in error.details() and "no parameters" in error.details()
    assert get(bn_stub, sid).version == 1


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_eps_that_pytorch_refuses_is_refused_at_creation(client, bn_stub, eps):
    expected = torch_error(torch.nn.BatchNorm1d(3, eps=eps), torch.randn(4, 3))
    error = rpc_error(bn_stub.CreateSession, bn.CreateSessionRequest(kind=bn.BATCH_NORM_1D, num_features=3, eps=eps))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()
    sid = create(client, "1d", torch.nn.BatchNorm1d(3)).session_id
    error = rpc_error(bn_stub.UpdateParameters, bn.UpdateParametersRequest(session_id=sid, eps=eps))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()


def test_nan_and_inf_propagate_as_in_pytorch(client, bn_stub):
    module = torch.nn.BatchNorm1d(3)
    sid = create(client, "1d", module).session_id
    x = torch.randn(4, 3)
    x[1, 0] = float("nan")
    x[2, 2] = float("inf")
    with torch.no_grad():
        expected = module(x)
    got = wire.from_proto(forward(bn_stub, sid, x, TRAIN).output)
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert_state_matches(get(bn_stub, sid), module, torch.float32)


def test_reject_non_finite_refuses_nan_and_changes_nothing(client, bn_stub):
    sid = create(client, "1d", torch.nn.BatchNorm1d(3), reject_non_finite=True).session_id
    before = get(bn_stub, sid)
    x = torch.randn(4, 3)
    x[0, 1] = float("nan")
    error = rpc_error(forward, bn_stub, sid, x, TRAIN)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN" in error.details()
    assert get(bn_stub, sid) == before


def test_mode_defaults_to_the_sessions_default_mode(client, bn_stub):
    module = torch.nn.BatchNorm1d(3).eval()
    sid = create(client, "1d", module, training=False).session_id
    x = torch.randn(4, 3)
    with torch.no_grad():
        expected = module(x)
    reply = bn_stub.Forward(bn.ForwardRequest(session_id=sid, input=wire.to_proto(x)))
    torch.testing.assert_close(wire.from_proto(reply.output), expected)
    assert get(bn_stub, sid).num_batches_tracked == 0


def test_typed_values_come_back_typed(client, bn_stub):
    module = torch.nn.BatchNorm1d(2)
    sid = create(client, "1d", module).session_id
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.5, -1.0]])
    reply = bn_stub.Forward(bn.ForwardRequest(session_id=sid, input=wire.to_proto(x, typed=True)))
    assert reply.output.WhichOneof("values") == "float_values"
    with torch.no_grad():
        torch.testing.assert_close(wire.from_proto(reply.output), module(x))


def test_update_parameters_is_validated_like_load_state_dict(client, bn_stub):
    module = torch.nn.BatchNorm1d(5)
    sid = create(client, "1d", module).session_id
    expected = torch_error(module.load_state_dict, {**module.state_dict(), "weight": torch.ones(3)})
    error = rpc_error(bn_stub.UpdateParameters, bn.UpdateParametersRequest(
        session_id=sid, bias=wire.to_proto(torch.ones(5)), weight=wire.to_proto(torch.ones(3))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected.split("\n\t")[1] in error.details()
    assert get(bn_stub, sid).version == 1  # the valid bias was not applied either

    new = {"weight": torch.rand(5) + 0.5, "bias": torch.randn(5), "running_mean": torch.randn(5),
           "running_var": torch.rand(5) + 0.1, "num_batches_tracked": torch.tensor(7)}
    module.load_state_dict(new)
    module.eps, module.momentum = 1e-3, None
    reply = bn_stub.UpdateParameters(bn.UpdateParametersRequest(
        session_id=sid, weight=wire.to_proto(new["weight"]), bias=wire.to_proto(new["bias"]),
        running_mean=wire.to_proto(new["running_mean"]), running_var=wire.to_proto(new["running_var"]),
        num_batches_tracked=7, eps=1e-3, cumulative_average=True))
    assert reply.session.version == 2
    assert reply.session.config.eps == 1e-3 and reply.session.config.cumulative_average
    assert_state_matches(reply.session, module, torch.float32)
    x = torch.randn(6, 5)
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(wire.from_proto(forward(bn_stub, sid, x, TRAIN).output), expected)
    assert_state_matches(get(bn_stub, sid), module, torch.float32)


def test_num_batches_tracked_at_its_maximum_refuses_to_overflow(client, bn_stub):
    sid = create(client, "1d", torch.nn.BatchNorm1d(2)).session_id
    bn_stub.UpdateParameters(bn.UpdateParametersRequest(session_id=sid, num_batches_tracked=2**63 - 1))
    before = get(bn_stub, sid)
    error = rpc_error(forward, bn_stub, sid, torch.randn(3, 2), TRAIN)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert get(bn_stub, sid) == before


def test_replay_outputs_are_kept_within_a_server_wide_total():
    # 64 KiB of outputs for all sessions together: two 32 KiB outputs fit, the
    # next ones are not kept. Their retries are still replays (never applied
    # twice), answered without the output, as after a restart.
    server = ServerProcess("--durability", "none", "--replay-cache-total-bytes", str(64 * 1024))
    try:
        channel = grpc.insecure_channel(server.address)
        stub = bn_grpc.BatchNormServiceStub(channel)
        client = normserve.Client(channel)
        xs = [torch.randn(2048, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        first = []
        for i, x in enumerate(xs):
            sid = create(client, "1d", torch.nn.BatchNorm1d(4), session_id=f"replay-{i}").session_id
            first.append(forward(stub, sid, x, TRAIN, request_id="once"))
        for i, x in enumerate(xs):
            again = forward(stub, f"replay-{i}", x, TRAIN, request_id="once")
            assert again.replayed and (again.version, again.num_batches_tracked) == (2, 1)
            if i < 2:
                torch.testing.assert_close(wire.from_proto(again.output), wire.from_proto(first[i].output))
            else:
                assert not again.HasField("output")
            assert get(stub, f"replay-{i}").num_batches_tracked == 1
        channel.close()
    finally:
        assert server.stop() == 0
