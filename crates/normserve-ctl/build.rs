//! Build script: the client stubs and messages of `proto/normserve/v1/`
//! (no system `protoc`), with type names for the JSON output, and the file
//! descriptor set that output reads field names and enums from.

use std::env;
use std::fs;
use std::path::PathBuf;

const PROTO_FILES: &[&str] = &[
    "normserve/v1/tensor.proto",
    "normserve/v1/batch_norm.proto",
    "normserve/v1/compare.proto",
    "normserve/v1/server.proto",
    "normserve/v1/shared_memory.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    // The workspace's one copy of the contract.
    let proto_dir = manifest_dir.join("../../proto");
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut compiler = protox::Compiler::new([&proto_dir])?;
    compiler.include_imports(true);
    compiler.open_files(PROTO_FILES)?;
    fs::write(
        out_dir.join("normserve_ctl_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    let mut config = tonic_prost_build::Config::new();
    // `prost::Name` on every message: the JSON output finds a message's
    // descriptor by its full name.
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_server(false)
        // Tensor bytes as `bytes::Bytes`, as the server decodes them.
        .bytes(".")
        .compile_fds_with_config(compiler.file_descriptor_set(), config)?;
    Ok(())
}
