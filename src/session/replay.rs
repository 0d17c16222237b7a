//! Recent request ids of one session and the results they produced, so that
//! a retried mutation is answered from memory instead of applied twice. The
//! ids (not the outputs) are also stored with the session's record, so they
//! survive a restart.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::durable::{RecentRequest, RecordError};
use super::synced::StepApplied;
use super::{ForwardOutcome, SessionSnapshot};

/// The mutating calls a request id can be applied by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Forward,
    ResetRunningStats,
    UpdateParameters,
    ImportState,
    /// A synchronized step (Forward with a step, or ReduceStatistics): one
    /// entry per step, under the key [`step_key`].
    Step,
}

impl Call {
    const ALL: [Call; 5] = [
        Call::Forward,
        Call::ResetRunningStats,
        Call::UpdateParameters,
        Call::ImportState,
        Call::Step,
    ];

    /// The RPC's name: in error texts and in stored records.
    pub fn name(self) -> &'static str {
        match self {
            Call::Forward => "Forward",
            Call::ResetRunningStats => "ResetRunningStats",
            Call::UpdateParameters => "UpdateParameters",
            Call::ImportState => "ImportState",
            Call::Step => "Step",
        }
    }

    /// The call a stored record names; `None` for a name this build does not
    /// write (the record is then corrupt: guessing would replay the wrong call).
    pub fn from_name(name: &str) -> Option<Call> {
        Call::ALL.into_iter().find(|call| call.name() == name)
    }
}

/// The replay key of synchronized step `step`: a text no client's request id
/// is expected to be (it starts with a control character).
pub fn step_key(step: u64) -> String {
    format!("\u{1}step:{step}")
}

/// The step number of a [`step_key`].
fn step_of_key(key: &str) -> Option<u64> {
    key.strip_prefix("\u{1}step:")?.parse().ok()
}

/// The remembered result of one applied mutation.
#[derive(Debug, Clone)]
pub enum Replay {
    Forward(ForwardOutcome),
    /// A synchronized step, with what answers each of its ranks again.
    Step(Arc<StepApplied>),
    /// Reset, UpdateParameters and ImportState answer with the session.
    Snapshot(Box<SessionSnapshot>, Call),
    /// Known from the stored record only (the process restarted or another
    /// replica applied it): the call and the position it produced.
    Recovered {
        call: Call,
        version: u64,
        num_batches_tracked: i64,
    },
}

impl Replay {
    pub fn call(&self) -> Call {
        match self {
            Replay::Forward(_) => Call::Forward,
            Replay::Step(_) => Call::Step,
            Replay::Snapshot(_, call) | Replay::Recovered { call, .. } => *call,
        }
    }

    /// The stored form of this entry under `request_id`.
    pub fn recent(&self, request_id: &str) -> RecentRequest {
        let (version, num_batches_tracked) = match self {
            Replay::Forward(o) => (o.version, o.num_batches_tracked),
            Replay::Step(s) => (s.version, s.num_batches_tracked),
            Replay::Snapshot(s, _) => (s.version, s.num_batches_tracked),
            Replay::Recovered {
                version,
                num_batches_tracked,
                ..
            } => (*version, *num_batches_tracked),
        };
        RecentRequest {
            request_id: request_id.to_owned(),
            call: self.call().name().to_owned(),
            version,
            num_batches_tracked,
        }
    }

    fn output_bytes(&self) -> usize {
        match self {
            Replay::Forward(outcome) => outcome.output.as_ref().map_or(0, |o| o.bytes().len()),
            Replay::Snapshot(..) | Replay::Recovered { .. } | Replay::Step(_) => 0,
        }
    }
}

/// A request id and the result it produced, about to be remembered.
#[derive(Debug, Clone)]
pub struct Replayable {
    pub request_id: String,
    pub replay: Replay,
}

/// How much every session's log may remember: `window` request ids and
/// `output_bytes` of forward outputs per session, and `total_bytes` of
/// outputs over all sessions together (counted in `held`, shared by every log).
#[derive(Debug, Clone)]
pub struct ReplayLimits {
    pub window: usize,
    pub output_bytes: usize,
    pub total_bytes: usize,
    held: Arc<AtomicUsize>,
}

impl ReplayLimits {
    pub fn new(window: usize, output_bytes: usize, total_bytes: usize) -> ReplayLimits {
        ReplayLimits {
            window,
            output_bytes,
            total_bytes,
            held: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Takes `bytes` from the server-wide budget, if they fit.
    fn take(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(bytes)
                    .filter(|&sum| sum <= self.total_bytes)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// At most `window` entries; forward outputs held up to `output_bytes` in
/// this log (older outputs are dropped first, the entries stay) and within
/// the server-wide total (an output that does not fit is not held: its
/// replay answers without it, as after a restart).
#[derive(Debug)]
pub struct ReplayLog {
    entries: VecDeque<(String, Replay)>,
    /// The last applied synchronized step, kept (and stored) beyond the
    /// window: older steps are refused by it.
    last_step: Option<(u64, String, Replay)>,
    limits: ReplayLimits,
    output_bytes: usize,
}

impl Drop for ReplayLog {
    fn drop(&mut self) {
        self.limits.give_back(self.output_bytes);
    }
}

impl ReplayLog {
    pub fn new(limits: &ReplayLimits) -> Self {
        ReplayLog {
            entries: VecDeque::new(),
            last_step: None,
            limits: limits.clone(),
            output_bytes: 0,
        }
    }

    /// A log holding the ids of a stored record.
    pub fn recovered(limits: &ReplayLimits, stored: &[RecentRequest]) -> Result<Self, RecordError> {
        let mut log = ReplayLog::new(limits);
        for request in stored {
            let Some(call) = Call::from_name(&request.call) else {
                return Err(RecordError::Corrupt(format!(
                    "request id {:?} names an unknown call {:?}",
                    request.request_id, request.call
                )));
            };
            log.record(Replayable {
                request_id: request.request_id.clone(),
                replay: Replay::Recovered {
                    call,
                    version: request.version,
                    num_batches_tracked: request.num_batches_tracked,
                },
            });
        }
        Ok(log)
    }

    pub fn find(&self, request_id: &str) -> Option<&Replay> {
        self.entries
            .iter()
            .rev()
            .find(|(id, _)| id == request_id)
            .map(|(_, r)| r)
            .or_else(|| {
                self.last_step
                    .as_ref()
                    .filter(|(_, id, _)| id == request_id)
                    .map(|(_, _, r)| r)
            })
    }

    /// The last applied synchronized step, if any.
    pub fn last_step(&self) -> Option<u64> {
        self.last_step.as_ref().map(|(step, _, _)| *step)
    }

    /// The ids to store, oldest first, with `next` appended (the mutation
    /// about to be committed), trimmed to the window.
    pub fn stored_with(&self, next: Option<&Replayable>) -> Vec<RecentRequest> {
        let mut out: Vec<RecentRequest> = self
            .entries
            .iter()
            .map(|(id, replay)| replay.recent(id))
            .chain(next.map(|next| next.replay.recent(&next.request_id)))
            .collect();
        let excess = out.len().saturating_sub(self.limits.window);
        out.drain(..excess);
        // The last step outlives the window: it is what refuses older steps
        // after a restart.
        let last_step = next
            .filter(|next| step_of_key(&next.request_id).is_some())
            .map(|next| next.replay.recent(&next.request_id))
            .or_else(|| self.last_step.as_ref().map(|(_, id, r)| r.recent(id)));
        if let Some(last) = last_step {
            if !out.iter().any(|r| r.request_id == last.request_id) {
                out.insert(0, last);
            }
        }
        out
    }

    pub fn record(&mut self, entry: Replayable) {
        let Replayable {
            request_id,
            mut replay,
        } = entry;
        if replay.call() == Call::Step {
            if let Some(step) = step_of_key(&request_id) {
                if self.last_step().is_none_or(|last| step > last) {
                    self.last_step = Some((step, request_id.clone(), replay.clone()));
                }
            }
        }
        if self.limits.window == 0 {
            return;
        }
        if replay.output_bytes() > self.limits.output_bytes {
            drop_output(&mut replay);
        }
        while self.entries.len() >= self.limits.window {
            if let Some((_, old)) = self.entries.pop_front() {
                self.release(old.output_bytes());
            }
        }
        // Drop this log's oldest outputs until the new one fits in it.
        let incoming = replay.output_bytes();
        for (_, old) in self.entries.iter_mut() {
            if self.output_bytes + incoming <= self.limits.output_bytes {
                break;
            }
            let bytes = old.output_bytes();
            drop_output(old);
            self.output_bytes -= bytes;
            self.limits.give_back(bytes);
        }
        if self.limits.take(incoming) {
            self.output_bytes += incoming;
        } else {
            drop_output(&mut replay);
        }
        self.entries.push_back((request_id, replay));
    }

    fn release(&mut self, bytes: usize) {
        self.output_bytes -= bytes;
        self.limits.give_back(bytes);
    }
}

/// Forgets a forward output (the entry stays: a replay answers without it).
fn drop_output(replay: &mut Replay) {
    if let Replay::Forward(outcome) = replay {
        outcome.output = None;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::numerics::{DType, TensorData};

    /// A forward answer whose output is `n` float32 values (4n bytes).
    fn forward(n: usize) -> Replay {
        let values = vec![1.0f32; n];
        let output =
            TensorData::from_f32("output", DType::Float32, vec![n as i64], &values, u64::MAX);
        Replay::Forward(ForwardOutcome {
            output: Some(output.unwrap()),
            version: 2,
            num_batches_tracked: 1,
            replayed: false,
        })
    }

    fn held_output(log: &ReplayLog, id: &str) -> bool {
        matches!(log.find(id), Some(Replay::Forward(o)) if o.output.is_some())
    }

    fn record(log: &mut ReplayLog, id: &str, n: usize) {
        log.record(Replayable {
            request_id: id.into(),
            replay: forward(n),
        });
    }

    #[test]
    fn outputs_are_held_within_the_server_wide_total_and_given_back_with_their_log() {
        // 100 bytes per log, 160 in all: two logs of 25 floats (100 bytes) do
        // not fit together.
        let limits = ReplayLimits::new(8, 100, 160);
        let mut a = ReplayLog::new(&limits);
        let mut b = ReplayLog::new(&limits);
        record(&mut a, "a1", 25);
        record(&mut b, "b1", 25);
        assert!(held_output(&a, "a1"));
        // Not held, but still known: its retry is a replay without output.
        assert!(!held_output(&b, "b1") && b.find("b1").is_some());
        assert_eq!(limits.held.load(Ordering::Relaxed), 100);
        drop(a);
        assert_eq!(limits.held.load(Ordering::Relaxed), 0);
        record(&mut b, "b2", 25);
        assert!(held_output(&b, "b2"));
        // Within one log the oldest output makes room for the newest.
        record(&mut b, "b3", 20);
        assert!(held_output(&b, "b3") && !held_output(&b, "b2"));
        assert_eq!(limits.held.load(Ordering::Relaxed), 80);
    }
}
