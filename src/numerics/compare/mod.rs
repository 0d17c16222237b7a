//! Compare: libtorch's batch norm beside hand-written formulas and the
//! caller's own numbers, with exact differences and a diagnosis of the
//! classic mistakes.
//!
//! Owns the domain request ([`CompareRequest`]) and its validation (the rules
//! and texts of sessions, through [`Layer::check_input`]), the implementations
//! (`implementations`), the difference statistics ([`diff`]) and the
//! hypotheses (`hypotheses`). Stateless: it never sees a session. Like the
//! rest of `numerics` it knows nothing about gRPC, tokio or I/O.

pub mod diff;
mod hypotheses;
mod implementations;

use crate::numerics::stats::StatsKernel;
use tch::{Device, Kind, Tensor};

use super::batch_norm::{check_eps, check_momentum, Layer, LayerKind, Momentum};
use super::{torch_size, DType, NumericsError, TensorData};

pub use diff::{Difference, Tolerance};
pub use hypotheses::{Diagnosis, Hypothesis};

/// The implementations Compare reports, in reply order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Implementation {
    /// libtorch's native batch norm in the request's dtypes: what
    /// `nn.BatchNorm` computes.
    Reference,
    /// The same in float64: the ground truth.
    Float64Reference,
    /// The textbook formula, biased variance for normalization.
    ManualBiased,
    /// The textbook formula with the unbiased variance (the classic mistake).
    ManualUnbiased,
    /// The caller's own numbers.
    Candidate,
}

impl Implementation {
    pub const ALL: [Implementation; 5] = [
        Implementation::Reference,
        Implementation::Float64Reference,
        Implementation::ManualBiased,
        Implementation::ManualUnbiased,
        Implementation::Candidate,
    ];
}

/// One tensor of an implementation's results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The input's shape.
    Output,
    /// (C,), after this step's update.
    RunningMean,
    RunningVar,
    /// The input's shape.
    GradInput,
    /// (C,).
    GradWeight,
    GradBias,
}

impl Part {
    pub const ALL: [Part; 6] = [
        Part::Output,
        Part::RunningMean,
        Part::RunningVar,
        Part::GradInput,
        Part::GradWeight,
        Part::GradBias,
    ];

    /// The name of the candidate's field holding this part.
    pub fn name(self) -> &'static str {
        match self {
            Part::Output => "output",
            Part::RunningMean => "running_mean",
            Part::RunningVar => "running_var",
            Part::GradInput => "grad_input",
            Part::GradWeight => "grad_weight",
            Part::GradBias => "grad_bias",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }

    /// True for the (C,) parts, false for the input-shaped ones.
    fn is_per_channel(self) -> bool {
        !matches!(self, Part::Output | Part::GradInput)
    }
}

/// At most one value per [`Part`].
#[derive(Debug, Clone, PartialEq)]
pub struct Parts<T> {
    slots: [Option<T>; 6],
}

impl<T> Default for Parts<T> {
    fn default() -> Self {
        Parts {
            slots: std::array::from_fn(|_| None),
        }
    }
}

impl<T> Parts<T> {
    pub fn get(&self, part: Part) -> Option<&T> {
        self.slots[part.slot()].as_ref()
    }

    pub fn set(&mut self, part: Part, value: T) {
        self.slots[part.slot()] = Some(value);
    }

    /// Present parts, in [`Part::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Part, &T)> {
        Part::ALL
            .into_iter()
            .filter_map(|part| self.get(part).map(|value| (part, value)))
    }

    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }
}

/// A Compare call, decoded. Each per-channel tensor is (C,).
#[derive(Debug, Clone)]
pub struct CompareRequest {
    /// (N, C) or (N, C, *spatial), rank 2 to 5.
    pub input: TensorData,
    pub weight: Option<TensorData>,
    pub bias: Option<TensorData>,
    pub running_mean: Option<TensorData>,
    pub running_var: Option<TensorData>,
    /// The counter before this step.
    pub num_batches_tracked: i64,
    pub training: bool,
    pub eps: f64,
    pub momentum: Momentum,
    /// The input's shape.
    pub grad_output: Option<TensorData>,
    /// The caller's results; `Some` with no parts is refused.
    pub candidate: Option<Parts<TensorData>>,
    /// None: `torch.testing.assert_close`'s default for the input's dtype.
    pub tolerance: Option<Tolerance>,
    /// Empty: every implementation (the candidate when given).
    pub implementations: Vec<Implementation>,
    pub return_tensors: bool,
}

/// One tensor of one implementation against both references.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorReport {
    pub vs_float64_reference: Difference,
    pub vs_reference: Difference,
    /// The tensor, when the caller asked for tensors.
    pub values: Option<TensorData>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImplementationReport {
    pub implementation: Implementation,
    pub parts: Parts<TensorReport>,
}

/// Compare's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub reports: Vec<ImplementationReport>,
    /// Present when a candidate was given.
    pub diagnosis: Option<Diagnosis>,
    pub tolerance: Tolerance,
    pub device: Device,
}

/// Runs every requested implementation on `device` and measures each against
/// the references; diagnoses the candidate when there is one. Validation comes
/// first and touches no tensor data beyond the (C,) parameters.
pub fn compare(
    request: CompareRequest,
    device: Device,
    max_num_features: i64,
) -> Result<Comparison, NumericsError> {
    let checked = validate(&request, max_num_features)?;
    let native = Problem::build(&request, &checked, device, None)?;
    let float64 = Problem::build(&request, &checked, device, Some(Kind::Double))?;
    let reference = implementations::native(&native)?;
    let truth = implementations::native(&float64)?;
    let candidate = match &request.candidate {
        Some(parts) => Some(to_tensors(parts, device)?),
        None => None,
    };

    let mut reports = Vec::with_capacity(checked.implementations.len());
    for &implementation in &checked.implementations {
        let results = match implementation {
            Implementation::Reference => shallow(&reference),
            Implementation::Float64Reference => shallow(&truth),
            Implementation::ManualBiased => {
                implementations::manual(&native, implementations::Variance::Biased)?
            }
            Implementation::ManualUnbiased => {
                implementations::manual(&native, implementations::Variance::Unbiased)?
            }
            Implementation::Candidate => match &candidate {
                Some(parts) => shallow(parts),
                None => continue,
            },
        };
        reports.push(ImplementationReport {
            implementation,
            parts: report(
                &results,
                &reference,
                &truth,
                checked.tolerance,
                request.return_tensors,
            )?,
        });
    }
    let diagnosis = match &candidate {
        Some(parts) => Some(hypotheses::diagnose(
            &float64,
            parts,
            &reference,
            &truth,
            checked.tolerance,
        )?),
        None => None,
    };
    Ok(Comparison {
        reports,
        diagnosis,
        tolerance: checked.tolerance,
        device,
    })
}

/// Every part of `results` against the same part of both references.
fn report(
    results: &Parts<Tensor>,
    reference: &Parts<Tensor>,
    truth: &Parts<Tensor>,
    tolerance: Tolerance,
    return_tensors: bool,
) -> Result<Parts<TensorReport>, NumericsError> {
    let mut reports = Parts::default();
    for (part, tensor) in results.iter() {
        let (Some(truth), Some(reference)) = (truth.get(part), reference.get(part)) else {
            // Validation admits only parts the references produce.
            return Err(NumericsError::Torch(format!(
                "no reference for {}",
                part.name()
            )));
        };
        let values = if return_tensors {
            Some(TensorData::from_tensor(tensor)?)
        } else {
            None
        };
        reports.set(
            part,
            TensorReport {
                vs_float64_reference: diff::difference(tensor, truth, tolerance)?,
                vs_reference: diff::difference(tensor, reference, tolerance)?,
                values,
            },
        );
    }
    Ok(reports)
}

fn shallow(parts: &Parts<Tensor>) -> Parts<Tensor> {
    let mut copy = Parts::default();
    for (part, tensor) in parts.iter() {
        copy.set(part, tensor.shallow_clone());
    }
    copy
}

fn to_tensors(parts: &Parts<TensorData>, device: Device) -> Result<Parts<Tensor>, NumericsError> {
    let mut tensors = Parts::default();
    for (part, data) in parts.iter() {
        tensors.set(part, data.to_tensor(device)?);
    }
    Ok(tensors)
}

/// What validation decided.
struct Checked {
    kind: LayerKind,
    param_dtype: DType,
    tolerance: Tolerance,
    /// Deduplicated, in reply order.
    implementations: Vec<Implementation>,
}

/// The module a Compare reproduces, from the input's rank.
fn layer_kind_for_rank(rank: usize) -> Result<LayerKind, NumericsError> {
    match rank {
        2 | 3 => Ok(LayerKind::BatchNorm1d),
        4 => Ok(LayerKind::BatchNorm2d),
        5 => Ok(LayerKind::BatchNorm3d),
        _ => Err(NumericsError::invalid(
            "input",
            format!(
                "expected 2D or 3D (BatchNorm1d), 4D (BatchNorm2d) or 5D (BatchNorm3d) input (got {rank}D input)"
            ),
        )),
    }
}

/// The per-channel tensors in ATen's checking order, with their fields.
fn per_channel_tensors(request: &CompareRequest) -> [(&'static str, Option<&TensorData>); 4] {
    [
        ("running_mean", request.running_mean.as_ref()),
        ("running_var", request.running_var.as_ref()),
        ("weight", request.weight.as_ref()),
        ("bias", request.bias.as_ref()),
    ]
}

/// Checks the request, each check one function, in an order that decides
/// which error a request with several faults gets: the server's limit and
/// the layer's settings, the per-channel tensors, the input against the layer
/// (PyTorch's order and texts), then what only Compare has: grad_output, the
/// candidate, the tolerance and the implementations.
fn validate(request: &CompareRequest, max_num_features: i64) -> Result<Checked, NumericsError> {
    let shape = request.input.shape();
    let kind = layer_kind_for_rank(shape.len())?;
    let channels = shape[1];
    check_num_features_limit(channels, max_num_features)?;
    check_hyperparameters(request)?;
    check_running_stats_pairing(request)?;
    let first = first_parameter(request)?;
    let num_features = first.map_or(channels, |data| data.shape()[0]);
    let param_dtype = first.map_or(request.input.dtype(), TensorData::dtype);
    check_input_against_layer(request, kind, num_features, param_dtype)?;
    check_parameter_lengths(request, channels)?;
    check_input_not_empty(request)?;
    if let Some(grad_output) = &request.grad_output {
        check_shape("grad_output", grad_output, shape, "the input's")?;
    }
    if let Some(candidate) = &request.candidate {
        check_candidate(request, candidate, channels)?;
    }
    let tolerance = checked_tolerance(request)?;
    let implementations = requested_implementations(request)?;
    Ok(Checked {
        kind,
        param_dtype,
        tolerance,
        implementations,
    })
}

fn check_num_features_limit(channels: i64, max_num_features: i64) -> Result<(), NumericsError> {
    if channels > max_num_features {
        return Err(NumericsError::LimitExceeded {
            field: "input".to_owned(),
            what: "num_features (dimension 1)",
            actual: channels.max(0) as u64,
            limit: max_num_features.max(0) as u64,
            limit_name: "max_num_features",
        });
    }
    Ok(())
}

/// eps, momentum and the counter, with the texts sessions use.
fn check_hyperparameters(request: &CompareRequest) -> Result<(), NumericsError> {
    check_eps("eps", request.eps)?;
    if let Momentum::Exponential(momentum) = request.momentum {
        check_momentum("momentum", momentum)?;
    }
    if request.num_batches_tracked < 0 {
        return Err(NumericsError::invalid(
            "num_batches_tracked",
            format!("must be >= 0, got {}", request.num_batches_tracked),
        ));
    }
    Ok(())
}

fn check_running_stats_pairing(request: &CompareRequest) -> Result<(), NumericsError> {
    if request.running_mean.is_some() != request.running_var.is_some() {
        return Err(NumericsError::invalid(
            "running_mean",
            "running_mean and running_var must be given together (both absent: track_running_stats=False)",
        ));
    }
    Ok(())
}

/// The first per-channel tensor in ATen's order, after checking that each is
/// 1-D and all share its dtype. The layer is judged as PyTorch judges it:
/// its size is that of this tensor.
fn first_parameter(request: &CompareRequest) -> Result<Option<&TensorData>, NumericsError> {
    let mut first: Option<(&str, &TensorData)> = None;
    for (field, data) in per_channel_tensors(request) {
        let Some(data) = data else { continue };
        if data.shape().len() != 1 {
            return Err(NumericsError::invalid(
                field,
                format!(
                    "expected a 1-D tensor of shape (C,), got {}",
                    torch_size(data.shape())
                ),
            ));
        }
        match first {
            None => first = Some((field, data)),
            Some((first_field, first_data)) if first_data.dtype() != data.dtype() => {
                return Err(NumericsError::invalid(
                    field,
                    format!(
                        "weight, bias, running_mean and running_var must share one dtype: {field} is {}, {first_field} is {}",
                        data.dtype().torch_name(),
                        first_data.dtype().torch_name()
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(first.map(|(_, data)| data))
}

/// The input against the layer the parameters describe, with PyTorch's
/// texts ([`Layer::check_input`]).
fn check_input_against_layer(
    request: &CompareRequest,
    kind: LayerKind,
    num_features: i64,
    param_dtype: DType,
) -> Result<(), NumericsError> {
    // Layer::check_input looks only at which tensors exist; empty host
    // stand-ins keep the data off the device until validation is over.
    let present = |data: Option<&TensorData>| -> Result<Option<Tensor>, NumericsError> {
        match data {
            Some(_) => Ok(Some(Tensor::f_zeros([0], (Kind::Float, Device::Cpu))?)),
            None => Ok(None),
        }
    };
    let (weight, bias) = (
        present(request.weight.as_ref())?,
        present(request.bias.as_ref())?,
    );
    let (running_mean, running_var) = (
        present(request.running_mean.as_ref())?,
        present(request.running_var.as_ref())?,
    );
    let layer = Layer {
        kind,
        num_features,
        eps: request.eps,
        param_dtype,
        weight: weight.as_ref(),
        bias: bias.as_ref(),
        running_mean: running_mean.as_ref(),
        running_var: running_var.as_ref(),
        stats: StatsKernel::Libtorch,
    };
    layer.check_input(
        request.input.shape(),
        request.input.dtype(),
        request.training,
    )
}

/// Every per-channel tensor holds one value per input channel.
fn check_parameter_lengths(request: &CompareRequest, channels: i64) -> Result<(), NumericsError> {
    for (field, data) in per_channel_tensors(request) {
        if let Some(data) = data {
            if data.shape()[0] != channels {
                return Err(NumericsError::invalid(
                    "input",
                    format!(
                        "{field} should contain {channels} elements not {}",
                        data.shape()[0]
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_input_not_empty(request: &CompareRequest) -> Result<(), NumericsError> {
    if request.input.numel() == 0 {
        return Err(NumericsError::invalid(
            "input",
            format!(
                "Compare needs at least one element, got input size {}",
                torch_size(request.input.shape())
            ),
        ));
    }
    Ok(())
}

/// The candidate has at least one part, only parts the references produce,
/// each in its shape.
fn check_candidate(
    request: &CompareRequest,
    candidate: &Parts<TensorData>,
    channels: i64,
) -> Result<(), NumericsError> {
    if candidate.is_empty() {
        return Err(NumericsError::invalid(
            "candidate",
            "no tensors: set at least one of output, running_mean, running_var, grad_input, grad_weight, grad_bias",
        ));
    }
    for (part, data) in candidate.iter() {
        let field = format!("candidate.{}", part.name());
        if let Some(reason) = why_no_reference(request, part) {
            return Err(NumericsError::invalid(field, reason));
        }
        if part.is_per_channel() {
            check_shape(&field, data, &[channels], "(C,)")?;
        } else {
            check_shape(&field, data, request.input.shape(), "the input's")?;
        }
    }
    Ok(())
}

/// Why the references produce no `part` for this request, if they do not.
fn why_no_reference(request: &CompareRequest, part: Part) -> Option<&'static str> {
    let updates_running_stats = request.training && request.running_mean.is_some();
    match part {
        Part::Output => None,
        Part::RunningMean | Part::RunningVar if !updates_running_stats => Some(
            "the reference updates no running statistics here (eval mode, or no running_mean/running_var in the request)",
        ),
        Part::GradInput | Part::GradWeight | Part::GradBias if request.grad_output.is_none() => {
            Some("gradients are compared only when the request has grad_output")
        }
        Part::GradWeight if request.weight.is_none() => {
            Some("the request has no weight, so there is no grad_weight")
        }
        Part::GradBias if request.bias.is_none() => {
            Some("the request has no bias, so there is no grad_bias")
        }
        _ => None,
    }
}

/// The caller's tolerance when valid, else the default for the input's dtype.
fn checked_tolerance(request: &CompareRequest) -> Result<Tolerance, NumericsError> {
    let Some(tolerance) = request.tolerance else {
        return Ok(Tolerance::default_for(request.input.dtype()));
    };
    for (field, value) in [("rtol", tolerance.rtol), ("atol", tolerance.atol)] {
        if !(value.is_finite() && value >= 0.0) {
            return Err(NumericsError::invalid(
                field,
                format!("must be finite and >= 0, got {value}"),
            ));
        }
    }
    Ok(tolerance)
}

/// The implementations to run, deduplicated, in reply order: every one when
/// none is named, the candidate only when there is one.
fn requested_implementations(
    request: &CompareRequest,
) -> Result<Vec<Implementation>, NumericsError> {
    let mut implementations = if request.implementations.is_empty() {
        Implementation::ALL.to_vec()
    } else {
        request.implementations.clone()
    };
    if request.candidate.is_none() {
        if !request.implementations.is_empty()
            && implementations.contains(&Implementation::Candidate)
        {
            return Err(NumericsError::invalid(
                "implementations",
                "the candidate implementation needs a candidate",
            ));
        }
        implementations.retain(|&i| i != Implementation::Candidate);
    }
    implementations.sort();
    implementations.dedup();
    Ok(implementations)
}

fn check_shape(
    field: &str,
    data: &TensorData,
    expected: &[i64],
    description: &str,
) -> Result<(), NumericsError> {
    if data.shape() == expected {
        return Ok(());
    }
    Err(NumericsError::invalid(
        field,
        format!(
            "expected shape {} ({description}), got {}",
            torch_size(expected),
            torch_size(data.shape())
        ),
    ))
}

/// A validated request's tensors on the compute device.
struct Problem {
    kind: LayerKind,
    /// The dtype of the (C,) tensors (float64 in a float64 problem).
    param_dtype: DType,
    shape: Vec<i64>,
    /// (N, C, *spatial).
    x: Tensor,
    /// (C,) each.
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    running_mean: Option<Tensor>,
    running_var: Option<Tensor>,
    /// The input's shape and dtype.
    grad_output: Option<Tensor>,
    training: bool,
    eps: f64,
    /// The exponential-average factor of this step (0 when nothing updates).
    factor: f64,
}

impl Problem {
    /// The request's tensors on `device`, in their own dtypes (`None`) or all
    /// converted to `kind`. `grad_output` takes the input's dtype, as autograd
    /// converts it.
    fn build(
        request: &CompareRequest,
        checked: &Checked,
        device: Device,
        kind: Option<Kind>,
    ) -> Result<Self, NumericsError> {
        let load = |data: &TensorData| -> Result<Tensor, NumericsError> {
            let tensor = data.to_tensor(device)?;
            match kind {
                Some(kind) => Ok(tensor.f_to_kind(kind)?),
                None => Ok(tensor),
            }
        };
        let load_optional = |data: Option<&TensorData>| data.map(load).transpose();
        let x = load(&request.input)?;
        let grad_output = match &request.grad_output {
            Some(data) => Some(load(data)?.f_to_kind(x.f_kind()?)?),
            None => None,
        };
        let param_dtype = match kind {
            Some(Kind::Double) => DType::Float64,
            _ => checked.param_dtype,
        };
        let tracks = request.running_mean.is_some();
        let factor = if request.training && tracks {
            request
                .momentum
                .factor(request.num_batches_tracked.saturating_add(1))
        } else {
            0.0
        };
        Ok(Problem {
            kind: checked.kind,
            param_dtype,
            shape: request.input.shape().to_vec(),
            x,
            weight: load_optional(request.weight.as_ref())?,
            bias: load_optional(request.bias.as_ref())?,
            running_mean: load_optional(request.running_mean.as_ref())?,
            running_var: load_optional(request.running_var.as_ref())?,
            grad_output,
            training: request.training,
            eps: request.eps,
            factor,
        })
    }

    fn tracks_running_stats(&self) -> bool {
        self.running_mean.is_some() && self.running_var.is_some()
    }

    /// Batch statistics normalize: train mode, or no running statistics.
    fn uses_batch_stats(&self) -> bool {
        self.training || !self.tracks_running_stats()
    }

    fn updates_running_stats(&self) -> bool {
        self.training && self.tracks_running_stats()
    }

    /// The running statistics; only called where they are known to exist.
    fn running_stats(&self) -> Result<(&Tensor, &Tensor), NumericsError> {
        match (&self.running_mean, &self.running_var) {
            (Some(mean), Some(var)) => Ok((mean, var)),
            _ => Err(NumericsError::Torch(
                "running statistics expected but absent".to_owned(),
            )),
        }
    }

    fn rank(&self) -> i64 {
        self.shape.len() as i64
    }

    /// Batch norm's reduction: every dimension but the channels, (0, 2, ...).
    fn reduction_dims(&self) -> Vec<i64> {
        (0..self.rank()).filter(|&d| d != 1).collect()
    }

    /// m: the number of values behind each channel's batch statistics.
    fn values_per_channel(&self) -> i64 {
        self.shape[0] * self.shape[2..].iter().product::<i64>()
    }

    /// (1, C, 1, ...): how a (C,) tensor broadcasts against the input.
    fn channel_shape(&self) -> Vec<i64> {
        (0..self.rank())
            .map(|d| if d == 1 { self.shape[1] } else { 1 })
            .collect()
    }

    /// The layer over the given weight and bias (which may be this problem's
    /// own or gradient-tracking copies of them).
    fn layer<'a>(&'a self, weight: Option<&'a Tensor>, bias: Option<&'a Tensor>) -> Layer<'a> {
        Layer {
            kind: self.kind,
            num_features: self.shape[1],
            eps: self.eps,
            param_dtype: self.param_dtype,
            weight,
            bias,
            running_mean: self.running_mean.as_ref(),
            running_var: self.running_var.as_ref(),
            // The reference is libtorch's own kernel, whatever sessions use.
            stats: StatsKernel::Libtorch,
        }
    }
}
