//! The float32 accumulation behind [`super::exact::ExactSums::of_batch`]:
//! every value and its square added, without rounding, into per-channel
//! integer sums. It owns the speed of exact statistics for float32 (and the
//! float16/bfloat16 inputs widened to it); the representation, the merge
//! and the rounding are `exact`'s.
//!
//! **Lanes.** Values are read as vectors of L float32 values (8 with
//! AVX-512, 4 otherwise); each lane has its own scale and its own integer
//! accumulators, and its sums go to its own channel at the end of a block.
//! Two ways of cutting the input into such vectors, both reading it in
//! place:
//!
//! - **Channel runs** (images: runs of at least 64 values of one channel):
//!   blocks of at most [`BLOCK`] values of one channel (shorter runs
//!   gathered into one block), consecutive values in consecutive lanes.
//! - **Tables** ((N, C), and (N, C, L) with L < 64): the input read as rows
//!   of C · L columns, one lane per column: a vector is L neighbouring
//!   columns of one row, the next vector the same columns of the next row,
//!   and a lane's column belongs to one channel. No transposition. A last
//!   group of columns narrower than the lanes overlaps the one before, the
//!   repeated lanes masked; rows narrower than the lanes are read several
//!   at a time.
//!
//! **Levels.** A first pass over a block finds each lane's largest and
//! smallest nonzero magnitude (and refuses NaN and ±Inf). A float32 value
//! widened to float64 is exact, and so is its square (a 48-bit
//! significand). Adding the constant C = 1.5·2^(52+q) to a float64 v with
//! |v| ≤ 2^(51+q) rounds v to a multiple of 2^q and puts that multiple, as
//! an integer, in the low bits of the sum's representation: `bits(v + C) −
//! bits(C)` is it exactly, and `v − ((v + C) − C)` is the exact remainder,
//! at most 2^(q−1) in magnitude (with the default rounding, to nearest). So
//! the first level takes, as an integer, the 51 bits below the lane's top
//! of every value, sign included (summed in i64 lanes, branch-free, and
//! the negative values' apart too), and the remainders go to the next
//! level: at most 2^(q−1), so that one takes 52 bits, and so
//! on until the lane's smallest bit is reached. The number of levels
//! follows from the block's widest lane: one for x and two for x² up to 51
//! bits from the largest magnitude's top bit to the smallest one's lowest
//! (27 binary orders between them), up to three and six for 155 bits (131
//! orders). The first level of x² is an FMA (`fma(a, a, C)` rounds a² + C
//! once), and so is its remainder (a²'s bits below the level: at most 48).
//! No float64 here is subnormal.
//!
//! **Buckets.** A lane holding float32 subnormals (never converted to
//! float64: a denormals-are-zero mode would read them as 0), or spanning
//! more than 155 bits, is gathered and added by significands into buckets
//! indexed by sign and exponent bits, each bucket then shifted in once:
//! exact too, not vectorized.
//!
//! Every path adds into carry-save wide integers ([`wide`]), turned into
//! the exact sums' magnitudes once per batch. Every path is exact, so the
//! result depends neither on which one a value took nor on the blocks.
//!
//! **Builds.** The level kernel is written three times, for AVX-512 (8
//! float64 lanes per instruction, [`avx512`]), AVX2 (4, [`avx2`]) and any
//! CPU ([`portable`]); the drivers around it ([`lanes`]) are compiled once
//! per build. The best build the CPU supports is chosen once per call: the
//! same operations on the same integers, so the same sums.
//!
//! Plain slices and integers only: no tensors, no sessions, no I/O.

use super::exact::{ChannelSums, ExactError, Layout};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512;
mod lanes;
mod portable;
pub(super) mod wide;

/// Values of one channel per block of the channel runs: per lane at most
/// BLOCK/4 + 1 level integers of at most 2^51 (|sum| < 2^62 in an i64),
/// and at most BLOCK bucket significands (squares sum < 2^12 · 2^48 in a
/// u64).
const BLOCK: usize = 2048;
/// Runs at least this long are added in place; shorter ones are gathered
/// into blocks (fewer, fuller blocks).
const DIRECT_RUN: usize = 512;
/// Runs shorter than this ((N, C) tables, (N, C, L) with small L) are read
/// as a table instead.
const SHORT_RUN: usize = 64;
/// Rows per block of a table: per lane at most MAX_ROWS level integers of
/// at most 2^51 (|sum| < 2^63 in an i64) ...
const MAX_ROWS: usize = 2048;
/// ... and the block (at most PANEL columns, a panel) small enough to stay
/// in cache between the first pass and the levels.
const ROW_BLOCK_BYTES: usize = 128 * 1024;
const PANEL: usize = 256;
/// Bits the first level takes below a lane's top: values below 2^top
/// give integers of at most 2^51, the constant's range.
const FIRST_LEVEL_BITS: i32 = 51;
/// Bits every further level takes: a remainder is at most half the
/// previous level's unit, 2^51 units of one 52 bits lower (again at most
/// 2^51, the constant's range).
const LEVEL_BITS: i32 = 52;
/// The widest range of bits (largest magnitude's top bit to the smallest
/// one's lowest) a lane takes by levels: three levels for x, six for x².
const MAX_LEVEL_SPAN: i32 = FIRST_LEVEL_BITS + 2 * LEVEL_BITS;
/// How many levels take a range of `bits` bits (at least one).
const fn levels_for(bits: i32) -> i32 {
    if bits <= FIRST_LEVEL_BITS {
        1
    } else {
        1 + (bits - FIRST_LEVEL_BITS + LEVEL_BITS - 1) / LEVEL_BITS
    }
}
/// The lowest bit of any float32 (its smallest subnormal, 2^-149) and of
/// any square: no level goes below them.
const X_LOWEST: i32 = -149;
const X2_LOWEST: i32 = -298;
/// The sums of x are kept in units of 2^-178, those of x² in units of
/// 2^-356, until the end of the batch: 14 and 28 64-bit words above
/// `exact`'s units (2^-1074 and 2^-2148), so that turning them into those
/// moves whole words.
const X_UNIT: i32 = -178;
const X2_UNIT: i32 = -356;

/// The builds of the accumulation (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Build {
    Avx512,
    Avx2,
    Portable,
}

impl Build {
    /// Whether this CPU can run the build.
    pub(super) fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Build::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512bw")
            }
            #[cfg(target_arch = "x86_64")]
            Build::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            Build::Avx512 | Build::Avx2 => false,
            Build::Portable => true,
        }
    }

    /// The fastest build this CPU supports.
    fn best() -> Build {
        [Build::Avx512, Build::Avx2]
            .into_iter()
            .find(|build| build.is_supported())
            .unwrap_or(Build::Portable)
    }
}

/// Adds a contiguous (N, C, inner) float32 buffer into `sums` (one per
/// channel, empty). NaN or ±Inf anywhere: NonFinite.
pub(super) fn accumulate(
    data: &[f32],
    layout: &Layout,
    sums: &mut [ChannelSums],
) -> Result<(), ExactError> {
    accumulate_with(Build::best(), data, layout, sums)
}

/// [`accumulate`] with the given build, or the portable one when this CPU
/// does not support it.
pub(super) fn accumulate_with(
    build: Build,
    data: &[f32],
    layout: &Layout,
    sums: &mut [ChannelSums],
) -> Result<(), ExactError> {
    #[cfg(target_arch = "x86_64")]
    if build != Build::Portable && build.is_supported() {
        // SAFETY: each build only needs the CPU features its functions
        // enable, and runs only when this CPU has them (checked just
        // above); it is otherwise the same safe code.
        #[allow(unsafe_code)]
        return unsafe {
            if build == Build::Avx512 {
                avx512::accumulate(data, layout, sums)
            } else {
                avx2::accumulate(data, layout, sums)
            }
        };
    }
    let _ = build;
    portable::accumulate(data, layout, sums)
}

#[cfg(test)]
mod tests;
