//! One session's layer state and the pure steps that compute a new state from
//! it (forward, reset, update, import), plus conversion to and from the stored
//! record. No locking, no I/O: the registry decides when a step is committed.

use crate::numerics::stats::StatsKernel;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tch::{Device, Tensor};

use super::durable::{RecentRequest, RecordError, SessionRecord};
use super::replay::{Replay, ReplayLog, FORWARD, IMPORT, RESET, UPDATE};
use super::{
    Applied, Forward, ForwardOutcome, Mode, MutationGuard, SessionConfig, SessionError, SessionId,
    SessionSnapshot, StateTensors, UpdateParameters,
};
use crate::device::{device_name, DeviceChoice};
use crate::numerics::batch_norm::{all_finite, check_eps, check_momentum, Layer};
use crate::numerics::state_dict::{self, Layout};
use crate::numerics::{torch_size, DType, LayerKind, Momentum, NumericsError, TensorData};

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

/// What a step decided: nothing to commit, or a new state.
// Built once per request and moved, never stored: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Step<T> {
    Done(T),
    Next {
        layer: LayerState,
        replay: Option<(String, Replay)>,
        value: T,
    },
}

fn share(tensor: &Option<Tensor>) -> Option<Tensor> {
    tensor.as_ref().map(Tensor::shallow_clone)
}

impl LayerState {
    /// A copy sharing the tensors (they are replaced, never written in place).
    fn next_version(&self) -> LayerState {
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
        }
    }
}

/// The parts of a state an update or import replaces; `None` keeps the current.
struct Replaced {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running_mean: Option<Tensor>,
    running_var: Option<Tensor>,
    num_batches_tracked: Option<i64>,
}

impl LayerState {
    fn next_with(&self, replaced: Replaced) -> LayerState {
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

/// Whether a layer with this config has the named tensor (weight and bias
/// with `affine`, the running statistics with `track_running_stats`).
fn has_tensor(config: &SessionConfig, field: &str) -> bool {
    match field {
        "weight" | "bias" => config.affine,
        _ => config.track_running_stats,
    }
}

/// A (C,) tensor in the session's dtype on its device, from client data; a
/// wrong shape is load_state_dict's size mismatch.
pub fn param_tensor(
    config: &SessionConfig,
    device: Device,
    field: &str,
    data: Option<&TensorData>,
) -> Result<Option<Tensor>, SessionError> {
    let Some(data) = data else { return Ok(None) };
    if !has_tensor(config, field) {
        let option = if matches!(field, "weight" | "bias") {
            "affine"
        } else {
            "track_running_stats"
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

/// The initial state of a new session: PyTorch's defaults where no value is given.
pub fn initial_layer(
    config: &SessionConfig,
    device: Device,
    initial: &StateTensors,
    num_batches_tracked: Option<i64>,
) -> Result<LayerState, SessionError> {
    let options = (config.param_dtype.kind(), device);
    let c = [config.num_features];
    let filled = |field: &str,
                  data: Option<&TensorData>,
                  one: bool|
     -> Result<Option<Tensor>, SessionError> {
        let given = param_tensor(config, device, field, data)?;
        if !has_tensor(config, field) {
            return Ok(None);
        }
        match given {
            Some(tensor) => Ok(Some(tensor)),
            None if one => Ok(Some(
                Tensor::f_ones(c, options).map_err(NumericsError::from)?,
            )),
            None => Ok(Some(
                Tensor::f_zeros(c, options).map_err(NumericsError::from)?,
            )),
        }
    };
    Ok(LayerState {
        eps: config.eps,
        momentum: config.momentum,
        weight: filled("weight", initial.weight.as_ref(), true)?,
        bias: filled("bias", initial.bias.as_ref(), false)?,
        running_mean: filled("running_mean", initial.running_mean.as_ref(), false)?,
        running_var: filled("running_var", initial.running_var.as_ref(), true)?,
        num_batches_tracked: num_batches_tracked.unwrap_or(0),
        version: 1,
        updated_at: SystemTime::now(),
    })
}

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
        tensors,
    })
}

fn check_version(
    info: &SessionInfo,
    layer: &LayerState,
    expected: Option<u64>,
) -> Result<(), SessionError> {
    match expected {
        Some(expected) if expected != layer.version => Err(SessionError::VersionMismatch {
            id: info.id.clone(),
            expected,
            actual: layer.version,
        }),
        _ => Ok(()),
    }
}

pub fn check_count(count: i64) -> Result<(), SessionError> {
    if count < 0 {
        return Err(SessionError::InvalidArgument(format!(
            "num_batches_tracked must be >= 0, got {count}"
        )));
    }
    Ok(())
}

/// The replay of an already-applied request id, or the version check.
fn begin_mutation(
    info: &SessionInfo,
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
                // Applied before a restart (or by another replica): the original
                // answer is gone; the session as it is now says what was kept.
                Replay::Recovered { call: used_by, .. } if *used_by == call => Ok(Some(Applied {
                    value: snapshot(info, &state.layer, true)?,
                    replayed: true,
                })),
                other => Err(SessionError::RequestIdReused {
                    id: info.id.clone(),
                    request_id: request_id.clone(),
                    used_by: other.call_name(),
                }),
            };
        }
    }
    check_version(info, &state.layer, guard.expected_version)?;
    Ok(None)
}

/// A committed snapshot-answering mutation.
fn snapshot_step(
    info: &SessionInfo,
    layer: LayerState,
    request_id: Option<String>,
    call: &'static str,
) -> Result<Step<Applied<SessionSnapshot>>, SessionError> {
    let snap = snapshot(info, &layer, true)?;
    let replay = request_id.map(|id| (id, Replay::Snapshot(Box::new(snap.clone()), call)));
    Ok(Step::Next {
        layer,
        replay,
        value: Applied {
            value: snap,
            replayed: false,
        },
    })
}

pub fn reset_step(
    info: &SessionInfo,
    state: &SessionState,
    guard: &MutationGuard,
) -> Result<Step<Applied<SessionSnapshot>>, SessionError> {
    if let Some(replay) = begin_mutation(info, state, guard, RESET)? {
        return Ok(Step::Done(replay));
    }
    // PyTorch's reset_running_stats() is a no-op without statistics.
    if !info.config.track_running_stats {
        return Ok(Step::Done(Applied {
            value: snapshot(info, &state.layer, true)?,
            replayed: false,
        }));
    }
    let options = (info.config.param_dtype.kind(), info.device);
    let c = [info.config.num_features];
    let mut layer = state.layer.next_version();
    layer.running_mean = Some(Tensor::f_zeros(c, options).map_err(NumericsError::from)?);
    layer.running_var = Some(Tensor::f_ones(c, options).map_err(NumericsError::from)?);
    layer.num_batches_tracked = 0;
    snapshot_step(info, layer, guard.request_id.clone(), RESET)
}

pub fn update_step(
    info: &SessionInfo,
    state: &SessionState,
    update: &UpdateParameters,
    guard: &MutationGuard,
) -> Result<Step<Applied<SessionSnapshot>>, SessionError> {
    if let Some(replay) = begin_mutation(info, state, guard, UPDATE)? {
        return Ok(Step::Done(replay));
    }
    if let Some(eps) = update.eps {
        check_eps("eps", eps)?;
    }
    if let Some(Momentum::Exponential(m)) = update.momentum {
        check_momentum("momentum", m)?;
    }
    if let Some(count) = update.num_batches_tracked {
        check_count(count)?;
        if !info.config.track_running_stats {
            return Err(SessionError::InvalidArgument(
                "num_batches_tracked: the session has track_running_stats=false".into(),
            ));
        }
    }
    let (config, device, tensors) = (&info.config, info.device, &update.tensors);
    let weight = param_tensor(config, device, "weight", tensors.weight.as_ref())?;
    let bias = param_tensor(config, device, "bias", tensors.bias.as_ref())?;
    let mean = param_tensor(
        config,
        device,
        "running_mean",
        tensors.running_mean.as_ref(),
    )?;
    let var = param_tensor(config, device, "running_var", tensors.running_var.as_ref())?;
    let mut layer = state.layer.next_with(Replaced {
        weight,
        bias,
        running_mean: mean,
        running_var: var,
        num_batches_tracked: update.num_batches_tracked,
    });
    layer.eps = update.eps.unwrap_or(layer.eps);
    layer.momentum = update.momentum.unwrap_or(layer.momentum);
    snapshot_step(info, layer, guard.request_id.clone(), UPDATE)
}

pub fn import_step(
    info: &SessionInfo,
    state: &SessionState,
    safetensors: &Bytes,
    strict: bool,
    guard: &MutationGuard,
    max_elements: u64,
) -> Result<Step<Applied<SessionSnapshot>>, SessionError> {
    if let Some(replay) = begin_mutation(info, state, guard, IMPORT)? {
        return Ok(Step::Done(replay));
    }
    let config = &info.config;
    let layout = Layout {
        kind: config.kind,
        num_features: config.num_features,
        affine: config.affine,
        track_running_stats: config.track_running_stats,
    };
    let imported = state_dict::import(&layout, safetensors, strict, max_elements)?;
    let convert = |t: Option<Tensor>| -> Result<Option<Tensor>, SessionError> {
        let Some(t) = t else { return Ok(None) };
        let t = t
            .f_to_kind(config.param_dtype.kind())
            .and_then(|t| t.f_to_device(info.device))
            .map_err(NumericsError::from)?;
        Ok(Some(t))
    };
    let weight = convert(imported.weight)?;
    let bias = convert(imported.bias)?;
    let mean = convert(imported.running_mean)?;
    let var = convert(imported.running_var)?;
    let layer = state.layer.next_with(Replaced {
        weight,
        bias,
        running_mean: mean,
        running_var: var,
        num_batches_tracked: imported.num_batches_tracked,
    });
    snapshot_step(info, layer, guard.request_id.clone(), IMPORT)
}

pub fn forward_step(
    info: &SessionInfo,
    state: &SessionState,
    command: &Forward,
    stats: StatsKernel,
) -> Result<Step<ForwardOutcome>, SessionError> {
    let config = &info.config;
    let current = &state.layer;
    let training = command.mode.unwrap_or(config.default_mode) == Mode::Train;
    let mutates = training && config.track_running_stats;
    if mutates {
        if let Some(request_id) = &command.request_id {
            if let Some(replay) = state.replay.find(request_id) {
                return match replay {
                    Replay::Forward(outcome) => Ok(Step::Done(ForwardOutcome {
                        replayed: true,
                        ..outcome.clone()
                    })),
                    Replay::Recovered {
                        call: FORWARD,
                        version,
                        num_batches_tracked,
                    } => Ok(Step::Done(ForwardOutcome {
                        output: None,
                        version: *version,
                        num_batches_tracked: *num_batches_tracked,
                        replayed: true,
                    })),
                    other => Err(SessionError::RequestIdReused {
                        id: info.id.clone(),
                        request_id: request_id.clone(),
                        used_by: other.call_name(),
                    }),
                };
            }
        }
    }
    check_version(info, current, command.expected_version)?;

    let layer = Layer {
        kind: config.kind,
        num_features: config.num_features,
        eps: current.eps,
        param_dtype: config.param_dtype,
        weight: current.weight.as_ref(),
        bias: current.bias.as_ref(),
        running_mean: current.running_mean.as_ref(),
        running_var: current.running_var.as_ref(),
        stats,
    };
    layer.check_input(command.input.shape(), command.input.dtype(), training)?;
    let input = command.input.input_tensor(info.device)?;
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
        return Ok(Step::Done(ForwardOutcome {
            output: Some(TensorData::from_result(output)?),
            version: current.version,
            num_batches_tracked: current.num_batches_tracked,
            replayed: false,
        }));
    }
    let Some(counted) = current.num_batches_tracked.checked_add(1) else {
        return Err(SessionError::FailedPrecondition(format!(
            "session {}: num_batches_tracked is at its maximum ({}); reset it first",
            info.id,
            i64::MAX
        )));
    };
    let step = layer.forward_train(&input, current.momentum.factor(counted))?;
    let output = TensorData::from_result(step.output)?;
    let mut next = current.next_version();
    next.running_mean = step.running_mean;
    next.running_var = step.running_var;
    next.num_batches_tracked = counted;
    let outcome = ForwardOutcome {
        output: Some(output),
        version: next.version,
        num_batches_tracked: counted,
        replayed: false,
    };
    let replay = command
        .request_id
        .clone()
        .map(|id| (id, Replay::Forward(outcome.clone())));
    Ok(Step::Next {
        layer: next,
        replay,
        value: outcome,
    })
}

pub fn unix_nanos(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(i64::MAX as u128) as i64)
}

fn from_unix_nanos(nanos: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos.max(0) as u64)
}

fn kind_code(kind: LayerKind) -> u32 {
    match kind {
        LayerKind::BatchNorm1d => 1,
        LayerKind::BatchNorm2d => 2,
        LayerKind::BatchNorm3d => 3,
    }
}

fn dtype_code(dtype: DType) -> u32 {
    match dtype {
        DType::Float32 => 1,
        DType::Float64 => 2,
        DType::Float16 => 3,
        DType::BFloat16 => 4,
    }
}

fn momentum_value(momentum: Momentum) -> Option<f64> {
    match momentum {
        Momentum::Exponential(m) => Some(m),
        Momentum::CumulativeAverage => None,
    }
}

/// The stored form of a session at `layer`, with `recent` request ids.
pub fn record(
    info: &SessionInfo,
    layer: &LayerState,
    recent: Vec<RecentRequest>,
) -> Result<SessionRecord, SessionError> {
    let host = |t: &Option<Tensor>| -> Result<Option<Vec<u8>>, SessionError> {
        Ok(t.as_ref()
            .map(TensorData::from_tensor)
            .transpose()?
            .map(|d| d.bytes().to_vec()))
    };
    let config = &info.config;
    Ok(SessionRecord {
        id: info.id.as_str().to_owned(),
        tenant: info.id.tenant().to_owned(),
        kind: kind_code(config.kind),
        num_features: config.num_features,
        created_eps: config.eps,
        created_momentum: momentum_value(config.momentum),
        created_cumulative: config.momentum == Momentum::CumulativeAverage,
        affine: config.affine,
        track_running_stats: config.track_running_stats,
        param_dtype: dtype_code(config.param_dtype),
        default_mode: if config.default_mode == Mode::Train {
            1
        } else {
            2
        },
        reject_non_finite: config.reject_non_finite,
        labels: config.labels.clone(),
        device: device_name(info.device),
        eps: layer.eps,
        momentum: momentum_value(layer.momentum),
        weight: host(&layer.weight)?,
        bias: host(&layer.bias)?,
        running_mean: host(&layer.running_mean)?,
        running_var: host(&layer.running_var)?,
        num_batches_tracked: layer.num_batches_tracked,
        version: layer.version,
        created_at_unix_nanos: unix_nanos(info.created_at),
        updated_at_unix_nanos: unix_nanos(layer.updated_at),
        recent_requests: recent,
    })
}

fn corrupt(message: impl Into<String>) -> RecordError {
    RecordError::Corrupt(message.into())
}

/// A session's immutable facts from its record. The recorded device is used
/// when this machine has it, else `default_device` (with a warning).
pub fn info_from_record(
    record: &SessionRecord,
    default_device: Device,
) -> Result<SessionInfo, RecordError> {
    let id = SessionId::parse_key(&record.id).map_err(|e| corrupt(e.to_string()))?;
    if !id.belongs_to(&record.tenant) {
        return Err(corrupt(format!(
            "key {:?} does not belong to tenant {:?}",
            record.id, record.tenant
        )));
    }
    let kind = match record.kind {
        1 => LayerKind::BatchNorm1d,
        2 => LayerKind::BatchNorm2d,
        3 => LayerKind::BatchNorm3d,
        other => return Err(corrupt(format!("kind {other}"))),
    };
    let param_dtype = match record.param_dtype {
        1 => DType::Float32,
        2 => DType::Float64,
        3 => DType::Float16,
        4 => DType::BFloat16,
        other => return Err(corrupt(format!("param_dtype {other}"))),
    };
    let created_momentum = match (record.created_cumulative, record.created_momentum) {
        (true, _) => Momentum::CumulativeAverage,
        (false, Some(m)) => Momentum::Exponential(m),
        (false, None) => return Err(corrupt("created momentum missing")),
    };
    if record.num_features < 1 {
        return Err(corrupt(format!("num_features {}", record.num_features)));
    }
    let device = match record
        .device
        .parse::<DeviceChoice>()
        .map(|choice| choice.resolve(Some(default_device)))
    {
        Ok(Ok(device)) => device,
        _ => {
            tracing::warn!(session = %id, recorded = %record.device, using = %device_name(default_device),
                "recorded device is not available here; loading the session on the default device");
            default_device
        }
    };
    Ok(SessionInfo {
        id,
        config: SessionConfig {
            kind,
            num_features: record.num_features,
            eps: record.created_eps,
            momentum: created_momentum,
            affine: record.affine,
            track_running_stats: record.track_running_stats,
            param_dtype,
            default_mode: if record.default_mode == 2 {
                Mode::Eval
            } else {
                Mode::Train
            },
            reject_non_finite: record.reject_non_finite,
            labels: record.labels.clone(),
        },
        device,
        created_at: from_unix_nanos(record.created_at_unix_nanos),
        last_used: LastUse::new(SystemTime::now()),
    })
}

/// A session's state from its record, tensors placed on the session's device.
pub fn state_from_record(
    info: &SessionInfo,
    record: &SessionRecord,
    replay_window: usize,
    replay_bytes: usize,
) -> Result<SessionState, SessionError> {
    let config = &info.config;
    let tensor = |field: &str,
                  bytes: &Option<Vec<u8>>,
                  present: bool|
     -> Result<Option<Tensor>, SessionError> {
        match (bytes, present) {
            (None, false) => Ok(None),
            (Some(bytes), true) => {
                let data = TensorData::from_raw(
                    field,
                    config.param_dtype,
                    vec![config.num_features],
                    Bytes::from(bytes.clone()),
                    u64::MAX,
                )
                .map_err(|e| SessionError::DataLoss {
                    id: info.id.clone(),
                    reason: e.to_string(),
                })?;
                Ok(Some(data.to_tensor(info.device)?))
            }
            _ => Err(SessionError::DataLoss {
                id: info.id.clone(),
                reason: format!("record is corrupt: {field} does not match the layer's options"),
            }),
        }
    };
    let momentum = match record.momentum {
        Some(m) => Momentum::Exponential(m),
        None => Momentum::CumulativeAverage,
    };
    Ok(SessionState {
        layer: LayerState {
            eps: record.eps,
            momentum,
            weight: tensor("weight", &record.weight, config.affine)?,
            bias: tensor("bias", &record.bias, config.affine)?,
            running_mean: tensor(
                "running_mean",
                &record.running_mean,
                config.track_running_stats,
            )?,
            running_var: tensor(
                "running_var",
                &record.running_var,
                config.track_running_stats,
            )?,
            num_batches_tracked: record.num_batches_tracked,
            version: record.version,
            updated_at: from_unix_nanos(record.updated_at_unix_nanos),
        },
        deleted: false,
        evicted: false,
        replay: ReplayLog::recovered(replay_window, replay_bytes, &record.recent_requests),
    })
}
