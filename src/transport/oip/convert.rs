//! Open Inference Protocol messages <-> normserve's domain, in one module:
//! the only code that reads `inference` proto fields (as `transport::convert`
//! is for `normserve.v1`). A model is a session: its name is the session id,
//! scoped to the caller's tenant by `transport::convert::session_id`; its
//! version is the session's version. A `ModelInferRequest` becomes the same
//! domain [`Forward`] a BatchNormService Forward becomes, so both answer with
//! the same numbers and the same errors.
//!
//! Failures are [`ConvertError`]s, mapped to statuses by `transport::status`.

use std::collections::HashMap;

use bytes::Bytes;

use super::super::convert::{session_id, shown_session_id, Caller, ConvertError};
use crate::auth::Principal;
use crate::numerics::{DType, LayerKind, TensorData};
use crate::proto::inference as pb;
use crate::session::{
    parse_request_id, Forward, ForwardOutcome, Mode, Preconditions, SessionId, SessionSnapshot,
};

/// The one input tensor of every model.
pub const INPUT: &str = "INPUT";
/// The one output tensor of every model.
pub const OUTPUT: &str = "OUTPUT";
/// ModelMetadata's platform.
pub const PLATFORM: &str = "pytorch_batchnorm";
/// The request parameter choosing the mode.
pub const MODE_PARAMETER: &str = "mode";
/// The request parameter carrying an idempotency key (Forward's request_id).
pub const REQUEST_ID_PARAMETER: &str = "request_id";

fn invalid(message: impl Into<String>) -> ConvertError {
    ConvertError::InvalidArgument(message.into())
}

/// The protocol's name of an element type.
pub fn datatype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::Float32 => "FP32",
        DType::Float64 => "FP64",
        DType::Float16 => "FP16",
        DType::BFloat16 => "BF16",
    }
}

/// The element type the protocol calls `name`; other protocol types
/// (integers, BYTES...) are not batch-normalizable.
pub fn datatype(field: &str, name: &str) -> Result<DType, ConvertError> {
    DType::ALL
        .into_iter()
        .find(|dtype| datatype_name(*dtype) == name)
        .ok_or_else(|| {
            invalid(format!(
                "{field}: unsupported datatype {name:?} (FP32, FP64, FP16 or BF16)"
            ))
        })
}

/// The session a model name (and optional version) names, for `principal`.
pub struct ModelRef {
    pub id: SessionId,
    /// Present when the request named a version.
    pub version: Option<u64>,
}

/// A model's name and version, as ModelReady, ModelMetadata and the HTTP
/// paths give them.
pub fn model_ref(
    principal: &Principal,
    name: &str,
    version: &str,
) -> Result<ModelRef, ConvertError> {
    Ok(ModelRef {
        id: session_id(principal, name)?,
        version: model_version(version)?,
    })
}

/// None for an empty version; else the decimal version.
fn model_version(version: &str) -> Result<Option<u64>, ConvertError> {
    if version.is_empty() {
        return Ok(None);
    }
    version.parse().map(Some).map_err(|_| {
        invalid(format!(
            "model_version: {version:?} is not a session version (a decimal number)"
        ))
    })
}

/// How the output travels back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputForm {
    /// `raw_output_contents`: little-endian bytes of the output's dtype.
    Raw,
    /// `contents`: `fp64_contents` for FP64, `fp32_contents` otherwise (FP16
    /// and BF16 values widened, exactly).
    Typed,
}

/// A ModelInfer request as a domain Forward, with what the response echoes.
#[derive(Debug, Clone)]
pub struct InferCall {
    pub command: Forward,
    /// The request's `id`, echoed.
    pub request_id: String,
    pub output_form: OutputForm,
}

/// Decodes a ModelInferRequest. `output_form` None: the form of the input
/// (raw in, raw out), as gRPC clients expect; HTTP chooses it from the
/// binary-data parameters.
pub fn infer_call(
    caller: &Caller,
    request: pb::ModelInferRequest,
    output_form: Option<OutputForm>,
) -> Result<InferCall, ConvertError> {
    let id = session_id(&caller.principal, &request.model_name)?;
    let expected_version = model_version(&request.model_version)?;
    let mode = mode(&request.parameters)?;
    let request_key = match request.parameters.get(REQUEST_ID_PARAMETER) {
        None => None,
        Some(parameter) => match &parameter.parameter_choice {
            Some(pb::infer_parameter::ParameterChoice::StringParam(text)) => {
                parse_request_id(text)?
            }
            _ => return Err(invalid("parameters.request_id: must be a string")),
        },
    };
    for output in &request.outputs {
        if output.name != OUTPUT {
            return Err(invalid(format!(
                "outputs: unknown output {:?}; the model has one output, {OUTPUT}",
                output.name
            )));
        }
    }
    let [input] = <[_; 1]>::try_from(request.inputs).map_err(|inputs: Vec<_>| {
        invalid(format!(
            "inputs: expected one input, {INPUT}, got {}",
            inputs.len()
        ))
    })?;
    if input.name != INPUT {
        return Err(invalid(format!(
            "inputs: unknown input {:?}; the model has one input, {INPUT}",
            input.name
        )));
    }
    let dtype = datatype("inputs[0].datatype", &input.datatype)?;
    let raw = match request.raw_input_contents.len() {
        0 => None,
        1 => request.raw_input_contents.into_iter().next(),
        n => {
            return Err(invalid(format!(
                "raw_input_contents: expected one entry (one per input), got {n}"
            )))
        }
    };
    let max = caller.max_tensor_elements;
    let (data, form) = match (raw, input.contents) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "inputs[0]: values both in contents and in raw_input_contents; send one",
            ))
        }
        (Some(bytes), None) => (raw_tensor(dtype, input.shape, bytes, max)?, OutputForm::Raw),
        (None, Some(contents)) => (
            typed_tensor(dtype, input.shape, &contents, max)?,
            OutputForm::Typed,
        ),
        (None, None) => {
            return Err(invalid(
                "inputs[0]: no values: set contents or raw_input_contents",
            ))
        }
    };
    Ok(InferCall {
        command: Forward {
            id,
            input: data.into(),
            mode,
            preconditions: Preconditions {
                expected_version,
                request_id: request_key,
            },
            output_memory: None,
            input_memory: None,
        },
        request_id: request.id,
        output_form: output_form.unwrap_or(form),
    })
}

fn raw_tensor(
    dtype: DType,
    shape: Vec<i64>,
    bytes: Bytes,
    max_elements: u64,
) -> Result<TensorData, ConvertError> {
    Ok(TensorData::from_raw(
        "input",
        dtype,
        shape,
        bytes,
        max_elements,
    )?)
}

/// Typed values: FP64 in `fp64_contents`; FP32 (and, beyond the protocol,
/// FP16 and BF16, converted with round to nearest even) in `fp32_contents`.
fn typed_tensor(
    dtype: DType,
    shape: Vec<i64>,
    contents: &pb::InferTensorContents,
    max_elements: u64,
) -> Result<TensorData, ConvertError> {
    let has_others = !contents.bool_contents.is_empty()
        || !contents.int_contents.is_empty()
        || !contents.int64_contents.is_empty()
        || !contents.uint_contents.is_empty()
        || !contents.uint64_contents.is_empty()
        || !contents.bytes_contents.is_empty();
    let expected_field = if dtype == DType::Float64 {
        "fp64_contents"
    } else {
        "fp32_contents"
    };
    let wrong_field = if dtype == DType::Float64 {
        !contents.fp32_contents.is_empty()
    } else {
        !contents.fp64_contents.is_empty()
    };
    if has_others || wrong_field {
        return Err(invalid(format!(
            "inputs[0].contents: a {} input's values go in {expected_field}",
            datatype_name(dtype)
        )));
    }
    let data = if dtype == DType::Float64 {
        TensorData::from_f64("input", dtype, shape, &contents.fp64_contents, max_elements)?
    } else {
        TensorData::from_f32("input", dtype, shape, &contents.fp32_contents, max_elements)?
    };
    Ok(data)
}

/// The `mode` parameter: "train" or "eval"; absent, the session's default.
fn mode(parameters: &HashMap<String, pb::InferParameter>) -> Result<Option<Mode>, ConvertError> {
    let Some(parameter) = parameters.get(MODE_PARAMETER) else {
        return Ok(None);
    };
    match &parameter.parameter_choice {
        Some(pb::infer_parameter::ParameterChoice::StringParam(text)) => match text.as_str() {
            "train" => Ok(Some(Mode::Train)),
            "eval" => Ok(Some(Mode::Eval)),
            other => Err(invalid(format!(
                "parameters.mode: {other:?}; expected \"train\" or \"eval\""
            ))),
        },
        _ => Err(invalid(
            "parameters.mode: must be the string \"train\" or \"eval\"",
        )),
    }
}

fn int64_parameter(value: i64) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(value)),
    }
}

fn bool_parameter(value: bool) -> pb::InferParameter {
    pb::InferParameter {
        parameter_choice: Some(pb::infer_parameter::ParameterChoice::BoolParam(value)),
    }
}

/// The response to `call`: OUTPUT in the input's shape and dtype, the
/// session's version after the call, and `num_batches_tracked` and
/// `replayed` as parameters. A replay whose output is no longer held has no
/// output (as Forward's `replayed` without `output`).
pub fn infer_response(
    principal: &Principal,
    model: &SessionId,
    request_id: String,
    output_form: OutputForm,
    outcome: ForwardOutcome,
) -> pb::ModelInferResponse {
    let parameters = HashMap::from([
        (
            "num_batches_tracked".to_owned(),
            int64_parameter(outcome.num_batches_tracked),
        ),
        ("replayed".to_owned(), bool_parameter(outcome.replayed)),
    ]);
    let mut response = pb::ModelInferResponse {
        model_name: shown_session_id(principal, model),
        model_version: outcome.version.to_string(),
        id: request_id,
        parameters,
        outputs: Vec::new(),
        raw_output_contents: Vec::new(),
    };
    let Some(output) = outcome.output else {
        return response;
    };
    let dtype = output.dtype();
    let mut tensor = pb::model_infer_response::InferOutputTensor {
        name: OUTPUT.to_owned(),
        datatype: datatype_name(dtype).to_owned(),
        shape: output.shape().to_vec(),
        parameters: HashMap::new(),
        contents: None,
    };
    match output_form {
        OutputForm::Raw => response.raw_output_contents.push(output.into_bytes()),
        OutputForm::Typed if dtype == DType::Float64 => {
            tensor.contents = Some(pb::InferTensorContents {
                fp64_contents: output.to_f64_vec(),
                ..Default::default()
            });
        }
        OutputForm::Typed => {
            tensor.contents = Some(pb::InferTensorContents {
                fp32_contents: output.to_f32_vec(),
                ..Default::default()
            });
        }
    }
    response.outputs.push(tensor);
    response
}

/// INPUT's and OUTPUT's shape: -1 for the batch and spatial dimensions, the
/// channel count fixed. BatchNorm1d also takes (N, C, L); the metadata names
/// its common form, (N, C).
fn tensor_shape(kind: LayerKind, num_features: i64) -> Vec<i64> {
    let spatial = match kind {
        LayerKind::BatchNorm1d => 0,
        LayerKind::BatchNorm2d => 2,
        LayerKind::BatchNorm3d => 3,
    };
    let mut shape = vec![-1, num_features];
    shape.extend(std::iter::repeat_n(-1, spatial));
    shape
}

/// ModelMetadata of a session.
pub fn model_metadata(
    principal: &Principal,
    snapshot: &SessionSnapshot,
) -> pb::ModelMetadataResponse {
    let config = &snapshot.config;
    let tensor = |name: &str| pb::model_metadata_response::TensorMetadata {
        name: name.to_owned(),
        datatype: datatype_name(config.param_dtype).to_owned(),
        shape: tensor_shape(config.kind, config.num_features),
    };
    pb::ModelMetadataResponse {
        name: shown_session_id(principal, &snapshot.id),
        versions: vec![snapshot.version.to_string()],
        platform: PLATFORM.to_owned(),
        inputs: vec![tensor(INPUT)],
        outputs: vec![tensor(OUTPUT)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_shapes_follow_the_layer_kind() {
        assert_eq!(tensor_shape(LayerKind::BatchNorm1d, 3), vec![-1, 3]);
        assert_eq!(tensor_shape(LayerKind::BatchNorm2d, 4), vec![-1, 4, -1, -1]);
        assert_eq!(
            tensor_shape(LayerKind::BatchNorm3d, 5),
            vec![-1, 5, -1, -1, -1]
        );
    }

    #[test]
    fn datatypes_are_the_protocol_names() {
        assert_eq!(datatype("f", "FP16").ok(), Some(DType::Float16));
        assert_eq!(datatype("f", "BF16").ok(), Some(DType::BFloat16));
        assert!(datatype("f", "INT32").is_err());
        assert!(datatype("f", "fp32").is_err());
    }
}
