//! `normserve-bench`: the native load generator. A tonic client with HDR
//! histograms that runs named scenarios against a normserve server (one it
//! starts itself, or `--addr`), and runs the same batch norm through libtorch
//! in this process as the baseline, so every figure also prints as a ratio
//! `service / in-process`. Each scenario runs `--rounds` rounds of
//! `--round-seconds`; the table shows medians over rounds and their spread.
//!
//! `make bench` runs it; `normserve-bench --help` lists the options and
//! `--list` the scenarios. It reports, it asserts nothing.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use normserve::proto::v1 as pb;
use normserve::proto::v1::batch_norm_service_client::BatchNormServiceClient;
use normserve::proto::v1::compare_service_client::CompareServiceClient;
use normserve::proto::v1::server_service_client::ServerServiceClient;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Debug)]
#[command(
    name = "normserve-bench",
    about = "normserve load generator: named scenarios, HDR latency histograms, in-process libtorch baseline"
)]
struct Args {
    /// Server binary to start (with --listen 127.0.0.1:0, --durability none
    /// and --device DEVICE, plus any arguments after `--`).
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    /// Unary Forward from `callers` concurrent callers, each on its own session.
    Unary { callers: usize },
    /// ForwardStream with up to `window` requests in flight.
    Stream { window: usize },
    /// The Compare RPC, sequential.
    Compare,
}

#[derive(Clone, Debug)]
struct Scenario {
    name: &'static str,
    what: &'static str,
    shape: Vec<i64>,
    train: bool,
    workload: Workload,
}

fn scenarios() -> Vec<Scenario> {
    let unary = Workload::Unary { callers: 1 };
    let s = |name, what, shape: &[i64], train, workload| Scenario {
        name,
        what,
        shape: shape.to_vec(),
        train,
        workload,
    };
    vec![
        s(
            "latency_1k",
            "unary train (4,64) f32, sequential",
            &[4, 64],
            true,
            unary,
        ),
        s(
            "latency_1k_eval",
            "unary eval (4,64), sequential",
            &[4, 64],
            false,
            unary,
        ),
        s(
            "throughput_1m",
            "unary train (4096,64) 1 MiB",
            &[4096, 64],
            true,
            unary,
        ),
        s(
            "throughput_1m_4d",
            "unary train (64,64,8,8) 1 MiB",
            &[64, 64, 8, 8],
            true,
            unary,
        ),
        s(
            "throughput_16m",
            "unary train (65536,64) 16 MiB",
            &[65536, 64],
            true,
            unary,
        ),
        s(
            "throughput_16m_4d",
            "unary train (64,64,32,32) 16 MiB",
            &[64, 64, 32, 32],
            true,
            unary,
        ),
        s(
            "throughput_16m_eval",
            "unary eval (65536,64) 16 MiB",
            &[65536, 64],
            false,
            unary,
        ),
        s(
            "throughput_16m_4d_eval",
            "unary eval (64,64,32,32) 16 MiB",
            &[64, 64, 32, 32],
            false,
            unary,
        ),
        s(
            "concurrent_64k_8",
            "8 callers, train (256,64) 64 KiB",
            &[256, 64],
            true,
            Workload::Unary { callers: 8 },
        ),
        s(
            "concurrent_64k_64",
            "64 callers, train (256,64) 64 KiB",
            &[256, 64],
            true,
            Workload::Unary { callers: 64 },
        ),
        s(
            "stream_small",
            "ForwardStream train (4,64), 32 in flight",
            &[4, 64],
            true,
            Workload::Stream { window: 32 },
        ),
        s(
            "compare_small",
            "Compare train (4,64), all implementations",
            &[4, 64],
            true,
            Workload::Compare,
        ),
    ]
}

/// One round's figures.
#[derive(Clone, Debug, Default)]
struct Round {
    calls: u64,
    errors: u64,
    seconds: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU seconds used by this process and by the server during the round.
    generator_cpu: f64,
    server_cpu: Option<f64>,
}

impl Round {
    fn calls_per_s(&self) -> f64 {
        self.calls as f64 / self.seconds
    }
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

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) closed by ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux ABI that exposes /proc/<pid>/stat.
    Some((utime + stime) / 100.0)
}

struct CpuMeter {
    server_pid: Option<String>,
    start_self: f64,
    start_server: Option<f64>,
}

impl CpuMeter {
    fn start(server_pid: Option<&str>) -> Self {
        CpuMeter {
            server_pid: server_pid.map(str::to_owned),
            start_self: cpu_seconds("self").unwrap_or(0.0),
            start_server: server_pid.and_then(cpu_seconds),
        }
    }

    fn stop(&self) -> (f64, Option<f64>) {
        let own = cpu_seconds("self").unwrap_or(0.0) - self.start_self;
        let server = match (&self.server_pid, self.start_server) {
            (Some(pid), Some(start)) => cpu_seconds(pid).map(|now| now - start),
            _ => None,
        };
        (own, server)
    }
}

fn histogram() -> Histogram<u64> {
    // Nanoseconds, 1 µs to 10 min, 3 significant digits.
    match Histogram::new_with_bounds(1_000, 600_000_000_000, 3) {
        Ok(h) => h,
        Err(e) => fatal(&format!("histogram: {e}")),
    }
}

fn fatal(message: &str) -> ! {
    eprintln!("normserve-bench: {message}");
    std::process::exit(1);
}

fn random_input(shape: &[i64], device: Device) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_device(device)
}

fn raw_bytes(tensor: &Tensor) -> Bytes {
    let host = tensor.to_device(Device::Cpu).contiguous();
    let numel = host.numel();
    let mut raw = vec![0u8; numel * 4];
    host.copy_data_u8(&mut raw, numel);
    Bytes::from(raw)
}

fn wire_tensor(shape: &[i64], raw: &Bytes) -> pb::Tensor {
    pb::Tensor {
        dtype: pb::DataType::Float32 as i32,
        shape: shape.to_vec(),
        values: Some(pb::tensor::Values::Raw(raw.clone())),
    }
}

fn mode(train: bool) -> i32 {
    if train {
        pb::Mode::Train as i32
    } else {
        pb::Mode::Eval as i32
    }
}

fn layer_kind(shape: &[i64]) -> pb::BatchNormKind {
    match shape.len() {
        2 | 3 => pb::BatchNormKind::BatchNorm1d,
        4 => pb::BatchNormKind::BatchNorm2d,
        _ => pb::BatchNormKind::BatchNorm3d,
    }
}

struct Target {
    address: String,
    server: Option<Child>,
    data_dir: Option<PathBuf>,
}

impl Target {
    fn server_pid(&self) -> Option<String> {
        self.server.as_ref().map(|c| c.id().to_string())
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.server {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
        if let Some(dir) = &self.data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn start_server(args: &Args) -> Target {
    if let Some(address) = &args.addr {
        return Target {
            address: address.clone(),
            server: None,
            data_dir: None,
        };
    }
    let data_dir = std::env::temp_dir().join(format!("normserve-bench-{}", std::process::id()));
    let mut child = match Command::new(&args.server_bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--durability",
            "none",
            "--log",
            "warn",
        ])
        .arg("--device")
        .arg(&args.device)
        .arg("--data-dir")
        .arg(&data_dir)
        .args(&args.server_args)
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => fatal(&format!(
            "cannot start {}: {e} (build it with `make build`, or pass --addr)",
            args.server_bin.display()
        )),
    };
    let Some(stdout) = child.stdout.take() else {
        fatal("server stdout not captured")
    };
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    let Some(address) = line
        .strip_prefix("normserve listening on ")
        .and_then(|rest| rest.split_whitespace().next())
    else {
        let _ = child.kill();
        fatal(&format!("server did not start (first line: {line:?})"))
    };
    Target {
        address: format!("http://{address}"),
        server: Some(child),
        data_dir: Some(data_dir),
    }
}

async fn connect(address: &str) -> Channel {
    let endpoint = match Endpoint::from_shared(address.to_owned()) {
        Ok(e) => e,
        Err(e) => fatal(&format!("bad address {address}: {e}")),
    };
    match endpoint
        .tcp_nodelay(true)
        // Large DATA frames: the server writes one frame per syscall, and
        // HTTP/2's default 16 KiB frames cost ~1000 syscalls per 16 MiB.
        .max_frame_size((16u32 << 20) - 1)
        .initial_stream_window_size(64 << 20)
        .initial_connection_window_size(64 << 20)
        .connect()
        .await
    {
        Ok(channel) => channel,
        Err(e) => fatal(&format!("cannot connect to {address}: {e}")),
    }
}

fn batch_norm_client(channel: Channel) -> BatchNormServiceClient<Channel> {
    BatchNormServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

async fn create_session(channel: &Channel, shape: &[i64], device: &str) -> String {
    let reply = batch_norm_client(channel.clone())
        .create_session(pb::CreateSessionRequest {
            kind: layer_kind(shape) as i32,
            num_features: shape[1],
            device: device.to_owned(),
            ..Default::default()
        })
        .await;
    match reply {
        Ok(r) => r
            .into_inner()
            .session
            .map(|s| s.session_id)
            .unwrap_or_default(),
        Err(status) => fatal(&format!("CreateSession: {status}")),
    }
}

fn finish(
    histogram: &Histogram<u64>,
    calls: u64,
    errors: u64,
    start: Instant,
    cpu: &CpuMeter,
) -> Round {
    let (generator_cpu, server_cpu) = cpu.stop();
    Round {
        calls,
        errors,
        seconds: start.elapsed().as_secs_f64(),
        p50_us: histogram.value_at_quantile(0.5) as f64 / 1e3,
        p99_us: histogram.value_at_quantile(0.99) as f64 / 1e3,
        generator_cpu,
        server_cpu,
    }
}

/// Shared per-scenario setup: channels, sessions, the request bytes.
struct Prepared {
    channels: Vec<Channel>,
    sessions: Vec<String>,
    raw: Bytes,
}

async fn prepare(target: &Target, scenario: &Scenario, device: &str) -> Prepared {
    let callers = match scenario.workload {
        Workload::Unary { callers } => callers,
        _ => 1,
    };
    // One HTTP/2 connection per caller, up to 8; more callers share them.
    let mut channels = Vec::new();
    for _ in 0..callers.min(8) {
        channels.push(connect(&target.address).await);
    }
    let mut sessions = Vec::new();
    if scenario.workload != Workload::Compare {
        for i in 0..callers {
            sessions
                .push(create_session(&channels[i % channels.len()], &scenario.shape, device).await);
        }
    }
    let raw = raw_bytes(&random_input(&scenario.shape, Device::Cpu));
    Prepared {
        channels,
        sessions,
        raw,
    }
}

async fn unary_round(
    prepared: &Prepared,
    scenario: &Scenario,
    duration: Duration,
    cpu_pid: Option<&str>,
) -> Round {
    let cpu = CpuMeter::start(cpu_pid);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for (i, session_id) in prepared.sessions.iter().enumerate() {
        let mut client = batch_norm_client(prepared.channels[i % prepared.channels.len()].clone());
        let request = pb::ForwardRequest {
            session_id: session_id.clone(),
            input: Some(wire_tensor(&scenario.shape, &prepared.raw)),
            mode: mode(scenario.train),
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move {
            let mut histogram = histogram();
            let (mut calls, mut errors) = (0u64, 0u64);
            let mut first_error = None;
            while Instant::now() < deadline {
                let sent = Instant::now();
                match client.forward(request.clone()).await {
                    Ok(reply) => {
                        std::hint::black_box(reply.into_inner());
                        calls += 1;
                        histogram.saturating_record(sent.elapsed().as_nanos() as u64);
                    }
                    Err(status) => {
                        errors += 1;
                        first_error.get_or_insert(status);
                    }
                }
            }
            (histogram, calls, errors, first_error)
        }));
    }
    let mut total = histogram();
    let (mut calls, mut errors) = (0, 0);
    for task in tasks {
        let Ok((h, c, e, first_error)) = task.await else {
            fatal("a caller task panicked")
        };
        if let Some(status) = first_error {
            eprintln!(
                "normserve-bench: {}: {} errors, first: {status}",
                scenario.name, e
            );
        }
        let _ = total.add(&h);
        calls += c;
        errors += e;
    }
    finish(&total, calls, errors, start, &cpu)
}

async fn stream_round(
    prepared: &Prepared,
    scenario: &Scenario,
    window: usize,
    duration: Duration,
    cpu_pid: Option<&str>,
) -> Round {
    let mut client = batch_norm_client(prepared.channels[0].clone());
    let session_id = prepared.sessions[0].clone();
    let input = wire_tensor(&scenario.shape, &prepared.raw);
    let train = scenario.train;
    let cpu = CpuMeter::start(cpu_pid);
    let start = Instant::now();
    let deadline = start + duration;
    let permits = Arc::new(Semaphore::new(window));
    let sent_at: Arc<std::sync::Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let (sender, receiver) = mpsc::channel::<pb::ForwardRequest>(window);
    let feeder = {
        let permits = permits.clone();
        let sent_at = sent_at.clone();
        tokio::spawn(async move {
            let mut index = 0u64;
            while Instant::now() < deadline {
                let Ok(permit) = permits.acquire().await else {
                    break;
                };
                permit.forget();
                if let Ok(mut map) = sent_at.lock() {
                    map.insert(index, Instant::now());
                }
                let request = pb::ForwardRequest {
                    session_id: session_id.clone(),
                    input: Some(input.clone()),
                    mode: mode(train),
                    ..Default::default()
                };
                if sender.send(request).await.is_err() {
                    break;
                }
                index += 1;
            }
            // Dropping the sender half-closes the stream.
        })
    };
    let mut histogram = histogram();
    let (mut calls, mut errors) = (0u64, 0u64);
    let stream = client
        .forward_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await;
    match stream {
        Ok(reply) => {
            let mut responses = reply.into_inner();
            while let Some(item) = responses.next().await {
                match item {
                    Ok(message) => {
                        let sent = sent_at
                            .lock()
                            .ok()
                            .and_then(|mut m| m.remove(&message.index));
                        match message.result {
                            Some(pb::forward_stream_response::Result::Response(r)) => {
                                std::hint::black_box(r);
                                calls += 1;
                                if let Some(sent) = sent {
                                    histogram.saturating_record(sent.elapsed().as_nanos() as u64);
                                }
                            }
                            _ => errors += 1,
                        }
                        permits.add_permits(1);
                    }
                    Err(status) => {
                        eprintln!(
                            "normserve-bench: {}: stream failed: {status}",
                            scenario.name
                        );
                        errors += 1;
                        break;
                    }
                }
            }
        }
        Err(status) => {
            eprintln!(
                "normserve-bench: {}: ForwardStream: {status}",
                scenario.name
            );
            errors += 1;
        }
    }
    permits.close();
    let _ = feeder.await;
    finish(&histogram, calls, errors, start, &cpu)
}

fn compare_request(scenario: &Scenario, raw: &Bytes, device: &str) -> pb::CompareRequest {
    pb::CompareRequest {
        input: Some(wire_tensor(&scenario.shape, raw)),
        training: scenario.train,
        device: device.to_owned(),
        ..Default::default()
    }
}

async fn compare_round(
    prepared: &Prepared,
    scenario: &Scenario,
    device: &str,
    duration: Duration,
    cpu_pid: Option<&str>,
) -> Round {
    let mut client = CompareServiceClient::new(prepared.channels[0].clone())
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let request = compare_request(scenario, &prepared.raw, device);
    let cpu = CpuMeter::start(cpu_pid);
    let start = Instant::now();
    let mut histogram = histogram();
    let (mut calls, mut errors) = (0u64, 0u64);
    while start.elapsed() < duration {
        let sent = Instant::now();
        match client.compare(request.clone()).await {
            Ok(reply) => {
                std::hint::black_box(reply.into_inner());
                calls += 1;
                histogram.saturating_record(sent.elapsed().as_nanos() as u64);
            }
            Err(status) => {
                if errors == 0 {
                    eprintln!("normserve-bench: {}: {status}", scenario.name);
                }
                errors += 1;
            }
        }
    }
    finish(&histogram, calls, errors, start, &cpu)
}

/// The in-process baseline: the same work through libtorch in this process,
/// no gRPC, on as many threads as the scenario has callers (at most the
/// machine's cores, as the server's compute pool). Calls/s per round.
fn in_process_rounds(
    scenario: &Scenario,
    device: Device,
    device_text: &str,
    rounds: usize,
    duration: Duration,
) -> Vec<Round> {
    let callers = match scenario.workload {
        Workload::Unary { callers } => callers,
        _ => 1,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = callers.min(cores).max(1);
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
        let request = compare_request(scenario, &raw_bytes(&input), device_text);
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

/// Resident set of a process in bytes, from /proc.
fn rss_bytes(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The server's RSS before and after creating `count` idle BatchNorm1d(64)
/// sessions (8 concurrent creators), and the creation rate.
async fn idle_sessions(target: &Target, pid: &str, count: usize) -> Value {
    let channel = connect(&target.address).await;
    let before = rss_bytes(pid);
    let start = Instant::now();
    let per_task = count.div_ceil(8);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut client = batch_norm_client(channel.clone());
        let n = per_task.min(count.saturating_sub(t * per_task));
        tasks.push(tokio::spawn(async move {
            let mut errors = 0u64;
            for _ in 0..n {
                let request = pb::CreateSessionRequest {
                    kind: pb::BatchNormKind::BatchNorm1d as i32,
                    num_features: 64,
                    ..Default::default()
                };
                if client.create_session(request).await.is_err() {
                    errors += 1;
                }
            }
            errors
        }));
    }
    let mut errors = 0;
    for task in tasks {
        errors += task.await.unwrap_or(1);
    }
    let seconds = start.elapsed().as_secs_f64();
    let after = rss_bytes(pid);
    let per_session = match (before, after) {
        (Some(b), Some(a)) if count > 0 => Some(a.saturating_sub(b) as f64 / count as f64),
        _ => None,
    };
    json!({
        "sessions": count,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "bytes_per_session": per_session,
        "creates_per_s": count as f64 / seconds,
        "errors": errors,
    })
}

async fn server_description(target: &Target) -> Value {
    let mut client = ServerServiceClient::new(connect(&target.address).await);
    match client
        .get_server_info(pb::GetServerInfoRequest::default())
        .await
    {
        Ok(reply) => {
            let info = reply.into_inner();
            json!({
                "version": info.server_version,
                "libtorch": info.libtorch_version,
                "default_device": info.default_device,
                "intra_op_threads": info.intra_op_threads,
                "compute_threads": info.compute_threads,
                "store": info.store,
                "features": info.features,
            })
        }
        Err(status) => json!({ "error": status.to_string() }),
    }
}

fn main() {
    normserve::memory::retain_freed_buffers();
    let args = Args::parse();
    let all = scenarios();
    if args.list {
        for s in &all {
            println!("{:<24} {}", s.name, s.what);
        }
        return;
    }
    let selected: Vec<Scenario> = if args.scenarios.is_empty() {
        all
    } else {
        args.scenarios
            .iter()
            .map(|name| match all.iter().find(|s| s.name == name) {
                Some(s) => s.clone(),
                None => fatal(&format!("unknown scenario {name:?} (see --list)")),
            })
            .collect()
    };
    let device = match args.device.as_str() {
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
    tch::set_num_threads(args.baseline_threads);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => fatal(&format!("runtime: {e}")),
    };
    let target = start_server(&args);
    let duration = Duration::from_secs_f64(args.round_seconds);
    let server_pid = target.server_pid();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let server = runtime.block_on(server_description(&target));
    println!(
        "normserve-bench: {} rounds of {:.1} s per scenario, device {}, {} cores shared by generator and server; server {}",
        args.rounds, args.round_seconds, args.device, cores, server
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
    let mut reports = Vec::new();
    let mut unary_small = None;
    for scenario in &selected {
        let bytes = scenario.shape.iter().product::<i64>() as f64 * 4.0;
        let rounds: Vec<Round> = runtime.block_on(async {
            let prepared = prepare(&target, scenario, &args.device).await;
            let mut rounds = Vec::new();
            // Round 0 warms up (connections, allocator, libtorch) and is dropped.
            for i in 0..=args.rounds {
                let round_time = if i == 0 {
                    duration.min(Duration::from_millis(300))
                } else {
                    duration
                };
                let round = match scenario.workload {
                    Workload::Unary { .. } => {
                        unary_round(&prepared, scenario, round_time, server_pid.as_deref()).await
                    }
                    Workload::Stream { window } => {
                        stream_round(
                            &prepared,
                            scenario,
                            window,
                            round_time,
                            server_pid.as_deref(),
                        )
                        .await
                    }
                    Workload::Compare => {
                        compare_round(
                            &prepared,
                            scenario,
                            &args.device,
                            round_time,
                            server_pid.as_deref(),
                        )
                        .await
                    }
                };
                if i > 0 {
                    rounds.push(round);
                }
            }
            rounds
        });
        let baseline = in_process_rounds(scenario, device, &args.device, args.rounds, duration);
        let (calls_per_s, spread) = summarize(&rounds, Round::calls_per_s);
        let (p50, _) = summarize(&rounds, |r| r.p50_us);
        let (p99, _) = summarize(&rounds, |r| r.p99_us);
        let (generator_cpu, _) = summarize(&rounds, |r| r.generator_cpu / r.seconds);
        let server_cpu = server_pid
            .is_some()
            .then(|| summarize(&rounds, |r| r.server_cpu.unwrap_or(f64::NAN) / r.seconds).0);
        let (in_process, in_process_spread) = summarize(&baseline, Round::calls_per_s);
        let errors: u64 = rounds.iter().map(|r| r.errors).sum();
        let ratio = calls_per_s / in_process;
        if scenario.name == "latency_1k" {
            unary_small = Some(calls_per_s);
        }
        println!(
            "{:<23} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>10.0} {:>7.3} {:>6.0}% {:>6.2} {:>6} {:>6}",
            scenario.name,
            calls_per_s,
            calls_per_s * bytes / 1e6,
            p50,
            p99,
            in_process,
            ratio,
            spread * 100.0,
            generator_cpu,
            server_cpu.map_or("-".to_owned(), |c| format!("{c:.2}")),
            errors,
        );
        reports.push(json!({
            "scenario": scenario.name,
            "description": scenario.what,
            "shape": scenario.shape,
            "mode": if scenario.train { "train" } else { "eval" },
            "input_bytes": bytes,
            "calls_per_s": calls_per_s,
            "mb_per_s": calls_per_s * bytes / 1e6,
            "p50_us": p50,
            "p99_us": p99,
            "spread": spread,
            "in_process_calls_per_s": in_process,
            "in_process_spread": in_process_spread,
            "ratio_service_over_in_process": ratio,
            "generator_cpu_cores": generator_cpu,
            "server_cpu_cores": server_cpu,
            "errors": errors,
            "rounds": rounds.iter().map(|r| json!({
                "calls": r.calls, "errors": r.errors, "seconds": r.seconds,
                "p50_us": r.p50_us, "p99_us": r.p99_us,
                "generator_cpu_s": r.generator_cpu, "server_cpu_s": r.server_cpu,
            })).collect::<Vec<_>>(),
        }));
    }
    let stream_ratio = reports
        .iter()
        .find(|r| r["scenario"] == "stream_small")
        .and_then(|r| r["calls_per_s"].as_f64())
        .zip(unary_small)
        .map(|(stream, unary)| stream / unary);
    println!(
        "\ncalls/s, MB/s (of input), p50/p99: medians over rounds; spread = (max - min) / median of calls/s;\n\
         ratio = service calls/s / in-process calls/s (same batch norm through libtorch here, no gRPC);\n\
         genCPU / srvCPU = CPU cores used by this generator / by the server during the rounds."
    );
    if let Some(ratio) = stream_ratio {
        println!("stream_small / latency_1k (unary) calls/s: {ratio:.2}x");
    }
    let memory = match (&server_pid, args.idle_sessions) {
        (Some(pid), count) if count > 0 => {
            let value = runtime.block_on(idle_sessions(&target, pid, count));
            let mib = |key: &str| {
                value[key]
                    .as_f64()
                    .map_or("?".to_owned(), |b| format!("{:.1}", b / 1048576.0))
            };
            println!(
                "memory: server RSS {} MiB after the scenarios, {} MiB with {} more idle BatchNorm1d(64) sessions ({:.2} KiB each; {:.0} creates/s, {} errors)",
                mib("rss_before_bytes"),
                mib("rss_after_bytes"),
                count,
                value["bytes_per_session"].as_f64().unwrap_or(f64::NAN) / 1024.0,
                value["creates_per_s"].as_f64().unwrap_or(f64::NAN),
                value["errors"],
            );
            value
        }
        _ => Value::Null,
    };
    let report = json!({
        "generator": "normserve-bench",
        "device": args.device,
        "rounds": args.rounds,
        "round_seconds": args.round_seconds,
        "cores": cores,
        "server": server,
        "stream_over_unary": stream_ratio,
        "idle_sessions": memory,
        "scenarios": reports,
    });
    let text = match serde_json::to_string_pretty(&report) {
        Ok(t) => t,
        Err(e) => fatal(&format!("json: {e}")),
    };
    if args.json == "-" {
        println!("{text}");
    } else {
        let path = PathBuf::from(&args.json);
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        match std::fs::write(&path, text) {
            Ok(()) => println!("JSON report: {}", path.display()),
            Err(e) => eprintln!("normserve-bench: cannot write {}: {e}", path.display()),
        }
    }
    // Close the client connections first, so the server drains at once.
    drop(runtime);
    drop(target);
}
