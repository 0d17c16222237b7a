//! The named scenarios: what each one sends (shape, mode) and how
//! (unary callers, a stream window, Compare), and the request bodies built
//! from them. Owns no I/O and measures nothing.

use bytes::Bytes;
use normserve::proto::v1 as pb;
use tch::{Device, Kind, Tensor};

use crate::fatal;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Workload {
    /// Unary Forward from `callers` concurrent callers, each on its own session.
    Unary { callers: usize },
    /// ForwardStream with up to `window` requests in flight.
    Stream { window: usize },
    /// The Compare RPC, sequential.
    Compare,
    /// `flood` callers on one connection, each on its own session, send the
    /// scenario's input without pause, while one polite caller on another
    /// connection sends a (4, C) eval at a time; only the polite caller's
    /// latencies are recorded (how much the flood delays it).
    Fairness { flood: usize },
    /// Synchronized steps on one session: `ranks` concurrent train Forwards
    /// of one step each (one shard each), the next step once all answered.
    Steps { ranks: usize },
    /// ReduceStatistics FORWARD (with the running-statistics update) from
    /// `ranks` concurrent callers per step, `shape[1]` channels.
    ReduceSteps { ranks: usize },
    /// The same steps through ReduceStatisticsStream: one stream per rank,
    /// each step one message on each, the next step once all answered.
    ReduceStream { ranks: usize },
    /// `Steps` with each rank's shard and output in a shared-memory object
    /// of its own (the Forwards name ranges instead of carrying bytes).
    SharedSteps { ranks: usize },
    /// What a step costs without its barrier: `ranks` concurrent plain
    /// train Forwards, each on its own session, sent and timed as one step.
    Concurrent { ranks: usize },
    /// Unary Forward, sequential, through a registered shared-memory object
    /// (input and output ranges instead of bytes; the server on this host).
    /// `copy`: the client copies the input in and the output out each call
    /// (an array outside shared memory); else both stay there (arrays made
    /// in shared memory). `request_ids`: each call carries a new
    /// request_id (the server keeps a copy of the output for its replay
    /// when the replay cache can hold it).
    SharedMemory { copy: bool, request_ids: bool },
}

/// The `--durability` of the server a scenario runs against (when the bench
/// starts it): `none` measures the Forward path alone, `sync` with the
/// store's commit (fsync) before each answer, the server's default.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Durability {
    None,
    Sync,
}

impl Durability {
    /// The server's flag value.
    pub fn flag(self) -> &'static str {
        match self {
            Durability::None => "none",
            Durability::Sync => "sync",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub what: &'static str,
    pub shape: Vec<i64>,
    pub train: bool,
    pub workload: Workload,
    pub durability: Durability,
    /// Sessions created with `exact_statistics` (order-independent exact
    /// sums beside the running statistics): what the exact mode costs, read
    /// against the same shape's plain scenario.
    pub exact: bool,
}

pub fn scenarios() -> Vec<Scenario> {
    let unary = Workload::Unary { callers: 1 };
    let s = |name, what, shape: &[i64], train, workload| Scenario {
        name,
        what,
        shape: shape.to_vec(),
        train,
        workload,
        durability: Durability::None,
        exact: false,
    };
    let sync = |scenario: Scenario| Scenario {
        durability: Durability::Sync,
        ..scenario
    };
    let exact = |scenario: Scenario| Scenario {
        exact: true,
        ..scenario
    };
    vec![
        s(
            "latency_1k",
            "unary train (4,64) f32, sequential",
            &[4, 64],
            true,
            unary,
        ),
        s(
            "latency_1k_eval",
            "unary eval (4,64), sequential",
            &[4, 64],
            false,
            unary,
        ),
        s(
            "throughput_1m",
            "unary train (4096,64) 1 MiB",
            &[4096, 64],
            true,
            unary,
        ),
        s(
            "throughput_1m_4d",
            "unary train (64,64,8,8) 1 MiB",
            &[64, 64, 8, 8],
            true,
            unary,
        ),
        exact(s(
            "exact_1m",
            "unary train (4096,64) 1 MiB, exact_statistics session (read beside throughput_1m)",
            &[4096, 64],
            true,
            unary,
        )),
        s(
            "throughput_16m",
            "unary train (65536,64) 16 MiB",
            &[65536, 64],
            true,
            unary,
        ),
        s(
            "throughput_16m_4d",
            "unary train (64,64,32,32) 16 MiB",
            &[64, 64, 32, 32],
            true,
            unary,
        ),
        exact(s(
            "exact_16m_4d",
            "unary train (64,64,32,32) 16 MiB, exact_statistics session (read beside throughput_16m_4d)",
            &[64, 64, 32, 32],
            true,
            unary,
        )),
        s(
            "throughput_16m_eval",
            "unary eval (65536,64) 16 MiB",
            &[65536, 64],
            false,
            unary,
        ),
        s(
            "throughput_16m_4d_eval",
            "unary eval (64,64,32,32) 16 MiB",
            &[64, 64, 32, 32],
            false,
            unary,
        ),
        s(
            "shm_16m",
            "unary train (65536,64) 16 MiB over shared memory, tensors kept there",
            &[65536, 64],
            true,
            Workload::SharedMemory {
                copy: false,
                request_ids: false,
            },
        ),
        s(
            "shm_16m_copy",
            "unary train (65536,64) 16 MiB over shared memory, client copies in and out",
            &[65536, 64],
            true,
            Workload::SharedMemory {
                copy: true,
                request_ids: false,
            },
        ),
        s(
            "shm_1m",
            "unary train (4096,64) 1 MiB over shared memory, tensors kept there",
            &[4096, 64],
            true,
            Workload::SharedMemory {
                copy: false,
                request_ids: false,
            },
        ),
        s(
            "shm_1m_request_id",
            "shm_1m, each call with a new request_id (the output copied for its replay)",
            &[4096, 64],
            true,
            Workload::SharedMemory {
                copy: false,
                request_ids: true,
            },
        ),
        s(
            "concurrent_64k_8",
            "8 callers, train (256,64) 64 KiB",
            &[256, 64],
            true,
            Workload::Unary { callers: 8 },
        ),
        s(
            "concurrent_64k_64",
            "64 callers, train (256,64) 64 KiB",
            &[256, 64],
            true,
            Workload::Unary { callers: 64 },
        ),
        s(
            "stream_small",
            "ForwardStream train (4,64), 32 in flight",
            &[4, 64],
            true,
            Workload::Stream { window: 32 },
        ),
        sync(s(
            "latency_1k_sync",
            "unary train (4,64), sequential, --durability sync",
            &[4, 64],
            true,
            unary,
        )),
        sync(s(
            "stream_train_sync",
            "ForwardStream train (4,64), 32 in flight, --durability sync",
            &[4, 64],
            true,
            Workload::Stream { window: 32 },
        )),
        s(
            "fairness",
            "polite eval (4,64) latency beside 32 flooding callers, train (4096,64) 1 MiB, one connection",
            &[4096, 64],
            true,
            Workload::Fairness { flood: 32 },
        ),
        s(
            "compare_small",
            "Compare train (4,64), all implementations",
            &[4, 64],
            true,
            Workload::Compare,
        ),
        s(
            "step_shard_1024x64",
            "unary train (1024,64) f32: one shard of steps_8x1024x64, alone",
            &[1024, 64],
            true,
            unary,
        ),
        s(
            "steps_8x1024x64",
            "synchronized steps, 8 ranks x train (1024,64) f32",
            &[1024, 64],
            true,
            Workload::Steps { ranks: 8 },
        ),
        s(
            "step_shard_1024x64_shm",
            "unary train (1024,64) f32 over shared memory: one shard of steps_8x1024x64_shm, alone",
            &[1024, 64],
            true,
            Workload::SharedMemory {
                copy: false,
                request_ids: false,
            },
        ),
        s(
            "steps_8x1024x64_shm",
            "synchronized steps, 8 ranks x train (1024,64) f32, shards and outputs in shared memory",
            &[1024, 64],
            true,
            Workload::SharedSteps { ranks: 8 },
        ),
        s(
            "forwards_8x1024x64",
            "8 plain train (1024,64) f32 sent at once, 8 sessions: steps_8x1024x64 without its barrier",
            &[1024, 64],
            true,
            Workload::Concurrent { ranks: 8 },
        ),
        s(
            "reduce_steps_8x1024",
            "ReduceStatistics steps, 8 ranks x 1024 channels",
            &[1, 1024],
            true,
            Workload::ReduceSteps { ranks: 8 },
        ),
        s(
            "reduce_steps_8x1024_stream",
            "ReduceStatisticsStream steps, 8 ranks x 1024 channels, one stream per rank",
            &[1, 1024],
            true,
            Workload::ReduceStream { ranks: 8 },
        ),
        sync(s(
            "reduce_steps_8x1024_sync",
            "ReduceStatistics steps, 8 ranks x 1024 channels, --durability sync",
            &[1, 1024],
            true,
            Workload::ReduceSteps { ranks: 8 },
        )),
        sync(s(
            "reduce_steps_8x1024_stream_sync",
            "ReduceStatisticsStream steps, 8 ranks x 1024 channels, --durability sync",
            &[1, 1024],
            true,
            Workload::ReduceStream { ranks: 8 },
        )),
    ]
}

/// The scenarios named in `names`, in that order; all of them when `names`
/// is empty. An unknown name is fatal.
pub fn select(names: &[String]) -> Vec<Scenario> {
    let all = scenarios();
    if names.is_empty() {
        return all;
    }
    names
        .iter()
        .map(|name| match all.iter().find(|s| s.name == name) {
            Some(s) => s.clone(),
            None => fatal(&format!("unknown scenario {name:?} (see --list)")),
        })
        .collect()
}

impl Scenario {
    /// How many concurrent callers (and sessions) the scenario uses.
    pub fn callers(&self) -> usize {
        match self.workload {
            Workload::Unary { callers } => callers,
            // The flood's sessions, then the polite caller's.
            Workload::Fairness { flood } => flood + 1,
            Workload::Steps { ranks }
            | Workload::SharedSteps { ranks }
            | Workload::ReduceSteps { ranks }
            | Workload::ReduceStream { ranks }
            | Workload::Concurrent { ranks } => ranks,
            _ => 1,
        }
    }

    /// How many sessions the scenario uses (the ranks of a step share one).
    pub fn sessions(&self) -> usize {
        match self.workload {
            Workload::Compare => 0,
            Workload::Steps { .. }
            | Workload::SharedSteps { .. }
            | Workload::ReduceSteps { .. }
            | Workload::ReduceStream { .. } => 1,
            _ => self.callers(),
        }
    }

    /// Rank `rank`'s Forward of step `step` of `world_size` ranks.
    pub fn step_request(
        &self,
        session_id: String,
        raw: &Bytes,
        step: u64,
        world_size: usize,
        rank: usize,
    ) -> pb::ForwardRequest {
        pb::ForwardRequest {
            step: Some(step_spec(step, world_size, rank)),
            ..self.forward_request(session_id, raw)
        }
    }

    /// Rank `rank`'s ReduceStatistics FORWARD of step `step`: a shard of 64
    /// values per channel with made-up statistics.
    pub fn reduce_request(
        &self,
        session_id: String,
        step: u64,
        world_size: usize,
        rank: usize,
    ) -> pb::ReduceStatisticsRequest {
        let channels = self.shape[1] as usize;
        pb::ReduceStatisticsRequest {
            session_id,
            step: Some(step_spec(step, world_size, rank)),
            phase: pb::ReducePhase::Forward as i32,
            count: 64,
            mean: (0..channels).map(|c| (c + rank) as f64 * 1e-3).collect(),
            m2: (0..channels).map(|c| 63.0 + c as f64 * 1e-3).collect(),
            update_running_stats: true,
            ..Default::default()
        }
    }

    /// Bytes of one request's input (float32).
    pub fn input_bytes(&self) -> f64 {
        self.shape.iter().product::<i64>() as f64 * 4.0
    }

    /// The module a session for this input is.
    pub fn layer_kind(&self) -> pb::BatchNormKind {
        match self.shape.len() {
            2 | 3 => pb::BatchNormKind::BatchNorm1d,
            4 => pb::BatchNormKind::BatchNorm2d,
            _ => pb::BatchNormKind::BatchNorm3d,
        }
    }

    pub fn mode(&self) -> i32 {
        if self.train {
            pb::Mode::Train as i32
        } else {
            pb::Mode::Eval as i32
        }
    }

    /// The input as it goes on the wire: float32, raw bytes.
    pub fn wire_tensor(&self, raw: &Bytes) -> pb::Tensor {
        pb::Tensor {
            dtype: pb::DataType::Float32 as i32,
            shape: self.shape.clone(),
            values: Some(pb::tensor::Values::Raw(raw.clone())),
        }
    }

    pub fn forward_request(&self, session_id: String, raw: &Bytes) -> pb::ForwardRequest {
        pb::ForwardRequest {
            session_id,
            input: Some(self.wire_tensor(raw)),
            mode: self.mode(),
            ..Default::default()
        }
    }

    pub fn compare_request(&self, raw: &Bytes, device: &str) -> pb::CompareRequest {
        pb::CompareRequest {
            input: Some(self.wire_tensor(raw)),
            training: self.train,
            device: device.to_owned(),
            ..Default::default()
        }
    }
}

pub fn step_spec(step: u64, world_size: usize, rank: usize) -> pb::StepSpec {
    pb::StepSpec {
        step,
        world_size: world_size as u32,
        rank: rank as u32,
    }
}

/// Standard-normal float32 values of `shape` on `device`.
pub fn random_input(shape: &[i64], device: Device) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_device(device)
}

/// A float32 tensor's values as little-endian bytes.
pub fn raw_bytes(tensor: &Tensor) -> Bytes {
    let host = tensor.to_device(Device::Cpu).contiguous();
    let numel = host.numel();
    let mut raw = vec![0u8; numel * 4];
    host.copy_data_u8(&mut raw, numel);
    Bytes::from(raw)
}
