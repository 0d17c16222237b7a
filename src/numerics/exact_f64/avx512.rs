//! The float64 levels for AVX-512: 8 lanes per instruction, the blocks'
//! drivers and the level kernel (see the module docs).

use std::arch::x86_64::*;

use super::super::exact::{ChannelSums, ExactError, Layout};
use super::super::exact_f32::avx512::lanes;
use super::{constants, plan, ChannelLevels, LevelSums, Plan, BLOCK, DIRECT_RUN};

const L: usize = 8;

/// Adds a contiguous (N, C, inner) float64 buffer into `sums`, blocks the
/// levels cannot take by `buckets` (see [`super::accumulate`]).
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw")]
pub(super) fn accumulate(
    data: &[f64],
    layout: &Layout,
    sums: &mut [ChannelSums],
    buckets: &mut dyn FnMut(&[f64], &mut ChannelSums) -> bool,
) -> Result<(), ExactError> {
    let mut levels = ChannelLevels::new(layout.batch * layout.inner);
    layout.walk_blocks(data, BLOCK, DIRECT_RUN, |block| {
        let channel = &mut sums[block.channel];
        add_block(block.values, block.ahead, channel, &mut levels, buckets)?;
        if block.last {
            levels.add_into(channel)?;
        }
        Ok(())
    })
}

/// Adds one block (at most BLOCK values) of a channel: by levels into
/// `levels`, or by `buckets` into `channel`; `ahead` the values to be read
/// next, which the levels ask the CPU to fetch into its cache meanwhile.
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw")]
#[inline]
fn add_block(
    block: &[f64],
    ahead: &[f64],
    channel: &mut ChannelSums,
    levels: &mut ChannelLevels,
    buckets: &mut dyn FnMut(&[f64], &mut ChannelSums) -> bool,
) -> Result<(), ExactError> {
    let (high, low) = range(block);
    let Some(plan) = plan(high, low)? else {
        return Ok(());
    };
    let Plan::Levels {
        top,
        levels: counts,
    } = plan
    else {
        return if buckets(block, channel) {
            Ok(())
        } else {
            Err(ExactError::NonFinite)
        };
    };
    match counts {
        (2, 3) => add_levels::<2, 3>(block, ahead, top).add_to(top, levels, channel),
        (2, 4) => add_levels::<2, 4>(block, ahead, top).add_to(top, levels, channel),
        (3, 5) => add_levels::<3, 5>(block, ahead, top).add_to(top, levels, channel),
        (3, 6) => add_levels::<3, 6>(block, ahead, top).add_to(top, levels, channel),
        // A float64's 53 bits span more than one level: never (1, _).
        _ => Err(ExactError::Torch(
            "internal: no levels for an exact float64 block".into(),
        )),
    }
}

/// The largest magnitude's bits and the smallest nonzero one's minus one
/// (zero wraps to the largest u64, so it never is the minimum).
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw")]
#[inline]
fn range(block: &[f64]) -> (u64, u64) {
    const MAGNITUDE: u64 = !(1 << 63);
    let mut high = [0u64; L];
    let mut low = [u64::MAX; L];
    let mut chunks = block.chunks_exact(L);
    for chunk in &mut chunks {
        for ((high, low), x) in high.iter_mut().zip(low.iter_mut()).zip(chunk) {
            let magnitude = x.to_bits() & MAGNITUDE;
            *high = (*high).max(magnitude);
            *low = (*low).min(magnitude.wrapping_sub(1));
        }
    }
    for x in chunks.remainder() {
        let magnitude = x.to_bits() & MAGNITUDE;
        high[0] = high[0].max(magnitude);
        low[0] = low[0].min(magnitude.wrapping_sub(1));
    }
    let high = high.into_iter().max().unwrap_or(0);
    let low = low.into_iter().min().unwrap_or(u64::MAX);
    (high, low)
}

/// The level sums of a block: x at LX levels below 2^top, x² (hi and lo)
/// at LS below 2^(2·top).
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw")]
#[inline]
fn add_levels<const LX: usize, const LS: usize>(
    block: &[f64],
    ahead: &[f64],
    top: i32,
) -> LevelSums<LX, LS> {
    let cx: [f64; LX] = constants(top);
    let cs: [f64; LS] = constants(2 * top);
    let vx = cx.map(|c| _mm512_set1_pd(c));
    let vs = cs.map(|c| _mm512_set1_pd(c));
    let one = _mm512_set1_epi64(1);
    // An FMA by 1 is an addition rounded once, as `+` is, but it runs on
    // the multiply units: this loop is bound by the CPU's add units (two
    // per core on AMD's Zen 4, beside two FMA units), so about half of its
    // additions go to the others. `black_box` keeps the compiler from
    // turning `x · 1 + y` back into `x + y`.
    let unit = _mm512_set1_pd(std::hint::black_box(1.0));
    let mut total = [_mm512_setzero_si512(); LX];
    let mut negative = [_mm512_setzero_si512(); LX];
    let mut squares = [_mm512_setzero_si512(); LS];
    let mut negatives = _mm512_setzero_si512();
    let mut count = 0i64;
    let (main, rest) = block.split_at(block.len() / L * L);
    let tail = (!rest.is_empty()).then(|| {
        let mut tail = [0f64; L];
        tail[..rest.len()].copy_from_slice(rest);
        tail
    });
    let vectors = main
        .chunks_exact(L)
        .filter_map(|chunk| chunk.first_chunk::<L>())
        .chain(tail.as_ref());
    for v in vectors {
        if let Some(next) = ahead.get(count as usize * L) {
            _mm_prefetch::<_MM_HINT_T0>((next as *const f64).cast());
        }
        let x = _mm512_setr_pd(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
        // The lanes of negative values.
        let sign = _mm512_movepi64_mask(_mm512_castpd_si512(x));
        let magnitude = _mm512_abs_pd(x);
        negatives = _mm512_mask_add_epi64(negatives, sign, negatives, one);
        let mut a = magnitude;
        for j in 0..LX {
            let t = _mm512_add_pd(a, vx[j]);
            let bits = _mm512_castpd_si512(t);
            total[j] = _mm512_add_epi64(total[j], bits);
            negative[j] = _mm512_mask_add_epi64(negative[j], sign, negative[j], bits);
            if j + 1 < LX {
                // a − (t − C), exact, as a + (C − t).
                a = _mm512_fmadd_pd(_mm512_sub_pd(vx[j], t), unit, a);
            }
        }
        // a² = hi + lo exactly (no overflow, lo not below 2^-1022: the
        // plan's bounds); lo is below the first level's unit.
        let mut hi = _mm512_mul_pd(magnitude, magnitude);
        let mut lo = _mm512_fmsub_pd(magnitude, magnitude, hi);
        for j in 0..LS {
            let t = _mm512_fmadd_pd(hi, unit, vs[j]);
            squares[j] = _mm512_add_epi64(squares[j], _mm512_castpd_si512(t));
            if j + 1 < LS {
                hi = _mm512_fmadd_pd(_mm512_sub_pd(vs[j], t), unit, hi);
            }
            if j > 0 {
                let t = _mm512_add_pd(lo, vs[j]);
                squares[j] = _mm512_add_epi64(squares[j], _mm512_castpd_si512(t));
                if j + 1 < LS {
                    lo = _mm512_fmadd_pd(_mm512_sub_pd(vs[j], t), unit, lo);
                }
            }
        }
        count += 1;
    }
    // Each lane's sums are exact modulo 2^64 and below 2^61 in magnitude
    // once the constants' bits are taken off, so the wrapped i64 is the
    // lane's sum; the lanes add up in i128.
    let negatives = lanes(negatives);
    let level = |sum: __m512i, constant: f64, counts: [i64; L]| -> i128 {
        let constant = constant.to_bits() as i64;
        lanes(sum)
            .into_iter()
            .zip(counts)
            .map(|(sum, count)| i128::from(sum.wrapping_sub(constant.wrapping_mul(count))))
            .sum()
    };
    LevelSums::<LX, LS> {
        total: std::array::from_fn(|j| level(total[j], cx[j], [count; L])),
        negative: std::array::from_fn(|j| level(negative[j], cx[j], negatives)),
        // hi at every level, lo from the second on.
        squares: std::array::from_fn(|j| {
            let per_value = if j == 0 { 1 } else { 2 };
            level(squares[j], cs[j], [per_value * count; L])
        }),
    }
}
