// A benchmark, not a server path: failing loudly on a broken setup is right.
#![allow(clippy::expect_used, clippy::unwrap_used)]

//! Durability benchmark: train-mode Forward calls/s and latency with 1 and 8
//! concurrent clients for `--durability none`, the embedded store (redb, group
//! commit, fsync per commit) and Redis (AOF, appendfsync always), all in one
//! run so the ratios compare like with like; then start-up recovery time with
//! 10,000 stored sessions.
//!
//! Run: `make bench` (or `cargo bench --bench durability`). Redis is started
//! on a free loopback port when `redis-server` is installed
//! (scripts/ensure-redis.sh installs it).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use normserve::config::{Config, Durability};
use normserve::proto::v1 as pb;
use normserve::proto::v1::batch_norm_service_client::BatchNormServiceClient;
use tonic::transport::Channel;

const RUN: Duration = Duration::from_secs(2);
const RECOVERY_SESSIONS: usize = 10_000;

struct Server {
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
    address: String,
}

async fn start(config_for: impl FnOnce(&mut Config)) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let mut config = Config::with_defaults(address);
    config.device = "cpu".parse().unwrap();
    config_for(&mut config);
    let server = normserve::transport::Server::new(config).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        server
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
    });
    Server {
        stop,
        done,
        address: format!("http://{address}"),
    }
}

impl Server {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.done.await;
    }

    async fn client(&self) -> BatchNormServiceClient<Channel> {
        let channel = Channel::from_shared(self.address.clone())
            .unwrap()
            .tcp_nodelay(true)
            .connect()
            .await
            .unwrap();
        BatchNormServiceClient::new(channel)
    }
}

fn forward_request(session_id: &str, index: u64) -> pb::ForwardRequest {
    let values: Vec<u8> = (0..4 * 64)
        .flat_map(|i| ((i as f32 * 0.37).sin() + index as f32 * 1e-3).to_le_bytes())
        .collect();
    pb::ForwardRequest {
        session_id: session_id.to_owned(),
        input: Some(pb::Tensor {
            dtype: pb::DataType::Float32 as i32,
            shape: vec![4, 64],
            values: Some(pb::tensor::Values::Raw(Bytes::from(values))),
        }),
        mode: pb::Mode::Train as i32,
        request_id: format!("r{index}"),
        ..Default::default()
    }
}

async fn create(client: &mut BatchNormServiceClient<Channel>, id: &str) {
    client
        .create_session(pb::CreateSessionRequest {
            session_id: id.to_owned(),
            kind: pb::BatchNormKind::BatchNorm1d as i32,
            num_features: 64,
            ..Default::default()
        })
        .await
        .unwrap();
}

struct Figures {
    calls_per_second: f64,
    p50_us: f64,
    p99_us: f64,
}

/// `clients` concurrent callers, each on its own session, for RUN.
async fn load(server: &Server, clients: usize, tag: &str) -> Figures {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = server.client().await;
        let id = format!("{tag}-{c}");
        create(&mut client, &id).await;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let start = Instant::now();
            let mut index = 0;
            while start.elapsed() < RUN {
                let t = Instant::now();
                client.forward(forward_request(&id, index)).await.unwrap();
                latencies.push(t.elapsed().as_secs_f64());
                index += 1;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_by(f64::total_cmp);
    let pick = |q: f64| all[((all.len() as f64 - 1.0) * q) as usize] * 1e6;
    Figures {
        calls_per_second: all.len() as f64 / RUN.as_secs_f64(),
        p50_us: pick(0.5),
        p99_us: pick(0.99),
    }
}

/// Adjusts a benchmark server's configuration.
type Configure = dyn Fn(&mut Config);

struct Redis(Child, String);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(dir: &std::path::Path) -> Option<Redis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
        ])
        .args(["--appendfsync", "always", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    // Wait until it answers PING (bounded).
    let url = format!("redis://127.0.0.1:{port}/0");
    let client = redis::Client::open(url.as_str()).ok()?;
    for _ in 0..200 {
        if let Ok(mut connection) = client.get_connection() {
            if redis::cmd("PING").query::<String>(&mut connection).is_ok() {
                return Some(Redis(child, url));
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

#[tokio::main]
async fn main() {
    let scratch = tempfile::tempdir().unwrap();
    let redis = start_redis(scratch.path());
    if redis.is_none() {
        println!("redis-server not available: skipping the Redis rows (scripts/ensure-redis.sh installs it)");
    }
    let mut rows: Vec<(&str, Figures, Figures)> = Vec::new();
    let stores: Vec<(&str, Box<Configure>)> = {
        let embedded_dir = scratch.path().join("embedded");
        let mut stores: Vec<(&str, Box<Configure>)> = vec![
            (
                "none",
                Box::new(|c: &mut Config| c.durability = Durability::None),
            ),
            (
                "embedded (sync)",
                Box::new(move |c: &mut Config| {
                    c.durability = Durability::Sync;
                    c.data_dir = embedded_dir.clone();
                }),
            ),
        ];
        if let Some(Redis(_, url)) = &redis {
            let url = url.clone();
            stores.push((
                "redis (AOF always)",
                Box::new(move |c: &mut Config| {
                    c.durability = Durability::Sync;
                    c.store = url.clone();
                }),
            ));
        }
        stores
    };
    for (name, configure) in &stores {
        let server = start(|c| configure(c)).await;
        let one = load(&server, 1, "one").await;
        let eight = load(&server, 8, "eight").await;
        server.stop().await;
        rows.push((name, one, eight));
    }

    println!(
        "\ntrain-mode Forward, (4,64) float32, {RUN:?} per cell; client and server share 2 cores"
    );
    println!(
        "{:<20} {:>10} {:>9} {:>9} {:>8} | {:>10} {:>9} {:>9} {:>8}",
        "store",
        "1 client/s",
        "p50 µs",
        "p99 µs",
        "ratio",
        "8 clients/s",
        "p50 µs",
        "p99 µs",
        "ratio"
    );
    let (base_one, base_eight) = (rows[0].1.calls_per_second, rows[0].2.calls_per_second);
    for (name, one, eight) in &rows {
        println!(
            "{:<20} {:>10.0} {:>9.0} {:>9.0} {:>8.3} | {:>10.0} {:>9.0} {:>9.0} {:>8.3}",
            name,
            one.calls_per_second,
            one.p50_us,
            one.p99_us,
            one.calls_per_second / base_one,
            eight.calls_per_second,
            eight.p50_us,
            eight.p99_us,
            eight.calls_per_second / base_eight,
        );
    }
    println!("ratio = calls/s relative to durability none in the same run");

    // Start-up recovery with 10,000 stored sessions (embedded store).
    let dir = scratch.path().join("recovery");
    let server = start(|c| {
        c.durability = Durability::Sync;
        c.data_dir = dir.clone();
    })
    .await;
    let created = Instant::now();
    let mut creators = Vec::new();
    for worker in 0..16 {
        let mut client = server.client().await;
        creators.push(tokio::spawn(async move {
            for i in (worker..RECOVERY_SESSIONS).step_by(16) {
                create(&mut client, &format!("s{i:05}")).await;
            }
        }));
    }
    for creator in creators {
        creator.await.unwrap();
    }
    let creating = created.elapsed();
    server.stop().await;
    let mut config = Config::with_defaults("127.0.0.1:0".parse().unwrap());
    config.durability = Durability::Sync;
    config.data_dir = dir.clone();
    let mut server = normserve::transport::Server::new(config).unwrap();
    let opened = Instant::now();
    let registry = server.open_registry().await.unwrap();
    let recovering = opened.elapsed();
    println!(
        "\nrecovery: {} sessions (64 features) loaded in {:.0} ms at start-up (creating them took {:.1} s, {:.0} creates/s with 16 clients)",
        registry.len(),
        recovering.as_secs_f64() * 1e3,
        creating.as_secs_f64(),
        RECOVERY_SESSIONS as f64 / creating.as_secs_f64()
    );
}
