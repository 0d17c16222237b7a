//! Recent request ids of one session and the results they produced, so that
//! a retried mutation is answered from memory instead of applied twice. The
//! ids (not the outputs) are also stored with the session's record, so they
//! survive a restart.
//!
//! The results held (forward outputs, and the snapshots Reset,
//! UpdateParameters and ImportState answer with) are capped three ways: per
//! log, by the server-wide replay total, and by the memory budget (charged
//! as replay caches). A result that does not fit is not held: its retry is
//! answered as after a restart, and is still never applied twice.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::durable::{RecentRequest, RecordError};
use super::synced::StepApplied;
use super::{ForwardOutcome, SessionSnapshot};
use crate::memory::{Charge, Kind, MemoryBudget};

/// The mutating calls a request id can be applied by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Forward,
    ResetRunningStats,
    UpdateParameters,
    ImportState,
    MergeSession,
    /// A synchronized step (Forward with a step, or ReduceStatistics): one
    /// entry per step, under the key [`step_key`].
    Step,
}

impl Call {
    const ALL: [Call; 6] = [
        Call::Forward,
        Call::ResetRunningStats,
        Call::UpdateParameters,
        Call::ImportState,
        Call::MergeSession,
        Call::Step,
    ];

    /// The RPC's name: in error texts and in stored records.
    pub fn name(self) -> &'static str {
        match self {
            Call::Forward => "Forward",
            Call::ResetRunningStats => "ResetRunningStats",
            Call::UpdateParameters => "UpdateParameters",
            Call::ImportState => "ImportState",
            Call::MergeSession => "MergeSession",
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

    /// Bytes of the result held: a forward output or a snapshot's tensors.
    fn output_bytes(&self) -> usize {
        match self {
            Replay::Forward(outcome) => outcome.output.as_ref().map_or(0, |o| o.bytes().len()),
            Replay::Snapshot(snapshot, _) => snapshot.tensor_bytes(),
            // A step's answers are per-channel statistics (a few numbers per
            // channel), recomputed into outputs on a retry.
            Replay::Recovered { .. } | Replay::Step(_) => 0,
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
/// `output_bytes` of results per session, and `total_bytes` of results over
/// all sessions together (counted in `held`, shared by every log), all of it
/// within the server's memory `budget`.
#[derive(Debug, Clone)]
pub struct ReplayLimits {
    pub window: usize,
    pub output_bytes: usize,
    pub total_bytes: usize,
    held: Arc<AtomicUsize>,
    budget: Arc<MemoryBudget>,
}

impl ReplayLimits {
    pub fn new(
        window: usize,
        output_bytes: usize,
        total_bytes: usize,
        budget: Arc<MemoryBudget>,
    ) -> ReplayLimits {
        ReplayLimits {
            window,
            output_bytes,
            total_bytes,
            held: Arc::new(AtomicUsize::new(0)),
            budget,
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

/// At most `window` entries; results held up to `output_bytes` in this log
/// (older results are dropped first, the entries stay), within the
/// server-wide total and the memory budget (a result that does not fit is
/// not held: its replay answers without it, as after a restart).
#[derive(Debug)]
pub struct ReplayLog {
    entries: VecDeque<(String, Replay)>,
    /// The last applied synchronized step, kept (and stored) beyond the
    /// window: older steps are refused by it.
    last_step: Option<(u64, String, Replay)>,
    limits: ReplayLimits,
    output_bytes: usize,
    /// `output_bytes`, charged to the memory budget (given back on drop).
    charge: Charge,
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
            charge: limits.budget.empty(Kind::ReplayCaches),
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

    /// The last synchronized step's answer, when `request_id` sent it.
    fn last_step_replay(&self, request_id: &str) -> Option<&Replay> {
        self.last_step
            .as_ref()
            .filter(|(_, id, _)| id == request_id)
            .map(|(_, _, r)| r)
    }

    /// The largest forward output this log would hold for a replay (0
    /// without a window): a larger one is dropped as it is recorded.
    pub fn output_cap(&self) -> usize {
        if self.limits.window == 0 {
            0
        } else {
            self.limits.output_bytes
        }
    }

    pub fn find(&self, request_id: &str) -> Option<&Replay> {
        self.entries
            .iter()
            .rev()
            .find(|(id, _)| id == request_id)
            .map(|(_, r)| r)
            .or_else(|| self.last_step_replay(request_id))
    }

    /// What [`find`](Self::find) would answer once `pending` (mutations
    /// computed but not committed yet, oldest first) were recorded: the
    /// newest entries within the window, `pending` included.
    pub fn find_after<'a>(
        &'a self,
        pending: &'a [Replayable],
        request_id: &str,
    ) -> Option<&'a Replay> {
        let window = self.limits.window;
        let kept_pending = pending.len().min(window);
        pending[pending.len() - kept_pending..]
            .iter()
            .rev()
            .find(|entry| entry.request_id == request_id)
            .map(|entry| &entry.replay)
            .or_else(|| {
                self.entries
                    .iter()
                    .rev()
                    .take(window - kept_pending)
                    .find(|(id, _)| id == request_id)
                    .map(|(_, r)| r)
            })
            .or_else(|| self.last_step_replay(request_id))
    }

    /// The last applied synchronized step, if any.
    pub fn last_step(&self) -> Option<u64> {
        self.last_step.as_ref().map(|(step, _, _)| *step)
    }

    /// The ids to store, oldest first, with `next` appended (the mutations
    /// about to be committed, oldest first), trimmed to the window.
    pub fn stored_with(&self, next: &[Replayable]) -> Vec<RecentRequest> {
        let mut out: Vec<RecentRequest> = self
            .entries
            .iter()
            .map(|(id, replay)| replay.recent(id))
            .chain(next.iter().map(|next| next.replay.recent(&next.request_id)))
            .collect();
        let excess = out.len().saturating_sub(self.limits.window);
        out.drain(..excess);
        // The last step outlives the window: it is what refuses older steps
        // after a restart.
        let last_step = next
            .iter()
            .rev()
            .find(|next| step_of_key(&next.request_id).is_some())
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
            self.charge.shrink(bytes as u64);
        }
        if !self.take(incoming) {
            drop_output(&mut replay);
        }
        self.entries.push_back((request_id, replay));
    }

    /// Holds `bytes` more, if the server-wide total and the budget allow.
    fn take(&mut self, bytes: usize) -> bool {
        if !self.limits.take(bytes) {
            return false;
        }
        if self.charge.try_grow(bytes as u64).is_err() {
            self.limits.give_back(bytes);
            return false;
        }
        self.output_bytes += bytes;
        true
    }

    fn release(&mut self, bytes: usize) {
        self.output_bytes -= bytes;
        self.limits.give_back(bytes);
        self.charge.shrink(bytes as u64);
    }
}

/// Forgets a held result (the entry stays: a replay answers as after a
/// restart, from the call and the position it produced).
fn drop_output(replay: &mut Replay) {
    match replay {
        Replay::Forward(outcome) => outcome.output = None,
        Replay::Snapshot(snapshot, call) => {
            *replay = Replay::Recovered {
                call: *call,
                version: snapshot.version,
                num_batches_tracked: snapshot.num_batches_tracked,
            }
        }
        Replay::Recovered { .. } | Replay::Step(_) => {}
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
            written: false,
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
        let limits = ReplayLimits::new(8, 100, 160, MemoryBudget::unlimited());
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

    #[test]
    fn ids_not_committed_yet_are_found_as_the_window_will_hold_them() {
        let limits = ReplayLimits::new(2, 1 << 20, 1 << 20, MemoryBudget::unlimited());
        let mut log = ReplayLog::new(&limits);
        record(&mut log, "old", 1);
        record(&mut log, "kept", 1);
        let pending = |id: &str| Replayable {
            request_id: id.into(),
            replay: forward(1),
        };
        let one = [pending("a")];
        assert!(log.find_after(&one, "a").is_some());
        assert!(log.find_after(&one, "kept").is_some());
        // Recording `a` will push `old` out of the window of two.
        assert!(log.find_after(&one, "old").is_none());
        let three = [pending("a"), pending("b"), pending("c")];
        assert!(log.find_after(&three, "a").is_none());
        assert!(log.find_after(&three, "b").is_some() && log.find_after(&three, "c").is_some());
        assert!(log.find_after(&three, "kept").is_none());
        // With no window nothing is remembered, committed or not.
        let none = ReplayLimits::new(0, 1 << 20, 1 << 20, MemoryBudget::unlimited());
        assert!(ReplayLog::new(&none).find_after(&one, "a").is_none());
    }

    #[test]
    fn held_outputs_are_charged_to_the_memory_budget_which_caps_them_too() {
        // The replay caps allow 100 bytes; the budget has room for 60.
        let budget = MemoryBudget::new(160);
        let _sessions = budget.try_charge(100, Kind::Sessions).unwrap();
        let limits = ReplayLimits::new(8, 100, 100, budget.clone());
        let mut log = ReplayLog::new(&limits);
        record(&mut log, "a", 10);
        assert!(held_output(&log, "a"));
        assert_eq!(budget.charged_for(Kind::ReplayCaches), 40);
        // 40 more bytes would take the budget to 180: not held, still known.
        record(&mut log, "b", 10);
        assert!(!held_output(&log, "b") && log.find("b").is_some());
        assert_eq!(budget.charged_for(Kind::ReplayCaches), 40);
        assert_eq!(limits.held.load(Ordering::Relaxed), 40);
        drop(log);
        assert_eq!(budget.charged_for(Kind::ReplayCaches), 0);
        assert_eq!(limits.held.load(Ordering::Relaxed), 0);
    }
}
