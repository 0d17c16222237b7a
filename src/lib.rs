//! normserve: a gRPC batch-normalization service on libtorch.
//!
//! Modules in reading order; dependencies point upwards only
//! (`numerics <- session <- store`, `auth` and `transport` on top, with `config`, `device`,
//! `compute` and `telemetry` usable anywhere). See ARCHITECTURE.md.

pub mod auth;
pub mod cli;
pub mod compute;
pub mod config;
pub mod device;
pub mod memory;
pub mod numerics;
pub mod proto;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod transport;
