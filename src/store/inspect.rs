//! What a data directory's embedded store holds, read offline for `store
//! check` and `store salvage`: redb's own view (its index: the sessions and
//! stamps of the newest commit it can open, on a copy of the file so that
//! its repair never touches the original), the commit mark, and every copy
//! of a record a raw scan of the bytes finds ([`super::scan`]). From these,
//! one [`Finding`] per session: which copy to keep and what was lost.
//!
//! Nothing here writes to the data directory; the store file is locked
//! while it is read, so a server cannot start on it meanwhile, and a
//! running server's store is refused.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable};

use super::commit_mark::{self, CommitMark};
use super::embedded::{COMMITS, COMMIT_COUNT, FILE_NAME, RECORDS, VERSIONS};
use super::scan::{scan, Copy};
use crate::session::durable::{SessionRecord, Stamp, Stored};
use crate::session::SessionId;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{path} is locked by a running normserve (or another program); stop it first")]
    Locked { path: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Mark(#[from] commit_mark::MarkError),
}

/// redb's view of the store: what the newest commit it can open holds.
pub struct Index {
    pub commits: u64,
    /// redb had to repair the file (a server that did not stop cleanly).
    pub repaired: bool,
    /// Session key -> its stamp and its record as stored.
    pub entries: BTreeMap<String, (Option<Stamp>, Option<Stored>)>,
}

pub struct Inspection {
    pub path: PathBuf,
    /// The file's size; None: there is no file.
    pub file_len: Option<u64>,
    /// The commits the mark beside the store says were acknowledged.
    pub mark: Option<u64>,
    /// redb's view, or why redb cannot open the file (None: no file or an
    /// empty one, nothing to open).
    pub index: Option<Result<Index, String>>,
    pub findings: Vec<Finding>,
    /// Copies of sessions that the index says no longer exist (deleted).
    pub stale_copies: usize,
    pub elapsed: Duration,
}

impl Inspection {
    /// The index, when it opened and has not gone back in time.
    pub fn trusted_index(&self) -> Option<&Index> {
        match &self.index {
            Some(Ok(index)) if index.commits >= self.mark.unwrap_or(0) => Some(index),
            _ => None,
        }
    }

    /// The store as the server would see it is whole: redb opens it, it
    /// has not gone back in time (nor vanished), and every record reads.
    pub fn is_whole(&self) -> bool {
        let present = self.file_len.is_some_and(|len| len > 0);
        let index_ok = match &self.index {
            None => self.mark.unwrap_or(0) == 0,
            Some(_) => self.trusted_index().is_some(),
        };
        (present || self.mark.unwrap_or(0) == 0)
            && index_ok
            && self
                .findings
                .iter()
                .all(|f| matches!(f.verdict, Verdict::Whole))
    }
}

/// What salvage can do for one session.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The index's record reads: the session as acknowledged.
    Whole,
    /// The index's record cannot be read, but an intact copy with the
    /// index's stamp was found elsewhere in the file: nothing lost.
    Recovered,
    /// No trusted index (redb cannot open the file, or it went back in
    /// time): the newest intact copy found, but whether the session had
    /// acknowledged newer steps (in bytes now lost) cannot be told.
    Unconfirmed,
    /// The newest intact copy is older than what the store held: salvage
    /// keeps it, and the steps after it are lost.
    Older { newer: Stamp },
    /// No intact copy at all.
    Lost,
}

pub struct Finding {
    pub id: String,
    pub verdict: Verdict,
    /// The stamp in redb's index, if any.
    pub index_stamp: Option<Stamp>,
    /// Why the index's record cannot be read, if it cannot.
    pub unreadable: Option<String>,
    /// The copy salvage keeps: the newest intact one.
    pub keep: Option<SessionRecord>,
}

/// The lock redb takes on the store file (on Linux, an flock of the whole
/// file besides its byte ranges), held for as long as the store is read: a
/// running server's store is refused, and no server starts on it meanwhile.
pub struct StoreLock {
    _file: Option<File>,
}

impl StoreLock {
    pub fn take(data_dir: &Path) -> Result<StoreLock, InspectError> {
        let path = data_dir.join(FILE_NAME);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(StoreLock { _file: None })
            }
            Err(source) => {
                return Err(InspectError::Io {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        // std's flock (Rust 1.89).
        let locked = file.try_lock();
        match locked {
            Ok(()) => Ok(StoreLock { _file: Some(file) }),
            Err(std::fs::TryLockError::WouldBlock) => Err(InspectError::Locked {
                path: path.display().to_string(),
            }),
            Err(std::fs::TryLockError::Error(source)) => Err(InspectError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }
}

/// Reads `data_dir`'s store (under `lock`), using `scratch` for redb's copy.
pub fn inspect(
    data_dir: &Path,
    scratch: &Path,
    _lock: &StoreLock,
) -> Result<Inspection, InspectError> {
    let start = Instant::now();
    let path = data_dir.join(FILE_NAME);
    let mark = CommitMark::read(data_dir)?;
    let io = |source| InspectError::Io {
        path: path.display().to_string(),
        source,
    };
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(e)),
    };
    let file_len = bytes.as_ref().map(|b| b.len() as u64);
    let (index, copies) = match &bytes {
        Some(bytes) if !bytes.is_empty() => (Some(open_index(bytes, scratch)), scan(bytes)),
        _ => (None, Vec::new()),
    };
    let mut inspection = Inspection {
        path,
        file_len,
        mark,
        index,
        findings: Vec::new(),
        stale_copies: 0,
        elapsed: Duration::ZERO,
    };
    let (findings, stale_copies) = judge(&inspection, &copies);
    inspection.findings = findings;
    inspection.stale_copies = stale_copies;
    inspection.elapsed = start.elapsed();
    Ok(inspection)
}

/// redb's view, from a copy of the file in `scratch` (redb repairs a file
/// left by a server that did not stop cleanly, and that repair writes).
fn open_index(bytes: &[u8], scratch: &Path) -> Result<Index, String> {
    let copy = scratch.join(format!("inspect-{}.redb", std::process::id()));
    std::fs::write(&copy, bytes).map_err(|e| format!("cannot copy the file: {e}"))?;
    let result = read_index(&copy);
    let _ = std::fs::remove_file(&copy);
    result
}

fn read_index(copy: &Path) -> Result<Index, String> {
    let repaired = Arc::new(AtomicBool::new(false));
    let seen = repaired.clone();
    let db = Database::builder()
        .set_repair_callback(move |_| seen.store(true, Ordering::Relaxed))
        .open(copy)
        .map_err(|e| e.to_string())?;
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let mut entries: BTreeMap<String, (Option<Stamp>, Option<Stored>)> = BTreeMap::new();
    // A store never written to has no tables yet: no sessions.
    if let Ok(versions) = txn.open_table(VERSIONS) {
        for entry in versions.iter().map_err(|e| e.to_string())? {
            let (key, value) = entry.map_err(|e| e.to_string())?;
            let (incarnation, version) = value.value();
            entries.entry(key.value().to_owned()).or_default().0 = Some(Stamp {
                incarnation,
                version,
            });
        }
    }
    if let Ok(records) = txn.open_table(RECORDS) {
        for entry in records.iter().map_err(|e| e.to_string())? {
            let (key, value) = entry.map_err(|e| e.to_string())?;
            entries.entry(key.value().to_owned()).or_default().1 =
                Some(SessionRecord::decode_record(value.value()));
        }
    }
    let commits = match txn.open_table(COMMITS) {
        Ok(table) => table
            .get(COMMIT_COUNT)
            .map_err(|e| e.to_string())?
            .map_or(0, |v| v.value()),
        Err(_) => 0,
    };
    Ok(Index {
        commits,
        repaired: repaired.load(Ordering::Relaxed),
        entries,
    })
}

fn order(stamp: Stamp) -> (i64, u64) {
    (stamp.incarnation, stamp.version)
}

/// One finding per session, and how many stale copies were passed over.
///
/// With a trusted index, its sessions are the store's sessions: copies of
/// others are stale (deleted sessions, older pages), and damaged copies
/// newer than the index were never committed. Without one (redb cannot
/// open the file, or it went back in time), every session a copy names is
/// one, and a damaged copy newer than the newest intact one may have held
/// acknowledged steps.
fn judge(inspection: &Inspection, copies: &[Copy]) -> (Vec<Finding>, usize) {
    let trusted = inspection.trusted_index();
    let index_entries = match &inspection.index {
        Some(Ok(index)) => Some(&index.entries),
        _ => None,
    };
    let mut ids: BTreeMap<String, ()> = BTreeMap::new();
    if let Some(entries) = index_entries {
        ids.extend(entries.keys().map(|k| (k.clone(), ())));
    }
    let mut stale = 0;
    for copy in copies {
        let Some(id) = copy.id() else { continue };
        if SessionId::parse_key(id).is_err() {
            continue;
        }
        if trusted.is_some_and(|index| !index.entries.contains_key(id)) {
            stale += 1;
            continue;
        }
        ids.insert(id.to_owned(), ());
    }
    let mut by_id: BTreeMap<&str, Vec<&Copy>> = BTreeMap::new();
    for copy in copies {
        if let Some(id) = copy.id() {
            by_id.entry(id).or_default().push(copy);
        }
    }
    let findings = ids
        .into_keys()
        .map(|id| {
            let entry = index_entries.and_then(|entries| entries.get(&id));
            let index_stamp = entry.and_then(|(stamp, _)| *stamp);
            let unreadable = match entry.map(|(_, stored)| stored) {
                Some(Some(Err(error))) => Some(error.to_string()),
                Some(None) => Some("the index has a version but no record".to_owned()),
                _ => None,
            };
            let index_record = match entry.map(|(_, stored)| stored) {
                Some(Some(Ok(record))) => Some(record),
                _ => None,
            };
            // A trusted index bounds the copies: anything newer was written
            // by a commit that never completed.
            let bound = trusted.and(index_stamp).map(order);
            let mut keep: Option<SessionRecord> = None;
            let mut newest_damaged: Option<Stamp> = None;
            for copy in by_id.get(id.as_str()).into_iter().flatten() {
                match copy {
                    Copy::Intact { record, .. } => {
                        let stamp = order(Stamp::of(record));
                        let newer = keep.as_ref().is_none_or(|k| stamp > order(Stamp::of(k)));
                        if newer && bound.is_none_or(|b| stamp <= b) {
                            keep = Some(SessionRecord::clone(record));
                        }
                    }
                    Copy::Damaged {
                        stamp: Some(stamp), ..
                    } => {
                        if newest_damaged.is_none_or(|d| order(*stamp) > order(d)) {
                            newest_damaged = Some(*stamp);
                        }
                    }
                    Copy::Damaged { stamp: None, .. } => {}
                }
            }
            if trusted.is_some() && index_record.is_some() {
                keep = index_record.cloned();
            }
            // What the file says the session reached.
            let claimed = if trusted.is_some() {
                index_stamp
            } else {
                [index_stamp, newest_damaged]
                    .into_iter()
                    .flatten()
                    .max_by_key(|s| order(*s))
            };
            let verdict = match (&keep, claimed) {
                (None, _) => Verdict::Lost,
                (Some(k), Some(newer)) if order(newer) > order(Stamp::of(k)) => {
                    Verdict::Older { newer }
                }
                (Some(_), _) if trusted.is_none() => Verdict::Unconfirmed,
                (Some(_), _) if unreadable.is_none() => Verdict::Whole,
                (Some(_), _) => Verdict::Recovered,
            };
            Finding {
                id,
                verdict,
                index_stamp,
                unreadable,
                keep,
            }
        })
        .collect();
    (findings, stale)
}
