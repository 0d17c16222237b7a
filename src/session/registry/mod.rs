//! The registry of live sessions and every operation on them. This file holds
//! the registry's state and its public operations; the rooms beside it hold
//! the mechanisms: `cache` (the sessions in memory, loading from the store,
//! recovery, unreadable records), `commit` (locking, refreshing against a
//! shared store, compare-and-set commit with recompute; delete), `create`
//! (creation under the limits), `group` (a stream's Forwards committed
//! together), `listing` (ListSessions) and `expiry` (the idle TTL). The steps themselves are pure functions in `session::steps`.
//!
//! Ordering: each session's state sits behind a FIFO async mutex; a request
//! takes it (in arrival order) and holds it through its compute job and the
//! store write, so mutations of one session apply one at a time while
//! different sessions run in parallel. Holding that async mutex across
//! `.await` is the design (it *is* the per-session queue); the registry map
//! itself is behind a std `RwLock` held only for lookups and inserts, never
//! across an `.await`.
//!
//! Atomicity and durability: a mutation computes a new [`LayerState`] on the
//! compute pool without touching the current one, writes its record to the
//! store (when there is one) with a compare-and-set on the version, and only
//! then swaps it in and answers. A refused or failed request changes nothing.
//!
//! Sessions in memory are a cache of the store. With a shared store (Redis),
//! every operation first checks that the cached version is the stored one and
//! reloads when another replica moved on; a write that loses the
//! compare-and-set reloads and recomputes.

mod barrier;
mod cache;
mod commit;
mod create;
mod expiry;
mod group;
mod listing;
mod merge;
mod rendezvous;
mod synced;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tch::Device;

use super::durable::{RecordError, SessionStore};
use super::replay::ReplayLimits;
use super::state::{snapshot, SessionInfo, SessionState};
use super::steps::{forward_step, import_step, reset_step, update_step};
use super::{
    Applied, ExportedState, Forward, ForwardOutcome, Preconditions, SessionError, SessionId,
    SessionSnapshot, UpdateParameters,
};
use crate::compute::ComputePool;
use crate::memory::{charge_unless_large, Charge, Kind, MemoryBudget};
use crate::numerics::state_dict::{self, ExportTensors};
use crate::numerics::stats::StatsKernel;
use crate::numerics::TensorData;
use crate::telemetry::Metrics;

pub use barrier::StepLimits;

/// Limits enforced by the registry (RESOURCE_EXHAUSTED beyond them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_sessions: u64,
    /// Largest number of live sessions of one tenant (None: no such limit).
    pub max_sessions_per_tenant: Option<u64>,
    pub max_tensor_elements: u64,
    pub max_num_features: i64,
    /// Largest size of one ListSessions page with tensors, in bytes of tensor
    /// data (the reply must fit in one message): a page ends early rather
    /// than exceed it.
    pub max_page_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct RegistryOptions {
    pub limits: Limits,
    /// Device of sessions created with `auto`.
    pub default_device: Device,
    /// Request ids remembered per session.
    pub replay_window: usize,
    /// Bytes of forward outputs held per session for replays.
    pub replay_cache_bytes: usize,
    /// Bytes of forward outputs held for replays by all sessions together.
    pub replay_cache_total_bytes: usize,
    /// Who computes train-mode batch statistics on the CPU.
    pub stats_kernel: StatsKernel,
    /// The server-wide memory budget: sessions are charged their
    /// [`resident_bytes`](crate::session::resident_bytes) while in memory,
    /// replay logs what they hold.
    pub memory_budget: Arc<MemoryBudget>,
    /// Bounds on synchronized steps waiting for their ranks.
    pub steps: StepLimits,
}

/// What start-up recovery found.
#[derive(Debug, Clone)]
pub struct Recovery {
    pub loaded: usize,
    pub unreadable: usize,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("session {id}: {error}; refusing to start")]
    NewerFormat { id: String, error: RecordError },
    #[error(transparent)]
    Session(#[from] SessionError),
}

pub struct Registry {
    sessions: RwLock<BTreeMap<SessionId, Arc<Session>>>,
    /// Creations under way, counted against the session limits before they exist.
    reserved: std::sync::Mutex<create::Reserved>,
    /// Sessions whose stored record cannot be read: DATA_LOSS, never reset.
    unreadable: RwLock<BTreeMap<SessionId, String>>,
    /// Sessions the idle TTL dropped from memory (their records stay in the
    /// store) and when they were last used, which loading them again restores.
    evicted: std::sync::Mutex<BTreeMap<SessionId, SystemTime>>,
    options: RegistryOptions,
    pool: ComputePool,
    store: Option<Arc<dyn SessionStore>>,
    metrics: Arc<Metrics>,
    /// What every session's replay log may hold (one server-wide count).
    replay: ReplayLimits,
    /// Synchronized steps waiting for their ranks.
    barriers: barrier::Barriers<synced::StepDone, synced::Preview>,
    /// Each session's last backward reduction, for its retries.
    backward_done: synced::BackwardDone,
}

/// One session: immutable facts outside the lock, mutable state inside, and
/// its charge on the memory budget, given back when the last reference goes
/// (deleted, evicted, or replaced by another incarnation).
struct Session {
    info: SessionInfo,
    state: Arc<tokio::sync::Mutex<SessionState>>,
    _charge: Charge,
}

impl Session {
    fn new(info: SessionInfo, state: SessionState, charge: Charge) -> Session {
        Session {
            info,
            state: Arc::new(tokio::sync::Mutex::new(state)),
            _charge: charge,
        }
    }
}

impl Registry {
    /// A registry computing on `pool`, storing in `store` (None: memory only)
    /// and reporting its expiries to `metrics`.
    pub fn new(
        options: RegistryOptions,
        pool: ComputePool,
        store: Option<Arc<dyn SessionStore>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Registry {
            sessions: RwLock::new(BTreeMap::new()),
            reserved: std::sync::Mutex::new(create::Reserved::default()),
            unreadable: RwLock::new(BTreeMap::new()),
            evicted: std::sync::Mutex::new(BTreeMap::new()),
            replay: ReplayLimits::new(
                options.replay_window,
                options.replay_cache_bytes,
                options.replay_cache_total_bytes,
                options.memory_budget.clone(),
            ),
            barriers: barrier::Barriers::new(options.steps),
            backward_done: synced::BackwardDone::default(),
            options,
            pool,
            store,
            metrics,
        }
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// The memory budget sessions and replay logs are charged to.
    pub fn memory_budget(&self) -> &Arc<MemoryBudget> {
        &self.options.memory_budget
    }

    /// The compute pool, shared with the stateless services.
    pub fn pool(&self) -> &ComputePool {
        &self.pool
    }

    /// "none", "embedded" or "redis".
    pub fn store_name(&self) -> &'static str {
        self.store.as_ref().map_or("none", |s| s.name())
    }

    /// Whether other replicas change the stored sessions too.
    fn is_shared(&self) -> bool {
        self.store.as_ref().is_some_and(|s| s.is_shared())
    }

    /// Sessions held in memory (with a shared store: those this replica has seen).
    pub fn len(&self) -> usize {
        self.read_map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions of `tenant` held in memory.
    pub fn tenant_len(&self, tenant: &str) -> usize {
        listing::count_in_tenant(&self.read_map(), tenant)
    }

    pub async fn get(&self, id: &SessionId) -> Result<SessionSnapshot, SessionError> {
        self.read(id, |info, state| snapshot(info, &state.layer, true))
            .await
    }

    pub async fn reset_running_stats(
        &self,
        id: &SessionId,
        given: Preconditions,
    ) -> Result<Applied<SessionSnapshot>, SessionError> {
        self.mutate(id, 0, move |info, state| reset_step(info, state, &given))
            .await
    }

    pub async fn update_parameters(
        &self,
        id: &SessionId,
        update: UpdateParameters,
        given: Preconditions,
    ) -> Result<Applied<SessionSnapshot>, SessionError> {
        // (C,) parameters at most: small enough to run inline.
        self.mutate(id, 0, move |info, state| {
            update_step(info, state, &update, &given)
        })
        .await
    }

    pub async fn forward(&self, command: Forward) -> Result<ForwardOutcome, SessionError> {
        let id = command.id.clone();
        let stats = self.options.stats_kernel;
        let input_bytes = command.input.byte_size();
        // The output is the input's size: charged before it is computed, and
        // until it is handed to the reply (which is charged while sent). Into
        // the caller's memory, only the copy a replay may keep is held here.
        let held = match (&command.output_memory, &command.preconditions.request_id) {
            (None, _) => input_bytes,
            (Some(_), Some(_)) if input_bytes <= self.replay.output_bytes => input_bytes,
            (Some(_), _) => 0,
        };
        let _output = charge_unless_large(&self.options.memory_budget, held as u64, Kind::Replies)?;
        self.mutate(&id, input_bytes, move |info, state| {
            forward_step(info, state, &command, stats)
        })
        .await
    }

    pub async fn export_state(&self, id: &SessionId) -> Result<ExportedState, SessionError> {
        self.read(id, |info, state| {
            info.last_used.touch();
            let layer = &state.layer;
            let host =
                |t: &Option<tch::Tensor>| t.as_ref().map(TensorData::from_tensor).transpose();
            let (weight, bias) = (host(&layer.weight)?, host(&layer.bias)?);
            let (mean, var) = (host(&layer.running_mean)?, host(&layer.running_var)?);
            let bytes = state_dict::export(&ExportTensors {
                weight: weight.as_ref(),
                bias: bias.as_ref(),
                running_mean: mean.as_ref(),
                running_var: var.as_ref(),
                num_batches_tracked: info
                    .config
                    .track_running_stats
                    .then_some(layer.num_batches_tracked),
                exact: layer.exact.as_ref().map(|e| &e.sums),
            })?;
            Ok(ExportedState {
                safetensors: Bytes::from(bytes),
                version: layer.version,
            })
        })
        .await
    }

    pub async fn import_state(
        &self,
        id: &SessionId,
        safetensors: Bytes,
        strict: bool,
        given: Preconditions,
    ) -> Result<Applied<SessionSnapshot>, SessionError> {
        let max_elements = self.options.limits.max_tensor_elements;
        self.mutate(id, safetensors.len(), move |info, state| {
            import_step(info, state, &safetensors, strict, &given, max_elements)
        })
        .await
    }
}
