"""The exceptions the client raises: one class per gRPC status code the server
uses, all under `NormserveError`, each keeping the server's message text.

    try:
        session.forward(x)
    except normserve.InvalidArgument as error:   # also a ValueError
        print(error.code, error.details)         # StatusCode.INVALID_ARGUMENT, PyTorch's text
"""

from __future__ import annotations

import grpc


class NormserveError(Exception):
    """A failed call. `code` is the grpc.StatusCode (None for a condition the
    client itself detected) and `details` the server's message, verbatim."""

    # Which input of a forward_stream an in-band error answers (None elsewhere).
    index: int | None = None

    def __init__(self, code: grpc.StatusCode | None, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        if self.code is None:
            return self.details
        return f"{self.code.name}: {self.details}"


class InvalidArgument(NormserveError, ValueError):
    """A malformed request: rank, channels, dtypes, ids, eps, state_dict keys.
    The message names the field and carries PyTorch's own text where PyTorch
    has one. A ValueError, as PyTorch's input checks are."""


class NotFound(NormserveError):
    """The session does not exist."""


class AlreadyExists(NormserveError):
    """A session id exists with another configuration, or a request_id was
    used by another call."""


class Aborted(NormserveError):
    """`expected_version` differs from the session's version, or other
    replicas kept winning the compare-and-set (nothing was applied)."""


class FailedPrecondition(NormserveError):
    """The server's or the session's state refuses the call: e.g. a CUDA
    device where there is none, num_batches_tracked at its maximum."""


class ResourceExhausted(NormserveError):
    """A server limit, named in the message (max_message_bytes,
    max_tensor_elements, max_num_features, max_sessions)."""


class Unavailable(NormserveError):
    """The server or its store cannot be reached; retrying with the same
    request_id is safe."""


class DataLoss(NormserveError):
    """The session's stored record is unreadable."""


class Internal(NormserveError):
    """A failure inside the server (details are in its log)."""


class Unauthenticated(NormserveError):
    """No valid credentials (token) were sent."""


class PermissionDenied(NormserveError):
    """The credentials do not allow this call."""


class DeadlineExceeded(NormserveError):
    """The call's timeout passed before the server answered."""


class Cancelled(NormserveError):
    """The call was cancelled."""


class ReplayWithoutOutput(NormserveError):
    """A retried train-mode forward had already been applied (its request_id
    was replayed), and the server no longer holds its output (larger than the
    replay cache, or the server restarted). The step counts once; use
    `Session.forward_result` to read the version it produced."""

    def __init__(self, request_id: str, version: int, num_batches_tracked: int) -> None:
        super().__init__(None, (
            f"request {request_id!r} was already applied (version {version}, num_batches_tracked "
            f"{num_batches_tracked}) and the server no longer holds its output"))
        self.args = (request_id, version, num_batches_tracked)
        self.request_id = request_id
        self.version = version
        self.num_batches_tracked = num_batches_tracked


BY_CODE: dict[grpc.StatusCode, type[NormserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def from_status(code: grpc.StatusCode | int, details: str) -> NormserveError:
    """The exception for a status code (a grpc.StatusCode or the google.rpc.Code
    number of an in-band stream error) and message."""
    if not isinstance(code, grpc.StatusCode):
        code = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return BY_CODE.get(code, NormserveError)(code, details)


def from_rpc_error(error: grpc.RpcError) -> NormserveError:
    """The exception for a grpc.RpcError raised by a stub call."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return from_status(code, details or "")
