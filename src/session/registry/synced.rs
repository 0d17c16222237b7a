//! Synchronized steps, the registry's operations: a train Forward with a
//! step and ReduceStatistics. Each rank first checks its request against the
//! session (a retry of an applied step is answered again; an older step is
//! refused; an invalid shard fails the step for the others), computes its
//! shard's statistics, and waits in the `barrier`. The rank that completes
//! the step commits it as ONE mutation through `commit` (the one swap path:
//! compare-and-set with the store, durable before any rank is answered), in
//! a task of its own so that no departing client can interrupt it; then each
//! rank normalizes its own shard with the global statistics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::barrier::{
    Arrive, Completion, Contribution, Failure, Key, Outcome, Phase, Previewer, Progress, Refused,
    Ticket,
};
use super::commit::{incarnation, MAX_ATTEMPTS};
use super::{rendezvous, Registry};
use crate::compute::ComputeError;
use crate::numerics::batch_norm::{all_finite, Layer};
use crate::numerics::merge_stats::{
    check_global_count, merge, updated_running_stats, ChannelTransform, GlobalStats, ShardStats,
};
use crate::numerics::{NumericsError, TensorData};
use crate::session::replay::{step_key, Call, Replay, Replayable};
use crate::session::state::{SessionInfo, SessionState};
use crate::session::steps::Step;
use crate::session::synced::{
    BackwardSums, ReduceOutcome, ReduceStatistics, Reduction, StepApplied, StepForward,
    StepForwardOutcome, StepSpec, StepStatistics,
};
use crate::session::{ForwardOutcome, Mode, SessionError, SessionId};

/// What a completed step gives its ranks.
pub enum StepDone {
    Applied(Arc<StepApplied>),
    Backward {
        sums: Arc<BackwardSums>,
        version: u64,
        num_batches_tracked: i64,
    },
}

/// The last completed backward reduction of each session (it commits
/// nothing, so its retries are answered from here; not kept over restarts).
#[derive(Default)]
pub struct BackwardDone(Mutex<HashMap<SessionId, (u64, Arc<StepDone>)>>);

impl BackwardDone {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, (u64, Arc<StepDone>)>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, id: &SessionId, step: u64) -> Option<Arc<StepDone>> {
        self.map()
            .get(id)
            .filter(|(s, _)| *s == step)
            .map(|(_, d)| d.clone())
    }

    fn put(&self, id: &SessionId, step: u64, done: Arc<StepDone>) {
        self.map().insert(id.clone(), (step, done));
    }

    fn forget(&self, id: &SessionId) {
        self.map().remove(id);
    }
}

/// The step's preview: its per-channel transform, known before the commit
/// is durable.
pub type Preview = ChannelTransform;

/// A Forward rank's shard, normalized while the step's commit is made
/// durable (see [`Registry::rendezvous`]).
struct Shard {
    input: TensorData,
    device: tch::Device,
    kind: tch::Kind,
}

/// A rank's output computed with a preview: used only when the committed
/// transform is that very one.
type EarlyOutput = (Arc<ChannelTransform>, Result<TensorData, SessionError>);

/// A rank's own request, checked against the session.
enum Checked<T> {
    /// Answered without the barrier (a replay, or an eval Forward).
    Answered(T),
    Arrive {
        contribution: Contribution,
        fingerprint: u64,
        timeout: std::time::Duration,
    },
    /// A Forward's shard passed the session's checks; its statistics are
    /// computed next, outside the session's lock.
    Shard {
        reject_non_finite: bool,
        timeout: std::time::Duration,
    },
}

/// A shard that skipped its statistics (cannot happen: they follow its checks).
fn not_checked() -> SessionError {
    SessionError::Compute(ComputeError::JobFailed(
        "a shard's statistics were not computed".into(),
    ))
}

fn key(id: &SessionId, incarnation: i64, step: u64, phase: Phase) -> Key {
    Key {
        session: id.clone(),
        incarnation,
        step,
        phase,
    }
}

/// The step below or at the last applied one that is not a retry.
fn check_order(info: &SessionInfo, state: &SessionState, step: u64) -> Result<(), SessionError> {
    match state.replay.last_step() {
        Some(last) if step <= last => Err(SessionError::FailedPrecondition(format!(
            "session {}: step {step} is not after the last applied step {last} (steps are strictly increasing; a retry of a step is answered again only while it is among the recent ones)",
            info.id
        ))),
        _ => Ok(()),
    }
}

/// The applied step `step`, if the session remembers it.
fn applied(
    info: &SessionInfo,
    state: &SessionState,
    step: u64,
) -> Result<Option<StepApplied>, SessionError> {
    let request_id = step_key(step);
    match state.replay.find(&request_id) {
        None => Ok(None),
        Some(Replay::Step(applied)) => Ok(Some((**applied).clone())),
        Some(Replay::Recovered {
            call: Call::Step,
            version,
            num_batches_tracked,
        }) => Ok(Some(StepApplied {
            step,
            version: *version,
            num_batches_tracked: *num_batches_tracked,
            statistics: None,
            transform: None,
        })),
        Some(other) => Err(SessionError::RequestIdReused {
            id: info.id.clone(),
            request_id,
            used_by: other.call().name(),
        }),
    }
}

/// A rank's request reduced to a number: the CRC-32 of its bytes and their
/// total length, to tell the same rank sent twice with other data.
struct Fingerprint {
    hasher: crc32fast::Hasher,
    total: u64,
}

/// Float64 values converted per block when fingerprinted (no copy of the
/// whole field).
const FINGERPRINT_BLOCK: usize = 512;

impl Fingerprint {
    fn new() -> Self {
        Fingerprint {
            hasher: crc32fast::Hasher::new(),
            total: 0,
        }
    }

    fn bytes(mut self, part: &[u8]) -> Self {
        self.hasher.update(part);
        self.total += part.len() as u64;
        self
    }

    /// The values as little-endian bytes, as if they were one byte string.
    fn doubles(mut self, values: &[f64]) -> Self {
        let mut block = [0u8; FINGERPRINT_BLOCK * 8];
        for part in values.chunks(FINGERPRINT_BLOCK) {
            for (bytes, value) in block.chunks_exact_mut(8).zip(part) {
                bytes.copy_from_slice(&value.to_le_bytes());
            }
            self = self.bytes(&block[..part.len() * 8]);
        }
        self
    }

    fn finish(self) -> u64 {
        (u64::from(self.hasher.finalize()) << 32) ^ self.total
    }
}

fn fingerprint_of(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .fold(Fingerprint::new(), |f, part| f.bytes(part))
        .finish()
}

fn shard_fingerprint(input: &TensorData) -> u64 {
    let shape: Vec<u8> = input.shape().iter().flat_map(|d| d.to_le_bytes()).collect();
    fingerprint_of(&[&shape, &[input.dtype().code() as u8], input.bytes()])
}

/// The shard with its bytes where libtorch reads them in place (aligned to
/// the element size): copied once here when they are not (they may be a
/// slice of an HTTP/2 frame at any offset), instead of once in each of the
/// rank's two computations (its statistics, then its normalization).
fn aligned(input: TensorData) -> TensorData {
    let itemsize = input.dtype().itemsize();
    if itemsize == 0 || (input.bytes().as_ptr() as usize).is_multiple_of(itemsize) {
        return input;
    }
    let bytes = bytes::Bytes::from(input.bytes().to_vec());
    TensorData::from_raw(
        "input",
        input.dtype(),
        input.shape().to_vec(),
        bytes,
        u64::MAX,
    )
    .unwrap_or(input)
}

/// A rank's refusal as its error.
fn refused(refused: Refused) -> SessionError {
    match refused {
        Refused::Invalid(reason) => SessionError::InvalidArgument(reason),
        Refused::Failed(failure) => failed(failure),
        Refused::Limit {
            what,
            actual,
            limit,
            limit_name,
        } => SessionError::LimitExceeded {
            what,
            actual,
            limit,
            limit_name,
        },
    }
}

/// A failed step as each rank's error.
pub(super) fn failed(failure: Failure) -> SessionError {
    match failure {
        Failure::Aborted(message) => SessionError::StepAborted(message),
        Failure::Invalid(message) => SessionError::InvalidArgument(message),
        Failure::Precondition(message) => SessionError::FailedPrecondition(message),
        Failure::Server(message) => SessionError::Compute(ComputeError::JobFailed(message)),
    }
}

/// The session the step's ranks checked against was deleted and created
/// again under its id while they waited: the step is not the new one's.
fn session_replaced(info: &SessionInfo, step: u64) -> SessionError {
    SessionError::StepAborted(format!(
        "session {} was deleted (and created again) while step {step}'s ranks waited; nothing was applied",
        info.id
    ))
}

/// What the ranks of a step of session `id` are told when it was deleted
/// while they waited.
fn deleted_while_waiting(id: &SessionId) -> Failure {
    Failure::Aborted(format!(
        "session {id} was deleted while the step's ranks waited; nothing was applied"
    ))
}

/// A commit's error as the failure every rank of the step is told.
fn failure_of(error: &SessionError) -> Failure {
    match error {
        SessionError::FailedPrecondition(m) => Failure::Precondition(m.clone()),
        SessionError::InvalidArgument(m) => Failure::Invalid(m.clone()),
        SessionError::Numerics(e @ NumericsError::Invalid { .. }) => {
            Failure::Invalid(e.to_string())
        }
        SessionError::StepAborted(m) => Failure::Aborted(m.clone()),
        // Deleted while its ranks waited: the step cannot happen.
        SessionError::NotFound(id) => deleted_while_waiting(id),
        SessionError::Contended(_) | SessionError::VersionMismatch { .. } => {
            Failure::Aborted(format!("{error}; nothing was applied"))
        }
        other => Failure::Server(other.to_string()),
    }
}

/// (C,) values of an optional state tensor as float64: one copy out of a
/// float32 or float64 tensor (brought to the host by that copy), widened
/// here; a step's commit makes as few libtorch calls as it can, since every
/// rank waits for it.
fn values(tensor: Option<&tch::Tensor>) -> Result<Option<Vec<f64>>, NumericsError> {
    let Some(tensor) = tensor else {
        return Ok(None);
    };
    let numel = tensor.numel();
    let values = match tensor.f_kind()? {
        tch::Kind::Double => {
            let mut values = vec![0f64; numel];
            tensor.f_copy_data(&mut values, numel)?;
            values
        }
        tch::Kind::Float => {
            let mut narrow = vec![0f32; numel];
            tensor.f_copy_data(&mut narrow, numel)?;
            narrow.into_iter().map(f64::from).collect()
        }
        _ => {
            let host = tensor
                .f_to_kind(tch::Kind::Double)?
                .f_to_device(tch::Device::Cpu)?;
            Vec::<f64>::try_from(&host)?
        }
    };
    Ok(Some(values))
}

/// (C,) float64 values as a state tensor of the session's dtype and device
/// (float32 narrowed here, rounding to nearest as libtorch's conversion does).
fn per_channel(values: &[f64], info: &SessionInfo) -> Result<tch::Tensor, NumericsError> {
    let tensor = match info.config.param_dtype.kind() {
        tch::Kind::Double => tch::Tensor::f_from_slice(values)?,
        tch::Kind::Float => {
            let narrow: Vec<f32> = values.iter().map(|v| *v as f32).collect();
            tch::Tensor::f_from_slice(&narrow)?
        }
        kind => tch::Tensor::f_from_slice(values)?.f_to_kind(kind)?,
    };
    if info.device == tch::Device::Cpu {
        return Ok(tensor);
    }
    Ok(tensor.f_to_device(info.device)?)
}

/// Whose step a commit is: Forward ranks normalize their shards with the
/// step's per-channel transform; ReduceStatistics ranks need only the
/// statistics (computing the transform for them would be wasted).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ranks {
    Forward,
    Statistics,
}

/// The step's one mutation: version + 1, the step remembered, and with
/// `update` the running statistics and num_batches_tracked as one train
/// forward on the global batch would leave them.
fn commit_step(
    info: &SessionInfo,
    state: &SessionState,
    step: u64,
    global: &GlobalStats,
    update: bool,
    ranks: Ranks,
) -> Result<Step<Arc<StepApplied>>, SessionError> {
    let statistics = Arc::new(StepStatistics {
        step,
        global: global.clone(),
    });
    let transform_of = |layer: &crate::session::state::LayerState| -> Result<_, SessionError> {
        if ranks == Ranks::Statistics {
            return Ok(None);
        }
        let weight = values(layer.weight.as_ref())?;
        let bias = values(layer.bias.as_ref())?;
        Ok(Some(Arc::new(ChannelTransform::new(
            global,
            layer.eps,
            weight.as_deref(),
            bias.as_deref(),
        ))))
    };
    if let Some(done) = applied(info, state, step)? {
        // Committed meanwhile (by another replica, or before a restart).
        return Ok(Step::Done(Arc::new(StepApplied {
            statistics: Some(statistics),
            transform: transform_of(&state.layer)?,
            ..done
        })));
    }
    check_order(info, state, step)?;
    let current = &state.layer;
    let mut next = current.next_version();
    if update && info.config.track_running_stats {
        let Some(counted) = current.num_batches_tracked.checked_add(1) else {
            return Err(SessionError::FailedPrecondition(format!(
                "session {}: num_batches_tracked is at its maximum ({}); reset it first",
                info.id,
                i64::MAX
            )));
        };
        if let (Some(old_mean), Some(old_var)) = (
            values(current.running_mean.as_ref())?,
            values(current.running_var.as_ref())?,
        ) {
            let factor = current.momentum.factor(counted);
            let (mean, var) = updated_running_stats(&old_mean, &old_var, global, factor);
            next.running_mean = Some(per_channel(&mean, info)?);
            next.running_var = Some(per_channel(&var, info)?);
        }
        next.num_batches_tracked = counted;
    }
    let applied = Arc::new(StepApplied {
        step,
        version: next.version,
        num_batches_tracked: next.num_batches_tracked,
        statistics: Some(statistics),
        transform: transform_of(&next)?,
    });
    let replay = Replayable {
        request_id: step_key(step),
        replay: Replay::Step(applied.clone()),
    };
    Ok(Step::next(next, Some(replay), applied))
}

/// The shard's checks, as a train forward of the session makes them, except
/// the one-value-per-channel check (it applies to the global batch).
fn check_shard(
    info: &SessionInfo,
    state: &SessionState,
    input: &TensorData,
) -> Result<(), SessionError> {
    let layer = &state.layer;
    let config = &info.config;
    let layer = Layer {
        kind: config.kind,
        num_features: config.num_features,
        eps: layer.eps,
        param_dtype: config.param_dtype,
        weight: layer.weight.as_ref(),
        bias: layer.bias.as_ref(),
        running_mean: layer.running_mean.as_ref(),
        running_var: layer.running_var.as_ref(),
        stats: crate::numerics::stats::StatsKernel::Libtorch,
    };
    layer.check_input(input.shape(), input.dtype(), false)?;
    Ok(())
}

impl Registry {
    /// A Forward that names a step: a train forward waits for the step's
    /// other ranks and is normalized with the global batch's statistics; an
    /// eval forward is a plain Forward.
    pub async fn step_forward(
        self: &Arc<Self>,
        command: StepForward,
    ) -> Result<StepForwardOutcome, SessionError> {
        let StepForward { forward, spec } = command;
        // A step's shards travel through its rendezvous as host bytes.
        let Some(mut host_input) = forward.input.as_host().cloned() else {
            return Err(NumericsError::invalid(
                "input_region",
                "a synchronized step takes its shard as host bytes, not as device memory",
            )
            .into());
        };
        let id = forward.id.clone();
        let for_check = &forward;
        // Checked against the session under its lock; the shard's statistics
        // are computed after, without holding the lock (the ranks of a step
        // compute them in parallel).
        let mut placement = None;
        let (incarnation, checked) = self
            .check(&id, |info, state| {
                let training = for_check.mode.unwrap_or(info.config.default_mode) == Mode::Train;
                if !training {
                    return Ok(Checked::Answered(None));
                }
                placement = Some((info.device, info.config.param_dtype.kind()));
                if let Some(done) = applied(info, state, spec.step)? {
                    return Ok(Checked::Answered(Some(done)));
                }
                check_order(info, state, spec.step)?;
                check_shard(info, state, &host_input)?;
                Ok(Checked::Shard {
                    reject_non_finite: info.config.reject_non_finite,
                    timeout: info.config.step_timeout,
                })
            })
            .await;
        let checked = match checked {
            Ok(Checked::Shard {
                reject_non_finite,
                timeout,
            }) => {
                host_input = aligned(host_input);
                let input = host_input.clone();
                let (device, _) = placement.ok_or_else(not_checked)?;
                self.pool
                    .run_sized(input.bytes().len(), move || {
                        let tensor = input.input_tensor(device)?;
                        if reject_non_finite && !all_finite(&tensor)? {
                            return Err(NumericsError::invalid(
                                "input",
                                "contains NaN or infinite values (the session has reject_non_finite=true)",
                            )
                            .into());
                        }
                        let stats = ShardStats::of(&tensor)?;
                        Ok(Checked::Arrive {
                            contribution: Contribution::Forward {
                                stats,
                                shape: Some(input.shape().to_vec()),
                                update_running_stats: true,
                            },
                            fingerprint: shard_fingerprint(&input),
                            timeout,
                        })
                    })
                    .await
                    .map_err(SessionError::from)
                    .and_then(|r| r)
            }
            other => other,
        };
        let checked = match checked {
            Ok(checked) => checked,
            Err(error) => {
                if let (Failure::Invalid(_), Some(incarnation)) = (failure_of(&error), incarnation)
                {
                    let step_key = key(&id, incarnation, spec.step, Phase::Forward);
                    self.fail_invalid(&step_key, spec, &error.to_string()).await;
                }
                return Err(error);
            }
        };
        let (applied, replayed) = match checked {
            Checked::Shard { .. } => return Err(not_checked()),
            Checked::Answered(None) => {
                let forward = self.forward(forward).await?;
                return Ok(StepForwardOutcome {
                    forward,
                    statistics: None,
                });
            }
            Checked::Answered(Some(done)) => (Arc::new(done), true),
            Checked::Arrive {
                contribution,
                fingerprint,
                timeout,
            } => {
                let bytes = host_input.bytes().len() as u64;
                let (device, kind) = placement.ok_or_else(not_checked)?;
                let incarnation = incarnation.ok_or_else(not_checked)?;
                let shard = Shard {
                    input: host_input.clone(),
                    device,
                    kind,
                };
                let (done, early) = self
                    .rendezvous(
                        spec,
                        key(&id, incarnation, spec.step, Phase::Forward),
                        contribution,
                        fingerprint,
                        bytes,
                        timeout,
                        Some(shard),
                    )
                    .await?;
                match &*done {
                    StepDone::Applied(applied) => {
                        if let (Some((transform, output)), Some(committed)) =
                            (early, &applied.transform)
                        {
                            if Arc::ptr_eq(&transform, committed) {
                                return Ok(StepForwardOutcome {
                                    forward: ForwardOutcome {
                                        output: Some(output?),
                                        written: false,
                                        version: applied.version,
                                        num_batches_tracked: applied.num_batches_tracked,
                                        replayed: false,
                                    },
                                    statistics: applied.statistics.clone(),
                                });
                            }
                        }
                        (applied.clone(), false)
                    }
                    StepDone::Backward { .. } => {
                        return Err(SessionError::Compute(ComputeError::JobFailed(
                            "a forward step completed as a backward one".into(),
                        )))
                    }
                }
            }
        };
        let output = match applied.transform.clone() {
            Some(transform) => {
                let (device, kind) = placement.ok_or_else(not_checked)?;
                let shard = Shard {
                    input: host_input.clone(),
                    device,
                    kind,
                };
                Some(self.normalize(shard, transform).await?)
            }
            None => None,
        };
        Ok(StepForwardOutcome {
            forward: ForwardOutcome {
                output,
                written: false,
                version: applied.version,
                num_batches_tracked: applied.num_batches_tracked,
                replayed,
            },
            statistics: applied.statistics.clone(),
        })
    }

    /// `shard` normalized with a step's transform.
    async fn normalize(
        &self,
        shard: Shard,
        transform: Arc<ChannelTransform>,
    ) -> Result<TensorData, SessionError> {
        let Shard {
            input,
            device,
            kind,
        } = shard;
        let output = self
            .pool
            .run_sized(input.bytes().len(), move || {
                let tensor = input.input_tensor(device)?;
                let output = transform.apply(&tensor, kind)?;
                TensorData::from_result(output)
            })
            .await??;
        Ok(output)
    }

    /// Runs a step's check against the session's state, locked and
    /// current, inline: the checks are a few comparisons per channel, cheaper
    /// than a compute-pool job's two thread hops, and every rank of a step
    /// takes the session's lock for them one after another.
    /// Also returns the session's incarnation, when the session was read
    /// (the step's key: see [`Key`]).
    async fn check<T, F>(
        &self,
        id: &SessionId,
        mut job: F,
    ) -> (Option<i64>, Result<T, SessionError>)
    where
        F: FnMut(&SessionInfo, &SessionState) -> Result<T, SessionError>,
    {
        for _ in 0..MAX_ATTEMPTS {
            let (session, state) = match self.locked(id).await {
                Ok(Some(locked)) => locked,
                Ok(None) => continue,
                Err(error) => return (None, Err(error)),
            };
            return (Some(incarnation(&session.info)), job(&session.info, &state));
        }
        (None, Err(SessionError::Contended(id.clone())))
    }

    /// ReduceStatistics: the statistics of a step's ranks, merged.
    pub async fn reduce_statistics(
        self: &Arc<Self>,
        command: ReduceStatistics,
    ) -> Result<ReduceOutcome, SessionError> {
        let ReduceStatistics {
            id,
            spec,
            reduction,
        } = command;
        let phase = match reduction {
            Reduction::Forward { .. } => Phase::Forward,
            Reduction::Backward { .. } => Phase::Backward,
        };
        if phase == Phase::Backward {
            if let Some(done) = self.backward_done.get(&id, spec.step) {
                return Ok(reduce_outcome(&done, true));
            }
        }
        let mut reduction = Some(reduction);
        let (incarnation, checked) = self
            .check(&id, |info, state| match reduction.take() {
                Some(reduction) => check_reduction(info, state, spec, reduction),
                None => Err(not_checked()),
            })
            .await;
        let checked = match checked {
            Ok(checked) => checked,
            Err(error) => {
                if let (Failure::Invalid(_), Some(incarnation)) = (failure_of(&error), incarnation)
                {
                    let step_key = key(&id, incarnation, spec.step, phase);
                    self.fail_invalid(&step_key, spec, &error.to_string()).await;
                }
                return Err(error);
            }
        };
        match checked {
            Checked::Shard { .. } => Err(not_checked()),
            Checked::Answered(done) => Ok(reduce_outcome(&done, true)),
            Checked::Arrive {
                contribution,
                fingerprint,
                timeout,
            } => {
                let step_key = key(&id, incarnation.ok_or_else(not_checked)?, spec.step, phase);
                let (done, _) = self
                    .rendezvous(spec, step_key, contribution, fingerprint, 0, timeout, None)
                    .await?;
                Ok(reduce_outcome(&done, false))
            }
        }
    }

    /// Tells the step's other ranks that `spec.rank` sent an invalid request.
    async fn fail_invalid(&self, key: &Key, spec: StepSpec, reason: &str) {
        match self.store.as_ref().filter(|s| s.is_shared()) {
            Some(store) => rendezvous::fail(store, key, spec.rank, reason).await,
            None => self.barriers.fail_invalid(
                key,
                spec.rank,
                spec.world_size,
                reason,
                crate::session::DEFAULT_STEP_TIMEOUT,
            ),
        }
    }

    /// Waits in the barrier; the rank that completes the step commits it.
    /// With a shared store the ranks meet in the store and every replica
    /// commits (the compare-and-set lets exactly one commit happen).
    /// A Forward rank's `shard` is normalized with the step's preview while
    /// the commit is being made durable (the output is returned only with
    /// the outcome, and used only if the committed transform is the
    /// previewed one).
    #[allow(clippy::too_many_arguments)]
    async fn rendezvous(
        self: &Arc<Self>,
        spec: StepSpec,
        key: Key,
        contribution: Contribution,
        fingerprint: u64,
        bytes: u64,
        timeout: std::time::Duration,
        shard: Option<Shard>,
    ) -> Result<(Arc<StepDone>, Option<EarlyOutput>), SessionError> {
        if let Some(store) = self.store.clone().filter(|s| s.is_shared()) {
            let contributions = rendezvous::meet(
                &store,
                &key,
                spec.world_size,
                spec.rank,
                self.options.steps.max_world_size,
                &contribution,
                fingerprint,
                timeout,
                crate::compute::current_deadline(),
            )
            .await?;
            let registry = self.clone();
            // As with the local barrier, the commit runs in its own task.
            let done = tokio::spawn(async move {
                let outcome = registry.commit(&key, &contributions, None).await;
                registry.remember_backward(&key, &outcome);
                outcome
            })
            .await
            .map_err(|e| SessionError::Compute(ComputeError::JobFailed(e.to_string())))?;
            return done.map(|done| (done, None)).map_err(failed);
        }
        let ticket = self
            .barriers
            .arrive(Arrive {
                key,
                world_size: spec.world_size,
                rank: spec.rank,
                contribution,
                fingerprint,
                bytes,
                timeout,
                caller_deadline: crate::compute::current_deadline(),
            })
            .map_err(refused)?;
        let mut waiter = match ticket {
            Ticket::Wait(waiter) => waiter,
            Ticket::Complete(completion, waiter) => {
                // The commit runs in its own task: the step is committed (or
                // not) as a whole, whoever goes away meanwhile.
                let registry = self.clone();
                tokio::spawn(async move { registry.complete(completion).await });
                waiter
            }
        };
        let Some(shard) = shard else {
            return waiter.outcome().await.map(|d| (d, None)).map_err(failed);
        };
        match waiter.progress().await {
            Progress::Done(outcome) => outcome.map(|d| (d, None)).map_err(failed),
            Progress::Preview(transform) => {
                let output = self.normalize(shard, transform.clone()).await;
                let done = waiter.outcome().await.map_err(failed)?;
                Ok((done, Some((transform, output))))
            }
        }
    }

    async fn complete(self: Arc<Self>, completion: Completion<StepDone, Preview>) {
        let key = completion.key().clone();
        let previewer = completion.previewer();
        let outcome = self
            .commit(&key, &completion.contributions, Some(previewer))
            .await;
        self.remember_backward(&key, &outcome);
        completion.publish(outcome);
    }

    /// `id` was deleted: its waiting ranks are answered now (ABORTED)
    /// instead of at their timeout, and its step state is forgotten, so a
    /// session created again under the id starts with none of it.
    pub(super) fn end_steps_of(&self, id: &SessionId) {
        self.barriers.abort_session(id, &deleted_while_waiting(id));
        self.backward_done.forget(id);
    }

    fn remember_backward(&self, key: &Key, outcome: &Outcome<StepDone>) {
        if let Ok(done) = outcome {
            if let StepDone::Backward { .. } = **done {
                self.backward_done.put(&key.session, key.step, done.clone());
            }
        }
    }

    /// Commits a step; with `previewer`, its transform is published as soon
    /// as it is computed (before the store's write).
    async fn commit(
        &self,
        key: &Key,
        contributions: &[Contribution],
        previewer: Option<Previewer<StepDone, Preview>>,
    ) -> Outcome<StepDone> {
        let key = key.clone();
        if key.phase == Phase::Backward {
            return self.commit_backward(&key, contributions).await;
        }
        let mut shards = Vec::with_capacity(contributions.len());
        let mut global_shape: Option<Vec<i64>> = None;
        let mut update = true;
        for contribution in contributions {
            if let Contribution::Forward {
                stats,
                shape,
                update_running_stats,
            } = contribution
            {
                shards.push(stats);
                update = *update_running_stats;
                if let Some(shape) = shape {
                    match &mut global_shape {
                        Some(global) => global[0] += shape[0],
                        None => global_shape = Some(shape.clone()),
                    }
                }
            }
        }
        let channels = shards.first().map_or(0, |s| s.mean.len());
        let global = match merge(channels, shards.iter().copied()) {
            Ok(global) => global,
            Err(error) => return Err(Failure::Invalid(error.to_string())),
        };
        // Forward ranks send their shards' shapes, ReduceStatistics ranks none.
        let ranks = match global_shape {
            Some(_) => Ranks::Forward,
            None => Ranks::Statistics,
        };
        let shape = global_shape.unwrap_or_else(|| vec![global.count, channels as i64]);
        if let Err(error) = check_global_count(global.count, &shape) {
            return Err(Failure::Invalid(error.to_string()));
        }
        let (step, expected) = (key.step, key.incarnation);
        let applied = self
            .mutate(&key.session, 0, move |info, state| {
                if incarnation(info) != expected {
                    return Err(session_replaced(info, step));
                }
                let step = commit_step(info, state, step, &global, update, ranks)?;
                if let (Some(previewer), Step::Next(next)) = (&previewer, &step) {
                    if let Some(transform) = &next.value.transform {
                        previewer.send(transform.clone());
                    }
                }
                Ok(step)
            })
            .await
            .map_err(|e| failure_of(&e))?;
        Ok(Arc::new(StepDone::Applied(applied)))
    }

    async fn commit_backward(
        &self,
        key: &Key,
        contributions: &[Contribution],
    ) -> Outcome<StepDone> {
        let mut sum_grad_output: Vec<f64> = Vec::new();
        let mut sum_grad_output_centered: Vec<f64> = Vec::new();
        for contribution in contributions {
            if let Contribution::Backward {
                sum_grad_output: a,
                sum_grad_output_centered: b,
            } = contribution
            {
                if sum_grad_output.is_empty() {
                    sum_grad_output = vec![0.0; a.len()];
                    sum_grad_output_centered = vec![0.0; b.len()];
                }
                sum_grad_output.iter_mut().zip(a).for_each(|(s, v)| *s += v);
                sum_grad_output_centered
                    .iter_mut()
                    .zip(b)
                    .for_each(|(s, v)| *s += v);
            }
        }
        let (step, expected) = (key.step, key.incarnation);
        let (version, num_batches_tracked) = self
            .read(&key.session, move |info, state| {
                if incarnation(info) != expected {
                    return Err(session_replaced(info, step));
                }
                Ok((state.layer.version, state.layer.num_batches_tracked))
            })
            .await
            .map_err(|e| failure_of(&e))?;
        Ok(Arc::new(StepDone::Backward {
            sums: Arc::new(BackwardSums {
                sum_grad_output,
                sum_grad_output_centered,
            }),
            version,
            num_batches_tracked,
        }))
    }
}

fn reduce_outcome(done: &StepDone, replayed: bool) -> ReduceOutcome {
    match done {
        StepDone::Applied(applied) => ReduceOutcome {
            statistics: applied.statistics.clone(),
            sums: None,
            version: applied.version,
            num_batches_tracked: applied.num_batches_tracked,
            replayed,
        },
        StepDone::Backward {
            sums,
            version,
            num_batches_tracked,
        } => ReduceOutcome {
            statistics: None,
            sums: Some(sums.clone()),
            version: *version,
            num_batches_tracked: *num_batches_tracked,
            replayed,
        },
    }
}

fn invalid(message: String) -> SessionError {
    SessionError::InvalidArgument(message)
}

/// A ReduceStatistics request checked against the session.
fn check_reduction(
    info: &SessionInfo,
    state: &SessionState,
    spec: StepSpec,
    reduction: Reduction,
) -> Result<Checked<StepDone>, SessionError> {
    let channels = info.config.num_features as usize;
    let check_len = |field: &str, values: &[f64]| {
        if values.len() != channels {
            return Err(invalid(format!(
                "{field}: expected num_features = {channels} values, got {}",
                values.len()
            )));
        }
        // Branch-free folds: they vectorize (a few thousand values per rank,
        // checked under the session's lock).
        if !values.iter().fold(true, |all, v| all & v.is_finite()) {
            return Err(invalid(format!("{field}: values must be finite")));
        }
        Ok(())
    };
    let timeout = info.config.step_timeout;
    match reduction {
        Reduction::Forward {
            stats,
            update_running_stats,
        } => {
            if let Some(done) = applied(info, state, spec.step)? {
                return Ok(Checked::Answered(StepDone::Applied(Arc::new(done))));
            }
            check_order(info, state, spec.step)?;
            if stats.count < 0 {
                return Err(invalid(format!("count must be >= 0, got {}", stats.count)));
            }
            check_len("mean", &stats.mean)?;
            check_len("m2", &stats.m2)?;
            if stats.m2.iter().fold(false, |any, m2| any | (*m2 < 0.0)) {
                return Err(invalid("m2: values must be >= 0".into()));
            }
            let fingerprint = Fingerprint::new()
                .bytes(&stats.count.to_le_bytes())
                .doubles(&stats.mean)
                .doubles(&stats.m2)
                .bytes(&[u8::from(update_running_stats)])
                .finish();
            Ok(Checked::Arrive {
                contribution: Contribution::Forward {
                    stats,
                    shape: None,
                    update_running_stats,
                },
                fingerprint,
                timeout,
            })
        }
        Reduction::Backward {
            sum_grad_output,
            sum_grad_output_centered,
        } => {
            if applied(info, state, spec.step)?.is_none() {
                return Err(SessionError::FailedPrecondition(format!(
                    "session {}: the FORWARD reduction of step {} has not completed (or is no longer among the recent steps); a BACKWARD reduction follows it",
                    info.id, spec.step
                )));
            }
            check_len("sum_grad_output", &sum_grad_output)?;
            check_len("sum_grad_output_centered", &sum_grad_output_centered)?;
            let fingerprint = Fingerprint::new()
                .doubles(&sum_grad_output)
                .doubles(&sum_grad_output_centered)
                .finish();
            Ok(Checked::Arrive {
                contribution: Contribution::Backward {
                    sum_grad_output,
                    sum_grad_output_centered,
                },
                fingerprint,
                timeout,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fingerprint_of, Fingerprint, FINGERPRINT_BLOCK};

    /// The values as one byte string, built here value by value.
    fn le_bytes(values: &[f64]) -> Vec<u8> {
        let mut out = Vec::new();
        for value in values {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out
    }

    #[test]
    fn a_fingerprint_fed_in_blocks_is_the_crc_of_the_whole_byte_string() {
        // Lengths around the block size, NaN payloads and signed zeros:
        // the same number a replica computing it from one copy gets.
        for len in [
            0,
            1,
            FINGERPRINT_BLOCK - 1,
            FINGERPRINT_BLOCK,
            3 * FINGERPRINT_BLOCK + 5,
        ] {
            let values: Vec<f64> = (0..len as u64)
                .map(|i| match i % 4 {
                    0 => f64::from_bits(0x7ff8_0000_0000_0000 | i),
                    1 => -0.0,
                    _ => i as f64 * 0.1,
                })
                .collect();
            let mut whole = 7i64.to_le_bytes().to_vec();
            whole.extend(le_bytes(&values));
            whole.push(1);
            let mut crc = crc32fast::Hasher::new();
            crc.update(&whole);
            let expected = (u64::from(crc.finalize()) << 32) ^ whole.len() as u64;
            let blocks = Fingerprint::new()
                .bytes(&7i64.to_le_bytes())
                .doubles(&values)
                .bytes(&[1])
                .finish();
            assert_eq!(blocks, expected, "{len} values");
            assert_eq!(fingerprint_of(&[&whole]), expected);
        }
    }
}
