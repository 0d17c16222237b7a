from normserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Implementation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMPLEMENTATION_UNSPECIFIED: _ClassVar[Implementation]
    IMPLEMENTATION_REFERENCE: _ClassVar[Implementation]
    IMPLEMENTATION_FLOAT64_REFERENCE: _ClassVar[Implementation]
    IMPLEMENTATION_MANUAL_BIASED: _ClassVar[Implementation]
    IMPLEMENTATION_MANUAL_UNBIASED: _ClassVar[Implementation]
    IMPLEMENTATION_CANDIDATE: _ClassVar[Implementation]
IMPLEMENTATION_UNSPECIFIED: Implementation
IMPLEMENTATION_REFERENCE: Implementation
IMPLEMENTATION_FLOAT64_REFERENCE: Implementation
IMPLEMENTATION_MANUAL_BIASED: Implementation
IMPLEMENTATION_MANUAL_UNBIASED: Implementation
IMPLEMENTATION_CANDIDATE: Implementation

class CompareRequest(_message.Message):
    __slots__ = ("input", "weight", "bias", "running_mean", "running_var", "num_batches_tracked", "training", "eps", "momentum", "cumulative_average", "grad_output", "candidate", "rtol", "atol", "implementations", "return_tensors", "device")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MEAN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VAR_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_TRACKED_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_FIELD_NUMBER: _ClassVar[int]
    RTOL_FIELD_NUMBER: _ClassVar[int]
    ATOL_FIELD_NUMBER: _ClassVar[int]
    IMPLEMENTATIONS_FIELD_NUMBER: _ClassVar[int]
    RETURN_TENSORS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    input: _tensor_pb2.Tensor
    weight: _tensor_pb2.Tensor
    bias: _tensor_pb2.Tensor
    running_mean: _tensor_pb2.Tensor
    running_var: _tensor_pb2.Tensor
    num_batches_tracked: int
    training: bool
    eps: float
    momentum: float
    cumulative_average: bool
    grad_output: _tensor_pb2.Tensor
    candidate: Candidate
    rtol: float
    atol: float
    implementations: _containers.RepeatedScalarFieldContainer[Implementation]
    return_tensors: bool
    device: str
    def __init__(self, input: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., weight: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., bias: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., running_mean: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., running_var: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., num_batches_tracked: _Optional[int] = ..., training: _Optional[bool] = ..., eps: _Optional[float] = ..., momentum: _Optional[float] = ..., cumulative_average: _Optional[bool] = ..., grad_output: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., candidate: _Optional[_Union[Candidate, _Mapping]] = ..., rtol: _Optional[float] = ..., atol: _Optional[float] = ..., implementations: _Optional[_Iterable[_Union[Implementation, str]]] = ..., return_tensors: _Optional[bool] = ..., device: _Optional[str] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("output", "running_mean", "running_var", "grad_input", "grad_weight", "grad_bias")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MEAN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VAR_FIELD_NUMBER: _ClassVar[int]
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    GRAD_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRAD_BIAS_FIELD_NUMBER: _ClassVar[int]
    output: _tensor_pb2.Tensor
    running_mean: _tensor_pb2.Tensor
    running_var: _tensor_pb2.Tensor
    grad_input: _tensor_pb2.Tensor
    grad_weight: _tensor_pb2.Tensor
    grad_bias: _tensor_pb2.Tensor
    def __init__(self, output: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., running_mean: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., running_var: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., grad_input: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., grad_weight: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., grad_bias: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class Difference(_message.Message):
    __slots__ = ("max_abs_diff", "max_rel_diff", "argmax_index", "per_channel_max_abs_diff", "allclose", "mismatched_elements")
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    MAX_REL_DIFF_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_INDEX_FIELD_NUMBER: _ClassVar[int]
    PER_CHANNEL_MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    ALLCLOSE_FIELD_NUMBER: _ClassVar[int]
    MISMATCHED_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    max_abs_diff: float
    max_rel_diff: float
    argmax_index: _containers.RepeatedScalarFieldContainer[int]
    per_channel_max_abs_diff: _containers.RepeatedScalarFieldContainer[float]
    allclose: bool
    mismatched_elements: int
    def __init__(self, max_abs_diff: _Optional[float] = ..., max_rel_diff: _Optional[float] = ..., argmax_index: _Optional[_Iterable[int]] = ..., per_channel_max_abs_diff: _Optional[_Iterable[float]] = ..., allclose: _Optional[bool] = ..., mismatched_elements: _Optional[int] = ...) -> None: ...

class TensorReport(_message.Message):
    __slots__ = ("vs_float64_reference", "vs_reference", "values")
    VS_FLOAT64_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    VS_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    vs_float64_reference: Difference
    vs_reference: Difference
    values: _tensor_pb2.Tensor
    def __init__(self, vs_float64_reference: _Optional[_Union[Difference, _Mapping]] = ..., vs_reference: _Optional[_Union[Difference, _Mapping]] = ..., values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ImplementationReport(_message.Message):
    __slots__ = ("implementation", "output", "running_mean", "running_var", "grad_input", "grad_weight", "grad_bias")
    IMPLEMENTATION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MEAN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VAR_FIELD_NUMBER: _ClassVar[int]
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    GRAD_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRAD_BIAS_FIELD_NUMBER: _ClassVar[int]
    implementation: Implementation
    output: TensorReport
    running_mean: TensorReport
    running_var: TensorReport
    grad_input: TensorReport
    grad_weight: TensorReport
    grad_bias: TensorReport
    def __init__(self, implementation: _Optional[_Union[Implementation, str]] = ..., output: _Optional[_Union[TensorReport, _Mapping]] = ..., running_mean: _Optional[_Union[TensorReport, _Mapping]] = ..., running_var: _Optional[_Union[TensorReport, _Mapping]] = ..., grad_input: _Optional[_Union[TensorReport, _Mapping]] = ..., grad_weight: _Optional[_Union[TensorReport, _Mapping]] = ..., grad_bias: _Optional[_Union[TensorReport, _Mapping]] = ...) -> None: ...

class Hypothesis(_message.Message):
    __slots__ = ("name", "max_abs_diff", "explains", "explanation", "fix", "tolerance_ratio", "parts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    EXPLAINS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    FIX_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_RATIO_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_abs_diff: float
    explains: bool
    explanation: str
    fix: str
    tolerance_ratio: float
    parts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., max_abs_diff: _Optional[float] = ..., explains: _Optional[bool] = ..., explanation: _Optional[str] = ..., fix: _Optional[str] = ..., tolerance_ratio: _Optional[float] = ..., parts: _Optional[_Iterable[str]] = ...) -> None: ...

class Diagnosis(_message.Message):
    __slots__ = ("matches_reference", "hypotheses", "ambiguities", "summary")
    MATCHES_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    HYPOTHESES_FIELD_NUMBER: _ClassVar[int]
    AMBIGUITIES_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    matches_reference: bool
    hypotheses: _containers.RepeatedCompositeFieldContainer[Hypothesis]
    ambiguities: _containers.RepeatedScalarFieldContainer[str]
    summary: str
    def __init__(self, matches_reference: _Optional[bool] = ..., hypotheses: _Optional[_Iterable[_Union[Hypothesis, _Mapping]]] = ..., ambiguities: _Optional[_Iterable[str]] = ..., summary: _Optional[str] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("reports", "diagnosis", "rtol", "atol", "device")
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    DIAGNOSIS_FIELD_NUMBER: _ClassVar[int]
    RTOL_FIELD_NUMBER: _ClassVar[int]
    ATOL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[ImplementationReport]
    diagnosis: Diagnosis
    rtol: float
    atol: float
    device: str
    def __init__(self, reports: _Optional[_Iterable[_Union[ImplementationReport, _Mapping]]] = ..., diagnosis: _Optional[_Union[Diagnosis, _Mapping]] = ..., rtol: _Optional[float] = ..., atol: _Optional[float] = ..., device: _Optional[str] = ...) -> None: ...
