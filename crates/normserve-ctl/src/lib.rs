//! normserve's operator command line: a gRPC client of a running server (the
//! same public API any client uses), shared by two binaries: `normserve-ctl`
//! (this crate, without libtorch: starts in milliseconds, the container
//! health probe) and the server's `normserve <command>`. Human-readable
//! tables by default, `--json` for scripts (proto3 JSON of the responses).
//!
//! This crate must never depend on the server crate or on tch: the server
//! depends on it, not the reverse.
//!
//! Exit codes: 0 success; 1 the server answered with an error, is not
//! serving, or the compared candidate does not match; 2 bad usage, an
//! unreadable file or no connection. A closed standard output (`| head`) is
//! not an error.

mod codes;
mod compare;
pub mod json;
pub mod npy;
mod output;
pub mod proto;
mod remote;
mod render;
mod server;
mod sessions;

use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;
use tonic::Status;

pub use codes::code_name;
pub use compare::CompareArgs;
pub use remote::Remote;
pub use sessions::SessionsCommand;

use output::Output;

/// The operator commands (both binaries offer exactly these).
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
    /// Run a Compare on .npy inputs and print the diagnosis; exit 1 when the
    /// candidate does not match PyTorch's reference (unless --report-only).
    Compare(Box<CompareArgs>),
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
    #[error("the candidate does not match the reference")]
    Mismatch,
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot print JSON: {0}")]
    Json(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Rpc(_)
            | CliError::NotServing(_)
            | CliError::Mismatch
            | CliError::Output(_)
            | CliError::Json(_) => 1,
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

/// Runs one command to completion, printing to standard output.
pub fn run(command: Command) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Usage(format!("cannot start the async runtime: {e}")))?;
    let mut out = Output::stdout();
    let result = runtime.block_on(dispatch(command, &mut out));
    // What was printed reaches the reader even when the command failed
    // afterwards (a mismatching compare prints its report, then exits 1).
    let flushed = out.flush();
    result?;
    flushed?;
    Ok(())
}

/// The exit code of a command's result, with its error reported on standard
/// error as `program: message`.
pub fn exit_code(program: &str, result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Nothing to do when standard error is closed too.
            let _ = writeln!(std::io::stderr(), "{program}: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

async fn dispatch(command: Command, out: &mut Output) -> Result<(), CliError> {
    match command {
        Command::Health { remote, service } => server::health(out, &remote, service).await,
        Command::Info { remote } => server::info(out, &remote).await,
        Command::Sessions(command) => sessions::run(out, command).await,
        Command::Compare(args) => compare::run(out, *args).await,
    }
}
