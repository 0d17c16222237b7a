//! The Prometheus metrics: one [`Metrics`] per server, shared as an
//! `Arc<Metrics>` by the request layer, the compute pool, the store wrapper
//! and the registry, and encoded in Prometheus' text format for
//! `GET /metrics`. The names and labels are fixed by
//! `deploy/checks/metrics.txt` (the dashboard and alerts use them); [`NAMES`]
//! lists them as exposed. Beside them, the build (`normserve_build_info`) and
//! the process' own metrics under their conventional names
//! ([`super::process`], unprefixed).
//!
//! Label values come from fixed sets only (RPC names known at compile time,
//! gRPC code names, store operation names), never from what a client sends,
//! so a client cannot grow the number of series.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::process::ProcessCollector;
use crate::config::TtlAction;
use crate::memory::{Kind, MemoryBudget};

/// This build's version, as GetServerInfo reports it.
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The libtorch version this binary was built against (from its headers).
pub const LIBTORCH_VERSION: &str = env!("NORMSERVE_LIBTORCH_VERSION");

/// Every metric name as it appears in the exposition (counters with their
/// `_total` suffix), in the order of `deploy/checks/metrics.txt`.
pub const NAMES: [&str; 18] = [
    "normserve_requests_total",
    "normserve_request_duration_seconds",
    "normserve_compute_duration_seconds",
    "normserve_queue_wait_seconds",
    "normserve_received_bytes_total",
    "normserve_sent_bytes_total",
    "normserve_sessions",
    "normserve_inflight_requests",
    "normserve_shed_requests_total",
    "normserve_accept_pauses_total",
    "normserve_store_operation_duration_seconds",
    "normserve_store_errors_total",
    "normserve_session_evictions_total",
    "normserve_cuda_memory_bytes",
    "normserve_memory_budget_bytes",
    "normserve_memory_charged_bytes",
    "normserve_shared_memory_mapped_bytes",
    "normserve_build_info",
];

/// The `op` label values: the methods of the session store.
pub const STORE_OPERATIONS: [&str; 6] =
    ["load_all", "load", "version", "put", "delete", "ids_after"];

/// Histogram buckets in seconds: 50 µs to 30 s, about three per decade
/// (1, 2.5, 5), so a small forward (a few hundred µs) and a 16 MiB one
/// (around 100 ms) both land in informative buckets.
pub const DURATION_BUCKETS: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcCode {
    rpc: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rpc {
    rpc: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Op {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Action {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: &'static str,
    libtorch: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabel {
    device: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The server's metrics. Cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    /// The `process_*` metrics, without the `normserve` prefix.
    process_registry: Registry,
    requests: Family<RpcCode, Counter>,
    request_duration: Family<Rpc, Histogram, fn() -> Histogram>,
    compute_duration: Family<Rpc, Histogram, fn() -> Histogram>,
    queue_wait: Histogram,
    received_bytes: Family<Rpc, Counter>,
    sent_bytes: Family<Rpc, Counter>,
    sessions: Gauge,
    inflight: Gauge,
    shed: Counter,
    accept_pauses: Counter,
    store_duration: Family<Op, Histogram, fn() -> Histogram>,
    store_errors: Family<Op, Counter>,
    evictions: Family<Action, Counter>,
    cuda_memory: Family<DeviceLabel, Gauge>,
    memory_budget: Gauge,
    memory_charged: Family<KindLabel, Gauge>,
    shared_memory_mapped: Gauge,
    build_info: Family<Build, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("normserve"),
            process_registry: Registry::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            compute_duration: Family::new_with_constructor(duration_histogram),
            queue_wait: duration_histogram(),
            received_bytes: Family::default(),
            sent_bytes: Family::default(),
            sessions: Gauge::default(),
            inflight: Gauge::default(),
            shed: Counter::default(),
            accept_pauses: Counter::default(),
            store_duration: Family::new_with_constructor(duration_histogram),
            store_errors: Family::default(),
            evictions: Family::default(),
            cuda_memory: Family::default(),
            memory_budget: Gauge::default(),
            memory_charged: Family::default(),
            shared_memory_mapped: Gauge::default(),
            build_info: Family::default(),
        };
        // prometheus-client adds the prefix and, for counters, `_total`.
        let r = &mut metrics.registry;
        r.register(
            "requests",
            "gRPC requests finished, by method and gRPC status code name",
            metrics.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "gRPC request duration from its headers to its status (a stream: its whole life)",
            metrics.request_duration.clone(),
        );
        r.register(
            "compute_duration_seconds",
            "Time of tensor jobs on the compute pool, by the method they serve",
            metrics.compute_duration.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "Time tensor jobs waited for a compute pool permit",
            metrics.queue_wait.clone(),
        );
        r.register(
            "received_bytes",
            "gRPC message bytes received (length-prefixed frames, as on the wire), by method",
            metrics.received_bytes.clone(),
        );
        r.register(
            "sent_bytes",
            "gRPC message bytes sent (length-prefixed frames, as on the wire), by method",
            metrics.sent_bytes.clone(),
        );
        r.register(
            "sessions",
            "Live sessions in this server's registry",
            metrics.sessions.clone(),
        );
        r.register(
            "inflight_requests",
            "gRPC requests in progress (a stream counts until it ends)",
            metrics.inflight.clone(),
        );
        r.register(
            "shed_requests",
            "Requests refused by load shedding",
            metrics.shed.clone(),
        );
        r.register(
            "accept_pauses",
            "Pauses of the accept loop after accepting failed for want of file descriptors or memory",
            metrics.accept_pauses.clone(),
        );
        r.register(
            "store_operation_duration_seconds",
            "Duration of session store operations, by operation",
            metrics.store_duration.clone(),
        );
        r.register(
            "store_errors",
            "Session store operations that failed, by operation",
            metrics.store_errors.clone(),
        );
        r.register(
            "session_evictions",
            "Sessions removed by the idle-session evictor: evict (memory only) or delete",
            metrics.evictions.clone(),
        );
        r.register(
            "cuda_memory_bytes",
            "CUDA device memory in use, by device (absent without CUDA)",
            metrics.cuda_memory.clone(),
        );
        r.register(
            "memory_budget_bytes",
            "The memory budget (--memory-budget), bytes",
            metrics.memory_budget.clone(),
        );
        r.register(
            "memory_charged_bytes",
            "Bytes charged to the memory budget, by kind: sessions, replay_caches, requests, replies, stream_lookahead, store_cache",
            metrics.memory_charged.clone(),
        );
        r.register(
            "shared_memory_mapped_bytes",
            "Bytes of shared-memory regions mapped for clients on this host, all tenants (--shared-memory-max-bytes)",
            metrics.shared_memory_mapped.clone(),
        );
        r.register(
            "build_info",
            "Always 1; the labels name this build: server version and the libtorch it was built against",
            metrics.build_info.clone(),
        );
        metrics
            .process_registry
            .register_collector(Box::new(ProcessCollector));
        // Series with a fixed label set exist from the start (at 0), so that
        // rates work from the first scrape; per-RPC series appear with the
        // first request of their RPC, the CUDA gauge with CUDA.
        for op in STORE_OPERATIONS {
            drop(metrics.store_duration.get_or_create(&Op { op }));
            drop(metrics.store_errors.get_or_create(&Op { op }));
        }
        for action in [TtlAction::Evict, TtlAction::Delete] {
            drop(metrics.evictions.get_or_create(&Action {
                action: action.name(),
            }));
        }
        for kind in Kind::ALL {
            drop(
                metrics
                    .memory_charged
                    .get_or_create(&KindLabel { kind: kind.name() }),
            );
        }
        metrics
            .build_info
            .get_or_create(&Build {
                version: SERVER_VERSION,
                libtorch: LIBTORCH_VERSION,
            })
            .set(1);
        metrics
    }

    /// The exposition in Prometheus' text format (OpenMetrics text, which
    /// Prometheus reads as its text format).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut text = String::new();
        encode_registry(&mut text, &self.registry)?;
        encode_registry(&mut text, &self.process_registry)?;
        encode_eof(&mut text)?;
        Ok(text)
    }

    /// One finished gRPC request.
    pub fn request_finished(&self, rpc: &'static str, code: &'static str, duration: Duration) {
        self.requests.get_or_create(&RpcCode { rpc, code }).inc();
        self.request_duration
            .get_or_create(&Rpc { rpc })
            .observe(duration.as_secs_f64());
    }

    pub fn received_bytes(&self, rpc: &'static str, bytes: u64) {
        self.received_bytes
            .get_or_create(&Rpc { rpc })
            .inc_by(bytes);
    }

    pub fn sent_bytes(&self, rpc: &'static str, bytes: u64) {
        self.sent_bytes.get_or_create(&Rpc { rpc }).inc_by(bytes);
    }

    /// A request started (+1) or ended (-1).
    pub fn inflight_started(&self) {
        self.inflight.inc();
    }

    pub fn inflight_ended(&self) {
        self.inflight.dec();
    }

    /// A tensor job ran for `duration` on behalf of `rpc`.
    pub fn compute(&self, rpc: &'static str, duration: Duration) {
        self.compute_duration
            .get_or_create(&Rpc { rpc })
            .observe(duration.as_secs_f64());
    }

    /// A tensor job waited `duration` for a compute permit.
    pub fn queue_wait(&self, duration: Duration) {
        self.queue_wait.observe(duration.as_secs_f64());
    }

    /// One store operation (`op`: load_all, load, version, put, delete,
    /// ids_after) took `duration` and failed or not.
    pub fn store_operation(&self, op: &'static str, duration: Duration, failed: bool) {
        self.store_duration
            .get_or_create(&Op { op })
            .observe(duration.as_secs_f64());
        if failed {
            self.store_errors.get_or_create(&Op { op }).inc();
        }
    }

    /// The number of live sessions in the registry.
    pub fn set_sessions(&self, sessions: usize) {
        self.sessions
            .set(i64::try_from(sessions).unwrap_or(i64::MAX));
    }

    /// A request refused by load shedding.
    pub fn shed(&self) {
        self.shed.inc();
    }

    /// The accept loop paused: accepting failed for want of resources.
    pub fn accept_paused(&self) {
        self.accept_pauses.inc();
    }

    /// A session removed by the idle-session evictor.
    pub fn eviction(&self, action: TtlAction) {
        self.evictions
            .get_or_create(&Action {
                action: action.name(),
            })
            .inc();
    }

    /// The memory budget and what is charged to it now, by kind.
    pub fn set_memory_budget(&self, budget: &MemoryBudget) {
        self.memory_budget
            .set(i64::try_from(budget.limit()).unwrap_or(i64::MAX));
        for kind in Kind::ALL {
            self.memory_charged
                .get_or_create(&KindLabel { kind: kind.name() })
                .set(i64::try_from(budget.charged_for(kind)).unwrap_or(i64::MAX));
        }
    }

    /// Bytes of shared-memory regions mapped now.
    pub fn set_shared_memory_mapped(&self, bytes: u64) {
        self.shared_memory_mapped
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// CUDA memory in use on `device` ("cuda:N"), in bytes.
    pub fn set_cuda_memory(&self, device: String, bytes: u64) {
        self.cuda_memory
            .get_or_create(&DeviceLabel { device })
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_is_exposed_with_help_and_type() {
        let metrics = Metrics::new();
        let text = metrics.encode().unwrap_or_default();
        // Per-RPC and per-device series appear with their first value.
        for absent in [
            "requests",
            "request_duration_seconds",
            "compute_duration_seconds",
            "received_bytes",
            "sent_bytes",
            "cuda_memory_bytes",
        ] {
            assert!(
                !text.contains(&format!("# TYPE normserve_{absent} ")),
                "{absent}"
            );
        }
        metrics.request_finished("Forward", "OK", Duration::from_millis(1));
        metrics.compute("Forward", Duration::from_millis(1));
        metrics.received_bytes("Forward", 1);
        metrics.sent_bytes("Forward", 1);
        metrics.set_cuda_memory("cuda:0".to_owned(), 1);
        let text = metrics.encode().unwrap_or_default();
        let listed = include_str!("../../deploy/checks/metrics.txt");
        let mut count = 0;
        for line in listed
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            count += 1;
            assert!(NAMES.contains(&name), "{name} missing from NAMES");
            // Counters are described under their name without `_total`.
            let family = name
                .strip_suffix("_total")
                .filter(|_| kind == "counter")
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {family} {kind}\n")),
                "no TYPE line for {name} ({kind}) in\n{text}"
            );
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "no HELP for {name}"
            );
        }
        assert_eq!(count, NAMES.len());
        assert!(
            text.contains("normserve_store_errors_total{op=\"put\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("normserve_session_evictions_total{action=\"evict\"} 0\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    }

    #[test]
    fn the_build_is_one_series_labelled_with_the_versions() {
        let text = Metrics::new().encode().unwrap_or_default();
        let expected = format!(
            "normserve_build_info{{version=\"{}\",libtorch=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION"),
            env!("NORMSERVE_LIBTORCH_VERSION")
        );
        assert!(text.contains(&expected), "{text}");
        assert_eq!(text.matches("normserve_build_info{").count(), 1);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_are_exposed_unprefixed_with_their_conventional_types() {
        let text = Metrics::new().encode().unwrap_or_default();
        for name in super::super::process::NAMES {
            let (family, kind) = match name.strip_suffix("_total") {
                Some(family) => (family, "counter"),
                None => (name, "gauge"),
            };
            assert!(
                text.contains(&format!("# TYPE {family} {kind}\n")),
                "{name} in\n{text}"
            );
            assert!(
                text.lines()
                    .any(|line| line.starts_with(&format!("{name} "))),
                "{name} in\n{text}"
            );
        }
        assert!(!text.contains("normserve_process_"), "{text}");
    }

    #[test]
    fn histograms_have_the_documented_buckets() {
        let metrics = Metrics::new();
        metrics.queue_wait(Duration::from_micros(70));
        let text = metrics.encode().unwrap_or_default();
        let buckets: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("normserve_queue_wait_seconds_bucket"))
            .collect();
        assert_eq!(buckets.len(), DURATION_BUCKETS.len() + 1, "{text}");
        assert_eq!(
            buckets[0],
            "normserve_queue_wait_seconds_bucket{le=\"0.00005\"} 0"
        );
        assert_eq!(
            buckets[1],
            "normserve_queue_wait_seconds_bucket{le=\"0.0001\"} 1"
        );
        assert_eq!(
            buckets[17],
            "normserve_queue_wait_seconds_bucket{le=\"30.0\"} 1"
        );
        assert_eq!(
            buckets[18],
            "normserve_queue_wait_seconds_bucket{le=\"+Inf\"} 1"
        );
        assert!(
            text.contains("normserve_queue_wait_seconds_count 1\n"),
            "{text}"
        );
    }
}
