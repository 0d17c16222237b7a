import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from normserve.v1 import shared_memory_pb2 as _shared_memory_pb2
from normserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BatchNormKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_NORM_KIND_UNSPECIFIED: _ClassVar[BatchNormKind]
    BATCH_NORM_1D: _ClassVar[BatchNormKind]
    BATCH_NORM_2D: _ClassVar[BatchNormKind]
    BATCH_NORM_3D: _ClassVar[BatchNormKind]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_TRAIN: _ClassVar[Mode]
    MODE_EVAL: _ClassVar[Mode]

class ReducePhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCE_PHASE_UNSPECIFIED: _ClassVar[ReducePhase]
    REDUCE_PHASE_FORWARD: _ClassVar[ReducePhase]
    REDUCE_PHASE_BACKWARD: _ClassVar[ReducePhase]
BATCH_NORM_KIND_UNSPECIFIED: BatchNormKind
BATCH_NORM_1D: BatchNormKind
BATCH_NORM_2D: BatchNormKind
BATCH_NORM_3D: BatchNormKind
MODE_UNSPECIFIED: Mode
MODE_TRAIN: Mode
MODE_EVAL: Mode
REDUCE_PHASE_UNSPECIFIED: ReducePhase
REDUCE_PHASE_FORWARD: ReducePhase
REDUCE_PHASE_BACKWARD: ReducePhase

class SessionConfig(_message.Message):
    __slots__ = ("kind", "num_features", "eps", "momentum", "cumulative_average", "affine", "track_running_stats", "param_dtype", "default_mode", "reject_non_finite", "labels", "exact_statistics", "step_timeout_seconds")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    AFFINE_FIELD_NUMBER: _ClassVar[int]
    TRACK_RUNNING_STATS_FIELD_NUMBER: _ClassVar[int]
    PARAM_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    REJECT_NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    EXACT_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    kind: BatchNormKind
    num_features: int
    eps: float
    momentum: float
    cumulative_average: bool
    affine: bool
    track_running_stats: bool
    param_dtype: _tensor_pb2.DataType
    default_mode: Mode
    reject_non_finite: bool
    labels: _containers.ScalarMap[str, str]
    exact_statistics: bool
    step_timeout_seconds: float
    def __init__(self, kind: _Optional[_Union[BatchNormKind, str]] = ..., num_features: _Optional[int] = ..., eps: _Optional[float] = ..., momentum: _Optional[float] = ..., cumulative_average: _Optional[bool] = ..., affine: _Optional[bool] = ..., track_running_stats: _Optional[bool] = ..., param_dtype: _Optional[_Union[_tensor_pb2.DataType, str]] = ..., default_mode: _Optional[_Union[Mode, str]] = ..., reject_non_finite: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ..., exact_statistics: _Optional[bool] = ..., step_timeout_seconds: _Optional[float] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "config", "device", "version", "num_batches_tracked", "weight", "bias", "running_mean", "running_var", "created_at", "updated_at", "last_used_at", "standard_scaler")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_TRACKED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MEAN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VAR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    STANDARD_SCALER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: SessionConfig
    device: str
    version: int
    num_batches_tracked: int
    weight: _tensor_pb2.Tensor
    bias: _tensor_pb2.Tensor
    running_mean: _tensor_pb2.Tensor
    running_var: _tensor_pb2.Tensor
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    last_used_at: _timestamp_pb2.Timestamp
    standard_scaler: StandardScalerStatistics
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[SessionConfig, _Mapping]] = ..., device: _Optional[str] = ..., version: _Optional[int] = ..., num_batches_tracked: _Optional[int] = ..., weight: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., bias: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., running_mean: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., running_var: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., standard_scaler: _Optional[_Union[StandardScalerStatistics, _Mapping]] = ...) -> None: ...

class StandardScalerStatistics(_message.Message):
    __slots__ = ("mean", "var", "scale", "n_samples_seen")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    VAR_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    N_SAMPLES_SEEN_FIELD_NUMBER: _ClassVar[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    var: _containers.RepeatedScalarFieldContainer[float]
    scale: _containers.RepeatedScalarFieldContainer[float]
    n_samples_seen: int
    def __init__(self, mean: _Optional[_Iterable[float]] = ..., var: _Optional[_Iterable[float]] = ..., scale: _Optional[_Iterable[float]] = ..., n_samples_seen: _Optional[int] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "kind", "num_features", "eps", "momentum", "cumulative_average", "affine", "track_running_stats", "param_dtype", "device", "default_mode", "reject_non_finite", "labels", "weight", "bias", "running_mean", "running_var", "num_batches_tracked", "exact_statistics", "step_timeout_seconds")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    AFFINE_FIELD_NUMBER: _ClassVar[int]
    TRACK_RUNNING_STATS_FIELD_NUMBER: _ClassVar[int]
    PARAM_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    REJECT_NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MEAN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VAR_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_TRACKED_FIELD_NUMBER: _ClassVar[int]
    EXACT_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    kind: BatchNormKind
    num_features: int
    eps: float
    momentum: float
    cumulative_average: bool
    affine: bool
    track_running_stats: bool
    param_dtype: _tensor_pb2.DataType
    device: str
    default_mode: Mode
    reject_non_finite: bool
    labels: _containers.ScalarMap[str, str]
    weight: _tensor_pb2.Tensor
    bias: _tensor_pb2.Tensor
    running_mean: _tensor_pb2.Tensor
    running_var: _tensor_pb2.Tensor
    num_batches_tracked: int
    exact_statistics: bool
    step_timeout_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., kind: _Optional[_Union[BatchNormKind, str]] = ..., num_features: _Optional[int] = ..., eps: _Optional[float] = ..., momentum: _Optional[float] = ..., cumulative_average: _Optional[bool] = ..., affine: _Optional[bool] = ..., track_running_stats: _Optional[bool] = ..., param_dtype: _Optional[_Union[_tensor_pb2.DataType, str]] = ..., device: _Optional[str] = ..., default_mode: _Optional[_Union[Mode, str]] = ..., reject_non_finite: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ..., weight: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., bias: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., running_mean: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., running_var: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., num_batches_tracked: _Optional[int] = ..., exact_statistics: _Optional[bool] = ..., step_timeout_seconds: _Optional[float] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session", "already_existed")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ALREADY_EXISTED_FIELD_NUMBER: _ClassVar[int]
    session: Session
    already_existed: bool
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., already_existed: _Optional[bool] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "label_selector", "include_tensors")
    class LabelSelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    label_selector: _containers.ScalarMap[str, str]
    include_tensors: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., label_selector: _Optional[_Mapping[str, str]] = ..., include_tensors: _Optional[bool] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token", "unreadable")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    UNREADABLE_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    unreadable: _containers.RepeatedCompositeFieldContainer[UnreadableSession]
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., unreadable: _Optional[_Iterable[_Union[UnreadableSession, _Mapping]]] = ...) -> None: ...

class UnreadableSession(_message.Message):
    __slots__ = ("session_id", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id", "expected_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    expected_version: int
    def __init__(self, session_id: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetRunningStatsRequest(_message.Message):
    __slots__ = ("session_id", "expected_version", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    expected_version: int
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., expected_version: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ResetRunningStatsResponse(_message.Message):
    __slots__ = ("session", "replayed")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    session: Session
    replayed: bool
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class UpdateParametersRequest(_message.Message):
    __slots__ = ("session_id", "weight", "bias", "running_mean", "running_var", "num_batches_tracked", "eps", "momentum", "cumulative_average", "expected_version", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MEAN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VAR_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_TRACKED_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    weight: _tensor_pb2.Tensor
    bias: _tensor_pb2.Tensor
    running_mean: _tensor_pb2.Tensor
    running_var: _tensor_pb2.Tensor
    num_batches_tracked: int
    eps: float
    momentum: float
    cumulative_average: bool
    expected_version: int
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., weight: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., bias: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., running_mean: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., running_var: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., num_batches_tracked: _Optional[int] = ..., eps: _Optional[float] = ..., momentum: _Optional[float] = ..., cumulative_average: _Optional[bool] = ..., expected_version: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class UpdateParametersResponse(_message.Message):
    __slots__ = ("session", "replayed")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    session: Session
    replayed: bool
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "input", "mode", "expected_version", "request_id", "step", "input_region", "output_region")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    INPUT_REGION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REGION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    input: _tensor_pb2.Tensor
    mode: Mode
    expected_version: int
    request_id: str
    step: StepSpec
    input_region: _shared_memory_pb2.SharedMemoryRange
    output_region: _shared_memory_pb2.SharedMemoryRange
    def __init__(self, session_id: _Optional[str] = ..., input: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., mode: _Optional[_Union[Mode, str]] = ..., expected_version: _Optional[int] = ..., request_id: _Optional[str] = ..., step: _Optional[_Union[StepSpec, _Mapping]] = ..., input_region: _Optional[_Union[_shared_memory_pb2.SharedMemoryRange, _Mapping]] = ..., output_region: _Optional[_Union[_shared_memory_pb2.SharedMemoryRange, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("output", "version", "num_batches_tracked", "replayed", "step_statistics", "output_region")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_TRACKED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    STEP_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_REGION_FIELD_NUMBER: _ClassVar[int]
    output: _tensor_pb2.Tensor
    version: int
    num_batches_tracked: int
    replayed: bool
    step_statistics: StepStatistics
    output_region: _shared_memory_pb2.SharedMemoryRange
    def __init__(self, output: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., version: _Optional[int] = ..., num_batches_tracked: _Optional[int] = ..., replayed: _Optional[bool] = ..., step_statistics: _Optional[_Union[StepStatistics, _Mapping]] = ..., output_region: _Optional[_Union[_shared_memory_pb2.SharedMemoryRange, _Mapping]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ForwardStreamResponse(_message.Message):
    __slots__ = ("index", "response", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    response: ForwardResponse
    error: StreamError
    def __init__(self, index: _Optional[int] = ..., response: _Optional[_Union[ForwardResponse, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class ExportStateRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ExportStateResponse(_message.Message):
    __slots__ = ("safetensors", "version")
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    safetensors: bytes
    version: int
    def __init__(self, safetensors: _Optional[bytes] = ..., version: _Optional[int] = ...) -> None: ...

class ImportStateRequest(_message.Message):
    __slots__ = ("session_id", "safetensors", "strict", "expected_version", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SAFETENSORS_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    safetensors: bytes
    strict: bool
    expected_version: int
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., safetensors: _Optional[bytes] = ..., strict: _Optional[bool] = ..., expected_version: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ImportStateResponse(_message.Message):
    __slots__ = ("session", "replayed")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    session: Session
    replayed: bool
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class MergeSessionRequest(_message.Message):
    __slots__ = ("session_id", "source_session_id", "expected_version", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    source_session_id: str
    expected_version: int
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., source_session_id: _Optional[str] = ..., expected_version: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class MergeSessionResponse(_message.Message):
    __slots__ = ("session", "replayed")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    session: Session
    replayed: bool
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class StepSpec(_message.Message):
    __slots__ = ("step", "world_size", "rank")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    step: int
    world_size: int
    rank: int
    def __init__(self, step: _Optional[int] = ..., world_size: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class StepStatistics(_message.Message):
    __slots__ = ("step", "count", "mean", "var", "unbiased_var")
    STEP_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    VAR_FIELD_NUMBER: _ClassVar[int]
    UNBIASED_VAR_FIELD_NUMBER: _ClassVar[int]
    step: int
    count: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    var: _containers.RepeatedScalarFieldContainer[float]
    unbiased_var: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, step: _Optional[int] = ..., count: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., var: _Optional[_Iterable[float]] = ..., unbiased_var: _Optional[_Iterable[float]] = ...) -> None: ...

class ReduceStatisticsRequest(_message.Message):
    __slots__ = ("session_id", "step", "phase", "count", "mean", "m2", "sum_grad_output", "sum_grad_output_centered", "update_running_stats", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    M2_FIELD_NUMBER: _ClassVar[int]
    SUM_GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SUM_GRAD_OUTPUT_CENTERED_FIELD_NUMBER: _ClassVar[int]
    UPDATE_RUNNING_STATS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: StepSpec
    phase: ReducePhase
    count: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    m2: _containers.RepeatedScalarFieldContainer[float]
    sum_grad_output: _containers.RepeatedScalarFieldContainer[float]
    sum_grad_output_centered: _containers.RepeatedScalarFieldContainer[float]
    update_running_stats: bool
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[_Union[StepSpec, _Mapping]] = ..., phase: _Optional[_Union[ReducePhase, str]] = ..., count: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., m2: _Optional[_Iterable[float]] = ..., sum_grad_output: _Optional[_Iterable[float]] = ..., sum_grad_output_centered: _Optional[_Iterable[float]] = ..., update_running_stats: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReduceStatisticsResponse(_message.Message):
    __slots__ = ("statistics", "sum_grad_output", "sum_grad_output_centered", "version", "num_batches_tracked", "replayed")
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    SUM_GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SUM_GRAD_OUTPUT_CENTERED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_TRACKED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    statistics: StepStatistics
    sum_grad_output: _containers.RepeatedScalarFieldContainer[float]
    sum_grad_output_centered: _containers.RepeatedScalarFieldContainer[float]
    version: int
    num_batches_tracked: int
    replayed: bool
    def __init__(self, statistics: _Optional[_Union[StepStatistics, _Mapping]] = ..., sum_grad_output: _Optional[_Iterable[float]] = ..., sum_grad_output_centered: _Optional[_Iterable[float]] = ..., version: _Optional[int] = ..., num_batches_tracked: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ReduceStatisticsStreamResponse(_message.Message):
    __slots__ = ("index", "response", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    response: ReduceStatisticsResponse
    error: StreamError
    def __init__(self, index: _Optional[int] = ..., response: _Optional[_Union[ReduceStatisticsResponse, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...
