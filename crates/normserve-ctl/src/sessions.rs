//! `sessions list/get/delete/export/import`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use crate::output::Output;
use crate::proto::v1 as pb;
use crate::{json, render, CliError, Remote};

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

pub async fn run(out: &mut Output, command: SessionsCommand) -> Result<(), CliError> {
    match command {
        SessionsCommand::List { remote, labels } => list(out, &remote, labels).await,
        SessionsCommand::Get { remote, session_id } => {
            let reply = remote
                .batch_norm()
                .await?
                .get_session(pb::GetSessionRequest { session_id })
                .await?
                .into_inner();
            if remote.json {
                return json::print(out, &reply);
            }
            render::session(&reply.session.unwrap_or_default()).print(out)?;
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
            // The response is empty: say which session went.
            if remote.json {
                json::print_value(out, &json!({ "sessionId": session_id }))?;
            } else {
                writeln!(out, "deleted {session_id}")?;
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
            if remote.json {
                // The response carries the file itself: print where it went
                // instead, in the same JSON style (64-bit integers as strings).
                json::print_value(
                    out,
                    &json!({
                        "sessionId": session_id,
                        "version": reply.version.to_string(),
                        "file": output.display().to_string(),
                        "sizeBytes": reply.safetensors.len().to_string(),
                    }),
                )?;
            } else {
                writeln!(
                    out,
                    "exported {session_id} (version {}) to {} ({} bytes)",
                    reply.version,
                    output.display(),
                    reply.safetensors.len()
                )?;
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
            let reply = remote
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
                .into_inner();
            if remote.json {
                return json::print(out, &reply);
            }
            let version = reply.session.map_or(0, |s| s.version);
            writeln!(
                out,
                "imported {} into {session_id} (now version {version})",
                file.display(),
            )?;
            Ok(())
        }
    }
}

/// Every page, then one table (or one ListSessionsResponse holding them all).
async fn list(out: &mut Output, remote: &Remote, labels: Vec<String>) -> Result<(), CliError> {
    let mut selector = HashMap::new();
    for label in labels {
        let Some((key, value)) = label.split_once('=') else {
            return Err(CliError::Usage(format!(
                "--label {label}: expected KEY=VALUE"
            )));
        };
        selector.insert(key.to_owned(), value.to_owned());
    }
    let mut client = remote.batch_norm().await?;
    let mut all = pb::ListSessionsResponse::default();
    loop {
        let page = client
            .list_sessions(pb::ListSessionsRequest {
                page_size: 500,
                page_token: std::mem::take(&mut all.next_page_token),
                label_selector: selector.clone(),
                include_tensors: false,
            })
            .await?
            .into_inner();
        all.sessions.extend(page.sessions);
        all.next_page_token = page.next_page_token;
        if all.next_page_token.is_empty() {
            break;
        }
    }
    if remote.json {
        return json::print(out, &all);
    }
    render::sessions(&all.sessions).print(out)?;
    Ok(())
}
