//! Synchronized steps, the commands and results: a train Forward that names
//! a step (its shard is normalized with the statistics of all ranks' shards
//! together) and ReduceStatistics (the statistics only). The rendezvous is
//! `registry::barrier`, the operations `registry::synced`, the math
//! `numerics::merge_stats`. No proto, no I/O.

use std::sync::Arc;

use super::{Forward, ForwardOutcome, SessionId};
use crate::numerics::merge_stats::{ChannelTransform, GlobalStats, ShardStats};

/// One rank's place in a synchronized step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepSpec {
    /// Strictly increasing per session.
    pub step: u64,
    pub world_size: u32,
    /// 0 <= rank < world_size (checked by the barrier, which tells the others).
    pub rank: u32,
}

/// A Forward that takes part in a step (train mode; an eval Forward with a
/// step is a plain Forward).
#[derive(Debug, Clone)]
pub struct StepForward {
    pub forward: Forward,
    pub spec: StepSpec,
}

/// What a ReduceStatistics call brings.
#[derive(Debug, Clone)]
pub enum Reduction {
    Forward {
        stats: ShardStats,
        update_running_stats: bool,
    },
    Backward {
        sum_grad_output: Vec<f64>,
        sum_grad_output_centered: Vec<f64>,
    },
}

#[derive(Debug, Clone)]
pub struct ReduceStatistics {
    pub id: SessionId,
    pub spec: StepSpec,
    pub reduction: Reduction,
}

/// The global batch's statistics of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStatistics {
    pub step: u64,
    pub global: GlobalStats,
}

/// An applied step, as remembered for its ranks' retries: the position it
/// produced, its statistics and the per-channel transform every shard was
/// normalized with (None when it is known from the stored record only).
#[derive(Debug, Clone, PartialEq)]
pub struct StepApplied {
    pub step: u64,
    pub version: u64,
    pub num_batches_tracked: i64,
    pub statistics: Option<Arc<StepStatistics>>,
    pub transform: Option<Arc<ChannelTransform>>,
}

/// A step Forward's answer.
#[derive(Debug, Clone)]
pub struct StepForwardOutcome {
    pub forward: ForwardOutcome,
    /// Absent for an eval Forward, and in a replay known from the record only.
    pub statistics: Option<Arc<StepStatistics>>,
}

/// A ReduceStatistics answer.
#[derive(Debug, Clone)]
pub struct ReduceOutcome {
    /// FORWARD: the global statistics (absent in a replay known from the
    /// stored record only).
    pub statistics: Option<Arc<StepStatistics>>,
    /// BACKWARD: the sums over all ranks, in rank order.
    pub sums: Option<Arc<BackwardSums>>,
    pub version: u64,
    pub num_batches_tracked: i64,
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackwardSums {
    pub sum_grad_output: Vec<f64>,
    pub sum_grad_output_centered: Vec<f64>,
}
