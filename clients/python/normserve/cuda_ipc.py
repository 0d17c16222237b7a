"""GPU tensors for a server on this host, through CUDA IPC handles.

`session.forward(x, shm=True)` with `x` a CUDA torch tensor sends no tensor
bytes: the client exports the GPU allocation holding `x` (the CUDA caching
allocator's segment) with cudaIpcGetMemHandle and registers it with the
server once; the server opens it, computes on that device reading `x` in
place, and writes the output into a range of another registered allocation
(`out=` when given, else a fresh tensor on the device: no copy on either
side).

Registrations are cached per allocation (device, handle) and unregistered by
`client.close()`; at most `max_regions` are kept (the least recently used
is unregistered beyond). The allocations must stay allocated while
registered: do not call `torch.cuda.empty_cache()` while the client holds
CUDA registrations (`client.shared_memory.cuda.close()` unregisters them).

Synchronization: the client waits for `x`'s device (torch.cuda.synchronize)
before each call, so that its producer has finished writing it; the server
synchronizes its own work before it answers, so the output is complete when
the call returns.

The CUDA runtime and driver are the ones PyTorch loaded (found by soname);
nothing else is linked. The server must see the same devices (the same
CUDA_VISIBLE_DEVICES numbering).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from normserve import codec, errors, protocol
from normserve.v1 import tensor_pb2

HANDLE_BYTES = 64
_RUNTIMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0")


def runtime_library() -> ctypes.CDLL:
    """The CUDA runtime PyTorch loaded (import torch first), by its soname."""
    mode = os.RTLD_NOW | getattr(os, "RTLD_NOLOAD", 0)
    for name in _RUNTIMES:
        try:
            return ctypes.CDLL(name, mode=mode)
        except OSError:
            continue
    raise RuntimeError(f"PyTorch's CUDA runtime ({', '.join(_RUNTIMES)}) is not loaded")


class _Cuda:
    """cudaIpcGetMemHandle (runtime) and cuMemGetAddressRange (driver), from
    the libraries PyTorch loaded."""

    def __init__(self) -> None:
        runtime = runtime_library()
        self.set_device = runtime.cudaSetDevice
        self.set_device.argtypes = [ctypes.c_int]
        self.set_device.restype = ctypes.c_int
        self.get_device = runtime.cudaGetDevice
        self.get_device.argtypes = [ctypes.POINTER(ctypes.c_int)]
        self.get_device.restype = ctypes.c_int
        self.get_handle = runtime.cudaIpcGetMemHandle
        self.get_handle.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.get_handle.restype = ctypes.c_int
        driver = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOW)
        self.address_range = driver.cuMemGetAddressRange_v2
        self.address_range.argtypes = [ctypes.POINTER(ctypes.c_uint64),
                                       ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        self.address_range.restype = ctypes.c_int

    def allocation(self, device: int, pointer: int) -> tuple[int, int, bytes]:
        """(base, size, IPC handle) of the allocation holding `pointer` on
        CUDA device `device`."""
        # The device's primary context current on this thread (cudaSetDevice
        # makes it so since CUDA 12) for the driver call; the thread's device
        # is restored after.
        previous = ctypes.c_int(-1)
        self.get_device(ctypes.byref(previous))
        status = self.set_device(device)
        if status != 0:
            raise RuntimeError(f"cudaSetDevice({device}) failed (CUDA error {status})")
        try:
            return self._allocation(pointer)
        finally:
            if previous.value >= 0 and previous.value != device:
                self.set_device(previous.value)

    def _allocation(self, pointer: int) -> tuple[int, int, bytes]:
        base = ctypes.c_uint64()
        size = ctypes.c_size_t()
        status = self.address_range(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(pointer))
        if status != 0:
            raise RuntimeError(f"cuMemGetAddressRange failed (CUDA driver error {status})")
        handle = (ctypes.c_char * HANDLE_BYTES)()
        status = self.get_handle(ctypes.byref(handle), ctypes.c_void_p(base.value))
        if status != 0:
            raise RuntimeError(f"cudaIpcGetMemHandle failed (CUDA error {status}); CUDA IPC needs "
                               "memory from cudaMalloc (not expandable segments)")
        return base.value, size.value, handle.raw


_cuda: _Cuda | None = None
_cuda_lock = threading.Lock()


def _runtime() -> _Cuda:
    global _cuda
    with _cuda_lock:
        if _cuda is None:
            _cuda = _Cuda()
        return _cuda


def is_cuda_tensor(x: object) -> bool:
    return codec.is_torch_tensor(x) and cast(Any, x).device.type == "cuda"


class CudaIpcPool:
    """This client's CUDA IPC registrations: one per allocation (a segment
    of PyTorch's caching allocator), cached by (device, handle)."""

    def __init__(self, run: Callable[[protocol.Call[Any]], Any], *, max_regions: int = 64) -> None:
        if max_regions < 2:
            raise ValueError("max_regions: must be >= 2 (an input's and an output's)")
        self._run = run
        self.max_regions = max_regions
        self._lock = threading.Lock()
        # (device, handle) -> (name, base, size)
        self._regions: OrderedDict[tuple[int, bytes], tuple[str, int, int]] = OrderedDict()
        self._closed = False

    def range(self, tensor: Any) -> protocol.SharedRange:
        """(region, offset, byte_size) of a contiguous CUDA tensor's bytes,
        its allocation registered (once) with the server."""
        torch = codec.import_torch()
        device = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
        nbytes = tensor.numel() * tensor.element_size()
        pointer = tensor.data_ptr()
        base, size, handle = _runtime().allocation(device, pointer)
        key = (device, handle)
        with self._lock:
            if self._closed:
                raise RuntimeError("the client's shared memory is closed")
            known = self._regions.get(key)
            if known is not None:
                self._regions.move_to_end(key)
        if known is None:
            name = f"normserve-cuda-{os.getpid()}-{secrets.token_hex(16)}"
            self._run(protocol.register_cuda_ipc(name, handle, device, size))
            known = (name, base, size)
            evicted = []
            with self._lock:
                self._regions[key] = known
                while len(self._regions) > self.max_regions:
                    evicted.append(self._regions.popitem(last=False)[1][0])
            for old in evicted:
                self._unregister(old)
        return known[0], pointer - known[1], nbytes

    def reregister(self) -> None:
        """Forgets every registration (the server's lease or a restart
        forgot them): the next calls register again."""
        with self._lock:
            self._regions.clear()

    def _unregister(self, name: str) -> None:
        try:
            self._run(protocol.unregister_shared_memory(name))
        except errors.NormserveError:
            pass  # already gone (lease, restart)

    def close(self) -> None:
        """Unregisters every CUDA IPC region of this client."""
        with self._lock:
            names = [name for name, _, _ in self._regions.values()]
            self._regions.clear()
            self._closed = True
        for name in names:
            self._unregister(name)


class CudaCall:
    """One forward through CUDA IPC: its input and output ranges and the
    output tensor (`out`, or a fresh tensor like the input, which the
    caching allocator usually places in a segment already registered)."""

    def __init__(self, pool: CudaIpcPool, x: Any, out: Any | None) -> None:
        torch = codec.import_torch()
        self.wire = codec.wire_dtype(x.dtype)
        if x.numel() == 0:
            raise ValueError("shm=True: the tensor holds no elements")
        if out is not None:
            if not is_cuda_tensor(out) or out.device != x.device:
                raise ValueError(f"out: must be a CUDA tensor on {x.device}")
            if out.dtype != x.dtype or tuple(out.shape) != tuple(x.shape) or not out.is_contiguous():
                raise ValueError(f"out: must be contiguous, of the input's dtype and shape {tuple(x.shape)}")
        self.input = x.detach().contiguous()
        self.out = out
        self.header = tensor_pb2.Tensor(dtype=codec._data_type(self.wire), shape=tuple(x.shape))
        self.target = out if out is not None else torch.empty_like(self.input)
        # The input's producer has finished before the server reads it.
        torch.cuda.synchronize(x.device)
        self.input_range = pool.range(self.input)
        self.output_range = pool.range(self.target)

    def output(self) -> Any:
        """The output the server wrote (`out` itself when given)."""
        return self.target
