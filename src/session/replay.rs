//! Recent request ids of one session and the results they produced, so that
//! a retried mutation is answered from memory instead of applied twice. The
//! ids (not the outputs) are also stored with the session's record, so they
//! survive a restart.

use std::collections::VecDeque;

use super::durable::RecentRequest;
use super::{ForwardOutcome, SessionSnapshot};

/// The remembered result of one applied mutation.
#[derive(Debug, Clone)]
pub enum Replay {
    Forward(ForwardOutcome),
    /// Reset, UpdateParameters and ImportState answer with the session.
    Snapshot(Box<SessionSnapshot>, &'static str),
    /// Known from the stored record only (the process restarted or another
    /// replica applied it): the call and the version it produced.
    Recovered {
        call: &'static str,
        version: u64,
        num_batches_tracked: i64,
    },
}

pub const FORWARD: &str = "Forward";
pub const RESET: &str = "ResetRunningStats";
pub const UPDATE: &str = "UpdateParameters";
pub const IMPORT: &str = "ImportState";

fn call_name(stored: &str) -> &'static str {
    match stored {
        RESET => RESET,
        UPDATE => UPDATE,
        IMPORT => IMPORT,
        _ => FORWARD,
    }
}

impl Replay {
    pub fn call_name(&self) -> &'static str {
        match self {
            Replay::Forward(_) => FORWARD,
            Replay::Snapshot(_, call) | Replay::Recovered { call, .. } => call,
        }
    }

    fn version(&self) -> (u64, i64) {
        match self {
            Replay::Forward(o) => (o.version, o.num_batches_tracked),
            Replay::Snapshot(s, _) => (s.version, s.num_batches_tracked),
            Replay::Recovered {
                version,
                num_batches_tracked,
                ..
            } => (*version, *num_batches_tracked),
        }
    }

    fn output_bytes(&self) -> usize {
        match self {
            Replay::Forward(outcome) => outcome.output.as_ref().map_or(0, |o| o.bytes().len()),
            Replay::Snapshot(..) | Replay::Recovered { .. } => 0,
        }
    }
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
    pub fn recovered(window: usize, output_budget: usize, stored: &[RecentRequest]) -> Self {
        let mut log = ReplayLog::new(window, output_budget);
        for request in stored {
            log.record(
                request.request_id.clone(),
                Replay::Recovered {
                    call: call_name(&request.call),
                    version: request.version,
                    num_batches_tracked: request.num_batches_tracked,
                },
            );
        }
        log
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
    pub fn stored_with(&self, next: Option<(&str, &'static str, u64, i64)>) -> Vec<RecentRequest> {
        let mut out: Vec<RecentRequest> = self
            .entries
            .iter()
            .map(|(id, replay)| {
                let (version, num_batches_tracked) = replay.version();
                RecentRequest {
                    request_id: id.clone(),
                    call: replay.call_name().to_owned(),
                    version,
                    num_batches_tracked,
                }
            })
            .collect();
        if let Some((id, call, version, num_batches_tracked)) = next {
            out.push(RecentRequest {
                request_id: id.to_owned(),
                call: call.to_owned(),
                version,
                num_batches_tracked,
            });
        }
        let excess = out.len().saturating_sub(self.window);
        out.drain(..excess);
        out
    }

    pub fn record(&mut self, request_id: String, mut replay: Replay) {
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
