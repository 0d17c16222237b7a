//! One session's state as the registry holds it: the immutable facts
//! ([`SessionInfo`], with its [`LastUse`]), the mutable [`LayerState`] behind
//! the session's lock ([`SessionState`]), and the consistent copy answered to
//! readers ([`snapshot`]). No locking, no I/O, no steps: the steps that compute
//! a new state live in `steps`, the stored form in `record`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tch::{Device, Tensor};

use super::exact::ExactState;
use super::replay::ReplayLog;
use super::{SessionConfig, SessionError, SessionId, SessionSnapshot, StateTensors};
use crate::numerics::{Momentum, TensorData};

/// Immutable facts of a session (outside its lock), and when it was last used.
pub struct SessionInfo {
    pub id: SessionId,
    pub config: SessionConfig,
    pub device: Device,
    pub created_at: SystemTime,
    /// Moves forward without the session's lock (see [`LastUse`]).
    pub last_used: LastUse,
}

/// When a session was last used: created, loaded, or named by a request that
/// computes with its state (Forward, UpdateParameters, ResetRunningStats,
/// ImportState, ExportState, CreateSession of an existing one). Reading its
/// description (GetSession, ListSessions) is not a use, so that watching a
/// session does not keep it from its idle TTL. Not stored: a server that
/// loads a session starts its idle clock then.
#[derive(Debug)]
pub struct LastUse(std::sync::atomic::AtomicI64);

impl LastUse {
    pub fn new(at: SystemTime) -> LastUse {
        LastUse(std::sync::atomic::AtomicI64::new(unix_nanos(at)))
    }

    /// Records a use now (never moves backwards).
    pub fn touch(&self) {
        self.0.fetch_max(
            unix_nanos(SystemTime::now()),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Puts back a last use known from before the session was loaded again.
    pub fn restore(&self, at: SystemTime) {
        self.0
            .store(unix_nanos(at), std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> SystemTime {
        from_unix_nanos(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// The mutable state: tensors are (C,) in `config.param_dtype` on the
/// session's device.
pub struct LayerState {
    pub eps: f64,
    pub momentum: Momentum,
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub running_mean: Option<Tensor>,
    pub running_var: Option<Tensor>,
    pub num_batches_tracked: i64,
    pub version: u64,
    pub updated_at: SystemTime,
    /// The exact sums of an `exact_statistics` session (running_mean and
    /// running_var are rounded from them); None for the others. Shared
    /// between versions: replaced, never changed in place.
    pub exact: Option<Arc<ExactState>>,
}

/// A session's state behind its lock.
pub struct SessionState {
    pub layer: LayerState,
    /// Set by DeleteSession; requests queued behind it see NOT_FOUND.
    pub deleted: bool,
    /// Set when the idle TTL drops the session from memory (its stored record
    /// stays): requests queued behind it look it up again, from the store.
    pub evicted: bool,
    pub replay: ReplayLog,
}

fn share(tensor: &Option<Tensor>) -> Option<Tensor> {
    tensor.as_ref().map(Tensor::shallow_clone)
}

impl LayerState {
    /// A copy sharing the tensors (they are replaced, never written in place).
    pub(super) fn next_version(&self) -> LayerState {
        LayerState {
            eps: self.eps,
            momentum: self.momentum,
            weight: share(&self.weight),
            bias: share(&self.bias),
            running_mean: share(&self.running_mean),
            running_var: share(&self.running_var),
            num_batches_tracked: self.num_batches_tracked,
            version: self.version + 1,
            updated_at: SystemTime::now(),
            exact: self.exact.clone(),
        }
    }
}

/// The parts of a state an update or import replaces; `None` keeps the current.
pub(super) struct Replaced {
    pub(super) weight: Option<Tensor>,
    pub(super) bias: Option<Tensor>,
    pub(super) running_mean: Option<Tensor>,
    pub(super) running_var: Option<Tensor>,
    pub(super) num_batches_tracked: Option<i64>,
}

impl LayerState {
    pub(super) fn next_with(&self, replaced: Replaced) -> LayerState {
        let mut next = self.next_version();
        next.weight = replaced.weight.or(next.weight);
        next.bias = replaced.bias.or(next.bias);
        next.running_mean = replaced.running_mean.or(next.running_mean);
        next.running_var = replaced.running_var.or(next.running_var);
        next.num_batches_tracked = replaced
            .num_batches_tracked
            .unwrap_or(next.num_batches_tracked);
        next
    }
}

/// A consistent copy of the session at `layer`; the tensors copied to the host
/// when `include_tensors`.
pub fn snapshot(
    info: &SessionInfo,
    layer: &LayerState,
    include_tensors: bool,
) -> Result<SessionSnapshot, SessionError> {
    let tensors = if include_tensors {
        let host = |t: &Option<Tensor>| t.as_ref().map(TensorData::from_tensor).transpose();
        Some(StateTensors {
            weight: host(&layer.weight)?,
            bias: host(&layer.bias)?,
            running_mean: host(&layer.running_mean)?,
            running_var: host(&layer.running_var)?,
        })
    } else {
        None
    };
    let mut config = info.config.clone();
    config.eps = layer.eps;
    config.momentum = layer.momentum;
    Ok(SessionSnapshot {
        id: info.id.clone(),
        config,
        device: info.device,
        version: layer.version,
        num_batches_tracked: layer.num_batches_tracked,
        created_at: info.created_at,
        updated_at: layer.updated_at,
        last_used_at: info.last_used.get(),
        standard_scaler: match (&layer.exact, &tensors) {
            (Some(exact), Some(_)) => Some(exact.standard_scaler(layer.eps)),
            _ => None,
        },
        tensors,
    })
}

pub fn unix_nanos(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(i64::MAX as u128) as i64)
}

pub fn from_unix_nanos(nanos: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos.max(0) as u64)
}
