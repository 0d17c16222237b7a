// A benchmark, not a server path: failing loudly on a broken setup is right.
#![allow(clippy::expect_used, clippy::unwrap_used)]

//! The cost of exact statistics: for one batch, the plain train forward
//! (what every train-mode Forward pays: libtorch or the native statistics
//! kernel, the server's default) beside the exact accumulation of the same
//! batch (`ExactSums::of_batch`: every value and its square into exact
//! per-channel sums) and the rest of an exact train step (adding the batch's
//! sums to the session's and rounding the statistics once). One libtorch
//! thread, medians of repeated rounds, ratios from the same run.
//!
//! Every shape runs twice: with values of many magnitudes ("wide", the
//! slow case: for float32 two or three levels for x and four or five for
//! x² per value, for float64 three for x and five or six for x² and its
//! FMA remainder) and with plain normal values ("randn", the common case:
//! float32 one level for x and two for x², float64 two and three).
//!
//! Run: `cargo bench --bench exact` (or `-- TEXT`: only the rows whose name
//! contains TEXT). It reports; it asserts nothing.

use std::time::{Duration, Instant};

use normserve::numerics::batch_norm::Layer;
use normserve::numerics::exact::{ExactSums, Format};
use normserve::numerics::stats::StatsKernel;
use normserve::numerics::{DType, LayerKind};
use tch::{Device, Tensor};

const ROUNDS: usize = 5;
const ROUND_TIME: Duration = Duration::from_millis(300);

/// Median seconds per call over ROUNDS rounds of ROUND_TIME.
fn measure(mut call: impl FnMut()) -> f64 {
    for _ in 0..2 {
        call();
    }
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut calls = 0u32;
        while start.elapsed() < ROUND_TIME {
            call();
            calls += 1;
        }
        rounds.push(start.elapsed().as_secs_f64() / f64::from(calls));
    }
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

fn main() {
    let shapes: [(&str, LayerKind, &[i64], DType); 6] = [
        (
            "(256,64) f32",
            LayerKind::BatchNorm1d,
            &[256, 64],
            DType::Float32,
        ),
        (
            "(64,64,8,8) f32 1 MiB",
            LayerKind::BatchNorm2d,
            &[64, 64, 8, 8],
            DType::Float32,
        ),
        (
            "(65536,64) f32 16 MiB",
            LayerKind::BatchNorm1d,
            &[65536, 64],
            DType::Float32,
        ),
        (
            "(64,64,32,32) f32 16 MiB",
            LayerKind::BatchNorm2d,
            &[64, 64, 32, 32],
            DType::Float32,
        ),
        (
            "(64,64,8,8) f64 2 MiB",
            LayerKind::BatchNorm2d,
            &[64, 64, 8, 8],
            DType::Float64,
        ),
        (
            "(64,64,32,32) f64 32 MiB",
            LayerKind::BatchNorm2d,
            &[64, 64, 32, 32],
            DType::Float64,
        ),
    ];
    normserve::memory::retain_freed_buffers();
    tch::set_num_threads(1);
    println!("normserve exact-statistics benchmark: median of {ROUNDS} rounds of {ROUND_TIME:?}, 1 libtorch thread (µs per batch)");
    println!(
        "{:<32} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "input", "train", "accumulate", "merge+round", "accum/train", "step/train"
    );
    let rows = shapes
        .into_iter()
        .flat_map(|row| [(row, "wide"), (row, "randn")]);
    // `cargo bench --bench exact -- TEXT`: only the rows whose name has TEXT.
    let only = std::env::args().skip(1).find(|arg| !arg.starts_with('-'));
    for ((name, kind, shape, dtype), values) in rows {
        let name = format!("{name} {values}");
        if only
            .as_ref()
            .is_some_and(|text| !name.contains(text.as_str()))
        {
            continue;
        }
        let c = shape[1];
        let options = (dtype.kind(), Device::Cpu);
        let input = if values == "wide" {
            // Values of many magnitudes (about 2^±40 around 1 in one
            // batch), as the exact sums must take them: the slow case.
            Tensor::randn(shape, options)
                * Tensor::randn(shape, options).exp().pow_tensor_scalar(8.0)
        } else {
            // Typical activations: a few binary orders per block.
            Tensor::randn(shape, options)
        };
        let params = [
            Tensor::ones([c], options),
            Tensor::zeros([c], options),
            Tensor::zeros([c], options),
            Tensor::ones([c], options),
        ];
        let layer = Layer {
            kind,
            num_features: c,
            eps: 1e-5,
            param_dtype: dtype,
            weight: Some(&params[0]),
            bias: Some(&params[1]),
            running_mean: Some(&params[2]),
            running_var: Some(&params[3]),
            stats: StatsKernel::Native,
        };
        let train = measure(|| {
            let _ = std::hint::black_box(layer.forward_train(&input, 0.1).unwrap());
        });
        let accumulate = measure(|| {
            let _ = std::hint::black_box(ExactSums::of_batch(&input).unwrap());
        });
        // A session that has seen 1000 such batches, then this one.
        let batch = ExactSums::of_batch(&input).unwrap();
        let mut seen = batch.clone();
        seen.count *= 1000;
        let format = Format::of(dtype);
        let merge_round = measure(|| {
            let mut sums = seen.clone();
            sums.merge(&batch).unwrap();
            let _ = std::hint::black_box(sums.statistics(format));
        });
        println!(
            "{:<32} {:>12.1} {:>12.1} {:>12.1} {:>9.2}x {:>9.2}x",
            name,
            train * 1e6,
            accumulate * 1e6,
            merge_round * 1e6,
            accumulate / train,
            (train + accumulate + merge_round) / train
        );
    }
    println!("\naccum/train = exact accumulation / plain train forward of the same batch; step/train = a whole exact train step (forward + accumulation + merge + rounding) / a plain one.");
}
