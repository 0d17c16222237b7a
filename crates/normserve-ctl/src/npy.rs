//! Reading `.npy` files (NumPy's array format, versions 1-3) into the wire's
//! tensor form: little-endian float16/float32/float64, C order.

use std::path::Path;

use bytes::Bytes;

use crate::proto::v1 as pb;

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a .npy file: {reason}")]
    Format { path: String, reason: String },
}

/// Reads `path` as a tensor sent as raw bytes.
pub fn read(path: &Path) -> Result<pb::Tensor, NpyError> {
    let name = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| NpyError::Io {
        path: name.clone(),
        source,
    })?;
    parse(&data).map_err(|reason| NpyError::Format { path: name, reason })
}

/// Parses the bytes of a `.npy` file.
pub fn parse(data: &[u8]) -> Result<pb::Tensor, String> {
    let Some(rest) = data.strip_prefix(b"\x93NUMPY") else {
        return Err("missing the \\x93NUMPY magic".into());
    };
    let (major, rest) = match rest {
        [major, _minor, rest @ ..] => (*major, rest),
        _ => return Err("truncated header".into()),
    };
    let (header_len, rest) = match (major, rest) {
        (1, [a, b, rest @ ..]) => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        (2 | 3, [a, b, c, d, rest @ ..]) => {
            let len = u32::from_le_bytes([*a, *b, *c, *d]);
            (usize::try_from(len).map_err(|_| "header too long")?, rest)
        }
        _ => return Err(format!("unsupported format version {major}")),
    };
    if rest.len() < header_len {
        return Err("truncated header".into());
    }
    let (header, body) = rest.split_at(header_len);
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let descr = dict_value(header, "descr").ok_or("header has no 'descr'")?;
    let dtype = match descr.trim_matches(|c| c == '\'' || c == '"') {
        "<f4" => pb::DataType::Float32,
        "<f8" => pb::DataType::Float64,
        "<f2" => pb::DataType::Float16,
        other => {
            return Err(format!(
                "dtype {other} is not supported (float16, float32 or float64, little-endian)"
            ))
        }
    };
    let itemsize = match dtype {
        pb::DataType::Float64 => 8,
        pb::DataType::Float16 => 2,
        _ => 4,
    };
    if dict_value(header, "fortran_order").map(str::trim) == Some("True") {
        return Err(
            "Fortran-ordered arrays are not supported (save with np.ascontiguousarray)".into(),
        );
    }
    let shape_text = dict_value(header, "shape").ok_or("header has no 'shape'")?;
    let shape = shape_text
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<i64>()
                .map_err(|_| format!("bad shape {shape_text}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| {
            usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
        })
        .ok_or_else(|| format!("bad shape {shape_text}"))?;
    let length = numel
        .checked_mul(itemsize)
        .ok_or_else(|| format!("bad shape {shape_text}"))?;
    if body.len() != length {
        return Err(format!(
            "shape {shape:?} needs {length} bytes of data, the file has {}",
            body.len()
        ));
    }
    Ok(pb::Tensor {
        dtype: dtype as i32,
        shape,
        values: Some(pb::tensor::Values::Raw(Bytes::copy_from_slice(body))),
    })
}

/// The text of `key`'s value in a Python dict literal: up to the next
/// top-level comma (tuples may hold commas).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let after = &header[start + key.len() + 2..];
    let after = after.trim_start().strip_prefix(':')?;
    let mut depth = 0i32;
    for (i, ch) in after.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(after[..i].trim()),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, body: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn reads_float32_matrices_and_rejects_bad_files() {
        let body: Vec<u8> = [1f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let tensor = parse(&npy("<f4", "(2, 3)", &body)).unwrap();
        assert_eq!(tensor.shape, vec![2, 3]);
        assert_eq!(tensor.dtype, pb::DataType::Float32 as i32);
        assert!(parse(&npy("<f4", "(4, 3)", &body))
            .unwrap_err()
            .contains("needs 48 bytes"));
        assert!(parse(&npy("<i8", "(6,)", &body))
            .unwrap_err()
            .contains("not supported"));
        assert!(parse(b"PK\x03\x04").unwrap_err().contains("magic"));
        assert_eq!(parse(&npy("<f8", "(0,)", &[])).unwrap().shape, vec![0]);
    }
}
