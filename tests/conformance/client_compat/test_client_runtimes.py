"""The Python client, blocking and asyncio, on whatever grpcio and protobuf
this environment has (`make test` runs these with the oldest and the newest
the client supports): the generated stubs import cleanly, and every kind of
call works against the real server. No torch here: the oracle is the batch
norm formula written out in numpy (float64), as PyTorch defines it — biased
variance to normalize, unbiased variance in running_var.

These run in small environments without torch (scripts/client-envs.sh),
where `make test` runs them with `--confcutdir` on this folder so that the
torch-based conftest above is not loaded, and in the main test environment
as well; so this folder has no conftest of its own, and its fixtures are
here. NORMSERVE_EXPECT_RUNTIME ("grpcio==X protobuf==Y"), when set, is the
runtime the environment must have: it makes sure the tests ran where they
were meant to."""

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import uuid

import grpc
import numpy as np
import pytest
from google import protobuf

CLIENT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "clients", "python"))
if CLIENT_DIR not in sys.path:
    sys.path.insert(0, CLIENT_DIR)

import normserve  # noqa: E402
import normserve.aio  # noqa: E402

assert normserve.__file__.startswith(CLIENT_DIR), f"normserve imported from {normserve.__file__}, not {CLIENT_DIR}"


class Server:
    """A normserve process on an ephemeral loopback port (NORMSERVE_BIN)."""

    def __init__(self, *args):
        binary = os.environ.get("NORMSERVE_BIN", "target/release/normserve")
        self.data_dir = tempfile.mkdtemp(prefix="normserve-compat-")
        self.proc = subprocess.Popen([binary, "--listen", "127.0.0.1:0", "--data-dir", self.data_dir, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The server prints one line once it is bound; no sleeps, no polling.
        line = self.proc.stdout.readline()
        if not line.startswith("normserve listening on "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.address = line.split()[3]
        for stream in (self.proc.stdout, self.proc.stderr):  # a full pipe would block the server
            threading.Thread(target=lambda s=stream: [None for _ in s], daemon=True).start()

    def stop(self):
        self.proc.terminate()
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def compat_server():
    server = Server("--compute-threads", "2")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="session")
def compat_client(compat_server):
    with normserve.connect(compat_server.address) as client:
        client.wait_ready(timeout=30)
        yield client


class Oracle:
    """nn.BatchNorm{1,2,3}d(C, eps, momentum) with weight, bias and running
    statistics, in float64 numpy."""

    def __init__(self, c, eps=1e-5, momentum=0.1, weight=None, bias=None):
        self.eps, self.momentum = eps, momentum
        self.weight = np.ones(c) if weight is None else np.asarray(weight, np.float64)
        self.bias = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
        self.running_mean, self.running_var, self.num_batches_tracked = np.zeros(c), np.ones(c), 0

    def __call__(self, x, train):
        x = np.asarray(x, np.float64)
        axes = tuple(i for i in range(x.ndim) if i != 1)
        shape = [1, -1] + [1] * (x.ndim - 2)
        if train:
            mean, var = x.mean(axes), x.var(axes)
            n = x.size // x.shape[1]
            self.num_batches_tracked += 1
            factor = 1 / self.num_batches_tracked if self.momentum is None else self.momentum
            self.running_mean = (1 - factor) * self.running_mean + factor * mean
            self.running_var = (1 - factor) * self.running_var + factor * var * n / (n - 1)
        else:
            mean, var = self.running_mean, self.running_var
        normalized = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + self.eps)
        return normalized * self.weight.reshape(shape) + self.bias.reshape(shape)


TOLERANCE = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}


def check_state(info, oracle, dtype):
    assert info.num_batches_tracked == oracle.num_batches_tracked
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = getattr(info, name)
        assert value.dtype == dtype, name
        np.testing.assert_allclose(value, getattr(oracle, name), **TOLERANCE[dtype], err_msg=name)


def labels():
    return {"compat": uuid.uuid4().hex}


def test_the_runtime_is_the_one_asked_for():
    expected = os.environ.get("NORMSERVE_EXPECT_RUNTIME")
    if not expected:
        pytest.skip("NORMSERVE_EXPECT_RUNTIME is not set (make test sets it for the oldest/newest runs)")
    assert f"grpcio=={grpc.__version__} protobuf=={protobuf.__version__}" == expected


def test_the_stubs_and_the_client_import_without_warnings():
    code = ("import warnings; warnings.simplefilter('error'); import normserve, normserve.aio; "
            "from normserve.v1 import batch_norm_pb2_grpc, compare_pb2_grpc, server_pb2_grpc, tensor_pb2_grpc")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": CLIENT_DIR},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 3), (3, 3, 2, 2, 2)])
def test_blocking_sessions_follow_the_formula(compat_client, dtype, shape):
    rng = np.random.default_rng(len(shape))
    weight, bias = rng.uniform(0.5, 1.5, 3), rng.standard_normal(3)
    oracle = Oracle(3, momentum=0.2, weight=weight, bias=bias)
    kind = f"{max(len(shape) - 2, 1)}d"
    session = compat_client.create_session(kind, 3, momentum=0.2, dtype=dtype, weight=weight.astype(dtype),
                                           bias=bias.astype(dtype), labels=labels())
    for train in [True, True, False, True, False]:
        x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
        y = session.forward(x, train=train)
        assert y.dtype == dtype and y.shape == x.shape
        np.testing.assert_allclose(y, oracle(x.astype(np.float64), train), **TOLERANCE[dtype])
    check_state(session.info(), oracle, dtype)
    session.delete()


def test_blocking_state_moves_and_updates(compat_client):
    rng = np.random.default_rng(3)
    oracle = Oracle(4, momentum=None)
    source = compat_client.create_session("1d", 4, momentum=None, dtype=np.float64)
    for _ in range(3):
        x = rng.standard_normal((5, 4))
        np.testing.assert_allclose(source.forward(x), oracle(x, True), **TOLERANCE[np.float64])
    copy = compat_client.create_session("1d", 4, momentum=None, dtype=np.float64)
    copy.import_state(source.export_state().safetensors)
    check_state(copy.info(), oracle, np.float64)
    info = copy.update_parameters(eps=1e-3, weight=np.full(4, 2.0), momentum=0.5)
    assert (info.eps, info.momentum, info.version) == (1e-3, 0.5, 3)
    oracle.eps, oracle.momentum, oracle.weight = 1e-3, 0.5, np.full(4, 2.0)
    x = rng.standard_normal((6, 4))
    np.testing.assert_allclose(copy.forward(x, request_id="r1"), oracle(x, True), **TOLERANCE[np.float64])
    assert copy.forward_result(x, request_id="r1").replayed
    copy.reset_running_stats()
    oracle.running_mean, oracle.running_var, oracle.num_batches_tracked = np.zeros(4), np.ones(4), 0
    check_state(copy.info(), oracle, np.float64)
    with pytest.raises(normserve.Aborted):
        copy.update_parameters(eps=1e-2, expected_version=1)


def test_blocking_stream_listing_compare_and_info(compat_client):
    rng = np.random.default_rng(4)
    tag = labels()
    session = compat_client.create_session("2d", 3, labels=tag, session_id=f"c-{uuid.uuid4().hex}")
    oracle = Oracle(3)
    xs = [rng.standard_normal((4, 3, 2, 2)).astype(np.float32) for _ in range(4)]
    bad = np.zeros((4, 5, 2, 2), np.float32)
    outputs = list(session.forward_stream([xs[0], bad, *xs[1:]], return_exceptions=True))
    assert isinstance(outputs[1], normserve.InvalidArgument) and outputs[1].index == 1
    for y, x in zip([outputs[0], *outputs[2:]], xs):
        np.testing.assert_allclose(y, oracle(x, True), **TOLERANCE[np.float32])
    listed = list(compat_client.list_sessions(tag, include_tensors=True))
    assert [info.session_id for info in listed] == [session.session_id] and listed[0].labels == tag
    assert listed[0].created_at is not None and listed[0].created_at.tzinfo is not None
    check_state(listed[0], oracle, np.float32)

    x = rng.standard_normal((6, 5)) * 2
    mine = (x - x.mean(0)) / np.sqrt(x.var(0, ddof=1) + 1e-5)
    report = compat_client.compare(x, candidate=mine)
    assert report.diagnosis.best.name == "unbiased_variance" and "unbiased_variance" in str(report)
    info = compat_client.server_info()
    assert info.server_version and info.limits.max_num_features > 0
    assert compat_client.health() == "SERVING"


def test_errors_map_to_the_same_exceptions_in_both_clients(compat_server, compat_client):
    sid = f"taken-{uuid.uuid4().hex}"
    compat_client.create_session("1d", 2, session_id=sid)
    wrong_channels = np.zeros((3, 5), np.float32)

    def blocking():
        yield lambda: compat_client.get_session("no-such-session")
        yield lambda: compat_client.create_session("1d", 2).forward(wrong_channels)
        yield lambda: compat_client.create_session("1d", 3, session_id=sid)

    async def asyncio_calls():
        async with normserve.aio.connect(compat_server.address) as client:
            raised = []
            for call in [lambda: client.get_session("no-such-session"),
                         lambda: forward_new(client),
                         lambda: client.create_session("1d", 3, session_id=sid)]:
                with pytest.raises(normserve.NormserveError) as error:
                    await call()
                raised.append(error.value)
            return raised

    async def forward_new(client):
        await (await client.create_session("1d", 2)).forward(wrong_channels)

    expected = []
    for call in blocking():
        with pytest.raises(normserve.NormserveError) as error:
            call()
        expected.append(error.value)
    raised = asyncio.run(asyncio_calls())
    assert [type(e) for e in raised] == [type(e) for e in expected] == [
        normserve.NotFound, normserve.InvalidArgument, normserve.AlreadyExists]
    assert [(e.code, e.details) for e in raised] == [(e.code, e.details) for e in expected]


def test_asyncio_sessions_follow_the_formula_concurrently(compat_server):
    rng = np.random.default_rng(5)
    batches = [[rng.standard_normal((8, 3)).astype(np.float32) for _ in range(4)] for _ in range(5)]

    async def train(client, xs):
        session = await client.create_session("1d", 3)
        return session, [await session.forward(x) for x in xs]

    async def scenario():
        async with normserve.aio.connect(compat_server.address) as client:
            trained = await asyncio.gather(*(train(client, xs) for xs in batches))
            probes = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(10)]
            first = trained[0][0]
            evals = await asyncio.gather(*(first.forward(x, train=False) for x in probes))
            infos = await asyncio.gather(*(session.info() for session, _ in trained))
            outputs = [y async for y in first.forward_stream(probes[:3], train=False)]
            assert await client.health() == "SERVING"
            await asyncio.gather(*(session.delete() for session, _ in trained))
            return trained, probes, evals, infos, outputs

    trained, probes, evals, infos, outputs = asyncio.run(scenario())
    for (_, ys), xs, info in zip(trained, batches, infos):
        oracle = Oracle(3)
        for y, x in zip(ys, xs):
            np.testing.assert_allclose(y, oracle(x, True), **TOLERANCE[np.float32])
        check_state(info, oracle, np.float32)
    oracle = Oracle(3)
    for x in batches[0]:
        oracle(x, True)
    for y, x in zip(evals + outputs, probes + probes[:3]):
        np.testing.assert_allclose(y, oracle(x, False), **TOLERANCE[np.float32])


class Boom(Exception):
    pass


def test_temporary_sessions_are_gone_after_the_block(compat_server, compat_client):
    made = []
    with compat_client.temporary_session("1d", 2) as session:
        made.append(session.session_id)
    with pytest.raises(Boom):
        with compat_client.temporary_session("1d", 2) as session:
            made.append(session.session_id)
            raise Boom()

    async def scenario():
        async with normserve.aio.connect(compat_server.address) as client:
            async with client.temporary_session("1d", 2) as session:
                made.append(session.session_id)
            with pytest.raises(Boom):
                async with client.temporary_session("1d", 2) as session:
                    made.append(session.session_id)
                    raise Boom()

    asyncio.run(scenario())
    assert len(set(made)) == 4
    for session_id in made:
        with pytest.raises(normserve.NotFound):
            compat_client.get_session(session_id)
