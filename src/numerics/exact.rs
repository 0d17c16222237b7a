//! Exact per-channel statistics: the sums of x and of x² over every value a
//! session has seen, without any rounding, and the mean and variance
//! computed from them with exact rational arithmetic, rounded once.
//!
//! Why exact: a floating-point running sum (or Welford's or Chan's merge of
//! (count, mean, M2)) depends on the order of the additions, so two runs over
//! the same data cut into other batches, or merged by other workers, differ
//! in the last bits. Integer sums do not: the state after any set of batches
//! is bitwise the same whatever the cuts, the order and the merges.
//!
//! Representation: every finite float is an integer times a power of two
//! (float64: m·2^(e−1075), m < 2^53; float32: m·2^(e−150), m < 2^24). The
//! sum of x is kept as an integer in units of 2^-1074 (the smallest float64
//! subnormal), split into the sum of the positive values and the sum of the
//! magnitudes of the negative ones (each order-independent, so the stored
//! form is canonical); the sum of x² as an integer in units of 2^-2148. The
//! square of a value is exact by construction: the integer square of its
//! significand (at most 106 bits), with no overflow or underflow limit (an
//! FMA split x·x = hi + lo loses exactness for |x| > 2^511 or tiny x, so
//! the levels below use it only inside those bounds).
//!
//! Speed: on CPUs with AVX-512, float64 batches take `exact_f64`'s SIMD
//! levels (x and an exact FMA split of x² taken apart into 51-bit
//! integers). Elsewhere, and for the blocks the levels cannot take
//! (subnormals, magnitudes below about 2^-459 or from 2^510 up, spans over
//! 153 bits), the large-superaccumulator idea: values are first added, as
//! plain integers, into buckets indexed by their sign and exponent bits (no
//! shifts, no carries: one or two integer adds per value); only the few
//! buckets a batch touched are then shifted into the wide sums. Float32
//! (and narrower) batches take `exact_f32`'s paths.
//!
//! No tensors beyond reading an input, no sessions, no I/O.

use num_bigint::{BigInt, BigUint, Sign};
use num_integer::Integer;
use num_traits::{ToPrimitive, Zero};
use tch::{Device, Kind, Tensor};

use super::{exact_f32, exact_f64, host, NumericsError};

/// The sum of x is an integer count of 2^SUM_X_EXPONENT.
pub const SUM_X_EXPONENT: i32 = -1074;
/// The sum of x² is an integer count of 2^SUM_X2_EXPONENT.
pub const SUM_X2_EXPONENT: i32 = -2148;

/// An unsigned integer as little-endian 64-bit limbs, without high zero
/// limbs (so equal values have equal representations).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Magnitude {
    limbs: Vec<u64>,
}

impl Magnitude {
    pub fn is_zero(&self) -> bool {
        self.limbs.is_empty()
    }

    /// Little-endian limbs, no high zero limb.
    pub fn limbs(&self) -> &[u64] {
        &self.limbs
    }

    /// From little-endian limbs (high zero limbs dropped).
    pub fn from_limbs(limbs: Vec<u64>) -> Magnitude {
        let mut magnitude = Magnitude { limbs };
        magnitude.trim();
        magnitude
    }

    fn trim(&mut self) {
        while self.limbs.last() == Some(&0) {
            self.limbs.pop();
        }
    }

    /// Adds `value · 2^shift`.
    pub fn add_shifted(&mut self, value: u128, shift: u32) {
        if value == 0 {
            return;
        }
        let at = (shift / 64) as usize;
        let offset = shift % 64;
        let words = if offset == 0 {
            [value as u64, (value >> 64) as u64, 0]
        } else {
            [
                (value as u64) << offset,
                (value >> (64 - offset)) as u64,
                (value >> (128 - offset)) as u64,
            ]
        };
        if self.limbs.len() < at + 3 {
            self.limbs.resize(at + 3, 0);
        }
        let mut carry = false;
        for (i, word) in words.into_iter().enumerate() {
            let (sum, c1) = self.limbs[at + i].overflowing_add(word);
            let (sum, c2) = sum.overflowing_add(u64::from(carry));
            self.limbs[at + i] = sum;
            carry = c1 || c2;
        }
        self.propagate(at + 3, carry);
        self.trim();
    }

    /// Adds `other`.
    pub fn add(&mut self, other: &Magnitude) {
        if self.limbs.len() < other.limbs.len() {
            self.limbs.resize(other.limbs.len(), 0);
        }
        let mut carry = false;
        for (limb, &word) in self.limbs.iter_mut().zip(&other.limbs) {
            let (sum, c1) = limb.overflowing_add(word);
            let (sum, c2) = sum.overflowing_add(u64::from(carry));
            *limb = sum;
            carry = c1 || c2;
        }
        self.propagate(other.limbs.len(), carry);
        self.trim();
    }

    fn propagate(&mut self, mut at: usize, mut carry: bool) {
        while carry {
            if at == self.limbs.len() {
                self.limbs.push(1);
                return;
            }
            let (sum, c) = self.limbs[at].overflowing_add(1);
            self.limbs[at] = sum;
            carry = c;
            at += 1;
        }
    }

    pub fn to_biguint(&self) -> BigUint {
        let mut digits = Vec::with_capacity(self.limbs.len() * 2);
        for &limb in &self.limbs {
            digits.push(limb as u32);
            digits.push((limb >> 32) as u32);
        }
        BigUint::new(digits)
    }

    /// Little-endian base-2^32 digits, exactly `width` of them (zeros above
    /// the value); `None` when the value needs more.
    pub fn digits32(&self, width: usize) -> Option<Vec<u32>> {
        let mut digits: Vec<u32> = self
            .limbs
            .iter()
            .flat_map(|&limb| [limb as u32, (limb >> 32) as u32])
            .collect();
        while digits.last() == Some(&0) {
            digits.pop();
        }
        if digits.len() > width {
            return None;
        }
        digits.resize(width, 0);
        Some(digits)
    }

    /// How many base-2^32 digits the value needs.
    pub fn digits32_len(&self) -> usize {
        match self.limbs.last() {
            None => 0,
            Some(&top) => self.limbs.len() * 2 - usize::from(top >> 32 == 0),
        }
    }

    /// From little-endian base-2^32 digits.
    pub fn from_digits32(digits: &[u32]) -> Magnitude {
        let limbs = digits
            .chunks(2)
            .map(|pair| u64::from(pair[0]) | pair.get(1).map_or(0, |&hi| u64::from(hi) << 32))
            .collect();
        Magnitude::from_limbs(limbs)
    }
}

/// One channel's exact sums.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelSums {
    /// Sum of the positive values, in units of 2^SUM_X_EXPONENT.
    pub positive: Magnitude,
    /// Sum of |x| over the negative values, in the same units.
    pub negative: Magnitude,
    /// Sum of x², in units of 2^SUM_X2_EXPONENT.
    pub squares: Magnitude,
}

impl ChannelSums {
    fn add(&mut self, other: &ChannelSums) {
        self.positive.add(&other.positive);
        self.negative.add(&other.negative);
        self.squares.add(&other.squares);
    }
}

/// The exact sums of every channel and the number of values each channel
/// has seen (the same for all: a batch has N·L values in every channel).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExactSums {
    pub count: u64,
    pub channels: Vec<ChannelSums>,
}

/// Why values cannot be accumulated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExactError {
    #[error("contains NaN or infinite values, which exact statistics cannot sum")]
    NonFinite,
    #[error("the number of values seen per channel would exceed 2^64 - 1")]
    CountOverflow,
    #[error("{0}")]
    Torch(String),
}

impl From<ExactError> for NumericsError {
    fn from(error: ExactError) -> NumericsError {
        match error {
            ExactError::Torch(message) => NumericsError::Torch(message),
            other => NumericsError::invalid("input", other.to_string()),
        }
    }
}

impl From<tch::TchError> for ExactError {
    fn from(error: tch::TchError) -> ExactError {
        ExactError::Torch(error.to_string())
    }
}

impl From<NumericsError> for ExactError {
    fn from(error: NumericsError) -> ExactError {
        ExactError::Torch(error.to_string())
    }
}

impl ExactSums {
    /// Nothing seen yet, `channels` channels.
    pub fn new(channels: usize) -> ExactSums {
        ExactSums {
            count: 0,
            channels: vec![ChannelSums::default(); channels],
        }
    }

    /// Adds another set of sums (a merge): the result is the sums of both
    /// sets of values. The channel counts must agree (checked by the caller).
    pub fn merge(&mut self, other: &ExactSums) -> Result<(), ExactError> {
        self.count = self
            .count
            .checked_add(other.count)
            .ok_or(ExactError::CountOverflow)?;
        for (mine, theirs) in self.channels.iter_mut().zip(&other.channels) {
            mine.add(theirs);
        }
        Ok(())
    }

    /// The sums of one batch, (N, C, *) of any floating dtype on any device;
    /// float16/bfloat16 values are widened exactly to float32. NaN or ±Inf
    /// anywhere: [`ExactError::NonFinite`].
    pub fn of_batch(input: &Tensor) -> Result<ExactSums, ExactError> {
        let size = input.size();
        let (Some(&batch), Some(&channels)) = (size.first(), size.get(1)) else {
            return Err(ExactError::Torch("input must be (N, C, *)".into()));
        };
        let inner: i64 = size[2..].iter().product();
        let (channels, inner, batch) = (
            usize::try_from(channels).unwrap_or(0),
            usize::try_from(inner).unwrap_or(0),
            usize::try_from(batch).unwrap_or(0),
        );
        let layout = Layout {
            batch,
            channels,
            inner,
        };
        let count = (batch as u64).saturating_mul(inner as u64);
        let mut sums = ExactSums::new(channels);
        sums.count = count;
        if count == 0 || channels == 0 {
            return Ok(sums);
        }
        let mut on_cpu = input.f_to_device(Device::Cpu)?;
        let double = on_cpu.f_kind()? == Kind::Double;
        let mut layout = layout;
        // Short runs per sample (an (N, C) table, small images): each
        // channel's values would be gathered from all over the buffer, once
        // per channel. Float64 makes them channel-major first (one copy),
        // then one long run each; float32 reads such a buffer in place, as
        // a table (one SIMD lane per column).
        if double && inner < 64 && batch > 1 {
            on_cpu = on_cpu
                .f_reshape([batch as i64, channels as i64, inner as i64])?
                .f_transpose(0, 1)?
                .f_contiguous()?;
            layout = Layout {
                batch: 1,
                channels,
                inner: batch * inner,
            };
        }
        if double {
            let values = on_cpu.f_contiguous()?;
            host::with_f64_values(&values, |data| {
                accumulate_f64(data, &layout, &mut sums.channels)
            })?
            .ok_or_else(|| ExactError::Torch("internal: float64 input not readable".into()))??;
        } else {
            let values = on_cpu.f_to_kind(Kind::Float)?.f_contiguous()?;
            host::with_f32_values(&values, |data| {
                exact_f32::accumulate(data, &layout, &mut sums.channels)
            })?
            .ok_or_else(|| ExactError::Torch("internal: float32 input not readable".into()))??;
        }
        Ok(sums)
    }
}

/// A contiguous (N, C, inner) buffer.
pub(super) struct Layout {
    pub(super) batch: usize,
    pub(super) channels: usize,
    pub(super) inner: usize,
}

/// One block of a channel's values (see [`Layout::walk_blocks`]).
pub(super) struct Block<'a, T> {
    pub(super) channel: usize,
    pub(super) values: &'a [T],
    /// The values read next (at most a block's worth; empty after a
    /// gathered block): the kernels ask the CPU to fetch them meanwhile.
    pub(super) ahead: &'a [T],
    /// The channel's last block (possibly empty).
    pub(super) last: bool,
}

impl Layout {
    /// The contiguous runs of channel `c`'s values: one per sample.
    pub(super) fn runs<'a, T>(&self, data: &'a [T], c: usize) -> impl Iterator<Item = &'a [T]> {
        let (inner, stride) = (self.inner, self.channels * self.inner);
        (0..self.batch).map(move |n| &data[n * stride + c * inner..n * stride + (c + 1) * inner])
    }

    /// Hands `data`'s values to `add` channel after channel, in blocks of
    /// at most `block` values: a run of at least `direct` values in place,
    /// shorter runs gathered (copied) into full blocks; one channel's runs
    /// follow each other, so they are read in place as one. Every channel
    /// ends with one block marked `last`. Inlined into each SIMD kernel,
    /// whose closure it calls with the kernel's CPU features.
    #[inline(always)]
    pub(super) fn walk_blocks<T: Copy, E>(
        &self,
        data: &[T],
        block: usize,
        direct: usize,
        mut add: impl FnMut(Block<'_, T>) -> Result<(), E>,
    ) -> Result<(), E> {
        let (batch, inner) = if self.channels == 1 {
            (1, self.batch * self.inner)
        } else {
            (self.batch, self.inner)
        };
        let stride = self.channels * inner;
        // The first block's worth of values from `start`: what comes next.
        let from = |start: usize| &data[start.min(data.len())..(start + block).min(data.len())];
        let mut gathered: Vec<T> = Vec::with_capacity(block);
        for channel in 0..self.channels {
            gathered.clear();
            for n in 0..batch {
                let start = n * stride + channel * inner;
                let run = &data[start..start + inner];
                if run.len() >= direct || batch == 1 {
                    // Next: this run's next block, or the next run of this
                    // channel (or the first of the next channel).
                    let next_run = if n + 1 < batch {
                        start + stride
                    } else {
                        (channel + 1) * inner
                    };
                    for (i, values) in run.chunks(block).enumerate() {
                        let next = if (i + 1) * block < inner {
                            start + (i + 1) * block
                        } else {
                            next_run
                        };
                        let ahead = from(next);
                        add(Block {
                            channel,
                            values,
                            ahead,
                            last: false,
                        })?;
                    }
                    continue;
                }
                if gathered.len() + run.len() > block {
                    add(Block {
                        channel,
                        values: &gathered,
                        ahead: &[],
                        last: false,
                    })?;
                    gathered.clear();
                }
                gathered.extend_from_slice(run);
            }
            add(Block {
                channel,
                values: &gathered,
                ahead: &[],
                last: true,
            })?;
        }
        Ok(())
    }
}

/// Float64: 2^20 squares of at most 2^106 fit in a u128.
const F64_FLUSH_EVERY: usize = 1 << 20;

/// Integer sums of significands (and of their squares) by sign and exponent
/// bits; `touched` lists the buckets in use, so a flush visits only those.
struct Buckets<T> {
    sum: Vec<T>,
    squares: Vec<T>,
    touched: Vec<usize>,
}

impl<T: Copy + Default + PartialEq> Buckets<T> {
    fn new(size: usize) -> Buckets<T> {
        Buckets {
            sum: vec![T::default(); size],
            squares: vec![T::default(); size],
            touched: Vec::new(),
        }
    }
}

/// Float64 values into `sums`: by `exact_f64`'s levels where the CPU runs
/// them (and the block allows), otherwise by exponent buckets. NaN or ±Inf
/// anywhere: NonFinite.
fn accumulate_f64(
    data: &[f64],
    layout: &Layout,
    sums: &mut [ChannelSums],
) -> Result<(), ExactError> {
    let mut buckets = Buckets::<u128>::new(4096);
    let mut by_buckets =
        |values: &[f64], channel: &mut ChannelSums| bucket_block(values, &mut buckets, channel);
    if let Some(result) = exact_f64::accumulate(data, layout, sums, &mut by_buckets) {
        return result;
    }
    let mut finite = true;
    for (c, channel) in sums.iter_mut().enumerate() {
        let mut pending = 0usize;
        for run in layout.runs(data, c) {
            for chunk in run.chunks(F64_FLUSH_EVERY) {
                if pending + chunk.len() > F64_FLUSH_EVERY {
                    flush_f64(&mut buckets, channel);
                    pending = 0;
                }
                pending += chunk.len();
                finite &= bucket_f64(chunk, &mut buckets);
            }
        }
        flush_f64(&mut buckets, channel);
    }
    if finite {
        Ok(())
    } else {
        Err(ExactError::NonFinite)
    }
}

/// Adds float64 values into a channel's sums by the buckets (emptied
/// again); false when one is NaN or infinite.
fn bucket_block(values: &[f64], buckets: &mut Buckets<u128>, channel: &mut ChannelSums) -> bool {
    let mut finite = true;
    for chunk in values.chunks(F64_FLUSH_EVERY) {
        finite &= bucket_f64(chunk, buckets);
        flush_f64(buckets, channel);
    }
    finite
}

/// [`bucket_block`] with buckets of its own: the float64 levels' tests
/// compare the two paths.
#[cfg(test)]
pub(super) fn add_f64_by_buckets(values: &[f64], channel: &mut ChannelSums) -> bool {
    bucket_block(values, &mut Buckets::new(4096), channel)
}

/// Adds at most F64_FLUSH_EVERY values into the buckets (with what they
/// hold since the last flush, at most that many); false when one is NaN or
/// infinite.
fn bucket_f64(values: &[f64], buckets: &mut Buckets<u128>) -> bool {
    let mut special = false;
    for &x in values {
        let bits = x.to_bits();
        let index = (bits >> 52) as usize;
        let exponent = index & 0x7ff;
        special |= exponent == 0x7ff;
        let significand = u128::from(bits & 0xf_ffff_ffff_ffff) | (u128::from(exponent != 0) << 52);
        if buckets.squares[index] == 0 && significand != 0 {
            buckets.touched.push(index);
        }
        buckets.sum[index] += significand;
        buckets.squares[index] += significand * significand;
    }
    !special
}

/// Float64 buckets shifted into a channel's wide sums, and emptied.
fn flush_f64(buckets: &mut Buckets<u128>, channel: &mut ChannelSums) {
    for index in buckets.touched.drain(..) {
        let (sum, squares) = (buckets.sum[index], buckets.squares[index]);
        buckets.sum[index] = 0;
        buckets.squares[index] = 0;
        // x = m · 2^(max(e, 1) − 1075).
        let exponent = (index & 0x7ff).max(1) as u32;
        let target = if index & 0x800 != 0 {
            &mut channel.negative
        } else {
            &mut channel.positive
        };
        // Units of 2^-1074: shift by max(e, 1) − 1075 + 1074.
        target.add_shifted(sum, exponent - 1);
        // x² = m² · 2^(2·max(e, 1) − 2150), units of 2^-2148.
        channel.squares.add_shifted(squares, 2 * exponent - 2);
    }
}

/// A binary floating-point format to round to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// Significand bits, the implicit one included (float64: 53).
    pub precision: u32,
    /// Exponent of the smallest normal number (float64: −1022).
    pub min_exponent: i64,
    /// Exponent of the largest finite number (float64: 1023).
    pub max_exponent: i64,
}

impl Format {
    pub const FLOAT64: Format = Format {
        precision: 53,
        min_exponent: -1022,
        max_exponent: 1023,
    };
    pub const FLOAT32: Format = Format {
        precision: 24,
        min_exponent: -126,
        max_exponent: 127,
    };
    pub const FLOAT16: Format = Format {
        precision: 11,
        min_exponent: -14,
        max_exponent: 15,
    };
    pub const BFLOAT16: Format = Format {
        precision: 8,
        min_exponent: -126,
        max_exponent: 127,
    };

    /// The format of a parameter dtype.
    pub fn of(dtype: super::DType) -> Format {
        match dtype {
            super::DType::Float64 => Format::FLOAT64,
            super::DType::Float32 => Format::FLOAT32,
            super::DType::Float16 => Format::FLOAT16,
            super::DType::BFloat16 => Format::BFLOAT16,
        }
    }
}

/// 2^exponent as a float64, for −1074 ≤ exponent ≤ 1023.
fn power_of_two(exponent: i64) -> f64 {
    if exponent >= -1022 {
        f64::from_bits(((exponent + 1023) as u64) << 52)
    } else {
        f64::from_bits(1u64 << (exponent + 1074))
    }
}

/// `numerator / denominator` (denominator > 0) rounded once, to nearest with
/// ties to even, to `format`; returned as the float64 holding that value
/// exactly (every format here is a subset of float64). Beyond the format's
/// range: ±infinity, as IEEE rounding gives.
pub fn round_ratio(numerator: &BigInt, denominator: &BigUint, format: Format) -> f64 {
    let negative = numerator.sign() == Sign::Minus;
    let magnitude = numerator.magnitude();
    if magnitude.is_zero() {
        return 0.0;
    }
    // 2^(e−1) < p/q < 2^(e+1); the exponent is e or e − 1.
    let e = magnitude.bits() as i64 - denominator.bits() as i64;
    let at_least = if e >= 0 {
        *magnitude >= (denominator << e as u64)
    } else {
        (magnitude << (-e) as u64) >= *denominator
    };
    let exponent = if at_least { e } else { e - 1 };
    // The weight of the last significand bit kept.
    let ulp = exponent.max(format.min_exponent) - (i64::from(format.precision) - 1);
    let (dividend, divisor) = if ulp >= 0 {
        (magnitude.clone(), denominator << ulp as u64)
    } else {
        (magnitude << (-ulp) as u64, denominator.clone())
    };
    let (quotient, remainder) = dividend.div_rem(&divisor);
    let twice = remainder << 1u32;
    let odd = quotient.bit(0);
    let round_up = match twice.cmp(&divisor) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Equal => odd,
        std::cmp::Ordering::Less => false,
    };
    // At most 2^precision: fits a u64 and, as a float64, exactly.
    let significand = quotient.to_u64().unwrap_or(u64::MAX) + u64::from(round_up);
    let top = i64::from(64 - significand.leading_zeros()) - 1 + ulp;
    let value = if top > format.max_exponent {
        f64::INFINITY
    } else {
        significand as f64 * power_of_two(ulp)
    };
    if negative {
        -value
    } else {
        value
    }
}

/// The statistics of one channel: the mean and the unbiased variance
/// rounded to the session's format (as running_mean/running_var), and the
/// population variance (ddof 0) rounded to float64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelStatistics {
    pub mean: f64,
    pub unbiased_var: f64,
    pub population_var: f64,
}

/// Removes the factor 2^k common to numbers that are about to be divided by
/// each other (their quotient is unchanged, the division is cheaper).
fn common_twos(values: &[&BigUint]) -> u64 {
    values
        .iter()
        .filter_map(|v| v.trailing_zeros())
        .min()
        .unwrap_or(0)
}

impl ChannelSums {
    /// The channel's statistics after `count` values. No values: PyTorch's
    /// initial running_mean 0 and running_var 1 (population variance 0).
    /// One value: the unbiased variance is NaN (0/0), as in PyTorch.
    pub fn statistics(&self, count: u64, format: Format) -> ChannelStatistics {
        if count == 0 {
            return ChannelStatistics {
                mean: 0.0,
                unbiased_var: 1.0,
                population_var: 0.0,
            };
        }
        let n = BigUint::from(count);
        // S1 = A · 2^-1074 (A signed), S2 = B · 2^-2148.
        let a = BigInt::from_biguint(Sign::Plus, self.positive.to_biguint())
            - BigInt::from_biguint(Sign::Plus, self.negative.to_biguint());
        let b = self.squares.to_biguint();
        // mean = A / (n · 2^1074).
        let a_twos = common_twos(&[a.magnitude()]).min(1074);
        let mean = round_ratio(&(&a >> a_twos as usize), &(&n << (1074 - a_twos)), format);
        // n·S2 − S1² = (n·B − A²) · 2^-2148, exact and never negative.
        let a_squared = a.magnitude() * a.magnitude();
        let spread = &n * &b - &a_squared;
        let twos = common_twos(&[&spread]).min(2148);
        let spread = BigInt::from_biguint(Sign::Plus, &spread >> twos as usize);
        let scale = 2148 - twos;
        let unbiased_var = if count < 2 {
            f64::NAN
        } else {
            let denominator = (&n * BigUint::from(count - 1)) << scale;
            round_ratio(&spread, &denominator, format)
        };
        let population_var = round_ratio(&spread, &((&n * &n) << scale), Format::FLOAT64);
        ChannelStatistics {
            mean,
            unbiased_var,
            population_var,
        }
    }
}

impl ExactSums {
    /// Every channel's statistics (see [`ChannelSums::statistics`]).
    pub fn statistics(&self, format: Format) -> Vec<ChannelStatistics> {
        self.channels
            .iter()
            .map(|channel| channel.statistics(self.count, format))
            .collect()
    }
}

/// The state-dict keys of the exact sums, beside PyTorch's own (which a
/// plain `load_state_dict(strict=False)` then ignores as unexpected):
/// `exact.count` (int64, 0-d: values seen per channel), and per channel
/// (rows of int64 (C, W) tensors: little-endian base-2^32 digits, each in
/// [0, 2^32)) `exact.sum_x.positive` and `exact.sum_x.negative` (the sums of
/// the positive values and of |x| over the negative ones, in units of
/// 2^-1074) and `exact.sum_x2` (the sum of x², in units of 2^-2148).
pub const COUNT_KEY: &str = "exact.count";
pub const SUM_POSITIVE_KEY: &str = "exact.sum_x.positive";
pub const SUM_NEGATIVE_KEY: &str = "exact.sum_x.negative";
pub const SUM_SQUARES_KEY: &str = "exact.sum_x2";
pub const KEYS: [&str; 4] = [
    COUNT_KEY,
    SUM_POSITIVE_KEY,
    SUM_NEGATIVE_KEY,
    SUM_SQUARES_KEY,
];

/// Most digits a sum can need: |x| < 2^1024 and at most 2^64 values, so
/// sum_x < 2^(1074 + 1088) and sum_x2 < 2^(2148 + 2112).
const MAX_SUM_X_DIGITS: usize = 68;
const MAX_SUM_X2_DIGITS: usize = 134;

/// One exported sum: (C, W) digits as int64 little-endian bytes.
pub struct DigitTable {
    pub shape: [usize; 2],
    pub bytes: Vec<u8>,
}

impl ExactSums {
    /// The (C, W) digit table of one sum of every channel (W the widest
    /// channel's digits, at least 1).
    pub fn digit_table(&self, sum: impl Fn(&ChannelSums) -> &Magnitude) -> DigitTable {
        let width = self
            .channels
            .iter()
            .map(|c| sum(c).digits32_len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut bytes = Vec::with_capacity(self.channels.len() * width * 8);
        for channel in &self.channels {
            // `width` is the largest digit count, so every channel fits.
            let digits = sum(channel).digits32(width).unwrap_or_default();
            for digit in digits {
                bytes.extend_from_slice(&i64::from(digit).to_le_bytes());
            }
        }
        DigitTable {
            shape: [self.channels.len(), width],
            bytes,
        }
    }

    /// Sums from an imported state dict's `exact.*` tensors: `count`, and
    /// the three digit tables as (C, W) int64 values (row-major), checked:
    /// digits in [0, 2^32), widths within what a sum can need, no sums
    /// without a count, and n·Σx² ≥ (Σx)² (what any real values give).
    pub fn from_digit_tables(
        count: i64,
        channels: usize,
        tables: [(&str, &[i64], usize); 3],
    ) -> Result<ExactSums, String> {
        let count =
            u64::try_from(count).map_err(|_| format!("{COUNT_KEY} must be >= 0, got {count}"))?;
        let mut sums = ExactSums::new(channels);
        sums.count = count;
        for (index, (key, values, width)) in tables.into_iter().enumerate() {
            let limit = if index == 2 {
                MAX_SUM_X2_DIGITS
            } else {
                MAX_SUM_X_DIGITS
            };
            if width == 0 || width > limit || values.len() != channels * width {
                return Err(format!(
                    "{key}: expected shape [{channels}, W] with 1 <= W <= {limit}"
                ));
            }
            for (channel, row) in sums.channels.iter_mut().zip(values.chunks(width)) {
                let mut digits = Vec::with_capacity(width);
                for &value in row {
                    let digit = u32::try_from(value)
                        .map_err(|_| format!("{key}: digits must be in [0, 2^32), got {value}"))?;
                    digits.push(digit);
                }
                let magnitude = Magnitude::from_digits32(&digits);
                match index {
                    0 => channel.positive = magnitude,
                    1 => channel.negative = magnitude,
                    _ => channel.squares = magnitude,
                }
            }
        }
        for (c, channel) in sums.channels.iter().enumerate() {
            let empty = channel.positive.is_zero()
                && channel.negative.is_zero()
                && channel.squares.is_zero();
            if count == 0 && !empty {
                return Err(format!("channel {c} has sums but {COUNT_KEY} is 0"));
            }
            let a = BigInt::from_biguint(Sign::Plus, channel.positive.to_biguint())
                - BigInt::from_biguint(Sign::Plus, channel.negative.to_biguint());
            let spread = BigInt::from(count)
                * BigInt::from_biguint(Sign::Plus, channel.squares.to_biguint())
                - &a * &a;
            if spread.sign() == Sign::Minus {
                return Err(format!(
                    "channel {c}: the sums are not those of any values (count * sum_x2 < sum_x^2)"
                ));
            }
        }
        Ok(sums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact rational of a float64 (numerator, power of two).
    fn exact(x: f64) -> (BigInt, i64) {
        let bits = x.to_bits();
        let exponent = ((bits >> 52) & 0x7ff) as i64;
        let significand = (bits & 0xf_ffff_ffff_ffff) | (u64::from(exponent != 0) << 52);
        let value = BigInt::from(significand);
        let value = if x.is_sign_negative() { -value } else { value };
        (value, exponent.max(1) - 1075)
    }

    /// Sum of `values` (and of their squares) by the textbook rule, as
    /// integers of 2^-1074 and 2^-2148: the oracle for the bucketed sums.
    fn oracle_sums(values: &[f64]) -> (BigInt, BigUint) {
        let mut s1 = BigInt::zero();
        let mut s2 = BigInt::zero();
        for &x in values {
            let (m, e) = exact(x);
            s1 += &m << (e + 1074) as usize;
            s2 += (&m * &m) << (2 * e + 2148) as usize;
        }
        (s1, s2.magnitude().clone())
    }

    fn sums_of(values: &[f64], kind: Kind) -> ExactSums {
        let t = Tensor::from_slice(values)
            .to_kind(kind)
            .reshape([values.len() as i64, 1]);
        ExactSums::of_batch(&t).unwrap()
    }

    fn signed(channel: &ChannelSums) -> BigInt {
        BigInt::from_biguint(Sign::Plus, channel.positive.to_biguint())
            - BigInt::from_biguint(Sign::Plus, channel.negative.to_biguint())
    }

    #[test]
    fn bucketed_sums_equal_the_integer_oracle_across_magnitudes() {
        let values = [
            1e16,
            1.0,
            -1e16,
            f64::MAX,
            -f64::MAX / 3.0,
            5e-324,
            -2.5e-310,
            1e-300,
            3.0,
            -0.0,
            0.0,
            1e154,
            -7.25,
        ];
        let sums = sums_of(&values, Kind::Double);
        let (s1, s2) = oracle_sums(&values);
        assert_eq!(sums.count, values.len() as u64);
        assert_eq!(signed(&sums.channels[0]), s1);
        assert_eq!(sums.channels[0].squares.to_biguint(), s2);
    }

    #[test]
    fn float32_values_sum_as_their_float64_widening() {
        let values: Vec<f64> = [3.5f32, -1e-45, f32::MAX, -f32::MIN_POSITIVE, 1e-38, 0.1]
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        let sums = sums_of(&values, Kind::Float);
        let (s1, s2) = oracle_sums(&values);
        assert_eq!(signed(&sums.channels[0]), s1);
        assert_eq!(sums.channels[0].squares.to_biguint(), s2);
    }

    #[test]
    fn cuts_orders_and_merges_give_identical_sums() {
        let values: Vec<f64> = (0..1000)
            .map(|i| ((i * 7919) % 1013) as f64 * 1.37e-3 - 0.5 + (i as f64).sin() * 1e10)
            .collect();
        let whole = sums_of(&values, Kind::Double);
        let mut reversed: Vec<f64> = values.clone();
        reversed.reverse();
        let mut merged = sums_of(&reversed[..333], Kind::Double);
        merged
            .merge(&sums_of(&reversed[333..334], Kind::Double))
            .unwrap();
        merged
            .merge(&sums_of(&reversed[334..], Kind::Double))
            .unwrap();
        assert_eq!(merged, whole);
    }

    #[test]
    fn flushes_keep_large_batches_exact() {
        // More values per channel than one flush holds, all in one bucket
        // with the largest significand: the bucket would overflow unflushed.
        let n = (1 << 16) + 5;
        let x = f32::from_bits(0x3fff_ffff); // 1.9999999, significand 2^24 − 1
        let t = Tensor::from_slice(&vec![x; n]).reshape([n as i64, 1]);
        let sums = ExactSums::of_batch(&t).unwrap();
        let (s1, s2) = oracle_sums(&[f64::from(x)]);
        assert_eq!(signed(&sums.channels[0]), s1 * n);
        assert_eq!(sums.channels[0].squares.to_biguint(), s2 * n);
    }

    #[test]
    fn channels_are_summed_separately_in_every_layout() {
        // (N=2, C=3, L=2): channel c holds 10c + {0, 1, 2, 3}.
        let values: Vec<f64> = [0., 1., 10., 11., 20., 21., 2., 3., 12., 13., 22., 23.].to_vec();
        let t = Tensor::from_slice(&values).reshape([2, 3, 2]);
        let sums = ExactSums::of_batch(&t).unwrap();
        assert_eq!(sums.count, 4);
        for c in 0..3 {
            let own: Vec<f64> = (0..4).map(|i| (10 * c + i) as f64).collect();
            assert_eq!(signed(&sums.channels[c]), oracle_sums(&own).0);
        }
    }

    #[test]
    fn non_finite_values_are_refused() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for kind in [Kind::Double, Kind::Float, Kind::Half] {
                let t = Tensor::from_slice(&[1.0, bad])
                    .to_kind(kind)
                    .reshape([2, 1]);
                assert_eq!(ExactSums::of_batch(&t), Err(ExactError::NonFinite));
            }
        }
    }

    fn ratio(p: i64, q: u64) -> (BigInt, BigUint) {
        (BigInt::from(p), BigUint::from(q))
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        let r = |p: i64, q: u64, f: Format| {
            let (p, q) = ratio(p, q);
            round_ratio(&p, &q, f)
        };
        assert_eq!(r(1, 3, Format::FLOAT64), 1.0 / 3.0);
        assert_eq!(r(-2, 3, Format::FLOAT64), -2.0 / 3.0);
        assert_eq!(r(1, 10, Format::FLOAT32), f64::from(0.1f32));
        // 2^53 + 1 is a tie between 2^53 and 2^53 + 2: even is 2^53.
        assert_eq!(r((1 << 53) + 1, 1, Format::FLOAT64), 9007199254740992.0);
        assert_eq!(r((1 << 53) + 3, 1, Format::FLOAT64), 9007199254740996.0);
        // float32: 2^24 + 1 ties to 2^24.
        assert_eq!(r((1 << 24) + 1, 1, Format::FLOAT32), 16777216.0);
        // float16: 1/3 and 65520 (rounds to infinity, as IEEE does).
        assert_eq!(r(1, 3, Format::FLOAT16), 0.333251953125);
        assert_eq!(r(65520, 1, Format::FLOAT16), f64::INFINITY);
        assert_eq!(r(65519, 1, Format::FLOAT16), 65504.0);
    }

    #[test]
    fn rounding_reaches_subnormals_and_the_largest_finite_values() {
        let tiny = BigInt::from(3);
        let big = BigUint::from(1u32) << 1075usize;
        // 3 · 2^-1075 = 1.5 · 2^-1074: a tie, to the even 2 · 2^-1074.
        assert_eq!(round_ratio(&tiny, &big, Format::FLOAT64), 1e-323);
        // 2^-1076: below half the smallest subnormal, rounds to zero.
        let quarter = BigUint::from(1u32) << 1076usize;
        assert_eq!(
            round_ratio(&BigInt::from(1), &quarter, Format::FLOAT64),
            0.0
        );
        // float32's smallest subnormal, 2^-149, from 1 / 2^149.
        let f32_tiny = BigUint::from(1u32) << 149usize;
        assert_eq!(
            round_ratio(&BigInt::from(1), &f32_tiny, Format::FLOAT32),
            f64::from(f32::from_bits(1))
        );
        // float64's largest, and just past the rounding boundary above it.
        let largest = (BigInt::from((1u64 << 53) - 1)) << 971usize;
        assert_eq!(
            round_ratio(&largest, &BigUint::from(1u32), Format::FLOAT64),
            f64::MAX
        );
        let overflow = (BigInt::from((1u64 << 54) - 1)) << 970usize;
        assert_eq!(
            round_ratio(&overflow, &BigUint::from(1u32), Format::FLOAT64),
            f64::INFINITY
        );
    }

    #[test]
    fn statistics_cancel_exactly() {
        // 1e16 + 1 − 1e16 with a float64 running sum is 0; exactly it is 1.
        let values = [1e16, 1.0, -1e16];
        let sums = sums_of(&values, Kind::Double);
        let stats = sums.statistics(Format::FLOAT64)[0];
        assert_eq!(stats.mean, 1.0 / 3.0);
        // Unbiased variance: (n·Σx² − (Σx)²) / (n(n−1)), all exact.
        let n = BigInt::from(3);
        let s2 = BigInt::from(2) * BigInt::from(10u64.pow(16)).pow(2) + 1;
        let spread = &n * &s2 - BigInt::from(1);
        let expected = round_ratio(&spread, &BigUint::from(6u32), Format::FLOAT64);
        assert_eq!(stats.unbiased_var, expected);
        assert_eq!(
            stats.population_var,
            round_ratio(&spread, &BigUint::from(9u32), Format::FLOAT64)
        );
    }

    #[test]
    fn statistics_before_any_value_are_pytorchs_initial_ones() {
        let stats = ExactSums::new(2).statistics(Format::FLOAT32);
        assert_eq!(
            stats[1],
            ChannelStatistics {
                mean: 0.0,
                unbiased_var: 1.0,
                population_var: 0.0
            }
        );
    }

    #[test]
    fn digits_round_trip() {
        let mut m = Magnitude::default();
        m.add_shifted(u128::MAX, 130);
        m.add_shifted(5, 0);
        let width = m.digits32_len();
        let digits = m.digits32(width).unwrap();
        assert_eq!(Magnitude::from_digits32(&digits), m);
        assert_eq!(m.digits32(width - 1), None);
        assert_eq!(
            m.to_biguint(),
            (BigUint::from(u128::MAX) << 130usize) + BigUint::from(5u32)
        );
    }
}
