//! The idle TTL: sessions unused for a while are dropped from memory (their
//! stored record stays and the next request loads them again) or deleted.
//! Each candidate is checked again under its lock, so a request queued on it
//! keeps it alive.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::commit::stamp;
use super::{Registry, Session};
use crate::config::TtlAction;
use crate::session::durable::Written;

impl Registry {
    /// Drops from memory (`Evict`: the stored record stays and the next
    /// request naming the session loads it again) or deletes (`Delete`) every
    /// session unused for `ttl` or longer; returns how many. Each is checked
    /// again under its lock, so a request queued on it keeps it alive.
    /// `Evict` without a store does nothing (the configuration refuses it).
    pub async fn expire_idle(&self, ttl: Duration, action: TtlAction) -> usize {
        if action == TtlAction::Evict && self.store.is_none() {
            return 0;
        }
        let idle_since = |session: &Session| {
            SystemTime::now()
                .duration_since(session.info.last_used.get())
                .ok()
                .filter(|idle| *idle >= ttl)
        };
        let idle: Vec<Arc<Session>> = self
            .read_map()
            .values()
            .filter(|s| idle_since(s).is_some())
            .cloned()
            .collect();
        let mut expired = 0;
        for session in idle {
            let id = session.info.id.clone();
            let mut state = session.state.clone().lock_owned().await;
            let Some(idle_for) = idle_since(&session) else {
                continue; // used while we waited for it
            };
            if state.deleted || state.evicted {
                continue;
            }
            match action {
                TtlAction::Evict => {
                    state.evicted = true;
                    self.evicted_map()
                        .insert(id.clone(), session.info.last_used.get());
                }
                TtlAction::Delete => {
                    if let Some(store) = &self.store {
                        match store.delete(&id, Some(stamp(&session.info, &state))).await {
                            Ok(Written::Committed) => {}
                            // Another replica changed it: in use after all.
                            Ok(Written::Conflict) => continue,
                            Err(error) => {
                                tracing::warn!(session = %id, %error,
                                    "idle session not deleted: store error; retried at the next sweep");
                                continue;
                            }
                        }
                    }
                    state.deleted = true;
                    self.end_steps_of(&id);
                }
            }
            self.forget(&session);
            self.metrics.eviction(action);
            tracing::info!(
                session = %id,
                tenant = id.tenant(),
                idle_seconds = idle_for.as_secs_f64(),
                action = action.name(),
                "idle session expired"
            );
            expired += 1;
        }
        expired
    }
}
