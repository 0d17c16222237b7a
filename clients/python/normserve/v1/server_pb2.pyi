from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeviceInfo(_message.Message):
    __slots__ = ("name", "description", "total_memory_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    total_memory_bytes: int
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., total_memory_bytes: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_sessions", "max_tensor_elements", "max_num_features", "max_message_bytes", "memory_budget_bytes", "memory_charged_bytes", "replay_cache_total_bytes", "shared_memory_max_bytes", "shared_memory_mapped_bytes", "shared_memory_regions")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CHARGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLAY_CACHE_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_REGIONS_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    max_tensor_elements: int
    max_num_features: int
    max_message_bytes: int
    memory_budget_bytes: int
    memory_charged_bytes: int
    replay_cache_total_bytes: int
    shared_memory_max_bytes: int
    shared_memory_mapped_bytes: int
    shared_memory_regions: int
    def __init__(self, max_sessions: _Optional[int] = ..., max_tensor_elements: _Optional[int] = ..., max_num_features: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., memory_budget_bytes: _Optional[int] = ..., memory_charged_bytes: _Optional[int] = ..., replay_cache_total_bytes: _Optional[int] = ..., shared_memory_max_bytes: _Optional[int] = ..., shared_memory_mapped_bytes: _Optional[int] = ..., shared_memory_regions: _Optional[int] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("server_version", "libtorch_version", "default_device", "devices", "cuda_device_count", "limits", "features", "intra_op_threads", "compute_threads", "sessions", "unreadable_sessions", "store")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LIBTORCH_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    CUDA_DEVICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_THREADS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    UNREADABLE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    libtorch_version: str
    default_device: str
    devices: _containers.RepeatedCompositeFieldContainer[DeviceInfo]
    cuda_device_count: int
    limits: Limits
    features: _containers.RepeatedScalarFieldContainer[str]
    intra_op_threads: int
    compute_threads: int
    sessions: int
    unreadable_sessions: int
    store: str
    def __init__(self, server_version: _Optional[str] = ..., libtorch_version: _Optional[str] = ..., default_device: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[DeviceInfo, _Mapping]]] = ..., cuda_device_count: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., features: _Optional[_Iterable[str]] = ..., intra_op_threads: _Optional[int] = ..., compute_threads: _Optional[int] = ..., sessions: _Optional[int] = ..., unreadable_sessions: _Optional[int] = ..., store: _Optional[str] = ...) -> None: ...
