//! The implementations Compare runs: libtorch's native batch norm (with
//! gradients from autograd) and the textbook formula written out with tensor
//! ops (with gradients in closed form).

use tch::{Kind, Tensor};

use super::{Part, Parts, Problem};
use crate::numerics::NumericsError;

/// Which variance normalizes in the textbook formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Variance {
    /// Divisor m: what batch norm does.
    Biased,
    /// Divisor m - 1 (Bessel's correction): the classic mistake.
    Unbiased,
}

impl Variance {
    fn correction(self) -> i64 {
        match self {
            Variance::Biased => 0,
            Variance::Unbiased => 1,
        }
    }
}

/// What `nn.BatchNorm` computes, in the problem's dtypes: libtorch's
/// `batch_norm` through [`crate::numerics::batch_norm::Layer`], the running
/// statistics updated on copies, and, given `grad_output`, the gradients from
/// autograd.
pub(super) fn native(problem: &Problem) -> Result<Parts<Tensor>, NumericsError> {
    let wants_grad = problem.grad_output.is_some();
    let leaf = |tensor: &Tensor| -> Result<Tensor, NumericsError> {
        Ok(tensor.f_detach()?.f_set_requires_grad(wants_grad)?)
    };
    let x = leaf(&problem.x)?;
    let weight = problem.weight.as_ref().map(leaf).transpose()?;
    let bias = problem.bias.as_ref().map(leaf).transpose()?;
    let layer = problem.layer(weight.as_ref(), bias.as_ref());
    let mut results = Parts::default();
    let output = if problem.training {
        let step = layer.forward_train(&x, problem.factor)?;
        if let (Some(mean), Some(var)) = (step.running_mean, step.running_var) {
            results.set(Part::RunningMean, mean);
            results.set(Part::RunningVar, var);
        }
        step.output
    } else {
        layer.forward_eval(&x)?
    };
    if let Some(grad_output) = &problem.grad_output {
        let grads = vector_jacobian(&output, grad_output, &x, weight.as_ref(), bias.as_ref())?;
        set_gradients(&mut results, grads);
    }
    results.set(Part::Output, output.f_detach()?);
    Ok(results)
}

/// Gradients of input, weight and bias (the latter two when present).
pub(super) struct Gradients {
    pub input: Tensor,
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
}

pub(super) fn set_gradients(results: &mut Parts<Tensor>, grads: Gradients) {
    results.set(Part::GradInput, grads.input);
    if let Some(grad) = grads.weight {
        results.set(Part::GradWeight, grad);
    }
    if let Some(grad) = grads.bias {
        results.set(Part::GradBias, grad);
    }
}

/// What `output.backward(grad_output)` leaves in the leaves' `.grad`: the
/// gradient of sum(output * grad_output), whose backward hands exactly
/// `grad_output` to `output`. A leaf the output does not depend on gets zeros
/// (autograd would leave its `.grad` as None).
pub(super) fn vector_jacobian(
    output: &Tensor,
    grad_output: &Tensor,
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Result<Gradients, NumericsError> {
    // Summed in float64 so that float16 products cannot overflow the scalar;
    // the backward casts the incoming 1 back to the output's dtype exactly.
    let objective = output.f_mul(grad_output)?.f_sum(Kind::Double)?;
    let mut leaves = vec![x];
    leaves.extend(weight);
    leaves.extend(bias);
    let grads = Tensor::f_run_backward(&[&objective], &leaves, false, false)?;
    let mut defined = Vec::with_capacity(grads.len());
    for (grad, leaf) in grads.into_iter().zip(&leaves) {
        defined.push(if grad.defined() {
            grad
        } else {
            leaf.f_zeros_like()?
        });
    }
    let mut grads = defined.into_iter();
    let missing = || NumericsError::Torch("autograd returned too few gradients".to_owned());
    let input = grads.next().ok_or_else(missing)?;
    let weight = match weight {
        Some(_) => Some(grads.next().ok_or_else(missing)?),
        None => None,
    };
    let bias = match bias {
        Some(_) => Some(grads.next().ok_or_else(missing)?),
        None => None,
    };
    Ok(Gradients {
        input,
        weight,
        bias,
    })
}

/// The textbook batch norm written out with tensor ops, in the input's dtype:
///
/// ```text
/// mean = x.mean(dims); var = x.var(dims, correction)   # dims = (0, 2, ...)
/// y = (x - mean) / sqrt(var + eps) * weight + bias
/// running_mean = (1 - f) * running_mean + f * mean
/// running_var  = (1 - f) * running_var  + f * x.var(dims, correction=1)
/// ```
///
/// (running statistics instead of batch ones in eval mode), with gradients in
/// closed form (x̂ = (x - mean) / σ, m values per channel, m' the variance's
/// divisor):
///
/// ```text
/// grad_bias   = Σ g
/// grad_weight = Σ g·x̂
/// grad_input  = weight/σ · (g - mean(g) - x̂ · Σ(g·x̂)/m')   # batch statistics
/// grad_input  = weight/σ · g                                # running statistics
/// ```
pub(super) fn manual(
    problem: &Problem,
    variance: Variance,
) -> Result<Parts<Tensor>, NumericsError> {
    let x = &problem.x;
    let kind = x.f_kind()?;
    let dims = problem.reduction_dims();
    let dims = dims.as_slice();
    let channel_shape = problem.channel_shape();
    // (C,) tensors broadcast over dimension 1, in the input's dtype.
    let per_channel = |tensor: &Tensor| -> Result<Tensor, NumericsError> {
        Ok(tensor
            .f_to_kind(kind)?
            .f_reshape(channel_shape.as_slice())?)
    };
    let weight = problem.weight.as_ref().map(per_channel).transpose()?;
    let bias = problem.bias.as_ref().map(per_channel).transpose()?;
    let (mean, var) = if problem.uses_batch_stats() {
        (
            x.f_mean_dim(dims, true, None::<Kind>)?,
            x.f_var_correction(dims, variance.correction(), true)?,
        )
    } else {
        let (mean, var) = problem.running_stats()?;
        (per_channel(mean)?, per_channel(var)?)
    };
    let std = var.f_add_scalar(problem.eps)?.f_sqrt()?;
    let x_hat = x.f_sub(&mean)?.f_div(&std)?;
    let mut results = Parts::default();
    results.set(
        Part::Output,
        affine(&x_hat, weight.as_ref(), bias.as_ref())?,
    );

    if problem.updates_running_stats() {
        let (running_mean, running_var) = manual_running_stats(problem)?;
        results.set(Part::RunningMean, running_mean);
        results.set(Part::RunningVar, running_var);
    }
    if let Some(g) = &problem.grad_output {
        let normalized = Normalized {
            x_hat: &x_hat,
            std: &std,
            weight: weight.as_ref(),
        };
        let grads = manual_gradients(problem, &g.f_to_kind(kind)?, &normalized, variance)?;
        set_gradients(&mut results, grads);
    }
    Ok(results)
}

/// The running statistics after this step (only called when they update):
/// running_var always takes the unbiased variance, whatever normalizes.
fn manual_running_stats(problem: &Problem) -> Result<(Tensor, Tensor), NumericsError> {
    let (running_mean, running_var) = problem.running_stats()?;
    let dims = problem.reduction_dims();
    let dims = dims.as_slice();
    let batch_mean = problem.x.f_mean_dim(dims, false, None::<Kind>)?;
    let batch_var = problem.x.f_var_correction(dims, 1, false)?;
    Ok((
        moving_average(running_mean, &batch_mean, problem.factor)?,
        moving_average(running_var, &batch_var, problem.factor)?,
    ))
}

/// What the forward pass of [`manual`] computed that its gradients reuse,
/// each broadcastable against the input, in the input's dtype.
struct Normalized<'a> {
    x_hat: &'a Tensor,
    /// sqrt(var + eps), (1, C, 1, ...).
    std: &'a Tensor,
    /// (1, C, 1, ...).
    weight: Option<&'a Tensor>,
}

/// The closed-form gradients of [`manual`] for `g` (grad_output in the
/// input's dtype); grad_weight and grad_bias in the parameters' dtypes.
fn manual_gradients(
    problem: &Problem,
    g: &Tensor,
    normalized: &Normalized,
    variance: Variance,
) -> Result<Gradients, NumericsError> {
    let dims = problem.reduction_dims();
    let dims = dims.as_slice();
    let x_hat = normalized.x_hat;
    let g_x_hat = g.f_mul(x_hat)?;
    let scale = match normalized.weight {
        Some(weight) => weight.f_div(normalized.std)?,
        None => normalized.std.f_reciprocal()?,
    };
    let grad_input = if problem.uses_batch_stats() {
        let m = problem.values_per_channel() as f64;
        let divisor = m - variance.correction() as f64;
        let centered_g = g.f_sub(&g.f_mean_dim(dims, true, None::<Kind>)?)?;
        let projection = x_hat.f_mul(
            &g_x_hat
                .f_sum_dim_intlist(dims, true, None::<Kind>)?
                .f_div_scalar(divisor)?,
        )?;
        centered_g.f_sub(&projection)?.f_mul(&scale)?
    } else {
        g.f_mul(&scale)?
    };
    let in_param_dtype = |grad: Tensor, like: &Option<Tensor>| match like {
        Some(param) => Ok::<_, NumericsError>(Some(grad.f_to_kind(param.f_kind()?)?)),
        None => Ok(None),
    };
    Ok(Gradients {
        input: grad_input,
        weight: in_param_dtype(
            g_x_hat.f_sum_dim_intlist(dims, false, None::<Kind>)?,
            &problem.weight,
        )?,
        bias: in_param_dtype(
            g.f_sum_dim_intlist(dims, false, None::<Kind>)?,
            &problem.bias,
        )?,
    })
}

/// x̂ · weight + bias, each factor only when present.
pub(super) fn affine(
    x_hat: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
) -> Result<Tensor, NumericsError> {
    let scaled = match weight {
        Some(weight) => x_hat.f_mul(weight)?,
        None => x_hat.shallow_clone(),
    };
    Ok(match bias {
        Some(bias) => scaled.f_add(bias)?,
        None => scaled,
    })
}

/// (1 - factor) · running + factor · batch, in the running tensor's dtype.
pub(super) fn moving_average(
    running: &Tensor,
    batch: &Tensor,
    factor: f64,
) -> Result<Tensor, NumericsError> {
    let batch = batch.f_to_kind(running.f_kind()?)?;
    Ok(running
        .f_mul_scalar(1.0 - factor)?
        .f_add(&batch.f_mul_scalar(factor)?)?)
}
