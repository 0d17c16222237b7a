//! Proto <-> domain conversions, in one module: the only code that reads
//! proto fields. Every request becomes a domain command or value through a
//! `TryFrom` ([`Scope::decode`]), every result a response through a `From`
//! ([`Scope::encode`]); handlers only decode, call the domain, encode.
//!
//! Every proto3 field that may be absent is handled here, tensors are checked
//! against the element limit before anything is allocated, and a caller's
//! session ids are scoped to its tenant (and shown back as it names them).
//! Failures are [`ConvertError`]s, which `transport::status` maps.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use tch::Device;

use crate::auth::Principal;
use crate::config::{CpuStatsKernel, Durability, StoreKind};
use crate::device::{device_name, DeviceChoice, DeviceDescription, DeviceError};
use crate::numerics::codec::checked_numel;
use crate::numerics::compare::{
    CompareRequest, Comparison, Diagnosis, Difference, Implementation, Part, Parts, TensorReport,
    Tolerance,
};
use crate::numerics::merge_stats::ShardStats;
use crate::numerics::{
    DType, DeviceTensorData, ExternalMemory, InputData, LayerKind, Momentum, NumericsError,
    TensorData,
};
use crate::proto::v1 as pb;
use crate::session::synced::{
    ReduceOutcome, ReduceStatistics, Reduction, StepForwardOutcome, StepSpec, StepStatistics,
};
use crate::session::{
    parse_request_id, Applied, CreateSession, Created, ExportedState, Forward, ForwardOutcome,
    InvalidSessionId, ListSessions, Mode, Preconditions, SessionConfig, SessionError, SessionId,
    SessionPage, SessionSnapshot, StateTensors, UpdateParameters,
};
use crate::shm::{
    AnyRange, CudaRange, Mapped, Range, RangeRequest, RegionInfo, RegionRange, SharedMemory,
    ShmError, ShmLimits,
};

/// Why a request cannot be turned into a domain command.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A field that is malformed, out of range or inconsistent with another.
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    SessionId(#[from] InvalidSessionId),
    /// A tensor that does not decode or is over the element limit.
    #[error(transparent)]
    Tensor(#[from] NumericsError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A value the session layer validates (the request id's length).
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A shared-memory range that cannot be used.
    #[error(transparent)]
    SharedMemory(#[from] ShmError),
}

fn invalid(message: impl Into<String>) -> ConvertError {
    ConvertError::InvalidArgument(message.into())
}

/// What decoding a BatchNormService request needs besides the message: who
/// sent it (session ids are scoped to its tenant) and the element limit its
/// tensors are checked against.
#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
    pub max_tensor_elements: u64,
    /// The shared-memory regions Forward may name (None where the API has
    /// none: requests naming a region are refused).
    pub shared_memory: Option<std::sync::Arc<SharedMemory>>,
}

/// What decoding a Compare request needs besides the message.
#[derive(Debug, Clone, Copy)]
pub struct CompareLimits {
    pub max_tensor_elements: u64,
    /// Largest number of elements of a Compare's input (its own limit).
    pub max_input_elements: u64,
    /// The device `auto` (or no device) stands for.
    pub default_device: Device,
}

/// A value together with the context converting it needs.
pub struct Scoped<'a, C, T> {
    pub scope: &'a C,
    pub value: T,
}

/// A context messages are decoded in and results encoded for.
pub trait Scope: Sized {
    /// The domain command or value `message` asks for.
    fn decode<M, T>(&self, message: M) -> Result<T, ConvertError>
    where
        T: for<'a> TryFrom<Scoped<'a, Self, M>, Error = ConvertError>,
    {
        T::try_from(Scoped {
            scope: self,
            value: message,
        })
    }

    /// The response carrying `value`.
    fn encode<T, P>(&self, value: T) -> P
    where
        P: for<'a> From<Scoped<'a, Self, T>>,
    {
        P::from(Scoped { scope: self, value })
    }
}

impl Scope for Caller {}
impl Scope for CompareLimits {}

/// How a tensor's values travelled, so the reply can use the same form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Representation {
    Raw,
    Float,
    Double,
}

impl Representation {
    /// `value`, to be encoded with tensors in this form.
    pub fn of<T>(self, value: T) -> Represented<T> {
        Represented {
            value,
            representation: self,
        }
    }
}

/// A result whose tensors are encoded as the request's input travelled.
pub struct Represented<T> {
    pub value: T,
    pub representation: Representation,
}

/// The key of the session a caller names. A user names the sessions of its
/// tenant, so another tenant's sessions are out of its reach by construction;
/// an admin names any session by its key (`tenant/name`, or `name` for the
/// default tenant).
pub fn session_id(principal: &Principal, text: &str) -> Result<SessionId, ConvertError> {
    // The caller's own name for it, into the request's log line.
    tracing::Span::current().record("session_id", text);
    let parsed = if principal.is_admin() {
        SessionId::parse_key(text)
    } else {
        SessionId::parse(text).map(|name| SessionId::in_tenant(&principal.tenant, &name))
    };
    Ok(parsed?)
}

/// Another session named by a request (`field`), scoped as [`session_id`]
/// scopes, without becoming the request's logged session.
fn session_id_field(
    principal: &Principal,
    field: &str,
    text: &str,
) -> Result<SessionId, ConvertError> {
    let parsed = if principal.is_admin() {
        SessionId::parse_key(text)
    } else {
        SessionId::parse(text).map(|name| SessionId::in_tenant(&principal.tenant, &name))
    };
    parsed.map_err(|e| invalid(format!("{field}: {e}")))
}

pub fn optional_session_id(
    principal: &Principal,
    text: &str,
) -> Result<Option<SessionId>, ConvertError> {
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

/// The domain value of proto enum value `proto`: `to_proto`, the one table
/// between the two, read backwards.
fn from_proto<D: Copy, P: PartialEq>(all: &[D], to_proto: fn(D) -> P, proto: P) -> Option<D> {
    all.iter().copied().find(|value| to_proto(*value) == proto)
}

pub fn dtype_to_proto(dtype: DType) -> pb::DataType {
    match dtype {
        DType::Float32 => pb::DataType::Float32,
        DType::Float64 => pb::DataType::Float64,
        DType::Float16 => pb::DataType::Float16,
        DType::BFloat16 => pb::DataType::Bfloat16,
    }
}

/// None for DATA_TYPE_UNSPECIFIED.
pub fn dtype_from_proto(proto: pb::DataType) -> Option<DType> {
    from_proto(&DType::ALL, dtype_to_proto, proto)
}

fn data_type(field: &str, value: i32) -> Result<Option<DType>, ConvertError> {
    pb::DataType::try_from(value)
        .map(dtype_from_proto)
        .map_err(|_| invalid(format!("{field}: unknown DataType value {value}")))
}

/// Decodes a tensor, checking its size against `max_elements` before any
/// allocation. `None` in, `None` out.
pub fn tensor(
    field: &str,
    tensor: Option<pb::Tensor>,
    max_elements: u64,
) -> Result<Option<(TensorData, Representation)>, ConvertError> {
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
) -> Result<(TensorData, Representation), ConvertError> {
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
) -> Result<StateTensors, ConvertError> {
    let decode =
        |field: &str, t| Ok::<_, ConvertError>(tensor(field, t, max_elements)?.map(|(d, _)| d));
    Ok(StateTensors {
        weight: decode("weight", weight)?,
        bias: decode("bias", bias)?,
        running_mean: decode("running_mean", running_mean)?,
        running_var: decode("running_var", running_var)?,
    })
}

fn layer_kind_to_proto(kind: LayerKind) -> pb::BatchNormKind {
    match kind {
        LayerKind::BatchNorm1d => pb::BatchNormKind::BatchNorm1d,
        LayerKind::BatchNorm2d => pb::BatchNormKind::BatchNorm2d,
        LayerKind::BatchNorm3d => pb::BatchNormKind::BatchNorm3d,
    }
}

/// None for BATCH_NORM_KIND_UNSPECIFIED.
pub fn layer_kind_from_proto(proto: pb::BatchNormKind) -> Option<LayerKind> {
    from_proto(&LayerKind::ALL, layer_kind_to_proto, proto)
}

pub fn layer_kind(value: i32) -> Result<LayerKind, ConvertError> {
    match pb::BatchNormKind::try_from(value) {
        Ok(proto) => layer_kind_from_proto(proto).ok_or_else(|| {
            invalid("kind: required (BATCH_NORM_1D, BATCH_NORM_2D or BATCH_NORM_3D)")
        }),
        Err(_) => Err(invalid(format!(
            "kind: unknown BatchNormKind value {value}"
        ))),
    }
}

fn mode_to_proto(mode: Mode) -> pb::Mode {
    match mode {
        Mode::Train => pb::Mode::Train,
        Mode::Eval => pb::Mode::Eval,
    }
}

/// None: unspecified (the session default applies).
pub fn mode(value: i32) -> Result<Option<Mode>, ConvertError> {
    pb::Mode::try_from(value)
        .map(|proto| from_proto(&[Mode::Train, Mode::Eval], mode_to_proto, proto))
        .map_err(|_| invalid(format!("mode: unknown Mode value {value}")))
}

/// Momentum from the (momentum, cumulative_average) pair; None when neither
/// is set.
pub fn momentum(momentum: Option<f64>, cumulative: bool) -> Result<Option<Momentum>, ConvertError> {
    match (momentum, cumulative) {
        (Some(_), true) => Err(invalid(
            "momentum: set either momentum or cumulative_average, not both",
        )),
        (Some(m), false) => Ok(Some(Momentum::Exponential(m))),
        (None, true) => Ok(Some(Momentum::CumulativeAverage)),
        (None, false) => Ok(None),
    }
}

pub const DEFAULT_EPS: f64 = 1e-5;
pub const DEFAULT_MOMENTUM: f64 = 0.1;

pub fn session_config(request: &pb::CreateSessionRequest) -> Result<SessionConfig, ConvertError> {
    let labels: BTreeMap<String, String> = request
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if request.exact_statistics {
        if request.momentum.is_some() || request.cumulative_average {
            return Err(invalid(
                "exact_statistics: momentum must be unset and cumulative_average false (exact \
                 statistics are not moving averages)",
            ));
        }
        if request.track_running_stats == Some(false) {
            return Err(invalid("exact_statistics needs track_running_stats=true"));
        }
    }
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
        exact_statistics: request.exact_statistics,
        step_timeout: step_timeout(request.step_timeout_seconds)?,
    })
}

/// A step timeout in seconds: finite and > 0; unset: the default (60 s).
fn step_timeout(seconds: Option<f64>) -> Result<std::time::Duration, ConvertError> {
    let Some(seconds) = seconds else {
        return Ok(crate::session::DEFAULT_STEP_TIMEOUT);
    };
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(invalid(format!(
            "step_timeout_seconds must be finite and > 0, got {seconds}"
        )));
    }
    std::time::Duration::try_from_secs_f64(seconds)
        .map_err(|e| invalid(format!("step_timeout_seconds {seconds}: {e}")))
}

pub fn session_to_proto(principal: &Principal, snapshot: SessionSnapshot) -> pb::Session {
    let config = &snapshot.config;
    let (momentum, cumulative_average) = match config.momentum {
        // Exact statistics are not moving averages: no momentum.
        _ if config.exact_statistics => (None, false),
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
        exact_statistics: config.exact_statistics,
        labels: config
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        step_timeout_seconds: config.step_timeout.as_secs_f64(),
    };
    let tensors = snapshot.tensors.unwrap_or_default();
    let raw = |t: Option<TensorData>| t.map(|t| tensor_to_proto(t, Representation::Raw));
    pb::Session {
        session_id: shown_session_id(principal, &snapshot.id),
        config: Some(proto_config),
        device: device_name(snapshot.device),
        version: snapshot.version,
        num_batches_tracked: snapshot.num_batches_tracked,
        weight: raw(tensors.weight),
        bias: raw(tensors.bias),
        running_mean: raw(tensors.running_mean),
        running_var: raw(tensors.running_var),
        created_at: Some(snapshot.created_at.into()),
        updated_at: Some(snapshot.updated_at.into()),
        last_used_at: Some(snapshot.last_used_at.into()),
        standard_scaler: snapshot
            .standard_scaler
            .map(|s| pb::StandardScalerStatistics {
                mean: s.mean,
                var: s.var,
                scale: s.scale,
                n_samples_seen: i64::try_from(s.n_samples_seen).unwrap_or(i64::MAX),
            }),
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

fn implementation(value: i32) -> Result<Implementation, ConvertError> {
    const ALL: [Implementation; 5] = [
        Implementation::Reference,
        Implementation::Float64Reference,
        Implementation::ManualBiased,
        Implementation::ManualUnbiased,
        Implementation::Candidate,
    ];
    match pb::Implementation::try_from(value) {
        Ok(proto) => from_proto(&ALL, implementation_to_proto, proto).ok_or_else(|| {
            invalid("implementations: IMPLEMENTATION_UNSPECIFIED is not an implementation")
        }),
        Err(_) => Err(invalid(format!(
            "implementations: unknown Implementation value {value}"
        ))),
    }
}

/// The tolerance pair: both or neither, as `torch.testing.assert_close`.
fn tolerance(rtol: Option<f64>, atol: Option<f64>) -> Result<Option<Tolerance>, ConvertError> {
    match (rtol, atol) {
        (Some(rtol), Some(atol)) => Ok(Some(Tolerance { rtol, atol })),
        (None, None) => Ok(None),
        _ => Err(invalid(
            "rtol, atol: set both or neither (as torch.testing.assert_close requires)",
        )),
    }
}

/// Decodes a Compare request but its `device` (see [`CompareCall`]). The
/// representation is the input's, for the reply's tensors.
pub fn compare_request(
    request: pb::CompareRequest,
    max_elements: u64,
) -> Result<(CompareRequest, Representation), ConvertError> {
    let decode =
        |field: &str, t| Ok::<_, ConvertError>(tensor(field, t, max_elements)?.map(|(d, _)| d));
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

fn comparison_to_proto(
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
        device: device_name(comparison.device),
    }
}

// ---- BatchNormService requests -> commands ------------------------------

impl TryFrom<Scoped<'_, Caller, pb::CreateSessionRequest>> for CreateSession {
    type Error = ConvertError;

    fn try_from(scoped: Scoped<'_, Caller, pb::CreateSessionRequest>) -> Result<Self, Self::Error> {
        let (caller, request) = (scoped.scope, scoped.value);
        let config = session_config(&request)?;
        let device: DeviceChoice = request.device.parse()?;
        let initial = state_tensors(
            request.weight,
            request.bias,
            request.running_mean,
            request.running_var,
            caller.max_tensor_elements,
        )?;
        Ok(CreateSession {
            id: optional_session_id(&caller.principal, &request.session_id)?,
            tenant: caller.principal.tenant.clone(),
            config,
            device,
            initial,
            num_batches_tracked: request.num_batches_tracked,
        })
    }
}

/// A session named by its caller, for GetSession and ExportState.
impl TryFrom<Scoped<'_, Caller, pb::GetSessionRequest>> for SessionId {
    type Error = ConvertError;

    fn try_from(scoped: Scoped<'_, Caller, pb::GetSessionRequest>) -> Result<Self, Self::Error> {
        session_id(&scoped.scope.principal, &scoped.value.session_id)
    }
}

impl TryFrom<Scoped<'_, Caller, pb::ExportStateRequest>> for SessionId {
    type Error = ConvertError;

    fn try_from(scoped: Scoped<'_, Caller, pb::ExportStateRequest>) -> Result<Self, Self::Error> {
        session_id(&scoped.scope.principal, &scoped.value.session_id)
    }
}

/// Default and largest ListSessions page.
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1000;

impl TryFrom<Scoped<'_, Caller, pb::ListSessionsRequest>> for ListSessions {
    type Error = ConvertError;

    fn try_from(scoped: Scoped<'_, Caller, pb::ListSessionsRequest>) -> Result<Self, Self::Error> {
        let (principal, request) = (&scoped.scope.principal, scoped.value);
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => return Err(invalid(format!("page_size must be >= 0, got {n}"))),
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let after = optional_session_id(principal, &request.page_token)
            .map_err(|_| invalid("page_token: not a token returned by ListSessions"))?;
        Ok(ListSessions {
            tenant: (!principal.is_admin()).then(|| principal.tenant.clone()),
            after,
            page_size,
            selector: request.label_selector.into_iter().collect(),
            include_tensors: request.include_tensors,
        })
    }
}

/// A DeleteSession.
#[derive(Debug, Clone)]
pub struct DeleteSession {
    pub id: SessionId,
    pub expected_version: Option<u64>,
}

impl TryFrom<Scoped<'_, Caller, pb::DeleteSessionRequest>> for DeleteSession {
    type Error = ConvertError;

    fn try_from(scoped: Scoped<'_, Caller, pb::DeleteSessionRequest>) -> Result<Self, Self::Error> {
        Ok(DeleteSession {
            id: session_id(&scoped.scope.principal, &scoped.value.session_id)?,
            expected_version: scoped.value.expected_version,
        })
    }
}

/// The preconditions of a mutation: `expected_version` and `request_id`.
fn preconditions(
    expected_version: Option<u64>,
    request_id: &str,
) -> Result<Preconditions, ConvertError> {
    Ok(Preconditions {
        expected_version,
        request_id: parse_request_id(request_id)?,
    })
}

/// A mutation of one session: which, what, and its preconditions.
#[derive(Debug, Clone)]
pub struct Mutation<T> {
    pub id: SessionId,
    pub change: T,
    pub preconditions: Preconditions,
}

/// ResetRunningStats changes nothing the caller chooses.
pub type ResetRunningStats = Mutation<()>;

impl TryFrom<Scoped<'_, Caller, pb::ResetRunningStatsRequest>> for ResetRunningStats {
    type Error = ConvertError;

    fn try_from(
        scoped: Scoped<'_, Caller, pb::ResetRunningStatsRequest>,
    ) -> Result<Self, Self::Error> {
        let request = scoped.value;
        Ok(Mutation {
            id: session_id(&scoped.scope.principal, &request.session_id)?,
            preconditions: preconditions(request.expected_version, &request.request_id)?,
            change: (),
        })
    }
}

impl TryFrom<Scoped<'_, Caller, pb::UpdateParametersRequest>> for Mutation<UpdateParameters> {
    type Error = ConvertError;

    fn try_from(
        scoped: Scoped<'_, Caller, pb::UpdateParametersRequest>,
    ) -> Result<Self, Self::Error> {
        let (caller, request) = (scoped.scope, scoped.value);
        let id = session_id(&caller.principal, &request.session_id)?;
        let preconditions = preconditions(request.expected_version, &request.request_id)?;
        let cumulative = request.cumulative_average.unwrap_or(false);
        if request.cumulative_average == Some(false) && request.momentum.is_none() {
            return Err(invalid(
                "cumulative_average=false needs a momentum to switch to",
            ));
        }
        let change = UpdateParameters {
            tensors: state_tensors(
                request.weight,
                request.bias,
                request.running_mean,
                request.running_var,
                caller.max_tensor_elements,
            )?,
            num_batches_tracked: request.num_batches_tracked,
            eps: request.eps,
            momentum: momentum(request.momentum, cumulative)?,
        };
        Ok(Mutation {
            id,
            change,
            preconditions,
        })
    }
}

/// An ImportState's state dict.
#[derive(Debug, Clone)]
pub struct StateDict {
    pub safetensors: Bytes,
    /// Whether every key must be present and none unexpected (PyTorch's
    /// `load_state_dict(strict=)`).
    pub strict: bool,
}

impl TryFrom<Scoped<'_, Caller, pb::ImportStateRequest>> for Mutation<StateDict> {
    type Error = ConvertError;

    fn try_from(scoped: Scoped<'_, Caller, pb::ImportStateRequest>) -> Result<Self, Self::Error> {
        let request = scoped.value;
        Ok(Mutation {
            id: session_id(&scoped.scope.principal, &request.session_id)?,
            preconditions: preconditions(request.expected_version, &request.request_id)?,
            change: StateDict {
                safetensors: request.safetensors,
                strict: request.strict.unwrap_or(true),
            },
        })
    }
}

/// A MergeSession: the target (`id`), its preconditions, and the source.
pub type MergeSession = Mutation<SessionId>;

impl TryFrom<Scoped<'_, Caller, pb::MergeSessionRequest>> for MergeSession {
    type Error = ConvertError;

    fn try_from(scoped: Scoped<'_, Caller, pb::MergeSessionRequest>) -> Result<Self, Self::Error> {
        let (caller, request) = (scoped.scope, scoped.value);
        Ok(Mutation {
            id: session_id(&caller.principal, &request.session_id)?,
            preconditions: preconditions(request.expected_version, &request.request_id)?,
            change: session_id_field(
                &caller.principal,
                "source_session_id",
                &request.source_session_id,
            )?,
        })
    }
}

/// The range `proto` names in the caller's regions (of either kind),
/// holding exactly `byte_size` bytes aligned to `itemsize`.
fn shared_range(
    caller: &Caller,
    field: &str,
    proto: pb::SharedMemoryRange,
    itemsize: usize,
    byte_size: u64,
) -> Result<AnyRange, ConvertError> {
    let Some(shared_memory) = &caller.shared_memory else {
        return Err(ShmError::Unavailable(format!("{field} is not accepted on this API")).into());
    };
    if proto.byte_size != byte_size {
        return Err(invalid(format!(
            "{field}.byte_size: the tensor's dtype and shape take {byte_size} bytes, got {}",
            proto.byte_size
        )));
    }
    let request = RangeRequest {
        region: proto.region,
        offset: proto.offset,
        byte_size: proto.byte_size,
    };
    Ok(shared_memory.any_range(&caller.principal.tenant, field, &request, itemsize)?)
}

/// A Forward's input read in place from a shared-memory region.
enum SharedInput {
    Posix(TensorData, Range),
    Cuda(DeviceTensorData, CudaRange),
}

/// A Forward's input read in place from shared memory: `meta` carries its
/// dtype and shape only.
fn shared_input_tensor(
    caller: &Caller,
    meta: Option<pb::Tensor>,
    region: pb::SharedMemoryRange,
) -> Result<SharedInput, ConvertError> {
    let Some(meta) = meta else {
        return Err(invalid(
            "input: required with input_region (its dtype and shape; no values)",
        ));
    };
    if meta.values.is_some() {
        return Err(invalid(
            "input: with input_region, input carries the dtype and shape only (no values)",
        ));
    }
    let Some(dtype) = data_type("input.dtype", meta.dtype)? else {
        return Err(invalid("input.dtype: required with input_region"));
    };
    let numel = checked_numel("input", &meta.shape, caller.max_tensor_elements)?;
    let byte_size = numel.saturating_mul(dtype.itemsize() as u64);
    match shared_range(caller, "input_region", region, dtype.itemsize(), byte_size)? {
        AnyRange::Posix(range) => {
            let input = TensorData::from_raw(
                "input",
                dtype,
                meta.shape,
                range.bytes(),
                caller.max_tensor_elements,
            )?;
            Ok(SharedInput::Posix(input, range))
        }
        AnyRange::Cuda(range) => {
            let input = DeviceTensorData::new(
                "input",
                dtype,
                meta.shape,
                std::sync::Arc::new(range.clone()),
                caller.max_tensor_elements,
            )?;
            Ok(SharedInput::Cuda(input, range))
        }
    }
}

/// A region as registered, for SharedMemoryService's replies.
pub fn region_to_proto(info: RegionInfo) -> pb::SharedMemoryRegion {
    pb::SharedMemoryRegion {
        name: info.name,
        offset: info.offset,
        byte_size: info.byte_size,
        idle_seconds: info.idle.as_secs_f64(),
        cuda_ipc: info.cuda_device.map(|device| pb::CudaIpcRegion {
            device: u32::try_from(device).unwrap_or(u32::MAX),
        }),
    }
}

/// Where a Forward's output went in a registered region (of either kind).
pub fn range_to_proto<R: Mapped>(range: &RegionRange<R>) -> pb::SharedMemoryRange {
    pb::SharedMemoryRange {
        region: range.region().name().to_owned(),
        offset: range.offset(),
        byte_size: range.len(),
    }
}

/// A RegisterSharedMemory request.
pub struct RegisterRegion {
    pub name: String,
    pub offset: u64,
    pub byte_size: u64,
    /// GPU memory shared through a CUDA IPC handle: (handle, device).
    pub cuda_ipc: Option<(Vec<u8>, u32)>,
}

impl From<pb::RegisterSharedMemoryRequest> for RegisterRegion {
    fn from(request: pb::RegisterSharedMemoryRequest) -> Self {
        RegisterRegion {
            name: request.name,
            offset: request.offset,
            byte_size: request.byte_size,
            cuda_ipc: request
                .cuda_ipc
                .map(|memory| (memory.handle.to_vec(), memory.device)),
        }
    }
}

/// An UnregisterSharedMemory request: one region, or all (None).
pub struct UnregisterRegion {
    pub name: Option<String>,
}

impl From<pb::UnregisterSharedMemoryRequest> for UnregisterRegion {
    fn from(request: pb::UnregisterSharedMemoryRequest) -> Self {
        UnregisterRegion {
            name: (!request.name.is_empty()).then_some(request.name),
        }
    }
}

/// A SharedMemoryStatus request: one region, or all (None).
pub struct RegionStatus {
    pub name: Option<String>,
}

impl From<pb::SharedMemoryStatusRequest> for RegionStatus {
    fn from(request: pb::SharedMemoryStatusRequest) -> Self {
        RegionStatus {
            name: (!request.name.is_empty()).then_some(request.name),
        }
    }
}

pub fn registered_to_proto(info: RegionInfo, already: bool) -> pb::RegisterSharedMemoryResponse {
    pb::RegisterSharedMemoryResponse {
        region: Some(region_to_proto(info)),
        already_registered: already,
    }
}

pub fn unregistered_to_proto(count: u64) -> pb::UnregisterSharedMemoryResponse {
    pb::UnregisterSharedMemoryResponse {
        unregistered: count,
    }
}

pub fn region_status_to_proto(
    regions: Vec<RegionInfo>,
    limits: &ShmLimits,
) -> pb::SharedMemoryStatusResponse {
    pb::SharedMemoryStatusResponse {
        regions: regions.into_iter().map(region_to_proto).collect(),
        tenant_max_regions: limits.tenant_max_regions,
        tenant_max_bytes: limits.tenant_max_bytes,
        idle_seconds: limits.idle.map_or(0, |idle| idle.as_secs()),
    }
}

/// A Forward, and the form its output travels back in.
#[derive(Debug, Clone)]
pub struct ForwardCall {
    pub command: Forward,
    pub representation: Representation,
    /// The synchronized step the forward takes part in, if any.
    pub step: Option<StepSpec>,
    /// The shared-memory range the input is read from in place, if any.
    pub shared_input: Option<Range>,
    /// The shared-memory range the output is written to, if any (checked to
    /// hold exactly the output's bytes).
    pub shared_output: Option<Range>,
    /// The CUDA IPC range the input is viewed in (the command's input holds
    /// it too), if any: the device is synchronized before the answer.
    pub cuda_input: Option<CudaRange>,
    /// The CUDA IPC range the output is written to, if any (checked to hold
    /// exactly the output's bytes, on the input's device).
    pub cuda_output: Option<CudaRange>,
}

fn step_spec(step: Option<pb::StepSpec>) -> Option<StepSpec> {
    step.map(|s| StepSpec {
        step: s.step,
        world_size: s.world_size,
        rank: s.rank,
    })
}

impl TryFrom<Scoped<'_, Caller, pb::ForwardRequest>> for ForwardCall {
    type Error = ConvertError;

    fn try_from(scoped: Scoped<'_, Caller, pb::ForwardRequest>) -> Result<Self, Self::Error> {
        let (caller, request) = (scoped.scope, scoped.value);
        let id = session_id(&caller.principal, &request.session_id)?;
        let (input, representation, shared_input, cuda_input) = match request.input_region {
            None => {
                let (input, representation) =
                    required_tensor("input", request.input, caller.max_tensor_elements)?;
                (InputData::Host(input), representation, None, None)
            }
            Some(region) => match shared_input_tensor(caller, request.input, region)? {
                SharedInput::Posix(input, range) => (
                    InputData::Host(input),
                    Representation::Raw,
                    Some(range),
                    None,
                ),
                SharedInput::Cuda(input, range) => {
                    if request.step.is_some() {
                        return Err(invalid(
                            "input_region: a synchronized step takes its shard as host bytes, not from a CUDA IPC region",
                        ));
                    }
                    (
                        InputData::Device(input),
                        Representation::Raw,
                        None,
                        Some(range),
                    )
                }
            },
        };
        let overlap = || {
            invalid(
                "output_region overlaps input_region without being the same range (the same range normalizes in place)",
            )
        };
        let (shared_output, cuda_output) = match request.output_region {
            None => (None, None),
            // The output has the input's dtype and shape.
            Some(region) => match shared_range(
                caller,
                "output_region",
                region,
                input.dtype().itemsize(),
                input.byte_size() as u64,
            )? {
                AnyRange::Posix(range) => {
                    if cuda_input.is_some() {
                        return Err(invalid(
                            "output_region: a host memory region with a CUDA IPC input_region; name a CUDA IPC region of the input's device, or none (the output then comes in the reply)",
                        ));
                    }
                    if let Some(input) = &shared_input {
                        if range.overlaps(input) && !range.same_as(input) {
                            return Err(overlap());
                        }
                    }
                    (Some(range), None)
                }
                AnyRange::Cuda(range) => {
                    // The session's device is checked through the input's
                    // region before anything is computed.
                    let Some(input) = &cuda_input else {
                        return Err(invalid(
                            "output_region: a CUDA IPC output region needs a CUDA IPC input_region (on the same device)",
                        ));
                    };
                    if input.region().device() != range.region().device() {
                        return Err(invalid(format!(
                            "output_region: its memory is on cuda:{}, the input_region's on cuda:{}",
                            range.region().device(),
                            input.region().device()
                        )));
                    }
                    if range.overlaps(input) && !range.same_as(input) {
                        return Err(overlap());
                    }
                    (None, Some(range))
                }
            },
        };
        // The output is computed straight into its range, unless that is
        // the input's own (in place): then it is computed beside and copied
        // in after the commit, so the input stays intact until the step is
        // applied (a recompute reads it again; a failure leaves it as it was).
        let output_memory = shared_output
            .as_ref()
            .filter(|output| {
                !shared_input
                    .as_ref()
                    .is_some_and(|input| output.same_as(input))
            })
            .map(|output| Arc::new(output.clone()) as Arc<dyn ExternalMemory>);
        let command = Forward {
            id,
            input,
            mode: mode(request.mode)?,
            preconditions: preconditions(request.expected_version, &request.request_id)?,
            output_memory,
            input_memory: shared_input
                .clone()
                .map(|input| Arc::new(input) as Arc<dyn ExternalMemory>),
        };
        Ok(ForwardCall {
            command,
            representation,
            step: step_spec(request.step),
            shared_input,
            shared_output,
            cuda_input,
            cuda_output,
        })
    }
}

impl TryFrom<Scoped<'_, Caller, pb::ReduceStatisticsRequest>> for ReduceStatistics {
    type Error = ConvertError;

    fn try_from(
        scoped: Scoped<'_, Caller, pb::ReduceStatisticsRequest>,
    ) -> Result<Self, Self::Error> {
        let (caller, request) = (scoped.scope, scoped.value);
        let id = session_id(&caller.principal, &request.session_id)?;
        // The (step, rank, phase) is the idempotency key; a request id is
        // checked for its length only.
        parse_request_id(&request.request_id)?;
        let spec = step_spec(request.step).ok_or_else(|| invalid("step is required"))?;
        let reduction = match pb::ReducePhase::try_from(request.phase) {
            Ok(pb::ReducePhase::Forward) => {
                if !request.sum_grad_output.is_empty()
                    || !request.sum_grad_output_centered.is_empty()
                {
                    return Err(invalid(
                        "phase FORWARD takes count, mean and m2, not the backward sums",
                    ));
                }
                Reduction::Forward {
                    stats: ShardStats {
                        count: request.count,
                        mean: request.mean,
                        m2: request.m2,
                    },
                    update_running_stats: request.update_running_stats,
                }
            }
            Ok(pb::ReducePhase::Backward) => {
                if request.count != 0 || !request.mean.is_empty() || !request.m2.is_empty() {
                    return Err(invalid(
                        "phase BACKWARD takes the backward sums, not count, mean and m2",
                    ));
                }
                Reduction::Backward {
                    sum_grad_output: request.sum_grad_output,
                    sum_grad_output_centered: request.sum_grad_output_centered,
                }
            }
            _ => {
                return Err(invalid(format!(
                    "phase must be REDUCE_PHASE_FORWARD or REDUCE_PHASE_BACKWARD, got {}",
                    request.phase
                )))
            }
        };
        Ok(ReduceStatistics {
            id,
            spec,
            reduction,
        })
    }
}

fn step_statistics_to_proto(statistics: &StepStatistics) -> pb::StepStatistics {
    pb::StepStatistics {
        step: statistics.step,
        count: statistics.global.count,
        mean: statistics.global.mean.clone(),
        var: statistics.global.var.clone(),
        unbiased_var: statistics.global.unbiased_var.clone(),
    }
}

impl From<ReduceOutcome> for pb::ReduceStatisticsResponse {
    fn from(outcome: ReduceOutcome) -> Self {
        let (sum_grad_output, sum_grad_output_centered) = match &outcome.sums {
            Some(sums) => (
                sums.sum_grad_output.clone(),
                sums.sum_grad_output_centered.clone(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        pb::ReduceStatisticsResponse {
            statistics: outcome.statistics.as_deref().map(step_statistics_to_proto),
            sum_grad_output,
            sum_grad_output_centered,
            version: outcome.version,
            num_batches_tracked: outcome.num_batches_tracked,
            replayed: outcome.replayed,
        }
    }
}

impl From<Represented<StepForwardOutcome>> for pb::ForwardResponse {
    fn from(represented: Represented<StepForwardOutcome>) -> Self {
        let outcome = represented.value;
        let statistics = outcome.statistics.as_deref().map(step_statistics_to_proto);
        pb::ForwardResponse {
            step_statistics: statistics,
            ..represented.representation.of(outcome.forward).into()
        }
    }
}

// ---- BatchNormService results -> responses ------------------------------

impl From<Scoped<'_, Caller, Created>> for pb::CreateSessionResponse {
    /// The session and whether it already existed.
    fn from(scoped: Scoped<'_, Caller, Created>) -> Self {
        pb::CreateSessionResponse {
            session: Some(session_to_proto(
                &scoped.scope.principal,
                scoped.value.snapshot,
            )),
            already_existed: scoped.value.already_existed,
        }
    }
}

impl From<Scoped<'_, Caller, SessionSnapshot>> for pb::GetSessionResponse {
    fn from(scoped: Scoped<'_, Caller, SessionSnapshot>) -> Self {
        pb::GetSessionResponse {
            session: Some(session_to_proto(&scoped.scope.principal, scoped.value)),
        }
    }
}

impl From<Scoped<'_, Caller, SessionPage>> for pb::ListSessionsResponse {
    fn from(scoped: Scoped<'_, Caller, SessionPage>) -> Self {
        let (principal, page) = (&scoped.scope.principal, scoped.value);
        pb::ListSessionsResponse {
            sessions: page
                .sessions
                .into_iter()
                .map(|s| session_to_proto(principal, s))
                .collect(),
            next_page_token: page
                .next_after
                .map(|id| shown_session_id(principal, &id))
                .unwrap_or_default(),
            unreadable: page
                .unreadable
                .into_iter()
                .map(|u| pb::UnreadableSession {
                    session_id: shown_session_id(principal, &u.id),
                    reason: u.reason,
                })
                .collect(),
        }
    }
}

/// The session after a mutation (as `principal` names it) and whether the
/// mutation was a replay: what every mutation's response carries.
fn applied(
    principal: &Principal,
    applied: Applied<SessionSnapshot>,
) -> (Option<pb::Session>, bool) {
    (
        Some(session_to_proto(principal, applied.value)),
        applied.replayed,
    )
}

impl From<Scoped<'_, Caller, Applied<SessionSnapshot>>> for pb::ResetRunningStatsResponse {
    fn from(scoped: Scoped<'_, Caller, Applied<SessionSnapshot>>) -> Self {
        let (session, replayed) = applied(&scoped.scope.principal, scoped.value);
        pb::ResetRunningStatsResponse { session, replayed }
    }
}

impl From<Scoped<'_, Caller, Applied<SessionSnapshot>>> for pb::UpdateParametersResponse {
    fn from(scoped: Scoped<'_, Caller, Applied<SessionSnapshot>>) -> Self {
        let (session, replayed) = applied(&scoped.scope.principal, scoped.value);
        pb::UpdateParametersResponse { session, replayed }
    }
}

impl From<Scoped<'_, Caller, Applied<SessionSnapshot>>> for pb::ImportStateResponse {
    fn from(scoped: Scoped<'_, Caller, Applied<SessionSnapshot>>) -> Self {
        let (session, replayed) = applied(&scoped.scope.principal, scoped.value);
        pb::ImportStateResponse { session, replayed }
    }
}

impl From<Scoped<'_, Caller, Applied<SessionSnapshot>>> for pb::MergeSessionResponse {
    fn from(scoped: Scoped<'_, Caller, Applied<SessionSnapshot>>) -> Self {
        let (session, replayed) = applied(&scoped.scope.principal, scoped.value);
        pb::MergeSessionResponse { session, replayed }
    }
}

impl From<Represented<ForwardOutcome>> for pb::ForwardResponse {
    fn from(represented: Represented<ForwardOutcome>) -> Self {
        let outcome = represented.value;
        pb::ForwardResponse {
            output: outcome
                .output
                .map(|o| tensor_to_proto(o, represented.representation)),
            version: outcome.version,
            num_batches_tracked: outcome.num_batches_tracked,
            replayed: outcome.replayed,
            step_statistics: None,
            output_region: None,
        }
    }
}

/// A Forward's result whose output was written to shared memory (`written`:
/// the range, or None when there was no output to write, in a replay).
pub struct WrittenToSharedMemory {
    pub outcome: StepForwardOutcome,
    pub written: Option<Range>,
}

/// A Forward's outcome whose output went into a CUDA IPC range.
pub struct WrittenToCudaMemory {
    pub outcome: StepForwardOutcome,
    pub written: CudaRange,
}

impl From<WrittenToCudaMemory> for pb::ForwardResponse {
    fn from(result: WrittenToCudaMemory) -> Self {
        let mut outcome = result.outcome;
        outcome.forward.output = None;
        pb::ForwardResponse {
            output_region: Some(range_to_proto(&result.written)),
            ..Representation::Raw.of(outcome).into()
        }
    }
}

impl From<WrittenToSharedMemory> for pb::ForwardResponse {
    fn from(result: WrittenToSharedMemory) -> Self {
        let mut outcome = result.outcome;
        outcome.forward.output = None;
        pb::ForwardResponse {
            output_region: result.written.as_ref().map(range_to_proto),
            ..Representation::Raw.of(outcome).into()
        }
    }
}

impl From<ExportedState> for pb::ExportStateResponse {
    fn from(exported: ExportedState) -> Self {
        pb::ExportStateResponse {
            safetensors: exported.safetensors,
            version: exported.version,
        }
    }
}

// ---- CompareService -------------------------------------------------------

/// A Compare: what to compare, on which device, and the form tensors travel
/// back in.
#[derive(Debug, Clone)]
pub struct CompareCall {
    pub request: CompareRequest,
    pub device: Device,
    pub representation: Representation,
}

impl TryFrom<Scoped<'_, CompareLimits, pb::CompareRequest>> for CompareCall {
    type Error = ConvertError;

    fn try_from(
        scoped: Scoped<'_, CompareLimits, pb::CompareRequest>,
    ) -> Result<Self, Self::Error> {
        let (limits, mut request) = (scoped.scope, scoped.value);
        // The device first: an unusable one is refused before any tensor is
        // decoded.
        let device = std::mem::take(&mut request.device)
            .parse::<DeviceChoice>()?
            .resolve(Some(limits.default_device))?;
        if let Some(input) = &request.input {
            let elements = checked_numel("input", &input.shape, limits.max_tensor_elements)?;
            if elements > limits.max_input_elements {
                return Err(NumericsError::LimitExceeded {
                    field: "input".to_owned(),
                    what: "element count of a Compare's input",
                    actual: elements,
                    limit: limits.max_input_elements,
                    limit_name: "compare_max_tensor_elements",
                }
                .into());
            }
        }
        let (request, representation) = compare_request(request, limits.max_tensor_elements)?;
        Ok(CompareCall {
            request,
            device,
            representation,
        })
    }
}

impl From<Represented<Comparison>> for pb::CompareResponse {
    fn from(represented: Represented<Comparison>) -> Self {
        comparison_to_proto(represented.value, represented.representation)
    }
}

// ---- ServerService --------------------------------------------------------

/// What GetServerInfo reports that does not change while the server runs.
#[derive(Debug, Clone)]
pub struct ServerFacts {
    pub server_version: &'static str,
    pub libtorch_version: &'static str,
    pub default_device: Device,
    /// The CPU first, then each CUDA device.
    pub devices: Vec<DeviceDescription>,
    pub max_sessions: u64,
    pub max_tensor_elements: u64,
    pub max_num_features: i64,
    pub max_message_bytes: usize,
    pub replay_cache_total_bytes: usize,
    /// --shared-memory on.
    pub shared_memory: bool,
    pub shared_memory_max_bytes: u64,
    pub store: StoreKind,
    pub durability: Durability,
    pub cpu_stats_kernel: CpuStatsKernel,
    pub tls: bool,
    /// Client certificates required.
    pub mtls: bool,
    /// Bearer tokens required.
    pub auth: bool,
    pub intra_op_threads: i32,
    pub compute_threads: usize,
}

/// GetServerInfo's answer: the facts and the session counts of this call.
pub struct ServerInfo<'a> {
    pub facts: &'a ServerFacts,
    /// Sessions the caller may know of.
    pub sessions: u64,
    pub unreadable_sessions: u64,
    /// The memory budget, bytes.
    pub memory_budget_bytes: u64,
    /// Charged to it now (0 when the caller may not know).
    pub memory_charged_bytes: u64,
    /// Shared-memory bytes mapped and regions registered now (0 when the
    /// caller may not know).
    pub shared_memory_mapped_bytes: u64,
    pub shared_memory_regions: u64,
}

impl From<ServerInfo<'_>> for pb::GetServerInfoResponse {
    fn from(info: ServerInfo<'_>) -> Self {
        let facts = info.facts;
        pb::GetServerInfoResponse {
            server_version: facts.server_version.to_owned(),
            libtorch_version: facts.libtorch_version.to_owned(),
            default_device: device_name(facts.default_device),
            cuda_device_count: facts.devices.len().saturating_sub(1) as i32,
            devices: facts
                .devices
                .iter()
                .map(|d| pb::DeviceInfo {
                    name: d.name.clone(),
                    description: d.description.clone(),
                    total_memory_bytes: d.total_memory_bytes,
                })
                .collect(),
            limits: Some(pb::Limits {
                max_sessions: facts.max_sessions,
                max_tensor_elements: facts.max_tensor_elements,
                max_num_features: facts.max_num_features,
                max_message_bytes: facts.max_message_bytes as u64,
                memory_budget_bytes: info.memory_budget_bytes,
                memory_charged_bytes: info.memory_charged_bytes,
                replay_cache_total_bytes: facts.replay_cache_total_bytes as u64,
                shared_memory_max_bytes: if facts.shared_memory {
                    facts.shared_memory_max_bytes
                } else {
                    0
                },
                shared_memory_mapped_bytes: info.shared_memory_mapped_bytes,
                shared_memory_regions: info.shared_memory_regions,
            }),
            features: [
                "sessions",
                "forward_stream",
                "compare",
                "health",
                "reflection",
            ]
            .into_iter()
            .chain(facts.tls.then_some("tls"))
            .chain(facts.mtls.then_some("mtls"))
            .chain(facts.auth.then_some("auth"))
            .chain(facts.shared_memory.then_some("shared_memory"))
            .map(str::to_owned)
            .chain([
                format!("store:{}", facts.store.name()),
                format!("durability:{}", facts.durability.name()),
                format!("cpu_stats_kernel:{}", facts.cpu_stats_kernel.name()),
            ])
            .collect(),
            intra_op_threads: facts.intra_op_threads,
            compute_threads: facts.compute_threads as i32,
            sessions: info.sessions,
            unreadable_sessions: info.unreadable_sessions,
            store: facts.store.name().to_owned(),
        }
    }
}
