//! The level kernel for any CPU: plain arrays of 4 lanes, which the
//! compiler vectorizes as far as the baseline instructions allow.

super::lanes::lanes_build!(4);

/// The levels of every vector of a block (see `lanes_build!`).
#[inline(always)]
fn levels<const LX: usize, const LS: usize>(
    vectors: &Vectors<L>,
    keep: &[u32; L],
    constants: &Constants<L, LX, LS>,
) -> LevelSums<L, LX, LS> {
    let mut sums = LevelSums {
        total: [[0; L]; LX],
        negative: [[0; L]; LX],
        squares: [[0; L]; LS],
        negatives: [0; L],
        count: 0,
    };
    for vector in vectors.iter() {
        step(vector, keep, &constants.cx, &constants.cs, &mut sums);
        sums.count += 1;
    }
    sums
}

/// Adds one vector's levels.
#[inline(always)]
fn step<const LX: usize, const LS: usize>(
    vector: &[f32; L],
    keep: &[u32; L],
    cx: &[[f64; L]; LX],
    cs: &[[f64; L]; LS],
    sums: &mut LevelSums<L, LX, LS>,
) {
    let mut a = [0f64; L];
    let mut s = [0f64; L];
    let mut sign = [0i64; L];
    for k in 0..L {
        let bits = vector[k].to_bits() & keep[k];
        sign[k] = i64::from((bits as i32) >> 31);
        a[k] = f64::from(f32::from_bits(bits));
        s[k] = a[k] * a[k];
        sums.negatives[k] -= sign[k];
    }
    for (j, c) in cx.iter().enumerate() {
        for k in 0..L {
            let t = a[k] + c[k];
            let bits = t.to_bits() as i64;
            sums.total[j][k] = sums.total[j][k].wrapping_add(bits);
            sums.negative[j][k] = sums.negative[j][k].wrapping_add(bits & sign[k]);
            if j + 1 < LX {
                a[k] -= t - c[k];
            }
        }
    }
    for (j, c) in cs.iter().enumerate() {
        for k in 0..L {
            let t = s[k] + c[k];
            sums.squares[j][k] = sums.squares[j][k].wrapping_add(t.to_bits() as i64);
            if j + 1 < LS {
                s[k] -= t - c[k];
            }
        }
    }
}
