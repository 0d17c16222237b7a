//! `torch.nn.BatchNorm{1,2,3}d` forward semantics.
//!
//! The module's `forward` in PyTorch 2.11 does, in order: the rank check
//! (`_check_input_dim`), `num_batches_tracked += 1` in train mode, the
//! one-value-per-channel check (`_verify_batch_size`), then ATen's
//! `batch_norm`, which returns early for empty input and otherwise checks the
//! channel count against the tensors it was given. We validate everything
//! first (and always check channels and dtypes), then compute on copies of the
//! running statistics, so a refused request leaves no trace.

use tch::Tensor;

use super::{python_float, torch_size, DType, NumericsError};

/// Which PyTorch module is reproduced: decides accepted ranks and texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// Input (N, C) or (N, C, L).
    BatchNorm1d,
    /// Input (N, C, H, W).
    BatchNorm2d,
    /// Input (N, C, D, H, W).
    BatchNorm3d,
}

impl LayerKind {
    /// The class name PyTorch uses in messages, e.g. "BatchNorm2d".
    pub fn module_name(self) -> &'static str {
        match self {
            LayerKind::BatchNorm1d => "BatchNorm1d",
            LayerKind::BatchNorm2d => "BatchNorm2d",
            LayerKind::BatchNorm3d => "BatchNorm3d",
        }
    }

    /// `_check_input_dim`, with PyTorch's text.
    pub fn check_rank(self, rank: usize) -> Result<(), NumericsError> {
        let (ok, expected) = match self {
            LayerKind::BatchNorm1d => (rank == 2 || rank == 3, "2D or 3D"),
            LayerKind::BatchNorm2d => (rank == 4, "4D"),
            LayerKind::BatchNorm3d => (rank == 5, "5D"),
        };
        if ok {
            Ok(())
        } else {
            Err(NumericsError::invalid(
                "input",
                format!("expected {expected} input (got {rank}D input)"),
            ))
        }
    }
}

/// How the running statistics are averaged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Momentum {
    /// `running = (1 - m) * running + m * batch`.
    Exponential(f64),
    /// PyTorch's `momentum=None`: factor `1 / num_batches_tracked`.
    CumulativeAverage,
}

impl Momentum {
    /// The exponential-average factor of a train step, given the counter
    /// after this step's increment (as the module computes it).
    pub fn factor(self, num_batches_tracked_after: i64) -> f64 {
        match self {
            Momentum::Exponential(m) => m,
            Momentum::CumulativeAverage => 1.0 / num_batches_tracked_after.max(1) as f64,
        }
    }
}

/// `eps` must be finite and positive (libtorch 2.11 refuses eps <= 0 at
/// forward time; we refuse it when it is set).
pub fn check_eps(field: &str, eps: f64) -> Result<(), NumericsError> {
    if eps.is_finite() && eps > 0.0 {
        Ok(())
    } else {
        Err(NumericsError::invalid(
            field,
            format!(
                "batch_norm eps must be positive, but got {}",
                python_float(eps)
            ),
        ))
    }
}

/// A momentum must be a finite number (PyTorch accepts any value; NaN or Inf
/// would silently destroy the running statistics).
pub fn check_momentum(field: &str, momentum: f64) -> Result<(), NumericsError> {
    if momentum.is_finite() {
        Ok(())
    } else {
        Err(NumericsError::invalid(
            field,
            format!("momentum must be finite, got {}", python_float(momentum)),
        ))
    }
}

/// A layer's tensors, borrowed. Each present tensor has shape (C,) and dtype
/// `param_dtype`, on the layer's device.
pub struct Layer<'a> {
    pub kind: LayerKind,
    pub num_features: i64,
    pub eps: f64,
    pub param_dtype: DType,
    pub weight: Option<&'a Tensor>,
    pub bias: Option<&'a Tensor>,
    pub running_mean: Option<&'a Tensor>,
    pub running_var: Option<&'a Tensor>,
}

impl Layer<'_> {
    fn tracks_running_stats(&self) -> bool {
        self.running_mean.is_some() && self.running_var.is_some()
    }

    fn has_parameters(&self) -> bool {
        self.weight.is_some() || self.bias.is_some() || self.tracks_running_stats()
    }

    /// Whether a forward in this mode normalizes with batch statistics: train
    /// mode, or any mode without running statistics.
    pub fn uses_batch_stats(&self, training: bool) -> bool {
        training || !self.tracks_running_stats()
    }

    /// Everything PyTorch checks (and what it skips but we check anyway),
    /// decided from the input's shape and dtype alone, before any data is
    /// touched.
    pub fn check_input(
        &self,
        shape: &[i64],
        dtype: DType,
        training: bool,
    ) -> Result<(), NumericsError> {
        self.kind.check_rank(shape.len())?;
        if self.uses_batch_stats(training) {
            let values_per_channel: i64 = shape[0] * shape[2..].iter().product::<i64>();
            if values_per_channel == 1 {
                return Err(NumericsError::invalid(
                    "input",
                    format!(
                        "Expected more than 1 value per channel when training, got input size {}",
                        torch_size(shape)
                    ),
                ));
            }
        }
        self.check_channels(shape[1])?;
        self.check_dtype(dtype)
    }

    /// ATen's `check_dims_match_num_input_features`, in ATen's order. ATen
    /// skips it for empty input and for layers without tensors; we do not.
    fn check_channels(&self, channels: i64) -> Result<(), NumericsError> {
        if channels == self.num_features {
            return Ok(());
        }
        let owner = if self.tracks_running_stats() {
            "running_mean"
        } else if self.weight.is_some() {
            "weight"
        } else if self.bias.is_some() {
            "bias"
        } else {
            return Err(NumericsError::invalid(
                "input",
                format!(
                    "expected input with {} channels (dimension 1), got {channels}",
                    self.num_features
                ),
            ));
        };
        Err(NumericsError::invalid(
            "input",
            format!(
                "{owner} should contain {channels} elements not {}",
                self.num_features
            ),
        ))
    }

    /// ATen's CPU mixed-dtype rule: float32 parameters accept float32,
    /// float16 and bfloat16 input; other parameters only their own dtype.
    fn check_dtype(&self, dtype: DType) -> Result<(), NumericsError> {
        if !self.has_parameters() || dtype == self.param_dtype {
            return Ok(());
        }
        let message = match (self.param_dtype, dtype) {
            (DType::Float32, DType::Float16 | DType::BFloat16) => return Ok(()),
            (DType::Float32, _) => "mixed dtype (CPU): all inputs must share same datatype.",
            _ => "mixed dtype (CPU): expect parameter to have scalar type of Float",
        };
        Err(NumericsError::invalid(
            "input",
            format!(
                "{message} (input is {}, the layer's parameters are {})",
                dtype.torch_name(),
                self.param_dtype.torch_name()
            ),
        ))
    }

    /// Eval mode with running statistics: normalize with them, change nothing.
    /// Input must have passed [`Layer::check_input`].
    pub fn forward_eval(&self, input: &Tensor) -> Result<Tensor, NumericsError> {
        if !self.tracks_running_stats() {
            return Ok(self.forward_train(input, 0.0)?.output);
        }
        Ok(input.f_batch_norm(
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            false,
            0.0,
            self.eps,
            true,
        )?)
    }

    /// Train mode: normalize with batch mean and biased variance; when
    /// statistics are tracked return the updated copies (the unbiased
    /// variance enters running_var). The layer's own tensors are not touched.
    pub fn forward_train(&self, input: &Tensor, factor: f64) -> Result<TrainStep, NumericsError> {
        let (running_mean, running_var) = match (self.running_mean, self.running_var) {
            (Some(mean), Some(var)) => (Some(deep_copy(mean)?), Some(deep_copy(var)?)),
            _ => (None, None),
        };
        let output = input.f_batch_norm(
            self.weight,
            self.bias,
            running_mean.as_ref(),
            running_var.as_ref(),
            true,
            factor,
            self.eps,
            true,
        )?;
        Ok(TrainStep {
            output,
            running_mean,
            running_var,
        })
    }
}

/// The result of a train-mode forward.
pub struct TrainStep {
    /// Input's shape and dtype.
    pub output: Tensor,
    /// Updated statistics, (C,), when the layer tracks them.
    pub running_mean: Option<Tensor>,
    pub running_var: Option<Tensor>,
}

/// A new tensor with its own storage holding `tensor`'s values.
pub fn deep_copy(tensor: &Tensor) -> Result<Tensor, NumericsError> {
    let mut copy = tensor.f_empty_like()?;
    copy.f_copy_(tensor)?;
    Ok(copy)
}

/// True when every element is finite (no NaN, no +-Inf).
pub fn all_finite(input: &Tensor) -> Result<bool, NumericsError> {
    if input.numel() == 0 {
        return Ok(true);
    }
    let finite = input.f_isfinite()?.f_all()?;
    Ok(finite.f_int64_value(&[])? != 0)
}
