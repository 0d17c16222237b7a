//! Recent request ids of one session and the results they produced, so that
//! a retried mutation is answered from memory instead of applied twice. The
//! ids (not the outputs) are also stored with the session's record, so they
//! survive a restart.

use std::collections::VecDeque;

use super::durable::{RecentRequest, RecordError};
use super::{ForwardOutcome, SessionSnapshot};

/// The mutating calls a request id can be applied by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Forward,
    ResetRunningStats,
    UpdateParameters,
    ImportState,
}

impl Call {
    const ALL: [Call; 4] = [
        Call::Forward,
        Call::ResetRunningStats,
        Call::UpdateParameters,
        Call::ImportState,
    ];

    /// The RPC's name: in error texts and in stored records.
    pub fn name(self) -> &'static str {
        match self {
            Call::Forward => "Forward",
            Call::ResetRunningStats => "ResetRunningStats",
            Call::UpdateParameters => "UpdateParameters",
            Call::ImportState => "ImportState",
        }
    }

    /// The call a stored record names; `None` for a name this build does not
    /// write (the record is then corrupt: guessing would replay the wrong call).
    pub fn from_name(name: &str) -> Option<Call> {
        Call::ALL.into_iter().find(|call| call.name() == name)
    }
}

/// The remembered result of one applied mutation.
#[derive(Debug, Clone)]
pub enum Replay {
    Forward(ForwardOutcome),
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
            Replay::Snapshot(_, call) | Replay::Recovered { call, .. } => *call,
        }
    }

    /// The stored form of this entry under `request_id`.
    pub fn recent(&self, request_id: &str) -> RecentRequest {
        let (version, num_batches_tracked) = match self {
            Replay::Forward(o) => (o.version, o.num_batches_tracked),
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
            Replay::Snapshot(..) | Replay::Recovered { .. } => 0,
        }
    }
}

/// A request id and the result it produced, about to be remembered.
#[derive(Debug, Clone)]
pub struct Replayable {
    pub request_id: String,
    pub replay: Replay,
}

/// At most `window` entries; forward outputs held up to `output_budget` bytes
/// in all (older outputs are dropped first, the entries stay).
#[derive(Debug)]
pub struct ReplayLog {
    entries: VecDeque<(String, Replay)>,
    window: usize,
    output_budget: usize,
    output_bytes: usize,
}

impl ReplayLog {
    pub fn new(window: usize, output_budget: usize) -> Self {
        ReplayLog {
            entries: VecDeque::new(),
            window,
            output_budget,
            output_bytes: 0,
        }
    }

    /// A log holding the ids of a stored record.
    pub fn recovered(
        window: usize,
        output_budget: usize,
        stored: &[RecentRequest],
    ) -> Result<Self, RecordError> {
        let mut log = ReplayLog::new(window, output_budget);
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
        let excess = out.len().saturating_sub(self.window);
        out.drain(..excess);
        out
    }

    pub fn record(&mut self, entry: Replayable) {
        let Replayable {
            request_id,
            mut replay,
        } = entry;
        if self.window == 0 {
            return;
        }
        if replay.output_bytes() > self.output_budget {
            if let Replay::Forward(outcome) = &mut replay {
                outcome.output = None;
            }
        }
        while self.entries.len() >= self.window {
            if let Some((_, old)) = self.entries.pop_front() {
                self.output_bytes -= old.output_bytes();
            }
        }
        self.output_bytes += replay.output_bytes();
        self.entries.push_back((request_id, replay));
        // Drop the oldest outputs until the budget holds again.
        for (_, old) in self.entries.iter_mut() {
            if self.output_bytes <= self.output_budget {
                break;
            }
            if let Replay::Forward(outcome) = old {
                if let Some(output) = outcome.output.take() {
                    self.output_bytes -= output.bytes().len();
                }
            }
        }
    }
}
