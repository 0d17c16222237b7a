//! The stored form of a session: [`record`] writes a [`SessionRecord`] from
//! the state, [`info_from_record`] and [`state_from_record`] read one back
//! (an unreadable record is a [`RecordError`] or DATA_LOSS, never a fresh
//! session). No locking, no I/O: the registry reads and writes the store.

use std::time::SystemTime;

use bytes::Bytes;
use tch::{Device, Tensor};

use super::durable::{RecentRequest, RecordError, SessionRecord};
use super::replay::{ReplayLimits, ReplayLog};
use super::state::{from_unix_nanos, unix_nanos, LastUse, LayerState, SessionInfo, SessionState};
use super::{Mode, SessionConfig, SessionError, SessionId};
use crate::device::{device_name, DeviceChoice};
use crate::numerics::{DType, LayerKind, Momentum, TensorData};

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
        kind: config.kind.code(),
        num_features: config.num_features,
        created_eps: config.eps,
        created_momentum: momentum_value(config.momentum),
        created_cumulative: config.momentum == Momentum::CumulativeAverage,
        affine: config.affine,
        track_running_stats: config.track_running_stats,
        param_dtype: config.param_dtype.code(),
        default_mode: if config.default_mode == Mode::Train {
            1
        } else {
            2
        },
        reject_non_finite: config.reject_non_finite,
        labels: config.labels.clone(),
        step_timeout_seconds: Some(config.step_timeout.as_secs_f64()),
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
    let Some(kind) = LayerKind::from_code(record.kind) else {
        return Err(corrupt(format!("kind {}", record.kind)));
    };
    let Some(param_dtype) = DType::from_code(record.param_dtype) else {
        return Err(corrupt(format!("param_dtype {}", record.param_dtype)));
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
            step_timeout: record
                .step_timeout_seconds
                .and_then(|s| std::time::Duration::try_from_secs_f64(s).ok())
                .unwrap_or(super::DEFAULT_STEP_TIMEOUT),
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
    replay: &ReplayLimits,
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
        replay: ReplayLog::recovered(replay, &record.recent_requests).map_err(|e| {
            SessionError::DataLoss {
                id: info.id.clone(),
                reason: e.to_string(),
            }
        })?,
    })
}
