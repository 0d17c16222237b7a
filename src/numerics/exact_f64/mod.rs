//! The float64 accumulation behind [`super::exact::ExactSums::of_batch`] on
//! CPUs with AVX-512: every value and its square added, without rounding,
//! into per-channel integer sums, in SIMD lanes instead of one exponent
//! bucket per value. Other CPUs, and the blocks these levels cannot take,
//! use `exact`'s buckets; both are exact, so the sums do not depend on
//! which one a value took.
//!
//! **Blocks.** A channel's values in blocks of at most [`BLOCK`] (runs of at
//! least [`DIRECT_RUN`] values read in place, shorter ones gathered), read
//! as vectors of 8 (the last one padded with zeros). One scale per block:
//! all lanes hold the same channel.
//!
//! **Levels.** As in `exact_f32`: adding C = 1.5·2^(52+q) to a float64 v
//! with |v| ≤ 2^(51+q) rounds v to a multiple of 2^q and leaves that
//! multiple, as an integer, in the low bits of the sum (`bits(v + C) −
//! bits(C)`), and `v − ((v + C) − C)` is the exact remainder, at most
//! 2^(q−1), which the next level, 52 bits lower, takes (the first level
//! takes the 51 bits below the block's top). A float64 has 53 significant
//! bits, so x takes two levels or three (up to 103 or 155 bits from the
//! largest magnitude's top bit to the smallest one's lowest). Its square
//! does not fit a float64, so it is first split exactly by FMA: `hi = a·a`
//! rounded, `lo = fma(a, a, −hi)`, a² = hi + lo; hi goes through the
//! levels of x² from the top (2·top) down, lo (at most half an ulp of hi)
//! from the second level down, three to six levels for x², summed
//! together.
//!
//! **Range.** A first pass finds the block's largest and smallest nonzero
//! magnitudes (and NaN or ±Inf). The levels take a block when every
//! nonzero |x| is in [2^-459, 2^510) (about, see [`LEVELS_MIN_BITS`]) and
//! its span is at most 155 bits: then a² neither overflows nor loses lo
//! bits, and every remainder and constant is a normal float64 (so a
//! flush-to-zero mode cannot change them). Other blocks (subnormals, huge
//! or tiny values, spans over 102 binary orders) go to the buckets.
//!
//! Plain slices and integers only: no tensors, no sessions, no I/O.

use super::exact::{ChannelSums, ExactError, Layout, Magnitude};
use super::exact_f32::wide::Wide;

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Values of one channel per block: per lane at most BLOCK / 8 values,
/// each adding at most 2^51 + 2^49 to a level (hi and lo together), so
/// every lane's level sum stays below 2^61 in magnitude.
const BLOCK: usize = 4096;
/// Runs at least this long are added in place; shorter ones are gathered
/// into blocks.
const DIRECT_RUN: usize = 512;
/// Bits the first level takes below the block's top, then every further
/// one (a remainder is at most half the previous level's unit): as in
/// `exact_f32`.
const FIRST_LEVEL_BITS: i32 = 51;
const LEVEL_BITS: i32 = 52;
/// The widest span (largest magnitude's top bit to the smallest one's
/// lowest) the levels take: three levels for x, six for x².
const MAX_LEVEL_SPAN: i32 = FIRST_LEVEL_BITS + 2 * LEVEL_BITS;
/// The smallest magnitude bits the levels take: biased exponent 564, so
/// every value's lowest bit is at least 2^-511, its square's 2^-1022 (a
/// normal float64: lo exact, no subnormal remainder).
const LEVELS_MIN_BITS: u64 = 564 << 52;
/// The largest magnitude bits the levels take: below 2^510, so a² <
/// 2^1020, and every level's sum v + C (at most 2^(53+q), the top level's
/// q = 2·510 − 51) is finite.
const LEVELS_MAX_BITS: u64 = (1533 << 52) - 1;

/// The units of `exact`'s sums: 2^-1074 for x, 2^-2148 for x².
const X_UNIT: i32 = -1074;
const X2_UNIT: i32 = -2148;

/// Whether this CPU runs the vectorized float64 accumulation.
pub(super) fn is_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Adds a contiguous (N, C, inner) float64 buffer into `sums` (one per
/// channel, empty), taking the blocks the levels cannot take with
/// `buckets` (which adds a slice of values into a channel's sums: false
/// when one is NaN or infinite). None when this CPU does not run the
/// vectorized accumulation (nothing added). NaN or ±Inf anywhere:
/// NonFinite.
pub(super) fn accumulate(
    data: &[f64],
    layout: &Layout,
    sums: &mut [ChannelSums],
    buckets: &mut dyn FnMut(&[f64], &mut ChannelSums) -> bool,
) -> Option<Result<(), ExactError>> {
    #[cfg(target_arch = "x86_64")]
    if is_supported() {
        // SAFETY: the AVX-512 build only needs the CPU features its
        // functions enable, and runs only when this CPU has them (checked
        // just above); it is otherwise safe code.
        #[allow(unsafe_code)]
        return Some(unsafe { avx512::accumulate(data, layout, sums, buckets) });
    }
    let _ = (data, layout, sums, buckets);
    None
}

/// How a block is added: by levels (x at `levels.0`, x² at `levels.1`,
/// below 2^top), or by the buckets.
enum Plan {
    Levels { top: i32, levels: (usize, usize) },
    Buckets,
}

/// The plan of a block whose largest magnitude's bits are `high` and
/// smallest nonzero one's bits minus one `low` (zero wraps to the largest
/// u64). None: every value is zero. NaN or ±Inf: NonFinite.
fn plan(high: u64, low: u64) -> Result<Option<Plan>, ExactError> {
    if high == 0 {
        return Ok(None);
    }
    if high >= 0x7ff0_0000_0000_0000 {
        return Err(ExactError::NonFinite);
    }
    let smallest = low.wrapping_add(1);
    if smallest < LEVELS_MIN_BITS || high > LEVELS_MAX_BITS {
        return Ok(Some(Plan::Buckets));
    }
    // |x| < 2^top; every value is a multiple of 2^lowest.
    let top = (high >> 52) as i32 - 1022;
    let lowest = (smallest >> 52) as i32 - 1075;
    let span = top - lowest;
    if span > MAX_LEVEL_SPAN {
        return Ok(Some(Plan::Buckets));
    }
    Ok(Some(Plan::Levels {
        top,
        levels: (levels_for(span), levels_for(2 * span)),
    }))
}

/// How many levels take a range of `bits` bits (at least one).
fn levels_for(bits: i32) -> usize {
    if bits <= FIRST_LEVEL_BITS {
        1
    } else {
        1 + ((bits - FIRST_LEVEL_BITS + LEVEL_BITS - 1) / LEVEL_BITS) as usize
    }
}

/// 1.5 · 2^(52 + q) as a float64 (−1072 ≤ q ≤ 969 here: always normal).
fn magic(q: i32) -> f64 {
    f64::from_bits((((q + 52 + 1023) as u64) << 52) | (1 << 51))
}

/// The level constants below 2^top: level j's unit is 2^(top − 51 − 52j).
fn constants<const N: usize>(top: i32) -> [f64; N] {
    std::array::from_fn(|j| magic(top - FIRST_LEVEL_BITS - LEVEL_BITS * j as i32))
}

/// What a block's levels sum, over all values and lanes, as integers (the
/// constants taken off): `total[j]` of level j of |x|, `negative[j]` the
/// same over the negative values, `squares[j]` of x² (hi and lo).
struct LevelSums<const LX: usize, const LS: usize> {
    total: [i128; LX],
    negative: [i128; LX],
    squares: [i128; LS],
}

impl<const LX: usize, const LS: usize> LevelSums<LX, LS> {
    /// Adds the sums (levels below 2^top for x, 2^(2·top) for x²) into
    /// `levels`, or straight into `channel` when `levels` is not `wide`.
    fn add_to(
        &self,
        top: i32,
        levels: &mut ChannelLevels,
        channel: &mut ChannelSums,
    ) -> Result<(), ExactError> {
        // Level j's unit, in the units of the sums (never negative: the
        // plan's bounds keep q above −1074 for x, −2148 for x²).
        let unit = |top: i32, j: usize, sum_unit: i32| {
            (top - FIRST_LEVEL_BITS - LEVEL_BITS * j as i32 - sum_unit) as u32
        };
        let positive: [i128; LX] = std::array::from_fn(|j| self.total[j] - self.negative[j]);
        if !levels.wide {
            // Lowest level first, carries upwards.
            let digits = |sums: &[i128], target: &mut Magnitude, top: i32, sum_unit: i32| {
                add_digits(target, sums, unit(top, sums.len() - 1, sum_unit))
            };
            digits(&positive, &mut channel.positive, top, X_UNIT)?;
            digits(&self.negative, &mut channel.negative, top, X_UNIT)?;
            return digits(&self.squares, &mut channel.squares, 2 * top, X2_UNIT);
        }
        // Each level sum is below 2^64 in magnitude (8 lanes of < 2^61).
        for (j, (&positive, &negative)) in positive.iter().zip(&self.negative).enumerate() {
            let shift = unit(top, j, X_UNIT);
            levels.positive.add(positive, shift);
            levels.negative.add(negative, shift);
        }
        for (j, &square) in self.squares.iter().enumerate() {
            levels.squares.add(square, unit(2 * top, j, X2_UNIT));
        }
        levels.settle()
    }
}

/// Adds Σ_j levels[j] · 2^(52 · (N − 1 − j) + shift) (never negative: a
/// sum of magnitudes or squares) into `target`, through base-2^52 digits.
fn add_digits(target: &mut Magnitude, levels: &[i128], shift: u32) -> Result<(), ExactError> {
    let base = 1i128 << LEVEL_BITS;
    let mut carry = 0i128;
    let mut shift = shift;
    for &level in levels.iter().rev() {
        let value = level + carry;
        target.add_shifted(value.rem_euclid(base) as u128, shift);
        carry = value.div_euclid(base);
        shift += LEVEL_BITS as u32;
    }
    if carry < 0 {
        return Err(ExactError::Torch(
            "internal: an exact float64 block sum is negative".into(),
        ));
    }
    target.add_shifted(carry as u128, shift);
    Ok(())
}

/// Slots of a channel's level sums in a batch (base-2^32 digits): the sum
/// of x (at most 2^64 values below 2^510, units of 2^-1074) is below
/// 2^1648, 52 digits, and the highest level unit is 2^(459 + 1074) (slot
/// 47, + 2 < 54); the sum of x² is below 2^(64 + 1020 + 2148), 101 digits,
/// its highest unit 2^(969 + 2148) (slot 97, + 2 < 102).
const X_SLOTS: usize = 54;
const X2_SLOTS: usize = 102;

/// One channel's level sums during a batch, added to its `ChannelSums`
/// at the end; or, for channels of a few blocks (`wide` false), no sums:
/// each block's go straight into the `ChannelSums` (a few big-integer
/// additions per block, cheaper than preparing and emptying these wide
/// integers for so few).
struct ChannelLevels {
    wide: bool,
    positive: Wide<X_SLOTS>,
    negative: Wide<X_SLOTS>,
    squares: Wide<X2_SLOTS>,
}

/// Channels of more values than this keep their level sums in wide
/// integers during the batch.
const WIDE_FROM: usize = 4 * BLOCK;

impl ChannelLevels {
    fn new(values_per_channel: usize) -> ChannelLevels {
        ChannelLevels {
            wide: values_per_channel > WIDE_FROM,
            positive: Wide::ZERO,
            negative: Wide::ZERO,
            squares: Wide::ZERO,
        }
    }

    /// Resolves the carries when they are due (between blocks, when every
    /// sum is one of whole values: never negative).
    fn settle(&mut self) -> Result<(), ExactError> {
        if self.positive.is_due() || self.negative.is_due() || self.squares.is_due() {
            self.normalize()?;
        }
        Ok(())
    }

    fn normalize(&mut self) -> Result<(), ExactError> {
        if self.positive.normalize() & self.negative.normalize() & self.squares.normalize() {
            Ok(())
        } else {
            Err(ExactError::Torch(
                "internal: an exact float64 sum left its range".into(),
            ))
        }
    }

    /// Adds the level sums into `channel`'s (and empties them).
    fn add_into(&mut self, channel: &mut ChannelSums) -> Result<(), ExactError> {
        if !self.wide {
            return Ok(());
        }
        self.normalize()?;
        channel.positive.add(&self.positive.to_magnitude(0));
        channel.negative.add(&self.negative.to_magnitude(0));
        channel.squares.add(&self.squares.to_magnitude(0));
        self.positive = Wide::ZERO;
        self.negative = Wide::ZERO;
        self.squares = Wide::ZERO;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
