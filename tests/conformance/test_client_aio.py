"""The asyncio client (normserve.aio) against the real server, with PyTorch
as the oracle: sessions step after step, concurrent calls with
asyncio.gather, streams, state dicts, the same exceptions as the blocking
client, temporary sessions (both clients) gone after the block whether it
ends or raises, health next to grpcio-health-checking's own client."""

import asyncio
import uuid

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import normserve
import normserve.aio

from sessions import TOLERANCE, torch_error

MODULES = {"1d": torch.nn.BatchNorm1d, "2d": torch.nn.BatchNorm2d, "3d": torch.nn.BatchNorm3d}
SHAPES = {"1d": (6, 3), "2d": (4, 3, 2, 3), "3d": (3, 3, 2, 2, 2)}


def run(coroutine):
    return asyncio.run(coroutine)


def assert_same_state(state, module, dtype=torch.float32):
    expected = module.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype, key
        torch.testing.assert_close(state[key], value, **TOLERANCE[dtype])


def labels():
    return {"test": uuid.uuid4().hex}


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_aio_session_matches_pytorch_step_after_step(server, kind, dtype):
    gen = torch.Generator().manual_seed(7)
    module = MODULES[kind](3, momentum=0.3).to(dtype)

    async def steps():
        async with normserve.aio.connect(server.address) as client:
            session = await client.create_session(kind, 3, momentum=0.3, dtype=dtype)
            for step, form in [("train", "torch"), ("train", "numpy"), ("eval", "torch"), ("train", "torch"),
                               ("eval", "numpy")]:
                if form == "numpy" and dtype == torch.bfloat16:
                    form = "torch"  # numpy has no bfloat16
                x = (torch.randn(SHAPES[kind], generator=gen) * 2 + 1).to(dtype)
                module.train(step == "train")
                with torch.no_grad():
                    expected = module(x)
                got = await session.train(step == "train").forward(x.numpy() if form == "numpy" else x)
                assert type(got) is (np.ndarray if form == "numpy" else torch.Tensor)
                torch.testing.assert_close(torch.as_tensor(np.array(got)) if form == "numpy" else got, expected,
                                           **TOLERANCE[dtype])
                assert_same_state(await session.state_dict(), module, dtype)
            info = await session.info()
            assert info.num_batches_tracked == 3 and info.version == 4
            await session.delete()

    run(steps())


def test_aio_calls_run_concurrently_with_gather(server):
    gen = torch.Generator().manual_seed(11)
    modules = [torch.nn.BatchNorm1d(4, momentum=0.2) for _ in range(6)]
    batches = [[torch.randn(8, 4, generator=gen) for _ in range(5)] for _ in modules]
    probes = [torch.randn(5, 4, generator=gen) for _ in range(20)]

    async def train(client, module, xs):
        session = await client.create_session("1d", 4, momentum=0.2, labels=tag)
        outputs = [await session.forward(x) for x in xs]  # in order: each step needs the one before
        return session, outputs

    async def scenario():
        async with normserve.aio.connect(server.address) as client:
            trained = await asyncio.gather(*(train(client, m, xs) for m, xs in zip(modules, batches)))
            for (session, outputs), module, xs in zip(trained, modules, batches):
                for got, x in zip(outputs, xs):
                    with torch.no_grad():
                        torch.testing.assert_close(got, module.train()(x))
            # Many evals of one session at once, and reads of all of them.
            first, module = trained[0][0], modules[0]
            outputs = await asyncio.gather(*(first.forward(x, train=False) for x in probes))
            with torch.no_grad():
                for got, x in zip(outputs, probes):
                    torch.testing.assert_close(got, module.eval()(x))
            states = await asyncio.gather(*(session.state_dict() for session, _ in trained))
            for state, module in zip(states, modules):
                assert_same_state(state, module)
            listed = [info.session_id async for info in client.list_sessions(tag, page_size=4)]
            assert listed == sorted(session.session_id for session, _ in trained)
            await asyncio.gather(*(session.delete() for session, _ in trained))
            assert [info async for info in client.list_sessions(tag)] == []

    tag = labels()
    run(scenario())


def test_aio_stream_keeps_order_and_takes_async_iterables(server):
    module = torch.nn.BatchNorm2d(3)
    xs = [torch.randn(4, 3, 2, 2) for _ in range(6)]

    async def produce():
        for x in xs:
            await asyncio.sleep(0)
            yield x

    async def scenario():
        async with normserve.aio.connect(server.address) as client:
            session = await client.create_session("2d", 3)
            outputs = [y async for y in session.forward_stream(produce())]
            with torch.no_grad():
                for got, x in zip(outputs, xs):
                    torch.testing.assert_close(got, module(x))
            # A refused input is answered in-band, and the stream goes on.
            bad = torch.randn(4, 5, 2, 2)
            results = [y async for y in session.forward_stream([xs[0], bad, xs[1]], train=False,
                                                                return_exceptions=True)]
            assert isinstance(results[1], normserve.InvalidArgument) and results[1].index == 1
            with torch.no_grad():
                torch.testing.assert_close(results[0], module.eval()(xs[0]))
                torch.testing.assert_close(results[2], module.eval()(xs[1]))
            with pytest.raises(normserve.InvalidArgument):
                async for _ in session.forward_stream([bad]):
                    pass
            assert len(outputs) == len(xs)

    run(scenario())


def test_aio_state_update_reset_and_replays_match_pytorch(server):
    trained = torch.nn.BatchNorm1d(3, momentum=None)
    with torch.no_grad():
        for _ in range(3):
            trained(torch.randn(7, 3) * 3 + 2)
        trained.weight.uniform_(0.5, 1.5)

    async def scenario():
        async with normserve.aio.connect(server.address, retries=2) as client:
            session = await client.create_session_from_module(trained)
            assert_same_state(await session.state_dict(), trained)
            other = await client.create_session("1d", 3, momentum=None)
            await other.import_state((await session.export_state()).safetensors)
            assert_same_state(await other.state_dict(), trained)
            fresh = torch.nn.BatchNorm1d(3, momentum=None)
            fresh.load_state_dict(trained.state_dict())
            info = await other.update_parameters(eps=1e-3, momentum=0.5, weight=torch.full((3,), 2.0))
            assert (info.eps, info.momentum) == (1e-3, 0.5)
            fresh.eps, fresh.momentum = 1e-3, 0.5
            with torch.no_grad():
                fresh.weight.fill_(2.0)
                x = torch.randn(5, 3)
                torch.testing.assert_close(await other.forward(x, request_id="once"), fresh(x))
            replay = await other.forward_result(x, request_id="once")
            assert replay.replayed
            fresh.reset_running_stats()
            await other.reset_running_stats()
            assert_same_state(await other.state_dict(), fresh)
            with pytest.raises(normserve.Aborted):
                await other.update_parameters(eps=1e-2, expected_version=1)
            await other.load_state_dict(trained.state_dict())
            assert_same_state(await other.state_dict(), trained)

    run(scenario())


def test_aio_errors_are_the_blocking_clients(server, client):
    x = torch.randn(4, 3, 2)
    sid = f"taken-{uuid.uuid4().hex}"
    client.create_session("1d", 2, session_id=sid)
    blocking = []
    for call in [lambda: client.get_session("no-such-session"),
                 lambda: client.create_session("2d", 3).forward(x),
                 lambda: client.create_session("1d", 3, session_id=sid),
                 lambda: client.delete_session("no-such-session")]:
        with pytest.raises(normserve.NormserveError) as error:
            call()
        blocking.append(error.value)

    async def scenario():
        async with normserve.aio.connect(server.address) as aio_client:
            raised = []
            for call in [lambda: aio_client.get_session("no-such-session"),
                         lambda: forward_on_new(aio_client),
                         lambda: aio_client.create_session("1d", 3, session_id=sid),
                         lambda: aio_client.delete_session("no-such-session")]:
                with pytest.raises(normserve.NormserveError) as error:
                    await call()
                raised.append(error.value)
            with pytest.raises(ValueError, match="unknown batch norm kind"):
                await aio_client.create_session("4d", 2)
            return raised

    async def forward_on_new(aio_client):
        session = await aio_client.create_session("2d", 3)
        await session.forward(x)

    raised = run(scenario())
    assert [type(e) for e in raised] == [type(e) for e in blocking] == [
        normserve.NotFound, normserve.InvalidArgument, normserve.AlreadyExists, normserve.NotFound]
    assert [(e.code, e.details) for e in raised] == [(e.code, e.details) for e in blocking]
    assert torch_error(torch.nn.BatchNorm2d(3), x) in raised[1].details


def test_aio_unreachable_server_is_unavailable():
    async def scenario():
        async with normserve.aio.connect("127.0.0.1:1", timeout=5) as aio_client:
            with pytest.raises(normserve.Unavailable):
                await aio_client.server_info()
            with pytest.raises(normserve.Unavailable, match="not connected after"):
                await aio_client.wait_ready(timeout=0.2)

    run(scenario())


class Boom(Exception):
    pass


def test_temporary_sessions_are_deleted_when_the_block_ends_or_raises(server, client):
    module = torch.nn.BatchNorm1d(3)
    x = torch.randn(4, 3)
    with client.temporary_session("1d", 3) as session:
        with torch.no_grad():
            torch.testing.assert_close(session.forward(x), module(x))
    with pytest.raises(normserve.NotFound):
        session.info()
    with pytest.raises(Boom):
        with client.temporary_session_from_module(module) as raising:
            raising.forward(x)
            raise Boom()
    with pytest.raises(normserve.NotFound):
        client.get_session(raising.session_id)
    with client.temporary_session("1d", 3) as deleted_inside:  # deleting it in the block is fine
        deleted_inside.delete()
    # An existing session is not taken as temporary, and is left alone.
    kept = client.create_session("1d", 3, session_id=f"kept-{uuid.uuid4().hex}")
    with pytest.raises(normserve.AlreadyExists, match="must be a new one"):
        with client.temporary_session("1d", 3, session_id=kept.session_id):
            pass
    assert kept.info().session_id == kept.session_id

    async def scenario():
        async with normserve.aio.connect(server.address) as aio_client:
            async with aio_client.temporary_session("1d", 3) as session:
                await session.forward(x)
            with pytest.raises(Boom):
                async with aio_client.temporary_session_from_module(module) as raising:
                    await raising.forward(x)
                    raise Boom()
            # A cancelled block deletes its session too.
            entered = asyncio.Event()
            handles = []

            async def cancelled_block():
                async with aio_client.temporary_session("1d", 3) as s:
                    handles.append(s)
                    entered.set()
                    await asyncio.sleep(60)

            task = asyncio.ensure_future(cancelled_block())
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return [session.session_id, raising.session_id, handles[0].session_id]

    for session_id in run(scenario()):
        with pytest.raises(normserve.NotFound):
            client.get_session(session_id)


def test_server_info_and_health_agree_with_the_blocking_client_and_grpc_health(server, client, channel):
    health = health_pb2_grpc.HealthStub(channel)
    service = "normserve.v1.BatchNormService"
    expected = health_pb2.HealthCheckResponse.ServingStatus.Name(
        health.Check(health_pb2.HealthCheckRequest(service=service)).status)
    assert expected == "SERVING"
    assert client.health() == client.health(service) == expected
    with pytest.raises(normserve.NotFound):
        client.health("no.such.Service")

    async def scenario():
        async with normserve.aio.connect(server.address) as aio_client:
            await aio_client.wait_ready(timeout=30)
            return await aio_client.server_info(), await aio_client.health(service)

    info, status = run(scenario())
    blocking = client.server_info()
    assert status == expected
    assert (info.server_version, info.libtorch_version, info.limits, info.features) == (
        blocking.server_version, blocking.libtorch_version, blocking.limits, blocking.features)


def test_aio_compare_names_the_mistake(server):
    x = torch.randn(6, 5) * 2
    mine = (x - x.mean(0)) / torch.sqrt(x.var(0) + 1e-5)

    async def scenario():
        async with normserve.aio.connect(server.address) as aio_client:
            return await aio_client.compare(x, module=torch.nn.BatchNorm1d(5), candidate=mine)

    report = run(scenario())
    assert report.diagnosis.best.name == "unbiased_variance"
    assert "unbiased_variance" in str(report)
