use num_bigint::{BigInt, BigUint};
use num_traits::Zero;
use tch::Tensor;

use super::super::exact::{add_f64_by_buckets, ChannelSums, ExactError, ExactSums, Layout};
use super::{accumulate, is_supported, LEVELS_MAX_BITS, LEVELS_MIN_BITS};

/// The textbook exact sums of float64 values, as integers of 2^-1074
/// (of the positive values, of |x| over the negative ones) and 2^-2148
/// (Σx²): the oracle.
fn oracle(values: &[f64]) -> (BigUint, BigUint, BigUint) {
    let (mut positive, mut negative, mut squares) =
        (BigInt::zero(), BigInt::zero(), BigInt::zero());
    for &x in values {
        let bits = x.to_bits();
        let exponent = ((bits >> 52) & 0x7ff) as usize;
        let m = BigInt::from((bits & 0xf_ffff_ffff_ffff) | (u64::from(exponent != 0) << 52));
        // x = m · 2^(max(e, 1) − 1075) = m · 2^(max(e, 1) − 1) units of 2^-1074.
        let shift = exponent.max(1) - 1;
        if x.is_sign_negative() {
            negative += &m << shift;
        } else {
            positive += &m << shift;
        }
        squares += (&m * &m) << (2 * shift);
    }
    (
        positive.magnitude().clone(),
        negative.magnitude().clone(),
        squares.magnitude().clone(),
    )
}

fn assert_oracle(got: &ChannelSums, values: &[f64], what: &str) {
    let (positive, negative, squares) = oracle(values);
    assert_eq!(
        got.positive.to_biguint(),
        positive,
        "{what}: sum of positives"
    );
    assert_eq!(
        got.negative.to_biguint(),
        negative,
        "{what}: sum of negatives"
    );
    assert_eq!(got.squares.to_biguint(), squares, "{what}: sum of squares");
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

    /// A float64 with exponent bits in `low..=high`, a random significand
    /// (all ones or all zeros one time in four) and sign.
    fn value(&mut self, low: u64, high: u64) -> f64 {
        let r = self.next();
        let exponent = low + r % (high - low + 1);
        let significand = match (r >> 20) % 8 {
            0 => 0xf_ffff_ffff_ffff,
            1 => 0,
            _ => self.next() & 0xf_ffff_ffff_ffff,
        };
        let sign = (r >> 30) & 1;
        f64::from_bits(sign << 63 | exponent << 52 | significand)
    }

    /// `len` values with exponent bits in `low..=high`, both ends present,
    /// a zero and a −0 among them when there is room.
    fn block(&mut self, len: usize, low: u64, high: u64) -> Vec<f64> {
        let mut values: Vec<f64> = (0..len).map(|_| self.value(low, high)).collect();
        if len >= 4 {
            let at = |r: u64| (r % len as u64) as usize;
            values[at(self.next())] = f64::from_bits(low << 52);
            values[at(self.next())] = -f64::from_bits(high << 52 | 0xf_ffff_ffff_ffff);
            values[at(self.next())] = 0.0;
            values[at(self.next())] = -0.0;
        }
        values
    }
}

/// One channel's values through the levels' driver directly: the sums,
/// and how many values the buckets took.
fn levels_and_buckets(values: &[f64]) -> (ChannelSums, usize) {
    let layout = Layout {
        batch: 1,
        channels: 1,
        inner: values.len(),
    };
    let mut sums = vec![ChannelSums::default()];
    let mut bucketed = 0;
    let mut buckets = |block: &[f64], channel: &mut ChannelSums| {
        bucketed += block.len();
        add_f64_by_buckets(block, channel)
    };
    accumulate(values, &layout, &mut sums, &mut buckets)
        .expect("checked: the CPU runs the levels")
        .unwrap();
    (sums.swap_remove(0), bucketed)
}

/// `channels` as the values of a (N, C, L) tensor: channel c of sample n
/// holds `channels[c][n * L..(n + 1) * L]`.
fn batch(channels: &[Vec<f64>], n: usize, l: usize) -> Tensor {
    let mut data = Vec::with_capacity(channels.len() * n * l);
    for sample in 0..n {
        for channel in channels {
            data.extend_from_slice(&channel[sample * l..(sample + 1) * l]);
        }
    }
    Tensor::from_slice(&data).reshape([n as i64, channels.len() as i64, l as i64])
}

fn skip_without_avx512() -> bool {
    if !is_supported() {
        println!("skipped: this CPU has no AVX-512, float64 takes the buckets only");
        return true;
    }
    false
}

#[test]
fn every_level_count_is_exact_at_its_span_boundaries() {
    if skip_without_avx512() {
        return;
    }
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    // Exponents d orders apart span d + 53 bits: the level counts switch
    // after d = 24 (x² 3 → 4), 50 (x 2 → 3), 76 (x² 5 → 6); beyond 102 the
    // buckets take the block.
    for d in [0u64, 1, 24, 25, 50, 51, 76, 77, 101, 102] {
        for (center, len) in [(1023u64, 4096usize), (700, 1000), (1400, 37), (1023, 8)] {
            let (low, high) = (center - d / 2, center - d / 2 + d);
            let values = random.block(len, low, high);
            let (sums, bucketed) = levels_and_buckets(&values);
            assert_eq!(bucketed, 0, "d = {d}, center {center}: the levels take it");
            assert_oracle(
                &sums,
                &values,
                &format!("d = {d}, center {center}, {len} values"),
            );
        }
    }
    // One order more: the buckets, exactly as well.
    let values = random.block(4096, 972, 1075);
    let (sums, bucketed) = levels_and_buckets(&values);
    assert_eq!(bucketed, 4096);
    assert_oracle(&sums, &values, "d = 103");
}

#[test]
fn the_levels_range_ends_exactly_where_the_buckets_take_over() {
    if skip_without_avx512() {
        return;
    }
    let mut random = Random(7);
    let smallest = f64::from_bits(LEVELS_MIN_BITS);
    let largest = f64::from_bits(LEVELS_MAX_BITS);
    let cases: [(&str, Vec<f64>, bool); 8] = [
        (
            "smallest the levels take",
            vec![smallest, -smallest * 3.0, smallest * 1e20],
            true,
        ),
        (
            "just below it",
            vec![f64::from_bits(LEVELS_MIN_BITS - 1), smallest * 4.0],
            false,
        ),
        (
            "largest the levels take",
            vec![largest, -largest, largest / 2f64.powi(90)],
            true,
        ),
        (
            "2^510",
            vec![f64::from_bits(LEVELS_MAX_BITS + 1), 1.0],
            false,
        ),
        ("float64's largest", vec![f64::MAX, -f64::MAX, 1.0], false),
        ("subnormals", vec![5e-324, -2.5e-310, 1.0, 0.5], false),
        ("zeros only", vec![0.0, -0.0, 0.0], true),
        ("one value", vec![-0.1], true),
    ];
    for (what, values, by_levels) in cases {
        let mut values = values;
        // Room for a vector and a tail.
        while values.len() < 11 {
            values.push(if by_levels {
                0.0
            } else {
                random.value(1000, 1040)
            });
        }
        let (sums, bucketed) = levels_and_buckets(&values);
        assert_eq!(bucketed == 0, by_levels, "{what}: which path");
        assert_oracle(&sums, &values, what);
    }
}

#[test]
fn channels_of_every_kind_and_layout_match_the_oracle() {
    let mut random = Random(0x2545_f491_4f6c_dd1d);
    // Inner sizes below 64 (transposed to one run), gathered runs (below
    // 512), runs in place, several blocks per run, and N not a multiple of
    // anything.
    for (n, c, l) in [
        (300, 3, 1),
        (33, 2, 63),
        (65, 3, 64),
        (9, 2, 511),
        (3, 2, 512),
        (2, 3, 4097),
        (1, 1, 10_000),
        // One channel: its short runs read as one run.
        (40, 1, 70),
        (1, 3, 100),
        // More values per channel than WIDE_FROM: the sums through the
        // wide integers.
        (4, 2, 5000),
    ] {
        // Narrow (one block's orders within 20), wide (about 100), mixed
        // with subnormals, with values near float64's largest, and zeros.
        let kinds: [(u64, u64); 5] = [(1010, 1030), (973, 1073), (0, 40), (2000, 2046), (0, 0)];
        let channels: Vec<Vec<f64>> = (0..c)
            .map(|channel| {
                let (low, high) = kinds[(channel + n) % kinds.len()];
                if low == high {
                    return vec![0.0; n * l];
                }
                let mut values = random.block(n * l, low, high);
                // A few narrow values among the extreme ones: blocks that
                // mix the paths' ranges.
                for i in (0..values.len()).step_by(97) {
                    values[i] = random.value(1020, 1025);
                }
                values
            })
            .collect();
        let sums = ExactSums::of_batch(&batch(&channels, n, l)).unwrap();
        assert_eq!(sums.count, (n * l) as u64);
        for (index, values) in channels.iter().enumerate() {
            assert_oracle(
                &sums.channels[index],
                values,
                &format!("({n},{c},{l}) channel {index}"),
            );
        }
    }
}

#[test]
fn cuts_and_orders_give_identical_sums() {
    let mut random = Random(99);
    let values: Vec<f64> = (0..20_000)
        .map(|i| match i % 3 {
            0 => random.value(1000, 1040),
            1 => random.value(973, 1073),
            _ => random.value(1, 60),
        })
        .collect();
    let sums_of = |values: &[f64]| {
        ExactSums::of_batch(&Tensor::from_slice(values).reshape([1, 1, values.len() as i64]))
            .unwrap()
    };
    let whole = sums_of(&values);
    assert_oracle(&whole.channels[0], &values, "20000 values");
    let mut reversed = values.clone();
    reversed.reverse();
    let mut merged = sums_of(&reversed[..4095]);
    for cut in [4095..4096, 4096..12_289, 12_289..20_000] {
        merged.merge(&sums_of(&reversed[cut])).unwrap();
    }
    assert_eq!(merged, whole);
}

#[test]
fn non_finite_values_are_refused_on_both_paths() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        // In a block the levels would take, and in one of the buckets'.
        for other in [1.5, 5e-324] {
            let mut values = vec![other; 100];
            values[57] = bad;
            let t = Tensor::from_slice(&values).reshape([1, 1, 100]);
            assert_eq!(ExactSums::of_batch(&t), Err(ExactError::NonFinite));
        }
    }
}

#[test]
fn random_blocks_of_any_range_and_length_match_the_oracle() {
    let mut random = Random(0x5851_f42d_4c95_7f2d);
    for case in 0..300 {
        let a = 1 + random.next() % 2046;
        let b = 1 + random.next() % 2046;
        // Mostly ranges the levels take, some that they do not.
        let (low, high) = if case % 3 == 0 {
            (a.min(b), a.max(b))
        } else {
            let low = 500 + a % 1000;
            (low, (low + b % 110).min(2046))
        };
        let len = 1 + (random.next() % 3000) as usize;
        let values = random.block(len, low, high);
        let sums =
            ExactSums::of_batch(&Tensor::from_slice(&values).reshape([len as i64, 1])).unwrap();
        assert_oracle(
            &sums.channels[0],
            &values,
            &format!("case {case}: {low}..={high}, {len} values"),
        );
    }
}
