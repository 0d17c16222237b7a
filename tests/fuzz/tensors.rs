//! Tensor decoding: `convert::tensor` / `required_tensor` (proto Tensor ->
//! validated `TensorData`) and the CPU tensors built from the result.
//!
//! The rules, from tensor.proto and `numerics::codec`: the dtype is a known
//! DataType (raw bytes must name one; float_values default to float32 and
//! double_values to float64); at most 8 dimensions, each >= 0; the element
//! count at most `max_elements` (RESOURCE_EXHAUSTED above it); raw bytes
//! exactly `numel * itemsize` long, typed lists exactly `numel` values.
//! Anything else is INVALID_ARGUMENT.

use bytes::Bytes;
use half::{bf16, f16};
use normserve::numerics::{DType, TensorData};
use normserve::proto::v1 as pb;
use normserve::transport::convert::{self, Representation};
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;
use tch::{Device, Tensor};
use tonic::Code;

use crate::{code, fuzz};

#[derive(Debug, Clone)]
pub enum Values {
    Absent,
    /// `bytes[offset..]` travels, so that some tensors start unaligned.
    Raw {
        bytes: Vec<u8>,
        offset: usize,
    },
    Float(Vec<f32>),
    Double(Vec<f64>),
}

#[derive(Debug, Clone)]
pub struct Case {
    pub dtype: i32,
    pub shape: Vec<i64>,
    pub values: Values,
}

impl Case {
    pub fn to_proto(&self) -> pb::Tensor {
        let values = match &self.values {
            Values::Absent => None,
            Values::Raw { bytes, offset } => Some(pb::tensor::Values::Raw(
                Bytes::from(bytes.clone()).slice(*offset..),
            )),
            Values::Float(values) => Some(pb::tensor::Values::FloatValues(pb::FloatValues {
                values: values.clone(),
            })),
            Values::Double(values) => Some(pb::tensor::Values::DoubleValues(pb::DoubleValues {
                values: values.clone(),
            })),
        };
        pb::Tensor {
            dtype: self.dtype,
            shape: self.shape.clone(),
            values,
        }
    }
}

fn dim() -> impl Strategy<Value = i64> {
    prop_oneof![
        12 => 0i64..=4,
        1 => -3i64..0,
        1 => prop::sample::select(vec![
            i64::MAX,
            i64::MIN,
            i64::MAX / 2 + 1,
            1 << 31,
            1 << 32,
            1 << 62,
            3_037_000_500, // its square just overflows i64
        ]),
        1 => any::<i64>(),
    ]
}

fn dtype() -> impl Strategy<Value = i32> {
    prop_oneof![8 => 0i32..=4, 1 => any::<i32>()]
}

pub fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -1e3f32..1e3,
        2 => any::<u32>().prop_map(f32::from_bits),
        1 => prop::sample::select(vec![
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001), // signalling NaN
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            f32::MAX,
            f32::MIN_POSITIVE / 2.0, // subnormal
            65520.0,                 // rounds to inf in float16
        ]),
    ]
}

pub fn double() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => -1e3f64..1e3,
        2 => any::<u64>().prop_map(f64::from_bits),
        1 => prop::sample::select(vec![
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
            f64::MAX,
            1e-310,
            f64::from(f32::MAX) * 2.0,
        ]),
    ]
}

fn itemsize(dtype: i32) -> usize {
    match pb::DataType::try_from(dtype) {
        Ok(pb::DataType::Float64) => 8,
        Ok(pb::DataType::Float16 | pb::DataType::Bfloat16) => 2,
        _ => 4,
    }
}

/// The element count of `shape` when it is small enough to generate that
/// many values (every dimension >= 0, product <= 4096).
fn small_numel(shape: &[i64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| {
        let d = usize::try_from(d).ok()?;
        let n = n.checked_mul(d)?;
        (n <= 4096).then_some(n)
    })
}

/// Values for `shape`: mostly exactly as many as it holds, sometimes a few
/// more or fewer, sometimes none at all.
fn values(dtype: i32, shape: &[i64]) -> impl Strategy<Value = Values> {
    let numel = small_numel(shape).unwrap_or(0);
    let count = prop_oneof![4 => Just(numel), 1 => 0..=numel + 3];
    let size = itemsize(dtype);
    count.prop_flat_map(move |n| {
        let length = prop_oneof![4 => Just(n * size), 1 => 0..=n * size + 9];
        prop_oneof![
            1 => Just(Values::Absent),
            4 => (length, 0usize..8).prop_flat_map(|(length, offset)| {
                prop::collection::vec(any::<u8>(), length + offset)
                    .prop_map(move |bytes| Values::Raw { bytes, offset })
            }),
            3 => prop::collection::vec(float(), n).prop_map(Values::Float),
            3 => prop::collection::vec(double(), n).prop_map(Values::Double),
        ]
    })
}

pub fn case_with_rank(rank: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = Case> {
    (dtype(), prop::collection::vec(dim(), rank)).prop_flat_map(|(dtype, shape)| {
        values(dtype, &shape).prop_map(move |values| Case {
            dtype,
            shape: shape.clone(),
            values,
        })
    })
}

pub fn case() -> impl Strategy<Value = Case> {
    case_with_rank(0..=10)
}

pub fn max_elements() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), 0u64..=64, Just(4096), Just(u64::MAX)]
}

/// What the rules say must happen.
#[derive(Debug, PartialEq)]
pub enum Expected {
    Accept(DType),
    Reject(Code),
}

fn dtype_of(value: i32) -> Result<Option<DType>, ()> {
    match pb::DataType::try_from(value) {
        Ok(pb::DataType::Unspecified) => Ok(None),
        Ok(pb::DataType::Float32) => Ok(Some(DType::Float32)),
        Ok(pb::DataType::Float64) => Ok(Some(DType::Float64)),
        Ok(pb::DataType::Float16) => Ok(Some(DType::Float16)),
        Ok(pb::DataType::Bfloat16) => Ok(Some(DType::BFloat16)),
        Err(_) => Err(()),
    }
}

/// The exact element count, `None` when a dimension is negative.
fn exact_numel(shape: &[i64]) -> Option<u128> {
    let mut numel: u128 = 1;
    let mut zero = false;
    for &d in shape {
        let d = u64::try_from(d).ok()?;
        zero |= d == 0;
        numel = numel.saturating_mul(u128::from(d));
    }
    Some(if zero { 0 } else { numel })
}

pub fn expected(case: &Case, max_elements: u64) -> Expected {
    let Ok(named) = dtype_of(case.dtype) else {
        return Expected::Reject(Code::InvalidArgument);
    };
    let (dtype, length) = match (&case.values, named) {
        (Values::Absent, _) | (Values::Raw { .. }, None) => {
            return Expected::Reject(Code::InvalidArgument)
        }
        (Values::Raw { bytes, offset }, Some(dtype)) => (
            dtype,
            (
                (bytes.len() - offset) / dtype.itemsize(),
                (bytes.len() - offset) % dtype.itemsize(),
            ),
        ),
        (Values::Float(values), dtype) => (dtype.unwrap_or(DType::Float32), (values.len(), 0)),
        (Values::Double(values), dtype) => (dtype.unwrap_or(DType::Float64), (values.len(), 0)),
    };
    if case.shape.len() > 8 || case.shape.iter().any(|&d| d < 0) {
        return Expected::Reject(Code::InvalidArgument);
    }
    // libtorch's strides multiply the sizes with zeros counted as ones: that
    // product must fit i64 even when the tensor holds no elements.
    let extent = case
        .shape
        .iter()
        .try_fold(1i64, |n, &d| n.checked_mul(d.max(1)));
    let numel = exact_numel(&case.shape).unwrap();
    if extent.is_none() || numel > u128::from(max_elements) {
        Expected::Reject(Code::ResourceExhausted)
    } else if length != (numel as usize, 0) {
        Expected::Reject(Code::InvalidArgument)
    } else {
        Expected::Accept(dtype)
    }
}

fn same_float(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits()
}

/// The values as the wire holds them, read independently of the codec.
fn wire_values(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(dtype.itemsize())
        .map(|c| match dtype {
            DType::Float32 => f64::from(f32::from_le_bytes(c.try_into().unwrap())),
            DType::Float64 => f64::from_le_bytes(c.try_into().unwrap()),
            DType::Float16 => f64::from(f16::from_bits(u16::from_le_bytes([c[0], c[1]]))),
            DType::BFloat16 => f64::from(bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))),
        })
        .collect()
}

/// `value` stored as `dtype`, rounded to nearest even (IEEE conversions, as
/// `torch.tensor(values, dtype=...)`).
fn rounded_f32(dtype: DType, value: f32) -> f64 {
    match dtype {
        DType::Float32 => f64::from(value),
        DType::Float64 => f64::from(value),
        DType::Float16 => f64::from(f16::from_f32(value)),
        DType::BFloat16 => f64::from(bf16::from_f32(value)),
    }
}

fn rounded_f64(dtype: DType, value: f64) -> f64 {
    match dtype {
        DType::Float32 => f64::from(value as f32),
        DType::Float64 => value,
        // PyTorch rounds float64 to half types through float32.
        DType::Float16 => f64::from(f16::from_f32(value as f32)),
        DType::BFloat16 => f64::from(bf16::from_f32(value as f32)),
    }
}

/// The bytes of a CPU tensor, read through libtorch.
fn tensor_bytes(tensor: &Tensor, length: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; length];
    if length > 0 {
        let numel = tensor.numel();
        tensor
            .f_contiguous()
            .unwrap()
            .f_copy_data_u8(&mut bytes, numel)
            .unwrap();
    }
    bytes
}

/// Checks an accepted tensor against its input and through libtorch.
pub fn check_accepted(
    case: &Case,
    dtype: DType,
    data: &TensorData,
    representation: Representation,
) -> TestCaseResult {
    let numel = exact_numel(&case.shape).unwrap();
    prop_assert_eq!(data.dtype(), dtype);
    prop_assert_eq!(data.shape(), &case.shape[..]);
    prop_assert_eq!(data.numel() as u128, numel);
    prop_assert_eq!(data.bytes().len() as u128, numel * dtype.itemsize() as u128);
    let decoded = wire_values(dtype, data.bytes());
    match &case.values {
        Values::Raw { bytes, offset } => {
            prop_assert_eq!(representation, Representation::Raw);
            prop_assert_eq!(
                &data.bytes()[..],
                &bytes[*offset..],
                "raw bytes must pass unchanged"
            );
        }
        Values::Float(values) => {
            prop_assert_eq!(representation, Representation::Float);
            for (i, (&value, &got)) in values.iter().zip(&decoded).enumerate() {
                let want = rounded_f32(dtype, value);
                prop_assert!(
                    same_float(got, want),
                    "float_values[{i}] = {value:e}: stored {got:e}, want {want:e}"
                );
            }
        }
        Values::Double(values) => {
            prop_assert_eq!(representation, Representation::Double);
            for (i, (&value, &got)) in values.iter().zip(&decoded).enumerate() {
                let want = rounded_f64(dtype, value);
                prop_assert!(
                    same_float(got, want),
                    "double_values[{i}] = {value:e}: stored {got:e}, want {want:e}"
                );
            }
        }
        Values::Absent => prop_assert!(false, "accepted a tensor without values"),
    }
    // The tensors computations get: a copy, and the in-place view when aligned.
    let length = data.bytes().len();
    let copy = data.to_tensor(Device::Cpu).unwrap();
    prop_assert_eq!(copy.size(), case.shape.clone());
    prop_assert_eq!(copy.kind(), dtype.kind());
    prop_assert!(
        tensor_bytes(&copy, length) == data.bytes()[..],
        "to_tensor changed the values"
    );
    let input = data.input_tensor(Device::Cpu).unwrap();
    prop_assert_eq!(input.size(), case.shape.clone());
    prop_assert_eq!(input.kind(), dtype.kind());
    prop_assert!(
        tensor_bytes(&input, length) == data.bytes()[..],
        "input_tensor changed the values"
    );
    // Raw replies carry the bytes back unchanged.
    let back = convert::tensor_to_proto(data.clone(), Representation::Raw);
    prop_assert_eq!(back.shape, case.shape.clone());
    prop_assert_eq!(back.dtype, convert::dtype_to_proto(dtype) as i32);
    prop_assert!(back.values == Some(pb::tensor::Values::Raw(data.bytes().clone())));
    Ok(())
}

/// Decodes `case` with `max_elements` and checks the outcome against the
/// rules; the shared property of every target that carries tensors.
pub fn check_decoding(case: &Case, max_elements: u64) -> TestCaseResult {
    let result = convert::required_tensor("input", Some(case.to_proto()), max_elements);
    let expected = expected(case, max_elements);
    match (result, expected) {
        (Ok((data, representation)), Expected::Accept(dtype)) => {
            check_accepted(case, dtype, &data, representation)
        }
        (Err(error), Expected::Reject(want)) => {
            let text = error.to_string();
            let got = code(error);
            prop_assert_eq!(got, want, "rejected: {}", text);
            prop_assert!(
                text.starts_with("input"),
                "the error must name the field: {text}"
            );
            Ok(())
        }
        (Ok(_), expected) => {
            prop_assert!(false, "accepted, the rules say {expected:?}");
            Ok(())
        }
        (Err(error), expected) => {
            prop_assert!(false, "rejected ({error}), the rules say {expected:?}");
            Ok(())
        }
    }
}

#[test]
fn tensor_decoding_accepts_exactly_the_valid_tensors() {
    fuzz(
        "tensor_decoding",
        (case(), max_elements()),
        |(case, max)| check_decoding(&case, max),
    );
}

#[test]
fn absent_tensors_are_none_or_required() {
    assert!(convert::tensor("weight", None, 10).unwrap().is_none());
    let error = convert::required_tensor("input", None, 10).unwrap_err();
    assert_eq!(code(error), Code::InvalidArgument);
}

/// Found by this target: a shape holding no elements passed the element
/// limit however large its other sizes, then failed inside libtorch
/// ("Stride calculation overflowed") as an INTERNAL error.
#[test]
fn zero_element_shapes_whose_strides_overflow_are_limits() {
    let empty = |shape: Vec<i64>| pb::Tensor {
        dtype: pb::DataType::Float32 as i32,
        shape,
        values: Some(pb::tensor::Values::Raw(Bytes::new())),
    };
    for shape in [
        vec![0, 1 << 62, 2],
        vec![1 << 62, 2, 0],
        vec![i64::MAX, i64::MAX, 0],
    ] {
        let error =
            convert::required_tensor("input", Some(empty(shape.clone())), 1 << 20).unwrap_err();
        assert_eq!(code(error), Code::ResourceExhausted, "{shape:?}");
    }
    let (data, _) =
        convert::required_tensor("input", Some(empty(vec![0, 1 << 62])), 1 << 20).unwrap();
    assert_eq!(
        data.to_tensor(Device::Cpu).unwrap().size(),
        vec![0, 1 << 62]
    );
}

/// Found by this target: float_values were widened to f64 and rounded by
/// half's `from_f64`, which drops the low 32 mantissa bits first, so values
/// just above a halfway point rounded down. PyTorch:
/// `torch.tensor([461.00006103515625]).to(torch.bfloat16)` is 462.
#[test]
fn float_values_round_to_nearest_in_half_types() {
    let decode = |dtype: pb::DataType, value: f32| {
        let tensor = pb::Tensor {
            dtype: dtype as i32,
            shape: vec![1],
            values: Some(pb::tensor::Values::FloatValues(pb::FloatValues {
                values: vec![value],
            })),
        };
        let (data, _) = convert::required_tensor("input", Some(tensor), 1).unwrap();
        data.to_f64_vec()[0]
    };
    // 461 + 2^-14: just above halfway between bfloat16's 460 and 462.
    assert_eq!(
        decode(pb::DataType::Bfloat16, 461.0 + 2f32.powi(-14)),
        462.0
    );
    // 1 + 2^-11 + 2^-23: just above halfway between float16's 1 and 1 + 2^-10.
    let above_halfway = 1.0 + 2f32.powi(-11) + 2f32.powi(-23);
    assert_eq!(
        decode(pb::DataType::Float16, above_halfway),
        1.0 + 2f64.powi(-10)
    );
}
