//! The integer side of the float32 accumulation: carry-save wide integers
//! (one channel's sums during a batch; `exact_f64`'s levels use them too)
//! and the exponent buckets of the lanes the levels do not take. No
//! floating point.

use super::super::exact::{ChannelSums, ExactError, Magnitude};
use super::lanes::Vectors;
use super::{BLOCK, X2_LOWEST, X2_UNIT, X_LOWEST, X_UNIT};

/// 64-bit words from the accumulation's units to `exact`'s (2^-1074,
/// 2^-2148).
const X_TO_EXACT: usize = ((1074 + X_UNIT) / 64) as usize;
const X2_TO_EXACT: usize = ((2148 + X2_UNIT) / 64) as usize;
/// A bucket's scale (2^-149 for x, 2^-298 for x²) in those units.
const BUCKET_X_SHIFT: u32 = (X_LOWEST - X_UNIT) as u32;
const BUCKET_X2_SHIFT: u32 = (X2_LOWEST - X2_UNIT) as u32;
const _: () = assert!((1074 + X_UNIT) % 64 == 0 && (2148 + X2_UNIT) % 64 == 0);
/// A wide integer's carries are resolved after this many additions (each
/// adds less than 2^34 to a slot: far from an i64's limit).
const NORMALIZE_EVERY: u32 = 1 << 20;

/// A signed integer in carry-save form: slot i holds a base-2^32 digit plus
/// not yet propagated (signed) carries.
#[derive(Clone)]
pub(in crate::numerics) struct Wide<const N: usize> {
    slots: [i64; N],
    /// Additions since the carries were last resolved.
    adds: u32,
}

impl<const N: usize> Wide<N> {
    pub(in crate::numerics) const ZERO: Wide<N> = Wide {
        slots: [0; N],
        adds: 0,
    };

    /// Adds `value · 2^shift`; |value| < 2^66, shift / 32 + 2 < N (the
    /// callers' bounds, stated at the slot counts below).
    #[inline]
    pub(in crate::numerics) fn add(&mut self, value: i128, shift: u32) {
        let at = (shift / 32) as usize;
        let v = value << (shift % 32);
        self.slots[at] += (v & 0xffff_ffff) as i64;
        self.slots[at + 1] += ((v >> 32) & 0xffff_ffff) as i64;
        self.slots[at + 2] += (v >> 64) as i64;
        self.adds += 1;
    }

    /// Whether the carries are due to be resolved (see NORMALIZE_EVERY).
    pub(in crate::numerics) fn is_due(&self) -> bool {
        self.adds >= NORMALIZE_EVERY
    }

    /// Resolves the carries: every slot a digit in [0, 2^32). False when the
    /// value is negative or does not fit (an internal error: sums of
    /// magnitudes are never negative and the slot counts bound them).
    pub(in crate::numerics) fn normalize(&mut self) -> bool {
        let mut carry = 0i64;
        for slot in self.slots.iter_mut() {
            let v = *slot + carry;
            *slot = v & 0xffff_ffff;
            carry = v >> 32;
        }
        self.adds = 0;
        carry == 0
    }

    /// The (normalized) value times 2^(64 · words).
    pub(in crate::numerics) fn to_magnitude(&self, words: usize) -> Magnitude {
        let mut limbs = Vec::with_capacity(words + N.div_ceil(2));
        limbs.resize(words, 0);
        limbs.extend(self.slots.chunks(2).map(|pair| {
            pair.iter()
                .rev()
                .fold(0u64, |limb, &digit| (limb << 32) | digit as u64)
        }));
        Magnitude::from_limbs(limbs)
    }
}

/// Slots: a batch has at most 2^64 values per channel; |x| < 2^128, so
/// the sum of x in units of 2^-178 is below 2^370 (12 digits), and the sum
/// of x² in units of 2^-356 below 2^676 (22 digits); and room for the
/// highest shift (x: 2^282 from a bucket, 282/32 + 2 < 14; x²: 2^564,
/// 564/32 + 2 < 22).
const X_SLOTS: usize = 14;
const X2_SLOTS: usize = 22;

/// One channel's sums during a batch: of the positive values, of |x| over
/// the negative ones, and of the squares.
#[derive(Clone)]
pub(super) struct ChannelWide {
    pub(super) positive: Wide<X_SLOTS>,
    pub(super) negative: Wide<X_SLOTS>,
    pub(super) squares: Wide<X2_SLOTS>,
}

impl ChannelWide {
    pub(super) const ZERO: ChannelWide = ChannelWide {
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

    /// Resolves the carries when they are due; called between blocks, when
    /// every sum is one of whole values (never negative).
    #[inline]
    pub(super) fn settle(&mut self) -> Result<(), ExactError> {
        if self.positive.is_due() || self.negative.is_due() || self.squares.is_due() {
            self.normalize()?;
        }
        Ok(())
    }

    pub(super) fn into_sums(mut self) -> Result<ChannelSums, ExactError> {
        self.normalize()?;
        Ok(ChannelSums {
            positive: self.positive.to_magnitude(X_TO_EXACT),
            negative: self.negative.to_magnitude(X_TO_EXACT),
            squares: self.squares.to_magnitude(X2_TO_EXACT),
        })
    }
}

/// Bucket sums: [sign and exponent bits][slot] -> (sum of significands,
/// sum of their squares). Empty between uses; allocated (32 KiB) by the
/// first lane that needs them.
#[derive(Default)]
struct Buckets(Option<Box<[[[u64; 2]; 4]; 512]>>);

impl Buckets {
    /// Adds `values` (at most BLOCK of them, exponent bits of the nonzero
    /// ones in `low..=high`) into `wide`.
    fn add(&mut self, values: &[f32], low: u32, high: u32, wide: &mut ChannelWide) {
        let cells = &mut **self.0.get_or_insert_with(|| Box::new([[[0; 2]; 4]; 512]));
        // Four slots per bucket, so that equal exponents in a row do not
        // wait on each other.
        let mut add = |slot: usize, x: f32| {
            let bits = x.to_bits();
            let index = (bits >> 23) as usize & 511;
            let significand =
                u64::from(bits & 0x7f_ffff) | (u64::from(bits & 0x7f80_0000 != 0) << 23);
            let cell = &mut cells[index][slot];
            cell[0] += significand;
            cell[1] += significand * significand;
        };
        let mut quads = values.chunks_exact(4);
        for quad in &mut quads {
            for (slot, &x) in quad.iter().enumerate() {
                add(slot, x);
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
            let (x_shift, x2_shift) = (BUCKET_X_SHIFT + shift, BUCKET_X2_SHIFT + 2 * shift);
            let mut squares = 0u128;
            for (sign, target) in [(0, &mut wide.positive), (0x100, &mut wide.negative)] {
                let cell = &mut cells[sign | exponent_bits as usize];
                let (mut sum, mut sum_squares) = (0u128, 0u128);
                for slot in cell.iter_mut() {
                    sum += u128::from(slot[0]);
                    sum_squares += u128::from(slot[1]);
                    *slot = [0, 0];
                }
                // sum < 2^36, squares < 2^60 per slot: both fit the i128.
                target.add(sum as i128, x_shift);
                squares += sum_squares;
            }
            wide.squares.add(squares as i128, x2_shift);
        }
    }
}

/// The lanes that take the buckets: their values gathered, then bucketed.
#[derive(Default)]
pub(super) struct Spill {
    buckets: Buckets,
    values: Vec<f32>,
}

impl Spill {
    /// Adds lane `lane` of `vectors` (exponent bits of its nonzero values
    /// in `low..=high`) into `wide`.
    pub(super) fn add_lane<const L: usize>(
        &mut self,
        vectors: &Vectors<L>,
        lane: usize,
        low: u32,
        high: u32,
        wide: &mut ChannelWide,
    ) {
        let Spill { buckets, values } = self;
        values.clear();
        values.extend(vectors.iter().map(|vector| vector[lane]));
        for block in values.chunks(BLOCK) {
            buckets.add(block, low, high, wide);
        }
    }
}
