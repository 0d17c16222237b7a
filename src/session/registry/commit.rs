//! How operations reach a session's state and commit a new one: take the
//! session's FIFO lock, make the cached state current (with a shared store:
//! check the stored stamp, reload when another replica moved on), run the step
//! on the compute pool, write the new state's record with a compare-and-set,
//! swap it in. A write that loses the compare-and-set reloads and recomputes,
//! at most [`MAX_ATTEMPTS`] times. A refused or failed step changes nothing.

use std::sync::Arc;

use tokio::sync::OwnedMutexGuard;

use super::{Registry, Session};
use crate::compute::ComputeError;
use crate::session::durable::{SessionRecord, Stamp, Written};
use crate::session::record::{record, state_from_record};
use crate::session::state::{unix_nanos, SessionInfo, SessionState};
use crate::session::steps::{check_version, Next, Step};
use crate::session::{SessionError, SessionId};

/// How many times an operation starts again after losing a compare-and-set
/// (or finding its cached session replaced) before it gives up with ABORTED.
pub(super) const MAX_ATTEMPTS: usize = 64;

/// Whether a cached session is still the stored incarnation.
enum Current {
    Same,
    Replaced,
}

/// Which incarnation of its id a session is: its creation time (deleted and
/// created again, it is another one).
pub(super) fn incarnation(info: &SessionInfo) -> i64 {
    unix_nanos(info.created_at)
}

/// The stamp a compare-and-set expects: the cached incarnation and version.
pub(super) fn stamp(info: &SessionInfo, state: &SessionState) -> Stamp {
    Stamp {
        incarnation: incarnation(info),
        version: state.layer.version,
    }
}

/// Puts a committed step's state in place and remembers its request id; the
/// one place a session's state changes.
fn swap_in<T>(state: &mut SessionState, next: Next<T>) -> T {
    state.layer = next.layer;
    for entry in next.replays {
        state.replay.record(entry);
    }
    next.value
}

/// The record to store for a step's new state, with its request ids appended
/// to the stored ones.
fn record_of<T>(
    info: &SessionInfo,
    state: &SessionState,
    next: &Next<T>,
) -> Result<SessionRecord, SessionError> {
    record(info, &next.layer, state.replay.stored_with(&next.replays))
}

impl Registry {
    /// Replaces the cached state by the stored one. `Replaced` when the store
    /// holds another incarnation (deleted and created again meanwhile): the
    /// cached session is dropped and must be looked up again.
    async fn reload(
        &self,
        session: &Arc<Session>,
        state: &mut SessionState,
    ) -> Result<Current, SessionError> {
        let Some(store) = &self.store else {
            return Ok(Current::Same);
        };
        let id = &session.info.id;
        let record = match store.load(id).await? {
            None => {
                state.deleted = true;
                self.forget(session);
                return Err(SessionError::NotFound(id.clone()));
            }
            Some(Err(error)) => return Err(self.mark_unreadable(id, error.to_string())),
            Some(Ok(record)) => record,
        };
        if record.created_at_unix_nanos != incarnation(&session.info) {
            state.deleted = true;
            self.forget(session);
            return Ok(Current::Replaced);
        }
        // Within one incarnation versions only grow: an older one in the
        // store means the store lost acknowledged writes. Serving it would
        // roll the session back silently. The cached state is dropped too:
        // once another replica (which never saw the lost versions) moves
        // the store up to the cached version number again, with other
        // contents, the cache would pass for current, answer from the lost
        // history and win compare-and-sets over that replica's acknowledged
        // steps. Until the session is deleted or this replica restarts, it
        // is DATA_LOSS here.
        if record.version < state.layer.version {
            state.evicted = true;
            self.forget(session);
            return Err(self.mark_unreadable(
                id,
                format!(
                    "the store holds version {} but version {} was acknowledged: it went back in time (a store restarted from an older snapshot, or failed over to a replica that lagged)",
                    record.version, state.layer.version
                ),
            ));
        }
        let replay = self.replay.clone();
        let for_job = session.clone();
        let fresh = self
            .pool
            .run(move || state_from_record(&for_job.info, &record, &replay))
            .await??;
        *state = fresh;
        Ok(Current::Same)
    }

    /// With a shared store, makes the cached state current.
    async fn refresh(
        &self,
        session: &Arc<Session>,
        state: &mut SessionState,
    ) -> Result<Current, SessionError> {
        let Some(store) = self.store.as_ref().filter(|s| s.is_shared()) else {
            return Ok(Current::Same);
        };
        match store.version(&session.info.id).await? {
            Some(stored) if stored == stamp(&session.info, state) => Ok(Current::Same),
            _ => self.reload(session, state).await,
        }
    }

    /// The session and its state, locked and current; `None` when the cached
    /// session turned out to be evicted, or deleted or replaced by another
    /// replica (look it up again).
    pub(super) async fn locked(
        &self,
        id: &SessionId,
    ) -> Result<Option<(Arc<Session>, OwnedMutexGuard<SessionState>)>, SessionError> {
        let session = self.lookup(id).await?;
        let mut state = session.state.clone().lock_owned().await;
        if state.evicted {
            return Ok(None); // dropped by the idle TTL: load it again
        }
        if state.deleted {
            return if self.is_shared() {
                Ok(None)
            } else {
                Err(SessionError::NotFound(id.clone()))
            };
        }
        match self.refresh(&session, &mut state).await? {
            Current::Same => Ok(Some((session, state))),
            Current::Replaced => Ok(None),
        }
    }

    /// Runs a read-only job with the session's state locked and current.
    pub(super) async fn read<T, F>(&self, id: &SessionId, job: F) -> Result<T, SessionError>
    where
        T: Send + 'static,
        F: FnOnce(&SessionInfo, &SessionState) -> Result<T, SessionError> + Send + 'static,
    {
        for _ in 0..MAX_ATTEMPTS {
            let Some((session, state)) = self.locked(id).await? else {
                continue;
            };
            return self.pool.run(move || job(&session.info, &state)).await?;
        }
        Err(SessionError::Contended(id.clone()))
    }

    /// Runs a step with the session's state locked and current; stores and
    /// commits the new state it computes, recomputing after a lost
    /// compare-and-set.
    /// `input_bytes`: the tensor data the step reads (chooses inline or
    /// blocking-thread compute, see [`crate::compute::ComputePool::run_sized`]).
    pub(super) async fn mutate<T, F>(
        &self,
        id: &SessionId,
        input_bytes: usize,
        step: F,
    ) -> Result<T, SessionError>
    where
        T: Send + 'static,
        F: Fn(&SessionInfo, &SessionState) -> Result<Step<T>, SessionError> + Send + Sync + 'static,
    {
        let step = Arc::new(step);
        let with_record = self.store.is_some();
        for _ in 0..MAX_ATTEMPTS {
            let Some((session, state)) = self.locked(id).await? else {
                continue;
            };
            let (step, for_job) = (step.clone(), session.clone());
            let (state, computed) = self
                .pool
                .run_sized(input_bytes, move || {
                    let computed = step(&for_job.info, &state).and_then(|step| {
                        let record = match &step {
                            Step::Next(next) if with_record => {
                                Some(record_of(&for_job.info, &state, next)?)
                            }
                            _ => None,
                        };
                        Ok((step, record))
                    });
                    (state, computed)
                })
                .await?;
            let (step, record) = computed?;
            // A refused request is not a use: it leaves the session as it was.
            session.info.last_used.touch();
            let next = match step {
                Step::Done(value) => return Ok(value),
                Step::Next(next) => *next,
            };
            let (Some(record), Some(store)) = (record, self.store.clone()) else {
                // No store: the swap is synchronous, so a cancelled caller
                // cannot interrupt it half-way; no task needed.
                let mut state = state;
                return Ok(swap_in(&mut state, next));
            };
            // The store write and the swap run in their own task: a client
            // that goes away after the write cannot leave memory behind the store.
            let commit = tokio::spawn(async move {
                match store.put(&record, Some(stamp(&session.info, &state))).await {
                    Ok(Written::Committed) => {
                        let mut state = state;
                        Ok(Ok(swap_in(&mut state, next)))
                    }
                    Ok(Written::Conflict) => Ok(Err((session, state))),
                    Err(error) => Err(SessionError::from(error)),
                }
            });
            let outcome = commit
                .await
                .map_err(|e| ComputeError::JobFailed(e.to_string()))??;
            match outcome {
                Ok(value) => return Ok(value),
                Err((session, mut state)) => {
                    // Another replica moved the session on: start again from its state.
                    self.reload(&session, &mut state).await?;
                }
            }
        }
        Err(SessionError::Contended(id.clone()))
    }

    /// Deletes a session from the store and memory; with `expected_version`,
    /// only at that version. An unreadable session (DATA_LOSS) can be deleted
    /// without one: the operator's way out.
    pub async fn delete(
        &self,
        id: &SessionId,
        expected_version: Option<u64>,
    ) -> Result<(), SessionError> {
        for _ in 0..MAX_ATTEMPTS {
            match self.lookup(id).await {
                Ok(_) => {}
                Err(SessionError::DataLoss { .. }) if expected_version.is_none() => {
                    if let Some(store) = &self.store {
                        store.delete(id, None).await?;
                    }
                    self.forget_unreadable(id);
                    self.end_steps_of(id);
                    return Ok(());
                }
                Err(other) => return Err(other),
            }
            let Some((session, mut state)) = self.locked(id).await? else {
                continue;
            };
            check_version(id, expected_version, state.layer.version)?;
            if let Some(store) = &self.store {
                if store.delete(id, Some(stamp(&session.info, &state))).await? == Written::Conflict
                {
                    self.reload(&session, &mut state).await?;
                    continue;
                }
            }
            state.deleted = true;
            self.forget(&session);
            self.end_steps_of(id);
            return Ok(());
        }
        Err(SessionError::Contended(id.clone()))
    }
}
