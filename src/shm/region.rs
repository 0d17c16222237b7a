//! One registered region: `<dir>/<name>` (dir is /dev/shm) opened without
//! following symbolic links, checked to be a regular file of a tmpfs, mapped
//! MAP_SHARED once for the region's whole life, watched by the SIGBUS guard;
//! ranges of it viewed as `Bytes` (an input read in place) or written (an
//! output, computed into the range or copied in). Before each use the object is checked: still as large as the
//! region (fstat) and still the object its name resolves to (not unlinked).
//!
//! Owns the `unsafe` of the mappings (fstatfs, mmap, munmap, the views and
//! the writes, and a range as [`ExternalMemory`] that a Forward's output is
//! computed into). The client shares these bytes and may write them while
//! the server reads them: the server only hands them to libtorch, its own
//! float kernels and `memcpy`, which treat them as raw values, and never
//! derives a Rust reference that it keeps across a call.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::range::{Mapped, RegionRange};
use super::sigbus::{self, Watch};
use super::ShmError;
use crate::numerics::ExternalMemory;

/// tmpfs' f_type (linux/magic.h).
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// A mapped region of a shared-memory object.
pub struct Region {
    name: String,
    path: PathBuf,
    offset: u64,
    byte_size: u64,
    file: File,
    device: u64,
    inode: u64,
    /// The mapping: page-aligned start and length (as addresses: no raw
    /// pointers kept).
    map_start: usize,
    map_len: usize,
    /// Address of the region's first byte (map_start + offset's remainder).
    data: usize,
    // Dropped before the mapping is unmapped (see Drop).
    watch: Option<Watch>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("name", &self.name)
            .field("offset", &self.offset)
            .field("byte_size", &self.byte_size)
            .finish_non_exhaustive()
    }
}

impl Region {
    /// Opens and maps `byte_size` bytes of `dir/name` from `offset`. `name`
    /// must have been validated ([`super::check_name`]).
    pub fn open(dir: &Path, name: &str, offset: u64, byte_size: u64) -> Result<Region, ShmError> {
        let path = dir.join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|error| match error.raw_os_error() {
                Some(libc::ENOENT) => ShmError::NoObject(name.to_owned()),
                Some(libc::EACCES) | Some(libc::EPERM) => {
                    ShmError::PermissionDenied(name.to_owned())
                }
                Some(libc::ELOOP) => ShmError::NotShared(format!(
                    "/dev/shm/{name} is a symbolic link; register the object itself"
                )),
                _ => ShmError::NotShared(format!("/dev/shm/{name} cannot be opened: {error}")),
            })?;
        let meta = file
            .metadata()
            .map_err(|e| ShmError::NotShared(format!("/dev/shm/{name} cannot be examined: {e}")))?;
        if !meta.file_type().is_file() {
            return Err(ShmError::NotShared(format!(
                "/dev/shm/{name} is not a regular file"
            )));
        }
        if !is_tmpfs(&file) {
            return Err(ShmError::NotShared(format!(
                "/dev/shm/{name} is not on a tmpfs (shared memory)"
            )));
        }
        let end = offset
            .checked_add(byte_size)
            .ok_or_else(|| ShmError::InvalidArgument("offset + byte_size overflows".into()))?;
        if meta.len() < end {
            return Err(ShmError::NotShared(format!(
                "/dev/shm/{name} holds {} bytes, fewer than offset + byte_size = {end}",
                meta.len()
            )));
        }
        if !sigbus::install() {
            return Err(ShmError::Unavailable(
                "the SIGBUS guard could not be installed".into(),
            ));
        }
        let page = sigbus::page_size() as u64;
        let map_offset = offset / page * page;
        let lead = offset - map_offset;
        let too_large = || ShmError::InvalidArgument(format!("byte_size {byte_size} is too large"));
        let map_len = usize::try_from(lead + byte_size).map_err(|_| too_large())?;
        let file_offset = libc::off_t::try_from(map_offset).map_err(|_| too_large())?;
        #[allow(unsafe_code)]
        // SAFETY: a fresh shared mapping of an open file descriptor; the
        // kernel picks the address; the result is checked.
        let mapped = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                file_offset,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(ShmError::MapFailed(
                std::io::Error::last_os_error().to_string(),
            ));
        }
        let map_start = mapped as usize;
        let mut region = Region {
            name: name.to_owned(),
            path,
            offset,
            byte_size,
            device: meta.dev(),
            inode: meta.ino(),
            file,
            map_start,
            map_len,
            data: map_start + lead as usize,
            watch: None,
        };
        // Dropping `region` on failure unmaps it.
        region.watch = Some(Watch::new(map_start, map_len).ok_or_else(|| {
            ShmError::LimitExceeded(format!(
                "the server maps at most {} regions at once",
                sigbus::MAX_SLOTS
            ))
        })?);
        Ok(region)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn byte_size(&self) -> u64 {
        self.byte_size
    }

    /// Whether `dir/name` is (still) the object this region maps.
    pub fn is_object(&self, device: u64, inode: u64) -> bool {
        self.device == device && self.inode == inode
    }

    /// Checks, before a use, that the object is still there under its name
    /// and still covers the region; a region for which this fails is broken
    /// for good (the caller unregisters it).
    pub fn check_intact(&self) -> Result<(), ShmError> {
        if self.faulted() {
            return Err(ShmError::Truncated(self.name.clone()));
        }
        let size = self
            .file
            .metadata()
            .map_err(|_| ShmError::Truncated(self.name.clone()))?
            .len();
        if size < self.offset.saturating_add(self.byte_size) {
            return Err(ShmError::Truncated(self.name.clone()));
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if self.is_object(meta.dev(), meta.ino()) => Ok(()),
            _ => Err(ShmError::Unlinked(self.name.clone())),
        }
    }

    /// True once the SIGBUS guard had to replace one of its pages.
    pub fn faulted(&self) -> bool {
        self.watch.as_ref().is_some_and(Watch::faulted)
    }
}

impl Mapped for Region {
    fn name(&self) -> &str {
        &self.name
    }

    fn address_of(&self, offset: u64) -> usize {
        self.data + offset as usize
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.watch = None;
        #[allow(unsafe_code)]
        // SAFETY: the mapping was created by `open` with this address and
        // length; the region is dropped when no view of it remains (views
        // hold an Arc of it).
        unsafe {
            libc::munmap(self.map_start as *mut libc::c_void, self.map_len);
        }
    }
}

/// Whether `file` lives on a tmpfs.
fn is_tmpfs(file: &File) -> bool {
    #[allow(unsafe_code)]
    // SAFETY: fstatfs fills the zeroed struct for an open descriptor.
    unsafe {
        let mut stats: libc::statfs = std::mem::zeroed();
        libc::fstatfs(file.as_raw_fd(), &mut stats) == 0 && stats.f_type as i64 == TMPFS_MAGIC
    }
}

/// A checked range of a /dev/shm region.
pub type Range = RegionRange<Region>;

impl Range {
    /// The range's bytes in place (no copy), keeping the mapping alive for as
    /// long as they are held.
    pub fn bytes(&self) -> Bytes {
        if self.len == 0 {
            return Bytes::new();
        }
        Bytes::from_owner(View(self.clone()))
    }

    /// Copies `source` (exactly the range's length) into the range, after
    /// checking the object is still intact; fails if a page vanished meanwhile.
    pub fn write(&self, source: &[u8]) -> Result<(), ShmError> {
        if source.len() as u64 != self.len {
            return Err(ShmError::InvalidArgument(format!(
                "{} bytes for a range of {}",
                source.len(),
                self.len
            )));
        }
        self.region.check_intact()?;
        if !source.is_empty() {
            #[allow(unsafe_code)]
            // SAFETY: the range lies within the live mapping (checked when
            // it was made; the Arc keeps the mapping); `copy` allows the
            // source to overlap it; a page lost to a truncation meanwhile is
            // replaced by the SIGBUS guard and reported below.
            unsafe {
                std::ptr::copy(source.as_ptr(), self.address() as *mut u8, source.len());
            }
        }
        if self.region.faulted() {
            return Err(ShmError::Truncated(self.region.name.clone()));
        }
        Ok(())
    }
}

// SAFETY: a range lies within its region's mapping (checked when it was
// made), which is readable and writable and stays mapped while the range's
// Arc of the region lives; a page lost to a truncation is replaced by the
// SIGBUS guard (whoever touches it: this code, libtorch's kernels, any
// thread), which marks the region, so the process survives and
// `check_intact` reports it.
#[allow(unsafe_code)]
unsafe impl ExternalMemory for Range {
    fn address(&self) -> usize {
        Range::address(self)
    }

    fn byte_len(&self) -> usize {
        self.len as usize
    }

    fn check_intact(&self) -> Result<(), String> {
        if self.region.faulted() {
            return Err(format!(
                "the object of shared memory region {:?} was truncated while the call used it; the region is unregistered",
                self.region.name
            ));
        }
        Ok(())
    }
}

/// A range as the owner of `Bytes`.
struct View(Range);

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        #[allow(unsafe_code)]
        // SAFETY: the range lies within the mapping, which the Arc keeps
        // mapped while the view lives; see the module's note on memory the
        // client shares.
        unsafe {
            std::slice::from_raw_parts(self.0.address() as *const u8, self.0.len as usize)
        }
    }
}
