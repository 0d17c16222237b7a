//! Stateful batch-norm sessions: one `torch.nn.BatchNorm*d` layer each, kept
//! in memory (on its device) between requests.
//!
//! Owns: [`SessionId`], [`SessionConfig`], the [`Registry`] of live sessions,
//! per-session ordering (mutations apply one at a time in arrival order),
//! versions, idempotent replays and limits. Contains no proto types and no
//! networking; tensor math is delegated to [`crate::numerics`].

pub mod durable;
mod exact;
mod footprint;
mod id;
mod record;
mod registry;
mod replay;
mod state;
mod steps;
pub mod synced;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

pub use exact::StandardScaler;
pub use footprint::{resident_bytes, SESSION_OVERHEAD_BYTES};
pub use id::{is_valid_tenant, InvalidSessionId, SessionId, MAX_TENANT_LEN};
pub use registry::{Limits, Recovery, RecoveryError, Registry, RegistryOptions, StepLimits};
pub use replay::Call;

use crate::compute::ComputeError;
use crate::device::{DeviceChoice, DeviceError};
use crate::memory::BudgetExhausted;
use crate::numerics::{
    DType, ExternalMemory, InputData, LayerKind, Momentum, NumericsError, TensorData,
};

/// Forward behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// A session's configuration as created. `eps` and `momentum` here are the
/// creation values; the current ones live in the state (UpdateParameters may
/// change them) and are what snapshots report.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionConfig {
    pub kind: LayerKind,
    pub num_features: i64,
    pub eps: f64,
    pub momentum: Momentum,
    pub affine: bool,
    pub track_running_stats: bool,
    pub param_dtype: DType,
    pub default_mode: Mode,
    pub reject_non_finite: bool,
    pub labels: BTreeMap<String, String>,
    /// Running statistics from exact sums of every value seen (see
    /// `session::exact`) instead of moving averages.
    pub exact_statistics: bool,
    /// How long a synchronized step waits for all its ranks.
    pub step_timeout: std::time::Duration,
}

/// The step timeout of sessions created without one.
pub const DEFAULT_STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_BYTES: usize = 128;
pub const MAX_LABEL_VALUE_BYTES: usize = 1024;
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Initial or replacement state tensors; each present one must be (C,).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateTensors {
    pub weight: Option<TensorData>,
    pub bias: Option<TensorData>,
    pub running_mean: Option<TensorData>,
    pub running_var: Option<TensorData>,
}

#[derive(Debug, Clone)]
pub struct CreateSession {
    /// The full key (a tenant's id is `tenant/name`); None: a generated name
    /// in `tenant`.
    pub id: Option<SessionId>,
    /// Tenant of a generated id ("" : the default tenant).
    pub tenant: String,
    pub config: SessionConfig,
    pub device: DeviceChoice,
    pub initial: StateTensors,
    pub num_batches_tracked: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct Forward {
    pub id: SessionId,
    /// Validated against the layer before any compute. Device memory must be
    /// on the session's device (it is viewed in place, never moved).
    pub input: InputData,
    /// None: the session's default mode.
    pub mode: Option<Mode>,
    /// The request id applies to train-mode forwards that update running
    /// statistics (the others change nothing and are not remembered).
    pub preconditions: Preconditions,
    /// The caller's memory to write the output into instead of returning it
    /// (a shared-memory range holding exactly the output's bytes, apart from
    /// the input's): written during the step, before anything is committed,
    /// so on a failure it may hold part of an output. CPU sessions only;
    /// others return the output.
    pub output_memory: Option<Arc<dyn ExternalMemory>>,
    /// The memory the input is read from in place when it may lose pages
    /// during the call (a shared-memory range): checked, with the output's,
    /// after the computation and before the commit.
    pub input_memory: Option<Arc<dyn ExternalMemory>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ForwardOutcome {
    /// Absent in a replay whose output is no longer held, and when the
    /// output was written into the command's `output_memory` (`written`).
    pub output: Option<TensorData>,
    /// True when the output went into the command's `output_memory`.
    pub written: bool,
    pub version: u64,
    pub num_batches_tracked: i64,
    pub replayed: bool,
}

#[derive(Debug, Clone, Default)]
pub struct UpdateParameters {
    pub tensors: StateTensors,
    pub num_batches_tracked: Option<i64>,
    pub eps: Option<f64>,
    pub momentum: Option<Momentum>,
}

/// Preconditions shared by every mutating call: a request id already applied
/// is answered again instead of applied twice; `expected_version` must be the
/// session's version.
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    pub expected_version: Option<u64>,
    pub request_id: Option<String>,
}

impl Preconditions {
    /// The same preconditions without the request id.
    pub fn version_only(&self) -> Preconditions {
        Preconditions {
            expected_version: self.expected_version,
            request_id: None,
        }
    }
}

/// What CreateSession did: created the session, or found it already there
/// with the same configuration (an idempotent retry).
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    pub snapshot: SessionSnapshot,
    pub already_existed: bool,
}

/// A consistent copy of a session, taken under its lock.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSnapshot {
    pub id: SessionId,
    /// Current configuration (eps and momentum as they are now).
    pub config: SessionConfig,
    pub device: tch::Device,
    pub version: u64,
    pub num_batches_tracked: i64,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    /// Last use (see [`state::LastUse`]), for the idle TTL.
    pub last_used_at: SystemTime,
    /// Absent when the caller asked for no tensors.
    pub tensors: Option<StateTensors>,
    /// An exact session's statistics as scikit-learn StandardScaler
    /// attributes (with the tensors only).
    pub standard_scaler: Option<StandardScaler>,
}

impl SessionSnapshot {
    /// Bytes of tensor data the snapshot carries (0 without tensors), the
    /// StandardScaler attributes of an exact session included.
    pub fn tensor_bytes(&self) -> usize {
        let tensors = self.tensors.as_ref().map_or(0, |t| {
            [&t.weight, &t.bias, &t.running_mean, &t.running_var]
                .into_iter()
                .flatten()
                .map(|data| data.bytes().len())
                .sum()
        });
        let scaler = self.standard_scaler.as_ref().map_or(0, |s| {
            (s.mean.len() + s.var.len() + s.scale.len()) * std::mem::size_of::<f64>()
        });
        tensors + scaler
    }
}

/// A mutation's result plus whether it is a replay of an earlier request.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied<T> {
    pub value: T,
    pub replayed: bool,
}

/// safetensors bytes of the state dict, at a version.
#[derive(Debug, Clone)]
pub struct ExportedState {
    pub safetensors: Bytes,
    pub version: u64,
}

/// A ListSessions query: one page of sessions in id order.
#[derive(Debug, Clone)]
pub struct ListSessions {
    /// The caller's tenant; None for an admin (every tenant).
    pub tenant: Option<String>,
    /// Continue after this id (the previous page's last).
    pub after: Option<SessionId>,
    pub page_size: usize,
    /// Only sessions carrying all of these labels.
    pub selector: BTreeMap<String, String>,
    pub include_tensors: bool,
}

/// One page of ListSessions.
#[derive(Debug, Clone)]
pub struct SessionPage {
    pub sessions: Vec<SessionSnapshot>,
    /// Id to continue after; None on the last page.
    pub next_after: Option<SessionId>,
    /// Sessions in the page's range of ids whose stored record cannot be read
    /// (DATA_LOSS), whatever the label selector (their labels cannot be read
    /// either): listed so that their owner sees them, not left out silently.
    pub unreadable: Vec<UnreadableSession>,
}

/// A session served as DATA_LOSS, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct UnreadableSession {
    pub id: SessionId,
    pub reason: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error("session {0} not found")]
    NotFound(SessionId),
    #[error("session {id} already exists with a different configuration ({difference})")]
    AlreadyExists { id: SessionId, difference: String },
    #[error("request_id {request_id:?} was already used by a different call ({used_by}) on session {id}")]
    RequestIdReused {
        id: SessionId,
        request_id: String,
        used_by: &'static str,
    },
    #[error("session {id} is at version {actual}, expected_version was {expected}")]
    VersionMismatch {
        id: SessionId,
        expected: u64,
        actual: u64,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{what} {actual} exceeds the limit {limit} ({limit_name})")]
    LimitExceeded {
        what: &'static str,
        actual: u64,
        limit: u64,
        limit_name: &'static str,
    },
    #[error("{0}")]
    InvalidArgument(String),
    /// Holding the session (or its replay) would exceed the memory budget;
    /// nothing was allocated or applied.
    #[error(transparent)]
    MemoryBudget(#[from] BudgetExhausted),
    #[error(transparent)]
    Numerics(#[from] NumericsError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Compute(#[from] ComputeError),
    /// The stored record cannot be read; the session is not served.
    #[error("session {id} is unreadable: {reason}")]
    DataLoss { id: SessionId, reason: String },
    #[error(transparent)]
    Store(#[from] durable::StoreError),
    /// A synchronized step failed (a rank missing at its deadline, or another
    /// rank's invalid request); nothing was applied.
    #[error("{0}")]
    StepAborted(String),
    /// Memory outside the server that the call read or wrote in place lost
    /// pages during it (a shared-memory object truncated by its owner): the
    /// step computed on zeros and is not applied.
    #[error("{0}; nothing was applied")]
    MemoryLost(String),
    /// Other replicas kept changing the session; the mutation was not applied.
    #[error("session {0} is contended by other replicas; nothing was applied, retry")]
    Contended(SessionId),
}

/// Checks labels against the documented limits.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), SessionError> {
    if labels.len() > MAX_LABELS {
        return Err(SessionError::InvalidArgument(format!(
            "labels: at most {MAX_LABELS} labels, got {}",
            labels.len()
        )));
    }
    for (key, value) in labels {
        if key.is_empty() || key.len() > MAX_LABEL_KEY_BYTES {
            return Err(SessionError::InvalidArgument(format!(
                "labels: keys must be 1 to {MAX_LABEL_KEY_BYTES} bytes, got {} bytes",
                key.len()
            )));
        }
        if value.len() > MAX_LABEL_VALUE_BYTES {
            return Err(SessionError::InvalidArgument(format!(
                "labels: value of {key:?} must be at most {MAX_LABEL_VALUE_BYTES} bytes, got {}",
                value.len()
            )));
        }
    }
    Ok(())
}

/// Checks a request id against the documented limit; empty means none.
pub fn parse_request_id(text: &str) -> Result<Option<String>, SessionError> {
    if text.is_empty() {
        return Ok(None);
    }
    if text.len() > MAX_REQUEST_ID_BYTES {
        return Err(SessionError::InvalidArgument(format!(
            "request_id: at most {MAX_REQUEST_ID_BYTES} bytes, got {}",
            text.len()
        )));
    }
    Ok(Some(text.to_owned()))
}
