//! Code generated from `proto/normserve/v1/` and `proto/inference/` by
//! `build.rs`, confined here.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The `normserve.v1` package: messages, client and server stubs.
pub mod v1 {
    tonic::include_proto!("normserve.v1");
}

/// The `inference` package: the Open Inference Protocol's gRPC service
/// (KServe v2 with Triton's streaming extension).
pub mod inference {
    tonic::include_proto!("inference");
}

/// Encoded `FileDescriptorSet` of the API (with imports), served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/normserve_descriptor.bin"));
