//! Building request tensors and reading reply tensors, independently of the
//! server's own codec: bytes are packed and unpacked here with `to_le_bytes`
//! and `half`, as any client would.

use half::f16;
use normserve::proto::v1 as pb;
use pb::tensor::Values;

/// float32 values as raw little-endian bytes.
pub fn f32_raw(shape: &[i64], values: &[f32]) -> pb::Tensor {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw(pb::DataType::Float32, shape, bytes)
}

/// float64 values as raw little-endian bytes.
pub fn f64_raw(shape: &[i64], values: &[f64]) -> pb::Tensor {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    raw(pb::DataType::Float64, shape, bytes)
}

/// float16 values (rounded from f32) as raw little-endian bytes.
pub fn f16_raw(shape: &[i64], values: &[f32]) -> pb::Tensor {
    let bytes: Vec<u8> = values
        .iter()
        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
        .collect();
    raw(pb::DataType::Float16, shape, bytes)
}

pub fn raw(dtype: pb::DataType, shape: &[i64], bytes: Vec<u8>) -> pb::Tensor {
    pb::Tensor {
        dtype: dtype as i32,
        shape: shape.to_vec(),
        values: Some(Values::Raw(bytes.into())),
    }
}

/// Typed `float_values` without a dtype (float32 by the contract).
pub fn typed_f32(shape: &[i64], values: &[f32]) -> pb::Tensor {
    pb::Tensor {
        dtype: pb::DataType::Unspecified as i32,
        shape: shape.to_vec(),
        values: Some(Values::FloatValues(pb::FloatValues {
            values: values.to_vec(),
        })),
    }
}

/// `n` rows of `c` float32 values, every value distinct, as (n, c).
pub fn batch(n: i64, c: i64) -> pb::Tensor {
    let values: Vec<f32> = (0..n * c).map(|i| i as f32 * 0.5 - 3.0).collect();
    f32_raw(&[n, c], &values)
}

/// The values of any reply tensor widened to f64, decoded by its dtype.
pub fn values(tensor: &pb::Tensor) -> Vec<f64> {
    match &tensor.values {
        Some(Values::Raw(bytes)) => match pb::DataType::try_from(tensor.dtype) {
            Ok(pb::DataType::Float32) => bytes
                .chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
                .collect(),
            Ok(pb::DataType::Float64) => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Ok(pb::DataType::Float16) => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f64())
                .collect(),
            other => panic!("unexpected dtype {other:?} in {tensor:?}"),
        },
        Some(Values::FloatValues(v)) => v.values.iter().map(|&x| f64::from(x)).collect(),
        Some(Values::DoubleValues(v)) => v.values.clone(),
        None => panic!("tensor without values: {tensor:?}"),
    }
}

/// Asserts `actual` equals `expected` element-wise within `tolerance`.
#[track_caller]
pub fn assert_close(actual: &[f64], expected: &[f64], tolerance: f64) {
    assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
    for (a, e) in actual.iter().zip(expected) {
        assert!(
            (a - e).abs() <= tolerance,
            "{actual:?} differs from {expected:?} by more than {tolerance}"
        );
    }
}
