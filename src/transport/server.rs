//! The server's assembly, in one place: libtorch's threads and the device,
//! the one [`Metrics`] every part reports to, the store and the session
//! registry (recovered from the store), the services with health and
//! reflection, the tower layers in their order, TLS, the metrics endpoint,
//! the idle-session sweeper, SIGHUP reloads of the tokens file, the Open
//! Inference Protocol (gRPC beside the normserve services, HTTP on its own
//! listener) and the graceful drain.
//!
//! [`Server`] is the only way to run one: `main`, the integration tests and
//! the benchmarks all start it here.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tch::Device;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;

use super::convert::{CompareLimits, ServerFacts};
use super::incoming::{ThrottledIncoming, TlsIncoming};
use super::oip::{self, InferenceApi, Models};
use super::LIBTORCH_VERSION;
use super::{auth, deadline, inflight, shedding, status, Security, SecurityError};
use super::{AdmissionLayer, BatchNormApi, CompareApi, ServerInfoApi, SharedMemoryApi};
use crate::compute::ComputePool;
use crate::config::{Config, CpuStatsKernel};
use crate::device::{describe_devices, DeviceError};
use crate::memory::{format_bytes, Charge, Kind, MemoryBudget};
use crate::numerics::stats::StatsKernel;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::proto::v1::batch_norm_service_server::BatchNormServiceServer;
use crate::proto::v1::compare_service_server::CompareServiceServer;
use crate::proto::v1::server_service_server::ServerServiceServer;
use crate::proto::v1::shared_memory_service_server::SharedMemoryServiceServer;
use crate::session::durable::SessionStore;
use crate::session::{Limits, Registry, RegistryOptions, StepLimits};
use crate::shm::{SharedMemory, ShmLimits};
use crate::store::measured::MeasuredStore;
use crate::telemetry::{Metrics, RequestLayer};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("session store: {0}")]
    Store(#[from] crate::store::StoreOpenError),
    #[error("recovery: {0}")]
    Recovery(#[from] crate::session::RecoveryError),
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// The metrics address cannot be bound: a configuration error.
    #[error("--metrics-addr {address}: {source}")]
    MetricsListener {
        address: SocketAddr,
        source: std::io::Error,
    },
    /// The Open Inference Protocol's HTTP address cannot be bound: a
    /// configuration error.
    #[error("--http-addr {address}: {source}")]
    HttpListener {
        address: SocketAddr,
        source: std::io::Error,
    },
    /// Plain HTTP would carry bearer tokens and tensors in the clear beside a
    /// TLS gRPC port.
    #[error("--http-addr serves plain HTTP and cannot be combined with --tls-cert")]
    HttpWithTls,
}

impl ServeError {
    /// Whether the configuration, not the running server, is at fault.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            ServeError::MetricsListener { .. }
                | ServeError::HttpListener { .. }
                | ServeError::HttpWithTls
        )
    }
}

/// A server being assembled: [`Server::new`], optional parts, then
/// [`Server::serve`].
pub struct Server {
    config: Config,
    device: Device,
    /// The server's one set of metrics, handed to every part that reports.
    metrics: Arc<Metrics>,
    /// None: loaded from the configuration when serving starts.
    security: Option<Security>,
    metrics_listener: Option<TcpListener>,
    /// The Open Inference Protocol's HTTP listener (`--http-addr`).
    http_listener: Option<TcpListener>,
    /// None: opened when serving starts.
    registry: Option<Arc<Registry>>,
    /// The server-wide memory budget (`--memory-budget`).
    budget: Arc<MemoryBudget>,
    /// The embedded store's cache, charged to the budget.
    store_cache: Option<Charge>,
}

impl Server {
    /// Prepares libtorch and resolves the configured device. Call once per
    /// process: libtorch's intra-op threads are a process-wide setting (each
    /// compute thread picks it up on its first parallel operation).
    pub fn new(config: Config) -> Result<Server, ServeError> {
        tch::set_num_threads(config.intra_op_threads);
        let device = config.device.resolve(None)?;
        let (budget, source) = crate::memory::limit::resolve_budget(config.memory_budget);
        tracing::info!(budget = %format_bytes(budget), %source, "memory budget");
        Ok(Server {
            budget: MemoryBudget::new(budget),
            store_cache: None,
            config,
            device,
            metrics: Arc::new(Metrics::new()),
            security: None,
            metrics_listener: None,
            http_listener: None,
            registry: None,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The default device of sessions and Compare.
    pub fn device(&self) -> Device {
        self.device
    }

    /// TLS and tokens already loaded (by a caller that must tell a bad file
    /// apart from other failures).
    pub fn with_security(mut self, security: Security) -> Server {
        self.security = Some(security);
        self
    }

    /// Serves the metrics endpoint (`GET /metrics`) on `listener` for as long
    /// as the gRPC server runs.
    pub fn with_metrics_listener(mut self, listener: TcpListener) -> Server {
        self.metrics_listener = Some(listener);
        self
    }

    /// Binds `--metrics-addr`, when set, for the metrics endpoint; its
    /// address.
    pub async fn bind_metrics(&mut self) -> Result<Option<SocketAddr>, ServeError> {
        let Some(address) = self.config.metrics_addr else {
            return Ok(None);
        };
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| ServeError::MetricsListener { address, source })?;
        let bound = listener.local_addr()?;
        self.metrics_listener = Some(listener);
        Ok(Some(bound))
    }

    /// Serves the Open Inference Protocol's HTTP/REST API on `listener`.
    pub fn with_http_listener(mut self, listener: TcpListener) -> Server {
        self.http_listener = Some(listener);
        self
    }

    /// Binds `--http-addr`, when set and not bound yet, for the Open
    /// Inference Protocol's HTTP/REST API; its address. Serving binds it when
    /// this was not called.
    pub async fn bind_http(&mut self) -> Result<Option<SocketAddr>, ServeError> {
        if let Some(listener) = &self.http_listener {
            return Ok(Some(listener.local_addr()?));
        }
        let Some(address) = self.config.http_addr else {
            return Ok(None);
        };
        if self.config.tls_cert.is_some() {
            return Err(ServeError::HttpWithTls);
        }
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| ServeError::HttpListener { address, source })?;
        let bound = listener.local_addr()?;
        tracing::info!(address = %bound, "Open Inference Protocol HTTP listening (/v2)");
        self.http_listener = Some(listener);
        Ok(Some(bound))
    }

    /// Opens the configured store and recovers its sessions: everything that
    /// can fail before the server should announce itself. Serving opens it
    /// when this was not called.
    pub async fn open_registry(&mut self) -> Result<Arc<Registry>, ServeError> {
        if let Some(registry) = &self.registry {
            return Ok(registry.clone());
        }
        let config = &self.config;
        let pool = ComputePool::new(config.resolved_compute_threads(), self.metrics.clone());
        // The embedded store's cache is part of the budget, charged for as
        // long as the server lives.
        let cache_bytes = crate::memory::limit::store_cache_bytes(self.budget.limit());
        let embedded = config.store_kind() == crate::config::StoreKind::Embedded;
        self.store_cache =
            embedded.then(|| self.budget.charge_anyway(cache_bytes, Kind::StoreCache));
        let cache_bytes = usize::try_from(cache_bytes).ok();
        let store = crate::store::open(config, cache_bytes).await?.map(|store| {
            Arc::new(MeasuredStore::new(store, self.metrics.clone())) as Arc<dyn SessionStore>
        });
        let options = RegistryOptions {
            limits: Limits {
                max_sessions: config.max_sessions,
                max_sessions_per_tenant: config.tenant_max_sessions,
                max_tensor_elements: config.max_tensor_elements,
                max_num_features: config.max_num_features,
                // The rest of the reply (ids, configurations, labels) is small
                // beside the tensors; a quarter of the message is kept for it.
                max_page_bytes: config.max_message_bytes / 4 * 3,
            },
            default_device: self.device,
            replay_window: config.replay_window,
            replay_cache_bytes: config.replay_cache_bytes,
            replay_cache_total_bytes: config.replay_cache_total_bytes,
            steps: StepLimits {
                max_world_size: config.max_world_size,
                max_open_steps: config.max_open_steps,
                max_waiting_bytes: config.max_step_waiting_bytes,
            },
            stats_kernel: match config.cpu_stats_kernel {
                CpuStatsKernel::Libtorch => StatsKernel::Libtorch,
                CpuStatsKernel::Native => StatsKernel::Native,
            },
            memory_budget: self.budget.clone(),
        };
        let registry = Arc::new(Registry::new(options, pool, store, self.metrics.clone()));
        let recovery = registry.recover().await?;
        tracing::info!(
            store = registry.store_name(),
            sessions = recovery.loaded,
            unreadable = recovery.unreadable,
            elapsed_ms = (recovery.elapsed.as_secs_f64() * 1e6).round() / 1e3,
            "sessions recovered"
        );
        self.registry = Some(registry.clone());
        Ok(registry)
    }

    /// Serves on `listener` until `shutdown` completes, then drains in-flight
    /// requests for at most `--drain-seconds`. With a tokens file, SIGHUP
    /// reloads it.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let security = match self.security.take() {
            Some(security) => security,
            None => Security::load(&self.config)?,
        };
        let registry = self.open_registry().await?;
        // Bound before the gRPC port answers: a client that got a gRPC answer
        // can reach the HTTP API.
        self.bind_http().await?;
        let Server {
            config,
            device,
            metrics,
            metrics_listener,
            http_listener,
            budget,
            store_cache: _store_cache,
            ..
        } = self;
        let shared_memory = Arc::new(SharedMemory::new(ShmLimits {
            enabled: config.shared_memory.is_on(),
            dir: std::path::PathBuf::from("/dev/shm"),
            max_bytes: config.shared_memory_max_bytes,
            tenant_max_regions: config.tenant_shared_memory_max_regions,
            tenant_max_bytes: config.tenant_shared_memory_max_bytes,
            idle: config.shared_memory_idle(),
        }));
        let _metrics_endpoint = metrics_listener.map(|listener| {
            // Live sessions (and CUDA memory) are read at each scrape rather than
            // counted at every place a session comes or goes.
            let sessions = registry.clone();
            let budget = budget.clone();
            let shared_memory = shared_memory.clone();
            AbortOnDrop(tokio::spawn(crate::telemetry::exporter::serve_metrics(
                listener,
                metrics.clone(),
                Arc::new(move |metrics: &Metrics| {
                    metrics.set_sessions(sessions.len());
                    metrics.set_memory_budget(&budget);
                    metrics.set_shared_memory_mapped(shared_memory.totals().0);
                    for (device, bytes) in crate::device::cuda_memory_in_use() {
                        metrics.set_cuda_memory(device, bytes);
                    }
                }),
            )))
        });
        let max = config.max_message_bytes;
        let look_ahead =
            super::stream::LookAhead::new(config.stream_look_ahead_bytes, budget.clone());

        let batch_norm = BatchNormServiceServer::new(BatchNormApi::new(
            registry.clone(),
            look_ahead.clone(),
            shared_memory.clone(),
        ))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
        let shared_memory_service =
            SharedMemoryServiceServer::new(SharedMemoryApi::new(shared_memory.clone()));
        let _region_expirer = config
            .shared_memory_idle()
            .filter(|_| config.shared_memory.is_on())
            .map(|idle| expire_idle_regions(shared_memory.clone(), idle));
        let compare_limits = CompareLimits {
            max_tensor_elements: config.max_tensor_elements,
            max_input_elements: config.compare_max_tensor_elements,
            default_device: device,
        };
        // Compare's own permits: its large jobs never hold those of Forwards.
        let compare_pool = ComputePool::new(config.compare_threads as usize, metrics.clone());
        let compare = CompareServiceServer::new(CompareApi::new(
            compare_pool,
            compare_limits,
            config.max_num_features,
        ))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
        let server_info = ServerServiceServer::new(ServerInfoApi::new(
            facts(&config, device),
            registry.clone(),
            shared_memory.clone(),
        ))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);

        // ServerReady / `/v2/health/ready` turn false when the drain starts.
        let ready = Arc::new(AtomicBool::new(true));
        let models = Arc::new(Models::new(registry.clone(), ready.clone()));
        let inference =
            GrpcInferenceServiceServer::new(InferenceApi::new(models.clone(), look_ahead))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max);

        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, tonic_health::ServingStatus::Serving).await;

        let reflection_v1 =
            reflection(tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME)
                .build_v1()?;
        let reflection_v1alpha =
            reflection(tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME)
                .build_v1alpha()?;

        // Large tensors: big HTTP/2 windows and frames so a 16 MiB message is not
        // throttled by the 64 KiB defaults.
        let window = (max.min(u32::MAX as usize / 2) as u32).max(1 << 20);
        let (stop_accepting, stopped) = tokio::sync::oneshot::channel::<()>();
        // TCP_NODELAY on every accepted connection: without it small replies wait
        // for the peer's delayed ACK (about 40 ms per call).
        let incoming = ThrottledIncoming::new(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            metrics.clone(),
            config.handshake_timeout(),
        );
        // No tls_config here: with TLS, TlsIncoming does the handshake, under
        // the same deadline as the HTTP/2 preface.
        let builder = tonic::transport::Server::builder();
        let gate = Arc::new(auth::Gate::new(
            security.tokens.clone(),
            config.tenant_max_concurrent_requests,
        ));
        let _reloader = security.tokens.clone().and_then(reload_on_sighup);
        let _expirer = config
            .session_ttl()
            .map(|ttl| expire_idle_sessions(registry.clone(), ttl, config.session_ttl_action));
        let shedder = Arc::new(shedding::Shedder::new(
            config.max_concurrent_requests,
            metrics.clone(),
        ));
        // The HTTP API shares the gRPC port's admission: one server-wide
        // limit, one token table, one count per tenant.
        let _http_endpoint = http_listener.map(|listener| {
            let api = oip::http::HttpApi {
                models: models.clone(),
                shedder: shedder.clone(),
                gate: gate.clone(),
                limits: oip::http::HttpLimits {
                    max_body_bytes: max,
                    request_timeout: std::time::Duration::from_secs(
                        config.http_request_timeout_seconds,
                    ),
                },
                budget: budget.clone(),
            };
            AbortOnDrop(tokio::spawn(oip::http::serve_http(listener, Arc::new(api))))
        });
        let server = builder
            // One connection cannot hold an unbounded number of calls open.
            .max_concurrent_streams(Some(config.max_streams_per_connection).filter(|&max| max > 0))
            // Pings find peers that vanished without closing their connection.
            .http2_keepalive_interval(config.http2_keepalive())
            .http2_keepalive_timeout(config.http2_keepalive())
            .initial_stream_window_size(window)
            .initial_connection_window_size(window)
            .max_frame_size(1 << 20)
            // Outermost: it sees every request, refused ones included, and the
            // final status.
            .layer(RequestLayer::new(metrics))
            .layer(tower::util::MapResponseLayer::new(
                status::decoding_error_response,
            ))
            // The client's deadline covers the wait for its first message.
            .layer(deadline::DeadlineLayer)
            // Messages charged to the memory budget as their length prefix
            // arrives, before anything gathers them: its body wrapper is the
            // one nearest the connection, so the bytes admission holds while
            // it waits for a first message are counted too. A call refused
            // on its headers is never read, so never charged.
            .layer(inflight::InflightLayer::new(budget.clone(), max))
            // The token on the headers; then, once the first message has
            // arrived, the server-wide place before the tenant's (an
            // overloaded server refuses in one step, and the tenant quota
            // counts only admitted requests).
            .layer(AdmissionLayer::new(
                Arc::new((shedder, gate)),
                config.request_idle_timeout(),
            ))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(batch_norm)
            .add_service(compare)
            .add_service(server_info)
            .add_service(shared_memory_service)
            .add_service(inference);
        let stopped = async {
            let _ = stopped.await;
        };
        let server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
            match security.tls.clone() {
                Some(tls) => Box::pin(
                    server.serve_with_incoming_shutdown(TlsIncoming::new(incoming, tls), stopped),
                ),
                None => Box::pin(server.serve_with_incoming_shutdown(incoming, stopped)),
            };
        tokio::pin!(server);

        tokio::select! {
            result = &mut server => return Ok(result?),
            () = shutdown => {}
        }
        tracing::info!(
            drain_seconds = config.drain_seconds,
            "shutdown requested: health NOT_SERVING, draining"
        );
        set_health(&health, tonic_health::ServingStatus::NotServing).await;
        ready.store(false, Ordering::Relaxed);
        let _ = stop_accepting.send(());
        match tokio::time::timeout(config.drain_timeout(), server).await {
            Ok(result) => result?,
            Err(_) => tracing::warn!("drain time exceeded; stopping with requests in flight"),
        }
        tracing::info!("server stopped");
        Ok(())
    }
}

/// What GetServerInfo reports that does not change while the server runs.
fn facts(config: &Config, device: Device) -> ServerFacts {
    ServerFacts {
        server_version: env!("CARGO_PKG_VERSION"),
        libtorch_version: LIBTORCH_VERSION,
        default_device: device,
        devices: describe_devices(),
        max_sessions: config.max_sessions,
        max_tensor_elements: config.max_tensor_elements,
        max_num_features: config.max_num_features,
        max_message_bytes: config.max_message_bytes,
        replay_cache_total_bytes: config.replay_cache_total_bytes,
        shared_memory: config.shared_memory.is_on(),
        shared_memory_max_bytes: config.shared_memory_max_bytes,
        store: config.store_kind(),
        durability: config.durability,
        cpu_stats_kernel: config.cpu_stats_kernel,
        tls: config.tls_cert.is_some(),
        mtls: config.tls_client_ca.is_some(),
        auth: config.auth_tokens.is_some(),
        intra_op_threads: config.intra_op_threads,
        compute_threads: config.resolved_compute_threads(),
    }
}

/// Reflection listing the services this server serves, and no others: by
/// default reflection advertises every service its descriptor sets describe,
/// served or not.
fn reflection(own_name: &str) -> tonic_reflection::server::Builder<'static> {
    let served = [
        service_name::<BatchNormServiceServer<BatchNormApi>>(),
        service_name::<ServerServiceServer<ServerInfoApi>>(),
        service_name::<CompareServiceServer<CompareApi>>(),
        service_name::<GrpcInferenceServiceServer<InferenceApi>>(),
        service_name::<SharedMemoryServiceServer<SharedMemoryApi>>(),
        tonic_health::pb::health_server::SERVICE_NAME,
        own_name,
    ];
    served.into_iter().fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
        |builder, name| builder.with_service_name(name),
    )
}

async fn set_health(health: &HealthReporter, status: tonic_health::ServingStatus) {
    let services = [
        "",
        service_name::<BatchNormServiceServer<BatchNormApi>>(),
        service_name::<CompareServiceServer<CompareApi>>(),
        service_name::<ServerServiceServer<ServerInfoApi>>(),
        service_name::<GrpcInferenceServiceServer<InferenceApi>>(),
        service_name::<SharedMemoryServiceServer<SharedMemoryApi>>(),
    ];
    for service in services {
        health.set_service_status(service, status).await;
    }
}

fn service_name<S: tonic::server::NamedService>() -> &'static str {
    S::NAME
}

/// Aborts its task when dropped (when the server stops).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Unregisters shared-memory regions unused for `idle`, checked every
/// quarter of it (between 100 ms and 30 s), for as long as the guard lives.
fn expire_idle_regions(shared_memory: Arc<SharedMemory>, idle: std::time::Duration) -> AbortOnDrop {
    let every = (idle / 4).clamp(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(30),
    );
    AbortOnDrop(tokio::spawn(async move {
        let mut sweeps = tokio::time::interval(every);
        sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            sweeps.tick().await;
            let expired = shared_memory.expire_idle();
            if expired > 0 {
                tracing::info!(regions = expired, "idle shared memory regions unregistered");
            }
        }
    }))
}

/// Sweeps idle sessions out every quarter of the TTL (between 100 ms and
/// 30 s), for as long as the returned guard lives.
fn expire_idle_sessions(
    registry: Arc<Registry>,
    ttl: std::time::Duration,
    action: crate::config::TtlAction,
) -> AbortOnDrop {
    let every = (ttl / 4).clamp(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(30),
    );
    tracing::info!(
        ttl_seconds = ttl.as_secs(),
        ?action,
        sweep_ms = every.as_millis() as u64,
        "idle session TTL on"
    );
    AbortOnDrop(tokio::spawn(async move {
        let mut sweeps = tokio::time::interval(every);
        sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            sweeps.tick().await;
            registry.expire_idle(ttl, action).await;
        }
    }))
}

/// Reloads the tokens file on every SIGHUP; a file that does not load leaves
/// the previous tokens in force.
#[cfg(unix)]
fn reload_on_sighup(tokens: Arc<crate::auth::Tokens>) -> Option<AbortOnDrop> {
    use tokio::signal::unix::{signal, SignalKind};
    // Registered before serving starts: a SIGHUP sent once the server answers
    // is never lost (nor does it terminate the process, SIGHUP's default).
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => hangup,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; the tokens file will not be reloaded");
            return None;
        }
    };
    Some(AbortOnDrop(tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            match tokens.reload() {
                Ok(count) => tracing::info!(
                    path = %tokens.path().display(),
                    tokens = count,
                    "tokens file reloaded"
                ),
                Err(error) => tracing::error!(
                    %error,
                    "tokens file not reloaded; the previous tokens stay in force"
                ),
            }
        }
    })))
}

#[cfg(not(unix))]
fn reload_on_sighup(_tokens: Arc<crate::auth::Tokens>) -> Option<AbortOnDrop> {
    None
}
