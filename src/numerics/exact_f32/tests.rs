use num_bigint::{BigInt, BigUint};
use num_traits::Zero;
use tch::Tensor;

use super::super::exact::{ChannelSums, ExactError, ExactSums, Layout};
use super::{accumulate_with, Build};

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

/// `channels` as the values of a contiguous (N, C, L) buffer: channel c of
/// sample n holds `channels[c][n * L..(n + 1) * L]`.
fn interleave(channels: &[Vec<f32>], n: usize, l: usize) -> Vec<f32> {
    let mut data = Vec::with_capacity(channels.len() * n * l);
    for sample in 0..n {
        for channel in channels {
            data.extend_from_slice(&channel[sample * l..(sample + 1) * l]);
        }
    }
    data
}

/// `channels` as a (N, C, L) batch ((N, C) when L is 1).
fn batch(channels: &[Vec<f32>], n: usize, l: usize) -> Tensor {
    let shape: Vec<i64> = if l == 1 {
        vec![n as i64, channels.len() as i64]
    } else {
        vec![n as i64, channels.len() as i64, l as i64]
    };
    Tensor::from_slice(&interleave(channels, n, l)).reshape(shape)
}

/// The builds this CPU runs (the portable one always).
fn builds() -> Vec<Build> {
    [Build::Avx512, Build::Avx2, Build::Portable]
        .into_iter()
        .filter(|build| build.is_supported())
        .collect()
}

/// Checks every channel of `channels` as a (N, C, L) batch against the
/// oracle: through `ExactSums::of_batch` (the best build), then with every
/// build this CPU runs.
fn check(channels: &[Vec<f32>], n: usize, l: usize) {
    let sums = ExactSums::of_batch(&batch(channels, n, l)).unwrap();
    assert_eq!(sums.count, (n * l) as u64);
    let expected: Vec<_> = channels.iter().map(|values| oracle_split(values)).collect();
    let compare = |got: &[ChannelSums], build: &str| {
        for (c, (p, q, s2)) in expected.iter().enumerate() {
            let got = &got[c];
            assert_eq!(
                &got.positive.to_biguint(),
                p,
                "{build}, channel {c}: sum of positives"
            );
            assert_eq!(
                &got.negative.to_biguint(),
                q,
                "{build}, channel {c}: sum of negatives"
            );
            assert_eq!(
                &got.squares.to_biguint(),
                s2,
                "{build}, channel {c}: sum of squares"
            );
        }
    };
    compare(&sums.channels, "of_batch");
    let data = interleave(channels, n, l);
    let layout = Layout {
        batch: n,
        channels: channels.len(),
        inner: l,
    };
    for build in builds() {
        let mut got = vec![ChannelSums::default(); channels.len()];
        accumulate_with(build, &data, &layout, &mut got).unwrap();
        compare(&got, &format!("{build:?}"));
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
    // Blocks spanning 0 to 133 binary orders (d orders span d + 24 bits:
    // the level counts switch after 1, 27, 53, 79 and 105 orders; beyond
    // 131, buckets), placed at the top, middle and bottom of float32's
    // range, the extremes always present with full significands.
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let mut channels = Vec::new();
    let boundaries = [
        51, 52, 53, 54, 55, 77, 78, 79, 80, 81, 103, 104, 105, 106, 107, 120,
    ];
    for span in (0..=30).chain(boundaries).chain(129..=133) {
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

/// `len` values of one of eight kinds of channel: narrow (typical
/// activations), wide (several levels), wider than the levels (buckets),
/// narrow with subnormals, signed zeros only, huge values near f32::MAX,
/// relu-like, and big and small values alternating (lanes of one block with
/// different scales).
fn channel_of_kind(random: &mut Random, kind: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| match kind % 8 {
            0 => random.value(120, 130),
            1 => random.value(60, 200),
            2 => random.value(1, 254),
            3 if i % 7 == 0 => random.value(0, 3),
            3 => random.value(100, 140),
            4 if i % 2 == 0 => 0.0,
            4 => -0.0,
            5 if i % 3 == 0 => f32::MAX,
            5 => -random.value(250, 254),
            6 if i % 5 == 0 => 0.0,
            6 => random.value(110, 130).abs(),
            _ if i % 2 == 0 => random.value(200, 210),
            _ => random.value(20, 30),
        })
        .collect()
}

/// `channels` channels of (N, C, L) values, channel c of kind c + `first`.
fn mixed(random: &mut Random, first: usize, channels: usize, n: usize, l: usize) -> Vec<Vec<f32>> {
    (0..channels)
        .map(|c| channel_of_kind(random, c + first, n * l))
        .collect()
}

#[test]
fn tables_of_any_width_match_the_oracle() {
    // (N, C, L) with L < 64, read as tables: widths that are not a multiple
    // of the lanes (a last overlapping group), narrower than the lanes
    // (several rows per table row, a padded last one), over one panel (a
    // last panel narrower than the lanes), and with more rows than a row
    // block holds; every kind of channel in every lane position.
    let mut random = Random(0x51_7cc1_b727_220a);
    for (i, (n, c, l)) in [
        (37, 3, 1),
        (41, 2, 1),
        (29, 7, 1),
        (100, 5, 1),
        (33, 9, 1),
        (70, 13, 3),
        (40, 2, 3),
        (9, 67, 1),
        (3, 4, 21),
        (25, 5, 63),
        (7000, 3, 1),
        (150, 260, 1),
    ]
    .into_iter()
    .enumerate()
    {
        check(&mixed(&mut random, i, c, n, l), n, l);
    }
}

#[test]
fn channel_runs_match_the_oracle() {
    // Runs long enough to be read in place (one block, several, the values
    // to fetch next crossing runs and channels), short ones gathered, one
    // sample, one channel.
    let mut random = Random(0x2545_f491_4f6c_dd1d);
    for (i, (n, c, l)) in [
        (3, 2, 700),
        (2, 3, 5000),
        (5, 4, 64),
        (9, 2, 511),
        (1, 9, 100),
        (1, 3, 7),
        (7000, 1, 1),
        (3, 1, 300),
    ]
    .into_iter()
    .enumerate()
    {
        check(&mixed(&mut random, i, c, n, l), n, l);
    }
}

#[test]
fn batch_boundaries_and_order_do_not_change_the_sums() {
    // The same rows as one batch, and as three batches in another order
    // merged: bitwise equal sums, in every build and layout.
    let mut random = Random(0x9e37_79b9);
    for (n, c, l) in [(300, 11, 1), (30, 3, 70), (64, 6, 5)] {
        let channels = mixed(&mut random, 0, c, n, l);
        let data = interleave(&channels, n, l);
        let row = c * l;
        let sums_of = |build: Build, rows: &[f32]| {
            let layout = Layout {
                batch: rows.len() / row,
                channels: c,
                inner: l,
            };
            let mut sums = vec![ChannelSums::default(); c];
            accumulate_with(build, rows, &layout, &mut sums).unwrap();
            ExactSums {
                count: (layout.batch * l) as u64,
                channels: sums,
            }
        };
        for build in builds() {
            let whole = sums_of(build, &data);
            let (first, rest) = data.split_at(row * (n / 3));
            let (second, third) = rest.split_at(row * (n / 2));
            let mut merged = sums_of(build, third);
            merged.merge(&sums_of(build, first)).unwrap();
            merged.merge(&sums_of(build, second)).unwrap();
            assert_eq!(merged, whole, "{build:?}, ({n}, {c}, {l})");
        }
    }
}

#[test]
fn non_finite_values_are_refused_in_every_column_and_build() {
    // A NaN or infinity in any column of a table (in a group of its own,
    // in a last overlapping group, in a last narrow panel) or anywhere in a
    // channel run.
    for (n, c, l) in [
        (20usize, 13usize, 1usize),
        (6, 3, 3),
        (4, 260, 1),
        (2, 2, 600),
    ] {
        for position in [0, c * l - 1, (c * l).saturating_sub(3), n * c * l - 1] {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut data = vec![0.5f32; n * c * l];
                data[position] = bad;
                let layout = Layout {
                    batch: n,
                    channels: c,
                    inner: l,
                };
                for build in builds() {
                    let mut sums = vec![ChannelSums::default(); c];
                    assert_eq!(
                        accumulate_with(build, &data, &layout, &mut sums),
                        Err(ExactError::NonFinite),
                        "{build:?}: {bad} at {position} of ({n}, {c}, {l})"
                    );
                }
            }
        }
    }
}

#[test]
fn lanes_of_one_channel_at_far_apart_scales_are_exact() {
    // A channel run puts consecutive values in consecutive lanes: here
    // value i sits near 2^(step · (i mod 8)) times the smallest, so each
    // lane of a block has its own scale, up to 7 · step orders apart.
    let mut random = Random(31);
    let mut channels = Vec::new();
    for step in [0u32, 1, 7, 8, 9, 15, 30] {
        let values: Vec<f32> = (0..4110)
            .map(|i| {
                let exponent = 20 + step * (i % 8) as u32;
                random.value(exponent, exponent + 2)
            })
            .collect();
        channels.push(values);
    }
    check(&channels, 1, 4110);
    check(&channels, 3, 1370);
}
