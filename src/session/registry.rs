//! The registry of live sessions and every operation on them.
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

use crate::numerics::stats::StatsKernel;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tch::Device;
use tokio::sync::OwnedMutexGuard;

use super::durable::{RecordError, SessionRecord, SessionStore, Stamp, Written};
use super::layer::{
    self, check_count, forward_step, import_step, info_from_record, initial_layer, reset_step,
    snapshot, state_from_record, unix_nanos, update_step, LastUse, SessionInfo, SessionState, Step,
};
use super::replay::ReplayLog;
use super::{
    check_labels, Applied, CreateSession, ExportedState, Forward, ForwardOutcome, MutationGuard,
    SessionConfig, SessionError, SessionId, SessionPage, SessionSnapshot, UpdateParameters,
};
use crate::compute::{ComputeError, ComputePool};
use crate::config::TtlAction;
use crate::numerics::batch_norm::{check_eps, check_momentum};
use crate::numerics::state_dict::{self, ExportTensors};
use crate::numerics::{Momentum, TensorData};
use crate::telemetry::metrics::Eviction;

/// Limits enforced by the registry (RESOURCE_EXHAUSTED beyond them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_sessions: u64,
    /// Largest number of live sessions of one tenant (None: no such limit).
    pub max_sessions_per_tenant: Option<u64>,
    pub max_tensor_elements: u64,
    pub max_num_features: i64,
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
    /// Who computes train-mode batch statistics on the CPU.
    pub stats_kernel: StatsKernel,
}

/// How many times a mutation recomputes after losing a compare-and-set to
/// another replica before it gives up with ABORTED.
const MAX_ATTEMPTS: usize = 64;

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
    reserved: std::sync::Mutex<Reserved>,
    /// Sessions whose stored record cannot be read: DATA_LOSS, never reset.
    unreadable: RwLock<BTreeMap<SessionId, String>>,
    /// Sessions the idle TTL dropped from memory (their records stay in the
    /// store) and when they were last used, which loading them again restores.
    evicted: std::sync::Mutex<BTreeMap<SessionId, SystemTime>>,
    options: RegistryOptions,
    pool: ComputePool,
    store: Option<Arc<dyn SessionStore>>,
}

/// One session: immutable facts outside the lock, mutable state inside.
struct Session {
    info: SessionInfo,
    state: Arc<tokio::sync::Mutex<SessionState>>,
}

/// A step's result, with the record to store when it changes the state.
// Built once per request and moved, never stored.
#[allow(clippy::large_enum_variant)]
enum Prepared<T> {
    Done(T),
    Next {
        layer: layer::LayerState,
        replay: Option<(String, super::replay::Replay)>,
        value: T,
        record: Option<SessionRecord>,
    },
}

impl Registry {
    pub fn new(
        options: RegistryOptions,
        pool: ComputePool,
        store: Option<Arc<dyn SessionStore>>,
    ) -> Self {
        Registry {
            sessions: RwLock::new(BTreeMap::new()),
            reserved: std::sync::Mutex::new(Reserved::default()),
            unreadable: RwLock::new(BTreeMap::new()),
            evicted: std::sync::Mutex::new(BTreeMap::new()),
            options,
            pool,
            store,
        }
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// The compute pool, shared with the stateless services.
    pub fn pool(&self) -> &ComputePool {
        &self.pool
    }

    /// "none", "embedded" or "redis".
    pub fn store_name(&self) -> &'static str {
        self.store.as_ref().map_or("none", |s| s.name())
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
        count_in_tenant(&self.read_map(), tenant)
    }

    /// Sessions whose records could not be read.
    pub fn unreadable_count(&self) -> usize {
        self.unreadable
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<SessionId, Arc<Session>>> {
        // A poisoned lock only means another thread panicked while holding it;
        // the map itself is always consistent (single insert/remove calls).
        self.sessions
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<SessionId, Arc<Session>>> {
        self.sessions
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn evicted_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<SessionId, SystemTime>> {
        self.evicted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_unreadable(&self, id: &SessionId, reason: String) -> SessionError {
        tracing::error!(session = %id, %reason, "stored session cannot be read; serving DATA_LOSS for it");
        self.unreadable
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), reason.clone());
        SessionError::DataLoss {
            id: id.clone(),
            reason,
        }
    }

    fn forget(&self, session: &Arc<Session>) {
        let mut map = self.write_map();
        if map
            .get(&session.info.id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            map.remove(&session.info.id);
        }
    }

    /// Loads every stored session (unshared stores) before serving.
    pub async fn recover(&self) -> Result<Recovery, RecoveryError> {
        let start = Instant::now();
        let Some(store) = &self.store else {
            return Ok(Recovery {
                loaded: 0,
                unreadable: 0,
                elapsed: start.elapsed(),
            });
        };
        let mut loaded = 0;
        let mut unreadable = 0;
        for (key, stored) in store.load_all().await.map_err(SessionError::from)? {
            let record = match stored {
                Ok(record) => record,
                Err(error @ RecordError::NewerFormat { .. }) => {
                    return Err(RecoveryError::NewerFormat { id: key, error });
                }
                Err(RecordError::Corrupt(reason)) => {
                    let id = SessionId::parse_key(&key).unwrap_or_else(|_| SessionId::generate());
                    self.mark_unreadable(&id, format!("record is corrupt: {reason}"));
                    unreadable += 1;
                    continue;
                }
            };
            match self.session_from_record(record).await {
                Ok(session) => {
                    self.write_map().insert(session.info.id.clone(), session);
                    loaded += 1;
                }
                Err(SessionError::DataLoss { id, reason }) => {
                    self.mark_unreadable(&id, reason);
                    unreadable += 1;
                }
                Err(other) => return Err(other.into()),
            }
        }
        Ok(Recovery {
            loaded,
            unreadable,
            elapsed: start.elapsed(),
        })
    }

    async fn session_from_record(
        &self,
        record: SessionRecord,
    ) -> Result<Arc<Session>, SessionError> {
        let default_device = self.options.default_device;
        let (window, bytes) = (self.options.replay_window, self.options.replay_cache_bytes);
        let fallback_id =
            SessionId::parse_key(&record.id).unwrap_or_else(|_| SessionId::generate());
        let info =
            info_from_record(&record, default_device).map_err(|e| SessionError::DataLoss {
                id: fallback_id,
                reason: e.to_string(),
            })?;
        let (info, state) = self
            .pool
            .run(move || {
                let state = state_from_record(&info, &record, window, bytes);
                (info, state)
            })
            .await?;
        Ok(Arc::new(Session {
            info,
            state: Arc::new(tokio::sync::Mutex::new(state?)),
        }))
    }

    /// The cached session, or the stored one loaded into the cache.
    async fn lookup(&self, id: &SessionId) -> Result<Arc<Session>, SessionError> {
        if let Some(session) = self.read_map().get(id).cloned() {
            return Ok(session);
        }
        let session = self.load_stored(id).await?;
        // Back in memory: no longer an evicted session.
        self.evicted_map().remove(id);
        let mut map = self.write_map();
        Ok(map.entry(id.clone()).or_insert(session).clone())
    }

    /// The cached session, or else the stored one loaded but not cached (for
    /// listing evicted sessions without bringing them back into memory).
    async fn cached_or_stored(&self, id: &SessionId) -> Result<Arc<Session>, SessionError> {
        if let Some(session) = self.read_map().get(id).cloned() {
            return Ok(session);
        }
        self.load_stored(id).await
    }

    /// The stored session, built from its record (DATA_LOSS for an
    /// unreadable one) and not cached; an evicted session keeps the last use
    /// it had when the idle TTL dropped it.
    async fn load_stored(&self, id: &SessionId) -> Result<Arc<Session>, SessionError> {
        if let Some(reason) = self
            .unreadable
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return Err(SessionError::DataLoss {
                id: id.clone(),
                reason: reason.clone(),
            });
        }
        let Some(store) = &self.store else {
            return Err(SessionError::NotFound(id.clone()));
        };
        let record = match store.load(id).await? {
            None => return Err(SessionError::NotFound(id.clone())),
            Some(Err(error)) => return Err(self.mark_unreadable(id, error.to_string())),
            Some(Ok(record)) => record,
        };
        let session = match self.session_from_record(record).await {
            Ok(session) => session,
            Err(SessionError::DataLoss { reason, .. }) => {
                return Err(self.mark_unreadable(id, reason))
            }
            Err(other) => return Err(other),
        };
        if let Some(last_used) = self.evicted_map().get(id) {
            session.info.last_used.restore(*last_used);
        }
        Ok(session)
    }

    /// The description of a session loaded by [`Self::cached_or_stored`].
    async fn describe_stored(
        &self,
        session: Arc<Session>,
        include_tensors: bool,
    ) -> Result<SessionSnapshot, SessionError> {
        let state = session.state.clone().lock_owned().await;
        self.pool
            .run(move || snapshot(&session.info, &state.layer, include_tensors))
            .await?
    }

    /// Drops from memory (`Evict`: the stored record stays and the next
    /// request naming the session loads it again) or deletes (`Delete`) every
    /// session unused for `ttl` or longer; returns how many. Each is checked
    /// again under its lock, so a request queued on it keeps it alive.
    /// `Evict` without a store does nothing (the configuration refuses it).
    pub async fn expire_idle(&self, ttl: Duration, action: TtlAction) -> usize {
        if action == TtlAction::Evict && self.store.is_none() {
            return 0;
        }
        let idle_since = |session: &Session| {
            SystemTime::now()
                .duration_since(session.info.last_used.get())
                .ok()
                .filter(|idle| *idle >= ttl)
        };
        let idle: Vec<Arc<Session>> = self
            .read_map()
            .values()
            .filter(|s| idle_since(s).is_some())
            .cloned()
            .collect();
        let mut expired = 0;
        for session in idle {
            let id = session.info.id.clone();
            let mut state = session.state.clone().lock_owned().await;
            let Some(idle_for) = idle_since(&session) else {
                continue; // used while we waited for it
            };
            if state.deleted || state.evicted {
                continue;
            }
            let eviction = match action {
                TtlAction::Evict => {
                    state.evicted = true;
                    self.evicted_map()
                        .insert(id.clone(), session.info.last_used.get());
                    Eviction::Evict
                }
                TtlAction::Delete => {
                    if let Some(store) = &self.store {
                        match store.delete(&id, Some(stamp(&session.info, &state))).await {
                            Ok(Written::Committed) => {}
                            // Another replica changed it: in use after all.
                            Ok(Written::Conflict) => continue,
                            Err(error) => {
                                tracing::warn!(session = %id, %error,
                                    "idle session not deleted: store error; retried at the next sweep");
                                continue;
                            }
                        }
                    }
                    state.deleted = true;
                    Eviction::Delete
                }
            };
            self.forget(&session);
            self.pool.metrics().eviction(eviction);
            tracing::info!(
                session = %id,
                tenant = id.tenant(),
                idle_seconds = idle_for.as_secs_f64(),
                action = eviction.label(),
                "idle session expired"
            );
            expired += 1;
        }
        expired
    }

    /// Replaces the cached state by the stored one. `Replaced` when the store
    /// holds another incarnation (deleted and created again meanwhile): the
    /// cached session is dropped and must be looked up again.
    async fn reload(
        &self,
        session: &Arc<Session>,
        state: &mut SessionState,
    ) -> Result<Current, SessionError> {
        let Some(store) = &self.store else {
            return Ok(Current::Same);
        };
        let id = &session.info.id;
        let record = match store.load(id).await? {
            None => {
                state.deleted = true;
                self.forget(session);
                return Err(SessionError::NotFound(id.clone()));
            }
            Some(Err(error)) => return Err(self.mark_unreadable(id, error.to_string())),
            Some(Ok(record)) => record,
        };
        if record.created_at_unix_nanos != unix_nanos(session.info.created_at) {
            state.deleted = true;
            self.forget(session);
            return Ok(Current::Replaced);
        }
        let (window, bytes) = (self.options.replay_window, self.options.replay_cache_bytes);
        let for_job = session.clone();
        let fresh = self
            .pool
            .run(move || state_from_record(&for_job.info, &record, window, bytes))
            .await??;
        *state = fresh;
        Ok(Current::Same)
    }

    /// With a shared store, makes the cached state current.
    async fn refresh(
        &self,
        session: &Arc<Session>,
        state: &mut SessionState,
    ) -> Result<Current, SessionError> {
        let Some(store) = self.store.as_ref().filter(|s| s.is_shared()) else {
            return Ok(Current::Same);
        };
        match store.version(&session.info.id).await? {
            Some(stored) if stored == stamp(&session.info, state) => Ok(Current::Same),
            _ => self.reload(session, state).await,
        }
    }

    /// The session and its state, locked and current; `None` when the cached
    /// session turned out to be deleted or replaced by another replica (look
    /// it up again).
    async fn locked(
        &self,
        id: &SessionId,
    ) -> Result<Option<(Arc<Session>, OwnedMutexGuard<SessionState>)>, SessionError> {
        let session = self.lookup(id).await?;
        let mut state = session.state.clone().lock_owned().await;
        if state.evicted {
            return Ok(None); // dropped by the idle TTL: load it again
        }
        let shared = self.store.as_ref().is_some_and(|s| s.is_shared());
        if state.deleted {
            return if shared {
                Ok(None)
            } else {
                Err(SessionError::NotFound(id.clone()))
            };
        }
        match self.refresh(&session, &mut state).await? {
            Current::Same => Ok(Some((session, state))),
            Current::Replaced => Ok(None),
        }
    }

    /// Runs a read-only job with the session's state locked and current.
    async fn read<T, F>(&self, id: &SessionId, job: F) -> Result<T, SessionError>
    where
        T: Send + 'static,
        F: FnOnce(&SessionInfo, &SessionState) -> Result<T, SessionError> + Send + 'static,
    {
        for _ in 0..MAX_ATTEMPTS {
            let Some((session, state)) = self.locked(id).await? else {
                continue;
            };
            return self.pool.run(move || job(&session.info, &state)).await?;
        }
        Err(SessionError::Contended(id.clone()))
    }

    /// Runs a step with the session's state locked and current; stores and
    /// commits the new state it computes, recomputing after a lost
    /// compare-and-set.
    /// `input_bytes`: the tensor data the job reads (chooses inline or
    /// blocking-thread compute, see [`ComputePool::run_sized`]).
    async fn mutate<T, F>(
        &self,
        id: &SessionId,
        input_bytes: usize,
        job: F,
    ) -> Result<T, SessionError>
    where
        T: Send + 'static,
        F: Fn(&SessionInfo, &SessionState) -> Result<Step<T>, SessionError> + Send + Sync + 'static,
    {
        let job = Arc::new(job);
        let with_record = self.store.is_some();
        for _ in 0..MAX_ATTEMPTS {
            let Some((session, state)) = self.locked(id).await? else {
                continue;
            };
            let (job, for_job) = (job.clone(), session.clone());
            let (state, prepared) = self
                .pool
                .run_sized(input_bytes, move || {
                    let prepared = prepare(&for_job.info, &state, job.as_ref(), with_record);
                    (state, prepared)
                })
                .await?;
            let prepared = prepared?;
            // A refused request is not a use: it leaves the session as it was.
            session.info.last_used.touch();
            let (layer, replay, value, record) = match prepared {
                Prepared::Done(value) => return Ok(value),
                Prepared::Next {
                    layer,
                    replay,
                    value,
                    record,
                } => (layer, replay, value, record),
            };
            let Some(record) = record.filter(|_| self.store.is_some()) else {
                // No store: the swap is synchronous, so a cancelled caller
                // cannot interrupt it half-way; no task needed.
                let mut state = state;
                state.layer = layer;
                if let Some((request_id, replay)) = replay {
                    state.replay.record(request_id, replay);
                }
                return Ok(value);
            };
            // The store write and the swap run in their own task: a client
            // that goes away after the write cannot leave memory behind the store.
            let store = self.store.clone();
            let commit = tokio::spawn(async move {
                if let Some(store) = store {
                    match store.put(&record, Some(stamp(&session.info, &state))).await {
                        Ok(Written::Committed) => {}
                        Ok(Written::Conflict) => return Ok(Err((session, state))),
                        Err(error) => return Err(SessionError::from(error)),
                    }
                }
                let mut state = state;
                state.layer = layer;
                if let Some((request_id, replay)) = replay {
                    state.replay.record(request_id, replay);
                }
                Ok(Ok(value))
            });
            let outcome = commit
                .await
                .map_err(|e| ComputeError::JobFailed(e.to_string()))??;
            match outcome {
                Ok(value) => return Ok(value),
                Err((session, mut state)) => {
                    // Another replica moved the session on: start again from its state.
                    self.reload(&session, &mut state).await?;
                }
            }
        }
        Err(SessionError::Contended(id.clone()))
    }

    pub async fn create(
        &self,
        command: CreateSession,
    ) -> Result<(SessionSnapshot, bool), SessionError> {
        let limits = self.options.limits;
        validate_config(&command.config, &limits)?;
        if let Some(count) = command.num_batches_tracked {
            check_count(count)?;
            if !command.config.track_running_stats {
                return Err(SessionError::InvalidArgument(
                    "num_batches_tracked: the session has track_running_stats=false".into(),
                ));
            }
        }
        let device = command.device.resolve(Some(self.options.default_device))?;
        if let Some(id) = &command.id {
            match self.lookup(id).await {
                Ok(existing) => {
                    return self
                        .existing_for_create(existing, &command.config, device)
                        .await
                }
                Err(SessionError::NotFound(_)) => {}
                Err(other) => return Err(other),
            }
        }
        let id = command
            .id
            .clone()
            .unwrap_or_else(|| SessionId::generate_in(&command.tenant));
        let _slot = self.reserve_slot(id.tenant())?;
        let info = SessionInfo {
            id,
            config: command.config.clone(),
            device,
            created_at: SystemTime::now(),
            last_used: LastUse::new(SystemTime::now()),
        };
        let with_record = self.store.is_some();
        let (window, bytes) = (self.options.replay_window, self.options.replay_cache_bytes);
        let (info, built) = self
            .pool
            .run(move || {
                let built = initial_layer(
                    &info.config,
                    device,
                    &command.initial,
                    command.num_batches_tracked,
                )
                .and_then(|layer| {
                    let record = if with_record {
                        Some(layer::record(&info, &layer, Vec::new())?)
                    } else {
                        None
                    };
                    let snapshot = snapshot(&info, &layer, true)?;
                    Ok((layer, record, snapshot))
                });
                (info, built)
            })
            .await?;
        let (layer, record, snapshot) = built?;
        let id = info.id.clone();
        let mut stored = false;
        if let (Some(store), Some(record)) = (&self.store, record) {
            match store.put(&record, None).await? {
                Written::Committed => stored = true,
                Written::Conflict => {
                    // Created meanwhile by another request or replica.
                    let existing = self.lookup(&id).await?;
                    return self
                        .existing_for_create(existing, &command.config, device)
                        .await;
                }
            }
        }
        let session = Arc::new(Session {
            info,
            state: Arc::new(tokio::sync::Mutex::new(SessionState {
                layer,
                deleted: false,
                evicted: false,
                replay: ReplayLog::new(window, bytes),
            })),
        });
        let existing = {
            let mut map = self.write_map();
            match map.get(&id) {
                Some(existing) => Some(existing.clone()),
                None => {
                    map.insert(id.clone(), session);
                    None
                }
            }
        };
        match existing {
            // Our record is the stored one; a concurrent lookup cached it first.
            Some(_) if stored => Ok((snapshot, false)),
            // Without a store, another create with the same id won the race.
            Some(existing) => {
                self.existing_for_create(existing, &command.config, device)
                    .await
            }
            None => Ok((snapshot, false)),
        }
    }

    /// Counts a creation in `tenant` against `max_sessions` and the tenant's
    /// limit until it is dropped.
    fn reserve_slot(&self, tenant: &str) -> Result<Reservation<'_>, SessionError> {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let taken = self.len() as u64 + reserved.total;
        if taken >= self.options.limits.max_sessions {
            return Err(too_many_sessions(
                taken + 1,
                self.options.limits.max_sessions,
            ));
        }
        if let Some(limit) = self.options.limits.max_sessions_per_tenant {
            let pending = reserved.by_tenant.get(tenant).copied().unwrap_or(0);
            let taken = self.tenant_len(tenant) as u64 + pending;
            if taken >= limit {
                return Err(SessionError::LimitExceeded {
                    what: "session count of the tenant",
                    actual: taken + 1,
                    limit,
                    limit_name: "tenant_max_sessions",
                });
            }
        }
        reserved.total += 1;
        *reserved.by_tenant.entry(tenant.to_owned()).or_insert(0) += 1;
        Ok(Reservation {
            reserved: &self.reserved,
            tenant: tenant.to_owned(),
        })
    }

    async fn existing_for_create(
        &self,
        existing: Arc<Session>,
        config: &SessionConfig,
        device: Device,
    ) -> Result<(SessionSnapshot, bool), SessionError> {
        existing.info.last_used.touch();
        let difference =
            config_difference(&existing.info.config, existing.info.device, config, device);
        if !difference.is_empty() {
            return Err(SessionError::AlreadyExists {
                id: existing.info.id.clone(),
                difference: difference.join(", "),
            });
        }
        let id = existing.info.id.clone();
        let snapshot = self
            .read(&id, |info, state| snapshot(info, &state.layer, true))
            .await?;
        Ok((snapshot, true))
    }

    pub async fn get(&self, id: &SessionId) -> Result<SessionSnapshot, SessionError> {
        self.read(id, |info, state| snapshot(info, &state.layer, true))
            .await
    }

    /// Sessions after `after` in id order carrying every label of `selector`,
    /// of `tenant` only (None: of every tenant).
    pub async fn list(
        &self,
        tenant: Option<&str>,
        after: Option<&SessionId>,
        page_size: usize,
        selector: &BTreeMap<String, String>,
        include_tensors: bool,
    ) -> Result<SessionPage, SessionError> {
        let matches = |session: &Session| {
            selector
                .iter()
                .all(|(k, v)| session.info.config.labels.get(k) == Some(v))
        };
        let in_scope = |id: &SessionId| tenant.is_none_or(|t| id.belongs_to(t));
        // A named tenant's keys are contiguous: start at the first of them.
        let start = match (after, tenant) {
            (Some(after), _) => Some(after.clone()),
            (None, Some(tenant)) if !tenant.is_empty() => Some(SessionId::tenant_start(tenant)),
            (None, _) => None,
        };
        let contiguous = tenant.is_some_and(|t| !t.is_empty());
        let mut candidates: Vec<Arc<Session>> = Vec::new();
        let shared = self.store.as_ref().is_some_and(|s| s.is_shared());
        let some_evicted = !self.evicted_map().is_empty();
        match self.store.as_ref().filter(|_| shared || some_evicted) {
            // Other replicas create sessions too, and evicted sessions are in
            // the store only: the store has the full list.
            Some(store) => {
                let mut cursor = start;
                'pages: loop {
                    let ids = store.ids_after(cursor.as_ref(), page_size + 1).await?;
                    let Some(last) = ids.last().cloned() else {
                        break;
                    };
                    for id in ids {
                        if !in_scope(&id) {
                            if contiguous {
                                break 'pages;
                            }
                            continue;
                        }
                        let found = if shared {
                            self.lookup(&id).await
                        } else {
                            // Listing is not a use: an evicted session stays out of memory.
                            self.cached_or_stored(&id).await
                        };
                        match found {
                            Ok(session) if matches(&session) => candidates.push(session),
                            Ok(_)
                            | Err(SessionError::NotFound(_) | SessionError::DataLoss { .. }) => {}
                            Err(other) => return Err(other),
                        }
                        if candidates.len() > page_size {
                            break 'pages;
                        }
                    }
                    cursor = Some(last);
                }
            }
            None => {
                let map = self.read_map();
                let lower = start.as_ref().map_or(Bound::Unbounded, Bound::Excluded);
                candidates = map
                    .range::<SessionId, _>((lower, Bound::Unbounded))
                    .take_while(|(id, _)| !contiguous || in_scope(id))
                    .filter(|(id, _)| in_scope(id))
                    .map(|(_, session)| session)
                    .filter(|s| matches(s))
                    .take(page_size + 1)
                    .cloned()
                    .collect();
            }
        }
        let next_after = if candidates.len() > page_size {
            candidates.truncate(page_size);
            candidates.last().map(|s| s.info.id.clone())
        } else {
            None
        };
        let mut sessions = Vec::with_capacity(candidates.len());
        for session in candidates {
            let id = session.info.id.clone();
            let cached = self
                .read_map()
                .get(&id)
                .is_some_and(|s| Arc::ptr_eq(s, &session));
            let described = if cached || shared {
                self.read(&id, move |info, state| {
                    snapshot(info, &state.layer, include_tensors)
                })
                .await
            } else {
                self.describe_stored(session, include_tensors).await
            };
            match described {
                Ok(snapshot) => sessions.push(snapshot),
                // Deleted since the page was collected.
                Err(SessionError::NotFound(_)) => {}
                Err(other) => return Err(other),
            }
        }
        Ok(SessionPage {
            sessions,
            next_after,
        })
    }

    pub async fn delete(
        &self,
        id: &SessionId,
        expected_version: Option<u64>,
    ) -> Result<(), SessionError> {
        for _ in 0..MAX_ATTEMPTS {
            let session = match self.lookup(id).await {
                Ok(session) => session,
                // The operator's way out of a DATA_LOSS session: delete its record.
                Err(SessionError::DataLoss { .. }) if expected_version.is_none() => {
                    if let Some(store) = &self.store {
                        store.delete(id, None).await?;
                    }
                    self.unreadable
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(id);
                    return Ok(());
                }
                Err(other) => return Err(other),
            };
            drop(session);
            let Some((session, mut state)) = self.locked(id).await? else {
                continue;
            };
            if let Some(expected) = expected_version {
                if expected != state.layer.version {
                    return Err(SessionError::VersionMismatch {
                        id: id.clone(),
                        expected,
                        actual: state.layer.version,
                    });
                }
            }
            if let Some(store) = &self.store {
                if store.delete(id, Some(stamp(&session.info, &state))).await? == Written::Conflict
                {
                    self.reload(&session, &mut state).await?;
                    continue;
                }
            }
            state.deleted = true;
            self.forget(&session);
            return Ok(());
        }
        Err(SessionError::Contended(id.clone()))
    }

    pub async fn reset_running_stats(
        &self,
        id: &SessionId,
        guard: MutationGuard,
    ) -> Result<Applied<SessionSnapshot>, SessionError> {
        self.mutate(id, 0, move |info, state| reset_step(info, state, &guard))
            .await
    }

    pub async fn update_parameters(
        &self,
        id: &SessionId,
        update: UpdateParameters,
        guard: MutationGuard,
    ) -> Result<Applied<SessionSnapshot>, SessionError> {
        // (C,) parameters at most: small enough to run inline.
        self.mutate(id, 0, move |info, state| {
            update_step(info, state, &update, &guard)
        })
        .await
    }

    pub async fn forward(&self, command: Forward) -> Result<ForwardOutcome, SessionError> {
        let id = command.id.clone();
        let stats = self.options.stats_kernel;
        let input_bytes = command.input.bytes().len();
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
        guard: MutationGuard,
    ) -> Result<Applied<SessionSnapshot>, SessionError> {
        let max_elements = self.options.limits.max_tensor_elements;
        self.mutate(id, safetensors.len(), move |info, state| {
            import_step(info, state, &safetensors, strict, &guard, max_elements)
        })
        .await
    }
}

/// Creations under way: in all, and per tenant.
#[derive(Default)]
struct Reserved {
    total: u64,
    by_tenant: BTreeMap<String, u64>,
}

/// A creation's place under the session limits, released when the creation
/// ends (by then the session is in the map, or it failed).
struct Reservation<'a> {
    reserved: &'a std::sync::Mutex<Reserved>,
    tenant: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        reserved.total = reserved.total.saturating_sub(1);
        if let Some(count) = reserved.by_tenant.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                reserved.by_tenant.remove(&self.tenant);
            }
        }
    }
}

/// Sessions of `tenant` in `map`: a range of keys for a named tenant, a scan
/// for the default tenant (whose keys have no prefix).
fn count_in_tenant(map: &BTreeMap<SessionId, Arc<Session>>, tenant: &str) -> usize {
    if tenant.is_empty() {
        return map.keys().filter(|id| id.belongs_to("")).count();
    }
    let start = SessionId::tenant_start(tenant);
    map.range::<SessionId, _>((Bound::Excluded(&start), Bound::Unbounded))
        .take_while(|(id, _)| id.belongs_to(tenant))
        .count()
}

/// A session operation: computes what to do from the current state.
type StepFn<T> = dyn Fn(&SessionInfo, &SessionState) -> Result<Step<T>, SessionError>;

/// Runs a step and, when it changes the state, builds the record to store.
fn prepare<T>(
    info: &SessionInfo,
    state: &SessionState,
    job: &StepFn<T>,
    with_record: bool,
) -> Result<Prepared<T>, SessionError> {
    match job(info, state)? {
        Step::Done(value) => Ok(Prepared::Done(value)),
        Step::Next {
            layer,
            replay,
            value,
        } => {
            let record = if with_record {
                let next = replay.as_ref().map(|(id, r)| {
                    (
                        id.as_str(),
                        r.call_name(),
                        layer.version,
                        layer.num_batches_tracked,
                    )
                });
                Some(layer::record(info, &layer, state.replay.stored_with(next))?)
            } else {
                None
            };
            Ok(Prepared::Next {
                layer,
                replay,
                value,
                record,
            })
        }
    }
}

/// Whether a cached session is still the stored incarnation.
enum Current {
    Same,
    Replaced,
}

fn stamp(info: &SessionInfo, state: &SessionState) -> Stamp {
    Stamp {
        incarnation: unix_nanos(info.created_at),
        version: state.layer.version,
    }
}

fn too_many_sessions(actual: u64, limit: u64) -> SessionError {
    SessionError::LimitExceeded {
        what: "session count",
        actual,
        limit,
        limit_name: "max_sessions",
    }
}

fn validate_config(config: &SessionConfig, limits: &Limits) -> Result<(), SessionError> {
    if config.num_features < 1 {
        return Err(SessionError::InvalidArgument(format!(
            "num_features must be >= 1, got {}",
            config.num_features
        )));
    }
    if config.num_features > limits.max_num_features {
        return Err(SessionError::LimitExceeded {
            what: "num_features",
            actual: config.num_features as u64,
            limit: limits.max_num_features as u64,
            limit_name: "max_num_features",
        });
    }
    check_eps("eps", config.eps)?;
    if let Momentum::Exponential(m) = config.momentum {
        check_momentum("momentum", m)?;
    }
    check_labels(&config.labels)
}

/// Names of the fields in which two creations differ.
fn config_difference(
    a: &SessionConfig,
    a_device: Device,
    b: &SessionConfig,
    b_device: Device,
) -> Vec<String> {
    let mut fields = Vec::new();
    let mut differs = |name: &str, same: bool| {
        if !same {
            fields.push(name.to_owned());
        }
    };
    differs("kind", a.kind == b.kind);
    differs("num_features", a.num_features == b.num_features);
    differs("eps", a.eps == b.eps);
    differs("momentum", a.momentum == b.momentum);
    differs("affine", a.affine == b.affine);
    differs(
        "track_running_stats",
        a.track_running_stats == b.track_running_stats,
    );
    differs("param_dtype", a.param_dtype == b.param_dtype);
    differs("default_mode", a.default_mode == b.default_mode);
    differs(
        "reject_non_finite",
        a.reject_non_finite == b.reject_non_finite,
    );
    differs("labels", a.labels == b.labels);
    differs("device", a_device == b_device);
    fields
}
