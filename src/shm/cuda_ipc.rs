//! CUDA IPC regions: GPU memory another process on this host exported with
//! cudaIpcGetMemHandle, opened once at registration with
//! cudaIpcOpenMemHandle and closed (cudaIpcCloseMemHandle) with the region's
//! last user; ranges of it viewed in place as tensors of its device.
//!
//! The CUDA runtime is the one libtorch's CUDA library already loaded
//! (found by its soname with RTLD_NOLOAD, never a new link dependency);
//! the driver's cuMemGetAddressRange bounds a registration by the
//! allocation the handle exports, so no range can reach beyond it.
//!
//! Owns the `unsafe` of these regions (the runtime and driver calls, the
//! views). The client shares this memory and may write it while the server
//! computes: the server only hands it to libtorch's kernels and copies,
//! which treat it as raw device memory.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{mpsc, OnceLock};

use tch::{Device, Tensor};

use super::range::{Mapped, RegionRange};
use super::ShmError;
use crate::numerics::{DeviceMemory, NumericsError};

/// Bytes of a cudaIpcMemHandle_t.
pub const HANDLE_BYTES: usize = 64;

/// cudaIpcMemHandle_t: `struct { char reserved[64]; }`, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct IpcMemHandle {
    reserved: [u8; HANDLE_BYTES],
}

/// cudaIpcMemLazyEnablePeerAccess.
const LAZY_ENABLE_PEER_ACCESS: c_uint = 1;
/// cudaErrorMemoryAllocation.
const ERROR_MEMORY_ALLOCATION: c_int = 2;

type SetDevice = unsafe extern "C" fn(device: c_int) -> c_int;
type IpcOpenMemHandle =
    unsafe extern "C" fn(pointer: *mut *mut c_void, handle: IpcMemHandle, flags: c_uint) -> c_int;
type IpcCloseMemHandle = unsafe extern "C" fn(pointer: *mut c_void) -> c_int;
type GetErrorString = unsafe extern "C" fn(error: c_int) -> *const c_char;
type GetLastError = unsafe extern "C" fn() -> c_int;
type DeviceSynchronize = unsafe extern "C" fn() -> c_int;
type MemGetAddressRange =
    unsafe extern "C" fn(base: *mut u64, size: *mut usize, pointer: u64) -> c_int;

/// The runtime's and driver's entry points, valid for as long as the
/// libraries are loaded, which is the whole process (a static).
struct Cuda {
    _runtime: libloading::Library,
    _driver: libloading::Library,
    set_device: SetDevice,
    open: IpcOpenMemHandle,
    close: IpcCloseMemHandle,
    error_string: GetErrorString,
    last_error: GetLastError,
    device_synchronize: DeviceSynchronize,
    address_range: MemGetAddressRange,
}

/// Sonames of the CUDA runtime libtorch's CUDA builds link (newest first).
const RUNTIMES: [&str; 3] = ["libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"];

static CUDA: OnceLock<Result<Cuda, String>> = OnceLock::new();

/// The CUDA runtime, looked up on first use: Unavailable when this server
/// has no CUDA device or libtorch's runtime is not loaded.
fn cuda() -> Result<&'static Cuda, ShmError> {
    if tch::Cuda::device_count() <= 0 {
        return Err(ShmError::Unavailable(
            "this server has no CUDA device".into(),
        ));
    }
    CUDA.get_or_init(load)
        .as_ref()
        .map_err(|why| ShmError::Unavailable(format!("CUDA IPC: {why}")))
}

/// The CUDA runtime libtorch's CUDA library loaded, found by its soname.
fn runtime_library() -> Result<libloading::Library, String> {
    let flags = libc::RTLD_NOW | libc::RTLD_NOLOAD;
    RUNTIMES
        .iter()
        .find_map(|soname| {
            // SAFETY: RTLD_NOLOAD only finds a library already loaded (by
            // libtorch's CUDA library): no initializer runs.
            unsafe { libloading::os::unix::Library::open(Some(*soname), flags).ok() }
        })
        .map(libloading::Library::from)
        .ok_or_else(|| {
            format!(
                "libtorch's CUDA runtime ({}) is not loaded in this process",
                RUNTIMES.join(", ")
            )
        })
}

fn load() -> Result<Cuda, String> {
    let runtime = runtime_library()?;
    // SAFETY: the driver library is loaded already when the runtime is
    // (the runtime loads it); loading it again only takes a reference.
    let driver = unsafe { libloading::Library::new("libcuda.so.1") }
        .map_err(|e| format!("the CUDA driver cannot be loaded: {e}"))?;
    let missing = |name: &str, e: libloading::Error| format!("{name} is missing: {e}");
    // SAFETY: the symbols are the CUDA runtime's and driver's stable C entry
    // points with the signatures declared above (cuda_runtime_api.h,
    // cuda.h: cuMemGetAddressRange_v2 since CUDA 3.2); the function pointers
    // are kept beside their libraries, which are never unloaded (a static).
    unsafe {
        Ok(Cuda {
            set_device: *runtime
                .get(b"cudaSetDevice\0")
                .map_err(|e| missing("cudaSetDevice", e))?,
            open: *runtime
                .get(b"cudaIpcOpenMemHandle\0")
                .map_err(|e| missing("cudaIpcOpenMemHandle", e))?,
            close: *runtime
                .get(b"cudaIpcCloseMemHandle\0")
                .map_err(|e| missing("cudaIpcCloseMemHandle", e))?,
            error_string: *runtime
                .get(b"cudaGetErrorString\0")
                .map_err(|e| missing("cudaGetErrorString", e))?,
            last_error: *runtime
                .get(b"cudaGetLastError\0")
                .map_err(|e| missing("cudaGetLastError", e))?,
            device_synchronize: *runtime
                .get(b"cudaDeviceSynchronize\0")
                .map_err(|e| missing("cudaDeviceSynchronize", e))?,
            address_range: *driver
                .get(b"cuMemGetAddressRange_v2\0")
                .map_err(|e| missing("cuMemGetAddressRange_v2", e))?,
            _runtime: runtime,
            _driver: driver,
        })
    }
}

impl Cuda {
    fn describe(&self, error: c_int) -> String {
        // SAFETY: cudaGetErrorString returns a static NUL-terminated string
        // for any code (or null, checked).
        let text = unsafe {
            let text = (self.error_string)(error);
            if text.is_null() {
                "unknown error".to_owned()
            } else {
                CStr::from_ptr(text).to_string_lossy().into_owned()
            }
        };
        format!("{text} (CUDA error {error})")
    }

    /// Makes `device` current on this thread.
    fn set(&self, device: usize) -> Result<(), String> {
        let index = c_int::try_from(device).map_err(|_| format!("device {device}"))?;
        // SAFETY: cudaSetDevice takes a device index (checked by the caller
        // against the devices libtorch sees) and changes this thread's
        // current device only.
        let status = unsafe { (self.set_device)(index) };
        if status == 0 {
            Ok(())
        } else {
            Err(self.describe(status))
        }
    }

    /// Waits for everything queued on `device` (every stream), reporting a
    /// failure instead of panicking (as `tch::Cuda::synchronize` would).
    fn synchronize(&self, device: usize) -> Result<(), String> {
        self.set(device)?;
        // SAFETY: cudaDeviceSynchronize takes no arguments and waits for the
        // current device, set above.
        let status = unsafe { (self.device_synchronize)() };
        if status == 0 {
            Ok(())
        } else {
            Err(self.describe(status))
        }
    }
}

/// A registered CUDA IPC region: `byte_size` bytes from `offset` of the
/// allocation the handle exports, opened in this process at `base`.
pub struct CudaRegion {
    name: String,
    offset: u64,
    byte_size: u64,
    device: usize,
    handle: [u8; HANDLE_BYTES],
    /// The opened allocation's first byte (an address: no raw pointers kept).
    base: usize,
    cuda: &'static Cuda,
}

impl std::fmt::Debug for CudaRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaRegion")
            .field("name", &self.name)
            .field("device", &self.device)
            .field("offset", &self.offset)
            .field("byte_size", &self.byte_size)
            .finish_non_exhaustive()
    }
}

/// Checks a handle's length before anything is opened.
pub fn check_handle(handle: &[u8]) -> Result<[u8; HANDLE_BYTES], ShmError> {
    let Ok(handle) = <[u8; HANDLE_BYTES]>::try_from(handle) else {
        return Err(ShmError::InvalidArgument(format!(
            "cuda_ipc.handle: a cudaIpcMemHandle_t is {HANDLE_BYTES} bytes, got {}",
            handle.len()
        )));
    };
    Ok(handle)
}

impl CudaRegion {
    /// Opens the allocation `handle` exports on CUDA device `device` and
    /// checks that `offset + byte_size` lies within it.
    pub fn open(
        name: &str,
        handle: [u8; HANDLE_BYTES],
        device: u32,
        offset: u64,
        byte_size: u64,
    ) -> Result<CudaRegion, ShmError> {
        let cuda = cuda()?;
        let devices = tch::Cuda::device_count();
        if i64::from(device) >= devices {
            return Err(ShmError::InvalidArgument(format!(
                "cuda_ipc.device: {device}, but this server sees {devices} CUDA device(s)"
            )));
        }
        let device = device as usize;
        let end = offset
            .checked_add(byte_size)
            .ok_or_else(|| ShmError::InvalidArgument("offset + byte_size overflows".into()))?;
        cuda.set(device).map_err(ShmError::MapFailed)?;
        let mut pointer: *mut c_void = std::ptr::null_mut();
        // SAFETY: cudaIpcOpenMemHandle writes one pointer through a valid
        // out-pointer; the handle is passed by value as the 64-byte struct
        // the runtime declares; the device is current on this thread.
        let status = unsafe {
            (cuda.open)(
                &mut pointer,
                IpcMemHandle { reserved: handle },
                LAZY_ENABLE_PEER_ACCESS,
            )
        };
        if status != 0 || pointer.is_null() {
            // A failed call leaves its error as the thread's last error:
            // cleared so that libtorch's next check does not report it.
            // SAFETY: cudaGetLastError takes no arguments.
            unsafe { (cuda.last_error)() };
            let why = cuda.describe(status);
            return Err(if status == ERROR_MEMORY_ALLOCATION {
                ShmError::MapFailed(why)
            } else {
                ShmError::InvalidArgument(format!(
                    "cuda_ipc.handle: the CUDA runtime does not open it on cuda:{device}: {why}"
                ))
            });
        }
        let region = CudaRegion {
            name: name.to_owned(),
            offset,
            byte_size,
            device,
            handle,
            base: pointer as usize,
            cuda,
        };
        // Dropping `region` on a failure below closes the handle.
        let (mut range_base, mut range_size): (u64, usize) = (0, 0);
        // SAFETY: cuMemGetAddressRange_v2 writes the allocation's base and
        // size through valid pointers for an address of this context (the
        // device's primary context, current after cudaSetDevice).
        let status =
            unsafe { (cuda.address_range)(&mut range_base, &mut range_size, region.base as u64) };
        if status != 0 {
            return Err(ShmError::MapFailed(format!(
                "the size of the shared allocation cannot be found (CUDA driver error {status})"
            )));
        }
        let available = (range_base + range_size as u64).saturating_sub(region.base as u64);
        if end > available {
            return Err(ShmError::NotShared(format!(
                "the CUDA allocation the handle exports holds {available} bytes, fewer than offset + byte_size = {end}"
            )));
        }
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

    /// The CUDA device index of the memory.
    pub fn device(&self) -> usize {
        self.device
    }

    /// Whether `handle` on `device` is what this region opened.
    pub fn is_handle(&self, handle: &[u8; HANDLE_BYTES], device: u32) -> bool {
        &self.handle == handle && self.device as u64 == u64::from(device)
    }
}

impl Mapped for CudaRegion {
    fn name(&self) -> &str {
        &self.name
    }

    fn address_of(&self, offset: u64) -> usize {
        self.base + self.offset as usize + offset as usize
    }
}

impl Drop for CudaRegion {
    fn drop(&mut self) {
        close_later(
            self.cuda,
            Closing {
                name: std::mem::take(&mut self.name),
                device: self.device,
                base: self.base,
            },
        );
    }
}

/// An opened allocation whose last user is gone.
struct Closing {
    name: String,
    device: usize,
    base: usize,
}

/// The thread that closes regions, so that dropping one (under the region
/// table's lock, or on an async thread) never waits for the device.
static CLOSER: OnceLock<Option<mpsc::Sender<Closing>>> = OnceLock::new();

fn close_later(cuda: &'static Cuda, closing: Closing) {
    let closer = CLOSER.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<Closing>();
        std::thread::Builder::new()
            .name("cuda-ipc-close".into())
            .spawn(move || {
                for closing in receiver {
                    close_now(cuda, closing);
                }
            })
            .ok()
            .map(|_| sender)
    });
    let unsent = match closer {
        Some(sender) => sender.send(closing).err().map(|e| e.0),
        None => Some(closing),
    };
    if let Some(closing) = unsent {
        close_now(cuda, closing);
    }
}

fn close_now(cuda: &Cuda, closing: Closing) {
    // Nothing of this server's may still run on the memory when it is
    // closed: every Forward synchronized before answering, and this waits
    // for anything else queued on the device.
    if let Err(why) = cuda.synchronize(closing.device) {
        tracing::warn!(region = %closing.name, "closing a CUDA IPC region: {why}");
    }
    if cuda.set(closing.device).is_ok() {
        // SAFETY: `base` was returned by cudaIpcOpenMemHandle for a region
        // that is gone (this is its Drop's hand-off), so it is closed once,
        // here, and no view of it remains (views hold an Arc of the region).
        let status = unsafe { (cuda.close)(closing.base as *mut c_void) };
        if status != 0 {
            tracing::warn!(region = %closing.name, "cudaIpcCloseMemHandle: {}", cuda.describe(status));
        }
    }
}

/// A checked range of a CUDA region (the address is the device's).
pub type CudaRange = RegionRange<CudaRegion>;

impl CudaRange {
    /// Copies `source` (a tensor of exactly the range's bytes, on any
    /// device) into the range, and waits until the copy is done.
    pub fn write(&self, source: &Tensor) -> Result<(), ShmError> {
        let failed = |e: NumericsError| ShmError::Device(format!("writing the output: {e}"));
        let kind = source
            .f_kind()
            .map_err(|e| failed(NumericsError::from(e)))?;
        let mut target = self.view(&source.size(), kind).map_err(failed)?;
        target
            .f_copy_(source)
            .map_err(|e| failed(NumericsError::from(e)))?;
        self.synchronize()
    }

    /// Waits for the work queued on the range's device.
    pub fn synchronize(&self) -> Result<(), ShmError> {
        self.region
            .cuda
            .synchronize(self.region.device)
            .map_err(|why| ShmError::Device(format!("waiting for the device: {why}")))
    }
}

impl DeviceMemory for CudaRange {
    fn device(&self) -> Device {
        Device::Cuda(self.region.device)
    }

    fn byte_size(&self) -> u64 {
        self.len
    }

    fn view(&self, shape: &[i64], kind: tch::Kind) -> Result<Tensor, NumericsError> {
        let numel = shape.iter().try_fold(1u64, |n, &d| {
            u64::try_from(d).ok().and_then(|d| n.checked_mul(d))
        });
        let bytes = numel.and_then(|n| n.checked_mul(kind.elt_size_in_bytes() as u64));
        let device = Device::Cuda(self.region.device);
        if bytes == Some(0) && self.len == 0 {
            // No elements: nothing of the client's memory to view.
            return Ok(Tensor::f_empty(shape, (kind, device))?);
        }
        if bytes != Some(self.len) {
            return Err(NumericsError::Torch(format!(
                "internal: a view of shape {shape:?} and {kind:?} over a CUDA range of {} bytes",
                self.len
            )));
        }
        // SAFETY: the range lies within the opened allocation (checked at
        // registration against cuMemGetAddressRange and at the range's
        // making), exactly numel * itemsize bytes (checked above), aligned
        // to the element size (checked by the registry); the tensor does not
        // own the memory, and its users keep this range (an Arc of the
        // region) alive beside it.
        let tensor =
            unsafe { Tensor::f_from_blob(self.address() as *const u8, shape, &[], kind, device) };
        Ok(tensor?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime calls are looked up in the library libtorch loaded, by
    /// soname, on any machine whose libtorch has CUDA (a GPU or not).
    #[test]
    fn libtorchs_cuda_runtime_is_found_with_its_ipc_calls() {
        let flags = libc::RTLD_NOW | libc::RTLD_NOLOAD;
        // SAFETY: RTLD_NOLOAD only finds a library already loaded.
        let cuda_libtorch =
            unsafe { libloading::os::unix::Library::open(Some("libtorch_cuda.so"), flags) };
        if cuda_libtorch.is_err() {
            println!("skipped: this libtorch has no CUDA library");
            return;
        }
        let runtime = runtime_library().unwrap();
        for symbol in [
            &b"cudaSetDevice\0"[..],
            b"cudaIpcOpenMemHandle\0",
            b"cudaIpcCloseMemHandle\0",
            b"cudaGetErrorString\0",
            b"cudaGetLastError\0",
            b"cudaDeviceSynchronize\0",
        ] {
            // SAFETY: only the symbol's address is looked up, never called.
            let found = unsafe { runtime.get::<*const c_void>(symbol) };
            assert!(found.is_ok(), "{}", String::from_utf8_lossy(symbol));
        }
    }

    #[test]
    fn a_handle_is_64_bytes() {
        assert_eq!(std::mem::size_of::<IpcMemHandle>(), 64);
        assert!(check_handle(&[0; 64]).is_ok());
        assert!(check_handle(&[0; 32]).is_err());
    }
}
