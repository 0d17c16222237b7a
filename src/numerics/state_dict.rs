//! A layer's `state_dict()` as safetensors bytes, both ways, with PyTorch's
//! key names and `load_state_dict`'s validation and error texts.
//!
//! Keys: `weight`, `bias` (affine layers), `running_mean`, `running_var`
//! (param dtype, shape (C,)) and `num_batches_tracked` (int64, 0-d) when the
//! layer tracks running statistics; for an exact-statistics layer also the
//! exact sums (`exact.*`, see [`super::exact::KEYS`]).

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use tch::{Kind, Tensor};

use super::exact::{self, ExactSums};
use super::{torch_size, LayerKind, NumericsError, TensorData};

pub const WEIGHT: &str = "weight";
pub const BIAS: &str = "bias";
pub const RUNNING_MEAN: &str = "running_mean";
pub const RUNNING_VAR: &str = "running_var";
pub const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";

/// What a layer's state dict holds, in `state_dict()` order.
pub struct Layout {
    pub kind: LayerKind,
    pub num_features: i64,
    pub affine: bool,
    pub track_running_stats: bool,
    /// The exact sums' keys too.
    pub exact_statistics: bool,
}

impl Layout {
    fn keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::with_capacity(9);
        if self.affine {
            keys.extend([WEIGHT, BIAS]);
        }
        if self.track_running_stats {
            keys.extend([RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES_TRACKED]);
        }
        if self.exact_statistics {
            keys.extend(exact::KEYS);
        }
        keys
    }

    fn expected_shape(&self, key: &str) -> Vec<i64> {
        if key == NUM_BATCHES_TRACKED {
            Vec::new()
        } else {
            vec![self.num_features]
        }
    }
}

/// Tensors to export; each present one has shape (C,).
pub struct ExportTensors<'a> {
    pub weight: Option<&'a TensorData>,
    pub bias: Option<&'a TensorData>,
    pub running_mean: Option<&'a TensorData>,
    pub running_var: Option<&'a TensorData>,
    /// Present exactly when statistics are tracked.
    pub num_batches_tracked: Option<i64>,
    /// An exact-statistics layer's sums.
    pub exact: Option<&'a ExactSums>,
}

/// Serializes a state dict to safetensors bytes.
pub fn export(tensors: &ExportTensors<'_>) -> Result<Vec<u8>, NumericsError> {
    let nbt_bytes = tensors.num_batches_tracked.map(i64::to_le_bytes);
    let mut views: Vec<(&str, TensorView<'_>)> = Vec::new();
    let float_entries = [
        (WEIGHT, tensors.weight),
        (BIAS, tensors.bias),
        (RUNNING_MEAN, tensors.running_mean),
        (RUNNING_VAR, tensors.running_var),
    ];
    for (key, data) in float_entries {
        let Some(data) = data else { continue };
        let dtype = data.dtype().safetensors_dtype();
        let shape = data.shape().iter().map(|&d| d as usize).collect();
        views.push((
            key,
            TensorView::new(dtype, shape, data.bytes()).map_err(safetensors_error)?,
        ));
    }
    if let Some(bytes) = nbt_bytes.as_ref() {
        views.push((
            NUM_BATCHES_TRACKED,
            TensorView::new(StDtype::I64, Vec::new(), bytes).map_err(safetensors_error)?,
        ));
    }
    let count_bytes = tensors.exact.map(|sums| (sums.count as i64).to_le_bytes());
    let tables = tensors.exact.map(|sums| {
        [
            (exact::SUM_POSITIVE_KEY, sums.digit_table(|c| &c.positive)),
            (exact::SUM_NEGATIVE_KEY, sums.digit_table(|c| &c.negative)),
            (exact::SUM_SQUARES_KEY, sums.digit_table(|c| &c.squares)),
        ]
    });
    if let Some(bytes) = count_bytes.as_ref() {
        views.push((
            exact::COUNT_KEY,
            TensorView::new(StDtype::I64, Vec::new(), bytes).map_err(safetensors_error)?,
        ));
    }
    for (key, table) in tables.iter().flatten() {
        views.push((
            key,
            TensorView::new(StDtype::I64, table.shape.to_vec(), &table.bytes)
                .map_err(safetensors_error)?,
        ));
    }
    safetensors::serialize(views, None).map_err(safetensors_error)
}

fn safetensors_error(error: safetensors::SafeTensorError) -> NumericsError {
    NumericsError::Torch(format!("safetensors: {error}"))
}

/// The tensors a valid import sets, as host tensors in the file's dtype
/// (the caller converts to the layer's dtype, as `param.copy_()` does).
#[derive(Default)]
pub struct Imported {
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
    pub running_mean: Option<Tensor>,
    pub running_var: Option<Tensor>,
    /// None keeps the current count (a plain dict without the key).
    pub num_batches_tracked: Option<i64>,
    /// The exact sums, when the layout has them and the file all their keys.
    pub exact: Option<ExactSums>,
}

/// `module.load_state_dict(state, strict)` validation: parses `bytes`, checks
/// keys and shapes, and returns the tensors to load, or PyTorch's error text
/// ("Error(s) in loading state_dict for BatchNorm1d: ...") with nothing loaded.
pub fn import(
    layout: &Layout,
    bytes: &[u8],
    strict: bool,
    max_elements: u64,
) -> Result<Imported, NumericsError> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| {
        NumericsError::invalid("safetensors", format!("not a valid safetensors file: {e}"))
    })?;
    let mut entries: BTreeMap<String, TensorView<'_>> = BTreeMap::new();
    for (name, view) in file.iter() {
        entries.insert(name.to_owned(), view);
    }
    let expected = layout.keys();

    // A plain dict (no `_metadata` version) without num_batches_tracked keeps
    // the module's current count: `_NormBase._load_from_state_dict` fills it in.
    let missing: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|k| *k != NUM_BATCHES_TRACKED && !entries.contains_key(*k))
        .collect();
    let unexpected: Vec<&str> = entries
        .keys()
        .map(String::as_str)
        .filter(|k| !expected.contains(k))
        .collect();

    let mut errors: Vec<String> = Vec::new();
    if strict && !missing.is_empty() {
        errors.push(format!(
            "Missing key(s) in state_dict: {}. ",
            quoted(&missing)
        ));
    }
    if strict && !unexpected.is_empty() {
        errors.push(format!(
            "Unexpected key(s) in state_dict: {}. ",
            quoted(&unexpected)
        ));
    }
    let mut imported = Imported::default();
    if layout.exact_statistics {
        match import_exact(layout, &entries, max_elements) {
            Ok(sums) => imported.exact = sums,
            Err(message) => errors.push(message),
        }
    }
    for key in expected {
        if exact::KEYS.contains(&key) {
            continue;
        }
        let Some(view) = entries.get(key) else {
            continue;
        };
        let mut shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let wanted = layout.expected_shape(key);
        // PyTorch accepts a 1-element 1-d tensor for a 0-d parameter.
        if wanted.is_empty() && shape == [1] {
            shape.clear();
        }
        if shape != wanted {
            errors.push(format!(
                "size mismatch for {key}: copying a param with shape {} from checkpoint, the shape in current model is {}.",
                torch_size(&view.shape().iter().map(|&d| d as i64).collect::<Vec<_>>()),
                torch_size(&wanted)
            ));
            continue;
        }
        let tensor = match view_to_tensor(key, view, &shape, max_elements) {
            Ok(tensor) => tensor,
            Err(message) => {
                errors.push(message);
                continue;
            }
        };
        match key {
            WEIGHT => imported.weight = Some(tensor),
            BIAS => imported.bias = Some(tensor),
            RUNNING_MEAN => imported.running_mean = Some(tensor),
            RUNNING_VAR => imported.running_var = Some(tensor),
            _ => {
                let count = tensor.f_to_kind(Kind::Int64)?.f_int64_value(&[])?;
                if count < 0 {
                    errors.push(format!("num_batches_tracked must be >= 0, got {count}"));
                }
                imported.num_batches_tracked = Some(count);
            }
        }
    }
    if errors.is_empty() {
        Ok(imported)
    } else {
        Err(NumericsError::invalid(
            "safetensors",
            format!(
                "Error(s) in loading state_dict for {}:\n\t{}",
                layout.kind.module_name(),
                errors.join("\n\t")
            ),
        ))
    }
}

/// The exact sums of a state dict: None without any `exact.*` key; an
/// error text when some are missing or any is malformed.
fn import_exact(
    layout: &Layout,
    entries: &BTreeMap<String, TensorView<'_>>,
    max_elements: u64,
) -> Result<Option<ExactSums>, String> {
    let present: Vec<&str> = exact::KEYS
        .iter()
        .copied()
        .filter(|k| entries.contains_key(*k))
        .collect();
    if present.is_empty() {
        return Ok(None);
    }
    if present.len() < exact::KEYS.len() {
        return Err(format!(
            "the exact sums need all of {} (got only {})",
            quoted(&exact::KEYS),
            quoted(&present)
        ));
    }
    let int64_values = |key: &str, want_rank: usize| -> Result<(Vec<i64>, Vec<usize>), String> {
        let Some(view) = entries.get(key) else {
            return Err(format!("{key} is missing"));
        };
        if view.dtype() != StDtype::I64 || view.shape().len() != want_rank {
            return Err(format!(
                "{key}: expected an int64 tensor of {want_rank} dimensions, got {:?} {:?}",
                view.dtype(),
                view.shape()
            ));
        }
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        super::codec::checked_numel(key, &shape, max_elements).map_err(|e| e.to_string())?;
        let values = view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect();
        Ok((values, view.shape().to_vec()))
    };
    let (count, _) = int64_values(exact::COUNT_KEY, 0)?;
    let channels = layout.num_features.max(0) as usize;
    let (positive, positive_shape) = int64_values(exact::SUM_POSITIVE_KEY, 2)?;
    let (negative, negative_shape) = int64_values(exact::SUM_NEGATIVE_KEY, 2)?;
    let (squares, squares_shape) = int64_values(exact::SUM_SQUARES_KEY, 2)?;
    for (key, shape) in [
        (exact::SUM_POSITIVE_KEY, &positive_shape),
        (exact::SUM_NEGATIVE_KEY, &negative_shape),
        (exact::SUM_SQUARES_KEY, &squares_shape),
    ] {
        if shape[0] != channels {
            return Err(format!(
                "size mismatch for {key}: {} channels in the checkpoint, {channels} in the current model",
                shape[0]
            ));
        }
    }
    ExactSums::from_digit_tables(
        count.first().copied().unwrap_or(0),
        channels,
        [
            (exact::SUM_POSITIVE_KEY, &positive, positive_shape[1]),
            (exact::SUM_NEGATIVE_KEY, &negative, negative_shape[1]),
            (exact::SUM_SQUARES_KEY, &squares, squares_shape[1]),
        ],
    )
    .map(Some)
}

fn quoted(keys: &[&str]) -> String {
    keys.iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn view_to_tensor(
    key: &str,
    view: &TensorView<'_>,
    shape: &[i64],
    max_elements: u64,
) -> Result<Tensor, String> {
    let kind = match view.dtype() {
        StDtype::F64 => Kind::Double,
        StDtype::F32 => Kind::Float,
        StDtype::F16 => Kind::Half,
        StDtype::BF16 => Kind::BFloat16,
        StDtype::I64 => Kind::Int64,
        StDtype::I32 => Kind::Int,
        StDtype::I16 => Kind::Int16,
        StDtype::I8 => Kind::Int8,
        StDtype::U8 => Kind::Uint8,
        StDtype::BOOL => Kind::Bool,
        other => return Err(format!("{key}: unsupported safetensors dtype {other:?}")),
    };
    super::codec::checked_numel(key, shape, max_elements).map_err(|e| e.to_string())?;
    Tensor::f_from_data_size(view.data(), shape, kind).map_err(|e| format!("{key}: {e}"))
}
