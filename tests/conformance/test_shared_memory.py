"""The shared-memory tensor transport (SharedMemoryService, Forward's
input_region/output_region) against the real binary: outputs and running
statistics against torch.nn.BatchNorm for unary calls and streams, train and
eval, through the Python client's `shm=True`; and the hostile cases through
the raw stubs: ranges out of bounds, misaligned, overlapping or of the wrong
size, another tenant's region, objects unlinked or truncated after
registration (the server must survive), the idle lease, the limits, the
feature switched off, and a client's cleanup."""

import mmap
import os
import secrets
import re
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch

import normserve
from conftest import ServerProcess, free_port
from normserve.v1 import (
    batch_norm_pb2 as bn,
    server_pb2,
    server_pb2_grpc,
    shared_memory_pb2 as shm_pb2,
    shared_memory_pb2_grpc,
    tensor_pb2,
)

ALICE = "alice-shm-token"  # tenant acme
BOB = "bob-shm-token"      # tenant globex

MODULES = {"1d": torch.nn.BatchNorm1d, "2d": torch.nn.BatchNorm2d, "3d": torch.nn.BatchNorm3d}
SHAPES = {"1d": (16, 3, 5), "2d": (8, 3, 4, 5), "3d": (4, 3, 2, 3, 4)}


def connect(server, token=None):
    return normserve.connect(server.address, token=token, timeout=30)


def module_like(kind, dtype):
    return MODULES[kind](3).to(dtype)


def assert_same_state(session, module):
    info = session.info()
    torch.testing.assert_close(torch.as_tensor(np.array(info.running_mean)), module.running_mean,
                               check_dtype=False)
    torch.testing.assert_close(torch.as_tensor(np.array(info.running_var)), module.running_var,
                               check_dtype=False)
    assert info.num_batches_tracked == int(module.num_batches_tracked)


class ShmObject:
    """A /dev/shm object made by the test itself (not the client's pool)."""

    def __init__(self, size, fill=0):
        self.name = f"normserve-conf-{os.getpid()}-{secrets.token_hex(8)}"
        self.path = f"/dev/shm/{self.name}"
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        os.ftruncate(fd, size)
        self.map = mmap.mmap(fd, size)
        os.close(fd)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)
        self.bytes[:] = fill

    def put(self, offset, array):
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        self.bytes[offset:offset + raw.size] = raw

    def get(self, offset, shape, dtype):
        count = int(np.prod(shape))
        return self.bytes[offset:offset + count * np.dtype(dtype).itemsize].view(dtype).reshape(shape).copy()

    def remove(self):
        if os.path.exists(self.path):
            os.unlink(self.path)


@pytest.fixture
def objects():
    made = []

    def make(size, fill=0):
        obj = ShmObject(size, fill)
        made.append(obj)
        return obj

    yield make
    for obj in made:
        obj.remove()


def stubs(server):
    channel = grpc.insecure_channel(server.address)
    return (channel, shared_memory_pb2_grpc.SharedMemoryServiceStub(channel),
            normserve.v1.batch_norm_pb2_grpc.BatchNormServiceStub(channel))


def metadata(token):
    return [("authorization", f"Bearer {token}")] if token else []


def shared_forward(session_id, shape, dtype, input_range, output_range, *, train=True, raw=None):
    """A raw ForwardRequest naming shared-memory ranges."""
    header = tensor_pb2.Tensor(dtype=dtype, shape=shape)
    if raw is not None:
        header.raw = raw
    return bn.ForwardRequest(
        session_id=session_id, mode=bn.MODE_TRAIN if train else bn.MODE_EVAL, input=header,
        input_region=shm_pb2.SharedMemoryRange(region=input_range[0], offset=input_range[1],
                                               byte_size=input_range[2]),
        output_region=shm_pb2.SharedMemoryRange(region=output_range[0], offset=output_range[1],
                                                byte_size=output_range[2]))


# ------------------------------------------------------------- correctness


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unary_train_then_eval_matches_torch(server, kind, dtype):
    with connect(server) as client:
        session = client.create_session(kind, 3, dtype=str(dtype).removeprefix("torch."))
        module = module_like(kind, dtype)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for step in range(3):
                x = torch.randn(*SHAPES[kind], generator=generator, dtype=dtype) * (step + 1) + step
                # numpy in, numpy out; torch in, torch out.
                given = x.numpy() if step % 2 else x
                y = session.forward(given, train=True, shm=True)
                assert isinstance(y, np.ndarray) if step % 2 else isinstance(y, torch.Tensor)
                torch.testing.assert_close(torch.as_tensor(y), module.train()(x))
            assert_same_state(session, module)
            x = torch.randn(*SHAPES[kind], generator=generator, dtype=dtype)
            y = session.forward(x, train=False, shm=True)
            torch.testing.assert_close(y, module.eval()(x))
        assert_same_state(session, module)


def test_stream_train_and_eval_match_torch(server):
    with connect(server) as client:
        session = client.create_session("2d", 3)
        module = torch.nn.BatchNorm2d(3)
        generator = torch.Generator().manual_seed(11)
        xs = [torch.randn(6, 3, 4, 4, generator=generator) + i for i in range(20)]
        with torch.no_grad():
            expected = [module.train()(x) for x in xs]
            outputs = list(session.forward_stream(iter(xs), train=True, shm=True))
            assert len(outputs) == len(xs)
            for y, want in zip(outputs, expected):
                torch.testing.assert_close(y, want)
            assert_same_state(session, module)
            evals = list(session.forward_stream(iter(xs[:5]), train=False, shm=True))
            for y, x in zip(evals, xs[:5]):
                torch.testing.assert_close(y, module.eval()(x))


def test_stream_errors_are_in_band_and_the_stream_goes_on(server):
    with connect(server) as client:
        session = client.create_session("1d", 3)
        xs = [torch.randn(4, 3), torch.randn(4, 5), torch.randn(4, 3)]
        outputs = list(session.forward_stream(iter(xs), train=False, shm=True, return_exceptions=True))
        assert isinstance(outputs[1], normserve.InvalidArgument) and outputs[1].index == 1
        module = torch.nn.BatchNorm1d(3).eval()
        with torch.no_grad():
            torch.testing.assert_close(outputs[0], module(xs[0]))
            torch.testing.assert_close(outputs[2], module(xs[2]))


def test_half_precision_inputs_through_shared_memory(server):
    with connect(server) as client:
        session = client.create_session("1d", 3)
        module = torch.nn.BatchNorm1d(3)
        with torch.no_grad():
            for dtype in (torch.float16, torch.bfloat16):
                x = torch.randn(32, 3, 8).to(dtype)
                y = session.forward(x, train=True, shm=True)
                assert y.dtype == dtype
                # A float32 module takes half inputs as is, as the session does.
                torch.testing.assert_close(y, module.train()(x))
        assert_same_state(session, module)


def test_arrays_in_shared_memory_are_read_and_written_in_place(server):
    with connect(server) as client:
        session = client.create_session("2d", 3)
        module = torch.nn.BatchNorm2d(3)
        x = client.shared_array((8, 3, 4, 4), "float32")
        out = client.shared_array((8, 3, 4, 4), "float32")
        x[...] = np.random.default_rng(3).standard_normal(x.shape, dtype=np.float32)
        y = session.forward(x, train=True, shm=True, out=out)
        assert y is out
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), module.train()(torch.from_numpy(x)))
        # A torch view of the same memory is found too.
        t = torch.from_numpy(x)
        y = session.forward(t, train=True, shm=True)
        with torch.no_grad():
            torch.testing.assert_close(y, module.train()(t))
        assert_same_state(session, module)


def test_input_and_output_may_be_the_same_range(server, objects):
    obj = objects(4096)
    x = np.random.default_rng(5).standard_normal((16, 3), dtype=np.float32)
    obj.put(128, x)
    channel, shm_stub, bn_stub = stubs(server)
    with channel, connect(server) as client:
        session = client.create_session("1d", 3)
        shm_stub.RegisterSharedMemory(shm_pb2.RegisterSharedMemoryRequest(name=obj.name, byte_size=4096))
        same = (obj.name, 128, x.nbytes)
        reply = bn_stub.Forward(shared_forward(session.session_id, x.shape, tensor_pb2.DATA_TYPE_FLOAT32,
                                               same, same))
        assert not reply.HasField("output") and reply.output_region.offset == 128
        with torch.no_grad():
            want = torch.nn.BatchNorm1d(3).train()(torch.from_numpy(x))
        torch.testing.assert_close(torch.from_numpy(obj.get(128, x.shape, np.float32)), want)


def test_exact_statistics_sessions_read_shared_inputs(server):
    from test_exact import assert_exact, new_exact, wide_batches

    batches = wide_batches(3, 4, 9, 3, np.dtype("float32"))
    with connect(server) as client:
        session = new_exact(client, 3, "float32")
        module = torch.nn.BatchNorm1d(3)
        for batch in batches:
            y = session.forward(batch, train=True, shm=True)
            with torch.no_grad():
                torch.testing.assert_close(torch.from_numpy(y), module.train()(torch.from_numpy(batch)))
        assert_exact(session.info(), batches, "float32")


def test_synchronized_step_ranks_read_and_write_shared_memory(server, objects):
    from concurrent.futures import ThreadPoolExecutor

    world, rows = 3, 5
    shards = [torch.randn(rows, 4, generator=torch.Generator().manual_seed(r)) * (r + 1) for r in range(world)]
    nbytes = rows * 4 * 4
    obj = objects(2 * world * nbytes)
    for rank, shard in enumerate(shards):
        obj.put(rank * nbytes, shard.numpy())
    channel, shm_stub, bn_stub = stubs(server)
    with channel, connect(server) as client:
        session = client.create_session("1d", 4)
        shm_stub.RegisterSharedMemory(shm_pb2.RegisterSharedMemoryRequest(name=obj.name, byte_size=2 * world * nbytes))
        requests = []
        for rank in range(world):
            request = shared_forward(session.session_id, (rows, 4), tensor_pb2.DATA_TYPE_FLOAT32,
                                     (obj.name, rank * nbytes, nbytes), (obj.name, (world + rank) * nbytes, nbytes))
            request.step.CopyFrom(bn.StepSpec(step=1, world_size=world, rank=rank))
            requests.append(request)
        with ThreadPoolExecutor(max_workers=world) as pool:
            replies = list(pool.map(lambda r: bn_stub.Forward(r, timeout=60), requests))
        assert all(reply.HasField("output_region") for reply in replies)
        module = torch.nn.BatchNorm1d(4)
        with torch.no_grad():
            expected = module.train()(torch.cat(shards)).split(rows)
        for rank in range(world):
            got = torch.from_numpy(obj.get((world + rank) * nbytes, (rows, 4), np.float32))
            torch.testing.assert_close(got, expected[rank])
        assert_same_state(session, module)


# ------------------------------------------ outputs computed into their range


def register(shm_stub, obj, size):
    shm_stub.RegisterSharedMemory(shm_pb2.RegisterSharedMemoryRequest(name=obj.name, byte_size=size))


def test_a_replay_writes_the_original_output_again_after_the_client_overwrote_it(server, objects):
    # The output goes straight into its range; with a request_id a copy is
    # kept, and the replay writes those bytes, not a recomputation.
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(21)) * 2 + 1
    obj = objects(8192)
    obj.put(0, x.numpy())
    channel, shm_stub, bn_stub = stubs(server)
    with channel, connect(server) as client:
        session = client.create_session("1d", 3)
        register(shm_stub, obj, 8192)
        request = shared_forward(session.session_id, x.shape, tensor_pb2.DATA_TYPE_FLOAT32,
                                 (obj.name, 0, x.nbytes), (obj.name, 4096, x.nbytes))
        request.request_id = "shm-replay-1"
        first = bn_stub.Forward(request)
        assert first.output_region.offset == 4096 and not first.replayed and first.version == 2
        module = torch.nn.BatchNorm1d(3)
        with torch.no_grad():
            want = module.train()(x)
        written = obj.bytes[4096:4096 + x.nbytes].copy()
        torch.testing.assert_close(torch.from_numpy(written.view(np.float32).reshape(64, 3).copy()), want)
        # The client reuses both ranges; the retry must not read the new input.
        obj.bytes[4096:4096 + x.nbytes] = 0xFF
        obj.put(0, (x * 100).numpy())
        again = bn_stub.Forward(request)
        assert again.replayed and again.version == 2 and again.output_region.offset == 4096
        assert np.array_equal(obj.bytes[4096:4096 + x.nbytes], written)
        assert_same_state(session, module)


def test_an_output_too_large_to_keep_is_not_written_again_by_its_replay(objects):
    server = ServerProcess("--replay-cache-bytes", "1024")
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(22))  # 4096 bytes
    obj = objects(8192)
    obj.put(0, x.numpy())
    try:
        channel, shm_stub, bn_stub = stubs(server)
        with channel, connect(server) as client:
            session = client.create_session("1d", 4)
            register(shm_stub, obj, 8192)
            request = shared_forward(session.session_id, x.shape, tensor_pb2.DATA_TYPE_FLOAT32,
                                     (obj.name, 0, 4096), (obj.name, 4096, 4096))
            request.request_id = "too-large"
            first = bn_stub.Forward(request)
            assert first.HasField("output_region") and first.version == 2
            module = torch.nn.BatchNorm1d(4)
            with torch.no_grad():
                torch.testing.assert_close(torch.from_numpy(obj.get(4096, (256, 4), np.float32)),
                                           module.train()(x))
            obj.bytes[4096:] = 0x7F
            again = bn_stub.Forward(request)
            # Applied once; nothing held, so nothing written and no range named.
            assert again.replayed and again.version == 2 and not again.HasField("output_region")
            assert not again.HasField("output")
            assert (obj.bytes[4096:] == 0x7F).all()
            assert_same_state(session, module)
    finally:
        assert server.stop() == 0


def test_in_place_calls_replay_and_fail_without_losing_the_input(server, objects):
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(23))
    obj = objects(4096)
    obj.put(256, x.numpy())
    same = (obj.name, 256, x.nbytes)
    channel, shm_stub, bn_stub = stubs(server)
    with channel, connect(server) as client:
        session = client.create_session("1d", 3, reject_non_finite=True)
        register(shm_stub, obj, 4096)
        request = shared_forward(session.session_id, x.shape, tensor_pb2.DATA_TYPE_FLOAT32, same, same)
        request.request_id = "in-place-1"
        reply = bn_stub.Forward(request)
        assert reply.output_region.offset == 256 and reply.version == 2
        module = torch.nn.BatchNorm1d(3)
        with torch.no_grad():
            want = module.train()(x)
        written = obj.bytes[256:256 + x.nbytes].copy()
        torch.testing.assert_close(torch.from_numpy(written.view(np.float32).reshape(32, 3).copy()), want)
        obj.put(256, x.numpy())
        again = bn_stub.Forward(request)
        assert again.replayed and again.version == 2
        assert np.array_equal(obj.bytes[256:256 + x.nbytes], written)
        # A refused in-place call leaves the input as it was.
        bad = x.clone()
        bad[3, 1] = float("nan")
        obj.put(256, bad.numpy())
        request.request_id = "in-place-2"
        with pytest.raises(grpc.RpcError) as caught:
            bn_stub.Forward(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert np.array_equal(obj.get(256, x.shape, np.float32), bad.numpy(), equal_nan=True)
        assert session.info().version == 2
        assert_same_state(session, module)


def test_a_train_step_failing_after_its_output_was_written_changes_nothing(server, objects):
    # Exact statistics refuse NaN only after the output was computed into
    # its range: the output range is then unspecified, the input and the
    # session are not touched.
    from test_exact import assert_exact, wide_batches

    good = wide_batches(24, 2, 9, 3, np.dtype("float32"))
    bad = good[0].copy()
    bad[4, 2] = np.nan
    nbytes = bad.nbytes
    obj = objects(8192)
    channel, shm_stub, bn_stub = stubs(server)
    with channel, connect(server) as client:
        session = client.create_session("1d", 3, dtype="float32", exact_statistics=True)
        register(shm_stub, obj, 8192)

        def forward(batch):
            obj.put(0, batch)
            return bn_stub.Forward(shared_forward(session.session_id, batch.shape, tensor_pb2.DATA_TYPE_FLOAT32,
                                                  (obj.name, 0, nbytes), (obj.name, 4096, nbytes)))

        module = torch.nn.BatchNorm1d(3)
        forward(good[0])
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(obj.get(4096, good[0].shape, np.float32)),
                                       module.train()(torch.from_numpy(good[0])))
        before = session.info()
        with pytest.raises(grpc.RpcError) as caught:
            forward(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert np.array_equal(obj.get(0, bad.shape, np.float32), bad, equal_nan=True)
        after = session.info()
        assert (after.version, after.num_batches_tracked) == (before.version, before.num_batches_tracked) == (2, 1)
        assert_exact(after, good[:1], "float32")
        forward(good[1])
        assert_exact(session.info(), good, "float32")


def test_truncation_during_calls_fails_them_cleanly_and_applies_only_what_was_answered(server, objects):
    # Calls one after another on a 16 MiB input and output while the owner
    # truncates the object: each call either succeeds or fails with
    # FAILED_PRECONDITION (NOT_FOUND once the region is unregistered), the
    # server survives, and the session counts exactly the steps it
    # acknowledged (or that the error says were applied).
    import threading

    shape = (65536, 64)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(25))
    nbytes = x.nbytes
    obj = objects(2 * nbytes)
    obj.put(0, x.numpy())
    channel, shm_stub, bn_stub = stubs(server)
    first_done = threading.Event()
    results = []

    def calls(session_id):
        request = shared_forward(session_id, shape, tensor_pb2.DATA_TYPE_FLOAT32, (obj.name, 0, nbytes),
                                 (obj.name, nbytes, nbytes))
        for _ in range(10_000):
            try:
                reply = bn_stub.Forward(request, timeout=60)
                results.append(("ok", reply.version))
            except grpc.RpcError as error:
                results.append((error.code(), error.details()))
                first_done.set()
                return
            first_done.set()

    with channel, connect(server) as client:
        session = client.create_session("1d", 64)
        register(shm_stub, obj, 2 * nbytes)
        worker = threading.Thread(target=calls, args=(session.session_id,))
        worker.start()
        assert first_done.wait(60)
        os.truncate(obj.path, 4096)
        worker.join(120)
        assert not worker.is_alive()
        assert results[-1][0] in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND), results[-1]
        assert all(code == "ok" for code, _ in results[:-1]), results
        applied = len(results) - 1 + ("but the forward was applied" in results[-1][1])
        assert server.proc.poll() is None and client.health() == "SERVING"
        info = session.info()
        assert info.num_batches_tracked == applied and info.version == 1 + applied
        module = torch.nn.BatchNorm1d(64)
        with torch.no_grad():
            for _ in range(applied):
                module.train()(x)
        assert_same_state(session, module)
        assert obj.name not in [r.name for r in shm_stub.SharedMemoryStatus(shm_pb2.SharedMemoryStatusRequest()).regions]


# ------------------------------------------------------------- hostile input


def test_bad_ranges_are_refused_and_change_nothing(server, objects):
    obj = objects(4096)
    channel, shm_stub, bn_stub = stubs(server)
    with channel, connect(server) as client:
        session = client.create_session("1d", 3)
        shm_stub.RegisterSharedMemory(shm_pb2.RegisterSharedMemoryRequest(name=obj.name, offset=0, byte_size=1024))
        f32 = tensor_pb2.DATA_TYPE_FLOAT32
        shape = (4, 3)  # 48 bytes
        cases = [
            ("past the end", (obj.name, 1000, 48), (obj.name, 0, 48), grpc.StatusCode.OUT_OF_RANGE, "outside"),
            ("output past the end", (obj.name, 0, 48), (obj.name, 1020, 48), grpc.StatusCode.OUT_OF_RANGE,
             "outside"),
            ("misaligned", (obj.name, 2, 48), (obj.name, 512, 48), grpc.StatusCode.INVALID_ARGUMENT,
             "multiple of the element size"),
            ("wrong size", (obj.name, 0, 44), (obj.name, 512, 48), grpc.StatusCode.INVALID_ARGUMENT,
             "take 48 bytes"),
            ("overlapping", (obj.name, 0, 48), (obj.name, 16, 48), grpc.StatusCode.INVALID_ARGUMENT, "overlaps"),
            ("unknown region", ("no-such-region", 0, 48), (obj.name, 512, 48), grpc.StatusCode.NOT_FOUND,
             "not registered"),
            ("bad name", ("../etc", 0, 48), (obj.name, 512, 48), grpc.StatusCode.INVALID_ARGUMENT, "'/'"),
        ]
        for what, input_range, output_range, code, text in cases:
            with pytest.raises(grpc.RpcError) as caught:
                bn_stub.Forward(shared_forward(session.session_id, shape, f32, input_range, output_range))
            assert caught.value.code() == code, (what, caught.value.details())
            assert text in caught.value.details(), (what, caught.value.details())
        with pytest.raises(grpc.RpcError) as caught:
            bn_stub.Forward(shared_forward(session.session_id, shape, f32, (obj.name, 0, 48), (obj.name, 512, 48),
                                           raw=b"\0" * 48))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "dtype and shape only" in caught.value.details()
        info = session.info()
        assert info.version == 1 and info.num_batches_tracked == 0


def test_registration_refuses_what_it_cannot_map(server, objects):
    obj = objects(1024)
    os.symlink(obj.path, obj.path + "-link")
    channel, shm_stub, _ = stubs(server)
    try:
        cases = [
            (obj.name, 0, 2048, grpc.StatusCode.FAILED_PRECONDITION, "fewer than"),
            (obj.name + "-link", 0, 64, grpc.StatusCode.FAILED_PRECONDITION, "symbolic link"),
            ("normserve-conf-missing", 0, 64, grpc.StatusCode.NOT_FOUND, "no shared memory object"),
            ("a/b", 0, 64, grpc.StatusCode.INVALID_ARGUMENT, "'/'"),
            ("..", 0, 64, grpc.StatusCode.INVALID_ARGUMENT, "not an object name"),
            ("x" * 256, 0, 64, grpc.StatusCode.INVALID_ARGUMENT, "at most 255"),
            (obj.name, 0, 0, grpc.StatusCode.INVALID_ARGUMENT, "at least 1"),
        ]
        with channel:
            for name, offset, size, code, text in cases:
                with pytest.raises(grpc.RpcError) as caught:
                    shm_stub.RegisterSharedMemory(
                        shm_pb2.RegisterSharedMemoryRequest(name=name, offset=offset, byte_size=size))
                assert caught.value.code() == code, (name, caught.value.details())
                assert text in caught.value.details(), (name, caught.value.details())
            # Registering twice alike is a no-op; differently, ALREADY_EXISTS.
            first = shm_stub.RegisterSharedMemory(shm_pb2.RegisterSharedMemoryRequest(name=obj.name, byte_size=512))
            again = shm_stub.RegisterSharedMemory(shm_pb2.RegisterSharedMemoryRequest(name=obj.name, byte_size=512))
            assert not first.already_registered and again.already_registered
            with pytest.raises(grpc.RpcError) as caught:
                shm_stub.RegisterSharedMemory(shm_pb2.RegisterSharedMemoryRequest(name=obj.name, byte_size=256))
            assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
            shm_stub.UnregisterSharedMemory(shm_pb2.UnregisterSharedMemoryRequest(name=obj.name))
    finally:
        os.unlink(obj.path + "-link")


def test_another_tenants_region_is_not_found(objects, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALICE} acme user\n{BOB} globex user\n")
    server = ServerProcess("--auth-tokens", str(tokens))
    obj = objects(4096)
    try:
        channel, shm_stub, bn_stub = stubs(server)
        with channel, connect(server, BOB) as bob:
            shm_stub.RegisterSharedMemory(shm_pb2.RegisterSharedMemoryRequest(name=obj.name, byte_size=4096),
                                          metadata=metadata(ALICE))
            session = bob.create_session("1d", 3)
            request = shared_forward(session.session_id, (4, 3), tensor_pb2.DATA_TYPE_FLOAT32, (obj.name, 0, 48),
                                     (obj.name, 1024, 48))
            with pytest.raises(grpc.RpcError) as theirs:
                bn_stub.Forward(request, metadata=metadata(BOB))
            request.input_region.region = request.output_region.region = "never-registered"
            with pytest.raises(grpc.RpcError) as nobodys:
                bn_stub.Forward(request, metadata=metadata(BOB))
            assert theirs.value.code() == nobodys.value.code() == grpc.StatusCode.NOT_FOUND
            assert (theirs.value.details().replace(obj.name, "X")
                    == nobodys.value.details().replace("never-registered", "X"))
            assert list(shm_stub.SharedMemoryStatus(shm_pb2.SharedMemoryStatusRequest(),
                                                    metadata=metadata(BOB)).regions) == []
            with pytest.raises(grpc.RpcError) as caught:
                shm_stub.UnregisterSharedMemory(shm_pb2.UnregisterSharedMemoryRequest(name=obj.name),
                                                metadata=metadata(BOB))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            mine = shm_stub.SharedMemoryStatus(shm_pb2.SharedMemoryStatusRequest(), metadata=metadata(ALICE))
            assert [r.name for r in mine.regions] == [obj.name]
            # Other tenants' mapped bytes are not a user's to know.
            info = server_pb2_grpc.ServerServiceStub(channel).GetServerInfo(
                server_pb2.GetServerInfoRequest(), metadata=metadata(BOB))
            assert info.limits.shared_memory_mapped_bytes == 0
    finally:
        assert server.stop() == 0


def test_unlinked_and_truncated_objects_fail_cleanly_and_the_server_survives(server, objects):
    unlinked, truncated = objects(8192), objects(8192)
    channel, shm_stub, bn_stub = stubs(server)
    with channel, connect(server) as client:
        session = client.create_session("1d", 3)
        for obj in (unlinked, truncated):
            shm_stub.RegisterSharedMemory(shm_pb2.RegisterSharedMemoryRequest(name=obj.name, byte_size=8192))
        os.unlink(unlinked.path)
        os.truncate(truncated.path, 100)  # the pages past it would raise SIGBUS in the server
        for obj, text in ((unlinked, "unlinked"), (truncated, "truncated")):
            request = shared_forward(session.session_id, (4, 3), tensor_pb2.DATA_TYPE_FLOAT32, (obj.name, 4096, 48),
                                     (obj.name, 0, 48))
            with pytest.raises(grpc.RpcError) as caught:
                bn_stub.Forward(request)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
            assert text in caught.value.details()
            # The region is gone: the next use is NOT_FOUND.
            with pytest.raises(grpc.RpcError) as caught:
                bn_stub.Forward(request)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        names = [r.name for r in shm_stub.SharedMemoryStatus(shm_pb2.SharedMemoryStatusRequest()).regions]
        assert unlinked.name not in names and truncated.name not in names
        assert server.proc.poll() is None
        assert session.info().num_batches_tracked == 0
        assert client.health() == "SERVING"


def test_regions_idle_past_the_lease_are_unregistered_and_the_client_registers_again():
    server = ServerProcess("--shared-memory-idle-seconds", "1")
    try:
        with connect(server) as client:
            session = client.create_session("1d", 3)
            module = torch.nn.BatchNorm1d(3)
            x = torch.randn(8, 3)
            with torch.no_grad():
                torch.testing.assert_close(session.forward(x, train=True, shm=True), module(x))
            assert len(client.shared_memory_status()) == 1
            deadline = time.monotonic() + 30
            while client.shared_memory_status() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.shared_memory_status() == []
            info = client.server_info()
            assert info.limits.shared_memory_regions == 0 and info.limits.shared_memory_mapped_bytes == 0
            # The client's next call finds its region gone, registers it again.
            with torch.no_grad():
                torch.testing.assert_close(session.forward(x, train=True, shm=True), module(x))
    finally:
        assert server.stop() == 0


def test_limits_are_enforced_and_reported(objects):
    port = free_port()
    server = ServerProcess("--tenant-shared-memory-max-regions", "2", "--shared-memory-max-bytes", "10000",
                           "--metrics-addr", f"127.0.0.1:{port}")
    try:
        made = [objects(4096) for _ in range(3)]
        channel, shm_stub, _ = stubs(server)
        with channel:
            for obj in made[:2]:
                shm_stub.RegisterSharedMemory(shm_pb2.RegisterSharedMemoryRequest(name=obj.name, byte_size=4096))
            with pytest.raises(grpc.RpcError) as caught:
                shm_stub.RegisterSharedMemory(shm_pb2.RegisterSharedMemoryRequest(name=made[2].name, byte_size=4096))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--tenant-shared-memory-max-regions" in caught.value.details()
            shm_stub.UnregisterSharedMemory(shm_pb2.UnregisterSharedMemoryRequest(name=made[0].name))
            with pytest.raises(grpc.RpcError) as caught:
                shm_stub.RegisterSharedMemory(
                    shm_pb2.RegisterSharedMemoryRequest(name=made[2].name, byte_size=4096 + 2000))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--shared-memory-max-bytes" in caught.value.details()
            info = server_pb2_grpc.ServerServiceStub(channel).GetServerInfo(server_pb2.GetServerInfoRequest())
            assert "shared_memory" in info.features
            assert info.limits.shared_memory_max_bytes == 10000
            assert info.limits.shared_memory_mapped_bytes == 4096
            assert info.limits.shared_memory_regions == 1
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                text = response.read().decode()
            assert re.search(r"^normserve_shared_memory_mapped_bytes 4096$", text, re.M), text
            assert shm_stub.UnregisterSharedMemory(shm_pb2.UnregisterSharedMemoryRequest()).unregistered == 1
    finally:
        assert server.stop() == 0


def test_switched_off_registration_is_refused():
    server = ServerProcess("--shared-memory", "off")
    try:
        with connect(server) as client:
            session = client.create_session("1d", 3)
            with pytest.raises(normserve.FailedPrecondition, match="--shared-memory off"):
                session.forward(np.zeros((2, 3), np.float32), shm=True)
            assert "shared_memory" not in client.server_info().features
    finally:
        assert server.stop() == 0


def test_closing_the_client_unregisters_and_unlinks_its_objects(server):
    client = connect(server)
    session = client.create_session("1d", 3)
    session.forward(np.ones((4, 3), np.float32), shm=True)
    buffer = client.shared_array((4, 3))
    # The other tests' regions share the default tenant: this client's are
    # the ones named after its process.
    names = [r.name for r in client.shared_memory_status() if r.name.startswith(f"normserve-{os.getpid()}-")]
    assert len(names) == 2 and all(os.path.exists(f"/dev/shm/{n}") for n in names)
    del buffer
    with connect(server) as other:
        client.close()
        assert not {r.name for r in other.shared_memory_status()} & set(names)
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
