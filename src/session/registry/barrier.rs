//! The rendezvous of synchronized steps: the ranks of one (session, step,
//! phase) wait here until all `world_size` of them have arrived, then the
//! last one to arrive starts the step's one commit and every rank receives
//! its outcome. Only each rank's per-channel statistics are held here (three
//! float64 numbers per channel); the shards stay with the requests that
//! carry them, so an open step holds no copy of anyone's tensor.
//!
//! Failure is all or nothing: at the step's deadline every waiting rank is
//! answered ABORTED naming the ranks that are missing; a rank whose request
//! is invalid fails the step for the others (ABORTED naming it). A step
//! failed by an invalid rank leaves a tombstone so that ranks of that attempt
//! arriving later are told too, while a rank that was already told starts a
//! new attempt (its retry). A waiting request that goes away (client disconnect, deadline)
//! withdraws its arrival: it counts as missing.
//!
//! While the commit is being made durable, the completing rank may publish
//! a preview (`P`: what the ranks can compute from before the commit is
//! acknowledged, e.g. the step's per-channel transform), so that the ranks'
//! own work overlaps the store's write instead of following it. A preview is
//! never an answer: only the outcome is.
//!
//! No session state, no I/O: the registry commits (`synced`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::numerics::merge_stats::ShardStats;
use crate::session::SessionId;

/// Server-wide bounds on open steps (RESOURCE_EXHAUSTED beyond them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    /// Largest world_size a step may have.
    pub max_world_size: u32,
    /// Steps waiting for ranks at once, all sessions together.
    pub max_open_steps: usize,
    /// Bytes of shards held by waiting Forward ranks, all steps together.
    pub max_waiting_bytes: u64,
}

/// Which reduction of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The forward statistics (and the step's one commit).
    Forward,
    /// The backward sums; commits nothing.
    Backward,
}

/// What one rank brings to a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Contribution {
    Forward {
        stats: ShardStats,
        /// The shard's shape, for the global batch's shape in messages
        /// (None from ReduceStatistics).
        shape: Option<Vec<i64>>,
        /// Apply the running-statistics update; every rank must agree.
        update_running_stats: bool,
    },
    Backward {
        sum_grad_output: Vec<f64>,
        sum_grad_output_centered: Vec<f64>,
    },
}

impl Contribution {
    /// Moves the values out for the commit, leaving what later arrivals of
    /// the step are still compared with (`agrees`: the kind, the flag, the
    /// shape): the step's statistics are not copied while its lock is held.
    fn take_values(&mut self) -> Contribution {
        let hollow = match self {
            Contribution::Forward {
                shape,
                update_running_stats,
                ..
            } => Contribution::Forward {
                stats: ShardStats {
                    count: 0,
                    mean: Vec::new(),
                    m2: Vec::new(),
                },
                shape: shape.clone(),
                update_running_stats: *update_running_stats,
            },
            Contribution::Backward { .. } => Contribution::Backward {
                sum_grad_output: Vec::new(),
                sum_grad_output_centered: Vec::new(),
            },
        };
        std::mem::replace(self, hollow)
    }
}

/// Whether `arrived` (a rank's arrival held by the step) may be the same
/// data as `again` (that rank once more), by their values, bit for bit.
/// The fingerprints are compared too, but they are CRC-32: data made to
/// collide must still carry the arrival's exact statistics, and then it
/// makes the same step. Once the step is committing its values have been
/// taken (hollow), and the fingerprint alone decides.
fn same_values(arrived: &Contribution, again: &Contribution) -> bool {
    let bits = |a: &[f64], b: &[f64]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    };
    match (arrived, again) {
        (Contribution::Forward { stats: a, .. }, Contribution::Forward { stats: b, .. }) => {
            a.mean.is_empty() && a.m2.is_empty()
                || a.count == b.count && bits(&a.mean, &b.mean) && bits(&a.m2, &b.m2)
        }
        (
            Contribution::Backward {
                sum_grad_output: a,
                sum_grad_output_centered: ac,
            },
            Contribution::Backward {
                sum_grad_output: b,
                sum_grad_output_centered: bc,
            },
        ) => a.is_empty() && ac.is_empty() || bits(a, b) && bits(ac, bc),
        _ => false,
    }
}

/// How a step failed, as every rank of it is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The step did not happen (a rank missing or invalid); retry it.
    Aborted(String),
    /// The global batch itself is invalid (every rank's fault alike).
    Invalid(String),
    /// The step is out of order (below the last applied one).
    Precondition(String),
    /// The commit failed for a reason of the server's (store, compute).
    Server(String),
}

/// The outcome every rank of a step receives: a value of the registry's
/// choosing (`T`), or the failure.
pub type Outcome<T> = Result<Arc<T>, Failure>;

/// One step of one session. `incarnation` (the session's creation time)
/// keeps a session deleted and created again under the same id from
/// meeting, or being committed by, the ranks that came for the old one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub session: SessionId,
    pub incarnation: i64,
    pub step: u64,
    pub phase: Phase,
}

struct Arrival {
    contribution: Contribution,
    /// Identifies the rank's data: a second arrival of the same rank is a
    /// retry only with the same fingerprint.
    fingerprint: u64,
    bytes: u64,
    /// Which waiter holds the arrival (a retry of the rank takes it over).
    holder: u64,
}

struct Open<T, P> {
    attempt: u64,
    world_size: u32,
    arrivals: Vec<Option<Arrival>>,
    arrived: u32,
    deadline: Instant,
    timeout: Duration,
    outcome: watch::Sender<Option<Outcome<T>>>,
    /// The completing rank's preview, once the commit computed it.
    preview: watch::Sender<Option<Arc<P>>>,
    /// Set once every rank arrived: the commit is running, arrivals are closed.
    committing: bool,
}

/// A failed attempt: the ranks not yet told are told when they arrive.
struct Tombstone {
    failure: Failure,
    told: Vec<bool>,
    until: Instant,
}

struct Inner<T, P> {
    open: HashMap<Key, Open<T, P>>,
    failed: HashMap<Key, Tombstone>,
    waiting_bytes: u64,
    next_id: u64,
}

pub struct Barriers<T, P> {
    limits: StepLimits,
    inner: Arc<Mutex<Inner<T, P>>>,
}

/// One rank's arrival.
pub struct Arrive {
    pub key: Key,
    pub world_size: u32,
    pub rank: u32,
    pub contribution: Contribution,
    pub fingerprint: u64,
    /// Bytes of the shard the request holds while it waits.
    pub bytes: u64,
    /// The session's step timeout.
    pub timeout: Duration,
    /// The caller's own deadline, if any: the step never waits beyond it.
    pub caller_deadline: Option<Instant>,
}

/// Why an arrival was refused at once.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    /// This rank's request is invalid (the others were told, ABORTED).
    Invalid(String),
    /// A failed attempt this rank belonged to (ABORTED).
    Failed(Failure),
    /// A server-wide limit; the step goes on without this arrival.
    Limit {
        what: &'static str,
        actual: u64,
        limit: u64,
        limit_name: &'static str,
    },
}

/// A rank inside a step.
pub enum Ticket<T, P> {
    /// Wait for the others.
    Wait(Waiter<T, P>),
    /// This rank completed the step: commit it with the contributions (in
    /// rank order) and publish the outcome with [`Completion::publish`].
    Complete(Completion<T, P>, Waiter<T, P>),
}

pub struct Completion<T, P> {
    pub contributions: Vec<Contribution>,
    key: Key,
    attempt: u64,
    inner: Arc<Mutex<Inner<T, P>>>,
}

/// Publishes a step's preview to its waiting ranks (see the module docs).
pub struct Previewer<T, P> {
    key: Key,
    attempt: u64,
    inner: Arc<Mutex<Inner<T, P>>>,
}

/// What a waiting rank learns first.
pub enum Progress<T, P> {
    /// The commit's preview; the outcome follows.
    Preview(Arc<P>),
    /// The step's outcome.
    Done(Outcome<T>),
}

pub struct Waiter<T, P> {
    key: Key,
    attempt: u64,
    rank: u32,
    /// This caller's own deadline: it stops waiting then (and counts as
    /// missing), the others wait on until the step's deadline.
    caller_deadline: Option<Instant>,
    holder: u64,
    outcome: watch::Receiver<Option<Outcome<T>>>,
    preview: watch::Receiver<Option<Arc<P>>>,
    inner: Arc<Mutex<Inner<T, P>>>,
    /// Set once the outcome was received (nothing to withdraw on drop).
    done: bool,
}

/// How long before its deadline a waiting caller gives up.
const CALLER_MARGIN: Duration = Duration::from_millis(20);

fn lock<T, P>(inner: &Mutex<Inner<T, P>>) -> MutexGuard<'_, Inner<T, P>> {
    // A panic while holding this lock would have left no half-written
    // invariant the code below relies on (every update is a few plain
    // field writes), so a poisoned lock is used as it is.
    inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn missing_ranks(arrivals: &[Option<Arrival>]) -> String {
    let missing: Vec<String> = arrivals
        .iter()
        .enumerate()
        .filter(|(_, a)| a.is_none())
        .map(|(rank, _)| rank.to_string())
        .collect();
    let list = if missing.len() > 16 {
        format!(
            "{} and {} more",
            missing[..16].join(", "),
            missing.len() - 16
        )
    } else {
        missing.join(", ")
    };
    format!("rank{} {list}", if missing.len() == 1 { "" } else { "s" })
}

impl<T: Send + Sync + 'static, P: Send + Sync + 'static> Inner<T, P> {
    /// Ends an open attempt with `failure`: its waiters are answered, the
    /// ranks not yet told will be when they arrive.
    /// With `told_now` (the rank whose invalid request failed it) a
    /// tombstone tells the ranks of the attempt that arrive later; a timeout
    /// leaves none (a rank arriving late simply opens the next attempt, which
    /// the others join when they retry).
    fn fail(&mut self, key: &Key, failure: Failure, told_now: Option<u32>) {
        let Some(open) = self.open.remove(key) else {
            return;
        };
        let mut told: Vec<bool> = open.arrivals.iter().map(Option::is_some).collect();
        if let Some(rank) = told_now.and_then(|r| told.get_mut(r as usize)) {
            *rank = true;
        }
        self.release(&open);
        open.outcome.send_replace(Some(Err(failure.clone())));
        if told_now.is_some() && told.iter().any(|t| !t) {
            self.failed.insert(
                key.clone(),
                Tombstone {
                    failure,
                    told,
                    until: Instant::now() + open.timeout,
                },
            );
        }
    }

    /// See [`Barriers::fail_invalid`].
    fn fail_invalid(
        &mut self,
        key: &Key,
        rank: u32,
        world_size: u32,
        reason: &str,
        linger: Duration,
        max_world_size: u32,
    ) {
        let failure = Failure::Aborted(format!(
            "step {} failed: rank {rank} sent an invalid request ({reason}); nothing was applied",
            key.step
        ));
        match self.open.get(key) {
            Some(open) if !open.committing => self.fail(key, failure, Some(rank)),
            Some(_) => {}
            // No attempt open yet: the ranks of this world_size that arrive
            // later are told.
            None if world_size >= 1 && world_size <= max_world_size => {
                let mut told = vec![false; world_size as usize];
                if let Some(slot) = told.get_mut(rank as usize) {
                    *slot = true;
                }
                self.failed.insert(
                    key.clone(),
                    Tombstone {
                        failure,
                        told,
                        until: Instant::now() + linger,
                    },
                );
            }
            None => {}
        }
    }

    fn release(&mut self, open: &Open<T, P>) {
        let bytes: u64 = open.arrivals.iter().flatten().map(|a| a.bytes).sum();
        self.waiting_bytes = self.waiting_bytes.saturating_sub(bytes);
    }

    /// A tombstone's word for `rank`, once.
    fn told(&mut self, key: &Key, rank: u32) -> Option<Failure> {
        let now = Instant::now();
        self.failed.retain(|_, t| t.until > now);
        let tombstone = self.failed.get_mut(key)?;
        let slot = tombstone.told.get_mut(rank as usize)?;
        if *slot {
            return None; // already told: this is its retry
        }
        *slot = true;
        let failure = tombstone.failure.clone();
        if tombstone.told.iter().all(|t| *t) {
            self.failed.remove(key);
        }
        Some(failure)
    }
}

impl<T: Send + Sync + 'static, P: Send + Sync + 'static> Barriers<T, P> {
    pub fn new(limits: StepLimits) -> Self {
        Barriers {
            limits,
            inner: Arc::new(Mutex::new(Inner {
                open: HashMap::new(),
                failed: HashMap::new(),
                waiting_bytes: 0,
                next_id: 0,
            })),
        }
    }

    /// Steps open now (waiting or committing), and the shard bytes waiting.
    #[cfg(test)]
    pub fn load(&self) -> (usize, u64) {
        let inner = lock(&self.inner);
        (inner.open.len(), inner.waiting_bytes)
    }

    /// Fails the attempt of `key` because `rank` sent an invalid request
    /// (`reason`; that rank is answered by its caller): the ranks waiting are
    /// answered, and the others of a `world_size` step are told when they
    /// arrive within `linger`.
    pub fn fail_invalid(
        &self,
        key: &Key,
        rank: u32,
        world_size: u32,
        reason: &str,
        linger: Duration,
    ) {
        let mut inner = lock(&self.inner);
        inner.fail_invalid(
            key,
            rank,
            world_size,
            reason,
            linger,
            self.limits.max_world_size,
        );
    }

    /// Ends every waiting attempt of `session` (any incarnation) with
    /// `failure` and forgets its failed ones: the session is gone, its
    /// ranks are told now instead of at their timeout. An attempt already
    /// committing is left to its commit, which finds the session gone.
    pub fn abort_session(&self, session: &SessionId, failure: &Failure) {
        let mut inner = lock(&self.inner);
        let keys: Vec<Key> = inner
            .open
            .iter()
            .filter(|(key, open)| key.session == *session && !open.committing)
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            inner.fail(&key, failure.clone(), None);
        }
        inner.failed.retain(|key, _| key.session != *session);
    }

    /// Places a rank in its step.
    pub fn arrive(&self, arrive: Arrive) -> Result<Ticket<T, P>, Refused> {
        let Arrive {
            key,
            world_size,
            rank,
            contribution,
            fingerprint,
            bytes,
            timeout,
            caller_deadline,
        } = arrive;
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        if world_size == 0 || world_size > self.limits.max_world_size || rank >= world_size {
            let reason = if rank >= world_size && world_size > 0 {
                format!("rank {rank} is not below world_size {world_size}")
            } else {
                format!(
                    "world_size must be 1 to {} (--max-world-size), got {world_size}",
                    self.limits.max_world_size
                )
            };
            inner.fail_invalid(
                &key,
                rank,
                world_size,
                &reason,
                timeout,
                self.limits.max_world_size,
            );
            return Err(Refused::Invalid(reason));
        }
        if let Some(failure) = inner.told(&key, rank) {
            return Err(Refused::Failed(failure));
        }
        let deadline = Instant::now() + timeout;
        // A caller's deadline ends its own wait a little before the
        // transport answers DEADLINE_EXCEEDED, so that it hears why.
        let caller_deadline = caller_deadline.map(|d| d.checked_sub(CALLER_MARGIN).unwrap_or(d));
        if !inner.open.contains_key(&key) {
            if inner.open.len() >= self.limits.max_open_steps {
                return Err(Refused::Limit {
                    what: "open synchronized steps",
                    actual: inner.open.len() as u64 + 1,
                    limit: self.limits.max_open_steps as u64,
                    limit_name: "--max-open-steps",
                });
            }
            inner.next_id += 1;
            let (outcome, _) = watch::channel(None);
            let (preview, _) = watch::channel(None);
            inner.open.insert(
                key.clone(),
                Open {
                    attempt: inner.next_id,
                    world_size,
                    arrivals: (0..world_size).map(|_| None).collect(),
                    arrived: 0,
                    deadline,
                    timeout,
                    outcome,
                    preview,
                    committing: false,
                },
            );
        }
        inner.next_id += 1;
        let holder = inner.next_id;
        let Some(open) = inner.open.get_mut(&key) else {
            return Err(Refused::Failed(Failure::Server(
                "the step vanished while arriving".into(),
            )));
        };
        let invalid = if open.world_size != world_size {
            Some(format!(
                "world_size {world_size} differs from the step's {} (sent by the ranks before it)",
                open.world_size
            ))
        } else {
            match (&open.arrivals[rank as usize], open.arrivals.iter().flatten().next()) {
                (Some(same), _)
                    if same.fingerprint != fingerprint
                        || !same_values(&same.contribution, &contribution) =>
                {
                    Some(format!(
                        "rank {rank} already arrived at step {} with different data",
                        key.step
                    ))
                }
                (_, Some(other)) if !agrees(&other.contribution, &contribution) => {
                    Some(format!(
                        "rank {rank} disagrees with the step's other ranks (update_running_stats, or ReduceStatistics mixed with Forward)"
                    ))
                }
                _ => None,
            }
        };
        if let Some(reason) = invalid {
            if open.committing {
                return Err(Refused::Invalid(reason));
            }
            let failure = Failure::Aborted(format!(
                "step {} failed: rank {rank} sent an invalid request ({reason}); nothing was applied",
                key.step
            ));
            inner.fail(&key, failure, Some(rank));
            return Err(Refused::Invalid(reason));
        }
        let attempt = open.attempt;
        let receiver = open.outcome.subscribe();
        let preview = open.preview.subscribe();
        let slot = &mut open.arrivals[rank as usize];
        if let Some(same) = slot {
            // The same rank again with the same data (its retry): it takes
            // the arrival over; the step does not count it twice.
            same.holder = holder;
            return Ok(Ticket::Wait(Waiter {
                key,
                attempt,
                rank,
                caller_deadline,
                holder,
                outcome: receiver,
                preview,
                inner: self.inner.clone(),
                done: false,
            }));
        }
        if open.committing {
            return Err(Refused::Failed(Failure::Aborted(format!(
                "step {} is being committed without rank {rank}",
                key.step
            ))));
        }
        let waiting = inner.waiting_bytes.saturating_add(bytes);
        if waiting > self.limits.max_waiting_bytes {
            return Err(Refused::Limit {
                what: "bytes of shards waiting in synchronized steps",
                actual: waiting,
                limit: self.limits.max_waiting_bytes,
                limit_name: "--max-step-waiting-bytes",
            });
        }
        inner.waiting_bytes = waiting;
        let Some(open) = inner.open.get_mut(&key) else {
            return Err(Refused::Failed(Failure::Server(
                "the step vanished while arriving".into(),
            )));
        };
        open.arrivals[rank as usize] = Some(Arrival {
            contribution,
            fingerprint,
            bytes,
            holder,
        });
        open.arrived += 1;
        let waiter = Waiter {
            key: key.clone(),
            attempt,
            rank,
            caller_deadline,
            holder,
            outcome: receiver,
            preview,
            inner: self.inner.clone(),
            done: false,
        };
        if open.arrived < open.world_size {
            return Ok(Ticket::Wait(waiter));
        }
        open.committing = true;
        let contributions = open
            .arrivals
            .iter_mut()
            .flatten()
            .map(|a| a.contribution.take_values())
            .collect();
        let bytes: u64 = open.arrivals.iter().flatten().map(|a| a.bytes).sum();
        inner.waiting_bytes = inner.waiting_bytes.saturating_sub(bytes);
        Ok(Ticket::Complete(
            Completion {
                contributions,
                key,
                attempt,
                inner: self.inner.clone(),
            },
            waiter,
        ))
    }
}

/// Whether two ranks' contributions can be parts of one step.
fn agrees(a: &Contribution, b: &Contribution) -> bool {
    match (a, b) {
        (
            Contribution::Forward {
                update_running_stats: ua,
                shape: sa,
                ..
            },
            Contribution::Forward {
                update_running_stats: ub,
                shape: sb,
                ..
            },
        ) => ua == ub && sa.is_some() == sb.is_some(),
        (Contribution::Backward { .. }, Contribution::Backward { .. }) => true,
        _ => false,
    }
}

impl<T: Send + Sync + 'static, P: Send + Sync + 'static> Completion<T, P> {
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// What publishes this step's preview.
    pub fn previewer(&self) -> Previewer<T, P> {
        Previewer {
            key: self.key.clone(),
            attempt: self.attempt,
            inner: self.inner.clone(),
        }
    }

    /// Answers every rank of the step and closes it.
    pub fn publish(self, outcome: Outcome<T>) {
        let mut inner = lock(&self.inner);
        if let Some(open) = inner.open.get(&self.key) {
            if open.attempt == self.attempt {
                if let Some(open) = inner.open.remove(&self.key) {
                    open.outcome.send_replace(Some(outcome));
                }
            }
        }
    }
}

impl<T: Send + Sync + 'static, P: Send + Sync + 'static> Previewer<T, P> {
    /// Tells the step's waiting ranks `value` (the latest one counts).
    pub fn send(&self, value: Arc<P>) {
        let inner = lock(&self.inner);
        if let Some(open) = inner.open.get(&self.key) {
            if open.attempt == self.attempt {
                open.preview.send_replace(Some(value));
            }
        }
    }
}

impl<T: Send + Sync + 'static, P: Send + Sync + 'static> Waiter<T, P> {
    /// The step's outcome: its commit's value, or the failure (at the
    /// step's deadline: ABORTED naming the missing ranks).
    pub async fn outcome(mut self) -> Outcome<T> {
        match self.wait(false).await {
            Progress::Done(outcome) => outcome,
            Progress::Preview(_) => Err(Failure::Server("a preview instead of the outcome".into())),
        }
    }

    /// The step's preview, or its outcome when that comes first. After a
    /// preview, [`Waiter::outcome`] gives the outcome; after an outcome, the
    /// waiter has nothing more to say (drop it).
    pub async fn progress(&mut self) -> Progress<T, P> {
        self.wait(true).await
    }

    async fn wait(&mut self, want_preview: bool) -> Progress<T, P> {
        let mut want_preview = want_preview;
        loop {
            if let Some(outcome) = self.outcome.borrow_and_update().clone() {
                self.done = true;
                return Progress::Done(outcome);
            }
            if want_preview {
                if let Some(preview) = self.preview.borrow_and_update().clone() {
                    return Progress::Preview(preview);
                }
            }
            let deadline = {
                let inner = lock(&self.inner);
                match inner.open.get(&self.key) {
                    Some(open) if open.attempt == self.attempt => {
                        (!open.committing).then_some(open.deadline)
                    }
                    // Ended (the outcome is in the channel) or replaced.
                    _ => None,
                }
            };
            let own = self
                .caller_deadline
                .filter(|own| deadline.is_some_and(|d| *own < d));
            if let Some(own) = own {
                tokio::select! {
                    changed = self.outcome.changed() => if changed.is_err() { continue },
                    changed = self.preview.changed(), if want_preview => if changed.is_err() { want_preview = false },
                    () = tokio::time::sleep_until(own.into()) => {
                        let missing = {
                            let inner = lock(&self.inner);
                            inner.open.get(&self.key).map(|open| missing_ranks(&open.arrivals))
                        };
                        // Dropping the waiter withdraws this rank's arrival.
                        return Progress::Done(Err(Failure::Aborted(format!(
                            "this call's deadline passed while step {} waited for {}; nothing was applied, and this rank no longer counts as arrived",
                            self.key.step,
                            missing.unwrap_or_else(|| "the other ranks".into())
                        ))));
                    }
                }
                continue;
            }
            let timed_out = match deadline {
                Some(deadline) => {
                    tokio::select! {
                        changed = self.outcome.changed() => changed.is_err(),
                        changed = self.preview.changed(), if want_preview => {
                            want_preview &= changed.is_ok();
                            false
                        }
                        () = tokio::time::sleep_until(deadline.into()) => true,
                    }
                }
                None => tokio::select! {
                    changed = self.outcome.changed() => changed.is_err(),
                    changed = self.preview.changed(), if want_preview => {
                        want_preview &= changed.is_ok();
                        false
                    }
                },
            };
            if timed_out {
                self.expire();
                if self.outcome.borrow().is_none() {
                    self.done = true;
                    return Progress::Done(Err(Failure::Server(
                        "the step ended without an outcome".into(),
                    )));
                }
            }
        }
    }

    /// At the deadline: fails the step unless it completed meanwhile.
    fn expire(&self) {
        let mut inner = lock(&self.inner);
        let Some(open) = inner.open.get(&self.key) else {
            return;
        };
        if open.attempt != self.attempt || open.committing || Instant::now() < open.deadline {
            return;
        }
        let failure = Failure::Aborted(format!(
            "step {} timed out after {:.3}s waiting for {} of world_size {} (the step timeout, or a caller's deadline); nothing was applied",
            self.key.step,
            open.timeout.as_secs_f64(),
            missing_ranks(&open.arrivals),
            open.world_size
        ));
        inner.fail(&self.key, failure, None);
    }
}

impl<T, P> Drop for Waiter<T, P> {
    /// A rank that stops waiting (its client went away) withdraws its
    /// arrival, unless the step is already committing.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut inner = lock(&self.inner);
        let Some(open) = inner.open.get_mut(&self.key) else {
            return;
        };
        if open.attempt != self.attempt || open.committing {
            return;
        }
        let slot = &mut open.arrivals[self.rank as usize];
        if slot.as_ref().is_some_and(|a| a.holder == self.holder) {
            let bytes = slot.take().map_or(0, |a| a.bytes);
            open.arrived -= 1;
            let empty = open.arrived == 0;
            inner.waiting_bytes = inner.waiting_bytes.saturating_sub(bytes);
            if empty {
                inner.open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn limits() -> StepLimits {
        StepLimits {
            max_world_size: 1024,
            max_open_steps: 4,
            max_waiting_bytes: 1000,
        }
    }

    fn key(step: u64) -> Key {
        Key {
            session: SessionId::parse("s").unwrap(),
            incarnation: 1,
            step,
            phase: Phase::Forward,
        }
    }

    fn arrive(step: u64, world_size: u32, rank: u32, value: f64, timeout_ms: u64) -> Arrive {
        Arrive {
            key: key(step),
            world_size,
            rank,
            contribution: Contribution::Forward {
                stats: ShardStats {
                    count: 1,
                    mean: vec![value],
                    m2: vec![0.0],
                },
                shape: None,
                update_running_stats: true,
            },
            fingerprint: value.to_bits(),
            bytes: 100,
            timeout: Duration::from_millis(timeout_ms),
            caller_deadline: None,
        }
    }

    #[tokio::test]
    async fn the_last_rank_completes_and_every_rank_gets_the_outcome_in_rank_order() {
        let barriers: Barriers<u32, u32> = Barriers::new(limits());
        let Ticket::Wait(w1) = barriers.arrive(arrive(1, 2, 1, 1.0, 60_000)).unwrap() else {
            panic!("rank 1 alone completed the step")
        };
        let Ticket::Complete(completion, w0) =
            barriers.arrive(arrive(1, 2, 0, 0.0, 60_000)).unwrap()
        else {
            panic!("rank 0 did not complete the step")
        };
        let means: Vec<f64> = completion
            .contributions
            .iter()
            .map(|c| match c {
                Contribution::Forward { stats, .. } => stats.mean[0],
                Contribution::Backward { .. } => f64::NAN,
            })
            .collect();
        assert_eq!(means, vec![0.0, 1.0]);
        completion.publish(Ok(Arc::new(7)));
        assert_eq!(*w0.outcome().await.unwrap(), 7);
        assert_eq!(*w1.outcome().await.unwrap(), 7);
        assert_eq!(barriers.load(), (0, 0));
    }

    #[tokio::test]
    async fn a_preview_reaches_the_waiting_ranks_before_the_outcome_and_is_never_the_answer() {
        let barriers: Barriers<u32, u32> = Barriers::new(limits());
        let Ticket::Wait(mut w1) = barriers.arrive(arrive(1, 2, 1, 1.0, 60_000)).unwrap() else {
            panic!("rank 1 alone completed the step")
        };
        let Ticket::Complete(completion, mut w0) =
            barriers.arrive(arrive(1, 2, 0, 0.0, 60_000)).unwrap()
        else {
            panic!("rank 0 did not complete the step")
        };
        completion.previewer().send(Arc::new(5));
        for waiter in [&mut w0, &mut w1] {
            let Progress::Preview(preview) = waiter.progress().await else {
                panic!("the outcome came before the preview")
            };
            assert_eq!(*preview, 5);
        }
        // The commit fails after its preview: every rank is told the failure.
        completion.publish(Err(Failure::Server("the store refused".into())));
        assert_eq!(
            w0.outcome().await,
            Err(Failure::Server("the store refused".into()))
        );
        assert_eq!(
            w1.outcome().await,
            Err(Failure::Server("the store refused".into()))
        );
        assert_eq!(barriers.load(), (0, 0));

        // A step that ends without a preview: progress gives the outcome.
        let Ticket::Complete(completion, mut w0) =
            barriers.arrive(arrive(2, 1, 0, 0.0, 60_000)).unwrap()
        else {
            panic!("a world_size 1 step did not complete at once")
        };
        completion.publish(Ok(Arc::new(9)));
        let Progress::Done(Ok(value)) = w0.progress().await else {
            panic!("no outcome")
        };
        assert_eq!(*value, 9);
    }

    #[tokio::test]
    async fn a_timeout_aborts_naming_the_missing_ranks_and_a_late_rank_opens_the_next_attempt() {
        let barriers: Barriers<u32, u32> = Barriers::new(limits());
        let Ticket::Wait(w0) = barriers.arrive(arrive(1, 3, 0, 0.0, 20)).unwrap() else {
            panic!()
        };
        let Err(Failure::Aborted(message)) = w0.outcome().await else {
            panic!()
        };
        assert!(message.contains("ranks 1, 2"), "{message}");
        assert_eq!(barriers.load(), (0, 0));
        // Rank 1 arrives late: it opens the next attempt, rank 0's retry
        // joins it.
        let _w1 = barriers.arrive(arrive(1, 3, 1, 1.0, 60_000)).unwrap();
        let _w0 = barriers.arrive(arrive(1, 3, 0, 0.0, 60_000)).unwrap();
        assert_eq!(barriers.load(), (1, 200));
    }

    #[tokio::test]
    async fn an_invalid_rank_aborts_the_others_and_a_dropped_waiter_counts_as_missing() {
        let barriers: Barriers<u32, u32> = Barriers::new(limits());
        let Ticket::Wait(w0) = barriers.arrive(arrive(1, 2, 0, 0.0, 60_000)).unwrap() else {
            panic!()
        };
        let refused = barriers.arrive(arrive(1, 3, 1, 1.0, 60_000)).err().unwrap();
        assert!(matches!(refused, Refused::Invalid(ref m) if m.contains("world_size 3")));
        let Err(Failure::Aborted(message)) = w0.outcome().await else {
            panic!()
        };
        assert!(message.contains("rank 1"), "{message}");
        // An invalid rank arriving first: rank 0, arriving after, is told.
        assert!(barriers.arrive(arrive(3, 2, 5, 1.0, 60_000)).is_err());
        assert!(matches!(
            barriers.arrive(arrive(3, 2, 0, 0.0, 60_000)),
            Err(Refused::Failed(Failure::Aborted(ref m))) if m.contains("rank 5")
        ));
        // Told once: its retry opens a new attempt.
        assert!(matches!(
            barriers.arrive(arrive(3, 2, 0, 0.0, 60_000)),
            Ok(Ticket::Wait(_))
        ));

        let Ticket::Wait(w0) = barriers.arrive(arrive(2, 2, 0, 0.0, 60_000)).unwrap() else {
            panic!()
        };
        assert_eq!(barriers.load(), (1, 100));
        drop(w0);
        assert_eq!(barriers.load(), (0, 0));
    }

    #[tokio::test]
    async fn a_rank_again_with_the_same_fingerprint_but_other_values_is_invalid() {
        let barriers: Barriers<u32, u32> = Barriers::new(limits());
        let Ticket::Wait(w0) = barriers.arrive(arrive(1, 2, 0, 0.5, 60_000)).unwrap() else {
            panic!()
        };
        // As if the data were made to collide with rank 0's CRC-32.
        let collided = Arrive {
            fingerprint: 0.5f64.to_bits(),
            ..arrive(1, 2, 0, 0.25, 60_000)
        };
        let refused = barriers.arrive(collided).err().unwrap();
        assert!(
            matches!(refused, Refused::Invalid(ref m) if m.contains("with different data")),
            "{refused:?}"
        );
        let Err(Failure::Aborted(message)) = w0.outcome().await else {
            panic!()
        };
        assert!(
            message.contains("rank 0 sent an invalid request"),
            "{message}"
        );
        // The same values again are its retry.
        let Ticket::Wait(_w0) = barriers.arrive(arrive(2, 2, 0, 0.5, 60_000)).unwrap() else {
            panic!()
        };
        assert!(matches!(
            barriers.arrive(arrive(2, 2, 0, 0.5, 60_000)),
            Ok(Ticket::Wait(_))
        ));
    }

    #[tokio::test]
    async fn a_deleted_sessions_ranks_are_aborted_and_another_incarnation_meets_apart() {
        let barriers: Barriers<u32, u32> = Barriers::new(limits());
        let Ticket::Wait(w0) = barriers.arrive(arrive(1, 2, 0, 0.0, 60_000)).unwrap() else {
            panic!()
        };
        // The id's next incarnation: rank 1 of the same step number does
        // not complete the old incarnation's step.
        let next = |rank| Arrive {
            key: Key {
                incarnation: 2,
                ..key(1)
            },
            ..arrive(1, 2, rank, 1.0, 60_000)
        };
        let Ticket::Wait(w1) = barriers.arrive(next(1)).unwrap() else {
            panic!("rank 1 of another incarnation completed the step")
        };
        assert_eq!(barriers.load(), (2, 200));
        barriers.abort_session(
            &SessionId::parse("s").unwrap(),
            &Failure::Aborted("deleted".into()),
        );
        for waiter in [w0, w1] {
            let Err(Failure::Aborted(message)) = waiter.outcome().await else {
                panic!()
            };
            assert_eq!(message, "deleted");
        }
        assert_eq!(barriers.load(), (0, 0));
    }

    #[tokio::test]
    async fn limits_refuse_with_resource_exhausted_and_the_step_goes_on() {
        let barriers: Barriers<u32, u32> = Barriers::new(StepLimits {
            max_waiting_bytes: 150,
            ..limits()
        });
        let _w0 = barriers.arrive(arrive(1, 3, 0, 0.0, 60_000)).unwrap();
        assert!(matches!(
            barriers.arrive(arrive(1, 3, 1, 1.0, 60_000)),
            Err(Refused::Limit {
                limit_name: "--max-step-waiting-bytes",
                ..
            })
        ));
        let barriers: Barriers<u32, u32> = Barriers::new(StepLimits {
            max_open_steps: 1,
            ..limits()
        });
        let _w = barriers.arrive(arrive(1, 2, 0, 0.0, 60_000)).unwrap();
        assert!(matches!(
            barriers.arrive(arrive(2, 2, 0, 0.0, 60_000)),
            Err(Refused::Limit {
                limit_name: "--max-open-steps",
                ..
            })
        ));
    }
}
