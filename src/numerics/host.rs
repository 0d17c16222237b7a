//! CPU tensor memory <-> bytes and slices without extra copies: the reply to
//! a Forward is encoded straight from the output tensor, which lives exactly
//! as long as the bytes that borrow it; aligned request bytes are read in
//! place as a tensor; the native train-mode kernel reads and fills float32
//! tensors as slices; unaligned bytes are copied into a tensor once, without
//! a zero fill first.
//!
//! Memory given for an output (a client's shared-memory range, as
//! [`ExternalMemory`]) is viewed as a tensor the computation writes into.
//!
//! Owns all of the numerics' `unsafe`: one block per function here
//! (`HostTensor::as_ref`, `borrow`, `with_f32_values`, `with_f64_values`,
//! `with_f32_values_mut`, `copy_into_new_tensor`, `view_output`,
//! `OutputTensor::copy_bytes`) and the [`ExternalMemory`] contract, each
//! with its SAFETY argument. Nothing else in `numerics` may dereference a
//! tensor's data pointer.

use std::sync::Arc;

use bytes::Bytes;
use tch::{Device, Tensor};

use super::NumericsError;

/// Owns the tensor whose memory the bytes point into.
struct HostTensor {
    tensor: Tensor,
    length: usize,
}

impl AsRef<[u8]> for HostTensor {
    /// Sound because [`into_bytes`] admits only contiguous CPU tensors of at
    /// least `length` bytes; the tensor is owned here, so its storage outlives
    /// every borrow; and callers hand over fresh results that nothing else
    /// writes to.
    #[allow(unsafe_code)]
    fn as_ref(&self) -> &[u8] {
        let data = self.tensor.data_ptr() as *const u8;
        // SAFETY: see above; `data` is non-null for a non-empty tensor.
        unsafe { std::slice::from_raw_parts(data, self.length) }
    }
}

/// Wraps a contiguous CPU tensor holding exactly `length` bytes.
pub(super) fn into_bytes(tensor: Tensor, length: usize) -> Result<Bytes, NumericsError> {
    let bytes_held = tensor.numel() * tensor.f_kind()?.elt_size_in_bytes();
    if tensor.device() != Device::Cpu
        || !tensor.is_contiguous()
        || bytes_held != length
        || length == 0
        || tensor.data_ptr().is_null()
    {
        return Err(NumericsError::Torch(format!(
            "internal: cannot view a {:?} tensor of {bytes_held} bytes as {length} host bytes",
            tensor.device()
        )));
    }
    Ok(Bytes::from_owner(HostTensor { tensor, length }))
}

/// A CPU tensor that reads a request's bytes in place: the tensor is declared
/// first, so it is dropped before the bytes it points into.
pub struct BorrowedTensor {
    tensor: Tensor,
    _bytes: Bytes,
}

impl std::ops::Deref for BorrowedTensor {
    type Target = Tensor;

    fn deref(&self) -> &Tensor {
        &self.tensor
    }
}

/// Views `bytes` as a contiguous CPU tensor of `shape` and `kind` without a
/// copy, or `None` when the bytes are empty or not aligned to the element
/// size (then the caller copies). The view is read-only by contract: it is
/// only ever an input of operations that allocate their results, and no
/// tensor sharing its memory may outlive it.
pub(super) fn borrow(
    bytes: &Bytes,
    shape: &[i64],
    kind: tch::Kind,
) -> Result<Option<BorrowedTensor>, NumericsError> {
    let itemsize = kind.elt_size_in_bytes();
    let numel = shape.iter().try_fold(1usize, |n, &d| {
        usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
    });
    if bytes.is_empty()
        || itemsize == 0
        || numel.and_then(|n| n.checked_mul(itemsize)) != Some(bytes.len())
        || !(bytes.as_ptr() as usize).is_multiple_of(itemsize)
    {
        return Ok(None);
    }
    // SAFETY: the pointer is valid for `bytes.len()` bytes, which is exactly
    // numel * itemsize (checked above), aligned to the element size; the
    // bytes are kept alive in the returned value for the tensor's lifetime;
    // and the contract above keeps the memory read-only.
    #[allow(unsafe_code)]
    let tensor = unsafe { Tensor::f_from_blob(bytes.as_ptr(), shape, &[], kind, Device::Cpu)? };
    Ok(Some(BorrowedTensor {
        tensor,
        _bytes: bytes.clone(),
    }))
}

/// Where a contiguous, non-empty CPU tensor of `kind` keeps its values of
/// type `T`, and how many there are; `None` for any other tensor, or one
/// whose data pointer is null or not aligned for `T`.
fn contiguous_values<T>(
    tensor: &Tensor,
    kind: tch::Kind,
) -> Result<Option<(*mut T, usize)>, NumericsError> {
    let numel = tensor.numel();
    let data = tensor.data_ptr() as *mut T;
    if tensor.device() != Device::Cpu
        || tensor.f_kind()? != kind
        || !tensor.is_contiguous()
        || numel == 0
        || data.is_null()
        || !(data as usize).is_multiple_of(std::mem::align_of::<T>())
    {
        return Ok(None);
    }
    Ok(Some((data, numel)))
}

/// Runs `f` over a contiguous CPU tensor's values of type `T` (libtorch's
/// `kind`) in place, or returns `None` for any other tensor.
fn with_values<T, R>(
    tensor: &Tensor,
    kind: tch::Kind,
    f: impl FnOnce(&[T]) -> R,
) -> Result<Option<R>, NumericsError> {
    let Some((data, numel)) = contiguous_values::<T>(tensor, kind)? else {
        return Ok(None);
    };
    // SAFETY: a contiguous CPU tensor of `kind` (whose elements are `T`, as
    // the callers pair them) with `numel` elements starts at `data`
    // (non-null, aligned, checked by `contiguous_values`); `tensor` is
    // borrowed for the whole call, so its storage stays alive, and `f` only
    // reads.
    #[allow(unsafe_code)]
    let values = unsafe { std::slice::from_raw_parts(data.cast_const(), numel) };
    Ok(Some(f(values)))
}

/// Runs `f` over a contiguous float32 CPU tensor's values in place, or
/// returns `None` for any other tensor.
pub(super) fn with_f32_values<R>(
    tensor: &Tensor,
    f: impl FnOnce(&[f32]) -> R,
) -> Result<Option<R>, NumericsError> {
    with_values(tensor, tch::Kind::Float, f)
}

/// Runs `f` over a contiguous float64 CPU tensor's values in place, or
/// returns `None` for any other tensor.
pub(super) fn with_f64_values<R>(
    tensor: &Tensor,
    f: impl FnOnce(&[f64]) -> R,
) -> Result<Option<R>, NumericsError> {
    with_values(tensor, tch::Kind::Double, f)
}

/// A new contiguous float32 CPU tensor of `shape` whose values `fill` writes.
pub(super) fn new_f32_tensor(
    shape: &[i64],
    fill: impl FnOnce(&mut [f32]),
) -> Result<Tensor, NumericsError> {
    let tensor = Tensor::f_empty(shape, (tch::Kind::Float, Device::Cpu))?;
    if tensor.numel() > 0 && with_f32_values_mut(&tensor, fill)?.is_none() {
        return Err(NumericsError::Torch(
            "internal: unaligned float32 allocation".to_owned(),
        ));
    }
    Ok(tensor)
}

/// Runs `fill` over a contiguous float32 CPU tensor's values for writing, or
/// returns `None` for any other tensor (or an empty one). The tensor must be
/// one nothing else reads or writes while `fill` runs: a fresh result, or an
/// [`OutputTensor`] (whose memory the caller checked does not overlap the
/// computation's input).
pub(super) fn with_f32_values_mut<R>(
    tensor: &Tensor,
    fill: impl FnOnce(&mut [f32]) -> R,
) -> Result<Option<R>, NumericsError> {
    let Some((data, numel)) = contiguous_values::<f32>(tensor, tch::Kind::Float)? else {
        return Ok(None);
    };
    // SAFETY: a contiguous float32 CPU tensor of `numel` elements starts at
    // `data` (non-null, aligned, checked by `contiguous_values`); `tensor` is
    // borrowed for the whole call, so its storage (or the external memory an
    // OutputTensor keeps) stays alive; and by the contract above no other
    // handle reads or writes it meanwhile.
    #[allow(unsafe_code)]
    let values = unsafe { std::slice::from_raw_parts_mut(data, numel) };
    Ok(Some(fill(values)))
}

/// Whether two CPU tensors' memory overlaps (by address ranges; empty
/// tensors overlap nothing).
pub(super) fn shares_memory(a: &Tensor, b: &Tensor) -> Result<bool, NumericsError> {
    let span = |t: &Tensor| -> Result<(usize, usize), NumericsError> {
        let start = t.data_ptr() as usize;
        let bytes = t.numel() * t.f_kind()?.elt_size_in_bytes();
        Ok((start, start.saturating_add(bytes)))
    };
    let ((a_start, a_end), (b_start, b_end)) = (span(a)?, span(b)?);
    Ok(a_start < a_end && b_start < b_end && a_start < b_end && b_start < a_end)
}

/// Host memory outside libtorch's allocator that a computation writes its
/// output into in place instead of a new tensor: a client's shared-memory
/// range. The memory may lose pages while it is used (its owner truncates
/// the object under it): its implementor's fault handler then puts zero
/// pages in their place, so the reads and writes complete, and
/// [`check_intact`](ExternalMemory::check_intact) reports it afterwards.
///
/// # Safety
///
/// An implementor promises that [`address`](ExternalMemory::address) is
/// valid for reads and writes of [`byte_len`](ExternalMemory::byte_len)
/// bytes for as long as the value lives, and that a page lost meanwhile
/// never kills the process (a SIGBUS in it is handled as above). Another
/// process may write the memory concurrently: the server treats its contents
/// as raw values, never as anything whose validity it relies on.
#[allow(unsafe_code)]
pub unsafe trait ExternalMemory: Send + Sync + std::fmt::Debug {
    /// Address of the first byte.
    fn address(&self) -> usize;

    /// Bytes from `address`.
    fn byte_len(&self) -> usize;

    /// `Err(why)` once a page of the memory was lost (what was read from it
    /// since reads as zeros, what was written went nowhere), `Ok` while all
    /// of it is the owner's.
    fn check_intact(&self) -> Result<(), String>;
}

/// A contiguous CPU tensor over [`ExternalMemory`], for a computation to
/// write its output into. The tensor is declared first, so it is dropped
/// before the memory it points into is released.
pub struct OutputTensor {
    tensor: Tensor,
    memory: Arc<dyn ExternalMemory>,
}

impl std::ops::Deref for OutputTensor {
    type Target = Tensor;

    fn deref(&self) -> &Tensor {
        &self.tensor
    }
}

impl std::fmt::Debug for OutputTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputTensor")
            .field("shape", &self.tensor.size())
            .field("memory", &self.memory)
            .finish()
    }
}

impl OutputTensor {
    /// The memory the tensor writes into.
    pub fn memory(&self) -> &Arc<dyn ExternalMemory> {
        &self.memory
    }

    /// A copy of the memory's bytes as they are now (what a computation
    /// wrote, for a result kept beyond the memory's use).
    pub fn copy_bytes(&self) -> Bytes {
        let length = self.memory.byte_len();
        if length == 0 {
            return Bytes::new();
        }
        // SAFETY: the memory is valid for reads of `byte_len` bytes while
        // `self.memory` lives (the ExternalMemory contract); the slice lives
        // only for this copy.
        #[allow(unsafe_code)]
        let bytes =
            unsafe { std::slice::from_raw_parts(self.memory.address() as *const u8, length) };
        Bytes::copy_from_slice(bytes)
    }
}

/// Views `memory` as a contiguous CPU tensor of `shape` and `kind` to be
/// written: its length must be exactly numel * itemsize and its address
/// aligned to the element size. An empty shape gets an ordinary empty
/// tensor (nothing to write).
pub(super) fn view_output(
    memory: Arc<dyn ExternalMemory>,
    shape: &[i64],
    kind: tch::Kind,
) -> Result<OutputTensor, NumericsError> {
    let itemsize = kind.elt_size_in_bytes();
    let numel = shape.iter().try_fold(1usize, |n, &d| {
        usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
    });
    let length = memory.byte_len();
    let address = memory.address();
    if itemsize == 0
        || numel.and_then(|n| n.checked_mul(itemsize)) != Some(length)
        || !address.is_multiple_of(itemsize)
        || (length > 0 && address == 0)
    {
        return Err(NumericsError::Torch(format!(
            "internal: {length} bytes at an offset of {} from alignment cannot hold a {shape:?} {kind:?} output",
            address % itemsize.max(1)
        )));
    }
    if length == 0 {
        let tensor = Tensor::f_empty(shape, (kind, Device::Cpu))?;
        return Ok(OutputTensor { tensor, memory });
    }
    // SAFETY: the memory is valid for reads and writes of exactly numel *
    // itemsize bytes (checked above) while `memory` lives (the
    // ExternalMemory contract), aligned to the element size; the returned
    // value keeps `memory` and drops the tensor first, and the tensor never
    // leaves it (callers only pass it to operations that write their output
    // into it).
    #[allow(unsafe_code)]
    let tensor =
        unsafe { Tensor::f_from_blob(address as *const u8, shape, &[], kind, Device::Cpu)? };
    Ok(OutputTensor { tensor, memory })
}

/// A new contiguous CPU tensor of `shape` and `kind` holding a copy of
/// `bytes` (exactly numel * itemsize of them): one copy, without the zero
/// fill that `Tensor::from_data_size` does first.
pub(super) fn copy_into_new_tensor(
    bytes: &[u8],
    shape: &[i64],
    kind: tch::Kind,
) -> Result<Tensor, NumericsError> {
    let tensor = Tensor::f_empty(shape, (kind, Device::Cpu))?;
    let length = tensor.numel() * kind.elt_size_in_bytes();
    if length != bytes.len() {
        return Err(NumericsError::Torch(format!(
            "internal: {} bytes for a tensor of {length}",
            bytes.len()
        )));
    }
    let data = tensor.data_ptr() as *mut u8;
    if length > 0 {
        if data.is_null() {
            return Err(NumericsError::Torch(
                "internal: null tensor data".to_owned(),
            ));
        }
        // SAFETY: `tensor` was just allocated here, contiguous, with exactly
        // `length` bytes at `data` (non-null); nothing else refers to it, and
        // `bytes` is a distinct, live buffer of the same length.
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), data, length);
        }
    }
    Ok(tensor)
}
