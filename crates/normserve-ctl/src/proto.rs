//! Code generated from `proto/normserve/v1/` by `build.rs` (messages and
//! client stubs, no server), confined here.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The `normserve.v1` package: messages and clients.
pub mod v1 {
    tonic::include_proto!("normserve.v1");
}

/// Encoded `FileDescriptorSet` of the API (with imports): the JSON output's
/// field names and enum names.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/normserve_ctl_descriptor.bin"));
