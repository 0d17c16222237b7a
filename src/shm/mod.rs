//! Shared-memory tensor transport: POSIX shared-memory regions that clients
//! on this host register (per tenant), mapped once, whose ranges Forward
//! reads its input from and writes its output to instead of carrying bytes.
//!
//! Owns the region table and its limits (`registry`), the mappings
//! (`region`), the SIGBUS guard that keeps a truncated object from
//! killing the server (`sigbus`), and GPU memory shared through CUDA IPC
//! handles (`cuda_ipc`). Contains no proto types and no tensor
//! math: `transport::convert` turns a request's ranges into [`Range`]s and
//! tensors.

// The CUDA runtime and driver calls and the device views (module docs).
#[allow(unsafe_code)]
mod cuda_ipc;
mod range;
mod region;
mod registry;
mod sigbus;

pub use cuda_ipc::{CudaRange, CudaRegion, HANDLE_BYTES as CUDA_IPC_HANDLE_BYTES};
pub use range::{Mapped, RegionRange};
pub use region::{Range, Region};
pub use registry::{AnyRange, RegionInfo, SharedMemory, ShmLimits};

/// Longest region name, bytes (NAME_MAX of a file in /dev/shm).
pub const MAX_NAME_BYTES: usize = 255;

/// Why a shared-memory request failed.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The server runs with `--shared-memory off`, or cannot map here.
    #[error("shared memory is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// No region of that name in the caller's tenant (whether or not another
    /// tenant has one).
    #[error("shared memory region {0:?} is not registered")]
    NotFound(String),
    /// Registration: no object /dev/shm/<name>.
    #[error("no shared memory object /dev/shm/{0} (is /dev/shm shared with the server?)")]
    NoObject(String),
    #[error("the server may not open /dev/shm/{0} for reading and writing")]
    PermissionDenied(String),
    /// Registration: not a shareable object, or too small.
    #[error("{0}")]
    NotShared(String),
    #[error("shared memory region {0:?} is already registered with a different offset, size or object; unregister it first")]
    AlreadyExists(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error("cannot map the shared memory object: {0}")]
    MapFailed(String),
    /// A range beyond the region's end.
    #[error("{0}")]
    OutOfRange(String),
    /// The object shrank under the region (found before or during a use):
    /// the region is unregistered.
    #[error("the object of shared memory region {0:?} was truncated after registration; the region is unregistered")]
    Truncated(String),
    /// The object shrank while a Forward read its input or wrote its output
    /// (the SIGBUS guard caught it): the result is not delivered, though the
    /// forward was applied; the region is unregistered.
    #[error("the object of shared memory region {region:?} was truncated while the call {during}; the result is not delivered, but the forward was applied (see the session's version); the region is unregistered")]
    TruncatedDuringUse {
        region: String,
        during: &'static str,
    },
    /// The CUDA device failed while a call used a CUDA IPC region (writing
    /// its output, or waiting for its work): the server's fault, not the
    /// client's; the forward was applied.
    #[error("the CUDA device failed: {0}")]
    Device(String),
    /// The object's name no longer resolves to the mapped object.
    #[error("the object of shared memory region {0:?} was unlinked (or replaced) after registration; the region is unregistered")]
    Unlinked(String),
}

/// Checks a region's name: the POSIX shared-memory name without its leading
/// '/', 1 to 255 bytes, no '/', no NUL, not "." or "..".
pub fn check_name(name: &str) -> Result<(), ShmError> {
    let bad = |why: &str| {
        Err(ShmError::InvalidArgument(format!(
            "shared memory region name {name:?}: {why}"
        )))
    };
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return bad(&format!("at most {MAX_NAME_BYTES} bytes"));
    }
    if name.contains('/') {
        return bad("must not contain '/' (give the name without the leading '/')");
    }
    if name.contains('\0') {
        return bad("must not contain NUL");
    }
    if name == "." || name == ".." {
        return bad("is not an object name");
    }
    Ok(())
}

/// A range a request names: `byte_size` bytes from `offset` of region
/// `region`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRequest {
    pub region: String,
    pub offset: u64,
    pub byte_size: u64,
}

#[cfg(test)]
mod tests;
