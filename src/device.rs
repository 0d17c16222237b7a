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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
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
/// libtorch already reported a CUDA device, so CPU machines never touch it.
#[allow(unsafe_code)]
mod cuda_driver {
    use std::ffi::{c_char, c_int, c_void, CStr};

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

    /// Total minus free memory of CUDA device `index`, asked in its primary
    /// context (the one the CUDA runtime, and so libtorch, uses); None when
    /// that context is not active (not used by this process), or the driver
    /// cannot be loaded or answers with an error.
    pub fn memory_in_use(index: usize) -> Option<u64> {
        // SAFETY: the CUDA driver API's stable C entry points with the
        // signatures declared above (cuda.h: cuDevicePrimaryCtx* since 7.0,
        // the _v2 context and memory calls since 4.0); the context pushed is
        // popped before returning, and the retain is released; the library
        // stays loaded for the calls.
        unsafe {
            let library = libloading::Library::new("libcuda.so.1").ok()?;
            let init: libloading::Symbol<CuInit> = library.get(b"cuInit\0").ok()?;
            let device_get: libloading::Symbol<CuDeviceGet> = library.get(b"cuDeviceGet\0").ok()?;
            let get_state: libloading::Symbol<CuDevicePrimaryCtxGetState> =
                library.get(b"cuDevicePrimaryCtxGetState\0").ok()?;
            let retain: libloading::Symbol<CuDevicePrimaryCtxRetain> =
                library.get(b"cuDevicePrimaryCtxRetain\0").ok()?;
            let release: libloading::Symbol<CuDevicePrimaryCtxRelease> =
                library.get(b"cuDevicePrimaryCtxRelease_v2\0").ok()?;
            let push: libloading::Symbol<CuCtxPushCurrent> =
                library.get(b"cuCtxPushCurrent_v2\0").ok()?;
            let pop: libloading::Symbol<CuCtxPopCurrent> =
                library.get(b"cuCtxPopCurrent_v2\0").ok()?;
            let mem_get_info: libloading::Symbol<CuMemGetInfo> =
                library.get(b"cuMemGetInfo_v2\0").ok()?;
            if init(0) != 0 {
                return None;
            }
            let mut device: c_int = 0;
            if device_get(&mut device, c_int::try_from(index).ok()?) != 0 {
                return None;
            }
            let (mut flags, mut active): (u32, c_int) = (0, 0);
            if get_state(device, &mut flags, &mut active) != 0 || active == 0 {
                return None;
            }
            let mut context: *mut c_void = std::ptr::null_mut();
            if retain(&mut context, device) != 0 {
                return None;
            }
            let mut answer = None;
            if push(context) == 0 {
                let (mut free, mut total): (usize, usize) = (0, 0);
                if mem_get_info(&mut free, &mut total) == 0 {
                    answer = Some(total.saturating_sub(free) as u64);
                }
                let mut popped: *mut c_void = std::ptr::null_mut();
                pop(&mut popped);
            }
            release(device);
            answer
        }
    }

    /// (name, total memory in bytes) of CUDA device `index`, or None when the
    /// driver cannot be loaded or answers with an error.
    pub fn describe(index: usize) -> Option<(String, u64)> {
        // SAFETY: the symbols are the CUDA driver API's stable C entry points
        // with the signatures declared above (cuda.h, all CUDA versions >= 3.2
        // for the _v2 memory call); the library stays loaded for the calls.
        unsafe {
            let library = libloading::Library::new("libcuda.so.1").ok()?;
            let init: libloading::Symbol<CuInit> = library.get(b"cuInit\0").ok()?;
            let device_get: libloading::Symbol<CuDeviceGet> = library.get(b"cuDeviceGet\0").ok()?;
            let get_name: libloading::Symbol<CuDeviceGetName> =
                library.get(b"cuDeviceGetName\0").ok()?;
            let total_mem: libloading::Symbol<CuDeviceTotalMem> =
                library.get(b"cuDeviceTotalMem_v2\0").ok()?;
            if init(0) != 0 {
                return None;
            }
            let mut device: c_int = 0;
            if device_get(&mut device, c_int::try_from(index).ok()?) != 0 {
                return None;
            }
            let mut name = [0 as c_char; 256];
            if get_name(name.as_mut_ptr(), name.len() as c_int, device) != 0 {
                return None;
            }
            let mut bytes: usize = 0;
            if total_mem(&mut bytes, device) != 0 {
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
