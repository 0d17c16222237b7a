//! The gRPC surface: tonic services, proto <-> domain conversions
//! ([`convert`]), error -> status mapping ([`status`]) and server assembly
//! ([`serve`]): health, reflection, message limits, graceful shutdown.
//!
//! Handlers stay short: decode, call the domain, encode. No tensor math here.

pub mod auth;
mod batch_norm;
mod compare;
pub mod convert;
pub mod deadline;
mod held_body;
mod security;
mod server_info;
pub mod shedding;
mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tch::Device;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;

use crate::compute::ComputePool;
use crate::config::Config;
use crate::device::{describe_devices, device_name, DeviceError};
use crate::proto::v1 as pb;
use crate::proto::v1::batch_norm_service_server::BatchNormServiceServer;
use crate::proto::v1::compare_service_server::CompareServiceServer;
use crate::proto::v1::server_service_server::ServerServiceServer;
use crate::session::{Limits, Registry, RegistryOptions};
use crate::telemetry::{Metrics, RequestLayer};

pub use batch_norm::BatchNormApi;
pub use compare::CompareApi;
pub use security::{Security, SecurityError};
pub use server_info::ServerInfoApi;

/// The libtorch version this binary was built against (from its headers).
pub const LIBTORCH_VERSION: &str = env!("NORMSERVE_LIBTORCH_VERSION");

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
}

impl ServeError {
    /// Whether the configuration, not the running server, is at fault.
    pub fn is_config_error(&self) -> bool {
        matches!(self, ServeError::MetricsListener { .. })
    }
}

/// Binds `--metrics-addr`, when set.
pub async fn bind_metrics(config: &Config) -> Result<Option<TcpListener>, ServeError> {
    let Some(address) = config.metrics_addr else {
        return Ok(None);
    };
    TcpListener::bind(address)
        .await
        .map(Some)
        .map_err(|source| ServeError::MetricsListener { address, source })
}

/// What the server decided at start-up, for the caller to print.
#[derive(Debug, Clone)]
pub struct Startup {
    pub address: SocketAddr,
    pub device: Device,
    pub libtorch_version: &'static str,
}

/// Prepares libtorch and the device. Call once per process before serving.
pub fn prepare(config: &Config) -> Result<Device, ServeError> {
    // Intra-op threads are a process-wide libtorch setting; each compute
    // thread picks the value up on its first parallel operation.
    tch::set_num_threads(config.intra_op_threads);
    Ok(config.device.resolve(None)?)
}

/// Opens the configured store and recovers its sessions: everything that can
/// fail before the server should announce itself. The registry's compute pool
/// carries the server's [`Metrics`] (`registry.pool().metrics()`), which its
/// store reports to as well.
pub async fn open_registry(config: &Config, device: Device) -> Result<Arc<Registry>, ServeError> {
    let metrics = Arc::new(Metrics::new());
    let pool = ComputePool::with_metrics(config.resolved_compute_threads(), metrics.clone());
    let limits = Limits {
        max_sessions: config.max_sessions,
        max_sessions_per_tenant: config.tenant_max_sessions,
        max_tensor_elements: config.max_tensor_elements,
        max_num_features: config.max_num_features,
    };
    let registry = Arc::new(Registry::new(
        RegistryOptions {
            limits,
            default_device: device,
            replay_window: config.replay_window,
            replay_cache_bytes: config.replay_cache_bytes,
            stats_kernel: config.cpu_stats_kernel,
        },
        pool,
        crate::store::open(config).await?.map(|store| {
            Arc::new(crate::store::measured::MeasuredStore::new(
                store,
                metrics.clone(),
            )) as Arc<dyn crate::session::durable::SessionStore>
        }),
        metrics,
    ));
    let recovery = registry.recover().await?;
    tracing::info!(
        store = registry.store_name(),
        sessions = recovery.loaded,
        unreadable = recovery.unreadable,
        elapsed_ms = recovery.elapsed.as_secs_f64() * 1e3,
        "sessions recovered"
    );
    Ok(registry)
}

/// Loads the TLS and token files, opens the registry and serves on
/// `listener` until `shutdown` completes.
pub async fn serve(
    config: Config,
    device: Device,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_with_metrics(config, device, listener, None, shutdown).await
}

/// As [`serve`], with the metrics endpoint on `metrics_listener` when given.
pub async fn serve_with_metrics(
    config: Config,
    device: Device,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let security = Security::load(&config)?;
    let registry = open_registry(&config, device).await?;
    serve_registry_with_metrics(
        config,
        device,
        registry,
        security,
        listener,
        metrics_listener,
        shutdown,
    )
    .await
}

/// Serves `registry` on `listener` until `shutdown` completes, then drains
/// in-flight requests for at most `config.drain_seconds`. With a tokens file,
/// SIGHUP reloads it.
pub async fn serve_registry(
    config: Config,
    device: Device,
    registry: Arc<Registry>,
    security: Security,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_registry_with_metrics(config, device, registry, security, listener, None, shutdown).await
}

/// As [`serve_registry`], with the metrics endpoint (`GET /metrics`) on
/// `metrics_listener` when given, for as long as the gRPC server runs.
pub async fn serve_registry_with_metrics(
    config: Config,
    device: Device,
    registry: Arc<Registry>,
    security: Security,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let metrics = registry.pool().metrics().clone();
    let _metrics_endpoint = metrics_listener.map(|listener| {
        // Live sessions (and CUDA memory) are read at each scrape rather than
        // counted at every place a session comes or goes.
        let sessions = registry.clone();
        AbortOnDrop(tokio::spawn(crate::telemetry::exporter::serve_metrics(
            listener,
            metrics.clone(),
            Arc::new(move |metrics: &Metrics| {
                metrics.set_sessions(sessions.len());
                for (device, bytes) in crate::device::cuda_memory_in_use() {
                    metrics.set_cuda_memory(device, bytes);
                }
            }),
        )))
    });
    let compute_threads = config.resolved_compute_threads();
    let max = config.max_message_bytes;
    let batch_norm = BatchNormServiceServer::new(BatchNormApi::new(registry.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let compare = CompareServiceServer::new(CompareApi::new(
        registry.pool().clone(),
        device,
        config.max_tensor_elements,
        config.max_num_features,
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let server_info = ServerServiceServer::new(ServerInfoApi::new(
        server_info(&config, device, compute_threads, registry.store_name()),
        registry.clone(),
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, tonic_health::ServingStatus::Serving).await;

    let reflection_v1 =
        reflection(tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME).build_v1()?;
    let reflection_v1alpha =
        reflection(tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME)
            .build_v1alpha()?;

    // Large tensors: big HTTP/2 windows and frames so a 16 MiB message is not
    // throttled by the 64 KiB defaults.
    let window = (max.min(u32::MAX as usize / 2) as u32).max(1 << 20);
    let (stop_accepting, stopped) = tokio::sync::oneshot::channel::<()>();
    // TCP_NODELAY on every accepted connection: without it small replies wait
    // for the peer's delayed ACK (about 40 ms per call).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let builder = match security.tls.clone() {
        Some(tls) => Server::builder().tls_config(tls)?,
        None => Server::builder(),
    };
    let gate = auth::Gate::new(
        security.tokens.clone(),
        config.tenant_max_concurrent_requests,
    );
    let _reloader = security.tokens.clone().and_then(reload_on_sighup);
    let _expirer = config
        .session_ttl()
        .map(|ttl| expire_idle_sessions(registry.clone(), ttl, config.session_ttl_action));
    let shedder = Arc::new(
        shedding::Shedder::new(config.max_concurrent_requests).with_metrics(metrics.clone()),
    );
    let server = builder
        .initial_stream_window_size(window)
        .initial_connection_window_size(window)
        .max_frame_size(1 << 20)
        // Outermost: it sees every request, refused ones included, and the
        // final status.
        .layer(RequestLayer::new(metrics))
        .layer(tower::util::MapResponseLayer::new(
            status::decoding_error_response,
        ))
        // Shedding before authentication: an overloaded server refuses in
        // one step, and the tenant quota counts only admitted requests.
        .layer(shedding::ShedLayer::new(shedder))
        .layer(auth::AuthLayer::new(gate))
        .layer(deadline::DeadlineLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(batch_norm)
        .add_service(compare)
        .add_service(server_info)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        });
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
    let _ = stop_accepting.send(());
    match tokio::time::timeout(config.drain_timeout(), server).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("drain time exceeded; stopping with requests in flight"),
    }
    tracing::info!("server stopped");
    Ok(())
}

/// Reflection listing the services this server serves, and no others: by
/// default reflection advertises every service its descriptor sets describe,
/// served or not.
fn reflection(own_name: &str) -> tonic_reflection::server::Builder<'static> {
    let served = [
        service_name::<BatchNormServiceServer<BatchNormApi>>(),
        service_name::<ServerServiceServer<ServerInfoApi>>(),
        service_name::<CompareServiceServer<CompareApi>>(),
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
    health.set_service_status("", status).await;
    health
        .set_service_status(
            service_name::<BatchNormServiceServer<BatchNormApi>>(),
            status,
        )
        .await;
    health
        .set_service_status(service_name::<CompareServiceServer<CompareApi>>(), status)
        .await;
    health
        .set_service_status(service_name::<ServerServiceServer<ServerInfoApi>>(), status)
        .await;
}

/// Aborts its task when dropped (when the server stops).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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

fn service_name<S: tonic::server::NamedService>() -> &'static str {
    S::NAME
}

fn server_info(
    config: &Config,
    device: Device,
    compute_threads: usize,
    store: &str,
) -> pb::GetServerInfoResponse {
    let devices = describe_devices();
    pb::GetServerInfoResponse {
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        libtorch_version: LIBTORCH_VERSION.to_owned(),
        default_device: device_name(device),
        cuda_device_count: devices.len().saturating_sub(1) as i32,
        devices: devices
            .into_iter()
            .map(|d| pb::DeviceInfo {
                name: d.name,
                description: d.description,
                total_memory_bytes: d.total_memory_bytes,
            })
            .collect(),
        limits: Some(pb::Limits {
            max_sessions: config.max_sessions,
            max_tensor_elements: config.max_tensor_elements,
            max_num_features: config.max_num_features,
            max_message_bytes: config.max_message_bytes as u64,
        }),
        features: [
            "sessions",
            "forward_stream",
            "compare",
            "health",
            "reflection",
        ]
        .into_iter()
        .chain(config.tls_cert.is_some().then_some("tls"))
        .chain(config.tls_client_ca.is_some().then_some("mtls"))
        .chain(config.auth_tokens.is_some().then_some("auth"))
        .map(str::to_owned)
        .chain([
            format!("store:{store}"),
            format!(
                "durability:{}",
                if store == "none" { "none" } else { "sync" }
            ),
            format!(
                "cpu_stats_kernel:{}",
                match config.cpu_stats_kernel {
                    crate::numerics::stats::StatsKernel::Libtorch => "libtorch",
                    crate::numerics::stats::StatsKernel::Native => "native",
                }
            ),
        ])
        .collect(),
        intra_op_threads: config.intra_op_threads,
        compute_threads: compute_threads as i32,
        // Filled in per call by ServerInfoApi.
        sessions: 0,
        unreadable_sessions: 0,
        store: String::new(),
    }
}
