// A benchmark, not a server path: failing loudly on a broken setup is right.
#![allow(clippy::expect_used, clippy::unwrap_used)]

//! Forward benchmark: latency and throughput of the Forward RPC for a few
//! sizes, each beside an in-process baseline (the same batch norm through
//! libtorch directly, no gRPC) measured in the same run, and the effect of
//! libtorch's intra-op thread count. Prints medians over repeated rounds.
//!
//! Run: `make bench` (or `cargo bench --bench forward`). Not a test: it
//! asserts nothing, it reports.

use std::time::{Duration, Instant};

use bytes::Bytes;
use normserve::config::Config;
use normserve::proto::v1 as pb;
use normserve::proto::v1::batch_norm_service_client::BatchNormServiceClient;
use tch::{Device, Kind, Tensor};
use tonic::transport::Channel;

const ROUNDS: usize = 5;
const ROUND_TIME: Duration = Duration::from_millis(600);

struct Scenario {
    name: &'static str,
    shape: Vec<i64>,
    mode: pb::Mode,
}

fn scenarios() -> Vec<Scenario> {
    let train = pb::Mode::Train;
    let eval = pb::Mode::Eval;
    vec![
        Scenario {
            name: "train (4,64) 1 KiB",
            shape: vec![4, 64],
            mode: train,
        },
        Scenario {
            name: "eval  (4,64) 1 KiB",
            shape: vec![4, 64],
            mode: eval,
        },
        Scenario {
            name: "train (64,64,8,8) 1 MiB",
            shape: vec![64, 64, 8, 8],
            mode: train,
        },
        Scenario {
            name: "train (64,64,32,32) 16 MiB",
            shape: vec![64, 64, 32, 32],
            mode: train,
        },
        Scenario {
            name: "eval  (64,64,32,32) 16 MiB",
            shape: vec![64, 64, 32, 32],
            mode: eval,
        },
    ]
}

#[derive(Clone, Copy)]
struct Figure {
    /// Median seconds per call.
    per_call: f64,
    /// (max - min) / median of the per-round figures.
    spread: f64,
}

/// Runs `call` repeatedly for ROUND_TIME, ROUNDS times; median per-call time.
async fn measure<F, Fut>(mut call: F) -> Figure
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..3 {
        call().await; // warm-up
    }
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut calls = 0u32;
        while start.elapsed() < ROUND_TIME {
            call().await;
            calls += 1;
        }
        rounds.push(start.elapsed().as_secs_f64() / f64::from(calls));
    }
    rounds.sort_by(f64::total_cmp);
    let median = rounds[ROUNDS / 2];
    Figure {
        per_call: median,
        spread: (rounds[ROUNDS - 1] - rounds[0]) / median,
    }
}

fn in_process(shape: &[i64], training: bool) -> impl FnMut() -> std::future::Ready<()> {
    let c = shape[1];
    let input = Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let weight = Tensor::ones([c], (Kind::Float, Device::Cpu));
    let bias = Tensor::zeros([c], (Kind::Float, Device::Cpu));
    let mean = Tensor::zeros([c], (Kind::Float, Device::Cpu));
    let var = Tensor::ones([c], (Kind::Float, Device::Cpu));
    move || {
        let output = input.batch_norm(
            Some(&weight),
            Some(&bias),
            Some(&mean),
            Some(&var),
            training,
            0.1,
            1e-5,
            true,
        );
        let _ = std::hint::black_box(output);
        std::future::ready(())
    }
}

fn request(session_id: &str, shape: &[i64], mode: pb::Mode) -> pb::ForwardRequest {
    let input = Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let numel = input.numel();
    let mut raw = vec![0u8; numel * 4];
    input.copy_data_u8(&mut raw, numel);
    pb::ForwardRequest {
        session_id: session_id.to_owned(),
        input: Some(pb::Tensor {
            dtype: pb::DataType::Float32 as i32,
            shape: shape.to_vec(),
            values: Some(pb::tensor::Values::Raw(Bytes::from(raw))),
        }),
        mode: mode as i32,
        ..Default::default()
    }
}

async fn start_server() -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let mut config = Config::with_defaults(address);
    config.device = "cpu".parse().expect("device");
    let device = normserve::transport::prepare(&config).expect("prepare");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        normserve::transport::serve(config, device, listener, async {
            let _ = stopped.await;
        })
        .await
        .expect("serve");
    });
    (format!("http://{address}"), stop)
}

async fn session(client: &mut BatchNormServiceClient<Channel>, kind: pb::BatchNormKind) -> String {
    let reply = client
        .create_session(pb::CreateSessionRequest {
            kind: kind as i32,
            num_features: 64,
            ..Default::default()
        })
        .await
        .expect("create");
    reply.into_inner().session.expect("session").session_id
}

#[tokio::main]
async fn main() {
    let (address, stop) = start_server().await;
    let channel = Channel::from_shared(address)
        .expect("uri")
        .tcp_nodelay(true)
        .initial_stream_window_size(64 << 20)
        .initial_connection_window_size(64 << 20)
        .connect()
        .await
        .expect("connect");
    let mut client = BatchNormServiceClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let session_1d = session(&mut client, pb::BatchNormKind::BatchNorm1d).await;
    let session_2d = session(&mut client, pb::BatchNormKind::BatchNorm2d).await;

    println!("normserve Forward benchmark: median of {ROUNDS} rounds of {ROUND_TIME:?}; client and server share this machine's cores");
    for threads in [1, 2] {
        // Process-wide libtorch setting: affects the server's compute pool and
        // the in-process baseline alike.
        tch::set_num_threads(threads);
        println!("\nintra-op threads = {threads}");
        println!(
            "{:<28} {:>12} {:>10} {:>12} {:>10} {:>9} {:>8}",
            "scenario", "service µs", "MB/s", "in-proc µs", "MB/s", "ratio", "spread"
        );
        for scenario in scenarios() {
            let session_id = if scenario.shape.len() == 2 {
                &session_1d
            } else {
                &session_2d
            };
            let training = scenario.mode == pb::Mode::Train;
            let message = request(session_id, &scenario.shape, scenario.mode);
            let bytes = scenario.shape.iter().product::<i64>() as f64 * 4.0;
            let service = measure(|| {
                let mut client = client.clone();
                let message = message.clone();
                async move {
                    client.forward(message).await.expect("forward");
                }
            })
            .await;
            let baseline = measure(in_process(&scenario.shape, training)).await;
            println!(
                "{:<28} {:>12.1} {:>10.0} {:>12.1} {:>10.0} {:>9.3} {:>7.0}%",
                scenario.name,
                service.per_call * 1e6,
                bytes / service.per_call / 1e6,
                baseline.per_call * 1e6,
                bytes / baseline.per_call / 1e6,
                baseline.per_call / service.per_call,
                service.spread * 100.0,
            );
        }
    }
    println!("\nratio = in-process time / service time (1.0 = no gRPC overhead)");
    let _ = stop.send(());
}
