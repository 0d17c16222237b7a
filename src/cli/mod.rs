//! The operator's command line: `normserve <subcommand>` talks to a running
//! server over gRPC (the same public API any client uses). Human-readable
//! tables by default, `--json` for scripts. Without a subcommand the binary
//! serves (see `main.rs`).
//!
//! Exit codes: 0 success, 1 the server answered with an error (or is not
//! serving), 2 bad usage, unreadable file or no connection.

pub mod npy;
mod render;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::proto::v1 as pb;
use crate::proto::v1::batch_norm_service_client::BatchNormServiceClient;
use crate::proto::v1::compare_service_client::CompareServiceClient;
use crate::proto::v1::server_service_client::ServerServiceClient;
use crate::telemetry::code_name;
use render::{print_json, Table};

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Ask the gRPC health service; exit 0 when SERVING (container health checks).
    Health {
        #[command(flatten)]
        remote: Remote,
        /// Service to ask about ("" = the whole server), e.g. normserve.v1.BatchNormService.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Server version, libtorch, devices, limits, features, store.
    Info {
        #[command(flatten)]
        remote: Remote,
    },
    /// List, inspect, delete, export and import sessions.
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Run a Compare on .npy inputs and print the diagnosis.
    Compare(Box<CompareArgs>),
}

#[derive(Subcommand, Debug)]
pub enum SessionsCommand {
    /// All sessions (every page), optionally filtered by labels.
    List {
        #[command(flatten)]
        remote: Remote,
        /// Only sessions with this label (KEY=VALUE; repeatable, all must match).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// One session: configuration, version, counters.
    Get {
        #[command(flatten)]
        remote: Remote,
        session_id: String,
    },
    /// Delete a session.
    Delete {
        #[command(flatten)]
        remote: Remote,
        session_id: String,
        /// Only if the session is still at this version.
        #[arg(long)]
        expected_version: Option<u64>,
    },
    /// Write a session's state_dict to a .safetensors file (PyTorch's key names).
    Export {
        #[command(flatten)]
        remote: Remote,
        session_id: String,
        /// The file to write.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Load a .safetensors state_dict into a session (load_state_dict rules).
    Import {
        #[command(flatten)]
        remote: Remote,
        session_id: String,
        /// The .safetensors file to read.
        file: PathBuf,
        /// Allow missing and unexpected keys (load_state_dict(strict=False)).
        #[arg(long)]
        non_strict: bool,
        /// Only if the session is still at this version.
        #[arg(long)]
        expected_version: Option<u64>,
    },
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    #[command(flatten)]
    remote: Remote,
    /// The input, (N, C, ...), as a .npy file.
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    weight: Option<PathBuf>,
    #[arg(long)]
    bias: Option<PathBuf>,
    #[arg(long)]
    running_mean: Option<PathBuf>,
    #[arg(long)]
    running_var: Option<PathBuf>,
    /// Upstream gradient: adds grad_input, grad_weight and grad_bias.
    #[arg(long)]
    grad_output: Option<PathBuf>,
    /// Eval mode (default: train mode, as a fresh nn.BatchNorm).
    #[arg(long)]
    eval: bool,
    #[arg(long)]
    eps: Option<f64>,
    #[arg(long)]
    momentum: Option<f64>,
    /// Your implementation's output, to be diagnosed.
    #[arg(long)]
    candidate_output: Option<PathBuf>,
    #[arg(long)]
    candidate_running_mean: Option<PathBuf>,
    #[arg(long)]
    candidate_running_var: Option<PathBuf>,
    #[arg(long)]
    rtol: Option<f64>,
    #[arg(long)]
    atol: Option<f64>,
    /// cpu, cuda, cuda:N (default: the server's).
    #[arg(long, default_value = "")]
    device: String,
}

/// Where the server is and how to talk to it.
#[derive(Args, Debug, Clone)]
pub struct Remote {
    /// Server address (host:port or http://host:port).
    #[arg(long, env = "NORMSERVE_ADDR", default_value = "127.0.0.1:50051")]
    addr: String,
    /// Bearer token sent with every call.
    #[arg(long, env = "NORMSERVE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate: connect
    /// with TLS.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name to check the server's certificate against (default: the host of --addr).
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Seconds to wait for the connection and for each call.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// What went wrong, mapped to the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rpc(Status),
    #[error("{0}")]
    Usage(String),
    #[error("not serving: {0}")]
    NotServing(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Rpc(_) | CliError::NotServing(_) => 1,
            CliError::Usage(_) => 2,
        }
    }
}

impl From<Status> for CliError {
    fn from(status: Status) -> Self {
        CliError::Rpc(status)
    }
}

impl From<npy::NpyError> for CliError {
    fn from(error: npy::NpyError) -> Self {
        CliError::Usage(error.to_string())
    }
}

/// Runs one subcommand to completion.
pub fn run(command: Command) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Usage(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(dispatch(command))
}

async fn dispatch(command: Command) -> Result<(), CliError> {
    match command {
        Command::Health { remote, service } => health(&remote, service).await,
        Command::Info { remote } => info(&remote).await,
        Command::Sessions(command) => sessions(command).await,
        Command::Compare(args) => compare(*args).await,
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` when a token is configured.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl Remote {
    async fn channel(&self) -> Result<(Channel, Bearer), CliError> {
        let tls = self.tls_ca.is_some();
        let uri = if self.addr.contains("://") {
            self.addr.clone()
        } else if tls {
            format!("https://{}", self.addr)
        } else {
            format!("http://{}", self.addr)
        };
        let timeout = Duration::try_from_secs_f64(self.timeout)
            .map_err(|_| CliError::Usage(format!("--timeout: bad value {}", self.timeout)))?;
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|e| CliError::Usage(format!("--addr {}: {e}", self.addr)))?
            .connect_timeout(timeout)
            .timeout(timeout);
        if let Some(ca) = &self.tls_ca {
            let read = |path: &PathBuf| {
                std::fs::read(path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
            };
            let mut config =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let Some(name) = &self.tls_server_name {
                config = config.domain_name(name.clone());
            }
            if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| CliError::Usage(format!("TLS: {e}")))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| CliError::Usage(format!("cannot connect to {}: {e}", self.addr)))?;
        let bearer = match &self.token {
            None => None,
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| CliError::Usage("--token: not a valid header value".into()))?,
            ),
        };
        Ok((channel, Bearer(bearer)))
    }

    async fn batch_norm(&self) -> Result<BatchNormServiceClient<Authed>, CliError> {
        let (channel, bearer) = self.channel().await?;
        Ok(BatchNormServiceClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }
}

async fn health(remote: &Remote, service: String) -> Result<(), CliError> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};
    let (channel, bearer) = remote.channel().await?;
    let reply = HealthClient::with_interceptor(channel, bearer)
        .check(HealthCheckRequest {
            service: service.clone(),
        })
        .await?
        .into_inner();
    let status = ServingStatus::try_from(reply.status).unwrap_or(ServingStatus::Unknown);
    let name = status.as_str_name();
    if remote.json {
        print_json(&json!({ "service": service, "status": name }));
    } else {
        println!("{name}");
    }
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(CliError::NotServing(name.to_owned()))
    }
}

async fn info(remote: &Remote) -> Result<(), CliError> {
    let (channel, bearer) = remote.channel().await?;
    let info = ServerServiceClient::with_interceptor(channel, bearer)
        .get_server_info(pb::GetServerInfoRequest::default())
        .await?
        .into_inner();
    let limits = info.limits.unwrap_or_default();
    let devices: Vec<Value> = info
        .devices
        .iter()
        .map(|d| json!({ "name": d.name, "description": d.description, "total_memory_bytes": d.total_memory_bytes }))
        .collect();
    let value = json!({
        "server_version": info.server_version,
        "libtorch_version": info.libtorch_version,
        "default_device": info.default_device,
        "cuda_device_count": info.cuda_device_count,
        "devices": devices,
        "intra_op_threads": info.intra_op_threads,
        "compute_threads": info.compute_threads,
        "store": info.store,
        "sessions": info.sessions,
        "unreadable_sessions": info.unreadable_sessions,
        "features": info.features,
        "limits": {
            "max_sessions": limits.max_sessions,
            "max_tensor_elements": limits.max_tensor_elements,
            "max_num_features": limits.max_num_features,
            "max_message_bytes": limits.max_message_bytes,
        },
    });
    if remote.json {
        print_json(&value);
        return Ok(());
    }
    let mut table = Table::new(&["FIELD", "VALUE"]);
    for (key, item) in value.as_object().into_iter().flatten() {
        table.row(vec![key.clone(), render::plain(item)]);
    }
    table.print();
    Ok(())
}

async fn sessions(command: SessionsCommand) -> Result<(), CliError> {
    match command {
        SessionsCommand::List { remote, labels } => {
            let mut selector = std::collections::HashMap::new();
            for label in labels {
                let Some((key, value)) = label.split_once('=') else {
                    return Err(CliError::Usage(format!(
                        "--label {label}: expected KEY=VALUE"
                    )));
                };
                selector.insert(key.to_owned(), value.to_owned());
            }
            let mut client = remote.batch_norm().await?;
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_sessions(pb::ListSessionsRequest {
                        page_size: 500,
                        page_token: page_token.clone(),
                        label_selector: selector.clone(),
                        include_tensors: false,
                    })
                    .await?
                    .into_inner();
                all.extend(page.sessions);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if remote.json {
                print_json(&Value::Array(all.iter().map(render::session).collect()));
                return Ok(());
            }
            let mut table = Table::new(&[
                "SESSION", "KIND", "FEATURES", "DTYPE", "DEVICE", "VERSION", "BATCHES", "UPDATED",
                "LABELS",
            ]);
            for session in &all {
                table.row(render::session_row(session));
            }
            table.print();
            Ok(())
        }
        SessionsCommand::Get { remote, session_id } => {
            let session = remote
                .batch_norm()
                .await?
                .get_session(pb::GetSessionRequest { session_id })
                .await?
                .into_inner()
                .session
                .unwrap_or_default();
            let value = render::session(&session);
            if remote.json {
                print_json(&value);
            } else {
                let mut table = Table::new(&["FIELD", "VALUE"]);
                for (key, item) in value.as_object().into_iter().flatten() {
                    table.row(vec![key.clone(), render::plain(item)]);
                }
                table.print();
            }
            Ok(())
        }
        SessionsCommand::Delete {
            remote,
            session_id,
            expected_version,
        } => {
            remote
                .batch_norm()
                .await?
                .delete_session(pb::DeleteSessionRequest {
                    session_id: session_id.clone(),
                    expected_version,
                })
                .await?;
            if remote.json {
                print_json(&json!({ "deleted": session_id }));
            } else {
                println!("deleted {session_id}");
            }
            Ok(())
        }
        SessionsCommand::Export {
            remote,
            session_id,
            output,
        } => {
            let reply = remote
                .batch_norm()
                .await?
                .export_state(pb::ExportStateRequest {
                    session_id: session_id.clone(),
                })
                .await?
                .into_inner();
            std::fs::write(&output, &reply.safetensors)
                .map_err(|e| CliError::Usage(format!("{}: {e}", output.display())))?;
            let value = json!({
                "session_id": session_id,
                "version": reply.version,
                "file": output.display().to_string(),
                "bytes": reply.safetensors.len(),
            });
            if remote.json {
                print_json(&value);
            } else {
                println!(
                    "exported {session_id} (version {}) to {} ({} bytes)",
                    reply.version,
                    output.display(),
                    reply.safetensors.len()
                );
            }
            Ok(())
        }
        SessionsCommand::Import {
            remote,
            session_id,
            file,
            non_strict,
            expected_version,
        } => {
            let data = std::fs::read(&file)
                .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
            let session = remote
                .batch_norm()
                .await?
                .import_state(pb::ImportStateRequest {
                    session_id: session_id.clone(),
                    safetensors: data.into(),
                    strict: Some(!non_strict),
                    expected_version,
                    request_id: String::new(),
                })
                .await?
                .into_inner()
                .session
                .unwrap_or_default();
            if remote.json {
                print_json(&render::session(&session));
            } else {
                println!(
                    "imported {} into {session_id} (now version {})",
                    file.display(),
                    session.version
                );
            }
            Ok(())
        }
    }
}

async fn compare(args: CompareArgs) -> Result<(), CliError> {
    let read = |path: &Option<PathBuf>| path.as_deref().map(npy::read).transpose();
    let candidate = pb::Candidate {
        output: read(&args.candidate_output)?,
        running_mean: read(&args.candidate_running_mean)?,
        running_var: read(&args.candidate_running_var)?,
        ..Default::default()
    };
    let has_candidate = candidate != pb::Candidate::default();
    let request = pb::CompareRequest {
        input: Some(npy::read(&args.input)?),
        weight: read(&args.weight)?,
        bias: read(&args.bias)?,
        running_mean: read(&args.running_mean)?,
        running_var: read(&args.running_var)?,
        grad_output: read(&args.grad_output)?,
        training: !args.eval,
        eps: args.eps,
        momentum: args.momentum,
        candidate: has_candidate.then_some(candidate),
        rtol: args.rtol,
        atol: args.atol,
        device: args.device.clone(),
        ..Default::default()
    };
    let (channel, bearer) = args.remote.channel().await?;
    let reply = CompareServiceClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
        .compare(request)
        .await?
        .into_inner();
    if args.remote.json {
        print_json(&render::comparison(&reply));
    } else {
        render::print_comparison(&reply);
    }
    Ok(())
}
