//! What the bench prints and writes: the summary of a scenario's rounds
//! (medians and spread), the table, the notes under it and the JSON report.
//! Measures nothing; every figure comes from `rounds` and `baseline`.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::fatal;
use crate::rounds::Round;
use crate::scenarios::{Durability, Scenario};

/// The settings of a run, as the report states them.
pub struct RunSettings<'a> {
    pub device: &'a str,
    pub rounds: usize,
    pub round_seconds: f64,
    /// Cores of the machine, shared by generator and server.
    pub cores: usize,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Median and (max - min) / median over rounds.
fn summarize(rounds: &[Round], figure: impl Fn(&Round) -> f64) -> (f64, f64) {
    let mut values: Vec<f64> = rounds.iter().map(figure).collect();
    let m = median(&mut values);
    let spread = match (values.first(), values.last()) {
        (Some(lo), Some(hi)) if m > 0.0 => (hi - lo) / m,
        _ => f64::NAN,
    };
    (m, spread)
}

/// One scenario's figures: medians over its rounds against the server and
/// over its in-process rounds.
pub struct Figures {
    pub calls_per_s: f64,
    /// (max - min) / median of calls/s.
    spread: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU cores used by the generator / the server (when measured).
    generator_cpu: f64,
    server_cpu: Option<f64>,
    in_process: f64,
    in_process_spread: f64,
    ratio: f64,
    errors: u64,
}

impl Figures {
    pub fn new(rounds: &[Round], baseline: &[Round], server_measured: bool) -> Figures {
        let (calls_per_s, spread) = summarize(rounds, Round::calls_per_s);
        let (p50_us, _) = summarize(rounds, |r| r.p50_us);
        let (p99_us, _) = summarize(rounds, |r| r.p99_us);
        let (generator_cpu, _) = summarize(rounds, |r| r.generator_cpu / r.seconds);
        let server_cpu = server_measured
            .then(|| summarize(rounds, |r| r.server_cpu.unwrap_or(f64::NAN) / r.seconds).0);
        let (in_process, in_process_spread) = summarize(baseline, Round::calls_per_s);
        Figures {
            calls_per_s,
            spread,
            p50_us,
            p99_us,
            generator_cpu,
            server_cpu,
            in_process,
            in_process_spread,
            ratio: calls_per_s / in_process,
            errors: rounds.iter().map(|r| r.errors).sum(),
        }
    }
}

/// The line about the run and the table's header.
pub fn print_header(settings: &RunSettings, server: &Value) {
    println!(
        "normserve-bench: {} rounds of {:.1} s per scenario, device {}, {} cores shared by generator and server; server {}",
        settings.rounds, settings.round_seconds, settings.device, settings.cores, server
    );
    println!(
        "\n{:<23} {:>10} {:>9} {:>9} {:>9} {:>10} {:>7} {:>7} {:>6} {:>6} {:>6}",
        "scenario",
        "calls/s",
        "MB/s",
        "p50 µs",
        "p99 µs",
        "in-proc/s",
        "ratio",
        "spread",
        "genCPU",
        "srvCPU",
        "errors"
    );
}

/// The scenario's row of the table.
pub fn print_row(scenario: &Scenario, figures: &Figures) {
    println!(
        "{:<23} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>10.0} {:>7.3} {:>6.0}% {:>6.2} {:>6} {:>6}",
        scenario.name,
        figures.calls_per_s,
        figures.calls_per_s * scenario.input_bytes() / 1e6,
        figures.p50_us,
        figures.p99_us,
        figures.in_process,
        figures.ratio,
        figures.spread * 100.0,
        figures.generator_cpu,
        figures
            .server_cpu
            .map_or("-".to_owned(), |c| format!("{c:.2}")),
        figures.errors,
    );
}

/// The scenario's entry in the JSON report, with every round.
/// `durability`: the one of the server that ran it (the arguments after
/// `--`, or a server at `--addr`, may differ from the scenario's own).
pub fn scenario_json(
    scenario: &Scenario,
    durability: Durability,
    figures: &Figures,
    rounds: &[Round],
) -> Value {
    let bytes = scenario.input_bytes();
    json!({
        "scenario": scenario.name,
        "description": scenario.what,
        "durability": durability.flag(),
        "shape": scenario.shape,
        "mode": if scenario.train { "train" } else { "eval" },
        "input_bytes": bytes,
        "calls_per_s": figures.calls_per_s,
        "mb_per_s": figures.calls_per_s * bytes / 1e6,
        "p50_us": figures.p50_us,
        "p99_us": figures.p99_us,
        "spread": figures.spread,
        "in_process_calls_per_s": figures.in_process,
        "in_process_spread": figures.in_process_spread,
        "ratio_service_over_in_process": figures.ratio,
        "generator_cpu_cores": figures.generator_cpu,
        "server_cpu_cores": figures.server_cpu,
        "errors": figures.errors,
        "rounds": rounds.iter().map(|r| json!({
            "calls": r.calls, "errors": r.errors, "seconds": r.seconds,
            "p50_us": r.p50_us, "p99_us": r.p99_us,
            "generator_cpu_s": r.generator_cpu, "server_cpu_s": r.server_cpu,
        })).collect::<Vec<_>>(),
    })
}

/// The stream-over-unary ratios the notes and the JSON report: (stream
/// scenario, unary scenario) pairs of the same input.
pub const STREAM_OVER_UNARY: [(&str, &str); 2] = [
    ("stream_small", "latency_1k"),
    ("stream_train_sync", "latency_1k_sync"),
];

/// `stream`'s calls/s over `unary`'s, when both ran.
pub fn calls_ratio(reports: &[Value], stream: &str, unary: &str) -> Option<f64> {
    let calls = |name: &str| {
        reports
            .iter()
            .find(|r| r["scenario"] == name)
            .and_then(|r| r["calls_per_s"].as_f64())
    };
    calls(stream).zip(calls(unary)).map(|(s, u)| s / u)
}

/// The notes under the table.
pub fn print_notes(reports: &[Value]) {
    println!(
        "\ncalls/s, MB/s (of input), p50/p99: medians over rounds; spread = (max - min) / median of calls/s;\n\
         ratio = service calls/s / in-process calls/s (same batch norm through libtorch here, no gRPC);\n\
         genCPU / srvCPU = CPU cores used by this generator / by the server during the rounds."
    );
    for (stream, unary) in STREAM_OVER_UNARY {
        if let Some(ratio) = calls_ratio(reports, stream, unary) {
            println!("{stream} / {unary} (unary) calls/s: {ratio:.2}x");
        }
    }
}

/// The memory line, from `target::idle_sessions`'s figures.
pub fn print_memory(memory: &Value, count: usize) {
    let mib = |key: &str| {
        memory[key]
            .as_f64()
            .map_or("?".to_owned(), |b| format!("{:.1}", b / 1048576.0))
    };
    println!(
        "memory: server RSS {} MiB after the scenarios, {} MiB with {} more idle BatchNorm1d(64) sessions ({:.2} KiB each; {:.0} creates/s, {} errors)",
        mib("rss_before_bytes"),
        mib("rss_after_bytes"),
        count,
        memory["bytes_per_session"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        memory["creates_per_s"].as_f64().unwrap_or(f64::NAN),
        memory["errors"],
    );
}

/// The disk line, from `disk::durable_write_floor`'s figures.
pub fn print_disk_floor(floor: &Value) {
    if let Some(error) = floor["error"].as_str() {
        println!(
            "disk: durable writes not measured in {}: {error}",
            floor["dir"].as_str().unwrap_or("?")
        );
        return;
    }
    let sizes: Vec<String> = floor["sizes"]
        .as_array()
        .map(|sizes| {
            sizes
                .iter()
                .map(|s| {
                    format!(
                        "{} KiB p50 {:.0} µs (p99 {:.0})",
                        s["bytes"].as_u64().unwrap_or(0) / 1024,
                        s["p50_us"].as_f64().unwrap_or(f64::NAN),
                        s["p99_us"].as_f64().unwrap_or(f64::NAN),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "disk: one write made durable (pwrite + fdatasync) in the sync server's data directory: {}; no store makes a write durable sooner",
        sizes.join(", ")
    );
}

/// The whole JSON report.
pub fn document(
    settings: &RunSettings,
    server: Value,
    memory: Value,
    disk_floor: Value,
    scenarios: Vec<Value>,
) -> Value {
    let stream_ratio = calls_ratio(&scenarios, "stream_small", "latency_1k");
    let stream_ratio_sync = calls_ratio(&scenarios, "stream_train_sync", "latency_1k_sync");
    json!({
        "generator": "normserve-bench",
        "device": settings.device,
        "rounds": settings.rounds,
        "round_seconds": settings.round_seconds,
        "cores": settings.cores,
        "server": server,
        "stream_over_unary": stream_ratio,
        "stream_over_unary_sync": stream_ratio_sync,
        "idle_sessions": memory,
        "disk_floor": disk_floor,
        "scenarios": scenarios,
    })
}

/// Writes the report to `destination` ("-": stdout).
pub fn write_json(report: &Value, destination: &str) {
    let text = match serde_json::to_string_pretty(report) {
        Ok(t) => t,
        Err(e) => fatal(&format!("json: {e}")),
    };
    if destination == "-" {
        println!("{text}");
    } else {
        let path = PathBuf::from(destination);
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        match std::fs::write(&path, text) {
            Ok(()) => println!("JSON report: {}", path.display()),
            Err(e) => eprintln!("normserve-bench: cannot write {}: {e}", path.display()),
        }
    }
}
