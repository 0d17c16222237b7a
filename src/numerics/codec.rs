//! The one place where bytes become tensors and tensors become bytes.
//!
//! Wire layout: row-major, little-endian, no padding; `numel * itemsize` bytes.

use std::sync::Arc;

use bytes::Bytes;
use half::{bf16, f16};
use tch::{Device, Tensor};

use super::host::{ExternalMemory, OutputTensor};
use super::{DType, NumericsError};

#[cfg(target_endian = "big")]
compile_error!("normserve's wire format is little-endian and assumes a little-endian host");

/// Most dimensions a tensor may have (batch norm uses at most 5).
pub const MAX_RANK: usize = 8;

/// A validated dense tensor in host memory: `bytes.len() == numel(shape) *
/// dtype.itemsize()` always holds.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    dtype: DType,
    shape: Vec<i64>,
    bytes: Bytes,
}

/// A computation's input: the request's bytes seen in place, a copy, or
/// shared device memory seen in place.
pub enum InputTensor {
    Borrowed(super::host::BorrowedTensor),
    Owned(Tensor),
    /// Device memory another owner shares, viewed in place.
    Device(super::device_data::DeviceView),
}

impl std::ops::Deref for InputTensor {
    type Target = Tensor;

    fn deref(&self) -> &Tensor {
        match self {
            InputTensor::Borrowed(view) => view,
            InputTensor::Owned(tensor) => tensor,
            InputTensor::Device(view) => view,
        }
    }
}

/// A CPU tensor of `dtype` and `shape` over `memory` (exactly its bytes,
/// aligned to the element size) for a computation to write its output into
/// instead of a new tensor.
pub fn output_tensor(
    memory: Arc<dyn ExternalMemory>,
    dtype: DType,
    shape: &[i64],
) -> Result<OutputTensor, NumericsError> {
    super::host::view_output(memory, shape, dtype.kind())
}

/// Element count of `shape`, checked against `max_elements` before anything
/// is allocated. `field` names the tensor in errors.
pub fn checked_numel(field: &str, shape: &[i64], max_elements: u64) -> Result<u64, NumericsError> {
    if shape.len() > MAX_RANK {
        return Err(NumericsError::invalid(
            format!("{field}.shape"),
            format!(
                "at most {MAX_RANK} dimensions are supported, got {}",
                shape.len()
            ),
        ));
    }
    if shape.iter().any(|&dim| dim < 0) {
        return Err(NumericsError::invalid(
            format!("{field}.shape"),
            format!("dimensions must be >= 0, got {shape:?}"),
        ));
    }
    // libtorch computes strides over the sizes with zeros counted as ones,
    // so even a shape holding no elements must keep that product within
    // i64: [0, 2^62, 2] would otherwise fail inside libtorch ("Stride
    // calculation overflowed"), an internal error for a caller's mistake.
    let overflow = || NumericsError::LimitExceeded {
        field: field.to_owned(),
        what: "element count",
        actual: u64::MAX,
        limit: max_elements,
        limit_name: "max_tensor_elements",
    };
    let mut extent: i64 = 1;
    let mut numel: u64 = 1;
    for &dim in shape {
        extent = extent.checked_mul(dim.max(1)).ok_or_else(overflow)?;
        // Cannot overflow: every dimension is >= 0 and numel <= extent.
        numel = numel.saturating_mul(dim.unsigned_abs());
    }
    if numel > max_elements {
        return Err(NumericsError::LimitExceeded {
            field: field.to_owned(),
            what: "element count",
            actual: numel,
            limit: max_elements,
            limit_name: "max_tensor_elements",
        });
    }
    Ok(numel)
}

impl TensorData {
    /// Raw little-endian bytes; the length must match shape and dtype exactly.
    pub fn from_raw(
        field: &str,
        dtype: DType,
        shape: Vec<i64>,
        bytes: Bytes,
        max_elements: u64,
    ) -> Result<Self, NumericsError> {
        let numel = checked_numel(field, &shape, max_elements)?;
        let expected = numel as u128 * dtype.itemsize() as u128;
        if bytes.len() as u128 != expected {
            return Err(NumericsError::invalid(
                format!("{field}.raw"),
                format!(
                    "expected {expected} bytes (shape {shape:?} of {}), got {}",
                    dtype.torch_name(),
                    bytes.len()
                ),
            ));
        }
        Ok(TensorData {
            dtype,
            shape,
            bytes,
        })
    }

    /// Typed float32 values, converted to `dtype` (round to nearest even).
    pub fn from_f32(
        field: &str,
        dtype: DType,
        shape: Vec<i64>,
        values: &[f32],
        max_elements: u64,
    ) -> Result<Self, NumericsError> {
        Self::check_count(field, "float_values", &shape, values.len(), max_elements)?;
        let bytes = encode_values(dtype, values.iter().map(|&v| f64::from(v)), values.len());
        Ok(TensorData {
            dtype,
            shape,
            bytes,
        })
    }

    /// Typed float64 values, converted to `dtype` (round to nearest even).
    pub fn from_f64(
        field: &str,
        dtype: DType,
        shape: Vec<i64>,
        values: &[f64],
        max_elements: u64,
    ) -> Result<Self, NumericsError> {
        Self::check_count(field, "double_values", &shape, values.len(), max_elements)?;
        let bytes = encode_values(dtype, values.iter().copied(), values.len());
        Ok(TensorData {
            dtype,
            shape,
            bytes,
        })
    }

    fn check_count(
        field: &str,
        repr: &str,
        shape: &[i64],
        count: usize,
        max_elements: u64,
    ) -> Result<(), NumericsError> {
        let numel = checked_numel(field, shape, max_elements)?;
        if numel != count as u64 {
            return Err(NumericsError::invalid(
                format!("{field}.{repr}"),
                format!("shape {shape:?} holds {numel} elements, got {count} values"),
            ));
        }
        Ok(())
    }

    /// Copies a tensor (any device, any layout) into host memory.
    pub fn from_tensor(tensor: &Tensor) -> Result<Self, NumericsError> {
        let kind = tensor.f_kind()?;
        let Some(dtype) = DType::from_kind(kind) else {
            return Err(NumericsError::Torch(format!(
                "unsupported result dtype {kind:?}"
            )));
        };
        let shape = tensor.size();
        let numel = tensor.numel();
        let mut buffer = vec![0u8; numel * dtype.itemsize()];
        if numel > 0 {
            let host = tensor.f_to_device(Device::Cpu)?.f_contiguous()?;
            host.f_copy_data_u8(&mut buffer, numel)?;
        }
        Ok(TensorData {
            dtype,
            shape,
            bytes: Bytes::from(buffer),
        })
    }

    /// Takes a computation's fresh result (no other handle writes to its
    /// storage) and keeps it as the bytes: no copy when it is already a
    /// contiguous CPU tensor, so the reply is encoded straight from the
    /// tensor's memory; one copy to host memory otherwise.
    pub fn from_result(tensor: Tensor) -> Result<Self, NumericsError> {
        let kind = tensor.f_kind()?;
        let Some(dtype) = DType::from_kind(kind) else {
            return Err(NumericsError::Torch(format!(
                "unsupported result dtype {kind:?}"
            )));
        };
        let shape = tensor.size();
        let length = tensor.numel() * dtype.itemsize();
        let bytes = if length == 0 {
            Bytes::new()
        } else {
            let host = tensor.f_to_device(Device::Cpu)?.f_contiguous()?;
            super::host::into_bytes(host, length)?
        };
        Ok(TensorData {
            dtype,
            shape,
            bytes,
        })
    }

    /// A tensor on `device` with these values for one computation's input:
    /// on the CPU it reads the bytes in place when they are aligned (no copy;
    /// the result must only be read, and nothing derived from it may share
    /// its memory), otherwise it holds a copy.
    pub fn input_tensor(&self, device: Device) -> Result<InputTensor, NumericsError> {
        if device == Device::Cpu {
            if let Some(view) = super::host::borrow(&self.bytes, &self.shape, self.dtype.kind())? {
                return Ok(InputTensor::Borrowed(view));
            }
        }
        Ok(InputTensor::Owned(self.to_tensor(device)?))
    }

    /// A copy of the output a computation wrote into `out`, as `dtype` and
    /// `shape` (a result kept beyond the memory's use: for replays).
    pub fn copied_from_output(out: &OutputTensor) -> Result<Self, NumericsError> {
        let kind = out.f_kind()?;
        let Some(dtype) = DType::from_kind(kind) else {
            return Err(NumericsError::Torch(format!(
                "unsupported result dtype {kind:?}"
            )));
        };
        Ok(TensorData {
            dtype,
            shape: out.size(),
            bytes: out.copy_bytes(),
        })
    }

    /// A tensor on `device` holding a copy of these values.
    pub fn to_tensor(&self, device: Device) -> Result<Tensor, NumericsError> {
        let tensor =
            super::host::copy_into_new_tensor(&self.bytes, &self.shape, self.dtype.kind())?;
        if device == Device::Cpu {
            Ok(tensor)
        } else {
            Ok(tensor.f_to_device(device)?)
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[i64] {
        &self.shape
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    pub fn numel(&self) -> usize {
        self.bytes.len() / self.dtype.itemsize()
    }

    /// The values widened to f64 (exact for every supported dtype).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let b = &self.bytes;
        match self.dtype {
            DType::Float32 => b
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            DType::Float64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
            DType::Float16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            DType::BFloat16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
        }
    }

    /// The values as f32 (exact for float32, float16 and bfloat16; rounded
    /// for float64).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.to_f64_vec().into_iter().map(|v| v as f32).collect()
    }
}

fn encode_values(dtype: DType, values: impl Iterator<Item = f64>, count: usize) -> Bytes {
    let mut out = Vec::with_capacity(count * dtype.itemsize());
    match dtype {
        DType::Float32 => values.for_each(|v| out.extend_from_slice(&(v as f32).to_le_bytes())),
        DType::Float64 => values.for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        // Through float32, as PyTorch converts (c10::Half and c10::BFloat16
        // are built from a float): exact rounding for float_values, and
        // torch's own double rounding for double_values. half's `from_f64`
        // drops the low 32 mantissa bits before rounding: float32 461.00006
        // became bfloat16 460 instead of 462.
        DType::Float16 => {
            values.for_each(|v| out.extend_from_slice(&f16::from_f32(v as f32).to_le_bytes()))
        }
        DType::BFloat16 => {
            values.for_each(|v| out.extend_from_slice(&bf16::from_f32(v as f32).to_le_bytes()))
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_length_must_match_shape_and_dtype() {
        let err = TensorData::from_raw(
            "input",
            DType::Float32,
            vec![2, 3],
            Bytes::from(vec![0; 23]),
            100,
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("input.raw: expected 24 bytes"),
            "{err}"
        );
    }

    #[test]
    fn overflowing_shapes_are_limits_not_panics() {
        let err = checked_numel("input", &[i64::MAX, i64::MAX, 4], 1 << 20).unwrap_err();
        assert!(matches!(err, NumericsError::LimitExceeded { .. }), "{err}");
        let err = checked_numel("input", &[-1, 3], 1 << 20).unwrap_err();
        assert!(err.to_string().contains("must be >= 0"), "{err}");
    }

    #[test]
    fn round_trips_through_a_tensor() {
        let data = TensorData::from_f32(
            "x",
            DType::Float16,
            vec![2, 2],
            &[1.0, -2.5, 0.1, 65504.0],
            10,
        )
        .unwrap();
        let tensor = data.to_tensor(Device::Cpu).unwrap();
        let back = TensorData::from_tensor(&tensor).unwrap();
        assert_eq!(back, data);
        assert_eq!(back.to_f32_vec()[1], -2.5);
    }
}
