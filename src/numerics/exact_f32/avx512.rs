//! The level kernel for AVX-512: 8 float64 lanes per instruction, the
//! negative values' level sums added under a mask.

use std::arch::x86_64::*;

super::lanes::lanes_build!(
    8,
    #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw")]
);

/// The levels of every vector of a block (see `lanes_build!`).
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw")]
#[inline]
fn levels<const LX: usize, const LS: usize>(
    vectors: &Vectors<L>,
    keep: &[u32; L],
    constants: &Constants<L, LX, LS>,
) -> LevelSums<L, LX, LS> {
    let constant = |c: &[f64; L]| _mm512_setr_pd(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]);
    let cx = constants.cx.each_ref().map(constant);
    let cs = constants.cs.each_ref().map(constant);
    let k = keep.map(|k| k as i32);
    let keep = _mm256_setr_epi32(k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]);
    let one = _mm512_set1_epi64(1);
    // An FMA by 1 is an addition rounded once, as `+` is, but it runs on
    // the multiply units: this loop is bound by the CPU's add units (two
    // per core on AMD's Zen 4, beside two FMA units), so a share of its
    // additions goes to the others. `black_box` keeps the compiler from
    // turning `x · 1 + y` back into `x + y`.
    let unit = _mm512_set1_pd(std::hint::black_box(1.0));
    let mut total = [_mm512_setzero_si512(); LX];
    let mut negative = [_mm512_setzero_si512(); LX];
    let mut squares = [_mm512_setzero_si512(); LS];
    let mut negatives = _mm512_setzero_si512();
    let mut count = 0;
    for v in vectors.iter() {
        if let Some(next) = vectors.ahead.get(count * 16) {
            _mm_prefetch::<_MM_HINT_T0>((next as *const f32).cast());
        }
        let values = _mm256_setr_ps(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
        let bits = _mm256_and_si256(_mm256_castps_si256(values), keep);
        // The lanes of negative values.
        let sign = _mm256_movepi32_mask(bits);
        // x itself, sign included: the levels take negative values as
        // they take positive ones.
        let mut a = _mm512_cvtps_pd(_mm256_castsi256_ps(bits));
        negatives = _mm512_mask_add_epi64(negatives, sign, negatives, one);
        // x² first: its first level straight from a (fma(a, a, C) rounds
        // a² + C once, as (a²) + C does: a² is exact), and the first
        // remainder a² − (t − C) too (exact: it is a²'s bits below the
        // level, at most 48 of them).
        let t = _mm512_fmadd_pd(a, a, cs[0]);
        squares[0] = _mm512_add_epi64(squares[0], _mm512_castpd_si512(t));
        if LS > 1 {
            let mut s = _mm512_fmadd_pd(a, a, _mm512_sub_pd(cs[0], t));
            for j in 1..LS {
                let t = _mm512_fmadd_pd(s, unit, cs[j]);
                squares[j] = _mm512_add_epi64(squares[j], _mm512_castpd_si512(t));
                if j + 1 < LS {
                    s = _mm512_fmadd_pd(_mm512_sub_pd(cs[j], t), unit, s);
                }
            }
        }
        for j in 0..LX {
            let t = _mm512_add_pd(a, cx[j]);
            let bits = _mm512_castpd_si512(t);
            total[j] = _mm512_add_epi64(total[j], bits);
            negative[j] = _mm512_mask_add_epi64(negative[j], sign, negative[j], bits);
            if j + 1 < LX {
                // a − (t − C), exact, as a + (C − t).
                a = _mm512_fmadd_pd(_mm512_sub_pd(cx[j], t), unit, a);
            }
        }
        count += 1;
    }
    let count = count as i64;
    LevelSums {
        total: total.map(|v| lanes(v)),
        negative: negative.map(|v| lanes(v)),
        squares: squares.map(|v| lanes(v)),
        negatives: lanes(negatives),
        count,
    }
}

/// The eight 64-bit lanes of `v`, in order (the float64 kernel's too).
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw")]
#[inline]
pub(in crate::numerics) fn lanes(v: __m512i) -> [i64; L] {
    let (low, high) = (_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v));
    [
        _mm256_extract_epi64::<0>(low),
        _mm256_extract_epi64::<1>(low),
        _mm256_extract_epi64::<2>(low),
        _mm256_extract_epi64::<3>(low),
        _mm256_extract_epi64::<0>(high),
        _mm256_extract_epi64::<1>(high),
        _mm256_extract_epi64::<2>(high),
        _mm256_extract_epi64::<3>(high),
    ]
}
