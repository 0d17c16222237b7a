//! Property-based fuzzing (proptest) of everything a client's bytes reach
//! before the domain runs: protobuf decoding, tensor decoding
//! (`transport::convert` over `numerics::codec`), request validation
//! (session ids, labels, request ids, enums, CreateSession and Compare
//! requests) and the CLI's `.npy` parser. Each target states what must hold
//! for every input: no panic, and either a value that keeps the documented
//! invariants or a clean error with the gRPC code the API promises. Expected
//! outcomes are derived here from the documented rules, never from the code
//! under test.
//!
//! `cargo test` runs every target for proptest's default case count (256, or
//! `PROPTEST_CASES`). `make fuzz` sets `NORMSERVE_FUZZ_SECONDS`: then every
//! target keeps drawing fresh batches of cases until that many seconds after
//! the first target started (all targets run side by side), and prints how
//! many cases it ran. A failing case's seed is saved under
//! `tests/fuzz/regressions/<target>.txt` and replayed first on every later
//! run: commit that file with the fix.

// Tests fail by panicking; the crate-wide denials are for server paths.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod npy;
mod requests;
mod tensors;
mod wire;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseResult, TestRunner};
use tonic::Code;

/// Cases per runner when fuzzing for a time: the deadline is checked
/// between batches.
const BATCH_CASES: u32 = 256;

/// The time budget of `make fuzz` (`NORMSERVE_FUZZ_SECONDS`), if set.
fn fuzz_seconds() -> Option<f64> {
    let text = std::env::var("NORMSERVE_FUZZ_SECONDS").ok()?;
    let seconds: f64 = text
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("NORMSERVE_FUZZ_SECONDS={text:?} is not a number"));
    Some(seconds.max(0.0))
}

/// One deadline for the whole run, counted from the first target's start.
fn deadline(seconds: f64) -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now) + Duration::from_secs_f64(seconds)
}

/// Runs `property` on values of `strategy`: proptest's case count under
/// `cargo test`, or batches until the deadline under `make fuzz` (at least
/// one batch). Panics with the shrunk failing input.
pub fn fuzz<S: Strategy>(
    target: &'static str,
    strategy: S,
    property: impl Fn(S::Value) -> TestCaseResult,
) {
    // proptest wants a 'static path; one small string per target and run.
    let regressions: &'static str =
        Box::leak(format!("tests/fuzz/regressions/{target}.txt").into_boxed_str());
    let config = |cases: Option<u32>| {
        let default = Config::default();
        Config {
            cases: cases.unwrap_or(default.cases),
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(regressions))),
            ..default
        }
    };
    let started = Instant::now();
    let until = fuzz_seconds().map(deadline);
    let mut total: u64 = 0;
    loop {
        let mut runner = TestRunner::new(config(until.map(|_| BATCH_CASES)));
        let batch = runner.config().cases;
        if let Err(error) = runner.run(&strategy, &property) {
            panic!(
                "fuzz target {target} failed after {total}+ cases: {error}\n\
                 (its seed is saved in {regressions})"
            );
        }
        total += u64::from(batch);
        if until.is_none_or(|until| Instant::now() >= until) {
            break;
        }
    }
    eprintln!(
        "fuzz {target}: {total} cases in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The gRPC code a rejection becomes (through `transport::status`).
pub fn code(error: impl Into<tonic::Status>) -> Code {
    error.into().code()
}
