//! ListSessions: one page of sessions in id order, of one tenant or all,
//! filtered by labels. From memory when memory holds every session; from the
//! store's ids when other replicas create sessions too or the idle TTL has
//! evicted some (listing is not a use: an evicted session stays out of memory).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use super::{Registry, Session};
use crate::session::state::snapshot;
use crate::session::{ListSessions, SessionError, SessionId, SessionPage, SessionSnapshot};

impl Registry {
    /// Sessions after `query.after` in id order carrying every label of its
    /// selector, of its tenant only (None: of every tenant), with the
    /// unreadable sessions of the same range beside them.
    pub async fn list(&self, query: &ListSessions) -> Result<SessionPage, SessionError> {
        let (tenant, after, page_size) = (
            query.tenant.as_deref(),
            query.after.as_ref(),
            query.page_size,
        );
        let (selector, include_tensors) = (&query.selector, query.include_tensors);
        let matches = |session: &Session| {
            selector
                .iter()
                .all(|(k, v)| session.info.config.labels.get(k) == Some(v))
        };
        let in_scope = |id: &SessionId| tenant.is_none_or(|t| id.belongs_to(t));
        // A named tenant's keys are contiguous: start at the first of them.
        let start = match (after, tenant) {
            (Some(after), _) => Some(after.clone()),
            (None, Some(tenant)) if !tenant.is_empty() => Some(SessionId::tenant_start(tenant)),
            (None, _) => None,
        };
        let contiguous = tenant.is_some_and(|t| !t.is_empty());
        let mut candidates: Vec<Arc<Session>> = Vec::new();
        let shared = self.is_shared();
        let some_evicted = !self.evicted_map().is_empty();
        match self.store.as_ref().filter(|_| shared || some_evicted) {
            // Other replicas create sessions too, and evicted sessions are in
            // the store only: the store has the full list.
            Some(store) => {
                let mut cursor = start.clone();
                'pages: loop {
                    let ids = store.ids_after(cursor.as_ref(), page_size + 1).await?;
                    let Some(last) = ids.last().cloned() else {
                        break;
                    };
                    for id in ids {
                        if !in_scope(&id) {
                            if contiguous {
                                break 'pages;
                            }
                            continue;
                        }
                        let found = if shared {
                            self.lookup(&id).await
                        } else {
                            // Listing is not a use: an evicted session stays out of memory.
                            self.cached_or_stored(&id).await
                        };
                        match found {
                            Ok(session) if matches(&session) => candidates.push(session),
                            Ok(_)
                            | Err(SessionError::NotFound(_) | SessionError::DataLoss { .. }) => {}
                            Err(other) => return Err(other),
                        }
                        if candidates.len() > page_size {
                            break 'pages;
                        }
                    }
                    cursor = Some(last);
                }
            }
            None => {
                let map = self.read_map();
                let lower = start.as_ref().map_or(Bound::Unbounded, Bound::Excluded);
                candidates = map
                    .range::<SessionId, _>((lower, Bound::Unbounded))
                    .take_while(|(id, _)| !contiguous || in_scope(id))
                    .filter(|(id, _)| in_scope(id))
                    .map(|(_, session)| session)
                    .filter(|s| matches(s))
                    .take(page_size + 1)
                    .cloned()
                    .collect();
            }
        }
        let mut next_after = if candidates.len() > page_size {
            candidates.truncate(page_size);
            candidates.last().map(|s| s.info.id.clone())
        } else {
            None
        };
        let mut sessions: Vec<SessionSnapshot> = Vec::with_capacity(candidates.len());
        let mut page_bytes = 0;
        for session in candidates {
            let id = session.info.id.clone();
            let cached = self
                .read_map()
                .get(&id)
                .is_some_and(|s| Arc::ptr_eq(s, &session));
            let described = if cached || shared {
                self.read(&id, move |info, state| {
                    snapshot(info, &state.layer, include_tensors)
                })
                .await
            } else {
                self.describe_stored(session, include_tensors).await
            };
            let snapshot = match described {
                Ok(snapshot) => snapshot,
                // Deleted since the page was collected.
                Err(SessionError::NotFound(_)) => continue,
                Err(other) => return Err(other),
            };
            // The page ends before the session that would not fit in the reply.
            let bytes = snapshot.tensor_bytes();
            let limit = self.options.limits.max_page_bytes;
            if page_bytes + bytes > limit {
                let Some(last) = sessions.last() else {
                    return Err(SessionError::LimitExceeded {
                        what: "tensor bytes of one session in a ListSessions page",
                        actual: bytes as u64,
                        limit: limit as u64,
                        limit_name: "max_message_bytes",
                    });
                };
                next_after = Some(last.id.clone());
                break;
            }
            page_bytes += bytes;
            sessions.push(snapshot);
        }
        let unreadable = self.unreadable_between(start.as_ref(), next_after.as_ref(), &in_scope);
        Ok(SessionPage {
            sessions,
            next_after,
            unreadable,
        })
    }

    /// The description of a session loaded by [`Self::cached_or_stored`].
    async fn describe_stored(
        &self,
        session: Arc<Session>,
        include_tensors: bool,
    ) -> Result<SessionSnapshot, SessionError> {
        let state = session.state.clone().lock_owned().await;
        self.pool
            .run(move || snapshot(&session.info, &state.layer, include_tensors))
            .await?
    }
}

/// Sessions of `tenant` in `map`: a range of keys for a named tenant, a scan
/// for the default tenant (whose keys have no prefix).
pub(super) fn count_in_tenant(map: &BTreeMap<SessionId, Arc<Session>>, tenant: &str) -> usize {
    if tenant.is_empty() {
        return map.keys().filter(|id| id.belongs_to("")).count();
    }
    let start = SessionId::tenant_start(tenant);
    map.range::<SessionId, _>((Bound::Excluded(&start), Bound::Unbounded))
        .take_while(|(id, _)| id.belongs_to(tenant))
        .count()
}
