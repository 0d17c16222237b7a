//! Compare: libtorch's batch norm beside hand-written formulas and the
//! caller's own numbers, with exact differences and a diagnosis of the
//! classic mistakes.
//!
//! Owns the domain request ([`CompareRequest`]) and its validation
//! (`validate`: the rules and texts of sessions), the implementations
//! (`implementations`), the difference statistics ([`diff`]) and the
//! hypotheses (`hypotheses`). Stateless: it never sees a session. Like the
//! rest of `numerics` it knows nothing about gRPC, tokio or I/O.

pub mod diff;
mod hypotheses;
mod implementations;
mod validate;

use validate::{validate, Checked};

use crate::numerics::stats::StatsKernel;
use tch::{Device, Kind, Tensor};

use super::batch_norm::{Layer, LayerKind, Momentum};
use super::{DType, NumericsError, TensorData};

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
