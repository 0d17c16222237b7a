//! The pure steps of a session: each computes, from the current state, either
//! an answer without a change ([`Step::Done`]) or a new state beside the
//! current one ([`Step::Next`]) — Forward, ResetRunningStats,
//! UpdateParameters, ImportState — after the preconditions every mutation
//! shares ([`Preconditions`]: the replay of a request id, the expected
//! version). No locking, no I/O: the registry decides when a step is
//! committed, and the current state is never written.

use std::time::SystemTime;

use bytes::Bytes;
use tch::{Device, Tensor};

use super::exact::{self, ExactState};
use super::replay::{Call, Replay, Replayable};
use super::state::{snapshot, LayerState, Replaced, SessionInfo, SessionState};
use super::{
    Applied, Forward, ForwardOutcome, Mode, Preconditions, SessionConfig, SessionError, SessionId,
    SessionSnapshot, StateTensors, UpdateParameters,
};
use crate::numerics::batch_norm::{all_finite, check_eps, check_momentum, Layer, RunningStats};
use crate::numerics::state_dict::{self, Layout};
use crate::numerics::stats::StatsKernel;
use crate::numerics::{output_tensor, torch_size, Momentum, NumericsError, TensorData};

/// What a step decided: nothing to commit, or a new state.
pub enum Step<T> {
    Done(T),
    Next(Box<Next<T>>),
}

/// A new state to commit, the request ids to remember with it (oldest
/// first: several when a group of requests is committed as one), and the
/// answer.
pub struct Next<T> {
    pub layer: LayerState,
    pub replays: Vec<Replayable>,
    pub value: T,
}

impl<T> Step<T> {
    pub(super) fn next(layer: LayerState, replay: Option<Replayable>, value: T) -> Step<T> {
        Step::Next(Box::new(Next {
            layer,
            replays: replay.into_iter().collect(),
            value,
        }))
    }
}

/// The caller's `expected_version` against the session's version.
pub fn check_version(
    id: &SessionId,
    expected: Option<u64>,
    actual: u64,
) -> Result<(), SessionError> {
    match expected {
        Some(expected) if expected != actual => Err(SessionError::VersionMismatch {
            id: id.clone(),
            expected,
            actual,
        }),
        _ => Ok(()),
    }
}

/// A `num_batches_tracked` given at creation or by UpdateParameters.
pub fn check_num_batches_tracked(
    config: &SessionConfig,
    count: Option<i64>,
) -> Result<(), SessionError> {
    let Some(count) = count else { return Ok(()) };
    if count < 0 {
        return Err(SessionError::InvalidArgument(format!(
            "num_batches_tracked must be >= 0, got {count}"
        )));
    }
    if !config.track_running_stats {
        return Err(SessionError::InvalidArgument(
            "num_batches_tracked: the session has track_running_stats=false".into(),
        ));
    }
    Ok(())
}

/// The preconditions every mutation shares: the earlier result of an applied
/// request id (returned, to be answered again instead of applying twice), or
/// else the version check.
fn preconditions<'a>(
    info: &SessionInfo,
    state: &'a SessionState,
    preconditions: &'a Preconditions,
) -> Result<Option<(&'a str, &'a Replay)>, SessionError> {
    preconditions_at(
        info,
        &state.layer,
        |request_id| state.replay.find(request_id),
        preconditions,
    )
}

/// [`preconditions`] at `layer`, with the request ids `find` knows.
fn preconditions_at<'g, 'r>(
    info: &SessionInfo,
    layer: &LayerState,
    find: impl Fn(&str) -> Option<&'r Replay>,
    preconditions: &'g Preconditions,
) -> Result<Option<(&'g str, &'r Replay)>, SessionError> {
    if let Some(request_id) = &preconditions.request_id {
        if let Some(replay) = find(request_id) {
            return Ok(Some((request_id.as_str(), replay)));
        }
    }
    check_version(&info.id, preconditions.expected_version, layer.version)?;
    Ok(None)
}

/// A request id applied by another call: refused, never replayed as this one.
fn reused(info: &SessionInfo, request_id: &str, replay: &Replay) -> SessionError {
    SessionError::RequestIdReused {
        id: info.id.clone(),
        request_id: request_id.to_owned(),
        used_by: replay.call().name(),
    }
}

/// The replay of a snapshot-answering call (`call`) applied earlier.
fn replayed_snapshot(
    info: &SessionInfo,
    state: &SessionState,
    request_id: &str,
    replay: &Replay,
    call: Call,
) -> Result<Applied<SessionSnapshot>, SessionError> {
    match replay {
        Replay::Snapshot(snapshot, used_by) if *used_by == call => Ok(Applied {
            value: (**snapshot).clone(),
            replayed: true,
        }),
        // Applied before a restart (or by another replica): the original
        // answer is gone; the session as it is now says what was kept.
        Replay::Recovered { call: used_by, .. } if *used_by == call => Ok(Applied {
            value: snapshot(info, &state.layer, true)?,
            replayed: true,
        }),
        other => Err(reused(info, request_id, other)),
    }
}

/// The replay of a Forward applied earlier (its output, while still held).
fn replayed_forward(
    info: &SessionInfo,
    request_id: &str,
    replay: &Replay,
) -> Result<ForwardOutcome, SessionError> {
    match replay {
        Replay::Forward(outcome) => Ok(ForwardOutcome {
            replayed: true,
            written: false,
            ..outcome.clone()
        }),
        Replay::Recovered {
            call: Call::Forward,
            version,
            num_batches_tracked,
        } => Ok(ForwardOutcome {
            output: None,
            written: false,
            version: *version,
            num_batches_tracked: *num_batches_tracked,
            replayed: true,
        }),
        other => Err(reused(info, request_id, other)),
    }
}

/// The shared preconditions of a snapshot-answering mutation (`call`): the
/// earlier answer of an applied request id, or None after the version check.
pub(super) fn replay_or_check(
    info: &SessionInfo,
    state: &SessionState,
    given: &Preconditions,
    call: Call,
) -> Result<Option<Applied<SessionSnapshot>>, SessionError> {
    match preconditions(info, state, given)? {
        Some((request_id, replay)) => Ok(Some(replayed_snapshot(
            info, state, request_id, replay, call,
        )?)),
        None => Ok(None),
    }
}

/// Runs a snapshot-answering mutation after the shared preconditions.
fn snapshot_mutation(
    info: &SessionInfo,
    state: &SessionState,
    given: &Preconditions,
    call: Call,
    next: impl FnOnce() -> Result<Option<LayerState>, SessionError>,
) -> Result<Step<Applied<SessionSnapshot>>, SessionError> {
    if let Some((request_id, replay)) = preconditions(info, state, given)? {
        return Ok(Step::Done(replayed_snapshot(
            info, state, request_id, replay, call,
        )?));
    }
    let Some(layer) = next()? else {
        // Nothing to change: answered as it is, not a new version.
        return Ok(Step::Done(Applied {
            value: snapshot(info, &state.layer, true)?,
            replayed: false,
        }));
    };
    let snap = snapshot(info, &layer, true)?;
    let replay = given.request_id.clone().map(|request_id| Replayable {
        request_id,
        replay: Replay::Snapshot(Box::new(snap.clone()), call),
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
    exact::check_create(config, initial, num_batches_tracked)?;
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
    let mut layer = LayerState {
        eps: config.eps,
        momentum: config.momentum,
        weight: filled("weight", initial.weight.as_ref(), true)?,
        bias: filled("bias", initial.bias.as_ref(), false)?,
        running_mean: filled("running_mean", initial.running_mean.as_ref(), false)?,
        running_var: filled("running_var", initial.running_var.as_ref(), true)?,
        num_batches_tracked: num_batches_tracked.unwrap_or(0),
        version: 1,
        updated_at: SystemTime::now(),
        exact: None,
    };
    if config.exact_statistics {
        let empty = ExactState::empty(config);
        exact::set_exact(&mut layer, empty, config.param_dtype, device)?;
    }
    Ok(layer)
}

pub fn reset_step(
    info: &SessionInfo,
    state: &SessionState,
    given: &Preconditions,
) -> Result<Step<Applied<SessionSnapshot>>, SessionError> {
    snapshot_mutation(info, state, given, Call::ResetRunningStats, || {
        // PyTorch's reset_running_stats() is a no-op without statistics.
        if !info.config.track_running_stats {
            return Ok(None);
        }
        let options = (info.config.param_dtype.kind(), info.device);
        let c = [info.config.num_features];
        let mut layer = state.layer.next_version();
        layer.running_mean = Some(Tensor::f_zeros(c, options).map_err(NumericsError::from)?);
        layer.running_var = Some(Tensor::f_ones(c, options).map_err(NumericsError::from)?);
        layer.num_batches_tracked = 0;
        if info.config.exact_statistics {
            let empty = ExactState::empty(&info.config);
            exact::set_exact(&mut layer, empty, info.config.param_dtype, info.device)?;
        }
        Ok(Some(layer))
    })
}

pub fn update_step(
    info: &SessionInfo,
    state: &SessionState,
    update: &UpdateParameters,
    given: &Preconditions,
) -> Result<Step<Applied<SessionSnapshot>>, SessionError> {
    snapshot_mutation(info, state, given, Call::UpdateParameters, || {
        if let Some(eps) = update.eps {
            check_eps("eps", eps)?;
        }
        if let Some(Momentum::Exponential(m)) = update.momentum {
            check_momentum("momentum", m)?;
        }
        check_num_batches_tracked(&info.config, update.num_batches_tracked)?;
        exact::check_update(&info.config, update)?;
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
        Ok(Some(layer))
    })
}

pub fn import_step(
    info: &SessionInfo,
    state: &SessionState,
    safetensors: &Bytes,
    strict: bool,
    given: &Preconditions,
    max_elements: u64,
) -> Result<Step<Applied<SessionSnapshot>>, SessionError> {
    snapshot_mutation(info, state, given, Call::ImportState, || {
        let config = &info.config;
        let layout = Layout {
            kind: config.kind,
            num_features: config.num_features,
            affine: config.affine,
            track_running_stats: config.track_running_stats,
            exact_statistics: config.exact_statistics,
        };
        let mut imported = state_dict::import(&layout, safetensors, strict, max_elements)?;
        let exact_state = if config.exact_statistics {
            let exact_state = exact::imported(
                info,
                imported.exact.take(),
                imported.running_mean.as_ref(),
                imported.running_var.as_ref(),
            )?;
            // The running statistics are the ones the sums give (checked equal).
            (imported.running_mean, imported.running_var) = (None, None);
            exact_state
        } else {
            None
        };
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
        let mut layer = state.layer.next_with(Replaced {
            weight,
            bias,
            running_mean: mean,
            running_var: var,
            num_batches_tracked: imported.num_batches_tracked,
        });
        if let Some(exact_state) = exact_state {
            exact::set_exact(&mut layer, exact_state, config.param_dtype, info.device)?;
        }
        Ok(Some(layer))
    })
}

pub fn forward_step(
    info: &SessionInfo,
    state: &SessionState,
    command: &Forward,
    stats: StatsKernel,
) -> Result<Step<ForwardOutcome>, SessionError> {
    forward_at(
        info,
        &state.layer,
        |request_id| state.replay.find(request_id),
        state.replay.output_cap(),
        command,
        stats,
    )
}

/// The answers of a group of Forwards of one session, one per command in
/// order, and the state after all of them: each computed on the state the
/// ones before it left, exactly as if each were committed alone. A command's
/// own error answers that command only and changes nothing; a request id
/// repeated within the group is answered as the replay of its first use.
/// [`Step::Done`] when none of them changes the session; otherwise
/// [`Step::Next`] with every applied request id, to be committed as one.
pub fn forward_group_step(
    info: &SessionInfo,
    state: &SessionState,
    commands: &[Forward],
    stats: StatsKernel,
) -> Result<Step<Vec<Result<ForwardOutcome, SessionError>>>, SessionError> {
    let mut changed: Option<LayerState> = None;
    let mut replays: Vec<Replayable> = Vec::new();
    let mut answers = Vec::with_capacity(commands.len());
    for command in commands {
        let current = changed.as_ref().unwrap_or(&state.layer);
        let step = forward_at(
            info,
            current,
            |request_id| state.replay.find_after(&replays, request_id),
            state.replay.output_cap(),
            command,
            stats,
        );
        answers.push(match step {
            Ok(Step::Done(outcome)) => Ok(outcome),
            Ok(Step::Next(next)) => {
                let Next {
                    layer,
                    replays: applied,
                    value,
                } = *next;
                changed = Some(layer);
                replays.extend(applied);
                Ok(value)
            }
            Err(error) => Err(error),
        });
    }
    Ok(match changed {
        None => Step::Done(answers),
        Some(layer) => Step::Next(Box::new(Next {
            layer,
            replays,
            value: answers,
        })),
    })
}

/// A Forward at `current`, with the request ids `find` knows; a replay
/// keeps outputs of at most `replay_cap` bytes.
fn forward_at<'r>(
    info: &SessionInfo,
    current: &LayerState,
    find: impl Fn(&str) -> Option<&'r Replay>,
    replay_cap: usize,
    command: &Forward,
    stats: StatsKernel,
) -> Result<Step<ForwardOutcome>, SessionError> {
    let config = &info.config;
    let training = command.mode.unwrap_or(config.default_mode) == Mode::Train;
    let mutates = training && config.track_running_stats;
    // A forward that changes nothing is not remembered, so its request id
    // has nothing to replay: only the version applies to it.
    let given = if mutates {
        command.preconditions.clone()
    } else {
        command.preconditions.version_only()
    };
    if let Some((request_id, replay)) = preconditions_at(info, current, find, &given)? {
        return Ok(Step::Done(replayed_forward(info, request_id, replay)?));
    }

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
    // The output straight into the caller's memory, on the CPU: no tensor
    // of the server's, no copy. (A session on another device copies its
    // output to the host anyway; it is returned and copied in.)
    let out = match &command.output_memory {
        Some(memory) if info.device == Device::Cpu => Some(output_tensor(
            memory.clone(),
            command.input.dtype(),
            command.input.shape(),
        )?),
        _ => None,
    };
    if !mutates {
        let output = match &out {
            Some(out) if training => {
                layer.forward_train_into(&input, 0.0, out)?;
                None
            }
            Some(out) => {
                layer.forward_eval_into(&input, out)?;
                None
            }
            None if training => Some(layer.forward_train(&input, 0.0)?.output),
            None => Some(layer.forward_eval(&input)?),
        };
        let output = output.map(TensorData::from_result).transpose()?;
        check_memory(command)?;
        return Ok(Step::Done(ForwardOutcome {
            output,
            written: out.is_some(),
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
    let factor = current.momentum.factor(counted);
    let (output, running) = match &out {
        Some(out) => (None, layer.forward_train_into(&input, factor, out)?),
        None => {
            let step = layer.forward_train(&input, factor)?;
            let running = RunningStats {
                running_mean: step.running_mean,
                running_var: step.running_var,
            };
            (Some(TensorData::from_result(step.output)?), running)
        }
    };
    let mut next = current.next_version();
    if config.exact_statistics {
        // Refuses NaN/Inf (whatever reject_non_finite says): exact sums
        // cannot hold them.
        exact::accumulate(info, &mut next, &input)?;
    } else {
        next.running_mean = running.running_mean;
        next.running_var = running.running_var;
    }
    next.num_batches_tracked = counted;
    // A replay of the request id answers with the output again: written
    // into the caller's memory, the output is copied out of it for that,
    // unless the replay log could not hold it anyway.
    let kept = match (&out, &given.request_id) {
        (_, None) => None,
        (None, Some(_)) => output.clone(),
        (Some(out), Some(_)) if command.input.byte_size() <= replay_cap => {
            Some(TensorData::copied_from_output(out)?)
        }
        (Some(_), Some(_)) => None,
    };
    check_memory(command)?;
    let outcome = ForwardOutcome {
        output,
        written: out.is_some(),
        version: next.version,
        num_batches_tracked: counted,
        replayed: false,
    };
    let replay = given.request_id.map(|request_id| Replayable {
        request_id,
        replay: Replay::Forward(ForwardOutcome {
            output: kept,
            written: false,
            ..outcome.clone()
        }),
    });
    Ok(Step::next(next, replay, outcome))
}

/// Fails the step when memory outside the server that it read or wrote in
/// place lost pages meanwhile: what it computed is not committed.
fn check_memory(command: &Forward) -> Result<(), SessionError> {
    for memory in [&command.input_memory, &command.output_memory]
        .into_iter()
        .flatten()
    {
        memory.check_intact().map_err(SessionError::MemoryLost)?;
    }
    Ok(())
}
