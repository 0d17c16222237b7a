"""GPU memory shared through CUDA IPC handles (RegisterSharedMemory with
cuda_ipc, Forward's input_region/output_region naming such regions) against
the real binary.

Everywhere: the refusals that need no GPU (a handle of the wrong length, a
server without CUDA, the feature off). Where torch sees CUDA (skipped
elsewhere, with the reason): forwards through the Python client's
`shm=True` for 1d/2d/3d sessions in train and eval against torch.nn.BatchNorm
on CUDA, in place and into `out`; and through the raw stubs, with handles
made by PyTorch itself (`_share_cuda_`, independent of the client): ranges
out of bounds, misaligned or of the wrong size, registrations beyond the
allocation, bogus handles, a CPU session, unregistering, and another
tenant's region."""

import grpc
import numpy as np
import pytest
import torch

import normserve
from conftest import ServerProcess
from normserve.v1 import (
    batch_norm_pb2 as bn,
    batch_norm_pb2_grpc,
    shared_memory_pb2 as shm_pb2,
    shared_memory_pb2_grpc,
    tensor_pb2,
)

ALICE = "alice-cuda-token"  # tenant acme
BOB = "bob-cuda-token"      # tenant globex

MODULES = {"1d": torch.nn.BatchNorm1d, "2d": torch.nn.BatchNorm2d, "3d": torch.nn.BatchNorm3d}
SHAPES = {"1d": (16, 3, 5), "2d": (8, 3, 4, 5), "3d": (4, 3, 2, 3, 4)}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: CUDA IPC needs one (run where torch sees a GPU)")


def metadata(token):
    return [("authorization", f"Bearer {token}")] if token else []


def stubs(server):
    channel = grpc.insecure_channel(server.address)
    return (channel, shared_memory_pb2_grpc.SharedMemoryServiceStub(channel),
            batch_norm_pb2_grpc.BatchNormServiceStub(channel))


def cuda_register(name, handle, device=0, byte_size=1024, offset=0):
    return shm_pb2.RegisterSharedMemoryRequest(
        name=name, offset=offset, byte_size=byte_size,
        cuda_ipc=shm_pb2.CudaIpcMemory(handle=handle, device=device))


def shared_forward(session_id, shape, input_range, output_range, *, train=True):
    return bn.ForwardRequest(
        session_id=session_id, mode=bn.MODE_TRAIN if train else bn.MODE_EVAL,
        input=tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=shape),
        input_region=shm_pb2.SharedMemoryRange(region=input_range[0], offset=input_range[1],
                                               byte_size=input_range[2]),
        output_region=shm_pb2.SharedMemoryRange(region=output_range[0], offset=output_range[1],
                                                byte_size=output_range[2]))


@pytest.fixture(scope="module")
def own_server():
    server = ServerProcess()
    yield server
    assert server.stop() == 0


# ---------------------------------------------------- refusals, everywhere

@pytest.mark.parametrize("length", [0, 63, 65])
def test_a_handle_that_is_not_64_bytes_is_invalid_argument(own_server, length):
    channel, shm_stub, _ = stubs(own_server)
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            shm_stub.RegisterSharedMemory(cuda_register("bad-handle", b"\x01" * length))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "64 bytes" in caught.value.details() and f"got {length}" in caught.value.details()
        assert list(shm_stub.SharedMemoryStatus(shm_pb2.SharedMemoryStatusRequest()).regions) == []


def test_a_server_without_cuda_refuses_cuda_ipc_regions_with_a_clear_reason(own_server):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for servers without it")
    channel, shm_stub, _ = stubs(own_server)
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            shm_stub.RegisterSharedMemory(cuda_register("no-gpu", bytes(range(64))))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "this server has no CUDA device" in caught.value.details()
        assert list(shm_stub.SharedMemoryStatus(shm_pb2.SharedMemoryStatusRequest()).regions) == []
    with normserve.connect(own_server.address, timeout=30) as client:
        assert client.health() == "SERVING"


def test_cuda_ipc_regions_are_refused_when_shared_memory_is_off():
    server = ServerProcess("--shared-memory", "off")
    try:
        channel, shm_stub, _ = stubs(server)
        with channel:
            with pytest.raises(grpc.RpcError) as caught:
                shm_stub.RegisterSharedMemory(cuda_register("off", bytes(64)))
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--shared-memory off" in caught.value.details()
    finally:
        assert server.stop() == 0


def test_the_client_finds_torchs_cuda_runtime_and_its_ipc_export():
    if torch.version.cuda is None:
        pytest.skip("this torch is a CPU build: it loads no CUDA runtime")
    from normserve import cuda_ipc

    runtime = cuda_ipc.runtime_library()
    assert runtime.cudaIpcGetMemHandle is not None
    assert not cuda_ipc.is_cuda_tensor(torch.zeros(1)) and not cuda_ipc.is_cuda_tensor(np.zeros(1))


def test_host_tensors_on_a_stream_say_cuda_tensors_take_forward(own_server):
    with normserve.connect(own_server.address, timeout=30) as client:
        session = client.create_session("1d", 3)
        fake = torch.zeros(2, 3, device="meta")  # any non-CPU device: refused before any call
        with pytest.raises(ValueError, match="CUDA IPC"):
            list(session.forward_stream([fake], shm=True))


# ------------------------------------------------------ correctness, CUDA

@needs_cuda
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_forward_through_cuda_ipc_equals_torch_in_train_and_eval(own_server, kind):
    torch.manual_seed(7)
    module = MODULES[kind](3).cuda()
    with normserve.connect(own_server.address, timeout=30) as client:
        session = client.create_session(kind, 3, device="cuda")
        for step in range(3):
            x = torch.randn(*SHAPES[kind], device="cuda") * (step + 1) + step
            with torch.no_grad():
                expected = module.train()(x)
            y = session.forward(x, train=True, shm=True)
            assert y.device == x.device and y.dtype == x.dtype and y.shape == x.shape
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        info = session.info()
        torch.testing.assert_close(torch.as_tensor(np.array(info.running_mean)).cuda(), module.running_mean,
                                   rtol=1e-5, atol=1e-6, check_dtype=False)
        torch.testing.assert_close(torch.as_tensor(np.array(info.running_var)).cuda(), module.running_var,
                                   rtol=1e-5, atol=1e-6, check_dtype=False)
        assert info.num_batches_tracked == 3
        x = torch.randn(*SHAPES[kind], device="cuda")
        with torch.no_grad():
            expected = module.eval()(x)
        torch.testing.assert_close(session.forward(x, train=False, shm=True), expected, rtol=1e-5, atol=1e-5)
        regions = [r for r in client.shared_memory_status() if r.HasField("cuda_ipc")]
        assert regions and all(r.cuda_ipc.device == 0 for r in regions)
        # One registration per allocation of the caching allocator, not per call.
        assert len(regions) <= 4, [(r.name, r.byte_size) for r in regions]


@needs_cuda
def test_cuda_ipc_output_goes_into_out_or_in_place(own_server):
    module = torch.nn.BatchNorm2d(3).cuda()
    with normserve.connect(own_server.address, timeout=30) as client:
        session = client.create_session("2d", 3, device="cuda")
        x = torch.randn(8, 3, 4, 5, device="cuda")
        out = torch.full_like(x, float("nan"))
        with torch.no_grad():
            expected = module(x)
        assert session.forward(x, train=True, shm=True, out=out) is out
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        x2 = torch.randn(8, 3, 4, 5, device="cuda")
        with torch.no_grad():
            expected2 = module(x2)
        session.forward(x2, train=True, shm=True, out=x2)  # in place
        torch.testing.assert_close(x2, expected2, rtol=1e-5, atol=1e-5)


# --------------------------------------------------- hostile cases, CUDA

def shared_by_torch(tensor):
    """(handle, offset of the storage in its allocation, the storage's bytes)
    as PyTorch's own IPC export gives them. PyTorch prefixes the 64-byte
    cudaIpcMemHandle_t with a format version and a type byte ('c': memory
    from cudaMalloc)."""
    storage = tensor.untyped_storage()
    _device, handle, size, offset, *_ = storage._share_cuda_()
    if len(handle) == 66:
        assert handle[1:2] == b"c", "not cudaMalloc memory (expandable segments?)"
        handle = handle[2:]
    assert len(handle) == 64
    return handle, offset, size


@needs_cuda
def test_bad_ranges_handles_and_devices_fail_cleanly_and_the_server_survives(own_server):
    channel, shm_stub, bn_stub = stubs(own_server)
    buffer = torch.zeros(4096, device="cuda")  # 16 KiB
    handle, offset, size = shared_by_torch(buffer)
    with channel, normserve.connect(own_server.address, timeout=30) as client:
        with pytest.raises(grpc.RpcError) as caught:  # beyond the allocation
            shm_stub.RegisterSharedMemory(cuda_register("too-large", handle, byte_size=1 << 40, offset=offset))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "allocation" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:  # not a handle the runtime knows
            shm_stub.RegisterSharedMemory(cuda_register("bogus", bytes(range(64))))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as caught:
            shm_stub.RegisterSharedMemory(cuda_register("far-device", handle, device=4096, offset=offset))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        shm_stub.RegisterSharedMemory(cuda_register("buf", handle, byte_size=16384, offset=offset))
        session = client.create_session("1d", 3, device="cuda")
        sid = session.session_id
        for input_range, code in (
            (("buf", 16384 - 24, 48), grpc.StatusCode.OUT_OF_RANGE),     # past the end
            (("buf", 2, 48), grpc.StatusCode.INVALID_ARGUMENT),          # misaligned
            (("buf", 0, 44), grpc.StatusCode.INVALID_ARGUMENT),          # wrong size
            (("never", 0, 48), grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                bn_stub.Forward(shared_forward(sid, (4, 3), input_range, ("buf", 8192, 48)))
            assert caught.value.code() == code, caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:  # output overlapping the input
            bn_stub.Forward(shared_forward(sid, (4, 3), ("buf", 0, 48), ("buf", 16, 48)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A CUDA region with a CPU session: refused before anything is applied.
        cpu = client.create_session("1d", 3, device="cpu")
        with pytest.raises(grpc.RpcError) as caught:
            bn_stub.Forward(shared_forward(cpu.session_id, (4, 3), ("buf", 0, 48), ("buf", 8192, 48)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cpu" in caught.value.details() and "cuda:0" in caught.value.details()
        assert cpu.info().version == 0 and session.info().num_batches_tracked == 0
        # A correct call on the same region, checked against torch.
        x = torch.randn(4, 3, device="cuda")
        buffer[:12] = x.reshape(-1)
        torch.cuda.synchronize()
        reply = bn_stub.Forward(shared_forward(sid, (4, 3), ("buf", 0, 48), ("buf", 8192, 48)))
        assert reply.output_region.region == "buf" and not reply.HasField("output")
        with torch.no_grad():
            expected = torch.nn.BatchNorm1d(3).cuda()(x)
        torch.testing.assert_close(buffer[2048:2060].reshape(4, 3), expected, rtol=1e-5, atol=1e-5)
        # Unregistered: the next use is NOT_FOUND.
        assert shm_stub.UnregisterSharedMemory(shm_pb2.UnregisterSharedMemoryRequest(name="buf")).unregistered == 1
        with pytest.raises(grpc.RpcError) as caught:
            bn_stub.Forward(shared_forward(sid, (4, 3), ("buf", 0, 48), ("buf", 8192, 48)))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert client.health() == "SERVING"


@needs_cuda
def test_another_tenants_cuda_region_is_not_found(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALICE} acme user\n{BOB} globex user\n")
    server = ServerProcess("--auth-tokens", str(tokens))
    buffer = torch.zeros(1024, device="cuda")
    handle, offset, _ = shared_by_torch(buffer)
    try:
        channel, shm_stub, bn_stub = stubs(server)
        with channel, normserve.connect(server.address, token=BOB, timeout=30) as bob:
            shm_stub.RegisterSharedMemory(cuda_register("alices", handle, byte_size=4096, offset=offset),
                                          metadata=metadata(ALICE))
            session = bob.create_session("1d", 3, device="cuda")
            request = shared_forward(session.session_id, (4, 3), ("alices", 0, 48), ("alices", 1024, 48))
            with pytest.raises(grpc.RpcError) as theirs:
                bn_stub.Forward(request, metadata=metadata(BOB))
            assert theirs.value.code() == grpc.StatusCode.NOT_FOUND
            assert list(shm_stub.SharedMemoryStatus(shm_pb2.SharedMemoryStatusRequest(),
                                                    metadata=metadata(BOB)).regions) == []
            mine = shm_stub.SharedMemoryStatus(shm_pb2.SharedMemoryStatusRequest(), metadata=metadata(ALICE))
            assert [(r.name, r.cuda_ipc.device) for r in mine.regions] == [("alices", 0)]
    finally:
        assert server.stop() == 0
