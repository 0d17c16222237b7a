//! MergeSession: one exact session's sums added into another's. The source
//! is read under its own lock and released before the target is locked, so
//! a merge never holds two sessions' locks (two merges in opposite
//! directions cannot deadlock); the target's step is an ordinary mutation
//! (one version, a request id replayed, compare-and-set with a shared store).

use super::Registry;
use crate::session::exact::{merge_replay_only, merge_source, merge_step};
use crate::session::{Applied, Preconditions, SessionError, SessionId, SessionSnapshot};

impl Registry {
    /// Adds `source`'s exact sums into `target` (both exact sessions with
    /// the same number of channels); `source` is not changed.
    pub async fn merge(
        &self,
        target: &SessionId,
        source: &SessionId,
        given: Preconditions,
    ) -> Result<Applied<SessionSnapshot>, SessionError> {
        if target == source {
            return Err(SessionError::InvalidArgument(format!(
                "source_session_id: a session cannot be merged into itself ({target}): its \
                 values would count twice"
            )));
        }
        let source = match self.read(source, merge_source).await {
            Ok(source) => source,
            Err(error) => {
                // The retry of a merge that was applied before its source
                // went away is still answered with the original result.
                let replay = given.clone();
                let replayed = self
                    .mutate(target, 0, move |info, state| {
                        merge_replay_only(info, state, &replay)
                    })
                    .await?;
                return replayed.ok_or(error);
            }
        };
        self.mutate(target, 0, move |info, state| {
            merge_step(info, state, &source, &given)
        })
        .await
    }
}
