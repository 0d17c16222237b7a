//! Batch-norm math on `tch::Tensor`: the forward pass and running-statistics
//! update with PyTorch's exact semantics and validation texts, the Compare
//! tool (implementations side by side, differences, diagnosis), tensor
//! encoding, and `state_dict` (safetensors) import/export.
//!
//! This module knows nothing about gRPC, tokio, sessions or I/O: it takes
//! tensors and plain values and returns tensors or a [`NumericsError`].

pub mod batch_norm;
pub mod codec;
pub mod compare;
pub mod device_data;
pub mod exact;
mod exact_f32;
mod exact_f64;
pub mod host;
pub mod merge_stats;
pub mod state_dict;
pub mod stats;

pub use batch_norm::{LayerKind, Momentum};
pub use codec::{output_tensor, InputTensor, TensorData};
pub use device_data::{DeviceMemory, DeviceTensorData, InputData};
pub use host::{ExternalMemory, OutputTensor};

/// Element types normserve accepts, with PyTorch's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    Float32,
    Float64,
    Float16,
    BFloat16,
}

/// Everything an element type is called or measures, in one row per type.
struct DTypeRow {
    /// Its number in stored session records (a storage format: never reuse).
    code: u32,
    /// NumPy's and PyTorch's short name, e.g. "float32".
    name: &'static str,
    /// As PyTorch prints it, e.g. "torch.float32".
    torch_name: &'static str,
    kind: tch::Kind,
    /// Bytes per element.
    itemsize: usize,
    safetensors: safetensors::Dtype,
}

impl DType {
    /// Every element type; the reverse lookups search it.
    pub const ALL: [DType; 4] = [
        DType::Float32,
        DType::Float64,
        DType::Float16,
        DType::BFloat16,
    ];

    /// The one table of element types.
    const fn row(self) -> DTypeRow {
        use safetensors::Dtype as St;
        use tch::Kind;
        let (code, name, torch_name, kind, itemsize, safetensors) = match self {
            DType::Float32 => (1, "float32", "torch.float32", Kind::Float, 4, St::F32),
            DType::Float64 => (2, "float64", "torch.float64", Kind::Double, 8, St::F64),
            DType::Float16 => (3, "float16", "torch.float16", Kind::Half, 2, St::F16),
            DType::BFloat16 => (4, "bfloat16", "torch.bfloat16", Kind::BFloat16, 2, St::BF16),
        };
        DTypeRow {
            code,
            name,
            torch_name,
            kind,
            itemsize,
            safetensors,
        }
    }

    /// Its number in stored session records.
    pub fn code(self) -> u32 {
        self.row().code
    }

    /// The element type stored as `code`, if any.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|dtype| dtype.code() == code)
    }

    pub fn kind(self) -> tch::Kind {
        self.row().kind
    }

    pub fn from_kind(kind: tch::Kind) -> Option<Self> {
        Self::ALL.into_iter().find(|dtype| dtype.kind() == kind)
    }

    /// Bytes per element.
    pub fn itemsize(self) -> usize {
        self.row().itemsize
    }

    /// The short name, e.g. "float32".
    pub fn name(self) -> &'static str {
        self.row().name
    }

    /// As PyTorch prints it, e.g. "torch.float32".
    pub fn torch_name(self) -> &'static str {
        self.row().torch_name
    }

    /// The safetensors dtype of its state_dict entries.
    pub fn safetensors_dtype(self) -> safetensors::Dtype {
        self.row().safetensors
    }
}

/// Why a numerical operation was refused or failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NumericsError {
    /// The caller sent something malformed; `field` names it ("input",
    /// "weight", "input.raw", ...) and `message` says what is wrong, with
    /// PyTorch's own text where PyTorch has one.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// A configured limit was exceeded.
    #[error("{field}: {what} {actual} exceeds the limit {limit} ({limit_name})")]
    LimitExceeded {
        field: String,
        what: &'static str,
        actual: u64,
        limit: u64,
        limit_name: &'static str,
    },
    /// libtorch failed on input that passed validation: a bug or a device
    /// fault, never the caller's fault.
    #[error("libtorch: {0}")]
    Torch(String),
}

impl NumericsError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        NumericsError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<tch::TchError> for NumericsError {
    fn from(error: tch::TchError) -> Self {
        // libtorch appends a C++ backtrace after the message; keep the message.
        let text = error.to_string();
        let first = text
            .split("\nException raised from")
            .next()
            .unwrap_or(&text);
        NumericsError::Torch(first.trim().to_owned())
    }
}

/// Formats a shape as PyTorch prints `tensor.shape`: `torch.Size([2, 3])`.
pub fn torch_size(shape: &[i64]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("torch.Size([{}])", dims.join(", "))
}

/// Formats a float as Python's `repr(float)` does ("0.0", "-1.0", "1e-05"),
/// so messages that quote a value read exactly like PyTorch's.
pub fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "inf".to_owned()
        } else {
            "-inf".to_owned()
        };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".to_owned()
        } else {
            "0.0".to_owned()
        };
    }
    // `{:e}` gives the shortest round-trip digits, as Python's repr does.
    let scientific = format!("{x:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if (-4..16).contains(&exponent) {
        let positional = format!("{x}");
        if positional.contains('.') {
            positional
        } else {
            format!("{positional}.0")
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::{python_float, DType};

    #[test]
    fn element_types_read_back_from_each_of_their_names() {
        for dtype in DType::ALL {
            assert_eq!(DType::from_code(dtype.code()), Some(dtype));
            assert_eq!(DType::from_kind(dtype.kind()), Some(dtype));
            assert_eq!(dtype.torch_name(), format!("torch.{}", dtype.name()));
        }
        // Stored records depend on these numbers.
        let codes: Vec<u32> = DType::ALL.into_iter().map(DType::code).collect();
        assert_eq!(codes, [1, 2, 3, 4]);
        assert_eq!(DType::from_code(0), None);
        assert_eq!(DType::from_code(5), None);
    }

    #[test]
    fn floats_print_like_python_repr() {
        let cases = [
            (0.0, "0.0"),
            (-1.0, "-1.0"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (123.25, "123.25"),
            (f64::NAN, "nan"),
            (f64::NEG_INFINITY, "-inf"),
        ];
        for (value, python) in cases {
            assert_eq!(python_float(value), python, "{value}");
        }
    }
}
