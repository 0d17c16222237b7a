//! The level kernel for AVX2: 4 float64 lanes per instruction.

use std::arch::x86_64::*;

super::lanes::lanes_build!(4, #[target_feature(enable = "avx2")]);

/// The levels of every vector of a block (see `lanes_build!`).
#[target_feature(enable = "avx2")]
#[inline]
fn levels<const LX: usize, const LS: usize>(
    vectors: &Vectors<L>,
    keep: &[u32; L],
    constants: &Constants<L, LX, LS>,
) -> LevelSums<L, LX, LS> {
    let cx = constants.cx.map(|c| _mm256_setr_pd(c[0], c[1], c[2], c[3]));
    let cs = constants.cs.map(|c| _mm256_setr_pd(c[0], c[1], c[2], c[3]));
    let keep = _mm_setr_epi32(
        keep[0] as i32,
        keep[1] as i32,
        keep[2] as i32,
        keep[3] as i32,
    );
    let mut total = [_mm256_setzero_si256(); LX];
    let mut negative = [_mm256_setzero_si256(); LX];
    let mut squares = [_mm256_setzero_si256(); LS];
    let mut negatives = _mm256_setzero_si256();
    let mut count = 0;
    for v in vectors.iter() {
        if let Some(next) = vectors.ahead.get(count * 16) {
            _mm_prefetch::<_MM_HINT_T0>((next as *const f32).cast());
        }
        let bits = _mm_and_si128(_mm_castps_si128(_mm_setr_ps(v[0], v[1], v[2], v[3])), keep);
        // All ones in the lanes of negative values.
        let sign = _mm256_cvtepi32_epi64(_mm_srai_epi32::<31>(bits));
        // x itself, sign included.
        let mut a = _mm256_cvtps_pd(_mm_castsi128_ps(bits));
        let mut s = _mm256_mul_pd(a, a);
        negatives = _mm256_sub_epi64(negatives, sign);
        for j in 0..LX {
            let t = _mm256_add_pd(a, cx[j]);
            let bits = _mm256_castpd_si256(t);
            total[j] = _mm256_add_epi64(total[j], bits);
            negative[j] = _mm256_add_epi64(negative[j], _mm256_and_si256(bits, sign));
            if j + 1 < LX {
                a = _mm256_sub_pd(a, _mm256_sub_pd(t, cx[j]));
            }
        }
        for j in 0..LS {
            let t = _mm256_add_pd(s, cs[j]);
            squares[j] = _mm256_add_epi64(squares[j], _mm256_castpd_si256(t));
            if j + 1 < LS {
                s = _mm256_sub_pd(s, _mm256_sub_pd(t, cs[j]));
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

#[target_feature(enable = "avx2")]
#[inline]
fn lanes(v: __m256i) -> [i64; L] {
    [
        _mm256_extract_epi64::<0>(v),
        _mm256_extract_epi64::<1>(v),
        _mm256_extract_epi64::<2>(v),
        _mm256_extract_epi64::<3>(v),
    ]
}
