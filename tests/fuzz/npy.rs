//! The CLI's `.npy` reader (`cli::npy::parse`) on well-formed files (they
//! must read back exactly), on files with odd headers (descr, shape text,
//! versions, lengths) and on mutated or arbitrary bytes (never a panic; what
//! it accepts has exactly `product(shape) * itemsize` bytes of data).

use normserve::cli::npy;
use normserve::proto::v1 as pb;
use normserve::transport::convert;
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;

use crate::fuzz;

#[derive(Debug, Clone)]
struct File {
    version: u8,
    descr: String,
    fortran: bool,
    shape: String,
    body: Vec<u8>,
    /// Header padding to 64 bytes, as NumPy writes it.
    padded: bool,
}

impl File {
    fn to_bytes(&self) -> Vec<u8> {
        let mut header = format!(
            "{{'descr': '{}', 'fortran_order': {}, 'shape': {}, }}",
            self.descr,
            if self.fortran { "True" } else { "False" },
            self.shape
        );
        let prefix = if self.version == 1 { 10 } else { 12 };
        while self.padded && (prefix + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY".to_vec();
        out.extend_from_slice(&[self.version, 0]);
        if self.version == 1 {
            out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        } else {
            out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

fn shape_text(dims: &[i64]) -> String {
    match dims {
        [] => "()".to_owned(),
        [d] => format!("({d},)"),
        _ => {
            let dims: Vec<String> = dims.iter().map(i64::to_string).collect();
            format!("({})", dims.join(", "))
        }
    }
}

fn itemsize(descr: &str) -> Option<usize> {
    match descr {
        "<f2" => Some(2),
        "<f4" => Some(4),
        "<f8" => Some(8),
        _ => None,
    }
}

/// A well-formed file: supported dtype, C order, body of the right size.
fn valid_file() -> impl Strategy<Value = (File, Vec<i64>)> {
    let descr = prop::sample::select(vec!["<f2", "<f4", "<f8"]);
    (
        descr,
        prop::collection::vec(0i64..=4, 0..=4),
        1u8..=3,
        any::<bool>(),
    )
        .prop_flat_map(|(descr, dims, version, padded)| {
            let numel: i64 = dims.iter().product();
            let length = numel as usize * itemsize(descr).unwrap_or(4);
            prop::collection::vec(any::<u8>(), length).prop_map(move |body| {
                (
                    File {
                        version,
                        descr: descr.to_owned(),
                        fortran: false,
                        shape: shape_text(&dims),
                        body,
                        padded,
                    },
                    dims.clone(),
                )
            })
        })
}

/// A file whose header fields are anything plausible or not.
fn odd_file() -> impl Strategy<Value = File> {
    let descr = prop_oneof![
        Just("<f4".to_owned()),
        Just("<f8".to_owned()),
        Just(">f4".to_owned()),
        Just("<i8".to_owned()),
        "\\PC{0,6}",
    ];
    let dim = prop_oneof![4 => 0i64..=4, 1 => any::<i64>(), 1 => -2i64..0];
    let shape = prop_oneof![
        3 => prop::collection::vec(dim, 0..=10).prop_map(|dims| shape_text(&dims)),
        1 => "[(), 0-9a-z-]{0,16}",
        1 => "\\PC{0,10}",
    ];
    (
        0u8..=4,
        descr,
        any::<bool>(),
        shape,
        prop::collection::vec(any::<u8>(), 0..80),
        any::<bool>(),
    )
        .prop_map(|(version, descr, fortran, shape, body, padded)| File {
            version,
            descr,
            fortran,
            shape,
            body,
            padded,
        })
}

fn check_parse(bytes: &[u8]) -> TestCaseResult {
    let Ok(tensor) = npy::parse(bytes) else {
        return Ok(());
    };
    let itemsize = match pb::DataType::try_from(tensor.dtype) {
        Ok(pb::DataType::Float16) => 2u128,
        Ok(pb::DataType::Float32) => 4,
        Ok(pb::DataType::Float64) => 8,
        other => {
            prop_assert!(false, "accepted dtype {other:?}");
            return Ok(());
        }
    };
    prop_assert!(
        tensor.shape.iter().all(|&d| d >= 0),
        "shape {:?}",
        tensor.shape
    );
    let numel = tensor
        .shape
        .iter()
        .try_fold(1u128, |n, &d| n.checked_mul(d as u128));
    let Some(pb::tensor::Values::Raw(raw)) = &tensor.values else {
        prop_assert!(false, "no raw values");
        return Ok(());
    };
    prop_assert_eq!(numel.map(|n| n * itemsize), Some(raw.len() as u128));
    // The CLI sends what it read; the server's decoder takes it, or refuses
    // a shape whose strides overflow as over the limit.
    if tensor.shape.len() <= 8 {
        if let Err(error) = convert::required_tensor("input", Some(tensor.clone()), u64::MAX) {
            prop_assert_eq!(crate::code(error), tonic::Code::ResourceExhausted);
        }
    }
    Ok(())
}

#[test]
fn npy_files_read_back_exactly() {
    fuzz("npy_valid", valid_file(), |(file, dims)| {
        let tensor = npy::parse(&file.to_bytes());
        prop_assert!(tensor.is_ok(), "{:?}", tensor.err());
        let tensor = tensor.unwrap();
        prop_assert_eq!(&tensor.shape, &dims);
        prop_assert!(tensor.values == Some(pb::tensor::Values::Raw(file.body.into())));
        Ok(())
    });
}

#[test]
fn npy_parser_accepts_only_consistent_arrays() {
    let mutated = (
        valid_file().prop_map(|(file, _)| file.to_bytes()),
        prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    )
        .prop_map(|(mut bytes, flips)| {
            for (at, value) in flips {
                let i = at % bytes.len();
                bytes[i] = value;
            }
            bytes
        });
    let bytes = prop_oneof![
        3 => odd_file().prop_map(|file| file.to_bytes()),
        2 => mutated,
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|rest| {
            let mut bytes = b"\x93NUMPY".to_vec();
            bytes.extend(rest);
            bytes
        }),
    ];
    fuzz("npy_parse", bytes, |bytes| check_parse(&bytes));
}
