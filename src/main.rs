//! The `normserve` binary: without a subcommand (or with `serve`), parse the
//! configuration, start logging, bind, serve until SIGTERM/SIGINT; with an
//! operator command, run it against a server (the `normserve-ctl` crate's
//! commands; that crate's binary offers the same without loading libtorch);
//! with `store check|salvage`, read a stopped server's embedded store
//! offline (`normserve::store::command`, which owns that command's codes).
//! `normserve --help` lists the commands, `normserve serve --help` the
//! server's flags. The one place that maps the server's errors to exit codes:
//! 0 success / clean stop, 1 runtime failure, 2 bad configuration, usage or
//! device (the commands' codes: `normserve_ctl::CliError::exit_code`).

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use normserve::config::Config;
use normserve::device::device_name;
use normserve::transport;

/// `normserve [SERVER FLAGS]` or `normserve serve [SERVER FLAGS]` serves;
/// `normserve <COMMAND>` talks to a server.
#[derive(Parser)]
#[command(
    name = "normserve",
    version,
    about = "gRPC batch-normalization service on libtorch",
    args_conflicts_with_subcommands = true,
    override_usage = "normserve [serve] [SERVER FLAGS]\n       normserve <COMMAND> [OPTIONS]",
    after_help = "Without a command, normserve serves: `normserve [SERVER FLAGS]` is \
                  `normserve serve [SERVER FLAGS]`; `normserve serve --help` lists every \
                  server flag and its NORMSERVE_* environment variable.\n\
                  Exit codes of the commands: 0 success; 1 the server answered with an \
                  error, is not serving, or the compared candidate does not match; 2 bad \
                  usage, an unreadable file or no connection."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Top>,
    /// The server's flags, accepted here too (deployments run `normserve
    /// --listen ...`), listed by `normserve serve --help`.
    #[command(flatten)]
    serve: Config,
}

#[derive(Subcommand)]
enum Top {
    /// Serve (the default without a command); `normserve serve --help` lists
    /// every flag.
    Serve(Box<Config>),
    #[command(flatten)]
    Operator(Box<normserve_ctl::Command>),
    /// Check or salvage the embedded store, offline (`normserve store --help`).
    #[command(subcommand)]
    Store(normserve::store::command::StoreCommand),
}

/// The command line, with the server's flags hidden from the top-level help
/// (they are listed once, under `serve`).
fn parse() -> Cli {
    let command = Cli::command().mut_args(|arg| arg.hide(true));
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

fn main() -> ExitCode {
    // Before any thread starts: keep freed large buffers for reuse.
    let retained = normserve::memory::retain_freed_buffers();
    let arguments = parse();
    let config = match arguments.command {
        Some(Top::Operator(command)) => {
            return normserve_ctl::exit_code("normserve", normserve_ctl::run(*command));
        }
        Some(Top::Store(command)) => return normserve::store::command::run(command),
        Some(Top::Serve(config)) => *config,
        None => arguments.serve,
    };
    serve(config, retained)
}

fn serve(config: Config, retained: bool) -> ExitCode {
    if let Err(error) = config.validate() {
        eprintln!("normserve: {error}");
        return ExitCode::from(2);
    }
    if let Err(error) = normserve::telemetry::init(&config) {
        eprintln!("normserve: {error}");
        return ExitCode::from(2);
    }
    // Every connection is a descriptor: the limit an operator set (the hard
    // one) is the one in force, not the usual soft 1024.
    match normserve::fd_limit::raise_to_hard_limit() {
        Some(limit) => tracing::info!(soft = limit.soft, hard = limit.hard, "open file limit"),
        None => tracing::warn!("cannot read the open file limit"),
    }
    // Certificates, keys and tokens are read before anything else starts, so
    // that a bad file is a configuration error.
    let security = match transport::Security::load(&config) {
        Ok(security) => security,
        Err(error) => {
            eprintln!("normserve: {error}");
            return ExitCode::from(2);
        }
    };
    let server = match transport::Server::new(config) {
        Ok(server) => server.with_security(security),
        Err(error) => {
            tracing::error!(%error, "cannot use the requested device");
            eprintln!("normserve: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("normserve: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(server, retained)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "normserve stopped with an error");
            eprintln!("normserve: {error}");
            ExitCode::from(if error.is_config_error() { 2 } else { 1 })
        }
    }
}

async fn run(mut server: transport::Server, retained: bool) -> Result<(), transport::ServeError> {
    let config = server.config().clone();
    let device = server.device();
    std::fs::create_dir_all(&config.data_dir)?;
    server.open_registry().await?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let metrics_address = server.bind_metrics().await?;
    // A bad --http-addr fails before the server says it is up.
    server.bind_http().await?;
    let address = listener.local_addr()?;
    tracing::info!(
        %address,
        device = %device_name(device),
        libtorch = transport::LIBTORCH_VERSION,
        intra_op_threads = config.intra_op_threads,
        compute_threads = config.resolved_compute_threads(),
        retain_freed_buffers = retained,
        "normserve listening"
    );
    // Listening for SIGINT/SIGTERM starts before the server says it is up: a
    // signal sent as soon as it answers must stop it cleanly, not kill it.
    let shutdown = shutdown_signal();
    // One plain line on stdout for people and scripts (tests read the port
    // from it). Connections made before serving starts wait in the backlog.
    println!(
        "normserve listening on {address} (device {}, libtorch {})",
        device_name(device),
        transport::LIBTORCH_VERSION
    );
    if let Some(address) = metrics_address {
        tracing::info!(%address, "metrics endpoint listening (GET /metrics)");
    }
    server.serve(listener, shutdown).await
}

/// Completes on SIGINT or SIGTERM. The signals are listened for from this
/// call on, not from the future's first poll: the server may answer before
/// that poll, and a signal sent once it answers must stop it, not kill it.
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        let mut terminate = terminate
            .map_err(|error| {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the server");
            })
            .ok();
        let sigterm = async {
            match terminate.as_mut() {
                Some(terminate) => {
                    terminate.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        let sigint = async {
            match interrupt {
                Ok(mut interrupt) => {
                    interrupt.recv().await;
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        tokio::select! {
            () = sigint => {}
            () = sigterm => {}
        }
    }
}

#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
