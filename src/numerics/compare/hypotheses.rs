//! The diagnosis: known batch-norm mistakes, each simulated in float64 with
//! everything else done right, tested against the candidate, ranked, and
//! checked for what this input cannot tell apart.
//!
//! Mistakes come in two groups, judged separately so that one wrong step does
//! not hide another: the normalization (judged on the output and gradients)
//! and the running-statistics update (judged on running_mean/running_var).

use std::cmp::Ordering;

use tch::{Kind, Tensor};

use super::diff::{self, Tolerance};
use super::implementations::{affine, moving_average, set_gradients, vector_jacobian};
use super::{Part, Parts, Problem};
use crate::numerics::NumericsError;

/// A known mistake tested against the candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Stable identifier, e.g. "unbiased_variance".
    pub name: &'static str,
    /// Largest |candidate - simulation| over the compared parts.
    pub max_abs_diff: f64,
    /// Largest |candidate - simulation| / (atol + rtol·|simulation|).
    pub tolerance_ratio: f64,
    /// `tolerance_ratio <= 1`.
    pub explains: bool,
    pub explanation: &'static str,
    pub fix: &'static str,
    /// The candidate's parts compared.
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Diagnosis {
    pub matches_reference: bool,
    /// Best first.
    pub hypotheses: Vec<Hypothesis>,
    pub ambiguities: Vec<String>,
    pub summary: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Normalization,
    RunningStats,
}

impl Group {
    fn parts(self) -> &'static [Part] {
        match self {
            Group::Normalization => &[
                Part::Output,
                Part::GradInput,
                Part::GradWeight,
                Part::GradBias,
            ],
            Group::RunningStats => &[Part::RunningMean, Part::RunningVar],
        }
    }
}

/// The catalogue. Its order breaks ties in the ranking: the commonest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mistake {
    UnbiasedVariance,
    EpsOutsideSqrt,
    NoEps,
    DivideByVariance,
    AffineForgotten,
    WeightBiasSwapped,
    StatsPerSample,
    StatsOverAllElements,
    StatsOverBatchOnly,
    StatsOverSpatialOnly,
    RunningStatsInTraining,
    BatchStatsInEval,
    BiasedRunningVar,
    MomentumOneMinus,
    KerasMomentum,
}

impl Mistake {
    const ALL: [Mistake; 15] = [
        Mistake::UnbiasedVariance,
        Mistake::EpsOutsideSqrt,
        Mistake::NoEps,
        Mistake::DivideByVariance,
        Mistake::AffineForgotten,
        Mistake::WeightBiasSwapped,
        Mistake::StatsPerSample,
        Mistake::StatsOverAllElements,
        Mistake::StatsOverBatchOnly,
        Mistake::StatsOverSpatialOnly,
        Mistake::RunningStatsInTraining,
        Mistake::BatchStatsInEval,
        Mistake::BiasedRunningVar,
        Mistake::MomentumOneMinus,
        Mistake::KerasMomentum,
    ];

    fn name(self) -> &'static str {
        match self {
            Mistake::UnbiasedVariance => "unbiased_variance",
            Mistake::EpsOutsideSqrt => "eps_outside_sqrt",
            Mistake::NoEps => "no_eps",
            Mistake::DivideByVariance => "divide_by_variance",
            Mistake::AffineForgotten => "affine_forgotten",
            Mistake::WeightBiasSwapped => "weight_bias_swapped",
            Mistake::StatsPerSample => "stats_per_sample",
            Mistake::StatsOverAllElements => "stats_over_all_elements",
            Mistake::StatsOverBatchOnly => "stats_over_batch_only",
            Mistake::StatsOverSpatialOnly => "stats_over_spatial_only",
            Mistake::RunningStatsInTraining => "running_stats_in_training",
            Mistake::BatchStatsInEval => "batch_stats_in_eval",
            Mistake::BiasedRunningVar => "biased_running_var",
            Mistake::MomentumOneMinus => "momentum_one_minus",
            Mistake::KerasMomentum => "keras_momentum",
        }
    }

    fn group(self) -> Group {
        match self {
            Mistake::BiasedRunningVar | Mistake::MomentumOneMinus | Mistake::KerasMomentum => {
                Group::RunningStats
            }
            _ => Group::Normalization,
        }
    }

    /// The parts the mistake changes; it is tested only when the candidate
    /// sent one of them.
    fn changes(self) -> &'static [Part] {
        match self {
            Mistake::AffineForgotten | Mistake::WeightBiasSwapped => &[
                Part::Output,
                Part::GradInput,
                Part::GradWeight,
                Part::GradBias,
            ],
            Mistake::BiasedRunningVar => &[Part::RunningVar],
            Mistake::MomentumOneMinus | Mistake::KerasMomentum => {
                &[Part::RunningMean, Part::RunningVar]
            }
            // Σ grad_output (grad_bias) does not depend on the normalization.
            _ => &[Part::Output, Part::GradInput, Part::GradWeight],
        }
    }

    fn explanation(self) -> &'static str {
        match self {
            Mistake::UnbiasedVariance => "normalizes with the unbiased variance (Bessel's correction, divisor m-1, the default of torch.var and x.var(dim=...)); batch norm normalizes with the biased variance (divisor m)",
            Mistake::EpsOutsideSqrt => "adds eps to the standard deviation, (x - mean) / (sqrt(var) + eps), instead of inside the square root",
            Mistake::NoEps => "normalizes without eps: (x - mean) / sqrt(var)",
            Mistake::DivideByVariance => "divides by the variance, (x - mean) / (var + eps), instead of by the standard deviation",
            Mistake::AffineForgotten => "returns the normalized input without the affine transform (weight and bias never applied)",
            Mistake::WeightBiasSwapped => "swaps weight and bias: x_hat * bias + weight",
            Mistake::StatsPerSample => "computes mean and variance per sample over (C, *spatial), like LayerNorm, instead of per channel",
            Mistake::StatsOverAllElements => "computes one mean and one variance over the whole tensor instead of one per channel",
            Mistake::StatsOverBatchOnly => "reduces over the batch dimension only (x.mean(dim=0)), giving statistics per channel and position",
            Mistake::StatsOverSpatialOnly => "reduces over the spatial dimensions only, per sample and channel (instance norm)",
            Mistake::RunningStatsInTraining => "normalizes with the running statistics in train mode",
            Mistake::BatchStatsInEval => "normalizes with the batch statistics in eval mode",
            Mistake::BiasedRunningVar => "updates running_var with the biased batch variance; PyTorch uses the unbiased one (divisor m-1)",
            Mistake::MomentumOneMinus => "weights the batch statistics by 1 - momentum: running = momentum * running + (1 - momentum) * batch (momentum passed as 1 - m)",
            Mistake::KerasMomentum => "follows Keras: momentum (0.9, 0.99) is the weight of the old value, running = momentum * running + (1 - momentum) * batch, and the moving variance takes the biased variance",
        }
    }

    fn fix(self) -> &'static str {
        match self {
            Mistake::UnbiasedVariance => "normalize with x.var(dim=..., unbiased=False) (correction=0); the unbiased variance belongs only in the running_var update",
            Mistake::EpsOutsideSqrt | Mistake::NoEps | Mistake::DivideByVariance => {
                "divide by torch.sqrt(var + eps), with the layer's eps inside the square root"
            }
            Mistake::AffineForgotten => "finish with x_hat * weight + bias, weight and bias shaped (1, C, 1, ...)",
            Mistake::WeightBiasSwapped => "x_hat * weight + bias: weight scales, bias shifts",
            Mistake::StatsPerSample | Mistake::StatsOverAllElements => {
                "reduce over every dimension except the channels: dim=(0, 2, 3, ...), keepdim=True"
            }
            Mistake::StatsOverBatchOnly => "reduce over the batch and the spatial dimensions: dim=(0, 2, 3, ...), not dim=0",
            Mistake::StatsOverSpatialOnly => "include the batch dimension: dim=(0, 2, 3, ...)",
            Mistake::RunningStatsInTraining => "in train mode normalize with the batch statistics; the running statistics are for eval mode",
            Mistake::BatchStatsInEval => "in eval mode normalize with running_mean and running_var (module.eval())",
            Mistake::BiasedRunningVar => "update running_var with x.var(dim=..., unbiased=True) (correction=1)",
            Mistake::MomentumOneMinus => "running = (1 - momentum) * running + momentum * batch, PyTorch's convention",
            Mistake::KerasMomentum => "use PyTorch momentum = 1 - keras_momentum (0.99 -> 0.01) in running = (1 - momentum) * running + momentum * batch, and the unbiased variance for running_var",
        }
    }

    fn applies(self, problem: &Problem) -> bool {
        match self {
            Mistake::UnbiasedVariance | Mistake::StatsPerSample | Mistake::StatsOverAllElements => {
                problem.uses_batch_stats()
            }
            Mistake::EpsOutsideSqrt | Mistake::NoEps | Mistake::DivideByVariance => true,
            Mistake::AffineForgotten => problem.weight.is_some() || problem.bias.is_some(),
            Mistake::WeightBiasSwapped => problem.weight.is_some() && problem.bias.is_some(),
            Mistake::StatsOverBatchOnly | Mistake::StatsOverSpatialOnly => {
                problem.uses_batch_stats() && problem.rank() >= 3
            }
            Mistake::RunningStatsInTraining => problem.updates_running_stats(),
            Mistake::BatchStatsInEval => !problem.uses_batch_stats(),
            Mistake::BiasedRunningVar | Mistake::MomentumOneMinus | Mistake::KerasMomentum => {
                problem.updates_running_stats()
            }
        }
    }

    /// What input makes the mistake visible.
    fn separation(self, problem: &Problem) -> String {
        let m = problem.values_per_channel();
        let bessel = m as f64 / (m as f64 - 1.0);
        match self {
            Mistake::UnbiasedVariance => format!(
                "the unbiased variance is the biased one times m/(m-1) = {bessel:.6} here (m = {m} values per channel), a difference that vanishes as m grows; fewer values per channel separate them"
            ),
            Mistake::EpsOutsideSqrt => "where eps goes matters only when eps is not negligible beside the variance; a larger eps (e.g. 0.1) or input with a smaller variance separates them".to_owned(),
            Mistake::NoEps => "eps matters only when it is not negligible beside the variance; a larger eps (e.g. 0.1) or input with a smaller variance separates them".to_owned(),
            Mistake::DivideByVariance => "dividing by var + eps instead of its square root changes nothing where var + eps is 1; input whose variance is far from 1 (e.g. scaled by 3) separates them".to_owned(),
            Mistake::AffineForgotten => "the affine transform changes nothing while weight is all ones and bias all zeros (a fresh module); a weight other than 1 and a bias other than 0 separate them".to_owned(),
            Mistake::WeightBiasSwapped => "swapping changes nothing where weight equals bias; different weight and bias separate them".to_owned(),
            Mistake::StatsPerSample | Mistake::StatsOverAllElements => "channels with different means and scales separate them".to_owned(),
            Mistake::StatsOverBatchOnly => "spatial positions with different means and scales separate them".to_owned(),
            Mistake::StatsOverSpatialOnly => "samples with different means and scales separate them".to_owned(),
            Mistake::RunningStatsInTraining | Mistake::BatchStatsInEval => "running statistics far from the batch's separate them (a fresh 0 and 1 match standardized input)".to_owned(),
            Mistake::BiasedRunningVar => format!(
                "the two updates differ by momentum * var * (m/(m-1) - 1) with m/(m-1) = {bessel:.6} (m = {m}); a larger momentum or fewer values per channel separate them, and only candidate.running_var shows it"
            ),
            Mistake::MomentumOneMinus => format!(
                "1 - momentum equals momentum at 0.5 (this step's factor is {}), and no weight matters where the running statistics equal the batch's; another momentum and running statistics far from the batch's separate them",
                problem.factor
            ),
            Mistake::KerasMomentum => "beside momentum_one_minus it differs only in running_var (biased variance); candidate.running_var from a small batch, a momentum other than 0.5 and running statistics far from the batch's separate them".to_owned(),
        }
    }
}

/// The mistake simulated in float64: the parts of its group, gradients only
/// when `with_gradients`.
fn simulate(
    problem: &Problem,
    mistake: Mistake,
    with_gradients: bool,
) -> Result<Parts<Tensor>, NumericsError> {
    match mistake.group() {
        Group::Normalization => simulate_normalization(problem, mistake, with_gradients),
        Group::RunningStats => simulate_running_stats(problem, mistake),
    }
}

/// Mean and variance (keepdim) over `dims`, with a variance correction.
fn moments(x: &Tensor, dims: &[i64], correction: i64) -> Result<(Tensor, Tensor), NumericsError> {
    Ok((
        x.f_mean_dim(dims, true, None::<Kind>)?,
        x.f_var_correction(dims, correction, true)?,
    ))
}

fn simulate_normalization(
    problem: &Problem,
    mistake: Mistake,
    with_gradients: bool,
) -> Result<Parts<Tensor>, NumericsError> {
    let grad_output = problem.grad_output.as_ref().filter(|_| with_gradients);
    let leaf = |tensor: &Tensor| -> Result<Tensor, NumericsError> {
        Ok(tensor
            .f_detach()?
            .f_set_requires_grad(grad_output.is_some())?)
    };
    let x = leaf(&problem.x)?;
    let weight = problem.weight.as_ref().map(leaf).transpose()?;
    let bias = problem.bias.as_ref().map(leaf).transpose()?;
    let channel_shape = problem.channel_shape();
    let per_channel = |tensor: &Tensor| tensor.f_reshape(channel_shape.as_slice());
    let rank = problem.rank();
    let all: Vec<i64> = (0..rank).collect();
    let running = || -> Result<(Tensor, Tensor), NumericsError> {
        let (mean, var) = problem.running_stats()?;
        Ok((per_channel(mean)?, per_channel(var)?))
    };

    let (mean, var) = match mistake {
        Mistake::UnbiasedVariance => moments(&x, &problem.reduction_dims(), 1)?,
        Mistake::StatsPerSample => moments(&x, &all[1..], 0)?,
        Mistake::StatsOverAllElements => moments(&x, &all, 0)?,
        Mistake::StatsOverBatchOnly => moments(&x, &[0], 0)?,
        Mistake::StatsOverSpatialOnly => moments(&x, &all[2..], 0)?,
        Mistake::RunningStatsInTraining => running()?,
        Mistake::BatchStatsInEval => moments(&x, &problem.reduction_dims(), 0)?,
        _ if problem.uses_batch_stats() => moments(&x, &problem.reduction_dims(), 0)?,
        _ => running()?,
    };
    let centered = x.f_sub(&mean)?;
    let x_hat = match mistake {
        Mistake::EpsOutsideSqrt => centered.f_div(&var.f_sqrt()?.f_add_scalar(problem.eps)?)?,
        Mistake::NoEps => centered.f_div(&var.f_sqrt()?)?,
        Mistake::DivideByVariance => centered.f_div(&var.f_add_scalar(problem.eps)?)?,
        _ => centered.f_div(&var.f_add_scalar(problem.eps)?.f_sqrt()?)?,
    };
    let weight_b = weight.as_ref().map(per_channel).transpose()?;
    let bias_b = bias.as_ref().map(per_channel).transpose()?;
    let output = match (mistake, &weight_b, &bias_b) {
        (Mistake::AffineForgotten, _, _) => x_hat,
        (Mistake::WeightBiasSwapped, Some(weight), Some(bias)) => {
            x_hat.f_mul(bias)?.f_add(weight)?
        }
        _ => affine(&x_hat, weight_b.as_ref(), bias_b.as_ref())?,
    };
    let mut results = Parts::default();
    if let Some(grad_output) = grad_output {
        let grads = vector_jacobian(&output, grad_output, &x, weight.as_ref(), bias.as_ref())?;
        set_gradients(&mut results, grads);
    }
    results.set(Part::Output, output.f_detach()?);
    Ok(results)
}

fn simulate_running_stats(
    problem: &Problem,
    mistake: Mistake,
) -> Result<Parts<Tensor>, NumericsError> {
    let (running_mean, running_var) = problem.running_stats()?;
    let dims = problem.reduction_dims();
    let dims = dims.as_slice();
    let batch_mean = problem.x.f_mean_dim(dims, false, None::<Kind>)?;
    let (factor, correction) = match mistake {
        Mistake::BiasedRunningVar => (problem.factor, 0),
        Mistake::MomentumOneMinus => (1.0 - problem.factor, 1),
        Mistake::KerasMomentum => (1.0 - problem.factor, 0),
        _ => (problem.factor, 1),
    };
    let batch_var = problem.x.f_var_correction(dims, correction, false)?;
    let mut results = Parts::default();
    results.set(
        Part::RunningMean,
        moving_average(running_mean, &batch_mean, factor)?,
    );
    results.set(
        Part::RunningVar,
        moving_average(running_var, &batch_var, factor)?,
    );
    Ok(results)
}

/// A mistake after testing, before ranking.
struct Tested {
    mistake: Mistake,
    hypothesis: Hypothesis,
    /// Whether the candidate differs from the reference in this group.
    group_deviates: bool,
    /// Whether the simulation is within tolerance of the reference on the
    /// compared parts: this input cannot reveal the mistake.
    invisible: bool,
}

/// Tests every applicable mistake against `candidate` (tensors on the
/// problem's device, any dtype). `problem` is the float64 problem; `reference`
/// and `truth` are the native and float64 references.
pub(super) fn diagnose(
    problem: &Problem,
    candidate: &Parts<Tensor>,
    reference: &Parts<Tensor>,
    truth: &Parts<Tensor>,
    tolerance: Tolerance,
) -> Result<Diagnosis, NumericsError> {
    let compared = Compared {
        candidate,
        reference,
        truth,
        tolerance,
    };
    let groups = judge_groups(&compared)?;
    let mut tested = Vec::new();
    let mut untested: Vec<Mistake> = Vec::new();
    for mistake in Mistake::ALL {
        if !mistake.applies(problem) {
            continue;
        }
        if !mistake
            .changes()
            .iter()
            .any(|&part| candidate.get(part).is_some())
        {
            untested.push(mistake);
            continue;
        }
        tested.push(test_mistake(
            problem,
            mistake,
            &compared,
            &groups.deviating,
        )?);
    }
    rank(&mut tested);
    let ambiguities = ambiguities(problem, &tested, &groups.deviating, &untested);
    let summary = summary(&tested, &groups, candidate, tolerance);
    Ok(Diagnosis {
        matches_reference: groups.deviating.is_empty(),
        hypotheses: tested.into_iter().map(|t| t.hypothesis).collect(),
        ambiguities,
        summary,
    })
}

/// The candidate beside both references, and the tolerance they are judged by.
struct Compared<'a> {
    candidate: &'a Parts<Tensor>,
    reference: &'a Parts<Tensor>,
    truth: &'a Parts<Tensor>,
    tolerance: Tolerance,
}

impl Compared<'_> {
    /// The parts of `group` the candidate sent.
    fn sent(&self, group: Group) -> Vec<Part> {
        parts_sent(group, self.candidate)
    }

    /// (candidate, float64 reference, native reference) of one sent part.
    fn part(&self, part: Part) -> Result<(&Tensor, &Tensor, &Tensor), NumericsError> {
        match (
            self.candidate.get(part),
            self.truth.get(part),
            self.reference.get(part),
        ) {
            (Some(c), Some(t), Some(r)) => Ok((c, t, r)),
            _ => Err(NumericsError::Torch(format!(
                "no reference for candidate.{}",
                part.name()
            ))),
        }
    }
}

/// The groups the candidate sent parts of, judged against the references.
struct GroupVerdicts {
    /// A part matches neither reference, in checking order.
    deviating: Vec<Group>,
    matching: Vec<Group>,
    /// The largest difference from the float64 reference of each deviating
    /// group.
    worst: Vec<(Group, f64)>,
}

/// A group deviates when one of its parts matches neither reference.
fn judge_groups(compared: &Compared) -> Result<GroupVerdicts, NumericsError> {
    let mut verdicts = GroupVerdicts {
        deviating: Vec::new(),
        matching: Vec::new(),
        worst: Vec::new(),
    };
    for group in [Group::Normalization, Group::RunningStats] {
        let parts = compared.sent(group);
        if parts.is_empty() {
            continue;
        }
        let mut deviates = false;
        let mut max_diff: f64 = 0.0;
        for &part in &parts {
            let (c, t, r) = compared.part(part)?;
            let close = diff::tolerance_ratio(c, t, compared.tolerance)? <= 1.0
                || diff::tolerance_ratio(c, r, compared.tolerance)? <= 1.0;
            deviates |= !close;
            max_diff = max_diff.max(diff::max_abs_diff(c, t)?);
        }
        if deviates {
            verdicts.deviating.push(group);
            verdicts.worst.push((group, max_diff));
        } else {
            verdicts.matching.push(group);
        }
    }
    Ok(verdicts)
}

/// Simulates `mistake` and measures the candidate against the simulation on
/// the parts of its group the candidate sent.
fn test_mistake(
    problem: &Problem,
    mistake: Mistake,
    compared: &Compared,
    deviating: &[Group],
) -> Result<Tested, NumericsError> {
    let parts = compared.sent(mistake.group());
    let with_gradients = parts
        .iter()
        .any(|part| matches!(part, Part::GradInput | Part::GradWeight | Part::GradBias));
    let simulation = simulate(problem, mistake, with_gradients)?;
    let tolerance = compared.tolerance;
    let mut ratio: f64 = 0.0;
    let mut max_abs: f64 = 0.0;
    let mut invisible = true;
    for &part in &parts {
        let (c, t, _) = compared.part(part)?;
        let Some(s) = simulation.get(part) else {
            return Err(NumericsError::Torch(format!(
                "{} simulated no {}",
                mistake.name(),
                part.name()
            )));
        };
        ratio = ratio.max(diff::tolerance_ratio(c, s, tolerance)?);
        max_abs = max_abs.max(diff::max_abs_diff(c, s)?);
        invisible &= diff::tolerance_ratio(s, t, tolerance)? <= 1.0;
    }
    Ok(Tested {
        mistake,
        group_deviates: deviating.contains(&mistake.group()),
        invisible,
        hypothesis: Hypothesis {
            name: mistake.name(),
            max_abs_diff: max_abs,
            tolerance_ratio: ratio,
            explains: ratio <= 1.0,
            explanation: mistake.explanation(),
            fix: mistake.fix(),
            parts,
        },
    })
}

/// Mistakes of deviating groups first, then the closest to the candidate.
/// Stable sort: the catalogue order breaks the remaining ties.
fn rank(tested: &mut [Tested]) {
    tested.sort_by(|a, b| {
        b.group_deviates
            .cmp(&a.group_deviates)
            .then(total(
                a.hypothesis.tolerance_ratio,
                b.hypothesis.tolerance_ratio,
            ))
            .then(total(a.hypothesis.max_abs_diff, b.hypothesis.max_abs_diff))
    });
}

/// NaN-free ratios compare as numbers; a NaN (never produced) sorts last.
fn total(a: f64, b: f64) -> Ordering {
    a.partial_cmp(&b)
        .unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
}

fn names(mistakes: impl IntoIterator<Item = Mistake>) -> String {
    mistakes
        .into_iter()
        .map(Mistake::name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn part_names(parts: &[Part]) -> String {
    parts
        .iter()
        .map(|part| part.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What this input leaves open: mistakes that explain the same deviation,
/// mistakes it cannot reveal, mistakes the candidate's parts cannot test.
fn ambiguities(
    problem: &Problem,
    tested: &[Tested],
    deviating: &[Group],
    untested: &[Mistake],
) -> Vec<String> {
    let mut sentences = Vec::new();
    for &group in deviating {
        sentences.extend(rival_explanations(problem, tested, group));
    }
    for t in tested.iter().filter(|t| t.invisible) {
        sentences.push(format!(
            "{} cannot be told apart from the reference on this input: {}.",
            t.mistake.name(),
            t.mistake.separation(problem)
        ));
    }
    sentences.extend(untested_sentences(untested));
    sentences
}

/// The sentence naming two or more mistakes that all explain `group`'s
/// deviation, with how to separate them; none when fewer explain it.
fn rival_explanations(problem: &Problem, tested: &[Tested], group: Group) -> Option<String> {
    let explaining: Vec<&Tested> = tested
        .iter()
        .filter(|t| t.mistake.group() == group && t.hypothesis.explains)
        .collect();
    if explaining.len() < 2 {
        return None;
    }
    let hints: Vec<String> = explaining
        .iter()
        .map(|t| format!("{}: {}", t.mistake.name(), t.mistake.separation(problem)))
        .collect();
    Some(format!(
        "{} all explain the candidate's {} on this input. To separate them: {}.",
        names(explaining.iter().map(|t| t.mistake)),
        part_names(&explaining[0].hypothesis.parts),
        hints.join("; ")
    ))
}

/// One sentence per set of untested mistakes that change the same parts.
fn untested_sentences(untested: &[Mistake]) -> Vec<String> {
    let mut sentences = Vec::new();
    let mut remaining: Vec<Mistake> = untested.to_vec();
    while let Some(&first) = remaining.first() {
        let (same, rest): (Vec<Mistake>, Vec<Mistake>) = remaining
            .into_iter()
            .partition(|m| m.changes() == first.changes());
        let wanted: Vec<String> = first
            .changes()
            .iter()
            .map(|part| format!("candidate.{}", part.name()))
            .collect();
        sentences.push(format!(
            "Not tested: {} (changing only {}); send {} to test them.",
            names(same),
            part_names(first.changes()),
            wanted.join(" or ")
        ));
        remaining = rest;
    }
    sentences
}

/// The diagnosis in sentences: what deviates, the best explanation of each
/// deviating group, what matches.
fn summary(
    tested: &[Tested],
    groups: &GroupVerdicts,
    candidate: &Parts<Tensor>,
    tolerance: Tolerance,
) -> String {
    let sent = |group: Group| parts_sent(group, candidate);
    let within = format!(
        "within tolerance (rtol={:e}, atol={:e})",
        tolerance.rtol, tolerance.atol
    );
    if groups.deviating.is_empty() {
        let parts: Vec<Part> = groups.matching.iter().flat_map(|&g| sent(g)).collect();
        return summary_of_a_match(tested, &parts, &within);
    }
    let mut sentences = Vec::new();
    for &(group, max_diff) in &groups.worst {
        sentences.push(format!(
            "The candidate differs from the float64 reference in {} (max abs diff {max_diff:.3e}).",
            part_names(&sent(group))
        ));
        explain_group(tested, group, &within, &mut sentences);
    }
    for &group in &groups.matching {
        sentences.push(format!(
            "It matches the reference in {} {within}.",
            part_names(&sent(group))
        ));
    }
    sentences.join(" ")
}

/// The summary when every sent part matches: which parts, and which
/// mistakes this input could not have revealed.
fn summary_of_a_match(tested: &[Tested], parts: &[Part], within: &str) -> String {
    let mut sentences = vec![format!(
        "The candidate matches the reference in {} {within}.",
        part_names(parts)
    )];
    let invisible: Vec<Mistake> = tested
        .iter()
        .filter(|t| t.invisible)
        .map(|t| t.mistake)
        .collect();
    if !invisible.is_empty() {
        sentences.push(format!(
            "This input could not reveal {} (see ambiguities).",
            names(invisible)
        ));
    }
    sentences.join(" ")
}

/// The best explanation of a deviating group (`tested` is ranked), the
/// others equally consistent, or why none fits.
fn explain_group(tested: &[Tested], group: Group, within: &str, sentences: &mut Vec<String>) {
    let in_group: Vec<&Tested> = tested
        .iter()
        .filter(|t| t.mistake.group() == group)
        .collect();
    match in_group.first() {
        Some(best) if best.hypothesis.explains => {
            sentences.push(format!(
                "Best explanation: {}, which {}. Fix: {}.",
                best.mistake.name(),
                best.mistake.explanation(),
                best.mistake.fix()
            ));
            let others: Vec<Mistake> = in_group[1..]
                .iter()
                .filter(|t| t.hypothesis.explains)
                .map(|t| t.mistake)
                .collect();
            if !others.is_empty() {
                sentences.push(format!(
                    "Equally consistent on this input: {} (see ambiguities).",
                    names(others)
                ));
            }
        }
        Some(best) => sentences.push(format!(
            "No known mistake explains it {within}; the closest is {} ({:.3e} tolerances away).",
            best.mistake.name(),
            best.hypothesis.tolerance_ratio
        )),
        None => sentences.push("No known mistake applies to it.".to_owned()),
    }
}

/// The parts of `group` the candidate sent.
fn parts_sent(group: Group, candidate: &Parts<Tensor>) -> Vec<Part> {
    group
        .parts()
        .iter()
        .copied()
        .filter(|&part| candidate.get(part).is_some())
        .collect()
}
