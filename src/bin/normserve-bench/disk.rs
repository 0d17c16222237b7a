//! The disk's floor under `--durability sync`: how long one write takes to
//! become durable (`pwrite` + `fdatasync` of 4 KiB, and of 32 KiB: the
//! redb page that holds a 1024-channel session's record) in the data
//! directory of the server
//! under test. No store, whatever its design, makes a commit durable
//! sooner than this, so the difference between a `_sync` scenario and its
//! `--durability none` twin reads against it. Measured after the
//! scenarios, so it does not compete with them; it talks to no server.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};

/// Sizes measured, in bytes.
const SIZES: [usize; 2] = [4 << 10, 32 << 10];
/// Writes per size.
const WRITES: usize = 400;
/// The file's preallocated length: written once with zeros and made durable
/// first, so the timed writes change data blocks only (no block allocation
/// or file size in the journal of the file system), as a store's do.
const LENGTH: usize = 1 << 20;

/// p50 and p99 in µs of one durable write of each size in a scratch file
/// in `dir` (removed afterwards); the error as text if the file cannot be
/// written.
pub fn durable_write_floor(dir: &Path) -> Value {
    let path = dir.join("normserve-bench-disk-floor");
    let measured = measure(&path);
    let _ = std::fs::remove_file(&path);
    match measured {
        Ok(sizes) => json!({ "dir": dir.display().to_string(), "writes": WRITES, "sizes": sizes }),
        Err(e) => json!({ "dir": dir.display().to_string(), "error": e.to_string() }),
    }
}

fn measure(path: &Path) -> std::io::Result<Vec<Value>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all_at(&vec![0u8; LENGTH], 0)?;
    file.sync_all()?;
    SIZES
        .iter()
        .map(|&size| {
            let (p50, p99) = timed_writes(&file, size)?;
            Ok(json!({ "bytes": size, "p50_us": p50, "p99_us": p99 }))
        })
        .collect()
}

/// (p50, p99) in µs of `WRITES` writes of `size` bytes, each followed by
/// `fdatasync`, walking through the preallocated file as a log would.
fn timed_writes(file: &File, size: usize) -> std::io::Result<(f64, f64)> {
    let block = vec![0x5au8; size];
    let slots = LENGTH / size;
    let mut micros = Vec::with_capacity(WRITES);
    for i in 0..WRITES {
        let start = Instant::now();
        file.write_all_at(&block, ((i % slots) * size) as u64)?;
        file.sync_data()?;
        micros.push(start.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.5), at(0.99)))
}
