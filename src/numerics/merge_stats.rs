//! The statistics of a batch split into shards: each shard's per-channel
//! (count, mean, M2) in float64, merged in shard order (Chan, Golub and
//! LeVeque's pairwise update), so that the global mean and variance do not
//! depend on which shard arrived first and only three numbers per channel
//! per shard ever leave the place that holds the shard. Then what
//! `nn.BatchNorm*d` in train mode does with the global statistics: the
//! per-channel transform of each shard and the running-statistics update.
//!
//! Pure math on tensors and slices: no sessions, no I/O.

use tch::{Kind, Tensor};

use super::{torch_size, NumericsError};

/// One shard's per-channel statistics: `count` values per channel, their
/// `mean` and the sum of squared deviations from it (`m2`), in float64.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardStats {
    pub count: i64,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

/// The statistics of the global batch (all shards), per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalStats {
    /// Values per channel over all shards.
    pub count: i64,
    pub mean: Vec<f64>,
    /// Biased variance, M2 / count: what normalizes the batch.
    pub var: Vec<f64>,
    /// Unbiased variance, M2 / (count - 1): what updates running_var (NaN
    /// when count == 1, as 0 / 0).
    pub unbiased_var: Vec<f64>,
}

impl ShardStats {
    /// No values in `channels` channels (an empty shard).
    pub fn empty(channels: usize) -> ShardStats {
        ShardStats {
            count: 0,
            mean: vec![0.0; channels],
            m2: vec![0.0; channels],
        }
    }

    /// The statistics of `input`, (N, C, *) of any floating dtype, computed
    /// in float64 in two passes (the mean, then the squared deviations from
    /// it).
    pub fn of(input: &Tensor) -> Result<ShardStats, NumericsError> {
        let size = input.size();
        let Some(&channels) = size.get(1) else {
            return Err(NumericsError::invalid(
                "input",
                format!("expected at least 2 dimensions, got {}", torch_size(&size)),
            ));
        };
        let channels_usize = usize::try_from(channels).unwrap_or(0);
        let count: i64 = size[0] * size[2..].iter().product::<i64>();
        if count == 0 {
            return Ok(ShardStats::empty(channels_usize));
        }
        let inner = usize::try_from(size[2..].iter().product::<i64>()).unwrap_or(0);
        // Contiguous float32 on the CPU (the common case): two passes over
        // the values in place, with no float64 copy of the shard.
        if let Some((mean, m2)) = super::host::with_f32_values(input, |values| {
            native_two_pass(values, channels_usize, inner)
        })? {
            return Ok(ShardStats { count, mean, m2 });
        }
        // (C, count): channel-major, so both passes reduce along dim 1.
        let by_channel = input
            .f_to_kind(Kind::Double)?
            .f_transpose(0, 1)?
            .f_reshape([channels, -1])?;
        let mean = by_channel.f_mean_dim(Some([1i64].as_slice()), true, Kind::Double)?;
        let m2 = by_channel.f_sub(&mean)?.f_square()?.f_sum_dim_intlist(
            Some([1i64].as_slice()),
            false,
            Kind::Double,
        )?;
        Ok(ShardStats {
            count,
            mean: Vec::<f64>::try_from(mean.f_reshape([-1])?)?,
            m2: Vec::<f64>::try_from(m2)?,
        })
    }

    /// Adds `other` (the next shard in order) to `self`.
    pub fn absorb(&mut self, other: &ShardStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = other.clone();
            return;
        }
        let (na, nb) = (self.count as f64, other.count as f64);
        let n = na + nb;
        for c in 0..self.mean.len().min(other.mean.len()) {
            let delta = other.mean[c] - self.mean[c];
            self.mean[c] += delta * nb / n;
            self.m2[c] += other.m2[c] + delta * delta * na * nb / n;
        }
        self.count += other.count;
    }
}

/// Per-channel mean and M2 of a contiguous (N, C, inner) float32 buffer,
/// accumulated in float64: the mean first, then the squared deviations.
fn native_two_pass(values: &[f32], channels: usize, inner: usize) -> (Vec<f64>, Vec<f64>) {
    let mut mean = vec![0f64; channels];
    let mut m2 = vec![0f64; channels];
    if channels == 0 || inner == 0 {
        return (mean, m2);
    }
    let count = (values.len() / channels) as f64;
    if inner == 1 {
        for row in values.chunks_exact(channels) {
            for (sum, &x) in mean.iter_mut().zip(row) {
                *sum += f64::from(x);
            }
        }
    } else {
        for (i, plane) in values.chunks_exact(inner).enumerate() {
            mean[i % channels] += plane.iter().map(|&x| f64::from(x)).sum::<f64>();
        }
    }
    mean.iter_mut().for_each(|m| *m /= count);
    if inner == 1 {
        for row in values.chunks_exact(channels) {
            for ((sum, &x), m) in m2.iter_mut().zip(row).zip(&mean) {
                let d = f64::from(x) - m;
                *sum += d * d;
            }
        }
    } else {
        for (i, plane) in values.chunks_exact(inner).enumerate() {
            let m = mean[i % channels];
            m2[i % channels] += plane
                .iter()
                .map(|&x| {
                    let d = f64::from(x) - m;
                    d * d
                })
                .sum::<f64>();
        }
    }
    (mean, m2)
}

/// The shards' statistics merged in the order given (rank order), for
/// `channels` channels. The counts come from clients (ReduceStatistics), so
/// their sum is checked: more than `i64::MAX` values per channel is
/// refused rather than wrapped into a negative count.
pub fn merge<'a>(
    channels: usize,
    shards: impl IntoIterator<Item = &'a ShardStats>,
) -> Result<GlobalStats, NumericsError> {
    let mut total = ShardStats::empty(channels);
    for shard in shards {
        if total.count.checked_add(shard.count).is_none() {
            return Err(NumericsError::invalid(
                "count",
                format!(
                    "the ranks' counts add up to more than {} values per channel",
                    i64::MAX
                ),
            ));
        }
        total.absorb(shard);
    }
    if total.count == 0 {
        // No values: every statistic is undefined, NaN as torch's mean and
        // var of an empty tensor (not a mean of 0, nor M2 / -1 = -0).
        let undefined = vec![f64::NAN; channels];
        return Ok(GlobalStats {
            count: 0,
            mean: undefined.clone(),
            var: undefined.clone(),
            unbiased_var: undefined,
        });
    }
    let n = total.count as f64;
    Ok(GlobalStats {
        count: total.count,
        var: total.m2.iter().map(|m2| m2 / n).collect(),
        unbiased_var: total.m2.iter().map(|m2| m2 / (n - 1.0)).collect(),
        mean: total.mean,
    })
}

/// PyTorch's `_verify_batch_size` on the global batch: one value per channel
/// cannot be normalized in training. `global_shape` is the concatenated
/// batch's shape, named in the message.
pub fn check_global_count(count: i64, global_shape: &[i64]) -> Result<(), NumericsError> {
    if count == 1 {
        return Err(NumericsError::invalid(
            "input",
            format!(
                "Expected more than 1 value per channel when training, got input size {} (the step's shards concatenated)",
                torch_size(global_shape)
            ),
        ));
    }
    Ok(())
}

/// The per-channel transform of train mode, `y = x * scale + shift`, with
/// `scale = weight / sqrt(var + eps)` and `shift = bias - mean * scale`
/// computed in float64 (weight 1 and bias 0 when absent).
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelTransform {
    pub scale: Vec<f64>,
    pub shift: Vec<f64>,
}

impl ChannelTransform {
    pub fn new(
        global: &GlobalStats,
        eps: f64,
        weight: Option<&[f64]>,
        bias: Option<&[f64]>,
    ) -> ChannelTransform {
        let channels = global.mean.len();
        let mut scale = Vec::with_capacity(channels);
        let mut shift = Vec::with_capacity(channels);
        for c in 0..channels {
            let invstd = 1.0 / (global.var[c] + eps).sqrt();
            let s = invstd * weight.map_or(1.0, |w| w[c]);
            scale.push(s);
            shift.push(bias.map_or(0.0, |b| b[c]) - global.mean[c] * s);
        }
        ChannelTransform { scale, shift }
    }

    /// `input` (N, C, *) normalized, computed in `compute` (the session's
    /// parameter dtype, as libtorch's transform runs in it) and returned in
    /// the input's dtype.
    pub fn apply(&self, input: &Tensor, compute: Kind) -> Result<Tensor, NumericsError> {
        let size = input.size();
        let mut view = vec![1i64; size.len()];
        if let Some(channels) = view.get_mut(1) {
            *channels = self.scale.len() as i64;
        }
        let device = input.device();
        let per_channel = |values: &[f64]| -> Result<Tensor, NumericsError> {
            Ok(Tensor::f_from_slice(values)?
                .f_to_kind(compute)?
                .f_to_device(device)?
                .f_reshape(view.as_slice())?)
        };
        let (scale, shift) = (per_channel(&self.scale)?, per_channel(&self.shift)?);
        // The product is a new tensor (never the input's storage, which
        // `to_kind` shares when the kinds agree), so the shift is added in
        // place: one output allocation and pass fewer, the same roundings.
        let mut product = input.f_to_kind(compute)?.f_mul(&scale)?;
        let output = product.f_add_(&shift)?;
        Ok(output.f_to_kind(input.kind())?)
    }
}

/// The running statistics after one train step with the global statistics:
/// `(1 - factor) * old + factor * batch`, the variance with the unbiased
/// batch variance. An empty global batch leaves them as they are (ATen's
/// batch_norm returns early on empty input).
pub fn updated_running_stats(
    old_mean: &[f64],
    old_var: &[f64],
    global: &GlobalStats,
    factor: f64,
) -> (Vec<f64>, Vec<f64>) {
    if global.count == 0 {
        return (old_mean.to_vec(), old_var.to_vec());
    }
    let keep = 1.0 - factor;
    let mean = old_mean
        .iter()
        .zip(&global.mean)
        .map(|(old, m)| keep * old + factor * m)
        .collect();
    let var = old_var
        .iter()
        .zip(&global.unbiased_var)
        .map(|(old, v)| keep * old + factor * v)
        .collect();
    (mean, var)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A deterministic pseudo-random sequence (no dependency on rand).
    fn values(seed: u64, n: usize, offset: f64, scale: f64) -> Vec<f64> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                offset + scale * ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
            })
            .collect()
    }

    /// The oracle: mean and M2 of all values by plain float64 two-pass sums,
    /// with no merging.
    fn two_pass(all: &[f64]) -> (f64, f64) {
        let n = all.len() as f64;
        let mean = all.iter().sum::<f64>() / n;
        let m2 = all.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>();
        (mean, m2)
    }

    fn shard(values: &[f64]) -> ShardStats {
        if values.is_empty() {
            return ShardStats::empty(1);
        }
        let (mean, m2) = two_pass(values);
        ShardStats {
            count: values.len() as i64,
            mean: vec![mean],
            m2: vec![m2],
        }
    }

    #[test]
    fn merged_shards_match_a_two_pass_over_the_concatenation() {
        // Shards of unequal sizes, including empty ones and a large offset
        // (where a one-pass sum of squares would lose every digit).
        let sizes = [5usize, 0, 1, 17, 0, 3, 64, 2];
        let shards: Vec<Vec<f64>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| values(i as u64, n, 1.0e6, 3.0))
            .collect();
        let all: Vec<f64> = shards.concat();
        let (mean, m2) = two_pass(&all);
        let stats: Vec<ShardStats> = shards.iter().map(|s| shard(s)).collect();
        let global = merge(1, &stats).unwrap();
        assert_eq!(global.count, all.len() as i64);
        assert!(
            (global.mean[0] - mean).abs() <= 1e-15 * mean.abs(),
            "{global:?} vs {mean}"
        );
        let n = all.len() as f64;
        assert!(
            (global.var[0] - m2 / n).abs() <= 1e-9 * (m2 / n),
            "{global:?} vs {}",
            m2 / n
        );
        assert!((global.unbiased_var[0] - m2 / (n - 1.0)).abs() <= 1e-9 * (m2 / (n - 1.0)));
    }

    #[test]
    fn tensor_statistics_match_a_two_pass_per_channel() {
        // (N=3, C=2, L=4) laid out as PyTorch does: channel c of sample n at
        // [n][c][..].
        let data = values(7, 24, -2.0, 10.0);
        let input = Tensor::f_from_slice(&data).unwrap().reshape([3, 2, 4]);
        let stats = ShardStats::of(&input).unwrap();
        assert_eq!(stats.count, 12);
        for c in 0..2 {
            let channel: Vec<f64> = (0..3)
                .flat_map(|n| data[n * 8 + c * 4..n * 8 + c * 4 + 4].to_vec())
                .collect();
            let (mean, m2) = two_pass(&channel);
            assert!((stats.mean[c] - mean).abs() < 1e-12);
            assert!((stats.m2[c] - m2).abs() < 1e-10);
        }
    }

    #[test]
    fn float32_shards_match_a_two_pass_of_their_values_in_float64() {
        // (N, C) and (N, C, L) float32 inputs take the in-place path.
        for shape in [vec![6i64, 3], vec![2, 3, 5]] {
            let n: i64 = shape.iter().product();
            let data: Vec<f32> = values(11, n as usize, 50.0, 20.0)
                .iter()
                .map(|&v| v as f32)
                .collect();
            let input = Tensor::f_from_slice(&data)
                .unwrap()
                .reshape(shape.as_slice());
            let stats = ShardStats::of(&input).unwrap();
            let inner: usize = shape[2..].iter().product::<i64>() as usize;
            for c in 0..3 {
                let channel: Vec<f64> = (0..shape[0] as usize)
                    .flat_map(|i| {
                        let at = (i * 3 + c) * inner;
                        data[at..at + inner]
                            .iter()
                            .map(|&v| f64::from(v))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                let (mean, m2) = two_pass(&channel);
                assert!(
                    (stats.mean[c] - mean).abs() < 1e-12 * mean.abs(),
                    "{shape:?}"
                );
                assert!((stats.m2[c] - m2).abs() < 1e-9 * m2, "{shape:?}");
            }
        }
    }

    #[test]
    fn merge_order_is_rank_order_not_arrival_order() {
        let a = shard(&values(1, 9, 0.5, 1.0));
        let b = shard(&values(2, 4, 100.0, 1.0));
        let forward = merge(1, [&a, &b]).unwrap();
        let backward = merge(1, [&b, &a]).unwrap();
        // Same value up to rounding, but a deterministic order is what makes
        // every replica compute the identical bits.
        assert!((forward.mean[0] - backward.mean[0]).abs() < 1e-12);
        assert_eq!(merge(1, [&a, &b]).unwrap(), forward);
    }

    #[test]
    fn one_value_per_channel_in_the_global_batch_is_refused() {
        let one = shard(&[3.0]);
        let global = merge(1, [&ShardStats::empty(1), &one]).unwrap();
        assert_eq!(global.count, 1);
        assert!(global.unbiased_var[0].is_nan());
        let error = check_global_count(global.count, &[1, 1]).unwrap_err();
        assert!(error
            .to_string()
            .contains("Expected more than 1 value per channel"));
    }

    #[test]
    fn an_empty_global_batch_keeps_the_running_statistics() {
        let global = merge(2, [&ShardStats::empty(2)]).unwrap();
        // Its statistics are torch's of an empty batch: NaN, all three.
        let empty = Tensor::zeros([0, 2], (Kind::Double, tch::Device::Cpu));
        let torch_mean = Vec::<f64>::try_from(empty.mean_dim(0, false, Kind::Double)).unwrap();
        let torch_var = Vec::<f64>::try_from(empty.var_dim(0, false, false)).unwrap();
        let torch_unbiased = Vec::<f64>::try_from(empty.var_dim(0, true, false)).unwrap();
        for (ours, theirs) in [
            (&global.mean, &torch_mean),
            (&global.var, &torch_var),
            (&global.unbiased_var, &torch_unbiased),
        ] {
            assert_eq!(ours.len(), 2);
            assert!(
                ours.iter().chain(theirs.iter()).all(|v| v.is_nan()),
                "{ours:?} {theirs:?}"
            );
        }
        let (mean, var) = updated_running_stats(&[1.0, 2.0], &[3.0, 4.0], &global, 0.1);
        assert_eq!((mean, var), (vec![1.0, 2.0], vec![3.0, 4.0]));
    }

    #[test]
    fn counts_that_add_up_past_i64_max_are_refused_not_wrapped() {
        let huge = ShardStats {
            count: i64::MAX,
            mean: vec![1.0],
            m2: vec![1.0],
        };
        let one = ShardStats {
            count: 1,
            mean: vec![2.0],
            m2: vec![0.0],
        };
        for shards in [[&huge, &huge], [&huge, &one], [&one, &huge]] {
            let error = merge(1, shards).unwrap_err();
            assert!(error.to_string().contains("add up to more than"), "{error}");
        }
        // i64::MAX itself is a count (the sum of two halves of it).
        let half = ShardStats {
            count: i64::MAX / 2,
            mean: vec![1.0],
            m2: vec![1.0],
        };
        let rest = ShardStats {
            count: i64::MAX - i64::MAX / 2,
            ..half.clone()
        };
        assert_eq!(merge(1, [&half, &rest]).unwrap().count, i64::MAX);
    }
}
