//! Configuration: command-line flags and `NORMSERVE_*` environment variables
//! parsed into one validated [`Config`]. This is the single source of truth for
//! every option; `--help` and the README's table describe the same fields.
//!
//! Config states choices in its own terms; the server's assembly maps them to
//! the types of the layers they configure (config depends on no layer).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::device::DeviceChoice;

/// normserve: a gRPC batch-normalization service on libtorch.
#[derive(Debug, Clone, Parser)]
#[command(name = "normserve", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on (use port 0 for an ephemeral port).
    #[arg(long, env = "NORMSERVE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Directory for durable state (created if missing).
    #[arg(long, env = "NORMSERVE_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// Where sessions are stored: "embedded" (a redb file in --data-dir) or a
    /// Redis URL, redis://host:port/db, shared by several replicas.
    #[arg(long, env = "NORMSERVE_STORE", default_value = "embedded")]
    pub store: String,

    /// sync: every acknowledged mutation is durable before its response;
    /// none: sessions live in memory only and are lost on restart.
    #[arg(long, env = "NORMSERVE_DURABILITY", value_enum, default_value_t = Durability::Sync)]
    pub durability: Durability,

    /// Start even when the embedded store holds fewer commits than were
    /// acknowledged (it went back in time) or is missing or empty where one
    /// was: serve it as it is. Without it the server refuses to start, so
    /// that no session loses acknowledged steps silently.
    #[arg(long, env = "NORMSERVE_ACCEPT_STORE_ROLLBACK")]
    pub accept_store_rollback: bool,

    /// Default device of new sessions and of Compare: auto (CUDA when
    /// available, else CPU), cpu, cuda or cuda:N.
    #[arg(long, env = "NORMSERVE_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,

    /// Largest accepted request or response message, in bytes.
    #[arg(long, env = "NORMSERVE_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Largest number of elements in one tensor.
    #[arg(long, env = "NORMSERVE_MAX_TENSOR_ELEMENTS", default_value_t = 32 * 1024 * 1024)]
    pub max_tensor_elements: u64,

    /// Largest num_features (channels) of a session.
    #[arg(long, env = "NORMSERVE_MAX_NUM_FEATURES", default_value_t = 65_536)]
    pub max_num_features: i64,

    /// Largest number of live sessions.
    #[arg(long, env = "NORMSERVE_MAX_SESSIONS", default_value_t = 100_000)]
    pub max_sessions: u64,

    /// libtorch intra-op threads per tensor operation. 1 suits a server that
    /// runs many small requests at once: parallelism comes from the compute
    /// pool instead of OpenMP threads spinning on shared cores.
    #[arg(long, env = "NORMSERVE_INTRA_OP_THREADS", default_value_t = 1)]
    pub intra_op_threads: i32,

    /// Who computes train-mode batch statistics on the CPU: native (the
    /// default: a vectorized kernel held to libtorch's numbers, 2-4x faster
    /// for contiguous float32 inputs of rank 3 to 5; every other input takes
    /// libtorch's path) or libtorch (exactly nn.BatchNorm's CPU kernel).
    #[arg(long, env = "NORMSERVE_CPU_STATS_KERNEL", default_value = "native")]
    pub cpu_stats_kernel: CpuStatsKernel,

    /// Tensor operations that may run at once (0: one per CPU core).
    #[arg(long, env = "NORMSERVE_COMPUTE_THREADS", default_value_t = 0)]
    pub compute_threads: usize,

    /// Recent request ids remembered per session for idempotent retries.
    #[arg(long, env = "NORMSERVE_REPLAY_WINDOW", default_value_t = 64)]
    pub replay_window: usize,

    /// Bytes of forward outputs kept per session to answer retries in full.
    #[arg(long, env = "NORMSERVE_REPLAY_CACHE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub replay_cache_bytes: usize,

    /// Bytes of forward outputs kept for retries by all sessions together; an
    /// output beyond it is not kept (its retry is answered without output, as
    /// after a restart, and is still never applied twice).
    #[arg(long, env = "NORMSERVE_REPLAY_CACHE_TOTAL_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub replay_cache_total_bytes: usize,

    /// Memory the server may hold for its clients, in bytes or with a unit
    /// (8GiB, 512MiB): sessions' state, replay caches, request and reply
    /// messages in flight, stream look-ahead. What would exceed it is refused
    /// with RESOURCE_EXHAUSTED before anything is allocated. Default: half
    /// of the cgroup's memory limit, or of physical memory without one.
    #[arg(long, env = "NORMSERVE_MEMORY_BUDGET", value_name = "SIZE", value_parser = crate::memory::parse_bytes)]
    pub memory_budget: Option<u64>,

    /// Largest world_size of a synchronized step (a Forward with a step, or
    /// ReduceStatistics); a larger one is INVALID_ARGUMENT.
    #[arg(long, env = "NORMSERVE_MAX_WORLD_SIZE", default_value_t = 1024)]
    pub max_world_size: u32,

    /// Synchronized steps waiting for their ranks at once, all sessions
    /// together; a rank that would open one more is RESOURCE_EXHAUSTED.
    #[arg(long, env = "NORMSERVE_MAX_OPEN_STEPS", default_value_t = 1024)]
    pub max_open_steps: usize,

    /// Bytes of shards held by Forward ranks waiting in synchronized steps,
    /// all steps together; a rank beyond it is RESOURCE_EXHAUSTED (the step
    /// goes on waiting for it).
    #[arg(long, env = "NORMSERVE_MAX_STEP_WAITING_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub max_step_waiting_bytes: u64,

    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "NORMSERVE_DRAIN_SECONDS", default_value_t = 10)]
    pub drain_seconds: u64,

    /// TLS certificate chain (PEM) to serve gRPC over TLS; needs --tls-key.
    #[arg(long, env = "NORMSERVE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "NORMSERVE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM): clients must present a certificate signed by
    /// one of them (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "NORMSERVE_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,

    /// Tokens file: every RPC but health needs `authorization: Bearer
    /// <token>` with a token listed there (lines `<sha256:hex or token>
    /// <tenant> <user|admin>`). Reloaded on SIGHUP.
    #[arg(long, env = "NORMSERVE_AUTH_TOKENS", value_name = "FILE")]
    pub auth_tokens: Option<PathBuf>,

    /// Largest number of live sessions of one tenant (needs --auth-tokens;
    /// default: no per-tenant limit).
    #[arg(long, env = "NORMSERVE_TENANT_MAX_SESSIONS")]
    pub tenant_max_sessions: Option<u64>,

    /// Largest number of requests of one tenant in progress at once; more
    /// are refused at once with RESOURCE_EXHAUSTED (needs --auth-tokens;
    /// default: no per-tenant limit).
    #[arg(long, env = "NORMSERVE_TENANT_MAX_CONCURRENT_REQUESTS")]
    pub tenant_max_concurrent_requests: Option<u64>,

    /// Address of the Prometheus metrics endpoint (HTTP, `GET /metrics`),
    /// apart from the gRPC port; off when unset.
    #[arg(long, env = "NORMSERVE_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Largest number of requests in progress on the whole server (a stream
    /// counts until it ends); more are refused at once with
    /// RESOURCE_EXHAUSTED, never queued. Health checks are exempt. 0: no limit.
    #[arg(long, env = "NORMSERVE_MAX_CONCURRENT_REQUESTS", default_value_t = 0)]
    pub max_concurrent_requests: u64,

    /// Idle time after which a session is evicted or deleted (see
    /// --session-ttl-action): no request has used it (Forward,
    /// UpdateParameters, ResetRunningStats, ImportState, ExportState) for that
    /// many seconds. 0: never (the default).
    #[arg(long, env = "NORMSERVE_SESSION_TTL_SECONDS", default_value_t = 0)]
    pub session_ttl_seconds: u64,
    /// What the idle TTL does: `evict` drops the session from memory only (its
    /// stored record stays and the next request naming it loads it again;
    /// needs a store, not --durability none); `delete` deletes it for good,
    /// as DeleteSession would.
    #[arg(long, env = "NORMSERVE_SESSION_TTL_ACTION", value_enum, default_value_t = TtlAction::Evict)]
    pub session_ttl_action: TtlAction,

    /// Log format.
    #[arg(long, env = "NORMSERVE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax, e.g. "info" or "normserve=debug".
    #[arg(long, env = "NORMSERVE_LOG", default_value = "info")]
    pub log: String,

    /// Requests (streams excepted) that take at least this many milliseconds
    /// are logged at INFO; quicker ones at DEBUG. 0: off.
    #[arg(long, env = "NORMSERVE_SLOW_REQUEST_MS", default_value_t = 1000)]
    pub slow_request_ms: u64,
    /// Share of requests, 0 to 1, logged at INFO whatever their duration (an
    /// access log: 1 logs every request, 0 none). Health checks are never sampled.
    #[arg(long, env = "NORMSERVE_ACCESS_LOG_SAMPLE", value_name = "RATE", default_value_t = 0.0, value_parser = sample_rate)]
    pub access_log_sample: f64,

    /// Streams (calls in progress) one HTTP/2 connection may have open at
    /// once; a client asking for more waits for one to end. 0: no limit.
    #[arg(
        long,
        env = "NORMSERVE_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 256
    )]
    pub max_streams_per_connection: u32,

    /// Seconds a connection may be idle before the server pings it (HTTP/2
    /// keepalive); a peer that does not answer within as many seconds again
    /// is disconnected, and its calls end. 0: no pings.
    #[arg(long, env = "NORMSERVE_HTTP2_KEEPALIVE_SECONDS", default_value_t = 60)]
    pub http2_keepalive_seconds: u64,

    /// Seconds a call may send nothing while the server waits for its
    /// message (a request's message, a stream's next one); the call then
    /// ends with DEADLINE_EXCEEDED and frees everything it held. A call takes
    /// its place among the requests in progress only once its first message
    /// has arrived. 0: wait for ever.
    #[arg(
        long,
        env = "NORMSERVE_REQUEST_IDLE_TIMEOUT_SECONDS",
        default_value_t = 60
    )]
    pub request_idle_timeout_seconds: u64,

    /// Seconds a new connection has to complete its TLS handshake (with TLS)
    /// and send the HTTP/2 connection preface; it is closed otherwise.
    #[arg(long, env = "NORMSERVE_HANDSHAKE_TIMEOUT_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout_seconds: u64,

    /// Bytes of ForwardStream (and ModelStreamInfer) answers the server
    /// computes ahead of what the client has read; past it, the stream reads
    /// no further message until the client reads. One answer is always let
    /// through, however large.
    #[arg(long, env = "NORMSERVE_STREAM_LOOK_AHEAD_BYTES", default_value_t = 64 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_look_ahead_bytes: u64,

    /// Largest number of elements in a Compare's input (Compare runs a dozen
    /// implementations and simulated mistakes over it: far more work per
    /// element than a Forward).
    #[arg(long, env = "NORMSERVE_COMPARE_MAX_TENSOR_ELEMENTS", default_value_t = 4 * 1024 * 1024)]
    pub compare_max_tensor_elements: u64,

    /// Compare jobs that may run at once, on permits of their own: Compares
    /// never take the permits of session calls (--compute-threads), so a
    /// few large ones cannot make Forwards wait.
    #[arg(long, env = "NORMSERVE_COMPARE_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub compare_threads: u64,

    /// Address of the Open Inference Protocol's HTTP/REST API (KServe v2:
    /// `/v2/health/*`, `/v2/models/{session}` metadata, ready and infer, with
    /// Triton's binary tensor data); off when unset. Plain HTTP: refused
    /// together with --tls-cert. The gRPC form (`inference.GRPCInferenceService`)
    /// is always served on --listen.
    #[arg(long, env = "NORMSERVE_HTTP_ADDR", value_name = "ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Seconds an HTTP client has to send a request's head and body; also the
    /// deadline after which its computation does not start.
    #[arg(long, env = "NORMSERVE_HTTP_REQUEST_TIMEOUT_SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub http_request_timeout_seconds: u64,

    /// The shared-memory tensor transport (SharedMemoryService, Forward's
    /// input_region/output_region) for clients on this host: on or off. Off,
    /// every registration is refused with FAILED_PRECONDITION. A server whose
    /// /dev/shm is not shared with its clients (a container without a shared
    /// emptyDir) refuses registrations of objects it cannot see with NOT_FOUND.
    #[arg(long, env = "NORMSERVE_SHARED_MEMORY", value_enum, default_value_t = Switch::On)]
    pub shared_memory: Switch,

    /// Seconds a registered shared-memory region may go unused (no Forward,
    /// no registration) before the server unregisters and unmaps it; 0: never.
    /// Swept every quarter of it (between 100 ms and 30 s).
    #[arg(
        long,
        env = "NORMSERVE_SHARED_MEMORY_IDLE_SECONDS",
        default_value_t = 300
    )]
    pub shared_memory_idle_seconds: u64,

    /// Most bytes of shared-memory regions mapped at once, every tenant's
    /// together (bytes or with a unit: 16GiB). Mapped pages are the clients'
    /// shared memory, not the server's: they are not in --memory-budget.
    #[arg(long, env = "NORMSERVE_SHARED_MEMORY_MAX_BYTES", value_name = "SIZE",
          default_value = "16GiB", value_parser = crate::memory::parse_bytes)]
    pub shared_memory_max_bytes: u64,

    /// Most shared-memory regions one tenant may have registered at once (the
    /// server holds at most 1024 in all).
    #[arg(
        long,
        env = "NORMSERVE_TENANT_SHARED_MEMORY_MAX_REGIONS",
        default_value_t = 64
    )]
    pub tenant_shared_memory_max_regions: u64,

    /// Most bytes one tenant's shared-memory regions may cover together.
    #[arg(long, env = "NORMSERVE_TENANT_SHARED_MEMORY_MAX_BYTES", value_name = "SIZE",
          default_value = "4GiB", value_parser = crate::memory::parse_bytes)]
    pub tenant_shared_memory_max_bytes: u64,
}

/// An on/off option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn is_on(self) -> bool {
        self == Switch::On
    }
}

/// `--access-log-sample`: a number from 0 to 1.
fn sample_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!("expected a number from 0 to 1, got {text:?}")),
    }
}

/// Whether mutations are persisted before they are acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Durability {
    Sync,
    None,
}

impl Durability {
    /// Its flag value, as GetServerInfo reports it.
    pub fn name(self) -> &'static str {
        match self {
            Durability::Sync => "sync",
            Durability::None => "none",
        }
    }
}

/// Who computes train-mode batch statistics on the CPU (`--cpu-stats-kernel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuStatsKernel {
    /// Exactly nn.BatchNorm's CPU kernel.
    Libtorch,
    /// The vectorized kernel held to libtorch's numbers.
    Native,
}

impl CpuStatsKernel {
    /// Its flag value, as GetServerInfo reports it.
    pub fn name(self) -> &'static str {
        match self {
            CpuStatsKernel::Libtorch => "libtorch",
            CpuStatsKernel::Native => "native",
        }
    }
}

impl FromStr for CpuStatsKernel {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        [CpuStatsKernel::Libtorch, CpuStatsKernel::Native]
            .into_iter()
            .find(|kernel| kernel.name() == text)
            .ok_or_else(|| {
                format!("unknown statistics kernel {text:?}: expected libtorch or native")
            })
    }
}

/// Where sessions are kept, as `--durability` and `--store` choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// In memory only (`--durability none`).
    None,
    /// The embedded redb file in `--data-dir`.
    Embedded,
    /// A Redis server shared by replicas (`--store redis://...`).
    Redis,
}

impl StoreKind {
    /// As GetServerInfo's `store` and `store:` feature name it.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::None => "none",
            StoreKind::Embedded => "embedded",
            StoreKind::Redis => "redis",
        }
    }
}

/// What happens to a session idle for --session-ttl-seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TtlAction {
    /// Dropped from memory; the stored record stays and is loaded on next use.
    Evict,
    /// Deleted from memory and store.
    Delete,
}

impl TtlAction {
    /// The flag's value, also the metric label and the log field.
    pub fn name(self) -> &'static str {
        match self {
            TtlAction::Evict => "evict",
            TtlAction::Delete => "delete",
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Longest idle TTL: 10 years (any longer is "never"; use 0).
pub const MAX_SESSION_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;

/// A configuration value that parsed but cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// Checks the cross-field rules clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("--max-message-bytes", self.max_message_bytes as u64),
            ("--max-tensor-elements", self.max_tensor_elements),
            ("--max-sessions", self.max_sessions),
            ("--memory-budget", self.memory_budget.unwrap_or(1)),
            ("--max-world-size", u64::from(self.max_world_size)),
            ("--max-open-steps", self.max_open_steps as u64),
        ];
        for (flag, value) in positive {
            if value == 0 {
                return Err(ConfigError(format!("{flag} must be at least 1")));
            }
        }
        let store_ok = self.store == "embedded"
            || self.store.starts_with("redis://")
            || self.store.starts_with("rediss://");
        if !store_ok {
            return Err(ConfigError(format!(
                "--store must be \"embedded\" or a redis:// URL, got {:?}",
                self.store
            )));
        }
        if self.max_num_features < 1 {
            return Err(ConfigError("--max-num-features must be at least 1".into()));
        }
        if self.intra_op_threads < 1 {
            return Err(ConfigError("--intra-op-threads must be at least 1".into()));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError(
                "--tls-cert and --tls-key go together (both or neither)".into(),
            ));
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(ConfigError(
                "--tls-client-ca needs TLS (--tls-cert and --tls-key)".into(),
            ));
        }
        let tenant_limits = [
            ("--tenant-max-sessions", self.tenant_max_sessions),
            (
                "--tenant-max-concurrent-requests",
                self.tenant_max_concurrent_requests,
            ),
        ];
        for (flag, value) in tenant_limits {
            match value {
                Some(0) => return Err(ConfigError(format!("{flag} must be at least 1"))),
                Some(_) if self.auth_tokens.is_none() => {
                    return Err(ConfigError(format!(
                        "{flag} needs --auth-tokens (tenants come from the tokens file)"
                    )))
                }
                _ => {}
            }
        }
        if self.session_ttl_seconds > 0
            && self.session_ttl_action == TtlAction::Evict
            && self.durability == Durability::None
        {
            return Err(ConfigError(
                "--session-ttl-action evict keeps idle sessions in the store, and --durability none has none: choose --session-ttl-action delete (idle sessions are lost) or a store".into(),
            ));
        }
        if self.session_ttl_seconds > MAX_SESSION_TTL_SECONDS {
            return Err(ConfigError(format!(
                "--session-ttl-seconds must be at most {MAX_SESSION_TTL_SECONDS} (10 years)"
            )));
        }
        if self.max_message_bytes > u32::MAX as usize {
            return Err(ConfigError(
                "--max-message-bytes must be below 4 GiB".into(),
            ));
        }
        Ok(())
    }

    /// The store `--durability` and `--store` choose.
    pub fn store_kind(&self) -> StoreKind {
        match (self.durability, self.store.as_str()) {
            (Durability::None, _) => StoreKind::None,
            (Durability::Sync, "embedded") => StoreKind::Embedded,
            (Durability::Sync, _) => StoreKind::Redis,
        }
    }

    /// Compute pool size with the `0 = one per core` default resolved.
    pub fn resolved_compute_threads(&self) -> usize {
        if self.compute_threads > 0 {
            return self.compute_threads;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// The idle TTL, `None` when off.
    pub fn session_ttl(&self) -> Option<Duration> {
        (self.session_ttl_seconds > 0).then(|| Duration::from_secs(self.session_ttl_seconds))
    }

    /// The shared-memory idle lease; None: regions never expire.
    pub fn shared_memory_idle(&self) -> Option<Duration> {
        (self.shared_memory_idle_seconds > 0)
            .then(|| Duration::from_secs(self.shared_memory_idle_seconds))
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_seconds)
    }

    /// The HTTP/2 keepalive interval (and timeout); None: off.
    pub fn http2_keepalive(&self) -> Option<Duration> {
        (self.http2_keepalive_seconds > 0)
            .then(|| Duration::from_secs(self.http2_keepalive_seconds))
    }

    /// How long a call may send nothing while awaited; None: for ever.
    pub fn request_idle_timeout(&self) -> Option<Duration> {
        (self.request_idle_timeout_seconds > 0)
            .then(|| Duration::from_secs(self.request_idle_timeout_seconds))
    }

    /// How long a connection has for its TLS handshake and HTTP/2 preface.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_seconds)
    }

    /// A configuration with every default, listening on `listen`, except that
    /// sessions live in memory only (`--durability none`), so that tests and
    /// embedders write nothing unless they choose a data directory.
    pub fn with_defaults(listen: SocketAddr) -> Self {
        let mut config = Config::parse_from(["normserve"]);
        config.listen = listen;
        config.durability = Durability::None;
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> Config {
        Config::parse_from(std::iter::once("normserve").chain(args.iter().copied()))
    }

    #[test]
    fn the_idle_ttl_is_off_by_default_and_evicts_only_with_a_store() {
        let default = parsed(&[]);
        assert_eq!(default.session_ttl(), None);
        assert!(default.validate().is_ok());

        let evict = parsed(&["--session-ttl-seconds", "60"]);
        assert_eq!(evict.session_ttl(), Some(Duration::from_secs(60)));
        assert_eq!(evict.session_ttl_action, TtlAction::Evict);
        assert!(evict.validate().is_ok());

        let no_store = parsed(&["--session-ttl-seconds", "60", "--durability", "none"]);
        let refused = no_store.validate().unwrap_err().to_string();
        assert!(refused.contains("--session-ttl-action delete"), "{refused}");
        let delete = parsed(&[
            "--session-ttl-seconds",
            "60",
            "--durability",
            "none",
            "--session-ttl-action",
            "delete",
        ]);
        assert!(delete.validate().is_ok());

        let too_long = parsed(&["--session-ttl-seconds", "999999999999"]);
        assert!(too_long.validate().is_err());
    }
}
