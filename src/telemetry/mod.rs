//! Observability: the `tracing` subscriber writing text or JSON lines to
//! stderr, filtered by the configured level ([`init`]); the Prometheus
//! metrics ([`metrics`]), the gRPC layer that measures and logs every request
//! ([`layer`]), the names requests and statuses are labelled with and the
//! current request's RPC ([`rpc`]), and the `/metrics` endpoint
//! ([`exporter`]). Never logs tensor contents or tokens.

pub mod exporter;
pub mod layer;
pub mod metrics;
pub mod rpc;

pub use layer::RequestLayer;
pub use metrics::Metrics;
pub use rpc::{code_name, current_rpc, in_request};

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {reason}")]
pub struct TelemetryError {
    filter: String,
    reason: String,
}

/// Installs the global subscriber. Call once, from `main`.
pub fn init(config: &Config) -> Result<(), TelemetryError> {
    let filter = EnvFilter::try_new(&config.log).map_err(|e| TelemetryError {
        filter: config.log.clone(),
        reason: e.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match config.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| TelemetryError {
        filter: config.log.clone(),
        reason: e.to_string(),
    })
}
