"""What each call sends and how its reply reads, shared by the blocking
client (`normserve.Client`) and the asyncio one (`normserve.aio.Client`):
request building, reply conversion, and which failures are worth a retry.

No I/O here: each function returns a `Call` (the method, the request,
whether it is safe to repeat, and how to read the reply), which each client
runs its own way — blocking or awaited."""

from __future__ import annotations

import collections
import dataclasses
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from normserve import codec, compare as compare_module, errors
from normserve.codec import Array
from normserve.compare import CompareReport
from normserve.results import (
    UNSET,
    ForwardResult,
    ServerInfo,
    SessionInfo,
    StandardScalerStatistics,
    StateExport,
    _Unset,
    kind_value,
    module_kind,
)
from normserve.v1 import batch_norm_pb2 as bn, compare_pb2, server_pb2, shared_memory_pb2 as shm_pb2

T = TypeVar("T")
# A request message, or one whose tensor is spliced in (codec.SplicedRequest).
Request = Message | codec.SplicedRequest

# The server enforces its own message limit (max_message_bytes); the client
# adds none (gRPC's default would refuse replies above 4 MiB).
DEFAULT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # Let the server send large HTTP/2 DATA frames: it writes one frame per
    # syscall, and with the 16 KiB default a 16 MiB reply costs ~1000 of them
    # (measured: a 16 MiB Forward 125 ms -> 76 ms on a 2-core machine).
    ("grpc.http2.max_frame_size", 16 * 1024 * 1024 - 1),
)


@dataclasses.dataclass(frozen=True)
class Method:
    """One RPC: its path and its response message class."""

    path: str
    response: Any  # a generated message class

    @classmethod
    def of(cls, module: Any, service: str, name: str) -> Method:
        descriptor = module.DESCRIPTOR.services_by_name[service]
        output = descriptor.methods_by_name[name].output_type.name
        return cls(f"/{descriptor.full_name}/{name}", getattr(module, output))


CREATE_SESSION = Method.of(bn, "BatchNormService", "CreateSession")
GET_SESSION = Method.of(bn, "BatchNormService", "GetSession")
LIST_SESSIONS = Method.of(bn, "BatchNormService", "ListSessions")
DELETE_SESSION = Method.of(bn, "BatchNormService", "DeleteSession")
FORWARD = Method.of(bn, "BatchNormService", "Forward")
FORWARD_STREAM = Method.of(bn, "BatchNormService", "ForwardStream")
RESET_RUNNING_STATS = Method.of(bn, "BatchNormService", "ResetRunningStats")
UPDATE_PARAMETERS = Method.of(bn, "BatchNormService", "UpdateParameters")
EXPORT_STATE = Method.of(bn, "BatchNormService", "ExportState")
IMPORT_STATE = Method.of(bn, "BatchNormService", "ImportState")
MERGE_SESSION = Method.of(bn, "BatchNormService", "MergeSession")
GET_SERVER_INFO = Method.of(server_pb2, "ServerService", "GetServerInfo")
COMPARE = Method.of(compare_pb2, "CompareService", "Compare")
REGISTER_SHARED_MEMORY = Method.of(shm_pb2, "SharedMemoryService", "RegisterSharedMemory")
UNREGISTER_SHARED_MEMORY = Method.of(shm_pb2, "SharedMemoryService", "UnregisterSharedMemory")
SHARED_MEMORY_STATUS = Method.of(shm_pb2, "SharedMemoryService", "SharedMemoryStatus")


@dataclasses.dataclass(frozen=True)
class Call(Generic[T]):
    """One unary call: `parse(reply)` is what the client returns."""

    method: Method
    request: Request
    # Safe to repeat after an UNAVAILABLE (reads, and mutations with a request_id).
    retry: bool
    parse: Callable[[Any], T]


def retryable(error: grpc.RpcError, request: Request) -> bool:
    """Whether a call that failed with `error` may be sent again (when it is
    safe to repeat at all): UNAVAILABLE, and ABORTED from a lost
    compare-and-set race."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    # ABORTED is a lost compare-and-set race only when no expected_version was
    # sent; with one it is the version check, which a retry would fail again.
    if code == grpc.StatusCode.ABORTED:
        message = request.message if isinstance(request, codec.SplicedRequest) else request
        fields = message.DESCRIPTOR.fields_by_name
        return "expected_version" not in fields or not message.HasField("expected_version")
    return False


def backoff(base: float, attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (0, 1, ...)."""
    return float(base * 2 ** attempt)


def request_id_for(request_id: str | None, retries: int) -> str:
    """The request_id a mutation carries: the caller's, else a fresh one when
    the client retries (so that a retry is applied once), else none."""
    if request_id is None and retries > 0:
        return uuid.uuid4().hex
    return request_id or ""


def mode_value(training: bool) -> int:
    return bn.MODE_TRAIN if training else bn.MODE_EVAL


def _set_tensor(message: Message, field: str, value: Array | None) -> None:
    if value is not None:
        getattr(message, field).CopyFrom(codec.encode(value))


def _set_momentum(message: Any, momentum: float | None | _Unset) -> None:
    if momentum is None:
        message.cumulative_average = True
    elif not isinstance(momentum, _Unset):
        message.momentum = float(momentum)


def _session_info(reply: Any) -> SessionInfo:
    return SessionInfo.from_proto(reply.session, getattr(reply, "replayed", False))


# ------------------------------------------------------------------ sessions


@dataclasses.dataclass(frozen=True)
class Created:
    info: SessionInfo
    # True when a session with this id and configuration was there already.
    already_existed: bool


def create_session(kind: str | int, num_features: int, *, eps: float = 1e-5,
                   momentum: float | None | _Unset = UNSET, affine: bool = True, track_running_stats: bool = True,
                   dtype: Any = "float32", device: str | None = "", session_id: str | None = None,
                   labels: Mapping[str, str] | None = None, training: bool = True,
                   reject_non_finite: bool = False, weight: Array | None = None, bias: Array | None = None,
                   running_mean: Array | None = None, running_var: Array | None = None,
                   num_batches_tracked: int | None = None, exact_statistics: bool = False) -> Call[Created]:
    """momentum UNSET: the server's default (0.1), or none for exact_statistics."""
    request = bn.CreateSessionRequest(
        session_id=session_id or "",
        kind=kind_value(kind),  # type: ignore[arg-type]  # a checked BatchNormKind value
        num_features=num_features,
        eps=eps,
        affine=affine,
        track_running_stats=track_running_stats,
        param_dtype=codec.wire_dtype(dtype),  # type: ignore[arg-type]  # a checked DataType value
        device=device or "",
        default_mode=mode_value(training),  # type: ignore[arg-type]
        reject_non_finite=reject_non_finite,
        labels=dict(labels or {}),
        exact_statistics=exact_statistics,
    )
    _set_momentum(request, momentum)
    for field, value in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                         ("running_var", running_var)):
        _set_tensor(request, field, value)
    if num_batches_tracked is not None:
        request.num_batches_tracked = int(num_batches_tracked)
    # With a client-chosen id creation is idempotent, so safe to retry.
    return Call(CREATE_SESSION, request, bool(session_id),
                lambda reply: Created(SessionInfo.from_proto(reply.session), reply.already_existed))


def module_options(module: Any, dtype: Any, options: dict[str, Any]) -> dict[str, Any]:
    """create_session's arguments for a session with a local
    `nn.BatchNorm{1,2,3}d`'s configuration, state and mode."""
    kind = module_kind(module)
    state = module.state_dict()
    if dtype is None:
        tensors = [state[key] for key in ("weight", "running_mean") if key in state]
        dtype = tensors[0].dtype if tensors else "float32"
    initial = {key: state[key] for key in ("weight", "bias", "running_mean", "running_var") if key in state}
    if "num_batches_tracked" in state:
        initial["num_batches_tracked"] = int(state["num_batches_tracked"])
    options = {"training": module.training, **options}
    return dict(kind=kind, num_features=module.num_features, eps=module.eps, momentum=module.momentum,
                affine=module.affine, track_running_stats=module.track_running_stats, dtype=dtype,
                **initial, **options)


def get_session(session_id: str) -> Call[SessionInfo]:
    return Call(GET_SESSION, bn.GetSessionRequest(session_id=session_id), True, _session_info)


@dataclasses.dataclass(frozen=True)
class Page:
    sessions: list[SessionInfo]
    # "" after the last page.
    next_page_token: str


def list_sessions_page(labels: Mapping[str, str] | None, include_tensors: bool, page_size: int | None,
                       page_token: str) -> Call[Page]:
    request = bn.ListSessionsRequest(page_size=page_size or 0, page_token=page_token,
                                     label_selector=dict(labels or {}), include_tensors=include_tensors)
    return Call(LIST_SESSIONS, request, True,
                lambda reply: Page([SessionInfo.from_proto(s) for s in reply.sessions], reply.next_page_token))


def delete_session(session_id: str, expected_version: int | None) -> Call[None]:
    request = bn.DeleteSessionRequest(session_id=session_id)
    if expected_version is not None:
        request.expected_version = expected_version
    # Not retried: a retry after a lost reply would answer NotFound.
    return Call(DELETE_SESSION, request, False, lambda reply: None)


def forward(session_id: str, x: Array, training: bool, *, expected_version: int | None,
            request_id: str) -> Call[ForwardResult]:
    """A Forward whose input is spliced into the request (no protobuf copy);
    request_id: as request_id_for made it (train mode) or the caller's."""
    request = bn.ForwardRequest(session_id=session_id, mode=mode_value(training),  # type: ignore[arg-type]
                                request_id=request_id)
    if expected_version is not None:
        request.expected_version = expected_version

    def parse(reply: bn.ForwardResponse) -> ForwardResult:
        output = codec.decode_like(reply.output, x) if reply.HasField("output") else None
        return ForwardResult(output, reply.version, reply.num_batches_tracked, reply.replayed)

    # Eval changes nothing, and a train step with an id is applied once.
    return Call(FORWARD, codec.SplicedRequest(request, "input", x), not training or bool(request_id), parse)


# A range of a shared-memory region: (region name, offset, byte_size).
SharedRange = tuple[str, int, int]


def _shared_range(value: SharedRange) -> shm_pb2.SharedMemoryRange:
    region, offset, byte_size = value
    return shm_pb2.SharedMemoryRange(region=region, offset=offset, byte_size=byte_size)


def forward_shared_request(session_id: str, header: Any, training: bool, input_range: SharedRange,
                           output_range: SharedRange, *, expected_version: int | None = None,
                           request_id: str = "") -> bn.ForwardRequest:
    """A Forward whose input is read from, and output written to, shared
    memory; `header` is a Tensor with the input's dtype and shape only."""
    request = bn.ForwardRequest(session_id=session_id, mode=mode_value(training),  # type: ignore[arg-type]
                                request_id=request_id, input=header,
                                input_region=_shared_range(input_range),
                                output_region=_shared_range(output_range))
    if expected_version is not None:
        request.expected_version = expected_version
    return request


def forward_shared(session_id: str, header: Any, training: bool, input_range: SharedRange,
                   output_range: SharedRange, *, expected_version: int | None,
                   request_id: str) -> Call[tuple[ForwardResult, bool]]:
    """The Call of `forward_shared_request`; its reply reads as the result
    (without output) and whether the output was written."""
    request = forward_shared_request(session_id, header, training, input_range, output_range,
                                     expected_version=expected_version, request_id=request_id)

    def parse(reply: bn.ForwardResponse) -> tuple[ForwardResult, bool]:
        return (ForwardResult(None, reply.version, reply.num_batches_tracked, reply.replayed),
                reply.HasField("output_region"))

    return Call(FORWARD, request, not training or bool(request_id), parse)


def register_shared_memory(name: str, byte_size: int) -> Call[bool]:
    """Registers /dev/shm/<name> (idempotent); whether it already was."""
    return Call(REGISTER_SHARED_MEMORY, shm_pb2.RegisterSharedMemoryRequest(name=name, byte_size=byte_size),
                True, lambda reply: bool(reply.already_registered))


def register_cuda_ipc(name: str, handle: bytes, device: int, byte_size: int, offset: int = 0) -> Call[bool]:
    """Registers `byte_size` bytes from `offset` of the GPU allocation a CUDA
    IPC handle (64 bytes) exports on CUDA device `device`, as region `name`
    (idempotent); whether it already was."""
    request = shm_pb2.RegisterSharedMemoryRequest(
        name=name, offset=offset, byte_size=byte_size,
        cuda_ipc=shm_pb2.CudaIpcMemory(handle=handle, device=device))
    return Call(REGISTER_SHARED_MEMORY, request, True, lambda reply: bool(reply.already_registered))


def unregister_shared_memory(name: str = "") -> Call[int]:
    """Unregisters a region (all of the tenant's for ""); how many."""
    return Call(UNREGISTER_SHARED_MEMORY, shm_pb2.UnregisterSharedMemoryRequest(name=name), False,
                lambda reply: int(reply.unregistered))


def shared_memory_status(name: str = "") -> Call[list[Any]]:
    """The tenant's regions (SharedMemoryRegion messages)."""
    return Call(SHARED_MEMORY_STATUS, shm_pb2.SharedMemoryStatusRequest(name=name), True,
                lambda reply: list(reply.regions))


def forward_output(result: ForwardResult, request_id: str) -> Array:
    """A ForwardResult's output; ReplayWithoutOutput when a replay has none."""
    if result.output is None:
        raise errors.ReplayWithoutOutput(request_id, result.version, result.num_batches_tracked)
    return result.output


class StreamRequests:
    """The ForwardStream requests for a stream of inputs, in order, and how
    to read each reply (as its input was given). An input that cannot be
    encoded ends the requests; `failed` holds its error, to be raised after
    the replies before it."""

    def __init__(self, session_id: str, training: bool) -> None:
        self.session_id = session_id
        self.mode = mode_value(training)
        self.pending: collections.deque[Array | None] = collections.deque()
        self.failed: list[Exception] = []

    def request(self, x: Array) -> codec.SplicedRequest | None:
        """The request for `x`, or None (end the stream) when it cannot be made."""
        try:
            request = codec.SplicedRequest(
                bn.ForwardRequest(session_id=self.session_id, mode=self.mode),  # type: ignore[arg-type]
                "input", x)
        except Exception as error:  # re-raised after the replies before it, in order
            self.failed.append(error)
            return None
        self.pending.append(x if codec.is_torch_tensor(x) else None)
        return request

    def requests(self, inputs: Iterable[Array]) -> Iterator[codec.SplicedRequest]:
        for x in inputs:
            request = self.request(x)
            if request is None:
                return
            yield request

    def reply(self, reply: bn.ForwardStreamResponse) -> Array | errors.NormserveError:
        """The output a reply carries, or the error it reports (its `index`
        says which input it answers)."""
        like = self.pending.popleft()
        if reply.HasField("error"):
            error = errors.from_status(reply.error.code, reply.error.message)
            error.index = reply.index
            return error
        return codec.decode_like(reply.response.output, like)


def reset_running_stats(session_id: str, *, expected_version: int | None, request_id: str) -> Call[SessionInfo]:
    request = bn.ResetRunningStatsRequest(session_id=session_id, request_id=request_id)
    if expected_version is not None:
        request.expected_version = expected_version
    return Call(RESET_RUNNING_STATS, request, bool(request_id), _session_info)


def update_parameters(session_id: str, *, weight: Array | None, bias: Array | None, running_mean: Array | None,
                      running_var: Array | None, num_batches_tracked: int | None, eps: float | None,
                      momentum: float | None | _Unset, expected_version: int | None,
                      request_id: str) -> Call[SessionInfo]:
    request = bn.UpdateParametersRequest(session_id=session_id, request_id=request_id)
    for field, value in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                         ("running_var", running_var)):
        _set_tensor(request, field, value)
    if num_batches_tracked is not None:
        request.num_batches_tracked = int(num_batches_tracked)
    if eps is not None:
        request.eps = float(eps)
    _set_momentum(request, momentum)
    if expected_version is not None:
        request.expected_version = expected_version
    return Call(UPDATE_PARAMETERS, request, bool(request_id), _session_info)


def export_state(session_id: str) -> Call[StateExport]:
    return Call(EXPORT_STATE, bn.ExportStateRequest(session_id=session_id), True,
                lambda reply: StateExport(reply.safetensors, reply.version))


def import_state(session_id: str, safetensors: bytes, *, strict: bool, expected_version: int | None,
                 request_id: str) -> Call[SessionInfo]:
    request = bn.ImportStateRequest(session_id=session_id, safetensors=bytes(safetensors), strict=strict,
                                    request_id=request_id)
    if expected_version is not None:
        request.expected_version = expected_version
    return Call(IMPORT_STATE, request, bool(request_id), _session_info)


def merge_session(session_id: str, source_session_id: str, *, expected_version: int | None,
                  request_id: str) -> Call[SessionInfo]:
    """MergeSession: the source's exact accumulators added into the target."""
    request = bn.MergeSessionRequest(session_id=session_id, source_session_id=source_session_id,
                                     request_id=request_id)
    if expected_version is not None:
        request.expected_version = expected_version
    return Call(MERGE_SESSION, request, bool(request_id), _session_info)


def session_id_of(session: Any) -> str:
    """The id of a session handle (blocking or asyncio) or an id string."""
    if isinstance(session, str):
        return session
    session_id = getattr(session, "session_id", None)
    if not isinstance(session_id, str):
        raise TypeError(f"expected a Session or a session id, got {type(session).__name__}")
    return session_id


def standard_scaler_statistics(info: SessionInfo) -> StandardScalerStatistics:
    """The StandardScaler attributes of a session snapshot; FailedPrecondition
    for a session without exact statistics."""
    statistics = info.standard_scaler
    if statistics is None:
        raise errors.FailedPrecondition(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"session {info.session_id!r} does not keep exact statistics (create it with "
            f"exact_statistics=True): it has no StandardScaler attributes")
    return statistics


# ---------------------------------------------------------------- the others


def server_info() -> Call[ServerInfo]:
    return Call(GET_SERVER_INFO, server_pb2.GetServerInfoRequest(), True, ServerInfo.from_proto)


def compare(x: Array, **options: Any) -> Call[CompareReport]:
    request = compare_module.build_request(x, **options)
    return Call(COMPARE, request, True, lambda reply: CompareReport.from_proto(reply, like=x))


def _health_messages() -> tuple[Any, Any]:
    """grpc.health.v1's HealthCheckRequest and HealthCheckResponse, built from
    their definition (health.proto) in a pool of their own: the client needs
    no grpcio-health-checking, and cannot clash with it when both are used."""
    file = descriptor_pb2.FileDescriptorProto(name="normserve/grpc_health_v1.proto", package="grpc.health.v1",
                                              syntax="proto3")
    request = file.message_type.add(name="HealthCheckRequest")
    request.field.add(name="service", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    response = file.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in enumerate(HEALTH_STATUSES):
        status.value.add(name=name, number=number)
    response.field.add(name="status", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
                       type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
                       label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")))


# grpc.health.v1.HealthCheckResponse.ServingStatus, by number.
HEALTH_STATUSES = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")
_HEALTH_REQUEST, _HEALTH_RESPONSE = _health_messages()
HEALTH_CHECK = Method("/grpc.health.v1.Health/Check", _HEALTH_RESPONSE)


def health(service: str) -> Call[str]:
    """grpc.health.v1.Health/Check: "SERVING", "NOT_SERVING", ... for the
    server ("") or one of its services ("normserve.v1.BatchNormService")."""
    return Call(HEALTH_CHECK, _HEALTH_REQUEST(service=service), True,
                lambda reply: HEALTH_STATUSES[reply.status] if reply.status < len(HEALTH_STATUSES)
                else str(reply.status))


def temporary_session_created(session: Any) -> None:
    """Refuses to treat an existing session as temporary: leaving the block
    would delete a session this block did not create."""
    if session.already_existed:
        raise errors.AlreadyExists(
            grpc.StatusCode.ALREADY_EXISTS,
            f"session {session.session_id} already exists; a temporary session must be a new one "
            f"(leave session_id out, or choose an unused one)")


def cleanup_failed(body_error: BaseException, cleanup_error: BaseException, session_id: str) -> None:
    """Notes on the body's exception that deleting the temporary session
    failed too (the body's exception is the one raised)."""
    note = f"and deleting temporary session {session_id!r} failed: {cleanup_error}"
    if hasattr(body_error, "add_note"):  # Python >= 3.11
        body_error.add_note(note)
    else:
        body_error.__notes__ = [*getattr(body_error, "__notes__", []), note]  # type: ignore[attr-defined]
