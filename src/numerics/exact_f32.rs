//! The float32 accumulation behind [`super::exact::ExactSums::of_batch`]:
//! every value and its square added, without rounding, into per-channel
//! integer sums. It owns the speed of exact statistics for float32 (and the
//! float16/bfloat16 inputs widened to it); the representation, the merge
//! and the rounding are `exact`'s.
//!
//! A channel's values go through blocks of at most [`BLOCK`] values. A
//! cheap first pass over a block finds its largest and smallest nonzero
//! magnitude (and refuses NaN and ±Inf); then one of two exact methods adds
//! the block:
//!
//! - **Levels** (blocks whose magnitudes span a few binary orders, the
//!   common case): a float32 value widened to float64 is exact, and so is
//!   its square (a 48-bit significand). Adding the constant C = 1.5·2^(52+q)
//!   to a float64 v with |v| < 2^(51+q) rounds v to a multiple of 2^q and
//!   puts that multiple, as an integer, in the low bits of the sum's
//!   representation: `bits(v + C) − bits(C)` is it exactly, and
//!   `v − ((v + C) − C)` is the exact remainder, below 2^q in magnitude. So
//!   each level takes 51 bits of every value as an integer (summed in i64
//!   lanes: branch-free, the compiler vectorizes it), and the remainders go
//!   to the next level, 51 bits lower, until the block's smallest bit is
//!   reached. The number of levels follows from the block's exponent range
//!   (one for x and two for x² when it spans at most 27 binary orders).
//!   The rounding mode does not matter (any rounding of v + C keeps the
//!   integer and the remainder exact), and no float64 here is subnormal;
//!   blocks with float32 subnormals take the buckets, which never convert.
//! - **Buckets** (wide blocks, and blocks with subnormals): significands
//!   added as integers into buckets indexed by sign and exponent bits, then
//!   each bucket shifted in once per block.
//!
//! Both add into carry-save wide integers (32-bit digits in i64 slots,
//! carries resolved once per block), turned into the exact sums' magnitudes
//! once per batch. Every path is exact, so the result does not depend on
//! which one a block took, nor on the block boundaries.
//!
//! The baseline x86-64 build has 2 float64 lanes per instruction; on CPUs
//! with AVX2 (checked once per call) the same code compiled for AVX2 runs
//! instead, with 4: the same exact integers, about twice as fast.
//!
//! Plain slices and integers only: no tensors, no sessions, no I/O.

use super::exact::{ChannelSums, ExactError, Layout, Magnitude};

/// Values per block: per lane at most BLOCK/LANES level integers of at most
/// 2^51 (sum < 2^61 in an i64), and at most BLOCK bucket significands
/// (squares sum < 2^12 · 2^48 in a u64).
const BLOCK: usize = 4096;
/// Runs at least this long are added in place; shorter ones are gathered
/// into blocks (fewer, fuller blocks).
const DIRECT_RUN: usize = 512;
/// Independent accumulator lanes (SIMD lanes for the levels; separate
/// buckets, so that equal exponents in a row do not wait on each other).
const LANES: usize = 4;
/// Bits of every value a level takes.
const LEVEL_BITS: i32 = 51;
/// The sums of x are kept in units of 2^-149 (float32's smallest
/// subnormal), those of x² in units of 2^-298, until the end of the batch.
const X_UNIT: i32 = -149;
const X2_UNIT: i32 = -298;
/// Shifts from those units to `exact`'s (2^-1074 and 2^-2148).
const X_TO_EXACT: u32 = 1074 - 149;
const X2_TO_EXACT: u32 = 2148 - 298;
/// Runs shorter than this ((N, C) tables, small images) are read in row
/// blocks of at most ROW_BLOCK_BYTES, each made channel-major in a scratch
/// buffer while it is in cache ...
const SHORT_RUN: usize = 64;
const ROW_BLOCK_BYTES: usize = 256 * 1024;
/// ... when such a row block still has this many rows; otherwise (thousands
/// of channels) `exact` makes the input channel-major first.
const MIN_GATHER_ROWS: usize = 128;

/// Whether [`accumulate`] reads a (N, C, inner) buffer with short runs in
/// place (row blocks); false: the caller should make it channel-major.
pub(super) fn reads_short_runs_in_place(channels: usize, inner: usize) -> bool {
    rows_per_block(channels, inner) >= MIN_GATHER_ROWS
}

fn rows_per_block(channels: usize, inner: usize) -> usize {
    let row_bytes = channels.saturating_mul(inner).saturating_mul(4).max(1);
    (ROW_BLOCK_BYTES / row_bytes).min(BLOCK / inner.max(1))
}

/// A signed integer in carry-save form: slot i holds a base-2^32 digit plus
/// not yet propagated (signed) carries.
#[derive(Clone)]
struct Wide<const N: usize>([i64; N]);

impl<const N: usize> Wide<N> {
    const ZERO: Wide<N> = Wide([0; N]);

    /// Adds `value · 2^shift`; |value| < 2^66, shift / 32 + 2 < N (the
    /// callers' bounds, stated at the slot counts below).
    #[inline]
    fn add(&mut self, value: i128, shift: u32) {
        let at = (shift / 32) as usize;
        let v = value << (shift % 32);
        self.0[at] += (v & 0xffff_ffff) as i64;
        self.0[at + 1] += ((v >> 32) & 0xffff_ffff) as i64;
        self.0[at + 2] += (v >> 64) as i64;
    }

    /// Resolves the carries: every slot a digit in [0, 2^32). False when the
    /// value is negative or does not fit (an internal error: sums of
    /// magnitudes are never negative and the slot counts bound them).
    fn normalize(&mut self) -> bool {
        let mut carry = 0i64;
        for slot in self.0.iter_mut() {
            let v = *slot + carry;
            *slot = v & 0xffff_ffff;
            carry = v >> 32;
        }
        carry == 0
    }

    /// The (normalized) value times 2^shift.
    fn to_magnitude(&self, shift: u32) -> Magnitude {
        let word = (shift / 64) as usize;
        let bit = (shift % 64) as usize;
        let mut limbs = vec![0u64; word + N / 2 + 2];
        for (i, &digit) in self.0.iter().enumerate() {
            let position = bit + 32 * i;
            let v = u128::from(digit as u64) << (position % 64);
            limbs[word + position / 64] |= v as u64;
            limbs[word + position / 64 + 1] |= (v >> 64) as u64;
        }
        Magnitude::from_limbs(limbs)
    }
}

/// Slots: a batch has at most 2^64 values per channel; |x| < 2^128, so
/// the sum of x in units of 2^-149 is below 2^341 (11 digits), and the sum
/// of x² in units of 2^-298 below 2^618 (20 digits); one more for the
/// carry-save headroom, and room for the highest shift (x: 2^253 from a
/// bucket, 253/32 + 2 < 14; x²: 2^506, 506/32 + 2 < 22).
const X_SLOTS: usize = 14;
const X2_SLOTS: usize = 22;

/// One channel's sums during a batch.
#[derive(Clone)]
struct ChannelWide {
    positive: Wide<X_SLOTS>,
    negative: Wide<X_SLOTS>,
    squares: Wide<X2_SLOTS>,
}

impl ChannelWide {
    const ZERO: ChannelWide = ChannelWide {
        positive: Wide::ZERO,
        negative: Wide::ZERO,
        squares: Wide::ZERO,
    };

    fn normalize(&mut self) -> Result<(), ExactError> {
        let ok = self.positive.normalize() & self.negative.normalize() & self.squares.normalize();
        if ok {
            Ok(())
        } else {
            Err(ExactError::Torch(
                "internal: an exact float32 sum left its range".into(),
            ))
        }
    }

    fn into_sums(mut self) -> Result<ChannelSums, ExactError> {
        self.normalize()?;
        Ok(ChannelSums {
            positive: self.positive.to_magnitude(X_TO_EXACT),
            negative: self.negative.to_magnitude(X_TO_EXACT),
            squares: self.squares.to_magnitude(X2_TO_EXACT),
        })
    }
}

/// Bucket sums of one block: [sign and exponent bits][lane] -> (sum of
/// significands, sum of their squares). Empty between blocks; allocated
/// (32 KiB) by the first block that needs them.
#[derive(Default)]
struct Buckets(Option<Box<[[[u64; 2]; LANES]; 512]>>);

impl Buckets {
    /// Adds `block` (exponent bits of its nonzero values in
    /// `low..=high`) into `wide`.
    #[inline(always)]
    fn add(&mut self, block: &[f32], low: u32, high: u32, wide: &mut ChannelWide) {
        let cells = &mut **self
            .0
            .get_or_insert_with(|| Box::new([[[0; 2]; LANES]; 512]));
        let mut add = |lane: usize, x: f32| {
            let bits = x.to_bits();
            let index = (bits >> 23) as usize & 511;
            let significand =
                u64::from(bits & 0x7f_ffff) | (u64::from(bits & 0x7f80_0000 != 0) << 23);
            let cell = &mut cells[index][lane];
            cell[0] += significand;
            cell[1] += significand * significand;
        };
        let mut quads = block.chunks_exact(LANES);
        for quad in &mut quads {
            for (lane, &x) in quad.iter().enumerate() {
                add(lane, x);
            }
        }
        for &x in quads.remainder() {
            add(0, x);
        }
        // Zeros went to buckets 0 and 256 and added nothing; the buckets
        // outside low..=high hold only those zeros.
        for exponent_bits in low..=high.min(0xfe) {
            // x = m · 2^(max(e, 1) − 150): subnormals share exponent 1's scale.
            let shift = exponent_bits.max(1) - 1;
            let mut squares = 0u128;
            for (sign, target) in [(0, &mut wide.positive), (0x100, &mut wide.negative)] {
                let cell = &mut cells[sign | exponent_bits as usize];
                let (mut sum, mut sum_squares) = (0u128, 0u128);
                for lane in cell.iter_mut() {
                    sum += u128::from(lane[0]);
                    sum_squares += u128::from(lane[1]);
                    *lane = [0, 0];
                }
                // sum < 2^36, squares < 2^60 per lane: both fit the i128.
                target.add(sum as i128, shift);
                squares += sum_squares;
            }
            wide.squares.add(squares as i128, 2 * shift);
        }
    }
}

/// 1.5 · 2^(52 + q) as a float64 (−246 ≤ q ≤ 205 here: always normal).
fn magic(q: i32) -> f64 {
    f64::from_bits((((q + 52 + 1023) as u64) << 52) | (1 << 51))
}

/// The level integers of LANES values: `total[j]` and `negative[j]` sum
/// the j-th level's integers of |x| (over all values, and over the negative
/// ones), `squares[j]` the raw bits of the j-th level's sums for x² (the
/// constant's bits are taken off once per block).
#[inline(always)]
fn levels_step<const LX: usize, const LS: usize>(
    quad: &[f32; LANES],
    cx: &[f64; LX],
    cs: &[f64; LS],
    total: &mut [[i64; LANES]; LX],
    negative: &mut [[i64; LANES]; LX],
    squares: &mut [[i64; LANES]; LS],
) {
    let mut a = [0f64; LANES];
    let mut sign = [0i64; LANES];
    let mut s = [0f64; LANES];
    for lane in 0..LANES {
        let x = f64::from(quad[lane]);
        sign[lane] = -i64::from(x < 0.0);
        a[lane] = x.abs();
        s[lane] = a[lane] * a[lane];
    }
    for j in 0..LX {
        for lane in 0..LANES {
            let t = a[lane] + cx[j];
            let n = (t.to_bits() as i64).wrapping_sub(cx[j].to_bits() as i64);
            total[j][lane] = total[j][lane].wrapping_add(n);
            negative[j][lane] = negative[j][lane].wrapping_add(n & sign[lane]);
            a[lane] -= t - cx[j];
        }
    }
    for j in 0..LS {
        for lane in 0..LANES {
            let t = s[lane] + cs[j];
            squares[j][lane] = squares[j][lane].wrapping_add(t.to_bits() as i64);
            s[lane] -= t - cs[j];
        }
    }
}

/// Adds `block` by levels: x at the exponents `qx`, x² at `qs` (each level
/// 51 bits below the one before, the last at or below the block's lowest
/// bit, so that nothing remains).
#[inline(always)]
fn add_levels<const LX: usize, const LS: usize>(
    block: &[f32],
    qx: [i32; LX],
    qs: [i32; LS],
    wide: &mut ChannelWide,
) {
    let cx = qx.map(magic);
    let cs = qs.map(magic);
    let mut total = [[0i64; LANES]; LX];
    let mut negative = [[0i64; LANES]; LX];
    let mut squares = [[0i64; LANES]; LS];
    let mut quads = block.chunks_exact(LANES);
    let mut steps = 0i64;
    for quad in &mut quads {
        let mut values = [0f32; LANES];
        values.copy_from_slice(quad);
        levels_step(&values, &cx, &cs, &mut total, &mut negative, &mut squares);
        steps += 1;
    }
    let rest = quads.remainder();
    if !rest.is_empty() {
        // Zeros take nothing from any level.
        let mut values = [0f32; LANES];
        values[..rest.len()].copy_from_slice(rest);
        levels_step(&values, &cx, &cs, &mut total, &mut negative, &mut squares);
        steps += 1;
    }
    // The lane sums are exact modulo 2^64 and below 2^63 in magnitude, so
    // the wrapped i64 is the sum.
    for j in 0..LX {
        let all: i128 = total[j].iter().map(|&v| i128::from(v)).sum();
        let negatives: i128 = negative[j].iter().map(|&v| i128::from(v)).sum();
        let shift = (qx[j] - X_UNIT) as u32;
        wide.positive.add(all - negatives, shift);
        wide.negative.add(negatives, shift);
    }
    for j in 0..LS {
        let constant = cs[j].to_bits() as i64;
        let sum: i128 = squares[j]
            .iter()
            .map(|&v| i128::from(v.wrapping_sub(constant.wrapping_mul(steps))))
            .sum();
        wide.squares.add(sum, (qs[j] - X2_UNIT) as u32);
    }
}

/// Adds one block of a channel's values; NaN or ±Inf: NonFinite.
#[inline(always)]
fn add_block(
    block: &[f32],
    buckets: &mut Buckets,
    wide: &mut ChannelWide,
) -> Result<(), ExactError> {
    // The largest magnitude's bits, and the smallest nonzero one's minus one
    // (zero wraps to the largest u32, so it never is the minimum).
    let (mut low, mut high) = (u32::MAX, 0u32);
    for &x in block {
        let magnitude = x.to_bits() & 0x7fff_ffff;
        low = low.min(magnitude.wrapping_sub(1));
        high = high.max(magnitude);
    }
    if high >= 0x7f80_0000 {
        return Err(ExactError::NonFinite);
    }
    if high == 0 {
        return Ok(());
    }
    let high_exponent = high >> 23;
    let low_exponent = low.wrapping_add(1) >> 23;
    if low_exponent == 0 {
        // Subnormals: integers only (see the module docs).
        buckets.add(block, low_exponent, high_exponent, wide);
        return wide.normalize();
    }
    // |x| < 2^top; every value is a multiple of 2^lowest.
    let top = high_exponent as i32 - 126;
    let lowest = low_exponent as i32 - 150;
    let qx0 = top - LEVEL_BITS;
    let qs0 = 2 * top - LEVEL_BITS;
    let levels =
        |first: i32, lowest: i32| 1 + ((first - lowest).max(0) as u32).div_ceil(LEVEL_BITS as u32);
    let qx = |j: i32| (qx0 - LEVEL_BITS * j).max(X_UNIT);
    let qs = |j: i32| (qs0 - LEVEL_BITS * j).max(X2_UNIT);
    match (levels(qx0, lowest), levels(qs0, 2 * lowest)) {
        (1, 1) => add_levels(block, [qx(0)], [qs(0)], wide),
        (1, 2) => add_levels(block, [qx(0)], [qs(0), qs(1)], wide),
        (2, 3) => add_levels(block, [qx(0), qx(1)], [qs(0), qs(1), qs(2)], wide),
        (2, 4) => add_levels(block, [qx(0), qx(1)], [qs(0), qs(1), qs(2), qs(3)], wide),
        // Over ~53 binary orders: more levels would cost more than buckets.
        _ => buckets.add(block, low_exponent, high_exponent, wide),
    }
    wide.normalize()
}

/// Rows per tile of the (N, C) transposition: a tile's rows are read
/// together while each channel's values are written as one cache line.
const TILE_ROWS: usize = 16;

/// (rows, C, inner) values into (C, rows · inner), row `c` of the result at
/// `out[c * stride..]` (a stride a little above rows · inner, so that the
/// rows do not all fall in the same cache sets).
#[inline(always)]
fn transpose(rows: &[f32], channels: usize, inner: usize, out: &mut [f32], stride: usize) {
    if inner == 1 {
        for (t, tile) in rows.chunks(TILE_ROWS * channels).enumerate() {
            let n = tile.len() / channels;
            for c in 0..channels {
                let start = c * stride + t * TILE_ROWS;
                for (r, slot) in out[start..start + n].iter_mut().enumerate() {
                    *slot = tile[r * channels + c];
                }
            }
        }
        return;
    }
    for (r, row) in rows.chunks_exact(channels * inner).enumerate() {
        for (c, values) in row.chunks_exact(inner).enumerate() {
            let start = c * stride + r * inner;
            out[start..start + inner].copy_from_slice(values);
        }
    }
}

/// Adds a contiguous (N, C, inner) float32 buffer into `sums` (one per
/// channel, empty). NaN or ±Inf anywhere: NonFinite.
pub(super) fn accumulate(
    data: &[f32],
    layout: &Layout,
    sums: &mut [ChannelSums],
) -> Result<(), ExactError> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: `accumulate_avx2` only needs AVX2, which this CPU has
        // (checked just above); it is otherwise the same safe code.
        #[allow(unsafe_code)]
        return unsafe { accumulate_avx2(data, layout, sums) };
    }
    accumulate_portable(data, layout, sums)
}

/// [`accumulate_portable`] compiled for AVX2 (4 float64 lanes per
/// instruction where the baseline x86-64 has 2): the same operations on the
/// same integers, so the same sums, about twice as fast.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn accumulate_avx2(
    data: &[f32],
    layout: &Layout,
    sums: &mut [ChannelSums],
) -> Result<(), ExactError> {
    accumulate_portable(data, layout, sums)
}

/// [`accumulate`] for any CPU; inlined, with everything it calls, into the
/// AVX2 build.
#[inline(always)]
fn accumulate_portable(
    data: &[f32],
    layout: &Layout,
    sums: &mut [ChannelSums],
) -> Result<(), ExactError> {
    let mut buckets = Buckets::default();
    let mut scratch: Vec<f32> = Vec::with_capacity(BLOCK);
    let mut wides = vec![ChannelWide::ZERO; layout.channels];
    if layout.inner < SHORT_RUN && layout.batch > 1 {
        // Row blocks, each made channel-major in `scratch` (while it is in
        // cache), then one block per channel.
        let rows = rows_per_block(layout.channels, layout.inner).max(1);
        let (channels, inner) = (layout.channels, layout.inner);
        for row_block in data.chunks(rows * channels * inner) {
            let run = row_block.len() / channels;
            let stride = run + TILE_ROWS;
            scratch.clear();
            scratch.resize(stride * channels, 0.0);
            transpose(row_block, channels, inner, &mut scratch, stride);
            for (wide, block) in wides.iter_mut().zip(scratch.chunks_exact(stride)) {
                add_block(&block[..run], &mut buckets, wide)?;
            }
        }
    } else {
        // Channel-major: long runs in blocks, short ones gathered.
        for (c, wide) in wides.iter_mut().enumerate() {
            scratch.clear();
            for run in layout.runs(data, c) {
                if run.len() >= DIRECT_RUN {
                    for block in run.chunks(BLOCK) {
                        add_block(block, &mut buckets, wide)?;
                    }
                    continue;
                }
                if scratch.len() + run.len() > BLOCK {
                    add_block(&scratch, &mut buckets, wide)?;
                    scratch.clear();
                }
                scratch.extend_from_slice(run);
            }
            add_block(&scratch, &mut buckets, wide)?;
        }
    }
    for (sum, wide) in sums.iter_mut().zip(wides) {
        *sum = wide.into_sums()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use num_bigint::{BigInt, BigUint};
    use num_traits::Zero;
    use tch::Tensor;

    use super::super::exact::{ExactError, ExactSums};

    /// The textbook exact sums of float32 values, as integers of 2^-1074
    /// (Σx, signed) and 2^-2148 (Σx²): the oracle.
    fn oracle(values: &[f32]) -> (BigInt, BigUint) {
        let (mut s1, mut s2) = (BigInt::zero(), BigInt::zero());
        for &x in values {
            let bits = x.to_bits();
            let exponent = ((bits >> 23) & 0xff) as usize;
            let m = BigInt::from((bits & 0x7f_ffff) | (u32::from(exponent != 0) << 23));
            // x = m · 2^(max(e, 1) − 150) = m · 2^(max(e, 1) + 924) units of 2^-1074.
            let shift = exponent.max(1) + 924;
            let m = if x.is_sign_negative() { -m } else { m };
            s1 += &m << shift;
            s2 += (&m * &m) << (2 * shift);
        }
        (s1, s2.magnitude().clone())
    }

    /// The oracle's sums of positive and of negative values separately.
    fn oracle_split(values: &[f32]) -> (BigUint, BigUint, BigUint) {
        let positives: Vec<f32> = values.iter().copied().filter(|x| *x > 0.0).collect();
        let negatives: Vec<f32> = values.iter().map(|x| -x).filter(|x| *x > 0.0).collect();
        let (p, s2) = oracle(&positives);
        let (n, _) = oracle(&negatives);
        let all = oracle(values).1;
        assert_eq!(&all, &(s2 + oracle(&negatives).1));
        (p.magnitude().clone(), n.magnitude().clone(), all)
    }

    /// `values` as a (N, C, L) batch: channel c of sample n holds
    /// `values[c][n * L..(n + 1) * L]`.
    fn batch(channels: &[Vec<f32>], n: usize, l: usize) -> Tensor {
        let mut data = Vec::with_capacity(channels.len() * n * l);
        for sample in 0..n {
            for channel in channels {
                data.extend_from_slice(&channel[sample * l..(sample + 1) * l]);
            }
        }
        let shape: Vec<i64> = if l == 1 {
            vec![n as i64, channels.len() as i64]
        } else {
            vec![n as i64, channels.len() as i64, l as i64]
        };
        Tensor::from_slice(&data).reshape(shape)
    }

    /// Checks every channel of `channels` as a (N, C, L) batch against the
    /// oracle.
    fn check(channels: &[Vec<f32>], n: usize, l: usize) {
        let sums = ExactSums::of_batch(&batch(channels, n, l)).unwrap();
        assert_eq!(sums.count, (n * l) as u64);
        for (c, values) in channels.iter().enumerate() {
            let (p, q, s2) = oracle_split(values);
            let got = &sums.channels[c];
            assert_eq!(
                got.positive.to_biguint(),
                p,
                "channel {c}: sum of positives"
            );
            assert_eq!(
                got.negative.to_biguint(),
                q,
                "channel {c}: sum of negatives"
            );
            assert_eq!(got.squares.to_biguint(), s2, "channel {c}: sum of squares");
        }
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// A float32 with exponent bits in `low..=high`, a random
        /// significand (all ones or all zeros one time in four) and sign.
        fn value(&mut self, low: u32, high: u32) -> f32 {
            let r = self.next();
            let exponent = low + (r % u64::from(high - low + 1)) as u32;
            let significand = match (r >> 20) % 8 {
                0 => 0x7f_ffff,
                1 => 0,
                _ => (r >> 32) as u32 & 0x7f_ffff,
            };
            let sign = ((r >> 30) & 1) as u32;
            f32::from_bits(sign << 31 | exponent << 23 | significand)
        }
    }

    #[test]
    fn every_level_count_and_the_buckets_are_exact_at_their_range_boundaries() {
        // Blocks spanning 0 to 120 binary orders (the level counts switch at
        // 1, 26-28, 52-54, 78-80 orders; beyond, buckets), placed at the top,
        // middle and bottom of float32's range, the extremes always present
        // with full significands.
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        let mut channels = Vec::new();
        for span in (0..=30).chain([51, 52, 53, 54, 55, 77, 78, 79, 80, 81, 104, 120]) {
            for high in [254u32, 140, span + 1] {
                let low = high - span;
                let mut values: Vec<f32> = (0..509).map(|_| random.value(low, high)).collect();
                values.push(f32::from_bits(high << 23 | 0x7f_ffff));
                values.push(-f32::from_bits(low << 23 | 0x7f_ffff));
                values.push(f32::from_bits(low << 23 | 1));
                channels.push(values);
            }
        }
        check(&channels, 512, 1);
        check(&channels, 8, 64);
    }

    #[test]
    fn subnormals_zeros_and_cancellation_are_exact() {
        let tiny = f32::from_bits(1);
        let values = vec![
            tiny,
            -tiny,
            f32::from_bits(0x7f_ffff),
            0.0,
            -0.0,
            f32::MAX,
            -f32::MAX,
            1.0,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            3.0e-39,
            16_777_215.0,
            -16_777_216.0,
            1.0e-7,
        ];
        let mut channels = vec![values.clone()];
        // All zeros, only signed zeros, and huge values that cancel.
        channels.push(vec![0.0; values.len()]);
        channels.push([0.0, -0.0].repeat(values.len() / 2));
        channels.push([f32::MAX, -f32::MAX].repeat(values.len() / 2));
        check(&channels, values.len(), 1);
        check(&channels, 2, values.len() / 2);
    }

    #[test]
    fn block_and_lane_boundaries_do_not_lose_values() {
        // Channels with 4095..=4097 values and odd run lengths exercise the
        // remainder lanes, the block cuts and the gathering of runs.
        let mut random = Random(42);
        for (n, l) in [
            (1, 4095),
            (1, 4097),
            (3, 1365),
            (63, 65),
            (4097, 1),
            (3, 4099),
        ] {
            let channels: Vec<Vec<f32>> = (0..3)
                .map(|c| {
                    (0..n * l)
                        .map(|_| random.value(100 + c, 130 + 20 * c))
                        .collect()
                })
                .collect();
            check(&channels, n, l);
        }
    }

    #[test]
    fn wide_random_data_matches_the_oracle_in_every_layout() {
        // Typical, log-normal-like and relu-like values, in the (N, C) row
        // blocks, the channel-major path and the transposed one (many
        // channels).
        let mut random = Random(7);
        let mut channels: Vec<Vec<f32>> = Vec::new();
        for c in 0..8u32 {
            let values = (0..3000)
                .map(|i| match c % 3 {
                    0 => random.value(120, 128),
                    1 => random.value(60, 200),
                    _ if i % 2 == 0 => 0.0,
                    _ => random.value(110, 130).abs(),
                })
                .collect();
            channels.push(values);
        }
        check(&channels, 3000, 1);
        check(&channels, 30, 100);
        check(&channels, 1, 3000);
        let many: Vec<Vec<f32>> = (0..600)
            .map(|_| (0..300).map(|_| random.value(90, 160)).collect())
            .collect();
        check(&many, 300, 1);
    }

    #[test]
    fn non_finite_values_are_refused_in_every_path() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for (n, l) in [(4, 1), (1, 5000), (2, 70)] {
                let mut values = vec![1.5f32; n * l];
                values[n * l - 1] = bad;
                let t = batch(&[values], n, l);
                assert_eq!(ExactSums::of_batch(&t), Err(ExactError::NonFinite));
            }
        }
    }
}
