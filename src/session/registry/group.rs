//! Forwards answered as a group (the messages a stream has already received):
//! the group is split by session, keeping each session's order; each
//! session's Forwards are one mutation (its lock taken once, each step
//! computed on the state the ones before it left, ONE record holding every
//! applied request id written with one compare-and-set, then swapped in), and
//! the sessions' mutations run side by side, so the embedded store commits
//! their records in one transaction. Every answer waits for its session's
//! commit: nothing is answered that is not durable.
//!
//! A Forward's own error answers that Forward only; a failure of the whole
//! mutation (the session unknown or unreadable, the store write failed, the
//! deadline passed) answers each Forward of that session with it, and
//! changes nothing. With a shared store a lost compare-and-set recomputes the
//! whole group from the other replica's state, as any mutation does.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use super::Registry;
use crate::compute::ComputeError;
use crate::memory::{charge_unless_large, Charge, Kind};
use crate::session::steps::forward_group_step;
use crate::session::{Forward, ForwardOutcome, SessionError, SessionId};

/// One session's Forwards of a group: their places in the group, in order.
struct SessionRun {
    id: SessionId,
    places: Vec<usize>,
    commands: Vec<Forward>,
    /// Each output's charge, held until the answers are handed back.
    charges: Vec<Charge>,
}

impl Registry {
    /// Answers `commands` (Forwards without a synchronized step), one result
    /// per command in their order, with every session's Forwards applied in
    /// order and committed once; see the module docs.
    pub async fn forward_group(
        &self,
        commands: Vec<Forward>,
    ) -> Vec<Result<ForwardOutcome, SessionError>> {
        let mut answers: Vec<Option<Result<ForwardOutcome, SessionError>>> =
            (0..commands.len()).map(|_| None).collect();
        let mut runs: Vec<SessionRun> = Vec::new();
        for (place, command) in commands.into_iter().enumerate() {
            // The output is the input's size: charged before it is computed
            // (as a single Forward's), and refused alone when it does not fit.
            let bytes = command.input.byte_size() as u64;
            let charge =
                match charge_unless_large(&self.options.memory_budget, bytes, Kind::Replies) {
                    Ok(charge) => charge,
                    Err(refused) => {
                        answers[place] = Some(Err(refused.into()));
                        continue;
                    }
                };
            let run = match runs.iter_mut().position(|run| run.id == command.id) {
                Some(at) => &mut runs[at],
                None => {
                    runs.push(SessionRun {
                        id: command.id.clone(),
                        places: Vec::new(),
                        commands: Vec::new(),
                        charges: Vec::new(),
                    });
                    let last = runs.len() - 1;
                    &mut runs[last]
                }
            };
            run.places.push(place);
            run.commands.push(command);
            run.charges.push(charge);
        }
        let applied = join_all(runs.into_iter().map(|run| self.forward_run(run))).await;
        for (places, results) in applied {
            for (place, result) in places.into_iter().zip(results) {
                answers[place] = Some(result);
            }
        }
        answers
            .into_iter()
            .map(|answer| {
                // Every place is answered above, refused or by its session's
                // run: a missing answer would be a bug here, never the client's.
                answer.unwrap_or_else(|| {
                    Err(ComputeError::JobFailed("a grouped forward was not answered".into()).into())
                })
            })
            .collect()
    }

    /// One session's Forwards as one mutation: their places and answers.
    async fn forward_run(
        &self,
        run: SessionRun,
    ) -> (Vec<usize>, Vec<Result<ForwardOutcome, SessionError>>) {
        let SessionRun {
            id,
            places,
            commands,
            charges,
        } = run;
        let count = commands.len();
        let input_bytes = commands.iter().map(|c| c.input.byte_size()).sum();
        let stats = self.options.stats_kernel;
        let results = self
            .mutate(&id, input_bytes, move |info, state| {
                forward_group_step(info, state, &commands, stats)
            })
            .await;
        drop(charges);
        let results = match results {
            Ok(results) => results,
            Err(error) => vec![Err(error); count],
        };
        (places, results)
    }
}

/// Runs `futures` side by side (on this task) and returns their outputs in
/// their order.
async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all_done = true;
        for (future, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
