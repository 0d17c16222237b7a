//! `normserve-bench`: the native load generator. A tonic client with HDR
//! histograms that runs named scenarios against a normserve server (one it
//! starts itself, or `--addr`), and runs the same batch norm through libtorch
//! in this process as the baseline, so every figure also prints as a ratio
//! `service / in-process`. Each scenario runs `--rounds` rounds of
//! `--round-seconds`; the table shows medians over rounds and their spread.
//!
//! `make bench` runs it; `normserve-bench --help` lists the options and
//! `--list` the scenarios. It reports, it asserts nothing.
//!
//! This file parses the flags, runs each scenario (`rounds`, then
//! `baseline`) and hands the figures to `report`; `scenarios` names the
//! work, `target` is the server under test, `disk` measures the floor a
//! durable commit stands on.

mod baseline;
mod disk;
mod report;
mod rounds;
mod scenarios;
mod shared;
mod target;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde_json::Value;
use tch::Device;

use report::{Figures, RunSettings};
use scenarios::Durability;
use target::{ServerCommand, Target};

#[derive(Parser, Debug)]
#[command(
    name = "normserve-bench",
    about = "normserve load generator: named scenarios, HDR latency histograms, in-process libtorch baseline"
)]
struct Args {
    /// Server binary to start (with --listen 127.0.0.1:0, --durability none
    /// and --device DEVICE, plus any arguments after `--`); the `_sync`
    /// scenarios run against a second one started with --durability sync
    /// (unless the arguments after `--` choose the durability for both).
    #[arg(long, default_value = "target/release/normserve")]
    server_bin: PathBuf,
    /// Benchmark a running server instead of starting one, e.g.
    /// http://127.0.0.1:50051 (its CPU use is then not reported).
    #[arg(long)]
    addr: Option<String>,
    /// Comma-separated scenario names (default: all; see --list).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Rounds per scenario; medians and spread are over rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per round.
    #[arg(long, default_value_t = 1.0)]
    round_seconds: f64,
    /// Device of the sessions and of the in-process baseline: cpu, cuda, cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// libtorch intra-op threads of the in-process baseline (the server's
    /// default is 1 as well).
    #[arg(long, default_value_t = 1)]
    baseline_threads: i32,
    /// Where to write the JSON report ("-" for stdout).
    #[arg(long, default_value = "target/bench/normserve-bench.json")]
    json: String,
    /// Idle sessions (64 features) created for the memory figure (0: skip).
    #[arg(long, default_value_t = 10_000)]
    idle_sessions: usize,
    /// Print the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Extra arguments for the started server, after `--`.
    #[arg(last = true)]
    server_args: Vec<String>,
}

/// Ends the bench with a message and exit status 1.
fn fatal(message: &str) -> ! {
    eprintln!("normserve-bench: {message}");
    std::process::exit(1);
}

/// `--device`: cpu, cuda or cuda:N, and only a device libtorch can see.
fn parse_device(text: &str) -> Device {
    let device = match text {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => Device::Cuda(i),
            None => fatal(&format!(
                "--device: expected cpu, cuda or cuda:N, got {other:?}"
            )),
        },
    };
    if device != Device::Cpu && !tch::Cuda::is_available() {
        fatal("--device cuda: libtorch sees no CUDA device in this process");
    }
    device
}

fn main() {
    normserve::memory::retain_freed_buffers();
    let args = Args::parse();
    if args.list {
        for s in &scenarios::scenarios() {
            println!("{:<24} {}", s.name, s.what);
        }
        return;
    }
    let selected = scenarios::select(&args.scenarios);
    let device = parse_device(&args.device);
    tch::set_num_threads(args.baseline_threads);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => fatal(&format!("runtime: {e}")),
    };
    let command = |durability: Durability| ServerCommand {
        binary: &args.server_bin,
        device: &args.device,
        durability: durability.flag(),
        extra_args: &args.server_args,
    };
    let target = match &args.addr {
        Some(address) => Target::running(address),
        None => Target::start(&command(Durability::None)),
    };
    // Started for the first scenario that needs it.
    let mut sync_target: Option<Target> = None;
    let duration = Duration::from_secs_f64(args.round_seconds);
    let server_pid = target.server_pid();
    let settings = RunSettings {
        device: &args.device,
        rounds: args.rounds,
        round_seconds: args.round_seconds,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };

    let server = runtime.block_on(target::server_description(&target));
    report::print_header(&settings, &server);
    let mut reports = Vec::new();
    // The data directory of a started server with --durability sync that
    // ran a scenario (the second server, or the first when the arguments
    // after `--` chose sync).
    let mut sync_dir: Option<PathBuf> = None;
    let first_is_sync = server["features"]
        .as_array()
        .is_some_and(|features| features.iter().any(|f| f == "durability:sync"));
    for scenario in &selected {
        // With --addr, or a durability given after `--`, every scenario runs
        // against the one server.
        let separate = args.addr.is_none()
            && scenario.durability != Durability::None
            && !command(scenario.durability).durability_given();
        let (target, pid) = if separate {
            let started =
                sync_target.get_or_insert_with(|| Target::start(&command(Durability::Sync)));
            let pid = started.server_pid();
            (&*started, pid)
        } else {
            (&target, server_pid.clone())
        };
        let durability = if separate || first_is_sync {
            Durability::Sync
        } else {
            Durability::None
        };
        if durability == Durability::Sync {
            sync_dir = sync_dir.or_else(|| target.data_dir().map(PathBuf::from));
        }
        let rounds = runtime.block_on(rounds::service_rounds(
            target,
            scenario,
            &args.device,
            args.rounds,
            duration,
            pid.as_deref(),
        ));
        let baseline =
            baseline::in_process_rounds(scenario, device, &args.device, args.rounds, duration);
        let figures = Figures::new(&rounds, &baseline, pid.is_some());
        report::print_row(scenario, &figures);
        reports.push(report::scenario_json(
            scenario, durability, &figures, &rounds,
        ));
    }
    report::print_notes(&reports);
    let disk_floor = match &sync_dir {
        Some(dir) => {
            let floor = disk::durable_write_floor(dir);
            report::print_disk_floor(&floor);
            floor
        }
        None => Value::Null,
    };
    let memory = match (&server_pid, args.idle_sessions) {
        (Some(pid), count) if count > 0 => {
            let value = runtime.block_on(target::idle_sessions(&target, pid, count));
            report::print_memory(&value, count);
            value
        }
        _ => Value::Null,
    };
    let document = report::document(&settings, server, memory, disk_floor, reports);
    report::write_json(&document, &args.json);
    // Close the client connections first, so the server drains at once.
    drop(runtime);
    drop(sync_target);
    drop(target);
}
