//! `compare`: a Compare on .npy files, with PyTorch's F.batch_norm rules for
//! the arguments the RPC would read differently, and an exit code a script
//! can test (1 when the candidate does not match).

use std::path::PathBuf;

use clap::Args;

use crate::output::Output;
use crate::proto::v1 as pb;
use crate::proto::v1::compare_service_client::CompareServiceClient;
use crate::{json, npy, render, CliError, Remote};

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
    /// Eval mode, as F.batch_norm(training=False): needs --running-mean and
    /// --running-var (default: train mode, as a fresh nn.BatchNorm).
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
    /// Only print the report: exit 0 even when the candidate does not match.
    #[arg(long)]
    report_only: bool,
}

pub async fn run(out: &mut Output, args: CompareArgs) -> Result<(), CliError> {
    check_eval(&args)?;
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
        json::print(out, &reply)?;
    } else {
        render::print_comparison(out, &reply)?;
    }
    let matches = reply.diagnosis.as_ref().is_none_or(|d| d.matches_reference);
    if matches || args.report_only {
        Ok(())
    } else {
        Err(CliError::Mismatch)
    }
}

/// The RPC treats absent running statistics as track_running_stats=False
/// (batch statistics in both modes, as the module does). `--eval` promises
/// F.batch_norm(training=False), which refuses that instead of silently
/// normalizing with the batch's own statistics: so does this command, with
/// PyTorch's words and in PyTorch's order.
fn check_eval(args: &CompareArgs) -> Result<(), CliError> {
    if !args.eval {
        return Ok(());
    }
    let statistics = [
        (&args.running_mean, "running_mean"),
        (&args.running_var, "running_var"),
    ];
    match statistics.iter().find(|(path, _)| path.is_none()) {
        Some((_, name)) => Err(CliError::Usage(format!(
            "{name} must be defined in evaluation mode (--eval needs --running-mean and --running-var)"
        ))),
        None => Ok(()),
    }
}
