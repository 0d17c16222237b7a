from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterSharedMemoryRequest(_message.Message):
    __slots__ = ("name", "offset", "byte_size", "cuda_ipc")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    byte_size: int
    cuda_ipc: CudaIpcMemory
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ..., cuda_ipc: _Optional[_Union[CudaIpcMemory, _Mapping]] = ...) -> None: ...

class CudaIpcMemory(_message.Message):
    __slots__ = ("handle", "device")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    handle: bytes
    device: int
    def __init__(self, handle: _Optional[bytes] = ..., device: _Optional[int] = ...) -> None: ...

class RegisterSharedMemoryResponse(_message.Message):
    __slots__ = ("region", "already_registered")
    REGION_FIELD_NUMBER: _ClassVar[int]
    ALREADY_REGISTERED_FIELD_NUMBER: _ClassVar[int]
    region: SharedMemoryRegion
    already_registered: bool
    def __init__(self, region: _Optional[_Union[SharedMemoryRegion, _Mapping]] = ..., already_registered: _Optional[bool] = ...) -> None: ...

class UnregisterSharedMemoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryResponse(_message.Message):
    __slots__ = ("unregistered",)
    UNREGISTERED_FIELD_NUMBER: _ClassVar[int]
    unregistered: int
    def __init__(self, unregistered: _Optional[int] = ...) -> None: ...

class SharedMemoryStatusRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SharedMemoryStatusResponse(_message.Message):
    __slots__ = ("regions", "tenant_max_regions", "tenant_max_bytes", "idle_seconds")
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    TENANT_MAX_REGIONS_FIELD_NUMBER: _ClassVar[int]
    TENANT_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[SharedMemoryRegion]
    tenant_max_regions: int
    tenant_max_bytes: int
    idle_seconds: int
    def __init__(self, regions: _Optional[_Iterable[_Union[SharedMemoryRegion, _Mapping]]] = ..., tenant_max_regions: _Optional[int] = ..., tenant_max_bytes: _Optional[int] = ..., idle_seconds: _Optional[int] = ...) -> None: ...

class SharedMemoryRegion(_message.Message):
    __slots__ = ("name", "offset", "byte_size", "idle_seconds", "cuda_ipc")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    byte_size: int
    idle_seconds: float
    cuda_ipc: CudaIpcRegion
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ..., idle_seconds: _Optional[float] = ..., cuda_ipc: _Optional[_Union[CudaIpcRegion, _Mapping]] = ...) -> None: ...

class CudaIpcRegion(_message.Message):
    __slots__ = ("device",)
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    device: int
    def __init__(self, device: _Optional[int] = ...) -> None: ...

class SharedMemoryRange(_message.Message):
    __slots__ = ("region", "offset", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...
