//! `torch.nn.BatchNorm{1,2,3}d` forward semantics.
//!
//! The module's `forward` in PyTorch 2.11 does, in order: the rank check
//! (`_check_input_dim`), `num_batches_tracked += 1` in train mode, the
//! one-value-per-channel check (`_verify_batch_size`), then ATen's
//! `batch_norm`, which returns early for empty input and otherwise checks the
//! channel count against the tensors it was given. We validate everything
//! first (and always check channels and dtypes), then compute on copies of the
//! running statistics, so a refused request leaves no trace.

use tch::{Device, Tensor};

use super::stats::{channel_stats, StatsKernel};
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
    /// Every layer kind; the reverse lookup searches it.
    pub const ALL: [LayerKind; 3] = [
        LayerKind::BatchNorm1d,
        LayerKind::BatchNorm2d,
        LayerKind::BatchNorm3d,
    ];

    /// The one table of layer kinds: (number in stored session records, a
    /// storage format that must never be reused; PyTorch's class name).
    const fn row(self) -> (u32, &'static str) {
        match self {
            LayerKind::BatchNorm1d => (1, "BatchNorm1d"),
            LayerKind::BatchNorm2d => (2, "BatchNorm2d"),
            LayerKind::BatchNorm3d => (3, "BatchNorm3d"),
        }
    }

    /// Its number in stored session records.
    pub fn code(self) -> u32 {
        self.row().0
    }

    /// The layer kind stored as `code`, if any.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.code() == code)
    }

    /// The class name PyTorch uses in messages, e.g. "BatchNorm2d".
    pub fn module_name(self) -> &'static str {
        self.row().1
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
    /// Who computes train-mode statistics on the CPU.
    pub stats: StatsKernel,
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
    /// ATen skips it for a layer without parameters or statistics; we do not
    /// (a session's dtype is part of its contract, as its channels are).
    fn check_dtype(&self, dtype: DType) -> Result<(), NumericsError> {
        if dtype == self.param_dtype {
            return Ok(());
        }
        let message = match (self.param_dtype, dtype) {
            (DType::Float32, DType::Float16 | DType::BFloat16) => return Ok(()),
            (DType::Float32, _) => "mixed dtype (CPU): all inputs must share same datatype.",
            _ => "mixed dtype (CPU): expect parameter to have scalar type of Float",
        };
        let layer = if self.has_parameters() {
            "the layer's parameters are"
        } else {
            "the layer has no parameters; its param_dtype is"
        };
        Err(NumericsError::invalid(
            "input",
            format!(
                "{message} (input is {}, {layer} {})",
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

    /// [`forward_eval`](Self::forward_eval) written into `out` (the input's
    /// shape and dtype, contiguous, on the CPU, not overlapping the input)
    /// instead of a new tensor; the same numbers.
    pub fn forward_eval_into(&self, input: &Tensor, out: &Tensor) -> Result<(), NumericsError> {
        check_out(input, out)?;
        if !self.tracks_running_stats() {
            self.train(input, 0.0, Some(out))?;
            return Ok(());
        }
        self.batch_norm_out(input, out, self.running_mean, self.running_var, false, 0.0)
    }

    /// Train mode: normalize with batch mean and biased variance; when
    /// statistics are tracked return the updated copies (the unbiased
    /// variance enters running_var). The layer's own tensors are not touched.
    pub fn forward_train(&self, input: &Tensor, factor: f64) -> Result<TrainStep, NumericsError> {
        let (output, stats) = self.train(input, factor, None)?;
        let Some(output) = output else {
            return Err(NumericsError::Torch(
                "internal: a train step without its output".into(),
            ));
        };
        Ok(TrainStep {
            output,
            running_mean: stats.running_mean,
            running_var: stats.running_var,
        })
    }

    /// [`forward_train`](Self::forward_train) with the output written into
    /// `out` (the input's shape and dtype, contiguous, on the CPU, not
    /// overlapping the input) instead of a new tensor: the same numbers, and
    /// the updated copies of the running statistics.
    pub fn forward_train_into(
        &self,
        input: &Tensor,
        factor: f64,
        out: &Tensor,
    ) -> Result<RunningStats, NumericsError> {
        check_out(input, out)?;
        Ok(self.train(input, factor, Some(out))?.1)
    }

    /// A train step: the output in a new tensor (`out` None, returned) or
    /// written into `out` (checked by the caller; None returned).
    fn train(
        &self,
        input: &Tensor,
        factor: f64,
        out: Option<&Tensor>,
    ) -> Result<Trained, NumericsError> {
        if self.stats == StatsKernel::Native && self.param_dtype == DType::Float32 {
            if let Some(step) = self.forward_train_native(input, factor, out)? {
                return Ok(step);
            }
        }
        let (running_mean, running_var) = match (self.running_mean, self.running_var) {
            (Some(mean), Some(var)) => (Some(deep_copy(mean)?), Some(deep_copy(var)?)),
            _ => (None, None),
        };
        let output = match out {
            None => Some(input.f_batch_norm(
                self.weight,
                self.bias,
                running_mean.as_ref(),
                running_var.as_ref(),
                true,
                factor,
                self.eps,
                true,
            )?),
            Some(out) => {
                self.batch_norm_out(
                    input,
                    out,
                    running_mean.as_ref(),
                    running_var.as_ref(),
                    true,
                    factor,
                )?;
                None
            }
        };
        Ok((
            output,
            RunningStats {
                running_mean,
                running_var,
            },
        ))
    }

    /// libtorch's batch norm writing into `out`: `native_batch_norm_out`,
    /// the kernel `batch_norm` reaches on the CPU (the same numbers; its
    /// per-channel batch statistics, which a forward does not return, go to
    /// scratch tensors of the dtype `batch_norm` gives them).
    fn batch_norm_out(
        &self,
        input: &Tensor,
        out: &Tensor,
        running_mean: Option<&Tensor>,
        running_var: Option<&Tensor>,
        training: bool,
        factor: f64,
    ) -> Result<(), NumericsError> {
        if input.numel() == 0 {
            // batch_norm returns early for an empty input, where
            // native_batch_norm refuses one in train mode: nothing to write,
            // the statistics left as batch_norm leaves them.
            let _empty = input.f_batch_norm(
                self.weight,
                self.bias,
                running_mean,
                running_var,
                training,
                factor,
                self.eps,
                true,
            )?;
            return Ok(());
        }
        // batch_norm's rule: the first parameter's dtype when the layer has
        // one (float32 beside half inputs: the mixed-precision kernel), the
        // input's otherwise.
        let stats_kind = match [self.weight, self.bias, running_mean, running_var]
            .into_iter()
            .flatten()
            .next()
        {
            Some(parameter) => parameter.f_kind()?,
            None => input.f_kind()?,
        };
        let scratch = || Tensor::f_empty([0], (stats_kind, input.device()));
        let (save_mean, save_invstd) = (scratch()?, scratch()?);
        // The results are handles of `out` and the scratch tensors: dropped
        // here, so nothing keeps a view of `out` past the call.
        let (_output, _mean, _invstd) = input.f_native_batch_norm_out(
            out,
            &save_mean,
            &save_invstd,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            training,
            factor,
            self.eps,
        )?;
        Ok(())
    }
}

/// An output tensor given for a forward must be exactly what the forward
/// would allocate: the input's shape and dtype, contiguous, on the CPU, in
/// memory of its own (a kernel must never read values it already replaced).
fn check_out(input: &Tensor, out: &Tensor) -> Result<(), NumericsError> {
    let fits = out.size() == input.size()
        && out.f_kind()? == input.f_kind()?
        && out.device() == Device::Cpu
        && input.device() == Device::Cpu
        && out.is_contiguous();
    if !fits {
        return Err(NumericsError::Torch(format!(
            "internal: an output of {:?} {:?} for an input of {:?} {:?}",
            out.size(),
            out.f_kind()?,
            input.size(),
            input.f_kind()?
        )));
    }
    if super::host::shares_memory(input, out)? {
        return Err(NumericsError::Torch(
            "internal: the output given overlaps the input".into(),
        ));
    }
    Ok(())
}

impl Layer<'_> {
    /// Train mode with [`channel_stats`] for contiguous float32 CPU inputs of
    /// rank 3 to 5 (those libtorch reduces with its scalar loop): statistics,
    /// normalization and the running-statistics update done the way libtorch
    /// does them, in the same precisions. The output in a new tensor, or
    /// written into `out` (then None). `None` for any other input.
    fn forward_train_native(
        &self,
        input: &Tensor,
        factor: f64,
        out: Option<&Tensor>,
    ) -> Result<Option<Trained>, NumericsError> {
        let size = input.size();
        let (Some(&channels), Some(&batch)) = (size.get(1), size.first()) else {
            return Ok(None);
        };
        let inner: i64 = size[2..].iter().product();
        // (N, C) inputs: libtorch's channels-last kernel is vectorized
        // already, and sums differently (its numbers are what we match).
        if size.len() < 3 {
            return Ok(None);
        }
        let (Ok(channels_usize), Ok(inner_usize)) =
            (usize::try_from(channels), usize::try_from(inner))
        else {
            return Ok(None);
        };
        let Some((means, deviations)) = super::host::with_f32_values(input, |values| {
            channel_stats(values, channels_usize, inner_usize)
        })?
        else {
            return Ok(None);
        };
        let count = (batch * inner) as f64;
        // As libtorch's train-mode transform: the variance var_sum / n in
        // float, invstd from it in double, stored as float (computing the
        // variance in double instead is off by an ulp of invstd now and
        // then, which a channel whose spread is tiny against its mean turns
        // into ~1e-3 of output); then per channel alpha = invstd * weight
        // and beta = bias - mean * alpha in float; output = x * alpha + beta.
        let weight = match self.weight {
            Some(w) => Some(Vec::<f32>::try_from(w)?),
            None => None,
        };
        let bias = match self.bias {
            Some(b) => Some(Vec::<f32>::try_from(b)?),
            None => None,
        };
        let mut alpha = Vec::with_capacity(channels_usize);
        let mut beta = Vec::with_capacity(channels_usize);
        for c in 0..channels_usize {
            let var = deviations[c] / count as f32;
            let invstd = (1.0 / (f64::from(var) + self.eps).sqrt()) as f32;
            let a = invstd * weight.as_ref().map_or(1.0, |w| w[c]);
            alpha.push(a);
            beta.push(bias.as_ref().map_or(0.0, |b| b[c]) - means[c] * a);
        }
        let output = match out {
            None => {
                let output = super::host::with_f32_values(input, |values| {
                    super::host::new_f32_tensor(&size, |out| {
                        apply_affine(values, out, &alpha, &beta, inner_usize)
                    })
                })?
                .transpose()?;
                let Some(output) = output else {
                    return Ok(None);
                };
                Some(output)
            }
            Some(out) => {
                // `out` does not overlap the input (check_out).
                let written = super::host::with_f32_values(input, |values| {
                    super::host::with_f32_values_mut(out, |out| {
                        apply_affine(values, out, &alpha, &beta, inner_usize)
                    })
                })?
                .transpose()?
                .flatten();
                if written.is_none() {
                    return Ok(None);
                }
                None
            }
        };
        let (running_mean, running_var) = match (self.running_mean, self.running_var) {
            (Some(old_mean), Some(old_var)) => {
                let old_mean = Vec::<f32>::try_from(old_mean)?;
                let old_var = Vec::<f32>::try_from(old_var)?;
                // As libtorch's update (batch_norm_cpu_update_stats_template):
                // the momentum is cast to float and the mean updated in float;
                // the unbiased variance is var_sum / (n - 1) in float, and the
                // variance update adds momentum * unbiased in double to the
                // float product (1 - momentum) * old. Doing it all in double
                // drifts from PyTorch by ~1 ulp per step: with
                // momentum=None, 3.7e-5 after 20,000 steps.
                let momentum = factor as f32;
                let keep = 1.0f32 - momentum;
                let mean: Vec<f32> = means
                    .iter()
                    .zip(&old_mean)
                    .map(|(&m, &old)| momentum * m + keep * old)
                    .collect();
                let var: Vec<f32> = deviations
                    .iter()
                    .zip(&old_var)
                    .map(|(&m2, &old)| {
                        let unbiased = m2 / (count - 1.0) as f32;
                        (f64::from(momentum) * f64::from(unbiased) + f64::from(keep * old)) as f32
                    })
                    .collect();
                (
                    Some(Tensor::f_from_slice(&mean)?),
                    Some(Tensor::f_from_slice(&var)?),
                )
            }
            _ => (None, None),
        };
        Ok(Some((
            output,
            RunningStats {
                running_mean,
                running_var,
            },
        )))
    }
}

/// `out = x * alpha[c] + beta[c]` over a contiguous (N, C, inner) buffer.
/// `out = x * alpha + beta` per channel, as libtorch's CPU kernel computes
/// it: fused (one rounding, FMA) on CPUs with AVX2 and FMA, whose kernels
/// libtorch runs, unfused elsewhere. The two differ by up to an ulp of
/// `x * alpha`, which is ~1e-3 of output where a channel's spread is tiny
/// against its mean.
fn apply_affine(values: &[f32], out: &mut [f32], alpha: &[f32], beta: &[f32], inner: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the function only needs the CPU features it enables, and
        // this CPU has them (checked just above); it is otherwise safe code.
        #[allow(unsafe_code)]
        return unsafe { apply_affine_fused(values, out, alpha, beta, inner) };
    }
    affine_planes(values, out, alpha, beta, inner, |x, a, b| x * a + b);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn apply_affine_fused(values: &[f32], out: &mut [f32], alpha: &[f32], beta: &[f32], inner: usize) {
    affine_planes(values, out, alpha, beta, inner, |x, a, b| x.mul_add(a, b));
}

/// The planes of a contiguous (N, C, inner) buffer, each with its channel's
/// (alpha, beta), through `affine`.
#[inline(always)]
fn affine_planes(
    values: &[f32],
    out: &mut [f32],
    alpha: &[f32],
    beta: &[f32],
    inner: usize,
    affine: impl Fn(f32, f32, f32) -> f32,
) {
    let channels = alpha.len();
    if channels == 0 || inner == 0 {
        return;
    }
    for (i, (plane_in, plane_out)) in values
        .chunks_exact(inner)
        .zip(out.chunks_exact_mut(inner))
        .enumerate()
    {
        let (a, b) = (alpha[i % channels], beta[i % channels]);
        for (y, &x) in plane_out.iter_mut().zip(plane_in) {
            *y = affine(x, a, b);
        }
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

/// A train step's output (None when written into a given tensor) and
/// running statistics.
type Trained = (Option<Tensor>, RunningStats);

/// The running statistics a train step leaves: updated copies, (C,), when
/// the layer tracks them.
pub struct RunningStats {
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

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::numerics::LayerKind;

    #[test]
    fn layer_kinds_read_back_from_their_stored_codes() {
        for kind in LayerKind::ALL {
            assert_eq!(LayerKind::from_code(kind.code()), Some(kind));
        }
        // Stored records depend on these numbers.
        let codes: Vec<u32> = LayerKind::ALL.into_iter().map(LayerKind::code).collect();
        assert_eq!(codes, [1, 2, 3]);
        assert_eq!(LayerKind::from_code(0), None);
    }

    fn layer<'a>(
        kind: LayerKind,
        channels: i64,
        params: &'a [Tensor; 4],
        stats: StatsKernel,
    ) -> Layer<'a> {
        Layer {
            kind,
            num_features: channels,
            eps: 1e-5,
            param_dtype: DType::Float32,
            weight: Some(&params[0]),
            bias: Some(&params[1]),
            running_mean: Some(&params[2]),
            running_var: Some(&params[3]),
            stats,
        }
    }

    fn close(a: &Tensor, b: &Tensor, rtol: f64, atol: f64) -> bool {
        a.allclose(b, rtol, atol, false)
    }

    /// The native statistics kernel against libtorch's own train-mode batch
    /// norm (the oracle: what nn.BatchNorm computes), over 1d/2d/3d shapes,
    /// offsets and scales that stress a naive one-pass variance.
    #[test]
    fn native_statistics_match_libtorch() {
        tch::manual_seed(7);
        let cases: [(LayerKind, &[i64]); 7] = [
            (LayerKind::BatchNorm1d, &[2, 3]),
            (LayerKind::BatchNorm1d, &[4096, 64]),
            (LayerKind::BatchNorm1d, &[5, 7, 13]),
            (LayerKind::BatchNorm2d, &[2, 3, 1, 1]),
            (LayerKind::BatchNorm2d, &[8, 16, 9, 11]),
            (LayerKind::BatchNorm2d, &[64, 64, 8, 8]),
            (LayerKind::BatchNorm3d, &[2, 4, 3, 5, 7]),
        ];
        for (kind, shape) in cases {
            for (offset, scale) in [(0.0, 1.0), (1000.0, 0.01), (-3.0, 50.0)] {
                let c = shape[1];
                let options = (Kind::Float, Device::Cpu);
                let input = Tensor::randn(shape, options) * scale + offset;
                let params = [
                    Tensor::rand([c], options) + 0.5,
                    Tensor::randn([c], options),
                    Tensor::randn([c], options),
                    Tensor::rand([c], options) + 0.1,
                ];
                for factor in [0.1, 1.0, 0.0] {
                    let expected = layer(kind, c, &params, StatsKernel::Libtorch)
                        .forward_train(&input, factor)
                        .unwrap();
                    let actual = layer(kind, c, &params, StatsKernel::Native)
                        .forward_train(&input, factor)
                        .unwrap();
                    let what = format!("{shape:?} offset {offset} scale {scale} factor {factor}");
                    // output = x * alpha + beta in float: with |x * alpha| far
                    // above the result (a large offset, a small spread) any
                    // one-ulp change of alpha moves it by ~ulp(x * alpha).
                    let conditioning = offset / scale;
                    let atol = 1e-5 + 4.0 * f64::from(f32::EPSILON) * conditioning.abs();
                    let diff = (&actual.output - &expected.output)
                        .abs()
                        .max()
                        .double_value(&[]);
                    assert!(
                        close(&actual.output, &expected.output, 1e-4, atol),
                        "output {what}: max diff {diff}"
                    );
                    for (a, e) in [
                        (&actual.running_mean, &expected.running_mean),
                        (&actual.running_var, &expected.running_var),
                    ] {
                        let (a, e) = (a.as_ref().unwrap(), e.as_ref().unwrap());
                        assert!(
                            close(a, e, 1e-5, 1e-6),
                            "running stats {what}: {a:?} vs {e:?}"
                        );
                    }
                }
            }
        }
    }

    /// Outputs written into a given tensor are libtorch's functional
    /// batch_norm's (what nn.BatchNorm computes; its running statistics
    /// updated in place on copies), bit for bit on libtorch's kernels and
    /// within the native kernel's tolerance on it; train and eval, 1d to 3d,
    /// float32, float64 and half inputs of float32 layers.
    #[test]
    fn outputs_written_into_a_given_tensor_are_libtorchs() {
        tch::manual_seed(11);
        let cases: [(LayerKind, &[i64], Kind, Kind); 6] = [
            (
                LayerKind::BatchNorm1d,
                &[4096, 64],
                Kind::Float,
                Kind::Float,
            ),
            (
                LayerKind::BatchNorm1d,
                &[5, 7, 13],
                Kind::Float,
                Kind::Float,
            ),
            (
                LayerKind::BatchNorm2d,
                &[8, 16, 9, 11],
                Kind::Float,
                Kind::Float,
            ),
            (
                LayerKind::BatchNorm3d,
                &[2, 4, 3, 5, 7],
                Kind::Double,
                Kind::Double,
            ),
            (LayerKind::BatchNorm1d, &[64, 8], Kind::Half, Kind::Float),
            (
                LayerKind::BatchNorm2d,
                &[4, 3, 5, 5],
                Kind::BFloat16,
                Kind::Float,
            ),
        ];
        for (kind, shape, input_kind, param_kind) in cases {
            let c = shape[1];
            let options = (param_kind, Device::Cpu);
            let input =
                (Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 3.0 + 1.0).to_kind(input_kind);
            let params = [
                Tensor::rand([c], options) + 0.5,
                Tensor::randn([c], options),
                Tensor::randn([c], options),
                Tensor::rand([c], options) + 0.1,
            ];
            let original = params.each_ref().map(|t| t.copy());
            let param_dtype = DType::from_kind(param_kind).unwrap();
            for stats in [StatsKernel::Libtorch, StatsKernel::Native] {
                let layer = Layer {
                    param_dtype,
                    ..layer(kind, c, &params, stats)
                };
                let what = format!("{shape:?} {input_kind:?} {stats:?}");
                // The oracle: libtorch's batch_norm on copies of the statistics.
                let (mean, var) = (params[2].copy(), params[3].copy());
                let expected = input.batch_norm(
                    Some(&params[0]),
                    Some(&params[1]),
                    Some(&mean),
                    Some(&var),
                    true,
                    0.1,
                    1e-5,
                    true,
                );
                let out = input.empty_like();
                let running = layer.forward_train_into(&input, 0.1, &out).unwrap();
                let native =
                    stats == StatsKernel::Native && input_kind == Kind::Float && shape.len() > 2;
                if native {
                    assert!(close(&out, &expected, 1e-4, 1e-4), "train {what}");
                } else {
                    assert!(out.equal(&expected), "train {what}");
                }
                for (got, want) in [(&running.running_mean, &mean), (&running.running_var, &var)] {
                    assert!(
                        close(got.as_ref().unwrap(), want, 1e-5, 1e-6),
                        "stats {what}"
                    );
                }
                let expected = input.batch_norm(
                    Some(&params[0]),
                    Some(&params[1]),
                    Some(&params[2]),
                    Some(&params[3]),
                    false,
                    0.0,
                    1e-5,
                    true,
                );
                let out = input.empty_like();
                layer.forward_eval_into(&input, &out).unwrap();
                assert!(out.equal(&expected), "eval {what}");
                // The layer's own tensors are untouched.
                for (now, before) in params.iter().zip(&original) {
                    assert!(now.equal(before), "parameters {what}");
                }
            }
        }
    }

    /// An empty input writes nothing and leaves the statistics as
    /// libtorch's batch_norm does (which returns early for it).
    #[test]
    fn empty_inputs_write_nothing_into_a_given_tensor() {
        let options = (Kind::Float, Device::Cpu);
        let params = [
            Tensor::ones([3], options),
            Tensor::zeros([3], options),
            Tensor::randn([3], options),
            Tensor::rand([3], options) + 0.5,
        ];
        for shape in [&[0i64, 3][..], &[0, 3, 4], &[2, 3, 0]] {
            let input = Tensor::zeros(shape, options);
            let (mean, var) = (params[2].copy(), params[3].copy());
            let _ = input.batch_norm(
                Some(&params[0]),
                Some(&params[1]),
                Some(&mean),
                Some(&var),
                true,
                0.1,
                1e-5,
                true,
            );
            for stats in [StatsKernel::Libtorch, StatsKernel::Native] {
                let layer = layer(LayerKind::BatchNorm1d, 3, &params, stats);
                let out = input.empty_like();
                let running = layer.forward_train_into(&input, 0.1, &out).unwrap();
                assert!(running.running_mean.unwrap().equal(&mean), "{shape:?}");
                assert!(running.running_var.unwrap().equal(&var), "{shape:?}");
                layer.forward_eval_into(&input, &out).unwrap();
            }
        }
    }

    /// An output tensor sharing the input's memory, or not the input's
    /// shape and dtype, is refused before anything is written.
    #[test]
    fn an_output_tensor_must_be_apart_from_the_input_and_alike() {
        let options = (Kind::Float, Device::Cpu);
        let params = [
            Tensor::ones([3], options),
            Tensor::zeros([3], options),
            Tensor::zeros([3], options),
            Tensor::ones([3], options),
        ];
        let layer = layer(LayerKind::BatchNorm1d, 3, &params, StatsKernel::Libtorch);
        let input = Tensor::randn([8, 3], options);
        let before = input.copy();
        let same = input.shallow_clone();
        let err = layer.forward_train_into(&input, 0.1, &same).err().unwrap();
        assert!(err.to_string().contains("overlaps"), "{err}");
        assert!(input.equal(&before));
        let wrong = Tensor::zeros([8, 3], (Kind::Double, Device::Cpu));
        assert!(layer.forward_eval_into(&input, &wrong).is_err());
        assert!(wrong.equal(&Tensor::zeros([8, 3], (Kind::Double, Device::Cpu))));
    }

    /// Inputs the native kernel does not handle take libtorch's path.
    #[test]
    fn native_falls_back_for_other_dtypes() {
        let c = 3;
        let options = (Kind::Float, Device::Cpu);
        let params = [
            Tensor::ones([c], options),
            Tensor::zeros([c], options),
            Tensor::zeros([c], options),
            Tensor::ones([c], options),
        ];
        let params = params.each_ref().map(|t| t.to_kind(Kind::Double));
        let input = Tensor::randn([4, c], (Kind::Double, Device::Cpu));
        let double = |stats| Layer {
            param_dtype: DType::Float64,
            ..layer(LayerKind::BatchNorm1d, c, &params, stats)
        };
        let expected = double(StatsKernel::Libtorch)
            .forward_train(&input, 0.1)
            .unwrap();
        let actual = double(StatsKernel::Native)
            .forward_train(&input, 0.1)
            .unwrap();
        assert!(actual.output.equal(&expected.output));
    }
}
