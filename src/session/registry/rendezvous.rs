//! The rendezvous of a synchronized step through a shared store (Redis), for
//! ranks that reach different replicas: each rank places its share (its
//! per-channel statistics, never its tensor) in the store's meeting and polls
//! it until every rank has arrived, the step failed, or the deadline passed
//! (the store then fails it for all, naming the missing ranks). Every replica
//! merges the same shares in rank order and commits the step through the
//! session's compare-and-set: exactly one commit wins, the others find the
//! step applied. A rank whose caller goes away is withdrawn.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;

use super::barrier::{Contribution, Failure, Key, Phase};
use crate::numerics::merge_stats::ShardStats;
use crate::session::durable::{Meeting, SessionStore};
use crate::session::SessionError;

/// How often a waiting rank looks at its meeting.
const POLL: Duration = Duration::from_millis(1);

/// One rank's share as stored in a meeting.
#[derive(Clone, PartialEq, Message)]
struct Share {
    #[prost(int64, tag = "1")]
    count: i64,
    #[prost(double, repeated, tag = "2")]
    mean: Vec<f64>,
    #[prost(double, repeated, tag = "3")]
    m2: Vec<f64>,
    #[prost(int64, repeated, tag = "4")]
    shape: Vec<i64>,
    #[prost(bool, tag = "5")]
    has_shape: bool,
    #[prost(bool, tag = "6")]
    update_running_stats: bool,
    #[prost(double, repeated, tag = "7")]
    sum_grad_output: Vec<f64>,
    #[prost(double, repeated, tag = "8")]
    sum_grad_output_centered: Vec<f64>,
    #[prost(bool, tag = "9")]
    backward: bool,
    /// Tells a rank's retry (same data) from the same rank with other data.
    #[prost(uint64, tag = "10")]
    fingerprint: u64,
}

fn encode(contribution: &Contribution, fingerprint: u64) -> Vec<u8> {
    let share = match contribution {
        Contribution::Forward {
            stats,
            shape,
            update_running_stats,
        } => Share {
            count: stats.count,
            mean: stats.mean.clone(),
            m2: stats.m2.clone(),
            shape: shape.clone().unwrap_or_default(),
            has_shape: shape.is_some(),
            update_running_stats: *update_running_stats,
            fingerprint,
            ..Default::default()
        },
        Contribution::Backward {
            sum_grad_output,
            sum_grad_output_centered,
        } => Share {
            sum_grad_output: sum_grad_output.clone(),
            sum_grad_output_centered: sum_grad_output_centered.clone(),
            backward: true,
            fingerprint,
            ..Default::default()
        },
    };
    share.encode_to_vec()
}

fn decode(bytes: &[u8]) -> Result<Contribution, Failure> {
    let share = Share::decode(bytes)
        .map_err(|e| Failure::Server(format!("a step meeting holds an unreadable share: {e}")))?;
    Ok(if share.backward {
        Contribution::Backward {
            sum_grad_output: share.sum_grad_output,
            sum_grad_output_centered: share.sum_grad_output_centered,
        }
    } else {
        Contribution::Forward {
            stats: ShardStats {
                count: share.count,
                mean: share.mean,
                m2: share.m2,
            },
            shape: share.has_shape.then_some(share.shape),
            update_running_stats: share.update_running_stats,
        }
    })
}

/// The meeting's name in the store.
pub(super) fn meeting_name(key: &Key) -> String {
    let phase = match key.phase {
        Phase::Forward => "forward",
        Phase::Backward => "backward",
    };
    format!("{}:{}:{}:{phase}", key.session, key.incarnation, key.step)
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Withdraws the rank when its caller goes away before the outcome.
struct Presence {
    store: Arc<dyn SessionStore>,
    name: String,
    rank: u32,
    done: bool,
}

impl Drop for Presence {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (store, name, rank) = (self.store.clone(), self.name.clone(), self.rank);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = store.leave(&name, rank).await {
                    tracing::warn!(%error, meeting = %name, rank, "could not withdraw a departed rank");
                }
            });
        }
    }
}

/// A rank's meeting: its contribution placed, then waited for. Returns every
/// rank's contribution in rank order.
#[allow(clippy::too_many_arguments)]
pub(super) async fn meet(
    store: &Arc<dyn SessionStore>,
    key: &Key,
    world_size: u32,
    rank: u32,
    max_world_size: u32,
    contribution: &Contribution,
    fingerprint: u64,
    timeout: Duration,
    caller_deadline: Option<Instant>,
) -> Result<Vec<Contribution>, SessionError> {
    let name = meeting_name(key);
    if world_size == 0 || world_size > max_world_size || rank >= world_size {
        let reason = if rank >= world_size && world_size > 0 {
            format!("rank {rank} is not below world_size {world_size}")
        } else {
            format!("world_size must be 1 to {max_world_size} (--max-world-size), got {world_size}")
        };
        fail(store, key, rank, &reason).await;
        return Err(SessionError::InvalidArgument(reason));
    }
    let deadline = unix_ms(SystemTime::now() + timeout);
    let share = encode(contribution, fingerprint);
    let mut seen = store
        .meet(&name, world_size, rank, &share, deadline)
        .await?;
    let mut presence = Presence {
        store: store.clone(),
        name: name.clone(),
        rank,
        done: false,
    };
    let own_deadline =
        caller_deadline.map(|d| d.checked_sub(Duration::from_millis(20)).unwrap_or(d));
    loop {
        match seen {
            Meeting::Complete(shares) => {
                presence.done = true;
                return shares
                    .iter()
                    .map(|s| decode(s))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(super::synced::failed);
            }
            Meeting::Failed(reason) => {
                presence.done = true;
                return Err(SessionError::StepAborted(format!(
                    "step {}: {reason}",
                    key.step
                )));
            }
            Meeting::Invalid(reason) => {
                presence.done = true;
                return Err(SessionError::InvalidArgument(reason));
            }
            Meeting::Waiting => {}
        }
        if own_deadline.is_some_and(|own| Instant::now() >= own) {
            // Dropping `presence` withdraws this rank.
            return Err(SessionError::StepAborted(format!(
                "this call's deadline passed while step {} waited for its other ranks; nothing was applied, and this rank no longer counts as arrived",
                key.step
            )));
        }
        tokio::time::sleep(POLL).await;
        seen = store
            .meeting(&name, rank, unix_ms(SystemTime::now()))
            .await?;
    }
}

/// Fails the meeting of `key` because `rank` is invalid (`reason`).
pub(super) async fn fail(store: &Arc<dyn SessionStore>, key: &Key, rank: u32, reason: &str) {
    let message =
        format!("step failed: rank {rank} sent an invalid request ({reason}); nothing was applied");
    if let Err(error) = store.fail_meeting(&meeting_name(key), rank, &message).await {
        tracing::warn!(%error, "could not fail a step meeting");
    }
}
