//! `store salvage`: the copies an [`Inspection`] chose to keep, written into
//! a fresh embedded store in another directory (through [`EmbeddedStore`],
//! so the new store counts its commits and has its commit mark like any
//! other). The damaged store is left exactly as it was.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::embedded::{self, EmbeddedStore, OpenOptions};
use super::inspect::Inspection;
use crate::session::durable::{SessionStore, Written};

#[derive(Debug, thiserror::Error)]
pub enum SalvageError {
    #[error("{0} already holds a store; salvage writes into an empty directory only")]
    NotEmpty(String),
    #[error("the output directory must not be the data directory")]
    SameDirectory,
    #[error(transparent)]
    Open(#[from] embedded::OpenError),
    #[error("cannot start the writer: {0}")]
    Runtime(std::io::Error),
    #[error("writing {id}: {message}")]
    Write { id: String, message: String },
}

pub struct Salvaged {
    pub written: usize,
    pub elapsed: Duration,
}

/// Writes every session `inspection` keeps into a new store in `out`.
pub fn salvage(
    inspection: &Inspection,
    data_dir: &Path,
    out: &Path,
) -> Result<Salvaged, SalvageError> {
    let start = Instant::now();
    let same = match (data_dir.canonicalize(), out.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(SalvageError::SameDirectory);
    }
    for name in [embedded::FILE_NAME, super::commit_mark::FILE_NAME] {
        let path = out.join(name);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
            return Err(SalvageError::NotEmpty(path.display().to_string()));
        }
    }
    let store = Arc::new(EmbeddedStore::open(out, OpenOptions::default())?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(SalvageError::Runtime)?;
    let records: Vec<_> = inspection
        .findings
        .iter()
        .filter_map(|f| f.keep.clone())
        .collect();
    let written = records.len();
    runtime.block_on(async {
        // All at once: the writer commits them in a few group commits.
        let mut writes = tokio::task::JoinSet::new();
        for record in records {
            let store = store.clone();
            writes.spawn(async move {
                let outcome = store.put(&record, None).await;
                (record.id, outcome)
            });
        }
        while let Some(joined) = writes.join_next().await {
            let (id, outcome) = joined.map_err(|e| SalvageError::Write {
                id: String::new(),
                message: e.to_string(),
            })?;
            match outcome {
                Ok(Written::Committed) => {}
                Ok(Written::Conflict) => {
                    return Err(SalvageError::Write {
                        id,
                        message: "written twice".into(),
                    })
                }
                Err(e) => {
                    return Err(SalvageError::Write {
                        id,
                        message: e.to_string(),
                    })
                }
            }
        }
        Ok(())
    })?;
    // Dropping the store waits for the writer: the new store is closed.
    drop(store);
    Ok(Salvaged {
        written,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::super::inspect::{inspect, InspectError, StoreLock, Verdict};
    use super::*;
    use crate::session::durable::{SessionRecord, Stamp};

    fn record(id: &str, version: u64, fill: u8) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            kind: 1,
            num_features: 4,
            param_dtype: 1,
            running_mean: Some(vec![fill; 16]),
            version,
            created_at_unix_nanos: 7,
            ..Default::default()
        }
    }

    fn write(dir: &Path, records: &[(SessionRecord, Option<Stamp>)]) {
        let store = EmbeddedStore::open(dir, OpenOptions::default()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for (record, previous) in records {
            let written = runtime.block_on(store.put(record, *previous)).unwrap();
            assert_eq!(written, Written::Committed);
        }
    }

    fn load_all(dir: &Path) -> Vec<SessionRecord> {
        let store = EmbeddedStore::open(dir, OpenOptions::default()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let all = runtime.block_on(store.load_all()).unwrap();
        all.into_iter().map(|(_, r)| r.unwrap()).collect()
    }

    #[test]
    fn the_readable_sessions_are_salvaged_and_the_damaged_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (record("a", 1, 0x11), record("acme/b", 1, 0x22));
        let victim = [record("victim", 1, 0x33), record("victim", 2, 0x44)];
        write(
            dir.path(),
            &[
                (a.clone(), None),
                (b.clone(), None),
                (victim[0].clone(), None),
                (victim[1].clone(), Some(Stamp::of(&victim[0]))),
            ],
        );
        // One flipped bit in every copy of the victim's newest state.
        let path = dir.path().join(embedded::FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        let mut flipped = 0;
        for at in 0..bytes.len() - 16 {
            if bytes[at..at + 16] == [0x44; 16] {
                bytes[at + 5] ^= 0x01;
                flipped += 1;
            }
        }
        assert!(flipped >= 1);
        std::fs::write(&path, bytes).unwrap();

        let lock = StoreLock::take(dir.path()).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let inspection = inspect(dir.path(), scratch.path(), &lock).unwrap();
        assert!(!inspection.is_whole());
        let verdicts: Vec<_> = inspection
            .findings
            .iter()
            .map(|f| (f.id.as_str(), f.verdict.clone()))
            .collect();
        assert_eq!(verdicts[0], ("a", Verdict::Whole));
        assert_eq!(verdicts[1], ("acme/b", Verdict::Whole));
        let damaged = &inspection.findings[2];
        assert_eq!(damaged.id, "victim");
        assert!(damaged.unreadable.as_deref().unwrap().contains("checksum"));
        // Its older copy may or may not have survived in a freed page;
        // either way salvage says it is not the acknowledged state.
        match (&damaged.verdict, &damaged.keep) {
            (Verdict::Older { newer }, Some(kept)) => {
                assert_eq!((newer.version, kept), (2, &victim[0]));
            }
            (Verdict::Lost, None) => {}
            other => panic!("{other:?}"),
        }

        let out = tempfile::tempdir().unwrap();
        let salvaged = salvage(&inspection, dir.path(), out.path()).unwrap();
        drop(lock);
        let mut restored = load_all(out.path());
        restored.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(salvaged.written, restored.len());
        assert_eq!(restored[..2], [a, b]);
        // A second salvage into the same directory is refused.
        let lock = StoreLock::take(dir.path()).unwrap();
        assert!(matches!(
            salvage(&inspection, dir.path(), out.path()),
            Err(SalvageError::NotEmpty(_))
        ));
        drop(lock);
    }

    #[test]
    fn a_store_held_by_a_server_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), OpenOptions::default()).unwrap();
        assert!(matches!(
            StoreLock::take(dir.path()),
            Err(InspectError::Locked { .. })
        ));
        drop(store);
        let lock = StoreLock::take(dir.path()).unwrap();
        // And a server cannot start while the store is being read.
        assert!(matches!(
            EmbeddedStore::open(dir.path(), OpenOptions::default()),
            Err(embedded::OpenError::Open { .. })
        ));
        drop(lock);
    }
}
