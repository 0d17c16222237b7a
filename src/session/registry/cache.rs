//! The registry's cache of stored sessions: the map of sessions in memory,
//! looking a session up (loading it from the store when it is not cached),
//! recovery at start-up, and the sessions whose records cannot be read
//! (DATA_LOSS, never replaced by a fresh session). No mutation of a session's
//! state happens here.
//!
//! A session loaded is charged to the memory budget before its tensors are
//! built: on demand, a load the budget cannot hold is RESOURCE_EXHAUSTED (the
//! record stays in the store, nothing is lost); at start-up, recovery loads
//! every stored session whatever the budget says (the embedded store's
//! sessions are served from memory only), and warns when they exceed it.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Instant, SystemTime};

use super::{Recovery, RecoveryError, Registry, Session};
use crate::memory::{format_bytes, Charge, Kind};
use crate::session::durable::{RecordError, SessionRecord};
use crate::session::record::{info_from_record, state_from_record};
use crate::session::{resident_bytes, SessionConfig, SessionError, SessionId, UnreadableSession};

impl Registry {
    pub(super) fn read_map(&self) -> RwLockReadGuard<'_, BTreeMap<SessionId, Arc<Session>>> {
        // A poisoned lock only means another thread panicked while holding it;
        // the map itself is always consistent (single insert/remove calls).
        self.sessions
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn write_map(&self) -> RwLockWriteGuard<'_, BTreeMap<SessionId, Arc<Session>>> {
        self.sessions
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn evicted_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<SessionId, SystemTime>> {
        self.evicted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unreadable_reason(&self, id: &SessionId) -> Option<String> {
        self.unreadable
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Sessions whose records could not be read, of `tenant` only (None: of
    /// every tenant).
    pub fn unreadable_count(&self, tenant: Option<&str>) -> usize {
        let unreadable = self.unreadable.read().unwrap_or_else(|p| p.into_inner());
        match tenant {
            None => unreadable.len(),
            Some(tenant) => unreadable.keys().filter(|id| id.belongs_to(tenant)).count(),
        }
    }

    /// Unreadable sessions after `after` up to `through` (None: to the end)
    /// that `in_scope` keeps, in id order.
    pub(super) fn unreadable_between(
        &self,
        after: Option<&SessionId>,
        through: Option<&SessionId>,
        in_scope: &dyn Fn(&SessionId) -> bool,
    ) -> Vec<UnreadableSession> {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let upper = through.map_or(Bound::Unbounded, Bound::Included);
        self.unreadable
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .range::<SessionId, _>((lower, upper))
            .filter(|(id, _)| in_scope(id))
            .map(|(id, reason)| UnreadableSession {
                id: id.clone(),
                reason: reason.clone(),
            })
            .collect()
    }

    /// Serves DATA_LOSS for `id` from now on, and returns that error.
    pub(super) fn mark_unreadable(&self, id: &SessionId, reason: String) -> SessionError {
        tracing::error!(session = %id, %reason, "stored session cannot be read; serving DATA_LOSS for it");
        self.unreadable
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), reason.clone());
        SessionError::DataLoss {
            id: id.clone(),
            reason,
        }
    }

    /// Forgets an unreadable session (its record was deleted).
    pub(super) fn forget_unreadable(&self, id: &SessionId) {
        self.unreadable
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Drops `session` from the cache, unless another incarnation took its place.
    pub(super) fn forget(&self, session: &Arc<Session>) {
        let mut map = self.write_map();
        if map
            .get(&session.info.id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            map.remove(&session.info.id);
        }
    }

    /// Loads every stored session (unshared stores) before serving.
    pub async fn recover(&self) -> Result<Recovery, RecoveryError> {
        let start = Instant::now();
        let Some(store) = &self.store else {
            return Ok(Recovery {
                loaded: 0,
                unreadable: 0,
                elapsed: start.elapsed(),
            });
        };
        let mut loaded = 0;
        let mut unreadable = 0;
        for (key, stored) in store.load_all().await.map_err(SessionError::from)? {
            let record = match stored {
                Ok(record) => record,
                Err(error @ RecordError::NewerFormat { .. }) => {
                    return Err(RecoveryError::NewerFormat { id: key, error });
                }
                Err(RecordError::Corrupt(reason)) => {
                    let id = SessionId::parse_key(&key).unwrap_or_else(|_| SessionId::generate());
                    self.mark_unreadable(&id, format!("record is corrupt: {reason}"));
                    unreadable += 1;
                    continue;
                }
            };
            let budget = self.options.memory_budget.clone();
            let charge = |config: &SessionConfig| {
                Ok(budget.charge_anyway(resident_bytes(config), Kind::Sessions))
            };
            match self.session_from_record(record, charge).await {
                Ok(session) => {
                    self.write_map().insert(session.info.id.clone(), session);
                    loaded += 1;
                }
                Err(SessionError::DataLoss { id, reason }) => {
                    self.mark_unreadable(&id, reason);
                    unreadable += 1;
                }
                Err(other) => return Err(other.into()),
            }
        }
        let budget = &self.options.memory_budget;
        if budget.charged() > budget.limit() {
            tracing::warn!(
                charged = %format_bytes(budget.charged()),
                budget = %format_bytes(budget.limit()),
                sessions = loaded,
                "the recovered sessions exceed the memory budget (--memory-budget): they are all served, and new sessions are refused until some are deleted"
            );
        }
        Ok(Recovery {
            loaded,
            unreadable,
            elapsed: start.elapsed(),
        })
    }

    /// A session built from its record, tensors placed on its device, after
    /// `charge` charged its configuration to the memory budget.
    async fn session_from_record(
        &self,
        record: SessionRecord,
        charge: impl FnOnce(&SessionConfig) -> Result<Charge, SessionError>,
    ) -> Result<Arc<Session>, SessionError> {
        let default_device = self.options.default_device;
        let replay = self.replay.clone();
        let fallback_id =
            SessionId::parse_key(&record.id).unwrap_or_else(|_| SessionId::generate());
        let info =
            info_from_record(&record, default_device).map_err(|e| SessionError::DataLoss {
                id: fallback_id,
                reason: e.to_string(),
            })?;
        let charge = charge(&info.config)?;
        let (info, state) = self
            .pool
            .run(move || {
                let state = state_from_record(&info, &record, &replay);
                (info, state)
            })
            .await?;
        Ok(Arc::new(Session::new(info, state?, charge)))
    }

    /// The cached session, or the stored one loaded into the cache.
    pub(super) async fn lookup(&self, id: &SessionId) -> Result<Arc<Session>, SessionError> {
        if let Some(session) = self.read_map().get(id).cloned() {
            return Ok(session);
        }
        let session = self.load_stored(id).await?;
        // Back in memory: no longer an evicted session.
        self.evicted_map().remove(id);
        let mut map = self.write_map();
        Ok(map.entry(id.clone()).or_insert(session).clone())
    }

    /// The cached session, or else the stored one loaded but not cached (for
    /// listing evicted sessions without bringing them back into memory).
    pub(super) async fn cached_or_stored(
        &self,
        id: &SessionId,
    ) -> Result<Arc<Session>, SessionError> {
        if let Some(session) = self.read_map().get(id).cloned() {
            return Ok(session);
        }
        self.load_stored(id).await
    }

    /// The stored session, built from its record (DATA_LOSS for an
    /// unreadable one) and not cached; an evicted session keeps the last use
    /// it had when the idle TTL dropped it.
    async fn load_stored(&self, id: &SessionId) -> Result<Arc<Session>, SessionError> {
        if let Some(reason) = self.unreadable_reason(id) {
            return Err(SessionError::DataLoss {
                id: id.clone(),
                reason,
            });
        }
        let Some(store) = &self.store else {
            return Err(SessionError::NotFound(id.clone()));
        };
        let record = match store.load(id).await? {
            None => return Err(SessionError::NotFound(id.clone())),
            Some(Err(error)) => return Err(self.mark_unreadable(id, error.to_string())),
            Some(Ok(record)) => record,
        };
        let budget = self.options.memory_budget.clone();
        let charge = |config: &SessionConfig| {
            budget
                .try_charge(resident_bytes(config), Kind::Sessions)
                .map_err(SessionError::from)
        };
        let session = match self.session_from_record(record, charge).await {
            Ok(session) => session,
            Err(SessionError::DataLoss { reason, .. }) => {
                return Err(self.mark_unreadable(id, reason))
            }
            Err(other) => return Err(other),
        };
        if let Some(last_used) = self.evicted_map().get(id) {
            session.info.last_used.restore(*last_used);
        }
        Ok(session)
    }
}
