//! A layer's `state_dict()` as safetensors bytes, both ways, with PyTorch's
//! key names and `load_state_dict`'s validation and error texts.
//!
//! Keys: `weight`, `bias` (affine layers), `running_mean`, `running_var`
//! (param dtype, shape (C,)) and `num_batches_tracked` (int64, 0-d) when the
//! layer tracks running statistics.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use tch::{Kind, Tensor};

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
}

impl Layout {
    fn keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::with_capacity(5);
        if self.affine {
            keys.extend([WEIGHT, BIAS]);
        }
        if self.track_running_stats {
            keys.extend([RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES_TRACKED]);
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
    for key in expected {
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
