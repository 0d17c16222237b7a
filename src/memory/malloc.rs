//! Process-wide allocator settings for a server that moves large tensors.
//!
//! glibc serves big allocations (above a dynamic threshold, 128 KiB at start)
//! with fresh `mmap`s and gives freed heap tops back to the kernel. For a
//! server that decodes, computes and encodes several 16 MiB buffers per call
//! that means every call touches fresh pages, and page faults run at about
//! 2 GB/s here — slower than the copies themselves. Raising the mmap and trim
//! thresholds and the top pad keeps freed buffers in the heap for the next
//! call to reuse.
//! libtorch's CPU allocator goes through the same `malloc`, so tensors
//! benefit too. Cost: the resident set keeps the peak working set of recent
//! calls instead of shrinking between them.

/// glibc's largest allowed mmap threshold on 64-bit targets (HEAP_MAX_SIZE / 2).
const MMAP_THRESHOLD: i32 = 32 * 1024 * 1024;
/// Free heap tops above this are returned to the kernel.
const TRIM_THRESHOLD: i32 = 256 * 1024 * 1024;
/// Slack kept when a heap grows or shrinks. For the per-thread arenas this is
/// also what decides whether a wholly free heap (up to 64 MiB) is unmapped:
/// with the 128 KiB default, a heap that held one 16 MiB message is given
/// back after every call and faulted in again on the next.
const TOP_PAD: i32 = 64 * 1024 * 1024;

/// Whether the settings took effect (false where the C library is not glibc).
pub fn retain_freed_buffers() -> bool {
    imp::retain_freed_buffers()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    /// The only `unsafe` of this module: three `mallopt` calls, made before
    /// other threads start. They take plain integers and change only glibc's
    /// allocation policy; a rejected value leaves the default in place.
    #[allow(unsafe_code)]
    pub fn retain_freed_buffers() -> bool {
        // SAFETY: mallopt has no memory-safety preconditions.
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, super::MMAP_THRESHOLD) };
        // SAFETY: as above.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, super::TRIM_THRESHOLD) };
        // SAFETY: as above.
        let pad = unsafe { libc::mallopt(libc::M_TOP_PAD, super::TOP_PAD) };
        mmap == 1 && trim == 1 && pad == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn retain_freed_buffers() -> bool {
        false
    }
}
