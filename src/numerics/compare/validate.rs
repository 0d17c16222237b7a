//! Validation of a Compare request, before anything is computed: the input
//! against the layer its rank implies (the rules and texts of sessions,
//! through [`Layer::check_input`]), the per-channel tensors and
//! hyperparameters, the candidate's numbers, the tolerance and the requested
//! implementations. Each check has one job; [`validate`] runs them in order.

use tch::{Device, Kind, Tensor};

use super::{CompareRequest, Implementation, Part, Parts, Tolerance};
use crate::numerics::batch_norm::{check_eps, check_momentum, Layer, LayerKind, Momentum};
use crate::numerics::stats::StatsKernel;
use crate::numerics::{torch_size, DType, NumericsError, TensorData};

/// What validation decided.
pub(super) struct Checked {
    pub(super) kind: LayerKind,
    pub(super) param_dtype: DType,
    pub(super) tolerance: Tolerance,
    /// Deduplicated, in reply order.
    pub(super) implementations: Vec<Implementation>,
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
pub(super) fn validate(
    request: &CompareRequest,
    max_num_features: i64,
) -> Result<Checked, NumericsError> {
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
