//! [`MeasuredStore`]: any [`SessionStore`] with each operation timed and its
//! failures counted (`normserve_store_operation_duration_seconds{op}`,
//! `normserve_store_errors_total{op}`). The one place store calls are
//! measured; `op` is the trait method's name. A compare-and-set that loses
//! (`Written::Conflict`) is an answer, not an error.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use crate::session::durable::{
    Meeting, SessionRecord, SessionStore, Stamp, StoreError, Stored, Written,
};
use crate::session::SessionId;
use crate::telemetry::Metrics;

pub struct MeasuredStore {
    inner: Arc<dyn SessionStore>,
    metrics: Arc<Metrics>,
}

impl MeasuredStore {
    pub fn new(inner: Arc<dyn SessionStore>, metrics: Arc<Metrics>) -> MeasuredStore {
        MeasuredStore { inner, metrics }
    }

    async fn measure<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = call.await;
        self.metrics
            .store_operation(op, started.elapsed(), result.is_err());
        result
    }
}

#[async_trait::async_trait]
impl SessionStore for MeasuredStore {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }

    async fn load_all(&self) -> Result<Vec<(String, Stored)>, StoreError> {
        self.measure("load_all", self.inner.load_all()).await
    }

    async fn load(&self, id: &SessionId) -> Result<Option<Stored>, StoreError> {
        self.measure("load", self.inner.load(id)).await
    }

    async fn version(&self, id: &SessionId) -> Result<Option<Stamp>, StoreError> {
        self.measure("version", self.inner.version(id)).await
    }

    async fn put(
        &self,
        record: &SessionRecord,
        previous: Option<Stamp>,
    ) -> Result<Written, StoreError> {
        self.measure("put", self.inner.put(record, previous)).await
    }

    async fn delete(&self, id: &SessionId, stamp: Option<Stamp>) -> Result<Written, StoreError> {
        self.measure("delete", self.inner.delete(id, stamp)).await
    }

    async fn ids_after(
        &self,
        after: Option<&SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionId>, StoreError> {
        self.measure("ids_after", self.inner.ids_after(after, limit))
            .await
    }

    // Step meetings are passed through unmeasured: a waiting rank polls its
    // meeting every millisecond or so, which would swamp the store's
    // latency histogram with calls that are waiting, not storing.

    async fn meet(
        &self,
        key: &str,
        world_size: u32,
        rank: u32,
        share: &[u8],
        deadline_unix_ms: u64,
    ) -> Result<Meeting, StoreError> {
        self.inner
            .meet(key, world_size, rank, share, deadline_unix_ms)
            .await
    }

    async fn meeting(&self, key: &str, rank: u32, now_unix_ms: u64) -> Result<Meeting, StoreError> {
        self.inner.meeting(key, rank, now_unix_ms).await
    }

    async fn leave(&self, key: &str, rank: u32) -> Result<(), StoreError> {
        self.inner.leave(key, rank).await
    }

    async fn fail_meeting(&self, key: &str, rank: u32, reason: &str) -> Result<(), StoreError> {
        self.inner.fail_meeting(key, rank, reason).await
    }
}
