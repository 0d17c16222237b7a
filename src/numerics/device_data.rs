//! A computation's input that is either host bytes ([`TensorData`]) or
//! memory on a device that another owner keeps alive (a client's GPU memory
//! shared with the server), viewed in place as a tensor of that device.
//!
//! The owner of device memory implements [`DeviceMemory`] (its `unsafe`
//! lives with it, outside `numerics`); here it is only asked for a view of
//! a dtype and shape, which is then an input like any other.

use std::sync::Arc;

use tch::{Device, Tensor};

use super::codec::{checked_numel, InputTensor};
use super::{DType, NumericsError, TensorData};

/// Device memory, owned elsewhere, that a tensor may view in place.
pub trait DeviceMemory: Send + Sync + std::fmt::Debug {
    /// The device the memory is on.
    fn device(&self) -> Device;

    /// Bytes of memory available to the view.
    fn byte_size(&self) -> u64;

    /// A contiguous tensor of `shape` and `kind` on [`Self::device`] reading
    /// and writing the memory in place; valid while `self` lives (the caller
    /// keeps it beside the view).
    fn view(&self, shape: &[i64], kind: tch::Kind) -> Result<Tensor, NumericsError>;
}

/// A view of [`DeviceMemory`] that keeps the memory alive: the tensor is
/// declared first, so it is dropped before the memory's owner.
pub struct DeviceView {
    tensor: Tensor,
    _memory: Arc<dyn DeviceMemory>,
}

impl std::ops::Deref for DeviceView {
    type Target = Tensor;

    fn deref(&self) -> &Tensor {
        &self.tensor
    }
}

/// A validated dense tensor in device memory: `numel(shape) *
/// dtype.itemsize()` bytes of `memory`, exactly.
#[derive(Debug, Clone)]
pub struct DeviceTensorData {
    dtype: DType,
    shape: Vec<i64>,
    memory: Arc<dyn DeviceMemory>,
}

impl DeviceTensorData {
    /// `memory` as a tensor of `dtype` and `shape`; its size must match them
    /// exactly. `field` names the tensor in errors.
    pub fn new(
        field: &str,
        dtype: DType,
        shape: Vec<i64>,
        memory: Arc<dyn DeviceMemory>,
        max_elements: u64,
    ) -> Result<Self, NumericsError> {
        let numel = checked_numel(field, &shape, max_elements)?;
        let expected = numel as u128 * dtype.itemsize() as u128;
        if u128::from(memory.byte_size()) != expected {
            return Err(NumericsError::invalid(
                field,
                format!(
                    "expected {expected} bytes (shape {shape:?} of {}), the device memory holds {}",
                    dtype.torch_name(),
                    memory.byte_size()
                ),
            ));
        }
        Ok(DeviceTensorData {
            dtype,
            shape,
            memory,
        })
    }

    pub fn device(&self) -> Device {
        self.memory.device()
    }
}

/// A Forward's input: host bytes, or device memory viewed in place.
#[derive(Debug, Clone)]
pub enum InputData {
    Host(TensorData),
    Device(DeviceTensorData),
}

impl From<TensorData> for InputData {
    fn from(data: TensorData) -> Self {
        InputData::Host(data)
    }
}

impl InputData {
    pub fn dtype(&self) -> DType {
        match self {
            InputData::Host(data) => data.dtype(),
            InputData::Device(data) => data.dtype,
        }
    }

    pub fn shape(&self) -> &[i64] {
        match self {
            InputData::Host(data) => data.shape(),
            InputData::Device(data) => &data.shape,
        }
    }

    /// The tensor's size in bytes (numel * itemsize), wherever it lives.
    pub fn byte_size(&self) -> usize {
        match self {
            InputData::Host(data) => data.bytes().len(),
            InputData::Device(data) => {
                data.shape
                    .iter()
                    .map(|&d| d.max(0) as usize)
                    .product::<usize>()
                    * data.dtype.itemsize()
            }
        }
    }

    /// The host bytes, or None for device memory.
    pub fn as_host(&self) -> Option<&TensorData> {
        match self {
            InputData::Host(data) => Some(data),
            InputData::Device(_) => None,
        }
    }

    /// A tensor on `device` with these values for one computation's input
    /// (see [`TensorData::input_tensor`]); device memory is viewed in place
    /// and must be on `device` already (it is never moved: a client shares
    /// it to avoid copies).
    pub fn input_tensor(&self, device: Device) -> Result<InputTensor, NumericsError> {
        match self {
            InputData::Host(data) => data.input_tensor(device),
            InputData::Device(data) => {
                let on = data.device();
                if on != device {
                    return Err(NumericsError::invalid(
                        "input_region",
                        format!(
                            "the region's memory is on {}, but the session computes on {}; name memory of the session's device",
                            device_name(on),
                            device_name(device)
                        ),
                    ));
                }
                let tensor = data.memory.view(&data.shape, data.dtype.kind())?;
                Ok(InputTensor::Device(DeviceView {
                    tensor,
                    _memory: data.memory.clone(),
                }))
            }
        }
    }
}

/// "cpu", "cuda:N" (as users write devices).
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        Device::Cuda(index) => format!("cuda:{index}"),
        other => format!("{other:?}").to_lowercase(),
    }
}
