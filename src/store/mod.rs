//! Durable session stores, the backends of
//! [`crate::session::durable::SessionStore`]:
//!
//! - [`embedded::EmbeddedStore`] (default): one redb file in the data
//!   directory, group commit, durable before each response.
//! - [`redis::RedisStore`]: shared by several replicas, compare-and-set on
//!   the session version.
//!
//! Chosen by `--store` and `--durability` (see [`open`]). Either is wrapped
//! in [`measured::MeasuredStore`] for the metrics.
//!
//! Offline, for the operator: [`command`] (`normserve store check|salvage`)
//! reads an embedded store through [`inspect`] (redb's view, the commit
//! mark, the [`scan`] of the file's raw bytes) and [`salvage`] writes what
//! is readable into a fresh store.

pub mod command;
pub mod commit_mark;
pub mod embedded;
pub mod inspect;
pub mod measured;
pub mod redis;
pub mod salvage;
pub mod scan;

use std::sync::Arc;

use crate::config::{Config, Durability};
use crate::session::durable::SessionStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    #[error(transparent)]
    Embedded(#[from] embedded::OpenError),
    #[error(transparent)]
    Redis(#[from] redis::OpenError),
    #[error(
        "--durability none keeps sessions in memory only; it cannot be combined with --store {0}"
    )]
    NoneWithShared(String),
}

/// The store the configuration asks for; `None` for `--durability none`.
pub async fn open(config: &Config) -> Result<Option<Arc<dyn SessionStore>>, StoreOpenError> {
    let shared = config.store.starts_with("redis://") || config.store.starts_with("rediss://");
    match config.durability {
        Durability::None if shared => Err(StoreOpenError::NoneWithShared(config.store.clone())),
        Durability::None => Ok(None),
        Durability::Sync if shared => Ok(Some(Arc::new(
            redis::RedisStore::open(&config.store).await?,
        ))),
        Durability::Sync => Ok(Some(Arc::new(embedded::EmbeddedStore::open(
            &config.data_dir,
            embedded::OpenOptions {
                accept_rollback: config.accept_store_rollback,
            },
        )?))),
    }
}
