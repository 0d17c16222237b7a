//! `normserve store check` and `normserve store salvage`: the operator's
//! commands on an embedded store, offline (no server running on it). They
//! live in the server binary because they read the store with the server's
//! own code. Exit codes: 0 the store is whole (check) / everything was
//! salvaged as acknowledged (salvage); 1 something is unreadable, lost,
//! older than acknowledged or cannot be confirmed; 2 refused (a running server holds the store, the
//! output directory is not empty, an I/O error).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::inspect::{inspect, Finding, Inspection, StoreLock, Verdict};
use super::salvage::{salvage, Salvaged};

/// Offline commands on the embedded store (stop the server first).
#[derive(clap::Subcommand, Debug)]
pub enum StoreCommand {
    /// Report every session record: readable, or unreadable and why; the
    /// commit mark against the store; what salvage would keep. Exit 0 when
    /// the store is whole, 1 when it is not.
    Check {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Export every readable session into a fresh store in --out (the
    /// newest intact copy of each, found also in bytes redb can no longer
    /// open) and report what was lost. The damaged store is not changed.
    /// Exit 0 when every session was kept as acknowledged, 1 when some are
    /// lost, older, or cannot be confirmed (redb could not open the file).
    Salvage {
        #[command(flatten)]
        store: StoreArgs,
        /// An empty (or new) directory for the salvaged store; start the
        /// server with --data-dir set to it.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// The server's data directory (holding sessions.redb).
    #[arg(long, env = "NORMSERVE_DATA_DIR", value_name = "DIR")]
    data_dir: PathBuf,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Runs the command; prints its report (stdout) or why it was refused (stderr).
pub fn run(command: StoreCommand) -> ExitCode {
    let (store, out) = match &command {
        StoreCommand::Check { store } => (store, None),
        StoreCommand::Salvage { store, out } => (store, Some(out.as_path())),
    };
    match execute(store, out) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("normserve store: {message}");
            ExitCode::from(2)
        }
    }
}

fn execute(args: &StoreArgs, out: Option<&Path>) -> Result<ExitCode, String> {
    let lock = StoreLock::take(&args.data_dir).map_err(|e| e.to_string())?;
    let scratch = match out {
        Some(out) => {
            std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
            out.to_path_buf()
        }
        None => std::env::temp_dir(),
    };
    let inspection = inspect(&args.data_dir, &scratch, &lock).map_err(|e| e.to_string())?;
    let salvaged = match out {
        Some(out) => Some(salvage(&inspection, &args.data_dir, out).map_err(|e| e.to_string())?),
        None => None,
    };
    let text = if args.json {
        json(&inspection, out, salvaged.as_ref())
    } else {
        table(&inspection, out, salvaged.as_ref())
    };
    // A closed stdout (`| head`) is not a failure of the command.
    let _ = std::io::stdout().write_all(text.as_bytes());
    let ok = match out {
        None => inspection.is_whole(),
        // Without a trusted index nothing salvaged is confirmed, even when
        // no session was found at all.
        Some(_) => {
            let confirmed = inspection.trusted_index().is_some()
                || (inspection.index.is_none() && inspection.mark.unwrap_or(0) == 0);
            confirmed
                && inspection
                    .findings
                    .iter()
                    .all(|f| matches!(f.verdict, Verdict::Whole | Verdict::Recovered))
        }
    };
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn redb_line(inspection: &Inspection) -> String {
    match &inspection.index {
        None => "nothing to open (no file, or an empty one)".into(),
        Some(Ok(index)) if index.repaired => {
            "opens, after repairing the file (the server did not stop cleanly)".into()
        }
        Some(Ok(_)) => "opens".into(),
        Some(Err(error)) => format!("cannot open the file: {error}"),
    }
}

fn commits_line(inspection: &Inspection) -> String {
    let mark = inspection.mark.map_or("none".to_owned(), |m| m.to_string());
    let stored = match &inspection.index {
        Some(Ok(index)) => index.commits.to_string(),
        _ => "unknown".to_owned(),
    };
    let verdict = match (&inspection.index, inspection.mark) {
        (Some(Ok(index)), Some(mark)) if index.commits < mark => {
            "the store went back in time: acknowledged commits are missing"
        }
        (Some(Ok(_)), _) => "ok",
        (None, Some(mark)) if mark > 0 => "the store is missing or empty where one was",
        (None, _) => "ok",
        (Some(Err(_)), _) => "unknown: redb cannot open the file",
    };
    format!("store {stored}, commit mark {mark}: {verdict}")
}

fn store_state(inspection: &Inspection, finding: &Finding) -> String {
    if !matches!(inspection.index, Some(Ok(_))) {
        return "unknown (redb cannot open the file)".into();
    }
    match (&finding.unreadable, finding.index_stamp) {
        (Some(reason), _) => format!("unreadable: {reason}"),
        (None, Some(stamp)) => format!("readable, version {}", stamp.version),
        (None, None) => "not in redb's index".into(),
    }
}

fn salvage_state(finding: &Finding) -> String {
    let kept = finding.keep.as_ref().map(|r| r.version);
    match (&finding.verdict, kept) {
        (Verdict::Whole, Some(v)) => format!("keeps version {v}"),
        (Verdict::Recovered, Some(v)) => format!("keeps version {v} (an intact copy)"),
        (Verdict::Unconfirmed, Some(v)) => format!(
            "keeps version {v}, the newest copy found: UNCONFIRMED, newer steps may be lost"
        ),
        (Verdict::Older { newer }, Some(v)) => format!(
            "keeps version {v}: OLDER than version {} the store held, steps after it are lost",
            newer.version
        ),
        _ => "LOST: no intact copy".into(),
    }
}

fn table(inspection: &Inspection, out: Option<&Path>, salvaged: Option<&Salvaged>) -> String {
    let mut text = String::new();
    let size = inspection
        .file_len
        .map_or("missing".to_owned(), |len| format!("{len} bytes"));
    text += &format!("store      {} ({size})\n", inspection.path.display());
    text += &format!("redb       {}\n", redb_line(inspection));
    text += &format!("commits    {}\n", commits_line(inspection));
    let count = |pick: fn(&Finding) -> bool| inspection.findings.iter().filter(|f| pick(f)).count();
    text += &format!(
        "sessions   {} whole, {} recovered from another copy, {} unconfirmed, {} older than acknowledged, {} lost; {} stale copies of deleted sessions passed over\n",
        count(|f| f.verdict == Verdict::Whole),
        count(|f| f.verdict == Verdict::Recovered),
        count(|f| f.verdict == Verdict::Unconfirmed),
        count(|f| matches!(f.verdict, Verdict::Older { .. })),
        count(|f| f.verdict == Verdict::Lost),
        inspection.stale_copies,
    );
    text += &format!(
        "read in    {:.1} ms\n",
        inspection.elapsed.as_secs_f64() * 1e3
    );
    if let (Some(out), Some(salvaged)) = (out, salvaged) {
        text += &format!(
            "salvaged   {} sessions into {} in {:.1} ms\n",
            salvaged.written,
            out.join(super::embedded::FILE_NAME).display(),
            salvaged.elapsed.as_secs_f64() * 1e3
        );
    }
    let width = inspection
        .findings
        .iter()
        .map(|f| f.id.len())
        .max()
        .unwrap_or(0)
        .max(7);
    if !inspection.findings.is_empty() {
        text += &format!("\n{:width$}  {:40}  SALVAGE\n", "SESSION", "STORE");
    }
    for finding in &inspection.findings {
        text += &format!(
            "{:width$}  {:40}  {}\n",
            finding.id,
            store_state(inspection, finding),
            salvage_state(finding)
        );
    }
    text
}

fn json(inspection: &Inspection, out: Option<&Path>, salvaged: Option<&Salvaged>) -> String {
    let (opens, repaired, error, commits) = match &inspection.index {
        Some(Ok(index)) => (true, index.repaired, None, Some(index.commits)),
        Some(Err(error)) => (false, false, Some(error.clone()), None),
        None => (false, false, None, None),
    };
    let sessions: Vec<_> = inspection
        .findings
        .iter()
        .map(|f| {
            serde_json::json!({
                "id": f.id,
                "verdict": match f.verdict {
                    Verdict::Whole => "whole",
                    Verdict::Recovered => "recovered",
                    Verdict::Unconfirmed => "unconfirmed",
                    Verdict::Older { .. } => "older",
                    Verdict::Lost => "lost",
                },
                "index_version": f.index_stamp.map(|s| s.version),
                "unreadable": f.unreadable,
                "kept_version": f.keep.as_ref().map(|r| r.version),
                "newer_version": match f.verdict {
                    Verdict::Older { newer } => Some(newer.version),
                    _ => None,
                },
            })
        })
        .collect();
    let mut value = serde_json::json!({
        "store": inspection.path.display().to_string(),
        "bytes": inspection.file_len,
        "redb": {"opens": opens, "repaired": repaired, "error": error, "commits": commits},
        "commit_mark": inspection.mark,
        "whole": inspection.is_whole(),
        "sessions": sessions,
        "stale_copies": inspection.stale_copies,
        "read_ms": inspection.elapsed.as_secs_f64() * 1e3,
    });
    if let (Some(out), Some(salvaged)) = (out, salvaged) {
        value["salvaged"] = serde_json::json!({
            "out": out.display().to_string(),
            "written": salvaged.written,
            "write_ms": salvaged.elapsed.as_secs_f64() * 1e3,
        });
    }
    format!("{value}\n")
}
