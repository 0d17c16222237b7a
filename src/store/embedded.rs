//! The embedded store: one redb file in the data directory.
//!
//! Writes go through one writer thread that drains every pending write into a
//! single transaction and commits it once (group commit): concurrent mutations
//! share one fsync. A caller's future completes only after the commit that
//! holds its write is durable.
//!
//! Every commit also counts itself, inside the store and, once durable, in
//! the [`CommitMark`] beside it: a store found holding fewer commits than the
//! mark (or missing, or empty, where the mark says a store was) has gone back
//! in time, and opening it is refused unless the operator accepts that.

use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::commit_mark::{CommitMark, MarkError};
use crate::session::durable::{
    SessionRecord, SessionStore, Stamp, StoreError, Stored, Written, FORMAT_VERSION,
};
use crate::session::SessionId;

/// Session id -> encoded record.
pub(super) const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// Session id -> (incarnation, version), beside the record for cheap checks.
pub(super) const VERSIONS: TableDefinition<&str, (i64, u64)> = TableDefinition::new("stamps");
/// "format" -> the record format of the file.
const META: TableDefinition<&str, u32> = TableDefinition::new("meta");
/// "count" -> how many write transactions were committed.
pub(super) const COMMITS: TableDefinition<&str, u64> = TableDefinition::new("commits");
pub(super) const COMMIT_COUNT: &str = "count";

const NAME: &str = "embedded";

pub const FILE_NAME: &str = "sessions.redb";

enum Operation {
    Put {
        id: String,
        bytes: Vec<u8>,
        stamp: Stamp,
        previous: Option<Stamp>,
    },
    Delete {
        id: String,
        stamp: Option<Stamp>,
    },
}

struct WriteJob {
    operation: Operation,
    done: oneshot::Sender<Result<Written, StoreError>>,
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    writes: mpsc::Sender<WriteJob>,
    writer: Option<thread::JoinHandle<()>>,
}

impl Drop for EmbeddedStore {
    /// Stops the writer (after it has committed what was queued) and waits
    /// for it, so the file is closed and its lock released when the store is
    /// gone: a new store can open the same directory right away.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.writes, closed));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn error(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError {
        backend: NAME,
        message: format!("{context}: {e}"),
    }
}

/// Opening the store failed; the server must not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open {path}: {message}")]
    Open { path: String, message: String },
    #[error("{path} is damaged beyond what redb can repair ({message}). Refusing to start rather than serve it without its sessions; the file is left as it is. `normserve store check --data-dir {data_dir}` lists what is readable, and `normserve store salvage --data-dir {data_dir} --out NEW_DIR` exports every readable session into a fresh store to start from (--data-dir NEW_DIR)")]
    Damaged {
        path: String,
        data_dir: String,
        message: String,
    },
    #[error("{path} was written by a newer normserve (format {found}, this build reads up to {FORMAT_VERSION}); refusing to start")]
    NewerFormat { path: String, found: u32 },
    #[error("{path} holds {stored} commits, but {acknowledged} were acknowledged (recorded in {mark}): the store has gone back in time (redb repaired a corrupt newest commit by falling back to an older one, or an older copy of the file was restored), and sessions would silently lose acknowledged steps. Refusing to start; `normserve store salvage --data-dir {data_dir} --out NEW_DIR` recovers the newest intact copy of each session (and names the ones that are older), or start once with --accept-store-rollback to serve the store as it is")]
    RolledBack {
        path: String,
        data_dir: String,
        mark: String,
        stored: u64,
        acknowledged: u64,
    },
    #[error("{path} is missing or empty, but this data directory held a store with {acknowledged} acknowledged commits (recorded in {mark}). Refusing to start with no sessions; restore the file, or start once with --accept-store-rollback to begin with an empty store")]
    Missing {
        path: String,
        mark: String,
        acknowledged: u64,
    },
    #[error(transparent)]
    Mark(#[from] MarkError),
}

/// How to open the embedded store.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Serve a store that holds fewer commits than were acknowledged (or is
    /// missing where one was) instead of refusing to start; the commit mark
    /// then starts again from what the store holds.
    pub accept_rollback: bool,
}

impl EmbeddedStore {
    /// Opens (or creates) `data_dir/sessions.redb`, checks it against the
    /// commit mark and starts the writer.
    pub fn open(data_dir: &Path, options: OpenOptions) -> Result<Self, OpenError> {
        let path = data_dir.join(FILE_NAME);
        let shown = path.display().to_string();
        let open_error = |e: &dyn std::fmt::Display| OpenError::Open {
            path: shown.clone(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(data_dir).map_err(|e| open_error(&e))?;
        let mark = CommitMark::open(data_dir)?;
        let shown_mark = mark.path().display().to_string();
        let acknowledged = mark.found.unwrap_or(0);
        // An empty or missing file is checked before redb would make a fresh
        // store of it, which would be a silent reset.
        let empty = std::fs::metadata(&path).map_or(true, |m| m.len() == 0);
        if empty && acknowledged > 0 {
            if !options.accept_rollback {
                return Err(OpenError::Missing {
                    path: shown,
                    mark: shown_mark,
                    acknowledged,
                });
            }
            tracing::warn!(path = %shown, acknowledged,
                "store missing or empty where one was; starting empty (--accept-store-rollback)");
        }
        let db = Database::create(&path).map_err(|e| match e {
            // Not the file's fault: the directory, permissions, a lock.
            redb::DatabaseError::DatabaseAlreadyOpen => open_error(&e),
            redb::DatabaseError::Storage(redb::StorageError::Io(ref io))
                if !matches!(
                    io.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
                ) =>
            {
                open_error(&e)
            }
            // The file's fault: corrupt beyond redb's repair, cut short, or
            // its header gone.
            _ => OpenError::Damaged {
                path: shown.clone(),
                data_dir: data_dir.display().to_string(),
                message: e.to_string(),
            },
        })?;
        // Check (or stamp) the file's format before anything else touches it.
        let txn = db.begin_write().map_err(|e| open_error(&e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| open_error(&e))?;
            let found = meta
                .get("format")
                .map_err(|e| open_error(&e))?
                .map(|v| v.value());
            match found {
                Some(found) if found > FORMAT_VERSION => {
                    return Err(OpenError::NewerFormat { path: shown, found });
                }
                Some(_) => {}
                None => {
                    meta.insert("format", FORMAT_VERSION)
                        .map_err(|e| open_error(&e))?;
                }
            }
            txn.open_table(RECORDS).map_err(|e| open_error(&e))?;
            txn.open_table(VERSIONS).map_err(|e| open_error(&e))?;
            txn.open_table(COMMITS).map_err(|e| open_error(&e))?;
        }
        txn.commit().map_err(|e| open_error(&e))?;
        let stored = {
            let txn = db.begin_read().map_err(|e| open_error(&e))?;
            let commits = txn.open_table(COMMITS).map_err(|e| open_error(&e))?;
            let count = commits.get(COMMIT_COUNT).map_err(|e| open_error(&e))?;
            count.map_or(0, |v| v.value())
        };
        if stored < acknowledged && !empty {
            if !options.accept_rollback {
                return Err(OpenError::RolledBack {
                    path: shown,
                    data_dir: data_dir.display().to_string(),
                    mark: shown_mark,
                    stored,
                    acknowledged,
                });
            }
            tracing::warn!(path = %shown, stored, acknowledged,
                "store has gone back in time; serving it as it is (--accept-store-rollback)");
        }
        // From here the mark follows the store (also a mark that lagged
        // after a power loss, or a store from before marks existed).
        mark.record(stored)?;
        let db = Arc::new(db);
        let (writes, jobs) = mpsc::channel();
        let writer_db = db.clone();
        let writer = thread::Builder::new()
            .name("normserve-store-writer".into())
            .spawn(move || write_loop(&writer_db, &jobs, &mark, stored))
            .map_err(|e| open_error(&e))?;
        Ok(EmbeddedStore {
            db,
            writes,
            writer: Some(writer),
        })
    }

    async fn submit(&self, operation: Operation) -> Result<Written, StoreError> {
        let (done, result) = oneshot::channel();
        self.writes
            .send(WriteJob { operation, done })
            .map_err(|_| error("writer", "stopped"))?;
        result
            .await
            .map_err(|_| error("writer", "stopped before answering"))?
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_read().map_err(|e| error("read", e))?;
        f(&txn)
    }
}

/// The group-commit loop: block for one job, take every job already queued,
/// apply them in one transaction, commit once, record the commit in the mark,
/// answer all. `commits`: the count the store holds when the loop starts.
fn write_loop(db: &Database, jobs: &mpsc::Receiver<WriteJob>, mark: &CommitMark, mut commits: u64) {
    let mut mark_failed = false;
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while let Ok(more) = jobs.try_recv() {
            batch.push(more);
        }
        match apply_batch(db, &batch, commits + 1) {
            Ok(outcomes) => {
                commits += 1;
                if let Err(error) = mark.record(commits) {
                    // The commit is durable; only the rollback check is weaker.
                    if !mark_failed {
                        tracing::error!(%error, "commit mark not written; a rollback of the store could go unnoticed at the next start");
                    }
                    mark_failed = true;
                }
                for (job, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = job.done.send(Ok(outcome));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = batch.len(), "store commit failed");
                for job in batch {
                    let _ = job.done.send(Err(e.clone()));
                }
            }
        }
    }
    if let Err(error) = mark.sync() {
        tracing::warn!(%error, "commit mark not synced at shutdown");
    }
}

/// Applies `batch` in one transaction that counts itself as commit number
/// `commit`.
fn apply_batch(db: &Database, batch: &[WriteJob], commit: u64) -> Result<Vec<Written>, StoreError> {
    let txn = db.begin_write().map_err(|e| error("begin", e))?;
    let mut outcomes = Vec::with_capacity(batch.len());
    {
        let mut count = txn.open_table(COMMITS).map_err(|e| error("open", e))?;
        count
            .insert(COMMIT_COUNT, commit)
            .map_err(|e| error("insert", e))?;
        let mut records = txn.open_table(RECORDS).map_err(|e| error("open", e))?;
        let mut versions = txn.open_table(VERSIONS).map_err(|e| error("open", e))?;
        for job in batch {
            let id = match &job.operation {
                Operation::Put { id, .. } | Operation::Delete { id, .. } => id.as_str(),
            };
            let current = versions
                .get(id)
                .map_err(|e| error("get", e))?
                .map(|v| v.value())
                .map(|(incarnation, version)| Stamp {
                    incarnation,
                    version,
                });
            let allowed = match &job.operation {
                // `previous: None` means the session must not exist yet.
                Operation::Put { previous, .. } => current == *previous,
                Operation::Delete {
                    stamp: Some(stamp), ..
                } => current == Some(*stamp),
                Operation::Delete { stamp: None, .. } => true,
            };
            if !allowed {
                outcomes.push(Written::Conflict);
                continue;
            }
            match &job.operation {
                Operation::Put {
                    id, bytes, stamp, ..
                } => {
                    records
                        .insert(id.as_str(), bytes.as_slice())
                        .map_err(|e| error("insert", e))?;
                    versions
                        .insert(id.as_str(), (stamp.incarnation, stamp.version))
                        .map_err(|e| error("insert", e))?;
                }
                Operation::Delete { id, .. } => {
                    records
                        .remove(id.as_str())
                        .map_err(|e| error("remove", e))?;
                    versions
                        .remove(id.as_str())
                        .map_err(|e| error("remove", e))?;
                }
            }
            outcomes.push(Written::Committed);
        }
    }
    // Durability::Immediate (redb's default): fsync before returning.
    txn.commit().map_err(|e| error("commit", e))?;
    Ok(outcomes)
}

fn decode(bytes: &[u8]) -> Stored {
    SessionRecord::decode_record(bytes)
}

#[async_trait::async_trait]
impl SessionStore for EmbeddedStore {
    fn name(&self) -> &'static str {
        NAME
    }

    fn is_shared(&self) -> bool {
        false
    }

    async fn load_all(&self) -> Result<Vec<(String, Stored)>, StoreError> {
        self.read(|txn| {
            let records = txn.open_table(RECORDS).map_err(|e| error("open", e))?;
            let mut out = Vec::new();
            for entry in records.iter().map_err(|e| error("iter", e))? {
                let (key, value) = entry.map_err(|e| error("iter", e))?;
                out.push((key.value().to_owned(), decode(value.value())));
            }
            Ok(out)
        })
    }

    async fn load(&self, id: &SessionId) -> Result<Option<Stored>, StoreError> {
        self.read(|txn| {
            let records = txn.open_table(RECORDS).map_err(|e| error("open", e))?;
            let found = records.get(id.as_str()).map_err(|e| error("get", e))?;
            Ok(found.map(|v| decode(v.value())))
        })
    }

    async fn version(&self, id: &SessionId) -> Result<Option<Stamp>, StoreError> {
        self.read(|txn| {
            let versions = txn.open_table(VERSIONS).map_err(|e| error("open", e))?;
            let found = versions.get(id.as_str()).map_err(|e| error("get", e))?;
            Ok(found
                .map(|v| v.value())
                .map(|(incarnation, version)| Stamp {
                    incarnation,
                    version,
                }))
        })
    }

    async fn put(
        &self,
        record: &SessionRecord,
        previous: Option<Stamp>,
    ) -> Result<Written, StoreError> {
        self.submit(Operation::Put {
            id: record.id.clone(),
            bytes: record.encode_record(),
            stamp: Stamp::of(record),
            previous,
        })
        .await
    }

    async fn delete(&self, id: &SessionId, stamp: Option<Stamp>) -> Result<Written, StoreError> {
        self.submit(Operation::Delete {
            id: id.as_str().to_owned(),
            stamp,
        })
        .await
    }

    async fn ids_after(
        &self,
        after: Option<&SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionId>, StoreError> {
        self.read(|txn| {
            let versions = txn.open_table(VERSIONS).map_err(|e| error("open", e))?;
            let mut out = Vec::new();
            for entry in versions.iter().map_err(|e| error("iter", e))? {
                let (key, _) = entry.map_err(|e| error("iter", e))?;
                let Ok(id) = SessionId::parse_key(key.value()) else {
                    continue;
                };
                if after.is_some_and(|a| &id <= a) {
                    continue;
                }
                out.push(id);
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn record(version: u64) -> SessionRecord {
        SessionRecord {
            id: "s".into(),
            kind: 1,
            num_features: 1,
            version,
            created_at_unix_nanos: 7,
            ..Default::default()
        }
    }

    fn open(dir: &Path, accept_rollback: bool) -> Result<EmbeddedStore, OpenError> {
        EmbeddedStore::open(dir, OpenOptions { accept_rollback })
    }

    #[tokio::test]
    async fn every_commit_is_counted_in_the_store_and_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), false).unwrap();
        store.put(&record(1), None).await.unwrap();
        let stamp = Stamp::of(&record(1));
        store.put(&record(2), Some(stamp)).await.unwrap();
        drop(store);
        let mark = CommitMark::open(dir.path()).unwrap();
        assert_eq!(mark.found, Some(2));
        // Reopening checks and keeps the count.
        drop(open(dir.path(), false).unwrap());
        assert_eq!(CommitMark::open(dir.path()).unwrap().found, Some(2));
    }

    #[tokio::test]
    async fn a_store_behind_its_mark_is_refused_unless_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), false).unwrap();
        store.put(&record(1), None).await.unwrap();
        drop(store);
        CommitMark::open(dir.path()).unwrap().record(5).unwrap();
        match open(dir.path(), false) {
            Err(OpenError::RolledBack {
                stored: 1,
                acknowledged: 5,
                ..
            }) => {}
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("a rolled-back store was opened"),
        }
        drop(open(dir.path(), true).unwrap());
        // Accepted: the mark follows the store again.
        assert_eq!(CommitMark::open(dir.path()).unwrap().found, Some(1));
        drop(open(dir.path(), false).unwrap());
    }

    #[tokio::test]
    async fn a_store_redb_cannot_open_is_refused_naming_check_and_salvage() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), false).unwrap();
        store.put(&record(1), None).await.unwrap();
        drop(store);
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..4096].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        for accept_rollback in [false, true] {
            match open(dir.path(), accept_rollback) {
                Err(error @ OpenError::Damaged { .. }) => {
                    let text = error.to_string();
                    assert!(text.contains("normserve store check --data-dir"), "{text}");
                    assert!(
                        text.contains("normserve store salvage --data-dir"),
                        "{text}"
                    );
                }
                Err(other) => panic!("{other}"),
                Ok(_) => panic!("a damaged store was opened"),
            }
        }
        // Refusing changed nothing.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[tokio::test]
    async fn an_empty_store_where_one_was_is_refused_unless_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), false).unwrap();
        store.put(&record(1), None).await.unwrap();
        drop(store);
        std::fs::File::create(dir.path().join(FILE_NAME)).unwrap();
        assert!(matches!(
            open(dir.path(), false),
            Err(OpenError::Missing {
                acknowledged: 1,
                ..
            })
        ));
        let store = open(dir.path(), true).unwrap();
        assert!(store.load_all().await.unwrap().is_empty());
    }
}
