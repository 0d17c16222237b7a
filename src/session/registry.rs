//! The registry of live sessions and every operation on them.
//!
//! Ordering: each session's state sits behind a FIFO async mutex; a request
//! takes it (in arrival order), then runs its tensor work on the compute pool
//! holding it, so mutations of one session apply one at a time while different
//! sessions run in parallel. The registry map itself is behind a std `RwLock`
//! held only for map lookups and inserts, never across an `.await`.
//!
//! Atomicity: every operation validates and computes on copies first and
//! commits at the very end, so a refused request changes nothing.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use bytes::Bytes;
use tch::{Device, Tensor};

use super::replay::{Replay, ReplayLog};
use super::{
    check_labels, Applied, CreateSession, ExportedState, Forward, ForwardOutcome, Mode,
    MutationGuard, SessionConfig, SessionError, SessionId, SessionPage, SessionSnapshot,
    StateTensors, UpdateParameters,
};
use crate::compute::ComputePool;
use crate::numerics::batch_norm::{all_finite, check_eps, check_momentum, Layer};
use crate::numerics::state_dict::{self, ExportTensors, Layout};
use crate::numerics::{torch_size, Momentum, NumericsError, TensorData};

/// Limits enforced by the registry (RESOURCE_EXHAUSTED beyond them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_sessions: u64,
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
}

pub struct Registry {
    sessions: RwLock<BTreeMap<SessionId, Arc<Session>>>,
    options: RegistryOptions,
    pool: ComputePool,
}

/// One session: immutable facts outside the lock, mutable state inside.
struct Session {
    id: SessionId,
    config: SessionConfig,
    device: Device,
    created_at: SystemTime,
    state: Arc<tokio::sync::Mutex<SessionState>>,
}

/// Tensors are (C,) in `config.param_dtype` on `Session::device`.
struct SessionState {
    eps: f64,
    momentum: Momentum,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running_mean: Option<Tensor>,
    running_var: Option<Tensor>,
    num_batches_tracked: i64,
    version: u64,
    updated_at: SystemTime,
    /// Set by DeleteSession; requests that were queued behind it see NOT_FOUND.
    deleted: bool,
    replay: ReplayLog,
}

const RESET: &str = "ResetRunningStats";
const UPDATE: &str = "UpdateParameters";
const IMPORT: &str = "ImportState";

impl Registry {
    pub fn new(options: RegistryOptions, pool: ComputePool) -> Self {
        Registry {
            sessions: RwLock::new(BTreeMap::new()),
            options,
            pool,
        }
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    pub fn len(&self) -> usize {
        self.read_map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    fn lookup(&self, id: &SessionId) -> Result<Arc<Session>, SessionError> {
        let Some(session) = self.read_map().get(id).cloned() else {
            return Err(SessionError::NotFound(id.clone()));
        };
        Ok(session)
    }

    /// Runs `job` on the compute pool with the session's state locked.
    async fn with_state<T, F>(&self, session: Arc<Session>, job: F) -> Result<T, SessionError>
    where
        T: Send + 'static,
        F: FnOnce(&Session, &mut SessionState) -> Result<T, SessionError> + Send + 'static,
    {
        let mut state = session.state.clone().lock_owned().await;
        if state.deleted {
            return Err(SessionError::NotFound(session.id.clone()));
        }
        self.pool.run(move || job(&session, &mut state)).await?
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
            if let Ok(existing) = self.lookup(id) {
                return self
                    .existing_for_create(existing, &command.config, device)
                    .await;
            }
        }
        if self.len() as u64 >= limits.max_sessions {
            return Err(too_many_sessions(
                self.len() as u64 + 1,
                limits.max_sessions,
            ));
        }
        let id = command.id.clone().unwrap_or_else(SessionId::generate);
        let replay = (self.options.replay_window, self.options.replay_cache_bytes);
        let config = command.config.clone();
        let built = self
            .pool
            .run(move || {
                build_state(
                    &config,
                    device,
                    &command.initial,
                    command.num_batches_tracked,
                    replay,
                )
            })
            .await??;
        let now = SystemTime::now();
        let session = Arc::new(Session {
            id: id.clone(),
            config: command.config.clone(),
            device,
            created_at: now,
            state: Arc::new(tokio::sync::Mutex::new(built)),
        });
        let existing = {
            let mut map = self.write_map();
            match map.get(&id) {
                Some(existing) => Some(existing.clone()),
                None if map.len() as u64 >= limits.max_sessions => {
                    return Err(too_many_sessions(map.len() as u64 + 1, limits.max_sessions));
                }
                None => {
                    map.insert(id.clone(), session.clone());
                    None
                }
            }
        };
        if let Some(existing) = existing {
            // Another create with the same id won the race.
            return self
                .existing_for_create(existing, &command.config, device)
                .await;
        }
        let snapshot = self
            .with_state(session, |s, st| snapshot(s, st, true))
            .await?;
        Ok((snapshot, false))
    }

    async fn existing_for_create(
        &self,
        existing: Arc<Session>,
        config: &SessionConfig,
        device: Device,
    ) -> Result<(SessionSnapshot, bool), SessionError> {
        let difference = config_difference(&existing.config, existing.device, config, device);
        if !difference.is_empty() {
            return Err(SessionError::AlreadyExists {
                id: existing.id.clone(),
                difference: difference.join(", "),
            });
        }
        let snapshot = self
            .with_state(existing, |s, st| snapshot(s, st, true))
            .await?;
        Ok((snapshot, true))
    }

    pub async fn get(&self, id: &SessionId) -> Result<SessionSnapshot, SessionError> {
        let session = self.lookup(id)?;
        self.with_state(session, |s, st| snapshot(s, st, true))
            .await
    }

    /// Sessions after `after` in id order carrying every label of `selector`.
    pub async fn list(
        &self,
        after: Option<&SessionId>,
        page_size: usize,
        selector: &BTreeMap<String, String>,
        include_tensors: bool,
    ) -> Result<SessionPage, SessionError> {
        let mut candidates: Vec<Arc<Session>> = {
            let map = self.read_map();
            let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
            map.range::<SessionId, _>((lower, Bound::Unbounded))
                .map(|(_, session)| session)
                .filter(|s| {
                    selector
                        .iter()
                        .all(|(k, v)| s.config.labels.get(k) == Some(v))
                })
                .take(page_size + 1)
                .cloned()
                .collect()
        };
        let next_after = if candidates.len() > page_size {
            candidates.truncate(page_size);
            candidates.last().map(|s| s.id.clone())
        } else {
            None
        };
        let mut sessions = Vec::with_capacity(candidates.len());
        for session in candidates {
            match self
                .with_state(session, move |s, st| snapshot(s, st, include_tensors))
                .await
            {
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
        let session = self.lookup(id)?;
        let target = session.clone();
        self.with_state(session, move |s, st| {
            check_version(s, st, expected_version)?;
            st.deleted = true;
            Ok(())
        })
        .await?;
        let mut map = self.write_map();
        // Only the session this call deleted, not one created again since.
        if map.get(id).is_some_and(|s| Arc::ptr_eq(s, &target)) {
            map.remove(id);
        }
        Ok(())
    }

    pub async fn reset_running_stats(
        &self,
        id: &SessionId,
        guard: MutationGuard,
    ) -> Result<Applied<SessionSnapshot>, SessionError> {
        let session = self.lookup(id)?;
        self.with_state(session, move |s, st| {
            if let Some(replay) = begin_mutation(s, st, &guard, RESET)? {
                return Ok(replay);
            }
            // PyTorch's reset_running_stats() is a no-op without statistics.
            if !s.config.track_running_stats {
                return Ok(Applied {
                    value: snapshot(s, st, true)?,
                    replayed: false,
                });
            }
            let options = (s.config.param_dtype.kind(), s.device);
            let c = [s.config.num_features];
            let mean = Tensor::f_zeros(c, options).map_err(NumericsError::from)?;
            let var = Tensor::f_ones(c, options).map_err(NumericsError::from)?;
            st.running_mean = Some(mean);
            st.running_var = Some(var);
            st.num_batches_tracked = 0;
            commit(s, st, guard.request_id, RESET)
        })
        .await
    }

    pub async fn update_parameters(
        &self,
        id: &SessionId,
        update: UpdateParameters,
        guard: MutationGuard,
    ) -> Result<Applied<SessionSnapshot>, SessionError> {
        let session = self.lookup(id)?;
        self.with_state(session, move |s, st| {
            if let Some(replay) = begin_mutation(s, st, &guard, UPDATE)? {
                return Ok(replay);
            }
            if let Some(eps) = update.eps {
                check_eps("eps", eps)?;
            }
            if let Some(Momentum::Exponential(m)) = update.momentum {
                check_momentum("momentum", m)?;
            }
            if let Some(count) = update.num_batches_tracked {
                check_count(count)?;
                if !s.config.track_running_stats {
                    return Err(SessionError::InvalidArgument(
                        "num_batches_tracked: the session has track_running_stats=false".into(),
                    ));
                }
            }
            let tensors = &update.tensors;
            let weight = param_tensor(&s.config, s.device, "weight", tensors.weight.as_ref())?;
            let bias = param_tensor(&s.config, s.device, "bias", tensors.bias.as_ref())?;
            let mean = param_tensor(
                &s.config,
                s.device,
                "running_mean",
                tensors.running_mean.as_ref(),
            )?;
            let var = param_tensor(
                &s.config,
                s.device,
                "running_var",
                tensors.running_var.as_ref(),
            )?;
            // Everything is valid: commit.
            st.weight = weight.or(st.weight.take());
            st.bias = bias.or(st.bias.take());
            st.running_mean = mean.or(st.running_mean.take());
            st.running_var = var.or(st.running_var.take());
            if let Some(count) = update.num_batches_tracked {
                st.num_batches_tracked = count;
            }
            if let Some(eps) = update.eps {
                st.eps = eps;
            }
            if let Some(momentum) = update.momentum {
                st.momentum = momentum;
            }
            commit(s, st, guard.request_id, UPDATE)
        })
        .await
    }

    pub async fn forward(&self, command: Forward) -> Result<ForwardOutcome, SessionError> {
        let session = self.lookup(&command.id)?;
        self.with_state(session, move |s, st| forward_locked(s, st, command))
            .await
    }

    pub async fn export_state(&self, id: &SessionId) -> Result<ExportedState, SessionError> {
        let session = self.lookup(id)?;
        self.with_state(session, |s, st| {
            let host = |t: &Option<Tensor>| t.as_ref().map(TensorData::from_tensor).transpose();
            let (weight, bias) = (host(&st.weight)?, host(&st.bias)?);
            let (mean, var) = (host(&st.running_mean)?, host(&st.running_var)?);
            let bytes = state_dict::export(&ExportTensors {
                weight: weight.as_ref(),
                bias: bias.as_ref(),
                running_mean: mean.as_ref(),
                running_var: var.as_ref(),
                num_batches_tracked: s
                    .config
                    .track_running_stats
                    .then_some(st.num_batches_tracked),
            })?;
            Ok(ExportedState {
                safetensors: Bytes::from(bytes),
                version: st.version,
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
        let session = self.lookup(id)?;
        let max_elements = self.options.limits.max_tensor_elements;
        self.with_state(session, move |s, st| {
            if let Some(replay) = begin_mutation(s, st, &guard, IMPORT)? {
                return Ok(replay);
            }
            let layout = Layout {
                kind: s.config.kind,
                num_features: s.config.num_features,
                affine: s.config.affine,
                track_running_stats: s.config.track_running_stats,
            };
            let imported = state_dict::import(&layout, &safetensors, strict, max_elements)?;
            let convert = |t: Option<Tensor>| -> Result<Option<Tensor>, SessionError> {
                let Some(t) = t else { return Ok(None) };
                let t = t
                    .f_to_kind(s.config.param_dtype.kind())
                    .and_then(|t| t.f_to_device(s.device))
                    .map_err(NumericsError::from)?;
                Ok(Some(t))
            };
            let weight = convert(imported.weight)?;
            let bias = convert(imported.bias)?;
            let mean = convert(imported.running_mean)?;
            let var = convert(imported.running_var)?;
            st.weight = weight.or(st.weight.take());
            st.bias = bias.or(st.bias.take());
            st.running_mean = mean.or(st.running_mean.take());
            st.running_var = var.or(st.running_var.take());
            if let Some(count) = imported.num_batches_tracked {
                st.num_batches_tracked = count;
            }
            commit(s, st, guard.request_id, IMPORT)
        })
        .await
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

fn check_count(count: i64) -> Result<(), SessionError> {
    if count < 0 {
        return Err(SessionError::InvalidArgument(format!(
            "num_batches_tracked must be >= 0, got {count}"
        )));
    }
    Ok(())
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

/// A (C,) tensor in the session's dtype on its device, from client data; a
/// wrong shape is load_state_dict's size mismatch.
fn param_tensor(
    config: &SessionConfig,
    device: Device,
    field: &str,
    data: Option<&TensorData>,
) -> Result<Option<Tensor>, SessionError> {
    let Some(data) = data else { return Ok(None) };
    let present = match field {
        "weight" | "bias" => config.affine,
        _ => config.track_running_stats,
    };
    if !present {
        let option = if config.affine {
            "track_running_stats"
        } else {
            "affine"
        };
        return Err(SessionError::InvalidArgument(format!(
            "{field}: the session has {option}=false and no {field}"
        )));
    }
    let expected = [config.num_features];
    if data.shape() != expected {
        return Err(NumericsError::invalid(
            field,
            format!(
                "size mismatch for {field}: copying a param with shape {} from checkpoint, the shape in current model is {}.",
                torch_size(data.shape()),
                torch_size(&expected)
            ),
        )
        .into());
    }
    let tensor = data
        .to_tensor(device)?
        .f_to_kind(config.param_dtype.kind())
        .map_err(NumericsError::from)?;
    Ok(Some(tensor))
}

fn build_state(
    config: &SessionConfig,
    device: Device,
    initial: &StateTensors,
    num_batches_tracked: Option<i64>,
    (replay_window, replay_bytes): (usize, usize),
) -> Result<SessionState, SessionError> {
    let options = (config.param_dtype.kind(), device);
    let c = [config.num_features];
    let filled =
        |field: &str, data: Option<&TensorData>, one: bool| -> Result<Tensor, SessionError> {
            match param_tensor(config, device, field, data)? {
                Some(tensor) => Ok(tensor),
                None if one => Ok(Tensor::f_ones(c, options).map_err(NumericsError::from)?),
                None => Ok(Tensor::f_zeros(c, options).map_err(NumericsError::from)?),
            }
        };
    // Data for an absent tensor is an error even when it will not be used.
    for (field, data) in [
        ("weight", &initial.weight),
        ("bias", &initial.bias),
        ("running_mean", &initial.running_mean),
        ("running_var", &initial.running_var),
    ] {
        param_tensor(config, device, field, data.as_ref())?;
    }
    let (weight, bias) = if config.affine {
        (
            Some(filled("weight", initial.weight.as_ref(), true)?),
            Some(filled("bias", initial.bias.as_ref(), false)?),
        )
    } else {
        (None, None)
    };
    let (running_mean, running_var) = if config.track_running_stats {
        (
            Some(filled(
                "running_mean",
                initial.running_mean.as_ref(),
                false,
            )?),
            Some(filled("running_var", initial.running_var.as_ref(), true)?),
        )
    } else {
        (None, None)
    };
    Ok(SessionState {
        eps: config.eps,
        momentum: config.momentum,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked: num_batches_tracked.unwrap_or(0),
        version: 1,
        updated_at: SystemTime::now(),
        deleted: false,
        replay: ReplayLog::new(replay_window, replay_bytes),
    })
}

fn snapshot(
    session: &Session,
    state: &SessionState,
    include_tensors: bool,
) -> Result<SessionSnapshot, SessionError> {
    let tensors = if include_tensors {
        let host = |t: &Option<Tensor>| t.as_ref().map(TensorData::from_tensor).transpose();
        Some(StateTensors {
            weight: host(&state.weight)?,
            bias: host(&state.bias)?,
            running_mean: host(&state.running_mean)?,
            running_var: host(&state.running_var)?,
        })
    } else {
        None
    };
    let mut config = session.config.clone();
    config.eps = state.eps;
    config.momentum = state.momentum;
    Ok(SessionSnapshot {
        id: session.id.clone(),
        config,
        device: session.device,
        version: state.version,
        num_batches_tracked: state.num_batches_tracked,
        created_at: session.created_at,
        updated_at: state.updated_at,
        tensors,
    })
}

fn check_version(
    session: &Session,
    state: &SessionState,
    expected: Option<u64>,
) -> Result<(), SessionError> {
    match expected {
        Some(expected) if expected != state.version => Err(SessionError::VersionMismatch {
            id: session.id.clone(),
            expected,
            actual: state.version,
        }),
        _ => Ok(()),
    }
}

/// The replay of an already-applied request id, or the version check.
fn begin_mutation(
    session: &Session,
    state: &SessionState,
    guard: &MutationGuard,
    call: &'static str,
) -> Result<Option<Applied<SessionSnapshot>>, SessionError> {
    if let Some(request_id) = &guard.request_id {
        if let Some(replay) = state.replay.find(request_id) {
            return match replay {
                Replay::Snapshot(snapshot, used_by) if *used_by == call => Ok(Some(Applied {
                    value: (**snapshot).clone(),
                    replayed: true,
                })),
                other => Err(SessionError::RequestIdReused {
                    id: session.id.clone(),
                    request_id: request_id.clone(),
                    used_by: other.call_name(),
                }),
            };
        }
    }
    check_version(session, state, guard.expected_version)?;
    Ok(None)
}

/// Bumps the version, records the replay, returns the new snapshot.
fn commit(
    session: &Session,
    state: &mut SessionState,
    request_id: Option<String>,
    call: &'static str,
) -> Result<Applied<SessionSnapshot>, SessionError> {
    state.version += 1;
    state.updated_at = SystemTime::now();
    let snapshot = snapshot(session, state, true)?;
    if let Some(request_id) = request_id {
        state.replay.record(
            request_id,
            Replay::Snapshot(Box::new(snapshot.clone()), call),
        );
    }
    Ok(Applied {
        value: snapshot,
        replayed: false,
    })
}

fn forward_locked(
    session: &Session,
    state: &mut SessionState,
    command: Forward,
) -> Result<ForwardOutcome, SessionError> {
    let config = &session.config;
    let training = command.mode.unwrap_or(config.default_mode) == Mode::Train;
    let mutates = training && config.track_running_stats;
    if mutates {
        if let Some(request_id) = &command.request_id {
            if let Some(replay) = state.replay.find(request_id) {
                let Replay::Forward(outcome) = replay else {
                    return Err(SessionError::RequestIdReused {
                        id: session.id.clone(),
                        request_id: request_id.clone(),
                        used_by: replay.call_name(),
                    });
                };
                return Ok(ForwardOutcome {
                    replayed: true,
                    ..outcome.clone()
                });
            }
        }
    }
    check_version(session, state, command.expected_version)?;

    let layer = Layer {
        kind: config.kind,
        num_features: config.num_features,
        eps: state.eps,
        param_dtype: config.param_dtype,
        weight: state.weight.as_ref(),
        bias: state.bias.as_ref(),
        running_mean: state.running_mean.as_ref(),
        running_var: state.running_var.as_ref(),
    };
    layer.check_input(command.input.shape(), command.input.dtype(), training)?;
    let input = command.input.to_tensor(session.device)?;
    if config.reject_non_finite && !all_finite(&input)? {
        return Err(NumericsError::invalid(
            "input",
            "contains NaN or infinite values (the session has reject_non_finite=true)",
        )
        .into());
    }
    if !mutates {
        let output = if training {
            layer.forward_train(&input, 0.0)?.output
        } else {
            layer.forward_eval(&input)?
        };
        return Ok(ForwardOutcome {
            output: Some(TensorData::from_tensor(&output)?),
            version: state.version,
            num_batches_tracked: state.num_batches_tracked,
            replayed: false,
        });
    }
    let counted = state.num_batches_tracked + 1;
    let step = layer.forward_train(&input, state.momentum.factor(counted))?;
    let output = TensorData::from_tensor(&step.output)?;
    // Commit: nothing below can fail.
    state.running_mean = step.running_mean;
    state.running_var = step.running_var;
    state.num_batches_tracked = counted;
    state.version += 1;
    state.updated_at = SystemTime::now();
    let outcome = ForwardOutcome {
        output: Some(output),
        version: state.version,
        num_batches_tracked: counted,
        replayed: false,
    };
    if let Some(request_id) = command.request_id {
        state
            .replay
            .record(request_id, Replay::Forward(outcome.clone()));
    }
    Ok(outcome)
}
