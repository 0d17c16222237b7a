//! Running a scenario against the server: its connections and sessions, the
//! callers of each workload (unary, stream, Compare), one HDR histogram of
//! latencies per round, and the figures of a round. Prints nothing but the
//! first error of a round.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use normserve::proto::v1 as pb;
use normserve::proto::v1::compare_service_client::CompareServiceClient;
use tch::Device;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::fatal;
use crate::scenarios::{random_input, raw_bytes, step_spec, Scenario, Workload};
use crate::shared::SharedObject;
use crate::target::{batch_norm_client, connect, CpuMeter, Target};

/// One round's figures.
#[derive(Clone, Debug, Default)]
pub struct Round {
    pub calls: u64,
    pub errors: u64,
    pub seconds: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// CPU seconds used by this process and by the server during the round.
    pub generator_cpu: f64,
    pub server_cpu: Option<f64>,
}

impl Round {
    pub fn calls_per_s(&self) -> f64 {
        self.calls as f64 / self.seconds
    }
}

/// `rounds` rounds of `duration` of `scenario` against the server, after a
/// warm-up round (connections, allocator, libtorch) that is dropped.
pub async fn service_rounds(
    target: &Target,
    scenario: &Scenario,
    device: &str,
    rounds: usize,
    duration: Duration,
    server_pid: Option<&str>,
) -> Vec<Round> {
    let prepared = prepare(target, scenario, device).await;
    let mut measured = Vec::new();
    // Round 0 warms up and is dropped.
    for i in 0..=rounds {
        let round_time = if i == 0 {
            duration.min(Duration::from_millis(300))
        } else {
            duration
        };
        let round = match scenario.workload {
            Workload::Unary { .. } => {
                unary_round(&prepared, scenario, round_time, server_pid).await
            }
            Workload::Stream { window } => {
                stream_round(&prepared, scenario, window, round_time, server_pid).await
            }
            Workload::Compare => {
                compare_round(&prepared, scenario, device, round_time, server_pid).await
            }
            Workload::Fairness { .. } => {
                fairness_round(&prepared, scenario, round_time, server_pid).await
            }
            Workload::Steps { ranks }
            | Workload::SharedSteps { ranks }
            | Workload::ReduceSteps { ranks }
            | Workload::Concurrent { ranks } => {
                steps_round(&prepared, scenario, ranks, round_time, server_pid).await
            }
            Workload::ReduceStream { ranks } => {
                reduce_stream_round(&prepared, scenario, ranks, round_time, server_pid).await
            }
            Workload::SharedMemory { copy, request_ids } => {
                let options = SharedOptions { copy, request_ids };
                shared_round(&prepared, scenario, options, round_time, server_pid).await
            }
        };
        if i > 0 {
            measured.push(round);
        }
    }
    if let Some(shared) = prepared.shared {
        shared.remove().await;
    }
    for shared in prepared.shared_ranks {
        shared.remove().await;
    }
    measured
}

/// How a shared-memory scenario calls.
#[derive(Clone, Copy)]
struct SharedOptions {
    /// The client's copies in and out timed with each call.
    copy: bool,
    /// A new request_id on each call.
    request_ids: bool,
}

/// Request ids of the shared-memory scenarios, unique within the process.
static NEXT_REQUEST_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sequential Forwards through the shared-memory object.
async fn shared_round(
    prepared: &Prepared,
    scenario: &Scenario,
    options: SharedOptions,
    duration: Duration,
    cpu_pid: Option<&str>,
) -> Round {
    let SharedOptions { copy, request_ids } = options;
    let Some(shared) = &prepared.shared else {
        fatal("shared-memory scenario without its object")
    };
    let mut client = batch_norm_client(prepared.channels[0].clone());
    let request = shared.forward_request(scenario, prepared.sessions[0].clone());
    let mut output = vec![0u8; prepared.raw.len()];
    let mut histogram = histogram();
    let (mut calls, mut errors) = (0u64, 0u64);
    let cpu = CpuMeter::start(cpu_pid);
    let start = Instant::now();
    let deadline = start + duration;
    while Instant::now() < deadline {
        let sent = Instant::now();
        if copy {
            if let Err(e) = shared.copy_in(&prepared.raw) {
                fatal(&format!("copy into {}: {e}", shared.name));
            }
        }
        let mut request = request.clone();
        if request_ids {
            let next = NEXT_REQUEST_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            request.request_id = format!("bench-{next}");
        }
        match client.forward(request).await {
            Ok(reply) => {
                if copy {
                    if let Err(e) = shared.copy_out(&mut output) {
                        fatal(&format!("copy out of {}: {e}", shared.name));
                    }
                }
                std::hint::black_box((reply.into_inner(), &output));
                calls += 1;
                histogram.saturating_record(sent.elapsed().as_nanos() as u64);
            }
            Err(status) => {
                if errors == 0 {
                    eprintln!("normserve-bench: {}: first error: {status}", scenario.name);
                }
                errors += 1;
            }
        }
    }
    finish(&histogram, calls, errors, start, &cpu)
}

fn histogram() -> Histogram<u64> {
    // Nanoseconds, 1 µs to 10 min, 3 significant digits.
    match Histogram::new_with_bounds(1_000, 600_000_000_000, 3) {
        Ok(h) => h,
        Err(e) => fatal(&format!("histogram: {e}")),
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
    /// The next synchronized step (steps only grow, across rounds too).
    next_step: std::sync::atomic::AtomicU64,
    /// The shared-memory scenarios' registered object.
    shared: Option<SharedObject>,
    /// `SharedSteps`: each rank's registered object.
    shared_ranks: Vec<SharedObject>,
}

async fn prepare(target: &Target, scenario: &Scenario, device: &str) -> Prepared {
    let callers = scenario.callers();
    // One HTTP/2 connection per caller, up to 8; more callers share them.
    let mut channels = Vec::new();
    for _ in 0..callers.min(8) {
        channels.push(connect(&target.address).await);
    }
    let mut sessions = Vec::new();
    for i in 0..scenario.sessions() {
        sessions.push(create_session(&channels[i % channels.len()], scenario, device).await);
    }
    let raw = raw_bytes(&random_input(&scenario.shape, Device::Cpu));
    let shared = match scenario.workload {
        Workload::SharedMemory { .. } => Some(SharedObject::create(&channels[0], &raw).await),
        _ => None,
    };
    let mut shared_ranks = Vec::new();
    if let Workload::SharedSteps { ranks } = scenario.workload {
        for rank in 0..ranks {
            shared_ranks.push(SharedObject::create(&channels[rank % channels.len()], &raw).await);
        }
    }
    Prepared {
        channels,
        sessions,
        raw,
        next_step: std::sync::atomic::AtomicU64::new(1),
        shared,
        shared_ranks,
    }
}

async fn create_session(channel: &Channel, scenario: &Scenario, device: &str) -> String {
    let reply = batch_norm_client(channel.clone())
        .create_session(pb::CreateSessionRequest {
            kind: scenario.layer_kind() as i32,
            num_features: scenario.shape[1],
            device: device.to_owned(),
            exact_statistics: scenario.exact,
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
        let request = scenario.forward_request(session_id.clone(), &prepared.raw);
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

/// The polite caller's round while the others flood (see
/// [`Workload::Fairness`]): its calls and latencies; the flood's errors
/// count as errors.
async fn fairness_round(
    prepared: &Prepared,
    scenario: &Scenario,
    duration: Duration,
    cpu_pid: Option<&str>,
) -> Round {
    let Some((polite_session, flood_sessions)) = prepared.sessions.split_last() else {
        fatal("fairness: no sessions")
    };
    let (flood_channel, polite_channel) = match &prepared.channels[..] {
        [flood, polite, ..] => (flood.clone(), polite.clone()),
        _ => fatal("fairness: needs two connections"),
    };
    let cpu = CpuMeter::start(cpu_pid);
    let start = Instant::now();
    let deadline = start + duration;
    let mut flood = Vec::new();
    for session_id in flood_sessions {
        let mut client = batch_norm_client(flood_channel.clone());
        let request = scenario.forward_request(session_id.clone(), &prepared.raw);
        flood.push(tokio::spawn(async move {
            let mut errors = 0u64;
            while Instant::now() < deadline {
                if client.forward(request.clone()).await.is_err() {
                    errors += 1;
                }
            }
            errors
        }));
    }
    // The polite caller: (4, C), eval, one call at a time.
    let small = raw_bytes(&random_input(&[4, scenario.shape[1]], Device::Cpu));
    let mut request = scenario.forward_request(polite_session.clone(), &small);
    request.mode = pb::Mode::Eval as i32;
    if let Some(input) = request.input.as_mut() {
        input.shape = vec![4, scenario.shape[1]];
    }
    let mut client = batch_norm_client(polite_channel);
    let mut total = histogram();
    let (mut calls, mut errors) = (0u64, 0u64);
    while Instant::now() < deadline {
        let sent = Instant::now();
        match client.forward(request.clone()).await {
            Ok(reply) => {
                std::hint::black_box(reply.into_inner());
                calls += 1;
                total.saturating_record(sent.elapsed().as_nanos() as u64);
            }
            Err(status) => {
                errors += 1;
                eprintln!("normserve-bench: {}: polite call: {status}", scenario.name);
            }
        }
    }
    for task in flood {
        errors += task.await.unwrap_or(1);
    }
    finish(&total, calls, errors, start, &cpu)
}

/// Synchronized steps, one after another: each step's `ranks` calls sent at
/// once; a step's latency is from its first send to its last answer. The
/// `Concurrent` workload sends the same calls as plain Forwards, rank `r` on
/// session `r` (the step without its barrier).
async fn steps_round(
    prepared: &Prepared,
    scenario: &Scenario,
    ranks: usize,
    duration: Duration,
    cpu_pid: Option<&str>,
) -> Round {
    let concurrent = matches!(scenario.workload, Workload::Concurrent { .. });
    let clients: Vec<_> = (0..ranks)
        .map(|rank| batch_norm_client(prepared.channels[rank % prepared.channels.len()].clone()))
        .collect();
    let cpu = CpuMeter::start(cpu_pid);
    let mut histogram = histogram();
    let (mut calls, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    let deadline = start + duration;
    while Instant::now() < deadline {
        let step = prepared
            .next_step
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sent = Instant::now();
        let mut tasks = Vec::with_capacity(ranks);
        for (rank, client) in clients.iter().enumerate() {
            let mut client = client.clone();
            let session_id = prepared.sessions[if concurrent { rank } else { 0 }].clone();
            let (scenario, raw) = (scenario.clone(), prepared.raw.clone());
            let shared_request = prepared
                .shared_ranks
                .get(rank)
                .map(|object| pb::ForwardRequest {
                    step: Some(step_spec(step, ranks, rank)),
                    ..object.forward_request(&scenario, session_id.clone())
                });
            tasks.push(tokio::spawn(async move {
                if let Some(request) = shared_request {
                    client.forward(request).await.map(|r| {
                        std::hint::black_box(r.into_inner());
                    })
                } else if let Workload::ReduceSteps { .. } = scenario.workload {
                    let request = scenario.reduce_request(session_id, step, ranks, rank);
                    client.reduce_statistics(request).await.map(|r| {
                        std::hint::black_box(r.into_inner());
                    })
                } else if concurrent {
                    let request = scenario.forward_request(session_id, &raw);
                    client.forward(request).await.map(|r| {
                        std::hint::black_box(r.into_inner());
                    })
                } else {
                    let request = scenario.step_request(session_id, &raw, step, ranks, rank);
                    client.forward(request).await.map(|r| {
                        std::hint::black_box(r.into_inner());
                    })
                }
            }));
        }
        let mut failed = None;
        for task in tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(status)) => failed = Some(status.to_string()),
                Err(e) => failed = Some(e.to_string()),
            }
        }
        match failed {
            None => {
                calls += 1;
                histogram.saturating_record(sent.elapsed().as_nanos() as u64);
            }
            Some(error) => {
                if errors == 0 {
                    eprintln!("normserve-bench: {}: step {step}: {error}", scenario.name);
                }
                errors += 1;
            }
        }
    }
    finish(&histogram, calls, errors, start, &cpu)
}

/// ReduceStatisticsStream steps, one after another: one stream per rank
/// (opened once per round), each step one message on every stream sent at
/// once; a step's latency is from its first send to its last answer.
async fn reduce_stream_round(
    prepared: &Prepared,
    scenario: &Scenario,
    ranks: usize,
    duration: Duration,
    cpu_pid: Option<&str>,
) -> Round {
    let session_id = prepared.sessions[0].clone();
    let mut senders = Vec::with_capacity(ranks);
    let mut answers = Vec::with_capacity(ranks);
    for rank in 0..ranks {
        let mut client =
            batch_norm_client(prepared.channels[rank % prepared.channels.len()].clone());
        let (sender, receiver) = mpsc::channel::<pb::ReduceStatisticsRequest>(4);
        let opened = client
            .reduce_statistics_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await;
        match opened {
            Ok(reply) => answers.push(reply.into_inner()),
            Err(status) => fatal(&format!(
                "{}: ReduceStatisticsStream: {status}",
                scenario.name
            )),
        }
        senders.push(sender);
    }
    let cpu = CpuMeter::start(cpu_pid);
    let mut histogram = histogram();
    let (mut calls, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    let deadline = start + duration;
    while Instant::now() < deadline {
        let step = prepared
            .next_step
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sent = Instant::now();
        for (rank, sender) in senders.iter().enumerate() {
            let request = scenario.reduce_request(session_id.clone(), step, ranks, rank);
            if sender.send(request).await.is_err() {
                fatal(&format!("{}: a stream ended", scenario.name));
            }
        }
        let mut failed = None;
        for answer in &mut answers {
            match answer.message().await {
                Ok(Some(reply)) => match reply.result {
                    Some(pb::reduce_statistics_stream_response::Result::Response(response)) => {
                        std::hint::black_box(response);
                    }
                    Some(pb::reduce_statistics_stream_response::Result::Error(error)) => {
                        failed = Some(format!("code {}: {}", error.code, error.message));
                    }
                    None => failed = Some("an answer without a result".into()),
                },
                Ok(None) => fatal(&format!("{}: a stream ended", scenario.name)),
                Err(status) => fatal(&format!("{}: a stream failed: {status}", scenario.name)),
            }
        }
        match failed {
            None => {
                calls += 1;
                histogram.saturating_record(sent.elapsed().as_nanos() as u64);
            }
            Some(error) => {
                if errors == 0 {
                    eprintln!("normserve-bench: {}: step {step}: {error}", scenario.name);
                }
                errors += 1;
            }
        }
    }
    let round = finish(&histogram, calls, errors, start, &cpu);
    // Half-closes the streams; each ends once its answers are read.
    drop(senders);
    for mut answer in answers {
        while let Ok(Some(_)) = answer.message().await {}
    }
    round
}

async fn stream_round(
    prepared: &Prepared,
    scenario: &Scenario,
    window: usize,
    duration: Duration,
    cpu_pid: Option<&str>,
) -> Round {
    let mut client = batch_norm_client(prepared.channels[0].clone());
    let request = scenario.forward_request(prepared.sessions[0].clone(), &prepared.raw);
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
                if sender.send(request.clone()).await.is_err() {
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
    let request = scenario.compare_request(&prepared.raw, device);
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
