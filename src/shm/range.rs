//! A checked range of a registered region, whatever its kind (a /dev/shm
//! mapping or a CUDA IPC allocation): `len` bytes from `offset` (relative to
//! the region's start), within it. What a range does with its bytes lives
//! with its region's kind (`region`, `cuda_ipc`).

use std::sync::Arc;

/// What a range needs of its region.
pub trait Mapped {
    /// The name the client registered it under.
    fn name(&self) -> &str;
    /// Address of byte `offset` of the region (callers checked the range).
    fn address_of(&self, offset: u64) -> usize;
}

/// `len` bytes from `offset` of a region, checked to lie within it; the Arc
/// keeps the region open while the range lives.
#[derive(Debug)]
pub struct RegionRange<R> {
    pub(super) region: Arc<R>,
    pub(super) offset: u64,
    pub(super) len: u64,
}

impl<R> Clone for RegionRange<R> {
    fn clone(&self) -> Self {
        RegionRange {
            region: Arc::clone(&self.region),
            offset: self.offset,
            len: self.len,
        }
    }
}

impl<R: Mapped> RegionRange<R> {
    /// `len` bytes from `offset` of `region`; the caller checked the bounds.
    pub(super) fn new(region: Arc<R>, offset: u64, len: u64) -> Self {
        RegionRange {
            region,
            offset,
            len,
        }
    }

    pub fn region(&self) -> &Arc<R> {
        &self.region
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of the range's first byte (its alignment is the tensor's).
    pub fn address(&self) -> usize {
        self.region.address_of(self.offset)
    }

    /// Same region and overlapping bytes.
    pub fn overlaps(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.region, &other.region)
            && self.offset < other.offset + other.len
            && other.offset < self.offset + self.len
    }

    /// Same region, same bytes.
    pub fn same_as(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.region, &other.region)
            && self.offset == other.offset
            && self.len == other.len
    }
}
