//! normserve: a gRPC batch-normalization service on libtorch.
//!
//! Modules in reading order, from the math up to the gRPC surface.
//! Dependencies point upwards only: `numerics <- session <- store`, `auth`
//! and `transport` on top; `config`, `device`, `compute` and `telemetry` may
//! be used anywhere. The operator command line is its own crate,
//! `normserve-ctl` (no libtorch), which `normserve <command>` runs. See
//! ARCHITECTURE.md.

// Batch-norm math on tensors: no gRPC, no tokio, no I/O.
pub mod numerics;
// Sessions, their registry and the SessionStore trait: no proto types.
pub mod session;
// SessionStore backends (embedded redb, Redis).
pub mod store;

// Used anywhere: options, devices, the compute pool, observability, process
// settings (malloc tuning, the descriptor limit).
pub mod compute;
pub mod config;
pub mod device;
pub mod fd_limit;
pub mod memory;
pub mod scheduler;
pub mod telemetry;

// Shared-memory regions of clients on this host (mappings, per-tenant table).
pub mod shm;

// Generated gRPC code, confined to one module, and the codec it uses.
pub mod proto;
pub mod proto_codec;
// The tokens file and who a caller is.
pub mod auth;
// The operator command line's .npy reader, on this crate's proto types.
pub mod cli;
// The gRPC server: services, conversions, status mapping, layers, assembly.
pub mod transport;
