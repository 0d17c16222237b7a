//! `normserve-ctl`: the operator commands and the container health probe,
//! without libtorch (`normserve-ctl --help`). The server binary offers the
//! same commands as `normserve <command>`.

use std::process::ExitCode;

use clap::Parser;
use normserve_ctl::Command;

/// Talks to a running normserve server over gRPC.
#[derive(Parser)]
#[command(
    name = "normserve-ctl",
    version,
    about = "normserve's operator commands and health probe (a gRPC client; no libtorch)",
    after_help = "Exit codes: 0 success; 1 the server answered with an error, is not serving, \
                  or the compared candidate does not match; 2 bad usage, an unreadable file \
                  or no connection."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    normserve_ctl::exit_code("normserve-ctl", normserve_ctl::run(cli.command))
}
