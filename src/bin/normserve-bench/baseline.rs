//! The in-process baseline: the same batch norm (or Compare) through
//! libtorch in this process, no gRPC, so the service's figures read as a
//! ratio to what the hardware does without it. Talks to no server.

use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use crate::fatal;
use crate::rounds::Round;
use crate::scenarios::{random_input, raw_bytes, Scenario, Workload};
use crate::target::CpuMeter;

/// The same work through libtorch in this process, on as many threads as the
/// scenario has callers (at most the machine's cores, as the server's
/// compute pool). Calls/s per round; a first warm-up round is dropped.
pub fn in_process_rounds(
    scenario: &Scenario,
    device: Device,
    device_text: &str,
    rounds: usize,
    duration: Duration,
) -> Vec<Round> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = scenario.callers().min(cores).max(1);
    let mut out = Vec::new();
    for _ in 0..=rounds {
        let cpu = CpuMeter::start(None);
        let start = Instant::now();
        let calls: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| scope.spawn(|| in_process_calls(scenario, device, device_text, duration)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        let (generator_cpu, _) = cpu.stop();
        out.push(Round {
            calls,
            seconds: start.elapsed().as_secs_f64(),
            generator_cpu,
            ..Default::default()
        });
    }
    out.remove(0); // the first round warms up
    out
}

/// Calls completed on one thread in `duration`.
fn in_process_calls(
    scenario: &Scenario,
    device: Device,
    device_text: &str,
    duration: Duration,
) -> u64 {
    let c = scenario.shape[1];
    let options = (Kind::Float, device);
    let input = random_input(&scenario.shape, device);
    let weight = Tensor::ones([c], options);
    let bias = Tensor::zeros([c], options);
    let mean = Tensor::zeros([c], options);
    let var = Tensor::ones([c], options);
    let compare = (scenario.workload == Workload::Compare).then(|| {
        let request = scenario.compare_request(&raw_bytes(&input), device_text);
        match normserve::transport::convert::compare_request(request, u64::MAX) {
            Ok((domain, _)) => domain,
            Err(e) => fatal(&format!("compare request: {e}")),
        }
    });
    let start = Instant::now();
    let mut calls = 0;
    while start.elapsed() < duration {
        if let Some(request) = &compare {
            let result = normserve::numerics::compare::compare(request.clone(), device, 65_536);
            std::hint::black_box(result.is_ok());
        } else {
            let output = input.batch_norm(
                Some(&weight),
                Some(&bias),
                Some(&mean),
                Some(&var),
                scenario.train,
                0.1,
                1e-5,
                false,
            );
            std::hint::black_box(&output);
        }
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
        calls += 1;
    }
    calls
}
