"""The Python client (clients/python) against the real server, with PyTorch
as the oracle: sessions step after step with numpy and torch inputs of every
dtype, state dicts moving between sessions and nn.BatchNorm*d, the Compare
report, the drop-in RemoteBatchNorm modules, versions and replays, error
mapping, the codec against numpy's/struct's own bytes, TLS and token
metadata (against a small in-process gRPC server), the checked-in stubs
against the proto, and the package installing with pip."""

import collections
import concurrent.futures
import contextlib
import copy
import filecmp
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import uuid

import grpc
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import normserve
from normserve import codec
from normserve.torch import RemoteBatchNorm1d, RemoteBatchNorm2d, RemoteBatchNorm3d, convert_batch_norms
from normserve.v1 import batch_norm_pb2 as bn, server_pb2, server_pb2_grpc, tensor_pb2

from conftest import CLIENT_DIR
from sessions import TOLERANCE, torch_error

REPO = os.path.abspath(os.path.join(CLIENT_DIR, "..", ".."))
MODULES = {"1d": torch.nn.BatchNorm1d, "2d": torch.nn.BatchNorm2d, "3d": torch.nn.BatchNorm3d}
SHAPES = {"1d": (5, 3, 2), "2d": (4, 3, 2, 3), "3d": (3, 3, 2, 2, 2)}
NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def as_torch(y):
    """A result (numpy or torch) as a torch tensor, for assert_close."""
    return y if isinstance(y, torch.Tensor) else torch.from_numpy(np.array(y))


def randomized(module, gen):
    """`module` with weights and running statistics away from their defaults."""
    c = module.num_features
    with torch.no_grad():
        if module.affine:
            module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(c, generator=gen))
        if module.track_running_stats:
            module.running_mean.copy_(torch.randn(c, generator=gen))
            module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return module


def assert_same_state(session_state, module, dtype=torch.float32):
    """A client state_dict equals the module's: keys in order, dtypes, values."""
    expected = module.state_dict()
    assert list(session_state) == list(expected)
    for key, value in expected.items():
        assert session_state[key].dtype == value.dtype, key
        torch.testing.assert_close(session_state[key], value.cpu(), **TOLERANCE[dtype])


def unique_labels():
    return {"test": uuid.uuid4().hex}


# ------------------------------------------------------------------ sessions


STEP_CASES = [(kind, dtype, form) for kind in MODULES
              for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
              for form in ("numpy", "torch") if not (dtype == torch.bfloat16 and form == "numpy")]


@pytest.mark.parametrize("kind,dtype,form", STEP_CASES,
                         ids=[f"{k}-{str(d)[6:]}-{f}" for k, d, f in STEP_CASES])
def test_session_matches_pytorch_step_after_step(client, kind, dtype, form):
    gen = torch.Generator().manual_seed(sum(map(ord, f"{kind}{dtype}{form}")))  # str hashes are salted
    module = randomized(MODULES[kind](3, momentum=0.2), gen).to(dtype)
    state = module.state_dict()
    session = client.create_session(
        kind, 3, momentum=0.2, dtype=dtype, weight=state["weight"], bias=state["bias"],
        running_mean=state["running_mean"], running_var=state["running_var"], labels=unique_labels())
    assert_same_state(session.state_dict(), module, dtype)
    for step in ["train", "train", "eval", "train", "eval"]:
        x = (torch.randn(SHAPES[kind], generator=gen) * 2 + 1).to(dtype)
        training = step == "train"
        module.train(training)
        session.train(training)
        with torch.no_grad():
            expected = module(x)
        sent = x.numpy() if form == "numpy" else x
        got = session.forward(sent)
        if form == "numpy":
            assert isinstance(got, np.ndarray) and got.dtype == NUMPY_DTYPES[dtype] and got.shape == x.shape
        else:
            assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(as_torch(got), expected, **TOLERANCE[dtype])
        assert_same_state(session.state_dict(), module, dtype)


OPTION_CASES = [dict(momentum=None), dict(affine=False), dict(track_running_stats=False), dict(eps=1e-3),
                dict(affine=False, track_running_stats=False, momentum=None)]


@pytest.mark.parametrize("options", OPTION_CASES, ids=[",".join(f"{k}={v}" for k, v in o.items())
                                                         for o in OPTION_CASES])
def test_create_session_options_mean_what_they_mean_in_pytorch(client, options):
    module = torch.nn.BatchNorm1d(4, **options)
    session = client.create_session("1d", 4, **options)
    info = session.info()
    assert (info.kind, info.num_features, info.eps, info.momentum, info.affine, info.track_running_stats) == (
        "1d", 4, module.eps, module.momentum, module.affine, module.track_running_stats)
    for training in [True, True, False, True]:
        x = torch.randn(6, 4) * 3
        module.train(training)
        with torch.no_grad():
            expected = module(x)
        torch.testing.assert_close(session.forward(x, train=training), expected)
    assert_same_state(session.state_dict(), module)


def test_train_and_eval_set_the_default_mode_like_a_module(client):
    module = torch.nn.BatchNorm1d(3)
    session = client.create_session("1d", 3)
    assert session.training
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert session.eval() is session and not session.training
        torch.testing.assert_close(session(x), module.eval()(x))
        assert session.info().num_batches_tracked == 0
        torch.testing.assert_close(session.train()(x), module.train()(x))
        assert session.info().num_batches_tracked == 1
        # An explicit mode wins over the handle's.
        torch.testing.assert_close(session.forward(x, train=False), module.eval()(x))
    # A session created in eval mode: handles on it start in eval mode.
    evaluating = client.create_session("1d", 3, training=False)
    assert not evaluating.training and not client.get_session(evaluating.session_id).training
    assert not evaluating.info().training


def test_numpy_results_are_read_only_views_and_torch_results_are_writable(client):
    session = client.create_session("1d", 3)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    y = session.forward(x)
    assert not y.flags.writeable and not y.flags.owndata  # a view of the reply's bytes
    assert np.array(y).flags.writeable
    t = session.forward(torch.from_numpy(x))
    t += 1  # a torch result owns its memory
    torch.testing.assert_close(t - 1, torch.from_numpy(np.array(y)), rtol=0, atol=1e-6)


def test_non_contiguous_and_big_endian_inputs_are_sent_as_their_values(client):
    module = torch.nn.BatchNorm1d(3)
    session = client.create_session("1d", 3)
    base = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    for x in [base.T, base.T.astype(">f4"), torch.from_numpy(base).t(), base.T[::2]]:
        with torch.no_grad():
            expected = module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        torch.testing.assert_close(as_torch(session.forward(x)), expected)
    assert_same_state(session.state_dict(), module)


@pytest.mark.parametrize("input_dtype", [np.float16, torch.float16, torch.bfloat16])
def test_float32_session_takes_half_input_and_answers_in_its_dtype(client, input_dtype):
    module = torch.nn.BatchNorm2d(3)
    session = client.create_session("2d", 3)
    x = torch.randn(4, 3, 2, 2)
    sent = x.numpy().astype(input_dtype) if input_dtype is np.float16 else x.to(input_dtype)
    with torch.no_grad():
        expected = module(as_torch(sent))
    got = session.forward(sent)
    assert got.dtype == sent.dtype and type(got) is type(sent)
    torch.testing.assert_close(as_torch(got), expected)


def test_cuda_tensors_come_back_on_their_device(client):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: torch tensors on a GPU need one")
    module = torch.nn.BatchNorm1d(3).cuda()
    session = client.create_session("1d", 3, device="cuda")
    x = torch.randn(5, 3, device="cuda")
    with torch.no_grad():
        expected = module(x)
    got = session.forward(x)
    assert got.device == x.device
    torch.testing.assert_close(got, expected)
    assert session.info().device == "cuda:0"


def test_sessions_are_listed_by_label_page_after_page(client):
    labels = unique_labels()
    made = sorted(client.create_session("1d", 2, labels=labels).session_id for _ in range(5))
    client.create_session("1d", 2, labels=unique_labels())  # another label: not listed
    listed = list(client.list_sessions(labels, page_size=2))
    assert [info.session_id for info in listed] == made
    assert all(info.labels == labels and info.weight is None for info in listed)
    full = list(client.list_sessions(labels, page_size=2, include_tensors=True))
    for info in full:
        assert_same_state(info.state_dict(), torch.nn.BatchNorm1d(2))
        assert info == client.get_session(info.session_id).info()
    for session_id in made:
        client.delete_session(session_id)
    assert list(client.list_sessions(labels)) == []


def test_session_info_mirrors_the_servers_message(client, bn_stub):
    module = randomized(torch.nn.BatchNorm3d(2, momentum=None, eps=1e-4), torch.Generator().manual_seed(3))
    session = client.create_session_from_module(module, session_id=f"info-{uuid.uuid4().hex}",
                                                labels={"a": "b"})
    info = session.info()
    raw = bn_stub.GetSession(bn.GetSessionRequest(session_id=session.session_id)).session
    assert info.proto == raw and info == session.initial_info
    assert (info.session_id, info.kind, info.momentum, info.eps, info.dtype, info.labels, info.version) == (
        raw.session_id, "3d", None, 1e-4, "float32", {"a": "b"}, 1)
    assert info.created_at is not None and info.updated_at >= info.created_at
    np.testing.assert_array_equal(info.running_mean, module.running_mean.numpy())
    assert_same_state(info.state_dict(), module)


def test_forward_stream_matches_pytorch_and_keeps_going_after_an_error(client):
    module = torch.nn.BatchNorm1d(4)
    session = client.create_session("1d", 4)
    gen = torch.Generator().manual_seed(5)
    inputs = [torch.randn(5, 4, generator=gen) for _ in range(6)]
    inputs[3] = torch.randn(5, 3, generator=gen)  # wrong channel count: refused in-band
    sent = [x.numpy() if i % 2 else x for i, x in enumerate(inputs)]
    results = list(session.forward_stream(iter(sent), return_exceptions=True))
    assert len(results) == 6
    for index, (x, got) in enumerate(zip(inputs, results)):
        if index == 3:
            assert isinstance(got, normserve.InvalidArgument) and got.index == 3
            # On a copy: PyTorch counts the batch before refusing it.
            assert torch_error(copy.deepcopy(module), x) in got.details
            continue
        assert isinstance(got, np.ndarray if index % 2 else torch.Tensor)
        with torch.no_grad():
            torch.testing.assert_close(as_torch(got), module(x))
    assert_same_state(session.state_dict(), module)

    # By default the error is raised, after the outputs before it.
    seen = []
    with pytest.raises(normserve.InvalidArgument) as info:
        for y in session.eval().forward_stream(inputs):
            seen.append(y)
    assert len(seen) == 3 and info.value.index == 3
    # An input the client cannot encode ends the stream after what came before.
    seen = []
    with pytest.raises(TypeError, match="unsupported dtype int64"):
        for y in session.forward_stream([inputs[0], np.ones((5, 4), dtype=np.int64)]):
            seen.append(y)
    assert len(seen) == 1


# --------------------------------------------------------------- state dicts


@pytest.mark.parametrize("affine,track,momentum,dtype", [
    (True, True, 0.1, torch.float32), (False, True, None, torch.float64), (True, False, 0.1, torch.bfloat16)])
def test_state_dicts_move_between_sessions_and_pytorch_modules(client, affine, track, momentum, dtype):
    gen = torch.Generator().manual_seed(11)
    options = dict(affine=affine, track_running_stats=track, momentum=momentum)
    module = torch.nn.BatchNorm2d(3, **options).to(dtype)
    session = client.create_session("2d", 3, dtype=dtype, **options)
    for _ in range(3):
        x = torch.randn(4, 3, 2, 2, generator=gen).to(dtype)
        with torch.no_grad():
            module(x)
        session.forward(x)
    # Session -> PyTorch: a strict load into a fresh module.
    fresh = torch.nn.BatchNorm2d(3, **options).to(dtype)
    fresh.load_state_dict(session.state_dict())
    assert_same_state(fresh.state_dict(), module, dtype)
    # PyTorch -> session: another module's trained state.
    trained = randomized(torch.nn.BatchNorm2d(3, **options), gen).to(dtype)
    if track:
        trained.num_batches_tracked.fill_(17)
    before = session.info().version  # train forwards count only with running statistics
    assert before == (4 if track else 1)
    info = session.load_state_dict(trained.state_dict())
    assert info.version == before + 1 and not info.replayed
    assert_same_state(info.state_dict(), trained, dtype)
    # The bytes themselves are safetensors with PyTorch's keys.
    exported = session.export_state()
    assert exported.version == before + 1
    assert sorted(safetensors.torch.load(exported.safetensors)) == sorted(trained.state_dict())
    assert session.import_state(exported.safetensors).version == before + 2


def test_load_state_dict_refuses_with_pytorchs_text_and_loads_nothing(client):
    session = client.create_session("1d", 5)
    broken = {k: v for k, v in torch.nn.BatchNorm1d(5).state_dict().items() if k != "running_var"}
    expected = torch_error(torch.nn.BatchNorm1d(5).load_state_dict, broken)
    with pytest.raises(normserve.InvalidArgument) as info:
        session.load_state_dict(broken)
    assert expected.split("\n\t")[1] in info.value.details  # Missing key(s) in state_dict: "running_var".
    assert session.info().version == 1
    # Non-strict loading of a partial state works, as in PyTorch.
    module = torch.nn.BatchNorm1d(5)
    partial = {"weight": torch.full((5,), 2.0)}
    module.load_state_dict(partial, strict=False)
    assert_same_state(session.load_state_dict(partial, strict=False).state_dict(), module)


def test_update_and_reset_match_pytorch(client):
    module = torch.nn.BatchNorm1d(3)
    session = client.create_session_from_module(module)
    x = torch.randn(6, 3)
    with torch.no_grad():
        module(x)
    session.forward(x)
    weight = torch.tensor([0.5, 2.0, 3.0])
    with torch.no_grad():
        module.weight.copy_(weight)
    module.eps, module.momentum = 1e-3, None
    info = session.update_parameters(weight=weight.numpy(), eps=1e-3, momentum=None)
    assert (info.eps, info.momentum) == (1e-3, None)
    assert_same_state(info.state_dict(), module)
    for _ in range(2):
        x = torch.randn(6, 3)
        with torch.no_grad():
            torch.testing.assert_close(session.forward(x), module(x))
    module.reset_running_stats()
    assert_same_state(session.reset_running_stats().state_dict(), module)
    info = session.update_parameters(momentum=0.3)
    assert info.momentum == 0.3


def test_reset_without_running_statistics_does_nothing_as_in_pytorch(client):
    module = torch.nn.BatchNorm1d(3, track_running_stats=False)
    session = client.create_session_from_module(module)
    before = session.info()
    module.reset_running_stats()  # PyTorch: a no-op, no error
    after = session.reset_running_stats()
    assert after.version == before.version
    assert_same_state(after.state_dict(), module)


# --------------------------------------------------- versions and replays


def test_expected_version_is_a_compare_and_set(client):
    session = client.create_session("1d", 3)
    info = session.info()
    assert session.update_parameters(eps=1e-4, expected_version=info.version).version == info.version + 1
    stale = info.version
    with pytest.raises(normserve.Aborted) as error:
        session.update_parameters(eps=1e-2, expected_version=stale)
    assert error.value.code == grpc.StatusCode.ABORTED and str(stale) in error.value.details
    with pytest.raises(normserve.Aborted):
        session.forward(torch.randn(4, 3), expected_version=stale)
    result = session.forward_result(torch.randn(4, 3), expected_version=stale + 1)
    assert result.version == stale + 2 and result.num_batches_tracked == 1
    assert session.info().eps == 1e-4
    with pytest.raises(normserve.Aborted):
        session.delete(expected_version=stale)
    session.delete(expected_version=stale + 2)
    with pytest.raises(normserve.NotFound):
        session.info()


def test_a_repeated_request_id_is_answered_with_the_original_result(client):
    module = torch.nn.BatchNorm1d(3)
    session = client.create_session("1d", 3)
    x = torch.randn(5, 3)
    first = session.forward_result(x, request_id="step-1")
    again = session.forward_result(torch.randn(5, 3), request_id="step-1")
    assert not first.replayed and again.replayed and again.version == first.version
    torch.testing.assert_close(again.output, first.output)
    with torch.no_grad():
        torch.testing.assert_close(first.output, module(x))
    assert_same_state(session.state_dict(), module)  # applied once
    reset = session.reset_running_stats(request_id="reset-1")
    assert not reset.replayed and session.reset_running_stats(request_id="reset-1").replayed


class LostReply(grpc.RpcError):
    """What a client sees when the connection drops after the server applied
    a call: UNAVAILABLE."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection lost after the request was sent"

    def result(self):
        raise self


class LoseFirstForwardReply(grpc.UnaryUnaryClientInterceptor):
    """Lets the first Forward reach the server and be applied, then loses its
    reply."""

    def __init__(self):
        self.lost = []

    def intercept_unary_unary(self, continuation, details, request):
        outcome = continuation(details, request)
        if details.method.endswith("/Forward") and not self.lost:
            outcome.result()  # the server answered: the step was applied
            self.lost.append(request)
            return LostReply()
        return outcome


def test_retries_resend_a_lost_train_step_with_its_request_id(server):
    module = torch.nn.BatchNorm1d(3)
    x = torch.randn(5, 3)
    with grpc.insecure_channel(server.address) as channel:
        interceptor = LoseFirstForwardReply()
        retrying = normserve.Client(grpc.intercept_channel(channel, interceptor), retries=2, retry_backoff=0)
        session = retrying.create_session("1d", 3)
        result = session.forward_result(x)
        assert len(interceptor.lost) == 1 and result.replayed
        with torch.no_grad():
            torch.testing.assert_close(result.output, module(x))
        assert_same_state(session.state_dict(), module)  # the step counted once

        # Without retries the loss is the caller's to handle.
        interceptor.lost.clear()
        plain = normserve.Client(grpc.intercept_channel(channel, interceptor))
        with pytest.raises(normserve.Unavailable, match="connection lost"):
            plain.get_session(session.session_id).forward(x)


def test_a_replay_whose_output_is_no_longer_held_says_so():
    from conftest import ServerProcess

    server = ServerProcess("--replay-cache-bytes", "0")
    try:
        with normserve.connect(server.address) as client:
            module = torch.nn.BatchNorm1d(3)
            session = client.create_session("1d", 3)
            x = torch.randn(4, 3)
            with torch.no_grad():
                torch.testing.assert_close(session.forward(x, request_id="kept-not"), module(x))
            replay = session.forward_result(x, request_id="kept-not")
            assert replay.replayed and replay.output is None and replay.num_batches_tracked == 1
            with pytest.raises(normserve.ReplayWithoutOutput) as error:
                session.forward(x, request_id="kept-not")
            assert (error.value.request_id, error.value.version) == ("kept-not", 2)
            assert "already applied" in str(error.value)
            assert_same_state(session.state_dict(), module)
    finally:
        assert server.stop() == 0


def test_only_lost_races_are_retried_on_aborted():
    from normserve.client import _retryable

    class Aborted(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.ABORTED

    assert _retryable(Aborted(), bn.ForwardRequest())
    assert not _retryable(Aborted(), bn.ForwardRequest(expected_version=3))
    assert not _retryable(Aborted(), codec.SplicedRequest(bn.ForwardRequest(expected_version=3), "input",
                                                          np.zeros((2, 2), np.float32)))
    assert _retryable(LostReply(), bn.DeleteSessionRequest(expected_version=3))


# -------------------------------------------------------------------- errors


def test_errors_carry_the_servers_code_and_text(client, bn_stub):
    with pytest.raises(grpc.RpcError) as raw:
        bn_stub.GetSession(bn.GetSessionRequest(session_id="no-such-session"))
    with pytest.raises(normserve.NotFound) as error:
        client.get_session("no-such-session")
    assert error.value.code == grpc.StatusCode.NOT_FOUND == raw.value.code()
    assert error.value.details == raw.value.details() and "no-such-session" in error.value.details
    assert str(error.value) == f"NOT_FOUND: {raw.value.details()}"
    with pytest.raises(normserve.NotFound):
        client.delete_session("no-such-session")

    session = client.create_session("2d", 3)
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError) as wrong_rank:  # InvalidArgument is a ValueError, as in PyTorch
        session.forward(x)
    assert isinstance(wrong_rank.value, normserve.InvalidArgument)
    assert torch_error(torch.nn.BatchNorm2d(3), x) in wrong_rank.value.details

    sid = f"taken-{uuid.uuid4().hex}"
    assert not client.create_session("1d", 2, session_id=sid).already_existed
    assert client.create_session("1d", 2, session_id=sid).already_existed
    with pytest.raises(normserve.AlreadyExists):
        client.create_session("1d", 3, session_id=sid)
    with pytest.raises(normserve.FailedPrecondition, match="num_batches_tracked is at its maximum"):
        client.create_session("1d", 2, num_batches_tracked=2**63 - 1).forward(torch.randn(3, 2))
    with pytest.raises(ValueError, match="unknown batch norm kind"):
        client.create_session("4d", 2)


def test_every_status_code_the_server_documents_has_its_exception():
    for code, cls in [(grpc.StatusCode.INVALID_ARGUMENT, normserve.InvalidArgument),
                      (grpc.StatusCode.NOT_FOUND, normserve.NotFound),
                      (grpc.StatusCode.ALREADY_EXISTS, normserve.AlreadyExists),
                      (grpc.StatusCode.ABORTED, normserve.Aborted),
                      (grpc.StatusCode.FAILED_PRECONDITION, normserve.FailedPrecondition),
                      (grpc.StatusCode.RESOURCE_EXHAUSTED, normserve.ResourceExhausted),
                      (grpc.StatusCode.DATA_LOSS, normserve.DataLoss),
                      (grpc.StatusCode.UNAVAILABLE, normserve.Unavailable),
                      (grpc.StatusCode.INTERNAL, normserve.Internal),
                      (grpc.StatusCode.UNAUTHENTICATED, normserve.Unauthenticated),
                      (grpc.StatusCode.PERMISSION_DENIED, normserve.PermissionDenied)]:
        # Stream errors carry the google.rpc.Code number.
        error = normserve.errors.from_status(code.value[0], "text")
        assert type(error) is cls and error.code == code and error.details == "text"
    assert type(normserve.errors.from_status(2, "x")) is normserve.NormserveError  # UNKNOWN


def test_limits_surface_as_resource_exhausted():
    from conftest import ServerProcess

    server = ServerProcess("--max-tensor-elements", "64")
    try:
        with normserve.connect(server.address) as client:
            assert client.server_info().limits.max_tensor_elements == 64
            with pytest.raises(normserve.ResourceExhausted, match="max_tensor_elements"):
                client.create_session("1d", 4).forward(np.zeros((20, 4), np.float32))
    finally:
        assert server.stop() == 0


def test_server_info_mirrors_the_servers_message(client, server_stub):
    info = client.server_info()
    raw = server_stub.GetServerInfo(server_pb2.GetServerInfoRequest())
    assert info.libtorch_version == raw.libtorch_version == torch.__version__.split("+")[0]
    assert info.devices[0].name == "cpu" and info.default_device == raw.default_device
    assert info.limits.max_message_bytes == raw.limits.max_message_bytes
    assert set(info.features) == set(raw.features) and "sessions" in info.features


# ------------------------------------------------------------------- compare


def forum_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen)
    module = torch.nn.BatchNorm1d(5)
    mine = (x - x.mean(0)) / torch.sqrt(x.var(0) + module.eps) * module.weight.detach() + module.bias.detach()
    return x, module, mine


def test_compare_report_names_the_mistake_and_prints_it(client):
    x, module, mine = forum_problem()
    report = client.compare(x, module=module, candidate=mine)
    truth = F.batch_norm(x.double(), None, None, training=True, eps=module.eps)
    candidate = report["candidate"]["output"].vs_float64_reference
    assert candidate.max_abs_diff == pytest.approx(float((mine.double() - truth).abs().max()), rel=1e-9)
    assert not candidate.allclose
    assert report["reference"]["output"].vs_float64_reference.allclose
    best = report.diagnosis.best
    assert best.name == "unbiased_variance" == report.diagnosis.hypotheses[0].name
    assert not report.diagnosis.matches_reference

    text = str(report)
    flat = " ".join(text.split())
    rows = {tuple(line.split()[:2]): line for line in text.splitlines() if line.split()[:2]}
    for name in ("reference", "float64_reference", "manual_biased", "manual_unbiased", "candidate"):
        assert (name, "output") in rows, text
    assert f"{candidate.max_abs_diff:.3g}" in rows[("candidate", "output")]
    assert f"NO ({candidate.mismatched_elements} off)" in rows[("candidate", "output")]
    assert "does NOT match the reference" in text
    assert " ".join(report.diagnosis.summary.split()) in flat
    assert re.search(r"unbiased_variance\s+explains", text)
    assert best.fix in flat and best.explanation in flat
    for sentence in report.diagnosis.ambiguities:
        assert sentence in flat


def test_compare_module_argument_is_the_same_as_its_parts(client):
    x, module, mine = forum_problem()
    with torch.no_grad():
        module(torch.randn(4, 5))  # running statistics away from 0 and 1
    by_module = client.compare(x, module=module, candidate={"output": mine})
    by_parts = client.compare(
        x, weight=module.weight, bias=module.bias, running_mean=module.running_mean,
        running_var=module.running_var, num_batches_tracked=1, training=True, eps=module.eps,
        momentum=module.momentum, candidate=mine)
    assert by_module.proto == by_parts.proto
    # Eval mode, taken from the module too.
    module.eval()
    with torch.no_grad():
        expected = module(x)
    report = client.compare(x.numpy(), module=module, return_tensors=True,
                            implementations=["reference", "float64_reference"])
    assert list(report.implementations) == ["reference", "float64_reference"]
    assert report.diagnosis is None and "Diagnosis" not in str(report)
    values = report["reference"]["output"].values
    assert isinstance(values, np.ndarray)
    torch.testing.assert_close(torch.from_numpy(np.array(values)), expected)


def test_compare_refuses_unknown_candidate_parts_and_reports_server_errors(client):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="unknown part"):
        client.compare(x, candidate={"outptu": x})
    with pytest.raises(normserve.InvalidArgument, match="rtol, atol: set both or neither"):
        client.compare(x, rtol=1e-3)


# --------------------------------------------------------- RemoteBatchNorm


def small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2, momentum=None, eps=1e-3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
        model[1].bias.normal_()
    return model


def test_remote_batch_norm_is_a_drop_in_replacement(client):
    model = small_model()
    remote = convert_batch_norms(copy.deepcopy(model), client, labels=unique_labels())
    assert isinstance(remote[1], RemoteBatchNorm2d) and isinstance(remote[4], RemoteBatchNorm2d)
    assert remote[4].momentum is None and remote[4].eps == 1e-3
    assert not list(remote[1].parameters())  # nothing local for an optimizer to step
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for training in [True, True, False, True, False]:
            model.train(training)
            remote.train(training)
            x = torch.randn(4, 3, 5, 5, generator=gen)
            torch.testing.assert_close(remote(x), model(x))
    assert list(remote.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(remote.state_dict()[key], value)
    torch.testing.assert_close(remote[1].running_var, model[1].running_var)
    torch.testing.assert_close(remote[1].weight, model[1].weight.detach())
    assert int(remote[4].num_batches_tracked) == 3


def test_remote_and_local_state_dicts_load_into_each_other(client):
    model = small_model()
    remote = convert_batch_norms(copy.deepcopy(model), client)
    trained = small_model()
    with torch.no_grad():
        trained[1].running_mean.normal_()
        trained[4].num_batches_tracked.fill_(9)
    remote.load_state_dict(trained.state_dict())  # local -> remote
    fresh = small_model()
    fresh.load_state_dict(remote.state_dict())  # remote -> local
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        for module in (trained, remote, fresh):
            module.eval()
        torch.testing.assert_close(remote(x), trained(x))
        torch.testing.assert_close(fresh(x), trained(x))


def test_remote_load_state_dict_fails_as_pytorch_does(client):
    model = small_model()
    remote = convert_batch_norms(copy.deepcopy(model), client)
    broken = model.state_dict()
    del broken["1.running_var"]
    broken["1.extra"] = torch.ones(1)
    broken["4.weight"] = torch.ones(3)
    broken["4.bias"] = torch.full((2,), 5.0)
    messages = []
    for module in (model, remote):
        with pytest.raises(RuntimeError) as error:
            module.load_state_dict(broken)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    # PyTorch copies the valid keys before raising; so does the drop-in.
    for key, value in model.state_dict().items():
        torch.testing.assert_close(remote.state_dict()[key], value)
    assert torch.equal(remote.state_dict()["4.bias"], torch.full((2,), 5.0))


@pytest.mark.parametrize("remote_cls,local_cls,shape", [
    (RemoteBatchNorm1d, torch.nn.BatchNorm1d, (6, 3)),
    (RemoteBatchNorm1d, torch.nn.BatchNorm1d, (6, 3, 4)),
    (RemoteBatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 2, 2)),
])
def test_remote_modules_take_nn_batchnorms_arguments(client, remote_cls, local_cls, shape):
    remote = remote_cls(3, 1e-4, 0.3, dtype=torch.float64, client=client)
    local = local_cls(3, 1e-4, 0.3, dtype=torch.float64)
    with torch.no_grad():
        for step in range(4):
            if step == 2:  # attributes set on the module reach the session
                remote.momentum = local.momentum = None
                remote.eps = local.eps = 1e-2
            x = torch.randn(shape, dtype=torch.float64)
            torch.testing.assert_close(remote(x), local(x), **TOLERANCE[torch.float64])
        remote.eval()
        local.eval()
        x = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(remote(x), local(x), **TOLERANCE[torch.float64])
    info = remote.session.info()
    assert (info.momentum, info.eps, info.dtype) == (None, 1e-2, "float64")
    assert repr(remote).startswith(f"{remote_cls.__name__}(3, eps=0.01, momentum=None")
    remote.reset_parameters()
    local.reset_parameters()
    assert_same_state(remote.state_dict(), local, torch.float64)


def test_remote_forward_refuses_to_silently_drop_gradients(client):
    remote = RemoteBatchNorm2d(2, client=client)
    x = torch.randn(3, 2, 2, 2, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        remote(x)
    with torch.no_grad():
        assert remote(x).shape == x.shape
    with pytest.raises(TypeError, match="expects a BatchNorm2d"):
        RemoteBatchNorm2d.from_module(torch.nn.BatchNorm1d(2), client=client)
    attached = RemoteBatchNorm2d.from_session(client.get_session(remote.session.session_id))
    assert attached.session == remote.session
    with pytest.raises(TypeError, match="needs a 1d session"):
        RemoteBatchNorm1d.from_session(remote.session)
    with pytest.raises(TypeError, match="its state lives in normserve session"):
        copy.deepcopy(torch.nn.Sequential(remote))


# --------------------------------------------------------------------- codec


RAW_CASES = [(np.float32, "<f"), (np.float64, "<d"), (np.float16, "<e")]


@pytest.mark.parametrize("np_dtype,fmt", RAW_CASES)
def test_codec_sends_row_major_little_endian_bytes(np_dtype, fmt):
    values = np.array([[1.5, -2.25, 3.0], [0.1, 1e3, -0.0]], dtype=np_dtype)
    for x in [values, values.T, values.astype(values.dtype.newbyteorder(">")), torch.from_numpy(values).t()]:
        flat = [float(v) for v in np.asarray(x).reshape(-1)]  # row-major by definition
        message = codec.encode(x)
        assert message.raw == struct.pack(f"{fmt[0]}{len(flat)}{fmt[1]}", *flat)
        assert list(message.shape) == list(np.asarray(x).shape)
        header, raw = codec.encode_parts(x)
        assert raw.tobytes() == message.raw and list(header.shape) == list(message.shape)
    for x in [values, torch.from_numpy(values)]:
        typed = codec.encode(x, typed=True)
        field = typed.double_values if np_dtype == np.float64 else typed.float_values
        assert list(field.values) == [float(v) for v in np.asarray(values, np.float32 if np_dtype != np.float64
                                                                   else np.float64).reshape(-1)]
        assert typed.dtype == codec.wire_dtype(np_dtype)


def test_codec_round_trips_every_dtype_and_shape():
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for shape in [(), (0, 3), (2, 3, 4)]:
            x = torch.randn(shape).to(dtype)
            for typed in (False, True):
                back = codec.to_torch(codec.encode(x, typed=typed))
                assert back.dtype == dtype and back.shape == x.shape
                assert torch.equal(back, x)
                if dtype != torch.bfloat16:
                    array = codec.to_numpy(codec.encode(x.numpy(), typed=typed))
                    assert array.dtype == x.numpy().dtype and np.array_equal(array, x.numpy())


def test_codec_bfloat16_bits_are_pytorchs():
    x = torch.tensor([1.5, -2.0, 0.15625, 3.0e38], dtype=torch.bfloat16)
    # bfloat16 is the upper half of float32: these values are exact in it.
    expected = b"".join(struct.pack("<f", float(v))[2:] for v in x.float())
    assert codec.encode(x).raw == expected
    with pytest.raises(TypeError, match="numpy has no bfloat16"):
        codec.to_numpy(codec.encode(x))


def test_codec_typed_values_round_to_nearest_even_like_pytorch():
    values = [0.1, 1 / 3, 65519.0, 2.0 ** -20, 1.0 + 2.0 ** -11]
    for dtype in (torch.float16, torch.bfloat16):
        message = tensor_pb2.Tensor(dtype=codec.wire_dtype(dtype), shape=[5])
        message.double_values.values.extend(values)
        expected = torch.tensor(values, dtype=torch.float64).to(dtype)
        assert torch.equal(codec.to_torch(message), expected)
        if dtype == torch.float16:
            assert np.array_equal(codec.to_numpy(message), expected.numpy())


def test_codec_errors_are_clear():
    with pytest.raises(TypeError, match="unsupported dtype int64.*float32, float64, float16 or bfloat16"):
        codec.encode(np.arange(3))
    with pytest.raises(TypeError, match="unsupported dtype torch.int32"):
        codec.encode(torch.arange(3, dtype=torch.int32))
    short = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2, 3], raw=b"\0" * 20)
    with pytest.raises(ValueError, match=r"raw holds 20 bytes, shape \(2, 3\) of float32 needs 24"):
        codec.to_numpy(short)
    with pytest.raises(ValueError, match="carries no values"):
        codec.to_torch(tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1]))
    with pytest.raises(ValueError, match="raw values need a dtype"):
        codec.to_numpy(tensor_pb2.Tensor(shape=[1], raw=b"\0\0\0\0"))


def test_decoded_numpy_shares_the_reply_and_torch_owns_its_memory():
    message = codec.encode(np.arange(6, dtype=np.float32).reshape(2, 3))
    view = codec.to_numpy(message)
    assert not view.flags.writeable and isinstance(view.base, (bytes, np.ndarray))
    assert codec.to_numpy(message, copy=True).flags.writeable
    tensor = codec.to_torch(message)
    tensor[0, 0] = 42.0
    assert codec.to_numpy(message)[0, 0] == 0.0


@pytest.mark.parametrize("shape", [(), (0, 4), (3, 4), (70, 128), (600, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_spliced_requests_parse_as_the_same_message(shape, dtype):
    # Sizes cross the one-, two- and three-byte length varints.
    x = torch.randn(shape).to(dtype)
    fields = dict(session_id="s-1", mode=bn.MODE_TRAIN, request_id="r", expected_version=300)
    for sent in [x, x.t() if x.dim() == 2 else x]:
        plain = bn.ForwardRequest(input=codec.encode(sent), **fields)
        spliced = codec.SplicedRequest(bn.ForwardRequest(**fields), "input", sent)
        assert bn.ForwardRequest.FromString(spliced.SerializeToString()) == plain
    with pytest.raises(ValueError, match="already set"):
        codec.SplicedRequest(plain, "input", x)


# ------------------------------------------------------- TLS and the token


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A CA, a server certificate for the name normserve.test (only), and a
    client certificate, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: the TLS tests need it to make certificates")
    d = tmp_path_factory.mktemp("tls")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", cwd=d)
    for name, ext in [("server", "subjectAltName=DNS:normserve.test\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")]:
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)
    return d


class RecordingServerService(server_pb2_grpc.ServerServiceServicer):
    """GetServerInfo that records each call's metadata."""

    def __init__(self):
        self.metadata = []

    def GetServerInfo(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return server_pb2.GetServerInfoResponse(server_version="recording", store="none")


@contextlib.contextmanager
def recording_server(credentials=None):
    servicer = RecordingServerService()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    server_pb2_grpc.add_ServerServiceServicer_to_server(servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_the_token_travels_as_bearer_metadata_on_every_call():
    with recording_server() as (address, servicer):
        with normserve.connect(address, token="s3cr3t-t0ken") as client:
            assert client.server_info().server_version == "recording"
            client.server_info()
        with normserve.connect(address) as client:
            client.server_info()
    assert [m.get("authorization") for m in servicer.metadata] == [
        "Bearer s3cr3t-t0ken", "Bearer s3cr3t-t0ken", None]
    for bad in ["", "two words", "line\nbreak", 42]:
        with pytest.raises(ValueError, match="token"):
            normserve.connect("127.0.0.1:1", token=bad)


def test_tls_verifies_the_server_and_presents_the_client_certificate(certificates):
    d = certificates
    server_credentials = grpc.ssl_server_credentials(
        [((d / "server.key").read_bytes(), (d / "server.pem").read_bytes())],
        root_certificates=(d / "ca.pem").read_bytes(), require_client_auth=True)
    with recording_server(server_credentials) as (address, servicer):
        # Paths as str and Path, and bytes, all work; the certificate names
        # normserve.test, not the address.
        mutual = normserve.TLSConfig(root_certificates=str(d / "ca.pem"),
                                     client_certificate=(d / "client.pem").read_bytes(),
                                     client_key=d / "client.key", server_name="normserve.test")
        with normserve.connect(address, token="tok", tls=mutual, timeout=30) as client:
            assert client.server_info().server_version == "recording"
        assert servicer.metadata[-1]["authorization"] == "Bearer tok"

        # Without the server name override the certificate does not match.
        wrong_name = normserve.TLSConfig(root_certificates=d / "ca.pem", client_certificate=d / "client.pem",
                                         client_key=d / "client.key")
        # Without a client certificate the server refuses the handshake.
        anonymous = normserve.TLSConfig(root_certificates=d / "ca.pem", server_name="normserve.test")
        # Trusting another CA (the system's) fails verification.
        for tls in (wrong_name, anonymous, True):
            with normserve.connect(address, tls=tls, timeout=10) as client:
                with pytest.raises(normserve.Unavailable):
                    client.server_info()
    assert len(servicer.metadata) == 1


def test_tls_settings_are_validated():
    with pytest.raises(ValueError, match="client_certificate and client_key go together"):
        normserve.connect("127.0.0.1:1", tls=normserve.TLSConfig(client_certificate=b"x"))
    with pytest.raises(ValueError, match="root_certificates: cannot read '/no/such/ca.pem'"):
        normserve.connect("127.0.0.1:1", tls=normserve.TLSConfig(root_certificates="/no/such/ca.pem"))
    with pytest.raises(TypeError, match="tls: expected None, True or a TLSConfig"):
        normserve.connect("127.0.0.1:1", tls="ca.pem")


# ------------------------------------------------- stubs, packaging, README


def test_checked_in_stubs_are_what_the_proto_generates(tmp_path):
    subprocess.run([os.path.join(CLIENT_DIR, "generate.sh"), str(tmp_path)], check=True,
                   env={**os.environ, "PYTHON": sys.executable}, capture_output=True)
    generated = tmp_path / "normserve" / "v1"
    shipped = os.path.join(CLIENT_DIR, "normserve", "v1")
    names = sorted(os.listdir(generated))
    assert names and sorted(n for n in os.listdir(shipped) if "_pb2" in n) == names, \
        "stubs differ from proto/: run clients/python/generate.sh"
    match, mismatch, errors = filecmp.cmpfiles(generated, shipped, names, shallow=False)
    assert not mismatch and not errors, f"stale stubs {mismatch + errors}: run clients/python/generate.sh"


def test_the_package_installs_with_pip_and_ships_its_stubs(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(source)],
                   check=True, capture_output=True)
    probe = ("import normserve, normserve.aio, normserve.torch, normserve.v1.batch_norm_pb2_grpc as g, os; "
             "print(normserve.__file__); print(normserve.__version__); "
             "print(sorted(os.listdir(os.path.dirname(g.__file__)) + os.listdir(os.path.dirname(normserve.__file__))))")
    done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "PYTHONPATH": str(target)},
                          cwd=tmp_path, check=True, capture_output=True, text=True)
    where, version, files = done.stdout.splitlines()
    assert where.startswith(str(target)) and version == normserve.__version__
    assert "batch_norm_pb2.py" in files and "batch_norm_pb2.pyi" in files and "__init__.py" in files
    assert "py.typed" in files and "aio.py" in files  # PEP 561: type checkers use the package's hints


def readme_python_client_example():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text.split("### Python client", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_python_client_example_runs(server):
    code = readme_python_client_example().replace("127.0.0.1:50051", server.address)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert re.search(r"unbiased_variance\s+explains", out.getvalue()), out.getvalue()


def test_state_keys_follow_pytorchs_order():
    expected = list(torch.nn.BatchNorm1d(2).state_dict())
    assert list(normserve.session.STATE_KEYS) == expected
    shuffled = dict(reversed(torch.nn.BatchNorm1d(2).state_dict().items()))
    loaded = normserve.session.state_dict_from_safetensors(safetensors.torch.save(shuffled))
    assert isinstance(loaded, collections.OrderedDict) and list(loaded) == expected
