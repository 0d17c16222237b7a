//! Exact statistics mode of a session (`SessionConfig::exact_statistics`):
//! the exact sums behind its running statistics ([`ExactState`]), what train
//! forwards add to them, their StandardScaler view, the merge of another
//! session's sums, and the rules of the operations that would otherwise set
//! running statistics directly (creation, UpdateParameters, ImportState).
//! The arithmetic is `numerics::exact`'s; no locking, no I/O.

use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::replay::{Call, Replayable};
use super::state::{snapshot, LayerState, SessionInfo, SessionState};
use super::steps::{replay_or_check, Step};
use super::{
    Applied, Preconditions, SessionConfig, SessionError, SessionSnapshot, StateTensors,
    UpdateParameters,
};
use crate::numerics::exact::{ChannelStatistics, ExactSums, Format};
use crate::numerics::{DType, NumericsError};

/// An exact session's sums and the statistics rounded from them (computed
/// once per change: readers and eval forwards use them as they are).
#[derive(Debug, Clone, PartialEq)]
pub struct ExactState {
    pub sums: ExactSums,
    pub statistics: Vec<ChannelStatistics>,
}

/// The StandardScaler attributes of an exact session (see the API's
/// `StandardScalerStatistics`): float64, one per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct StandardScaler {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub scale: Vec<f64>,
    pub n_samples_seen: u64,
}

impl ExactState {
    /// The state of `sums`, its statistics rounded to `dtype`.
    pub fn new(sums: ExactSums, dtype: DType) -> ExactState {
        let statistics = sums.statistics(Format::of(dtype));
        ExactState { sums, statistics }
    }

    /// Nothing seen yet.
    pub fn empty(config: &SessionConfig) -> ExactState {
        ExactState::new(
            ExactSums::new(config.num_features.max(0) as usize),
            config.param_dtype,
        )
    }

    /// running_mean and running_var, (C,) in `dtype` on `device`: the
    /// rounded values are exact in `dtype`, so the conversion is exact.
    pub fn running_tensors(
        &self,
        dtype: DType,
        device: Device,
    ) -> Result<(Tensor, Tensor), SessionError> {
        let tensor = |values: Vec<f64>| -> Result<Tensor, SessionError> {
            Ok(Tensor::f_from_slice(&values)
                .and_then(|t| t.f_to_kind(dtype.kind()))
                .and_then(|t| t.f_to_device(device))
                .map_err(NumericsError::from)?)
        };
        let mean = self.statistics.iter().map(|s| s.mean).collect();
        let var = self.statistics.iter().map(|s| s.unbiased_var).collect();
        Ok((tensor(mean)?, tensor(var)?))
    }

    /// scikit-learn's attributes: mean_ is running_mean, var_ the population
    /// variance, scale_ what the eval forward divides by, sqrt(running_var +
    /// eps) in float64.
    pub fn standard_scaler(&self, eps: f64) -> StandardScaler {
        StandardScaler {
            mean: self.statistics.iter().map(|s| s.mean).collect(),
            var: self.statistics.iter().map(|s| s.population_var).collect(),
            scale: self
                .statistics
                .iter()
                .map(|s| (s.unbiased_var + eps).sqrt())
                .collect(),
            n_samples_seen: self.sums.count,
        }
    }
}

/// Sets a layer's exact state and the running statistics rounded from it,
/// in `dtype` on `device`.
pub fn set_exact(
    layer: &mut LayerState,
    exact: ExactState,
    dtype: DType,
    device: Device,
) -> Result<(), SessionError> {
    let (mean, var) = exact.running_tensors(dtype, device)?;
    layer.running_mean = Some(mean);
    layer.running_var = Some(var);
    layer.exact = Some(Arc::new(exact));
    Ok(())
}

/// The exact state of a layer that must have one (an exact session's).
fn exact_of<'a>(info: &SessionInfo, layer: &'a LayerState) -> Result<&'a ExactState, SessionError> {
    layer.exact.as_deref().ok_or_else(|| {
        SessionError::FailedPrecondition(format!(
            "session {} does not keep exact statistics (created without exact_statistics)",
            info.id
        ))
    })
}

/// A new exact session: the statistics are those of the values it will see,
/// so initial running statistics cannot be given.
pub fn check_create(
    config: &SessionConfig,
    initial: &StateTensors,
    num_batches_tracked: Option<i64>,
) -> Result<(), SessionError> {
    if !config.exact_statistics {
        return Ok(());
    }
    if !config.track_running_stats {
        return Err(SessionError::InvalidArgument(
            "exact_statistics needs track_running_stats=true".into(),
        ));
    }
    let given: Vec<&str> = [
        ("running_mean", initial.running_mean.is_some()),
        ("running_var", initial.running_var.is_some()),
        ("num_batches_tracked", num_batches_tracked.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if !given.is_empty() {
        return Err(SessionError::InvalidArgument(format!(
            "{}: an exact_statistics session's statistics are those of the values it sees; \
             initial values cannot be given",
            given.join(", ")
        )));
    }
    Ok(())
}

/// UpdateParameters on an exact session: weight, bias and eps only.
pub fn check_update(config: &SessionConfig, update: &UpdateParameters) -> Result<(), SessionError> {
    if !config.exact_statistics {
        return Ok(());
    }
    let given: Vec<&str> = [
        ("running_mean", update.tensors.running_mean.is_some()),
        ("running_var", update.tensors.running_var.is_some()),
        ("num_batches_tracked", update.num_batches_tracked.is_some()),
        ("momentum", update.momentum.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect();
    if given.is_empty() {
        return Ok(());
    }
    Err(SessionError::InvalidArgument(format!(
        "{}: an exact_statistics session's statistics come from its exact sums and cannot be \
         set (ResetRunningStats clears them, MergeSession adds another session's)",
        given.join(", ")
    )))
}

/// A train batch of an exact session: `layer` (the next state) gets the
/// batch's values added to its sums and the statistics rounded from them.
/// `input`: (N, C, *), checked against the layer. NaN/±Inf: INVALID_ARGUMENT.
pub fn accumulate(
    info: &SessionInfo,
    layer: &mut LayerState,
    input: &Tensor,
) -> Result<(), SessionError> {
    let batch = ExactSums::of_batch(input).map_err(NumericsError::from)?;
    let mut sums = exact_of(info, layer)?.sums.clone();
    sums.merge(&batch).map_err(NumericsError::from)?;
    let dtype = info.config.param_dtype;
    set_exact(layer, ExactState::new(sums, dtype), dtype, info.device)
}

/// The part of a source session a merge adds.
#[derive(Debug, Clone)]
pub struct MergeSource {
    pub exact: Arc<ExactState>,
    pub num_batches_tracked: i64,
}

/// The source of a merge, read from its state.
pub fn merge_source(info: &SessionInfo, state: &SessionState) -> Result<MergeSource, SessionError> {
    let exact = state.layer.exact.clone().ok_or_else(|| {
        SessionError::FailedPrecondition(format!(
            "source session {} does not keep exact statistics (created without \
             exact_statistics): it has no exact sums to merge",
            info.id
        ))
    })?;
    Ok(MergeSource {
        exact,
        num_batches_tracked: state.layer.num_batches_tracked,
    })
}

/// MergeSession's step on the target: the source's sums added to the
/// target's, num_batches_tracked added, one new version.
pub fn merge_step(
    info: &SessionInfo,
    state: &SessionState,
    source: &MergeSource,
    given: &Preconditions,
) -> Result<Step<Applied<SessionSnapshot>>, SessionError> {
    if let Some(done) = replay_or_check(info, state, given, Call::MergeSession)? {
        return Ok(Step::Done(done));
    }
    let current = exact_of(info, &state.layer)?;
    let channels = current.sums.channels.len();
    if source.exact.sums.channels.len() != channels {
        return Err(SessionError::InvalidArgument(format!(
            "source_session_id: the source session has {} channels, session {} has {channels}",
            source.exact.sums.channels.len(),
            info.id
        )));
    }
    let mut sums = current.sums.clone();
    sums.merge(&source.exact.sums)
        .map_err(NumericsError::from)?;
    let Some(counted) = state
        .layer
        .num_batches_tracked
        .checked_add(source.num_batches_tracked)
    else {
        return Err(SessionError::FailedPrecondition(format!(
            "session {}: num_batches_tracked would exceed {}",
            info.id,
            i64::MAX
        )));
    };
    let mut layer = state.layer.next_version();
    let dtype = info.config.param_dtype;
    set_exact(&mut layer, ExactState::new(sums, dtype), dtype, info.device)?;
    layer.num_batches_tracked = counted;
    let snap = snapshot(info, &layer, true)?;
    let replay = given.request_id.clone().map(|request_id| Replayable {
        request_id,
        replay: super::replay::Replay::Snapshot(Box::new(snap.clone()), Call::MergeSession),
    });
    Ok(Step::next(
        layer,
        replay,
        Applied {
            value: snap,
            replayed: false,
        },
    ))
}

/// A merge whose source cannot be read: answered when `given`'s request id
/// was already applied by a merge (the retry of a merge whose source has
/// since gone), else nothing.
pub fn merge_replay_only(
    info: &SessionInfo,
    state: &SessionState,
    given: &Preconditions,
) -> Result<Step<Option<Applied<SessionSnapshot>>>, SessionError> {
    if given.request_id.is_none() {
        return Ok(Step::Done(None));
    }
    Ok(Step::Done(replay_or_check(
        info,
        state,
        &given_replay_only(given),
        Call::MergeSession,
    )?))
}

/// `given` without the version check (a replay answers whatever the version).
fn given_replay_only(given: &Preconditions) -> Preconditions {
    Preconditions {
        expected_version: None,
        request_id: given.request_id.clone(),
    }
}

/// What an import sets in an exact session, from the imported sums and
/// running statistics (see `import_step`): the new exact state, or None to
/// keep the current one.
pub fn imported(
    info: &SessionInfo,
    sums: Option<ExactSums>,
    running_mean: Option<&Tensor>,
    running_var: Option<&Tensor>,
) -> Result<Option<ExactState>, SessionError> {
    let Some(sums) = sums else {
        if running_mean.is_some() || running_var.is_some() {
            return Err(NumericsError::invalid(
                "safetensors",
                "an exact_statistics session's running_mean and running_var come from its exact \
                 sums: import them with the exact.* keys of an exported state, or leave \
                 running_mean and running_var out (strict=false)",
            )
            .into());
        }
        return Ok(None);
    };
    if sums.channels.len() as i64 != info.config.num_features {
        return Err(NumericsError::invalid(
            "safetensors",
            format!(
                "exact sums of {} channels for a session of {}",
                sums.channels.len(),
                info.config.num_features
            ),
        )
        .into());
    }
    let exact = ExactState::new(sums, info.config.param_dtype);
    let (mean, var) = exact.running_tensors(info.config.param_dtype, Device::Cpu)?;
    for (name, derived, given) in [
        ("running_mean", &mean, running_mean),
        ("running_var", &var, running_var),
    ] {
        let Some(given) = given else { continue };
        let given = given
            .f_to_kind(info.config.param_dtype.kind())
            .and_then(|t| t.f_to_device(Device::Cpu))
            .map_err(NumericsError::from)?;
        if !bitwise_equal(derived, &given)? {
            return Err(NumericsError::invalid(
                "safetensors",
                format!(
                    "{name} is not the one the exact.* sums give (an exact session's statistics \
                     are computed from its sums): leave {name} out or import an unmodified export"
                ),
            )
            .into());
        }
    }
    Ok(Some(exact))
}

/// Same values bit for bit (NaN included), as raw bytes.
fn bitwise_equal(a: &Tensor, b: &Tensor) -> Result<bool, SessionError> {
    let bits = |t: &Tensor| -> Result<Vec<i64>, SessionError> {
        let widened = t.f_to_kind(Kind::Double).map_err(NumericsError::from)?;
        let values = Vec::<f64>::try_from(&widened).map_err(NumericsError::from)?;
        Ok(values.iter().map(|v| v.to_bits() as i64).collect())
    };
    Ok(bits(a)? == bits(b)?)
}
