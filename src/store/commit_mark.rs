//! The commit mark: how many commits the embedded store has acknowledged,
//! kept in a small file beside the store file rather than inside it, so that
//! a store that went back in time is noticed when the server starts instead
//! of being served silently. A store goes back in time when redb repairs a
//! corrupt newest commit by falling back to the one before it, when an older
//! copy of the file is restored, or when the file is truncated or deleted.
//!
//! The mark is written after each commit is durable, never before, so it can
//! only lag behind the store, never lead it: a store holding fewer commits
//! than the mark has lost acknowledged writes. It is written in place without
//! an fsync of its own (an fsync per commit would double the cost of a
//! write): a process crash (kill -9, OOM) loses nothing, since the written
//! page is in the kernel's cache; after a power loss the mark may lag, which
//! can only hide a rollback that happened in the same instant, never report
//! one that did not.
//!
//! Format: one line of text, `normserve commits N` with N zero-padded to 20
//! digits, so every write has the same length and replaces the last whole.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "sessions.commits";
const PREFIX: &str = "normserve commits ";

#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a commit mark (expected a line `normserve commits N`)")]
    Unreadable { path: String },
}

/// The open mark file and the count it held when opened.
pub struct CommitMark {
    file: File,
    path: PathBuf,
    /// The count found when the file was opened; None: there was no mark.
    pub found: Option<u64>,
}

impl CommitMark {
    /// Opens (or creates) the mark in `data_dir` and reads it.
    pub fn open(data_dir: &Path) -> Result<CommitMark, MarkError> {
        let path = data_dir.join(FILE_NAME);
        let io = |source| MarkError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io)?;
        let found = parse(&text, &path)?;
        Ok(CommitMark { file, path, found })
    }

    /// The count in `data_dir`'s mark, without creating or changing
    /// anything (None: no mark).
    pub fn read(data_dir: &Path) -> Result<Option<u64>, MarkError> {
        let path = data_dir.join(FILE_NAME);
        match std::fs::read_to_string(&path) {
            Ok(text) => parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(MarkError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that `commits` commits are durable.
    pub fn record(&self, commits: u64) -> Result<(), MarkError> {
        let line = format!("{PREFIX}{commits:020}\n");
        self.file
            .write_all_at(line.as_bytes(), 0)
            .map_err(|source| MarkError::Io {
                path: self.path.display().to_string(),
                source,
            })
    }

    /// Makes the mark durable (at a clean shutdown).
    pub fn sync(&self) -> Result<(), MarkError> {
        self.file.sync_all().map_err(|source| MarkError::Io {
            path: self.path.display().to_string(),
            source,
        })
    }
}

/// The count in a mark's text (None: an empty file, no mark yet).
fn parse(text: &str, path: &Path) -> Result<Option<u64>, MarkError> {
    if text.is_empty() {
        return Ok(None);
    }
    text.trim_end()
        .strip_prefix(PREFIX)
        .and_then(|digits| digits.parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| MarkError::Unreadable {
            path: path.display().to_string(),
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_mark_reads_back_what_was_recorded_last() {
        let dir = tempfile::tempdir().unwrap();
        let mark = CommitMark::open(dir.path()).unwrap();
        assert_eq!(mark.found, None);
        mark.record(12_345).unwrap();
        mark.record(12_346).unwrap();
        drop(mark);
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(text, "normserve commits 00000000000000012346\n");
        assert_eq!(CommitMark::open(dir.path()).unwrap().found, Some(12_346));
    }

    #[test]
    fn a_mark_that_is_not_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "hello\n").unwrap();
        assert!(matches!(
            CommitMark::open(dir.path()),
            Err(MarkError::Unreadable { .. })
        ));
    }
}
