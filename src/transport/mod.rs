//! The gRPC surface: tonic services, proto <-> domain conversions
//! ([`convert`]), error -> status mapping ([`status`]), the tower layers
//! (admission: [`shedding`] and [`auth`]; [`deadline`]; messages in flight
//! against the memory budget: [`inflight`]), the Open Inference
//! Protocol ([`oip`]: gRPC and HTTP) and the server's
//! assembly ([`Server`]): health, reflection, message limits, graceful
//! shutdown.
//!
//! Handlers stay short: decode, call the domain, encode. No tensor math here.

pub mod admission;
pub mod auth;
mod batch_norm;
mod compare;
pub mod convert;
pub mod deadline;
mod idle;
mod incoming;
pub mod inflight;
pub mod oip;
mod security;
mod server;
mod server_info;
mod shared_memory;
pub mod shedding;
mod status;
pub mod stream;

pub use admission::AdmissionLayer;
pub use batch_norm::BatchNormApi;
pub use compare::CompareApi;
pub use security::{Security, SecurityError};
pub use server::{ServeError, Server};
pub use server_info::ServerInfoApi;
pub use shared_memory::SharedMemoryApi;

/// The libtorch version this binary was built against (from its headers).
pub use crate::telemetry::metrics::LIBTORCH_VERSION;
