// A benchmark, not a server path: failing loudly on a broken setup is right.
#![allow(clippy::expect_used, clippy::unwrap_used)]

//! In-process kernel benchmark: train-mode batch norm on the CPU through
//! libtorch and through the native statistics kernel (`--cpu-stats-kernel`),
//! eval mode for reference, at 1 and 2 libtorch intra-op threads. Medians of
//! repeated rounds, and the native / libtorch speed ratio measured in the
//! same run. The service-level figures come from `normserve-bench`.
//!
//! Run: `make bench` (or `cargo bench --bench forward`). It reports; it
//! asserts nothing.

use std::time::{Duration, Instant};

use normserve::numerics::batch_norm::Layer;
use normserve::numerics::stats::StatsKernel;
use normserve::numerics::{DType, LayerKind};
use tch::{Device, Kind, Tensor};

const ROUNDS: usize = 5;
const ROUND_TIME: Duration = Duration::from_millis(400);

/// Median seconds per call over ROUNDS rounds of ROUND_TIME.
fn measure(mut call: impl FnMut()) -> f64 {
    for _ in 0..3 {
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
    let shapes: [(&str, LayerKind, &[i64]); 5] = [
        ("(4,64) 1 KiB", LayerKind::BatchNorm1d, &[4, 64]),
        ("(64,64,8,8) 1 MiB", LayerKind::BatchNorm2d, &[64, 64, 8, 8]),
        ("(65536,64) 16 MiB", LayerKind::BatchNorm1d, &[65536, 64]),
        (
            "(64,64,32,32) 16 MiB",
            LayerKind::BatchNorm2d,
            &[64, 64, 32, 32],
        ),
        (
            "(16,64,16,16,16) 16 MiB",
            LayerKind::BatchNorm3d,
            &[16, 64, 16, 16, 16],
        ),
    ];
    normserve::memory::retain_freed_buffers();
    println!("normserve kernel benchmark: train-mode batch norm, median of {ROUNDS} rounds of {ROUND_TIME:?} (µs per call, GB/s of input)");
    for threads in [1, 2] {
        tch::set_num_threads(threads);
        println!("\nintra-op threads = {threads}");
        println!(
            "{:<26} {:>14} {:>14} {:>14} {:>8}",
            "input", "eval", "train libtorch", "train native", "native×"
        );
        for (name, kind, shape) in shapes {
            let c = shape[1];
            let options = (Kind::Float, Device::Cpu);
            let input = Tensor::randn(shape, options);
            let params = [
                Tensor::ones([c], options),
                Tensor::zeros([c], options),
                Tensor::zeros([c], options),
                Tensor::ones([c], options),
            ];
            let layer = |stats| Layer {
                kind,
                num_features: c,
                eps: 1e-5,
                param_dtype: DType::Float32,
                weight: Some(&params[0]),
                bias: Some(&params[1]),
                running_mean: Some(&params[2]),
                running_var: Some(&params[3]),
                stats,
            };
            let bytes = input.numel() as f64 * 4.0;
            let eval = measure(|| {
                let _ = std::hint::black_box(
                    layer(StatsKernel::Libtorch).forward_eval(&input).unwrap(),
                );
            });
            let libtorch = measure(|| {
                let _ = std::hint::black_box(
                    layer(StatsKernel::Libtorch)
                        .forward_train(&input, 0.1)
                        .unwrap(),
                );
            });
            let native = measure(|| {
                let _ = std::hint::black_box(
                    layer(StatsKernel::Native)
                        .forward_train(&input, 0.1)
                        .unwrap(),
                );
            });
            let cell = |t: f64| format!("{:>7.1} {:>5.1}", t * 1e6, bytes / t / 1e9);
            println!(
                "{:<26} {:>14} {:>14} {:>14} {:>7.2}x",
                name,
                cell(eval),
                cell(libtorch),
                cell(native),
                libtorch / native
            );
        }
    }
    println!("\nnative× = libtorch train time / native train time (same run). (N,C) inputs always use libtorch's kernel.");
}
