//! The server under test: started here (`--server-bin`) or reached at
//! `--addr`; connections and clients to it; what it says about itself; the
//! CPU time and resident set of its process (and of this one), and the
//! memory figure of idle sessions. Runs no scenario.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use normserve::proto::v1 as pb;
use normserve::proto::v1::batch_norm_service_client::BatchNormServiceClient;
use normserve::proto::v1::server_service_client::ServerServiceClient;
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};

use crate::fatal;

/// How to start the server under test (when no `--addr` is given).
pub struct ServerCommand<'a> {
    pub binary: &'a Path,
    pub device: &'a str,
    /// `--durability`, unless the extra arguments give one.
    pub durability: &'a str,
    /// Extra arguments, after the bench's own.
    pub extra_args: &'a [String],
}

impl ServerCommand<'_> {
    /// Whether the extra arguments choose the durability themselves.
    pub fn durability_given(&self) -> bool {
        self.extra_args
            .iter()
            .any(|a| a == "--durability" || a.starts_with("--durability="))
    }
}

pub struct Target {
    pub address: String,
    server: Option<Child>,
    data_dir: Option<PathBuf>,
}

impl Target {
    /// The server at `address`, started by someone else.
    pub fn running(address: &str) -> Target {
        Target {
            address: address.to_owned(),
            server: None,
            data_dir: None,
        }
    }

    /// Starts the server on an ephemeral port with a data directory of its
    /// own and reads its address from its first line of output.
    pub fn start(command: &ServerCommand) -> Target {
        // Named after the durability the bench asks for; "given" when the
        // arguments after `--` choose it.
        let durability_name = if command.durability_given() {
            "given"
        } else {
            command.durability
        };
        let data_dir = std::env::temp_dir().join(format!(
            "normserve-bench-{}-{durability_name}",
            std::process::id(),
        ));
        let durability = if command.durability_given() {
            vec![]
        } else {
            vec!["--durability", command.durability]
        };
        let mut child = match Command::new(command.binary)
            .args(["--listen", "127.0.0.1:0", "--log", "warn"])
            .args(durability)
            .arg("--device")
            .arg(command.device)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(command.extra_args)
            .stdout(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => fatal(&format!(
                "cannot start {}: {e} (build it with `make build`, or pass --addr)",
                command.binary.display()
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

    /// The data directory of a server started here (none for `--addr`).
    pub fn data_dir(&self) -> Option<&Path> {
        self.data_dir.as_deref()
    }

    /// The process id of a server started here (none for `--addr`).
    pub fn server_pid(&self) -> Option<String> {
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

pub async fn connect(address: &str) -> Channel {
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

pub fn batch_norm_client(channel: Channel) -> BatchNormServiceClient<Channel> {
    BatchNormServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// GetServerInfo's answer as JSON (or the error it got).
pub async fn server_description(target: &Target) -> Value {
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

/// CPU seconds used by this process and by the server since `start`.
pub struct CpuMeter {
    server_pid: Option<String>,
    start_self: f64,
    start_server: Option<f64>,
}

impl CpuMeter {
    pub fn start(server_pid: Option<&str>) -> Self {
        CpuMeter {
            server_pid: server_pid.map(str::to_owned),
            start_self: cpu_seconds("self").unwrap_or(0.0),
            start_server: server_pid.and_then(cpu_seconds),
        }
    }

    /// (this process, the server when it is measured).
    pub fn stop(&self) -> (f64, Option<f64>) {
        let own = cpu_seconds("self").unwrap_or(0.0) - self.start_self;
        let server = match (&self.server_pid, self.start_server) {
            (Some(pid), Some(start)) => cpu_seconds(pid).map(|now| now - start),
            _ => None,
        };
        (own, server)
    }
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
pub async fn idle_sessions(target: &Target, pid: &str, count: usize) -> Value {
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
