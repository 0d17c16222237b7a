//! Proto <-> domain conversions, in one module. Every proto3 field that may be
//! absent is handled here; handlers only decode, call the domain, encode.

use std::collections::BTreeMap;

use crate::auth::Principal;
use crate::numerics::compare::{
    CompareRequest, Comparison, Diagnosis, Difference, Implementation, Part, Parts, TensorReport,
    Tolerance,
};
use crate::numerics::{DType, LayerKind, Momentum, NumericsError, TensorData};
use crate::proto::v1 as pb;
use crate::session::{Mode, SessionConfig, SessionError, SessionId, SessionSnapshot, StateTensors};

/// How a tensor's values travelled, so the reply can use the same form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Representation {
    Raw,
    Float,
    Double,
}

/// The key of the session a caller names. A user names the sessions of its
/// tenant, so another tenant's sessions are out of its reach by construction;
/// an admin names any session by its key (`tenant/name`, or `name` for the
/// default tenant).
pub fn session_id(principal: &Principal, text: &str) -> Result<SessionId, SessionError> {
    // The caller's own name for it, into the request's log line.
    tracing::Span::current().record("session_id", text);
    let parsed = if principal.is_admin() {
        SessionId::parse_key(text)
    } else {
        SessionId::parse(text).map(|name| SessionId::in_tenant(&principal.tenant, &name))
    };
    parsed.map_err(|e| SessionError::InvalidArgument(e.to_string()))
}

pub fn optional_session_id(
    principal: &Principal,
    text: &str,
) -> Result<Option<SessionId>, SessionError> {
    if text.is_empty() {
        Ok(None)
    } else {
        session_id(principal, text).map(Some)
    }
}

/// A session id as `principal` names it (the inverse of [`session_id`]).
pub fn shown_session_id(principal: &Principal, id: &SessionId) -> String {
    if principal.is_admin() {
        id.as_str().to_owned()
    } else {
        id.name().to_owned()
    }
}

fn data_type(field: &str, value: i32) -> Result<Option<DType>, SessionError> {
    match pb::DataType::try_from(value) {
        Ok(pb::DataType::Unspecified) => Ok(None),
        Ok(pb::DataType::Float32) => Ok(Some(DType::Float32)),
        Ok(pb::DataType::Float64) => Ok(Some(DType::Float64)),
        Ok(pb::DataType::Float16) => Ok(Some(DType::Float16)),
        Ok(pb::DataType::Bfloat16) => Ok(Some(DType::BFloat16)),
        Err(_) => Err(SessionError::InvalidArgument(format!(
            "{field}: unknown DataType value {value}"
        ))),
    }
}

pub fn dtype_to_proto(dtype: DType) -> pb::DataType {
    match dtype {
        DType::Float32 => pb::DataType::Float32,
        DType::Float64 => pb::DataType::Float64,
        DType::Float16 => pb::DataType::Float16,
        DType::BFloat16 => pb::DataType::Bfloat16,
    }
}

/// Decodes a tensor, checking its size against `max_elements` before any
/// allocation. `None` in, `None` out.
pub fn tensor(
    field: &str,
    tensor: Option<pb::Tensor>,
    max_elements: u64,
) -> Result<Option<(TensorData, Representation)>, SessionError> {
    let Some(tensor) = tensor else {
        return Ok(None);
    };
    let dtype = data_type(&format!("{field}.dtype"), tensor.dtype)?;
    let shape = tensor.shape;
    let decoded = match tensor.values {
        Some(pb::tensor::Values::Raw(bytes)) => {
            let Some(dtype) = dtype else {
                return Err(NumericsError::invalid(
                    format!("{field}.dtype"),
                    "a tensor sent as raw bytes must name its dtype",
                )
                .into());
            };
            (
                TensorData::from_raw(field, dtype, shape, bytes, max_elements)?,
                Representation::Raw,
            )
        }
        Some(pb::tensor::Values::FloatValues(values)) => (
            TensorData::from_f32(
                field,
                dtype.unwrap_or(DType::Float32),
                shape,
                &values.values,
                max_elements,
            )?,
            Representation::Float,
        ),
        Some(pb::tensor::Values::DoubleValues(values)) => (
            TensorData::from_f64(
                field,
                dtype.unwrap_or(DType::Float64),
                shape,
                &values.values,
                max_elements,
            )?,
            Representation::Double,
        ),
        None => {
            return Err(NumericsError::invalid(
                field,
                "no values: set one of raw, float_values or double_values",
            )
            .into())
        }
    };
    Ok(Some(decoded))
}

/// Decodes a tensor that must be present.
pub fn required_tensor(
    field: &str,
    value: Option<pb::Tensor>,
    max_elements: u64,
) -> Result<(TensorData, Representation), SessionError> {
    tensor(field, value, max_elements)?
        .ok_or_else(|| NumericsError::invalid(field, "required").into())
}

pub fn tensor_to_proto(data: TensorData, representation: Representation) -> pb::Tensor {
    let dtype = dtype_to_proto(data.dtype()) as i32;
    let shape = data.shape().to_vec();
    let values = match representation {
        Representation::Raw => pb::tensor::Values::Raw(data.into_bytes()),
        Representation::Float => pb::tensor::Values::FloatValues(pb::FloatValues {
            values: data.to_f32_vec(),
        }),
        Representation::Double => pb::tensor::Values::DoubleValues(pb::DoubleValues {
            values: data.to_f64_vec(),
        }),
    };
    pb::Tensor {
        dtype,
        shape,
        values: Some(values),
    }
}

pub fn state_tensors(
    weight: Option<pb::Tensor>,
    bias: Option<pb::Tensor>,
    running_mean: Option<pb::Tensor>,
    running_var: Option<pb::Tensor>,
    max_elements: u64,
) -> Result<StateTensors, SessionError> {
    let decode =
        |field: &str, t| Ok::<_, SessionError>(tensor(field, t, max_elements)?.map(|(d, _)| d));
    Ok(StateTensors {
        weight: decode("weight", weight)?,
        bias: decode("bias", bias)?,
        running_mean: decode("running_mean", running_mean)?,
        running_var: decode("running_var", running_var)?,
    })
}

pub fn layer_kind(value: i32) -> Result<LayerKind, SessionError> {
    match pb::BatchNormKind::try_from(value) {
        Ok(pb::BatchNormKind::BatchNorm1d) => Ok(LayerKind::BatchNorm1d),
        Ok(pb::BatchNormKind::BatchNorm2d) => Ok(LayerKind::BatchNorm2d),
        Ok(pb::BatchNormKind::BatchNorm3d) => Ok(LayerKind::BatchNorm3d),
        Ok(pb::BatchNormKind::Unspecified) => Err(SessionError::InvalidArgument(
            "kind: required (BATCH_NORM_1D, BATCH_NORM_2D or BATCH_NORM_3D)".into(),
        )),
        Err(_) => Err(SessionError::InvalidArgument(format!(
            "kind: unknown BatchNormKind value {value}"
        ))),
    }
}

fn layer_kind_to_proto(kind: LayerKind) -> pb::BatchNormKind {
    match kind {
        LayerKind::BatchNorm1d => pb::BatchNormKind::BatchNorm1d,
        LayerKind::BatchNorm2d => pb::BatchNormKind::BatchNorm2d,
        LayerKind::BatchNorm3d => pb::BatchNormKind::BatchNorm3d,
    }
}

/// None: unspecified (the session default applies).
pub fn mode(value: i32) -> Result<Option<Mode>, SessionError> {
    match pb::Mode::try_from(value) {
        Ok(pb::Mode::Unspecified) => Ok(None),
        Ok(pb::Mode::Train) => Ok(Some(Mode::Train)),
        Ok(pb::Mode::Eval) => Ok(Some(Mode::Eval)),
        Err(_) => Err(SessionError::InvalidArgument(format!(
            "mode: unknown Mode value {value}"
        ))),
    }
}

fn mode_to_proto(mode: Mode) -> pb::Mode {
    match mode {
        Mode::Train => pb::Mode::Train,
        Mode::Eval => pb::Mode::Eval,
    }
}

/// Momentum from the (momentum, cumulative_average) pair; None when neither
/// is set.
pub fn momentum(momentum: Option<f64>, cumulative: bool) -> Result<Option<Momentum>, SessionError> {
    match (momentum, cumulative) {
        (Some(_), true) => Err(SessionError::InvalidArgument(
            "momentum: set either momentum or cumulative_average, not both".into(),
        )),
        (Some(m), false) => Ok(Some(Momentum::Exponential(m))),
        (None, true) => Ok(Some(Momentum::CumulativeAverage)),
        (None, false) => Ok(None),
    }
}

pub const DEFAULT_EPS: f64 = 1e-5;
pub const DEFAULT_MOMENTUM: f64 = 0.1;

pub fn session_config(request: &pb::CreateSessionRequest) -> Result<SessionConfig, SessionError> {
    let labels: BTreeMap<String, String> = request
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(SessionConfig {
        kind: layer_kind(request.kind)?,
        num_features: request.num_features,
        eps: request.eps.unwrap_or(DEFAULT_EPS),
        momentum: momentum(request.momentum, request.cumulative_average)?
            .unwrap_or(Momentum::Exponential(DEFAULT_MOMENTUM)),
        affine: request.affine.unwrap_or(true),
        track_running_stats: request.track_running_stats.unwrap_or(true),
        param_dtype: data_type("param_dtype", request.param_dtype)?.unwrap_or(DType::Float32),
        default_mode: mode(request.default_mode)?.unwrap_or(Mode::Train),
        reject_non_finite: request.reject_non_finite,
        labels,
    })
}

pub fn session_to_proto(principal: &Principal, snapshot: SessionSnapshot) -> pb::Session {
    let config = &snapshot.config;
    let (momentum, cumulative_average) = match config.momentum {
        Momentum::Exponential(m) => (Some(m), false),
        Momentum::CumulativeAverage => (None, true),
    };
    let proto_config = pb::SessionConfig {
        kind: layer_kind_to_proto(config.kind) as i32,
        num_features: config.num_features,
        eps: config.eps,
        momentum,
        cumulative_average,
        affine: config.affine,
        track_running_stats: config.track_running_stats,
        param_dtype: dtype_to_proto(config.param_dtype) as i32,
        default_mode: mode_to_proto(config.default_mode) as i32,
        reject_non_finite: config.reject_non_finite,
        labels: config
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    let tensors = snapshot.tensors.unwrap_or_default();
    let raw = |t: Option<TensorData>| t.map(|t| tensor_to_proto(t, Representation::Raw));
    pb::Session {
        session_id: shown_session_id(principal, &snapshot.id),
        config: Some(proto_config),
        device: crate::device::device_name(snapshot.device),
        version: snapshot.version,
        num_batches_tracked: snapshot.num_batches_tracked,
        weight: raw(tensors.weight),
        bias: raw(tensors.bias),
        running_mean: raw(tensors.running_mean),
        running_var: raw(tensors.running_var),
        created_at: Some(snapshot.created_at.into()),
        updated_at: Some(snapshot.updated_at.into()),
        last_used_at: Some(snapshot.last_used_at.into()),
    }
}

fn implementation(value: i32) -> Result<Implementation, SessionError> {
    match pb::Implementation::try_from(value) {
        Ok(pb::Implementation::Reference) => Ok(Implementation::Reference),
        Ok(pb::Implementation::Float64Reference) => Ok(Implementation::Float64Reference),
        Ok(pb::Implementation::ManualBiased) => Ok(Implementation::ManualBiased),
        Ok(pb::Implementation::ManualUnbiased) => Ok(Implementation::ManualUnbiased),
        Ok(pb::Implementation::Candidate) => Ok(Implementation::Candidate),
        Ok(pb::Implementation::Unspecified) => Err(SessionError::InvalidArgument(
            "implementations: IMPLEMENTATION_UNSPECIFIED is not an implementation".into(),
        )),
        Err(_) => Err(SessionError::InvalidArgument(format!(
            "implementations: unknown Implementation value {value}"
        ))),
    }
}

fn implementation_to_proto(implementation: Implementation) -> pb::Implementation {
    match implementation {
        Implementation::Reference => pb::Implementation::Reference,
        Implementation::Float64Reference => pb::Implementation::Float64Reference,
        Implementation::ManualBiased => pb::Implementation::ManualBiased,
        Implementation::ManualUnbiased => pb::Implementation::ManualUnbiased,
        Implementation::Candidate => pb::Implementation::Candidate,
    }
}

/// The tolerance pair: both or neither, as `torch.testing.assert_close`.
fn tolerance(rtol: Option<f64>, atol: Option<f64>) -> Result<Option<Tolerance>, SessionError> {
    match (rtol, atol) {
        (Some(rtol), Some(atol)) => Ok(Some(Tolerance { rtol, atol })),
        (None, None) => Ok(None),
        _ => Err(SessionError::InvalidArgument(
            "rtol, atol: set both or neither (as torch.testing.assert_close requires)".into(),
        )),
    }
}

/// Decodes a Compare request (everything but `device`, which the handler
/// resolves). The representation is the input's, for the reply's tensors.
pub fn compare_request(
    request: pb::CompareRequest,
    max_elements: u64,
) -> Result<(CompareRequest, Representation), SessionError> {
    let decode =
        |field: &str, t| Ok::<_, SessionError>(tensor(field, t, max_elements)?.map(|(d, _)| d));
    let (input, representation) = required_tensor("input", request.input, max_elements)?;
    let candidate = match request.candidate {
        Some(candidate) => {
            let mut parts = Parts::default();
            for (part, value) in [
                (Part::Output, candidate.output),
                (Part::RunningMean, candidate.running_mean),
                (Part::RunningVar, candidate.running_var),
                (Part::GradInput, candidate.grad_input),
                (Part::GradWeight, candidate.grad_weight),
                (Part::GradBias, candidate.grad_bias),
            ] {
                if let Some(data) = decode(&format!("candidate.{}", part.name()), value)? {
                    parts.set(part, data);
                }
            }
            Some(parts)
        }
        None => None,
    };
    let domain = CompareRequest {
        input,
        weight: decode("weight", request.weight)?,
        bias: decode("bias", request.bias)?,
        running_mean: decode("running_mean", request.running_mean)?,
        running_var: decode("running_var", request.running_var)?,
        num_batches_tracked: request.num_batches_tracked,
        training: request.training,
        eps: request.eps.unwrap_or(DEFAULT_EPS),
        momentum: momentum(request.momentum, request.cumulative_average)?
            .unwrap_or(Momentum::Exponential(DEFAULT_MOMENTUM)),
        grad_output: decode("grad_output", request.grad_output)?,
        candidate,
        tolerance: tolerance(request.rtol, request.atol)?,
        implementations: request
            .implementations
            .into_iter()
            .map(implementation)
            .collect::<Result<_, _>>()?,
        return_tensors: request.return_tensors,
    };
    Ok((domain, representation))
}

fn difference_to_proto(difference: Difference) -> pb::Difference {
    pb::Difference {
        max_abs_diff: difference.max_abs_diff,
        max_rel_diff: difference.max_rel_diff,
        argmax_index: difference.argmax_index,
        per_channel_max_abs_diff: difference.per_channel_max_abs_diff,
        allclose: difference.allclose,
        mismatched_elements: difference.mismatched_elements,
    }
}

/// Returned tensors travel as the input did; typed values become
/// `double_values` for float64 tensors so that nothing is rounded.
fn values_to_proto(data: TensorData, input_representation: Representation) -> pb::Tensor {
    let representation = match (input_representation, data.dtype()) {
        (Representation::Raw, _) => Representation::Raw,
        (_, DType::Float64) => Representation::Double,
        _ => Representation::Float,
    };
    tensor_to_proto(data, representation)
}

fn tensor_report_to_proto(
    report: Option<&TensorReport>,
    representation: Representation,
) -> Option<pb::TensorReport> {
    report.map(|report| pb::TensorReport {
        vs_float64_reference: Some(difference_to_proto(report.vs_float64_reference.clone())),
        vs_reference: Some(difference_to_proto(report.vs_reference.clone())),
        values: report
            .values
            .clone()
            .map(|values| values_to_proto(values, representation)),
    })
}

fn diagnosis_to_proto(diagnosis: Diagnosis) -> pb::Diagnosis {
    pb::Diagnosis {
        matches_reference: diagnosis.matches_reference,
        hypotheses: diagnosis
            .hypotheses
            .into_iter()
            .map(|h| pb::Hypothesis {
                name: h.name.to_owned(),
                max_abs_diff: h.max_abs_diff,
                explains: h.explains,
                explanation: h.explanation.to_owned(),
                fix: h.fix.to_owned(),
                tolerance_ratio: h.tolerance_ratio,
                parts: h.parts.iter().map(|p| p.name().to_owned()).collect(),
            })
            .collect(),
        ambiguities: diagnosis.ambiguities,
        summary: diagnosis.summary,
    }
}

pub fn comparison_to_proto(
    comparison: Comparison,
    representation: Representation,
) -> pb::CompareResponse {
    pb::CompareResponse {
        reports: comparison
            .reports
            .into_iter()
            .map(|report| {
                let part = |p: Part| tensor_report_to_proto(report.parts.get(p), representation);
                pb::ImplementationReport {
                    implementation: implementation_to_proto(report.implementation) as i32,
                    output: part(Part::Output),
                    running_mean: part(Part::RunningMean),
                    running_var: part(Part::RunningVar),
                    grad_input: part(Part::GradInput),
                    grad_weight: part(Part::GradWeight),
                    grad_bias: part(Part::GradBias),
                }
            })
            .collect(),
        diagnosis: comparison.diagnosis.map(diagnosis_to_proto),
        rtol: comparison.tolerance.rtol,
        atol: comparison.tolerance.atol,
        device: crate::device::device_name(comparison.device),
    }
}
