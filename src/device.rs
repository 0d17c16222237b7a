//! Compute devices: parsing a device choice ("auto", "cpu", "cuda", "cuda:N"),
//! resolving it against what libtorch sees, and describing the devices for the
//! info RPC. Knows nothing about gRPC.

use std::fmt;
use std::str::FromStr;

use tch::{Cuda, Device};

/// A device as a user writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when libtorch sees one, else the CPU.
    Auto,
    Cpu,
    /// `cuda` (device 0) or `cuda:N`.
    Cuda(usize),
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("unknown device {0:?}: expected auto, cpu, cuda or cuda:N")]
    Unparsable(String),
    #[error("device {requested} requested but libtorch sees {available} CUDA device(s)")]
    CudaUnavailable { requested: String, available: i64 },
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "" | "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|index| index.parse::<usize>().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| DeviceError::Unparsable(other.to_owned())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

impl DeviceChoice {
    /// The concrete device; `default` stands in for `Auto` where a server-wide
    /// default exists (sessions), `None` resolves `Auto` by availability.
    pub fn resolve(self, default: Option<Device>) -> Result<Device, DeviceError> {
        match self {
            DeviceChoice::Auto => Ok(default.unwrap_or_else(|| {
                if Cuda::is_available() {
                    Device::Cuda(0)
                } else {
                    Device::Cpu
                }
            })),
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(index) => {
                let available = Cuda::device_count();
                if (index as i64) < available {
                    Ok(Device::Cuda(index))
                } else {
                    Err(DeviceError::CudaUnavailable {
                        requested: self.to_string(),
                        available,
                    })
                }
            }
        }
    }
}

/// "cpu" or "cuda:N", as PyTorch prints devices.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        Device::Cuda(index) => format!("cuda:{index}"),
        Device::Mps => "mps".to_owned(),
        Device::Vulkan => "vulkan".to_owned(),
    }
}

/// One device as reported by the info RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDescription {
    pub name: String,
    pub description: String,
    pub total_memory_bytes: u64,
}

/// The CPU, then each CUDA device libtorch sees, with names and memory from
/// the CUDA driver where it can be asked.
pub fn describe_devices() -> Vec<DeviceDescription> {
    let mut devices = vec![DeviceDescription {
        name: "cpu".to_owned(),
        description: cpu_model().unwrap_or_default(),
        total_memory_bytes: 0,
    }];
    let count = Cuda::device_count().max(0) as usize;
    for index in 0..count {
        let (description, total_memory_bytes) =
            cuda_driver::describe(index).unwrap_or_else(|| (String::new(), 0));
        devices.push(DeviceDescription {
            name: format!("cuda:{index}"),
            description,
            total_memory_bytes,
        });
    }
    devices
}

/// Memory in use (bytes) on each CUDA device this process has a context on,
/// as `cuda:N`: the device's total minus its free memory, as nvidia-smi's
/// "used" (other processes sharing the GPU included). Devices the process
/// has not touched are left out (asking would create a context on them);
/// none on a machine without CUDA.
pub fn cuda_memory_in_use() -> Vec<(String, u64)> {
    let count = Cuda::device_count().max(0) as usize;
    (0..count)
        .filter_map(|index| {
            cuda_driver::memory_in_use(index).map(|bytes| (format!("cuda:{index}"), bytes))
        })
        .collect()
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_owned())
}

/// Device names and memory come from the CUDA driver API, because libtorch's C
/// API (through tch) exposes neither. The driver library is loaded only when
/// libtorch already reported a CUDA device, so CPU machines never touch it,
/// and then once per process: metrics scrapes ask for memory every time.
#[allow(unsafe_code)]
mod cuda_driver {
    use std::ffi::{c_char, c_int, c_void, CStr};
    use std::sync::OnceLock;

    type CuInit = unsafe extern "C" fn(flags: u32) -> c_int;
    type CuDeviceGet = unsafe extern "C" fn(device: *mut c_int, ordinal: c_int) -> c_int;
    type CuDeviceGetName =
        unsafe extern "C" fn(name: *mut c_char, len: c_int, device: c_int) -> c_int;
    type CuDeviceTotalMem = unsafe extern "C" fn(bytes: *mut usize, device: c_int) -> c_int;
    type CuDevicePrimaryCtxGetState =
        unsafe extern "C" fn(device: c_int, flags: *mut u32, active: *mut c_int) -> c_int;
    type CuDevicePrimaryCtxRetain =
        unsafe extern "C" fn(context: *mut *mut c_void, device: c_int) -> c_int;
    type CuDevicePrimaryCtxRelease = unsafe extern "C" fn(device: c_int) -> c_int;
    type CuCtxPushCurrent = unsafe extern "C" fn(context: *mut c_void) -> c_int;
    type CuCtxPopCurrent = unsafe extern "C" fn(context: *mut *mut c_void) -> c_int;
    type CuMemGetInfo = unsafe extern "C" fn(free: *mut usize, total: *mut usize) -> c_int;

    /// The loaded and initialized driver: its entry points, valid for as
    /// long as `_library` is loaded, which is the whole process (a static).
    struct Driver {
        _library: libloading::Library,
        device_get: CuDeviceGet,
        get_name: CuDeviceGetName,
        total_mem: CuDeviceTotalMem,
        /// The calls asking a device's memory in use (newer than the others:
        /// cuDevicePrimaryCtxRelease_v2 needs CUDA 11); None when missing.
        memory: Option<MemoryCalls>,
    }

    struct MemoryCalls {
        get_state: CuDevicePrimaryCtxGetState,
        retain: CuDevicePrimaryCtxRetain,
        release: CuDevicePrimaryCtxRelease,
        push: CuCtxPushCurrent,
        pop: CuCtxPopCurrent,
        mem_get_info: CuMemGetInfo,
    }

    static DRIVER: OnceLock<Option<Driver>> = OnceLock::new();

    /// The driver, loaded and initialized on first use; None when it cannot
    /// be loaded or initialized (then never tried again).
    fn driver() -> Option<&'static Driver> {
        DRIVER.get_or_init(load).as_ref()
    }

    fn load() -> Option<Driver> {
        // SAFETY: the symbols are the CUDA driver API's stable C entry points
        // with the signatures declared above (cuda.h: cuDevicePrimaryCtx*
        // since 7.0, the _v2 context and memory calls since 4.0, the _v2
        // release since 11.0); the function pointers are kept beside the
        // library, which is never unloaded (it lives in a static).
        unsafe {
            let library = libloading::Library::new("libcuda.so.1").ok()?;
            let init: CuInit = *library.get::<CuInit>(b"cuInit\0").ok()?;
            if init(0) != 0 {
                return None;
            }
            let memory = (|| {
                Some(MemoryCalls {
                    get_state: *library.get(b"cuDevicePrimaryCtxGetState\0").ok()?,
                    retain: *library.get(b"cuDevicePrimaryCtxRetain\0").ok()?,
                    release: *library.get(b"cuDevicePrimaryCtxRelease_v2\0").ok()?,
                    push: *library.get(b"cuCtxPushCurrent_v2\0").ok()?,
                    pop: *library.get(b"cuCtxPopCurrent_v2\0").ok()?,
                    mem_get_info: *library.get(b"cuMemGetInfo_v2\0").ok()?,
                })
            })();
            Some(Driver {
                device_get: *library.get(b"cuDeviceGet\0").ok()?,
                get_name: *library.get(b"cuDeviceGetName\0").ok()?,
                total_mem: *library.get(b"cuDeviceTotalMem_v2\0").ok()?,
                memory,
                _library: library,
            })
        }
    }

    impl Driver {
        /// The driver's handle of CUDA device `index`.
        fn device(&self, index: usize) -> Option<c_int> {
            let mut device: c_int = 0;
            // SAFETY: cuDeviceGet writes one c_int through a valid pointer.
            let status = unsafe { (self.device_get)(&mut device, c_int::try_from(index).ok()?) };
            (status == 0).then_some(device)
        }
    }

    /// Total minus free memory of CUDA device `index`, asked in its primary
    /// context (the one the CUDA runtime, and so libtorch, uses); None when
    /// that context is not active (not used by this process), or the driver
    /// cannot be loaded or answers with an error.
    pub fn memory_in_use(index: usize) -> Option<u64> {
        let driver = driver()?;
        let calls = driver.memory.as_ref()?;
        let device = driver.device(index)?;
        // SAFETY: the entry points loaded by `load` with their declared
        // signatures, called with valid pointers; the context pushed is
        // popped before returning, and the retain is released.
        unsafe {
            let (mut flags, mut active): (u32, c_int) = (0, 0);
            if (calls.get_state)(device, &mut flags, &mut active) != 0 || active == 0 {
                return None;
            }
            let mut context: *mut c_void = std::ptr::null_mut();
            if (calls.retain)(&mut context, device) != 0 {
                return None;
            }
            let mut answer = None;
            if (calls.push)(context) == 0 {
                let (mut free, mut total): (usize, usize) = (0, 0);
                if (calls.mem_get_info)(&mut free, &mut total) == 0 {
                    answer = Some(total.saturating_sub(free) as u64);
                }
                let mut popped: *mut c_void = std::ptr::null_mut();
                (calls.pop)(&mut popped);
            }
            (calls.release)(device);
            answer
        }
    }

    /// (name, total memory in bytes) of CUDA device `index`, or None when the
    /// driver cannot be loaded or answers with an error.
    pub fn describe(index: usize) -> Option<(String, u64)> {
        let driver = driver()?;
        let device = driver.device(index)?;
        // SAFETY: the entry points loaded by `load` with their declared
        // signatures; the name buffer's length is passed with it and the
        // driver NUL-terminates what it writes.
        unsafe {
            let mut name = [0 as c_char; 256];
            if (driver.get_name)(name.as_mut_ptr(), name.len() as c_int, device) != 0 {
                return None;
            }
            let mut bytes: usize = 0;
            if (driver.total_mem)(&mut bytes, device) != 0 {
                return None;
            }
            let name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
            Some((name, bytes as u64))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn cuda_request_without_cuda_is_an_error() {
        if Cuda::device_count() > 0 {
            println!("skipped: this machine has CUDA");
            return;
        }
        let err = DeviceChoice::Cuda(0).resolve(None);
        assert_eq!(
            err,
            Err(DeviceError::CudaUnavailable {
                requested: "cuda:0".into(),
                available: 0
            })
        );
        assert_eq!(DeviceChoice::Auto.resolve(None), Ok(Device::Cpu));
    }
}
