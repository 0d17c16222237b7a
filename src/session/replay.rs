//! Recent request ids of one session and the results they produced, so that
//! a retried mutation is answered from memory instead of applied twice.

use std::collections::VecDeque;

use super::{ForwardOutcome, SessionSnapshot};

/// The stored result of one applied mutation.
#[derive(Debug, Clone)]
pub enum Replay {
    Forward(ForwardOutcome),
    /// Reset, UpdateParameters and ImportState answer with the session.
    Snapshot(Box<SessionSnapshot>, &'static str),
}

impl Replay {
    pub fn call_name(&self) -> &'static str {
        match self {
            Replay::Forward(_) => "Forward",
            Replay::Snapshot(_, call) => call,
        }
    }

    fn output_bytes(&self) -> usize {
        match self {
            Replay::Forward(outcome) => outcome.output.as_ref().map_or(0, |o| o.bytes().len()),
            Replay::Snapshot(..) => 0,
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

    pub fn find(&self, request_id: &str) -> Option<&Replay> {
        self.entries
            .iter()
            .rev()
            .find(|(id, _)| id == request_id)
            .map(|(_, r)| r)
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
