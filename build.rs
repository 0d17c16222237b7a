//! Build script: compiles `proto/` without a system `protoc`, emits the file
//! descriptor set served by reflection, and links libtorch so that the binary
//! finds it at run time (rpath) and keeps `libtorch_cuda` as a needed library.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

const PROTO_FILES: &[&str] = &[
    "proto/normserve/v1/tensor.proto",
    "proto/normserve/v1/batch_norm.proto",
    "proto/normserve/v1/compare.proto",
    "proto/normserve/v1/server.proto",
    "proto/normserve/v1/shared_memory.proto",
    // The Open Inference Protocol's gRPC service (package `inference`).
    "proto/inference/grpc_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    compile_protos()?;
    link_libtorch()?;
    Ok(())
}

fn compile_protos() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTO_FILES)?;
    fs::write(
        out_dir.join("normserve_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        // Tensor bytes decode into `bytes::Bytes`: a slice of the received
        // buffer instead of a fresh copy.
        .bytes(".")
        // Each received message decoded from its own bytes (src/proto_codec.rs).
        .codec_path("crate::proto_codec::WholeMessageCodec")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

/// Where libtorch is: `$LIBTORCH` (the Makefile always sets it), else the
/// environment `scripts/provision.sh` creates in the user's cache.
fn libtorch_dir() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Some(dir) = env::var_os("LIBTORCH") {
        return Some(PathBuf::from(dir));
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    let lib = cache.join("normserve/torch-2.11.0/lib");
    let python = fs::read_dir(&lib)
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("python"))?;
    Some(python.path().join("site-packages/torch"))
}

fn link_libtorch() -> Result<(), Box<dyn std::error::Error>> {
    let Some(libtorch) = libtorch_dir() else {
        return Err("libtorch not found: set LIBTORCH or run `make setup`".into());
    };
    let lib_dir = libtorch.join("lib");
    println!(
        "cargo:rustc-env=NORMSERVE_LIBTORCH_VERSION={}",
        libtorch_version(&libtorch)
    );
    // rpath: the binary finds libtorch without LD_LIBRARY_PATH. The wheel's own
    // libraries carry rpaths to the CUDA libraries beside them.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    // rustc links with --as-needed; nothing in our code references a symbol of
    // libtorch_cuda directly (CUDA kernels register themselves when the library
    // loads), so the linker would drop it and CUDA would be invisible at run
    // time. Re-list it after --no-as-needed so it stays a DT_NEEDED entry.
    if lib_dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib_dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    Ok(())
}

/// "MAJOR.MINOR.PATCH" from libtorch's headers, the version we compile against.
fn libtorch_version(libtorch: &Path) -> String {
    let candidates = [
        "include/torch/headeronly/version.h",
        "include/torch/csrc/api/include/torch/version.h",
    ];
    for header in candidates {
        let Ok(text) = fs::read_to_string(libtorch.join(header)) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(&format!("#define {name} ")))
                .map(|v| v.trim().to_owned())
        };
        if let (Some(a), Some(b), Some(c)) = (
            field("TORCH_VERSION_MAJOR"),
            field("TORCH_VERSION_MINOR"),
            field("TORCH_VERSION_PATCH"),
        ) {
            return format!("{a}.{b}.{c}");
        }
    }
    "unknown".to_owned()
}
