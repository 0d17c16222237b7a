//! The one place where domain errors become gRPC statuses. Internal failures
//! get a generic message; their detail goes to the log.

use tonic::{Code, Status};

use crate::compute::ComputeError;
use crate::device::DeviceError;
use crate::numerics::NumericsError;
use crate::session::SessionError;
use crate::shm::ShmError;
use crate::transport::convert::ConvertError;

impl From<ConvertError> for Status {
    fn from(error: ConvertError) -> Self {
        match error {
            ConvertError::InvalidArgument(message) => Status::invalid_argument(message),
            ConvertError::SessionId(error) => Status::invalid_argument(error.to_string()),
            ConvertError::Tensor(error) => error.into(),
            ConvertError::Device(error) => error.into(),
            ConvertError::Session(error) => error.into(),
            ConvertError::SharedMemory(error) => error.into(),
        }
    }
}

impl From<ShmError> for Status {
    fn from(error: ShmError) -> Self {
        let message = error.to_string();
        match error {
            ShmError::Unavailable(_) => Status::failed_precondition(message),
            ShmError::InvalidArgument(_) => Status::invalid_argument(message),
            ShmError::NotFound(_) | ShmError::NoObject(_) => Status::not_found(message),
            ShmError::PermissionDenied(_) => Status::permission_denied(message),
            ShmError::NotShared(_) => Status::failed_precondition(message),
            ShmError::AlreadyExists(_) => Status::already_exists(message),
            ShmError::LimitExceeded(_) => Status::resource_exhausted(message),
            ShmError::MapFailed(_) => Status::resource_exhausted(message),
            ShmError::OutOfRange(_) => Status::out_of_range(message),
            ShmError::Device(detail) => {
                tracing::error!(%detail, "the CUDA device failed with a CUDA IPC region");
                Status::internal(
                    "internal error on the CUDA device (see server log); a train-mode forward was applied",
                )
            }
            ShmError::Truncated(_)
            | ShmError::TruncatedDuringUse { .. }
            | ShmError::Unlinked(_) => Status::failed_precondition(message),
        }
    }
}

impl From<SessionError> for Status {
    fn from(error: SessionError) -> Self {
        let message = error.to_string();
        match error {
            SessionError::NotFound(_) => Status::not_found(message),
            SessionError::AlreadyExists { .. } => Status::already_exists(message),
            SessionError::RequestIdReused { .. } => Status::already_exists(message),
            SessionError::VersionMismatch { .. } => Status::aborted(message),
            SessionError::FailedPrecondition(_) => Status::failed_precondition(message),
            SessionError::LimitExceeded { .. } => Status::resource_exhausted(message),
            SessionError::InvalidArgument(_) => Status::invalid_argument(message),
            SessionError::MemoryBudget(_) => Status::resource_exhausted(message),
            SessionError::Numerics(error) => error.into(),
            SessionError::Device(error) => error.into(),
            SessionError::Compute(error) => error.into(),
            SessionError::DataLoss { .. } => Status::data_loss(message),
            SessionError::Store(error) => {
                tracing::error!(%error, "session store failed");
                Status::unavailable(format!("{error}; the request was not applied or its outcome is unknown: retry with the same request_id"))
            }
            SessionError::Contended(_) => Status::aborted(message),
            SessionError::MemoryLost(_) => Status::failed_precondition(message),
            SessionError::StepAborted(_) => Status::aborted(message),
        }
    }
}

impl From<NumericsError> for Status {
    fn from(error: NumericsError) -> Self {
        match error {
            NumericsError::Invalid { .. } => Status::invalid_argument(error.to_string()),
            NumericsError::LimitExceeded { .. } => Status::resource_exhausted(error.to_string()),
            NumericsError::Torch(detail) => {
                tracing::error!(%detail, "libtorch failed on validated input");
                Status::internal("internal error in tensor computation (see server log)")
            }
        }
    }
}

impl From<DeviceError> for Status {
    fn from(error: DeviceError) -> Self {
        match error {
            DeviceError::Unparsable(_) => Status::invalid_argument(format!("device: {error}")),
            DeviceError::CudaUnavailable { .. } => {
                Status::failed_precondition(format!("device: {error}"))
            }
        }
    }
}

impl From<ComputeError> for Status {
    fn from(error: ComputeError) -> Self {
        match error {
            ComputeError::JobFailed(detail) => {
                tracing::error!(%detail, "compute job failed");
                Status::internal("internal error in tensor computation (see server log)")
            }
            ComputeError::Closed => Status::unavailable("server is shutting down"),
            ComputeError::DeadlineExceeded => Status::deadline_exceeded(
                "the request's deadline (grpc-timeout) passed before its computation started; nothing was applied",
            ),
        }
    }
}

/// tonic's request-decoding failures, as the API promises them:
/// - a message above `max_decoding_message_size` is OUT_OF_RANGE in tonic;
///   here RESOURCE_EXHAUSTED naming the limit, as gRPC's other
///   implementations answer;
/// - a unary body that ends inside its message or before any (a truncated or
///   empty request, or a client that cancelled while sending it) is INTERNAL
///   in tonic, which would count a client's doing as a server fault in
///   `normserve_requests_total` and alerts; here INVALID_ARGUMENT;
/// - bytes that are not a valid protobuf message of the request's type are
///   INTERNAL in tonic (following gRPC's status-code table, written for
///   servers that produce the bytes themselves); the bytes are the client's,
///   so here INVALID_ARGUMENT.
///
/// Other statuses pass unchanged.
pub fn decoding_error(status: Status) -> Status {
    let too_large = status.code() == Code::OutOfRange
        && status
            .message()
            .starts_with("Error, decoded message length too large");
    let internal = status.code() == Code::Internal;
    if too_large {
        Status::resource_exhausted(format!("{} (max_message_bytes)", status.message()))
    } else if internal && status.message() == "Unexpected EOF decoding stream." {
        Status::invalid_argument(
            "request body ended inside a message: truncated request (or cancelled while sending)",
        )
    } else if internal && status.message() == "Missing request message." {
        Status::invalid_argument(
            "request body holds no message (or the call was cancelled before sending it)",
        )
    } else if internal
        && status
            .message()
            .starts_with("failed to decode Protobuf message")
    {
        Status::invalid_argument(format!(
            "malformed request: {} (not a valid message of the call's request type)",
            status.message()
        ))
    } else {
        status
    }
}

/// [`decoding_error`] for unary calls, whose request is decoded before the
/// handler runs: tonic answers with a trailers-only response carrying the
/// status in its headers and extensions.
pub fn decoding_error_response(
    response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let Some(status) = response.extensions().get::<Status>() else {
        return response;
    };
    let code = status.code();
    let mapped = decoding_error(status.clone());
    if mapped.code() == code {
        response
    } else {
        mapped.into_http()
    }
}
