//! Observability: the `tracing` subscriber writing text or JSON lines to
//! stderr, filtered by the configured level, and the request-log policy (slow
//! requests, access-log sampling) ([`init`]); the Prometheus metrics
//! ([`metrics`]) and the process' own ([`process`]), the gRPC layer that
//! measures and logs every request ([`layer`]), the names requests and
//! statuses are labelled with and the current request's RPC ([`rpc`]), and
//! the `/metrics` endpoint ([`exporter`]). Never logs tensor contents or
//! tokens.

pub mod exporter;
pub mod layer;
pub mod metrics;
pub mod process;
pub mod rpc;

pub use layer::{RequestLayer, RequestLog};
pub use metrics::Metrics;
pub use rpc::{code_name, current_rpc, in_request};

use std::io::IsTerminal;
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

#[derive(Debug, thiserror::Error)]
#[error("invalid log filter {filter:?}: {reason}")]
pub struct TelemetryError {
    filter: String,
    reason: String,
}

/// Installs the global subscriber and the request-log policy. Call once,
/// from `main`, before the server is built.
pub fn init(config: &Config) -> Result<(), TelemetryError> {
    RequestLog {
        slow: (config.slow_request_ms > 0).then(|| Duration::from_millis(config.slow_request_ms)),
        sample_rate: config.access_log_sample,
    }
    .install();
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
    })?;
    // Configuration at INFO: what the request lines below DEBUG will be.
    tracing::info!(
        filter = %config.log,
        slow_request_ms = config.slow_request_ms,
        access_log_sample = config.access_log_sample,
        "request log: DEBUG, or INFO when slow or sampled, WARN/ERROR for server faults"
    );
    Ok(())
}
