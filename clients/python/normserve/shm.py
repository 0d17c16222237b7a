"""Shared-memory tensors for a server on this host.

`session.forward(x, shm=True)` sends no tensor bytes over gRPC: the client
copies `x` into a POSIX shared-memory object it created (/dev/shm/<name>,
registered with the server once), the server reads it there in place and
writes the output into another range of it, and the client copies the
output out. An array made by `client.shared_array(shape, dtype)` already
lives in a registered object: passing it as `x` (or as `out=`) skips that
copy too.

The objects are this client's: created with mode 0o600 (the server must run
as the same user, or pass `mode=` to `client.enable_shared_memory`), named
with 128 random bits, unregistered and unlinked by `client.close()` (or the
`with` block's end), and unlinked at interpreter exit at the latest. A
process killed outright leaves its objects in /dev/shm; the server unmaps
them after its idle lease (--shared-memory-idle-seconds).

numpy arrays and CPU torch tensors (float32, float64, float16, bfloat16);
CUDA torch tensors go through CUDA IPC handles instead (normserve.cuda_ipc,
`forward` only); the blocking client only.
"""

from __future__ import annotations

import mmap
import os
import secrets
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from normserve import codec, errors, protocol
from normserve.codec import Array
from normserve.v1 import tensor_pb2

SHM_DIR = "/dev/shm"
# Ranges start on this boundary: every dtype is aligned there.
_ALIGN = 64
# Scratch objects are at least this large, so that small calls share one.
MIN_SCRATCH_BYTES = 1 << 20


def _round_up(value: int, to: int) -> int:
    return -(-value // to) * to


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class SharedObject:
    """One /dev/shm object created and mapped by this client."""

    def __init__(self, size: int, mode: int) -> None:
        self.name = f"normserve-{os.getpid()}-{secrets.token_hex(16)}"
        self.path = os.path.join(SHM_DIR, self.name)
        self.size = size
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode)
        try:
            os.fchmod(fd, mode)  # not narrowed by the umask
            os.ftruncate(fd, size)
            self._mmap: mmap.mmap | None = mmap.mmap(fd, size)
        except BaseException:
            _unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.bytes: np.ndarray[Any, np.dtype[np.uint8]] = np.frombuffer(self._mmap, dtype=np.uint8)
        self.address: int = self.bytes.ctypes.data
        # Unlinked at exit even if never closed.
        self._finalizer = weakref.finalize(self, _unlink, self.path)

    def locate(self, address: int, nbytes: int) -> int | None:
        """The offset of [address, address + nbytes) in this object, or None."""
        if self.address <= address and address + nbytes <= self.address + self.size:
            return address - self.address
        return None

    def close(self) -> None:
        """Unlinks the object and unmaps it (once nothing views it)."""
        self._finalizer()
        self.bytes = np.empty(0, dtype=np.uint8)
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # an array still views it: unmapped when that goes
            self._mmap = None


class SharedMemoryPool:
    """The objects a client shares with the server: scratch objects for
    copied inputs and outputs (reused, at most `max_scratch` at once; callers
    wait for one beyond that) and the buffers handed out by `array()`.
    `run` runs a protocol Call on the client (registration)."""

    def __init__(self, run: Callable[[protocol.Call[Any]], Any], *, mode: int = 0o600,
                 max_scratch: int = 8) -> None:
        if max_scratch < 1:
            raise ValueError("max_scratch: must be >= 1")
        self._run = run
        self.mode = mode
        self.max_scratch = max_scratch
        self._lock = threading.Condition()
        self._free: list[SharedObject] = []
        self._busy: set[SharedObject] = set()
        self._buffers: list[SharedObject] = []
        self._closed = False
        self._cuda: Any = None

    @property
    def cuda(self) -> Any:
        """The client's CUDA IPC registrations (a normserve.cuda_ipc.CudaIpcPool),
        made on first use."""
        from normserve.cuda_ipc import CudaIpcPool

        with self._lock:
            if self._closed:
                raise RuntimeError("the client's shared memory is closed")
            if self._cuda is None:
                self._cuda = CudaIpcPool(self._run)
            pool: CudaIpcPool = self._cuda
        return pool

    def _register(self, obj: SharedObject) -> None:
        self._run(protocol.register_shared_memory(obj.name, obj.size))

    def _new(self, size: int) -> SharedObject:
        obj = SharedObject(size, self.mode)
        try:
            self._register(obj)
        except BaseException:
            obj.close()
            raise
        return obj

    def _drop(self, obj: SharedObject) -> None:
        try:
            self._run(protocol.unregister_shared_memory(obj.name))
        except errors.NormserveError:
            pass  # already gone (lease, restart): unlinking is what matters
        obj.close()

    def acquire(self, nbytes: int) -> SharedObject:
        """A scratch object of at least `nbytes`, for one call (release it)."""
        with self._lock:
            while True:
                if self._closed:
                    raise RuntimeError("the client's shared memory is closed")
                fitting = [obj for obj in self._free if obj.size >= nbytes]
                if fitting:
                    obj = min(fitting, key=lambda o: o.size)
                    self._free.remove(obj)
                    self._busy.add(obj)
                    return obj
                if len(self._free) + len(self._busy) < self.max_scratch:
                    break
                if self._free:  # all too small: replace the smallest
                    smallest = min(self._free, key=lambda o: o.size)
                    self._free.remove(smallest)
                    self._drop(smallest)
                    break
                self._lock.wait()
        obj = self._new(max(_round_up(nbytes, mmap.PAGESIZE), MIN_SCRATCH_BYTES))
        with self._lock:
            self._busy.add(obj)
        return obj

    def release(self, obj: SharedObject) -> None:
        with self._lock:
            self._busy.discard(obj)
            if self._closed:
                obj.close()
            else:
                self._free.append(obj)
            self._lock.notify()

    def array(self, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray[Any, Any]:
        """A zeroed numpy array living in its own registered object: used as
        a forward's input or `out=`, it is read or written by the server in
        place. Valid until the client is closed."""
        np_dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
        obj = self._new(max(_round_up(nbytes, mmap.PAGESIZE), mmap.PAGESIZE))
        with self._lock:
            self._buffers.append(obj)
        view: np.ndarray[Any, Any] = obj.bytes[:nbytes].view(np_dtype).reshape(shape)
        return view

    def locate(self, array: np.ndarray[Any, Any]) -> tuple[str, int] | None:
        """(object name, offset) of a C-contiguous little-endian array lying
        in one of this pool's objects, else None."""
        if not array.flags.c_contiguous or array.dtype.byteorder == ">" or array.nbytes == 0:
            return None
        address = array.ctypes.data
        with self._lock:
            objects = [*self._buffers, *self._busy, *self._free]
        for obj in objects:
            offset = obj.locate(address, array.nbytes)
            if offset is not None:
                return obj.name, offset
        return None

    def reregister(self) -> None:
        """Registers every object again (after the server's idle lease or a
        restart forgot them; registering is idempotent)."""
        with self._lock:
            objects = [*self._buffers, *self._busy, *self._free]
        for obj in objects:
            self._register(obj)

    def close(self) -> None:
        """Unregisters and unlinks every object (busy ones when released)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            objects = [*self._buffers, *self._free]
            self._buffers.clear()
            self._free.clear()
            self._lock.notify_all()
            cuda = self._cuda
        if cuda is not None:
            cuda.close()
        for obj in objects:
            self._drop(obj)


def _host_array(x: Array) -> tuple[np.ndarray[Any, Any], int]:
    """`x` as a little-endian numpy view (bfloat16 as int16 bits) and its wire
    dtype; CPU only."""
    if codec.is_torch_tensor(x) and x.device.type != "cpu":
        raise ValueError("shm=True here takes numpy arrays and CPU torch tensors; this tensor is on "
                         f"{x.device} (forward(x, shm=True) takes CUDA tensors, through CUDA IPC)")
    return codec._as_array(x)


def _output(source: np.ndarray[Any, Any], wire: int, shape: tuple[int, ...], like: Array) -> Array:
    """A copy of the output bytes `source` as `like` was given."""
    if wire == codec.BFLOAT16:
        torch = codec.import_torch()
        return torch.from_numpy(source.view("<i2").copy()).view(torch.bfloat16).reshape(shape)
    values = source.view(codec._NUMPY_WIRE[wire]).reshape(shape).copy()
    if codec.is_torch_tensor(like):
        return sys.modules["torch"].from_numpy(values)
    return values


class SharedCall:
    """One forward through shared memory: where its input and output are,
    the scratch object it holds (released by `finish`), and how to read its
    output."""

    def __init__(self, pool: SharedMemoryPool, x: Array, out: Array | None) -> None:
        self.pool = pool
        self.like = x
        array, self.wire = _host_array(x)
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.header = tensor_pb2.Tensor(dtype=codec._data_type(self.wire), shape=self.shape)
        nbytes = array.nbytes
        self.nbytes = nbytes
        self.scratch: SharedObject | None = None
        self.out = out
        placed = pool.locate(array)
        out_placed = None
        if out is not None:
            out_array, out_wire = _host_array(out)
            if out_wire != self.wire or tuple(out_array.shape) != self.shape:
                raise ValueError(f"out: must have the input's dtype and shape {self.shape}")
            out_placed = pool.locate(out_array)
            if out_placed is None:
                raise ValueError("out: must live in the client's shared memory (client.shared_array)")
        need = (0 if placed else _round_up(nbytes, _ALIGN)) + (0 if out_placed else nbytes)
        if need:
            self.scratch = pool.acquire(max(need, 1))
        cursor = 0
        if placed is None:
            assert self.scratch is not None
            target = self.scratch.bytes[:nbytes]
            target[...] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            placed = (self.scratch.name, 0)
            cursor = _round_up(nbytes, _ALIGN)
        if out_placed is None:
            assert self.scratch is not None
            out_placed = (self.scratch.name, cursor)
        self.input_range: protocol.SharedRange = (placed[0], placed[1], nbytes)
        self.output_range: protocol.SharedRange = (out_placed[0], out_placed[1], nbytes)

    def output(self) -> Array:
        """The output the server wrote: `out` itself, or a copy."""
        if self.out is not None:
            return self.out
        assert self.scratch is not None
        offset = self.output_range[1]
        return _output(self.scratch.bytes[offset:offset + self.nbytes], self.wire, self.shape, self.like)

    def finish(self) -> None:
        if self.scratch is not None:
            self.pool.release(self.scratch)
            self.scratch = None


def is_region_gone(error: errors.NormserveError) -> bool:
    """A Forward refused because the server no longer has the region
    (its idle lease expired, or it restarted): register again and retry."""
    return isinstance(error, errors.NotFound) and "shared memory region" in error.details
