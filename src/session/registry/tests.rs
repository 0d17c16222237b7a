//! The commit rules, without a gRPC server: a lost compare-and-set recomputes
//! from the other replica's state, a request id is applied once (also after
//! a restart), versions are checked, and a failed store write changes
//! nothing. Expected numbers are PyTorch's update rule written out by hand
//! (`running = (1 - momentum) * running + momentum * batch`), never the
//! registry's own answers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tch::Device;

use super::*;
use crate::device::DeviceChoice;
use crate::numerics::{DType, LayerKind, Momentum, TensorData};
use crate::session::durable::{SessionRecord, SessionStore, Stamp, StoreError, Stored, Written};
use crate::session::{CreateSession, Mode, SessionConfig, StateTensors};

/// A store in memory. `shared`: checked before every use, as Redis is.
/// `stale_checks`: that many version checks answer the stamp the session
/// had before its latest write, as if another replica committed between the
/// check and the write. `failing_puts`: that many writes fail.
#[derive(Default)]
struct MemoryStore {
    shared: bool,
    records: Mutex<BTreeMap<String, (SessionRecord, Option<Stamp>)>>,
    stale_checks: AtomicUsize,
    failing_puts: AtomicUsize,
    conflicts: AtomicUsize,
}

impl MemoryStore {
    fn stored(&self, id: &str) -> Option<SessionRecord> {
        self.records.lock().unwrap().get(id).map(|(r, _)| r.clone())
    }
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait::async_trait]
impl SessionStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn is_shared(&self) -> bool {
        self.shared
    }

    async fn load_all(&self) -> Result<Vec<(String, Stored)>, StoreError> {
        let records = self.records.lock().unwrap();
        Ok(records
            .iter()
            .map(|(id, (r, _))| (id.clone(), Ok(r.clone())))
            .collect())
    }

    async fn load(&self, id: &SessionId) -> Result<Option<Stored>, StoreError> {
        Ok(self.stored(id.as_str()).map(Ok))
    }

    async fn version(&self, id: &SessionId) -> Result<Option<Stamp>, StoreError> {
        let records = self.records.lock().unwrap();
        let Some((record, previous)) = records.get(id.as_str()) else {
            return Ok(None);
        };
        if take_one(&self.stale_checks) {
            return Ok(*previous);
        }
        Ok(Some(Stamp::of(record)))
    }

    async fn put(
        &self,
        record: &SessionRecord,
        previous: Option<Stamp>,
    ) -> Result<Written, StoreError> {
        if take_one(&self.failing_puts) {
            return Err(StoreError {
                backend: "memory",
                message: "disk on fire".into(),
            });
        }
        let mut records = self.records.lock().unwrap();
        let stored = records.get(&record.id).map(|(r, _)| Stamp::of(r));
        if stored != previous {
            self.conflicts.fetch_add(1, Ordering::SeqCst);
            return Ok(Written::Conflict);
        }
        records.insert(record.id.clone(), (record.clone(), stored));
        Ok(Written::Committed)
    }

    async fn delete(&self, id: &SessionId, stamp: Option<Stamp>) -> Result<Written, StoreError> {
        let mut records = self.records.lock().unwrap();
        let stored = records.get(id.as_str()).map(|(r, _)| Stamp::of(r));
        if stamp.is_some() && stored != stamp {
            return Ok(Written::Conflict);
        }
        records.remove(id.as_str());
        Ok(Written::Committed)
    }

    async fn ids_after(
        &self,
        after: Option<&SessionId>,
        limit: usize,
    ) -> Result<Vec<SessionId>, StoreError> {
        let records = self.records.lock().unwrap();
        Ok(records
            .keys()
            .filter(|id| after.is_none_or(|a| id.as_str() > a.as_str()))
            .take(limit)
            .map(|id| SessionId::parse_key(id).unwrap())
            .collect())
    }
}

fn new_registry(store: Option<Arc<MemoryStore>>) -> Registry {
    let metrics = Arc::new(Metrics::new());
    Registry::new(
        RegistryOptions {
            limits: Limits {
                max_sessions: 100,
                max_sessions_per_tenant: None,
                max_tensor_elements: 1 << 20,
                max_num_features: 1024,
                max_page_bytes: 1 << 20,
            },
            default_device: Device::Cpu,
            replay_window: 16,
            replay_cache_bytes: 1 << 20,
            replay_cache_total_bytes: 1 << 20,
            steps: super::StepLimits {
                max_world_size: 1024,
                max_open_steps: 16,
                max_waiting_bytes: 1 << 20,
            },
            stats_kernel: StatsKernel::Libtorch,
        },
        ComputePool::new(1, metrics.clone()),
        store.map(|s| s as Arc<dyn SessionStore>),
        metrics,
    )
}

const MOMENTUM: f64 = 0.5;

fn id() -> SessionId {
    SessionId::parse("bn").unwrap()
}

/// A float64 BatchNorm1d(1) session with momentum 0.5.
async fn create(registry: &Registry) {
    let created = registry
        .create(CreateSession {
            id: Some(id()),
            tenant: String::new(),
            config: SessionConfig {
                kind: LayerKind::BatchNorm1d,
                num_features: 1,
                eps: 1e-5,
                momentum: Momentum::Exponential(MOMENTUM),
                affine: false,
                track_running_stats: true,
                param_dtype: DType::Float64,
                default_mode: Mode::Train,
                reject_non_finite: false,
                labels: BTreeMap::new(),
                step_timeout: crate::session::DEFAULT_STEP_TIMEOUT,
            },
            device: DeviceChoice::Cpu,
            initial: StateTensors::default(),
            num_batches_tracked: None,
        })
        .await
        .unwrap();
    assert!(!created.already_existed);
}

/// A train forward of the (N, 1) batch `values`.
fn train(values: &[f64], preconditions: Preconditions) -> Forward {
    Forward {
        id: id(),
        input: TensorData::from_f64(
            "input",
            DType::Float64,
            vec![values.len() as i64, 1],
            values,
            1 << 20,
        )
        .unwrap(),
        mode: Some(Mode::Train),
        preconditions,
    }
}

fn with_request_id(request_id: &str) -> Preconditions {
    Preconditions {
        expected_version: None,
        request_id: Some(request_id.into()),
    }
}

fn running_mean(snapshot: &SessionSnapshot) -> f64 {
    let tensors = snapshot.tensors.as_ref().unwrap();
    tensors.running_mean.as_ref().unwrap().to_f64_vec()[0]
}

#[tokio::test]
async fn a_lost_compare_and_set_recomputes_from_the_other_replicas_state() {
    let store = Arc::new(MemoryStore {
        shared: true,
        ..Default::default()
    });
    let (a, b) = (
        new_registry(Some(store.clone())),
        new_registry(Some(store.clone())),
    );
    create(&a).await;
    // b caches the session at version 1.
    assert_eq!(b.get(&id()).await.unwrap().version, 1);
    a.forward(train(&[1.0, 3.0], Preconditions::default()))
        .await
        .unwrap();
    // b's check still sees version 1: it computes on a stale state, loses the
    // compare-and-set, reloads version 2 and computes again.
    store.stale_checks.store(1, Ordering::SeqCst);
    let outcome = b
        .forward(train(&[5.0, 9.0], Preconditions::default()))
        .await
        .unwrap();
    assert_eq!(store.conflicts.load(Ordering::SeqCst), 1);
    assert_eq!((outcome.version, outcome.num_batches_tracked), (3, 2));
    let after_first = (1.0 - MOMENTUM) * 0.0 + MOMENTUM * 2.0;
    let expected = (1.0 - MOMENTUM) * after_first + MOMENTUM * 7.0;
    for replica in [&a, &b] {
        let snapshot = replica.get(&id()).await.unwrap();
        assert_eq!(snapshot.version, 3);
        assert!((running_mean(&snapshot) - expected).abs() < 1e-12);
    }
    assert_eq!(store.stored("bn").unwrap().version, 3);
}

#[tokio::test]
async fn a_request_id_is_applied_once_and_answered_again() {
    let store = Arc::new(MemoryStore::default());
    let registry = new_registry(Some(store.clone()));
    create(&registry).await;
    let first = registry
        .forward(train(&[1.0, 3.0], with_request_id("r1")))
        .await
        .unwrap();
    let again = registry
        .forward(train(&[1.0, 3.0], with_request_id("r1")))
        .await
        .unwrap();
    assert!(!first.replayed && again.replayed);
    assert_eq!((again.version, again.num_batches_tracked), (2, 1));
    assert_eq!(again.output, first.output);
    // Another call may not reuse it.
    let reused = registry
        .reset_running_stats(&id(), with_request_id("r1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&reused, SessionError::RequestIdReused { used_by, .. } if *used_by == "Forward"),
        "{reused:?}"
    );
    let snapshot = registry.get(&id()).await.unwrap();
    assert_eq!((snapshot.version, snapshot.num_batches_tracked), (2, 1));
    assert!((running_mean(&snapshot) - MOMENTUM * 2.0).abs() < 1e-12);

    // After a restart the id is still known (its output is not).
    let restarted = new_registry(Some(store));
    restarted.recover().await.unwrap();
    let replayed = restarted
        .forward(train(&[1.0, 3.0], with_request_id("r1")))
        .await
        .unwrap();
    assert!(replayed.replayed);
    assert_eq!(replayed.output, None);
    assert_eq!((replayed.version, replayed.num_batches_tracked), (2, 1));
}

#[tokio::test]
async fn a_wrong_expected_version_applies_nothing() {
    let registry = new_registry(None);
    create(&registry).await;
    let given = Preconditions {
        expected_version: Some(5),
        request_id: Some("r1".into()),
    };
    let refused = registry
        .forward(train(&[1.0, 3.0], given.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            refused,
            SessionError::VersionMismatch {
                expected: 5,
                actual: 1,
                ..
            }
        ),
        "{refused:?}"
    );
    let refused = registry
        .reset_running_stats(&id(), given)
        .await
        .unwrap_err();
    assert!(matches!(refused, SessionError::VersionMismatch { .. }));
    let refused = registry.delete(&id(), Some(2)).await.unwrap_err();
    assert!(matches!(refused, SessionError::VersionMismatch { .. }));
    let snapshot = registry.get(&id()).await.unwrap();
    assert_eq!((snapshot.version, snapshot.num_batches_tracked), (1, 0));
    assert_eq!(running_mean(&snapshot), 0.0);
    // The request id was not used up by the refused calls.
    let applied = registry
        .forward(train(&[1.0, 3.0], with_request_id("r1")))
        .await
        .unwrap();
    assert!(!applied.replayed);
    registry.delete(&id(), Some(2)).await.unwrap();
    assert!(matches!(
        registry.get(&id()).await,
        Err(SessionError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_failed_store_write_changes_nothing() {
    let store = Arc::new(MemoryStore::default());
    let registry = new_registry(Some(store.clone()));
    create(&registry).await;
    store.failing_puts.store(1, Ordering::SeqCst);
    let failed = registry
        .forward(train(&[1.0, 3.0], with_request_id("r1")))
        .await
        .unwrap_err();
    assert!(matches!(failed, SessionError::Store(_)), "{failed:?}");
    let snapshot = registry.get(&id()).await.unwrap();
    assert_eq!((snapshot.version, snapshot.num_batches_tracked), (1, 0));
    assert_eq!(store.stored("bn").unwrap().version, 1);
    // Nor was the request id remembered: the retry is applied, once.
    let retried = registry
        .forward(train(&[1.0, 3.0], with_request_id("r1")))
        .await
        .unwrap();
    assert!(!retried.replayed);
    assert_eq!((retried.version, retried.num_batches_tracked), (2, 1));
}

#[tokio::test]
async fn a_stored_request_id_of_an_unknown_call_is_data_loss_not_a_forward() {
    let store = Arc::new(MemoryStore::default());
    create(&new_registry(Some(store.clone()))).await;
    {
        let mut records = store.records.lock().unwrap();
        let (record, _) = records.get_mut("bn").unwrap();
        record
            .recent_requests
            .push(crate::session::durable::RecentRequest {
                request_id: "r1".into(),
                call: "Frobnicate".into(),
                version: 1,
                num_batches_tracked: 0,
            });
    }
    let restarted = new_registry(Some(store));
    let recovery = restarted.recover().await.unwrap();
    assert_eq!((recovery.loaded, recovery.unreadable), (0, 1));
    let refused = restarted
        .forward(train(&[1.0, 3.0], with_request_id("r1")))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, SessionError::DataLoss { reason, .. } if reason.contains("Frobnicate")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_shared_store_that_went_back_in_time_is_data_loss_not_a_rollback() {
    let store = Arc::new(MemoryStore {
        shared: true,
        ..Default::default()
    });
    let registry = new_registry(Some(store.clone()));
    create(&registry).await;
    registry
        .forward(train(&[1.0, 3.0], Preconditions::default()))
        .await
        .unwrap();
    let older = store.stored("bn").unwrap();
    registry
        .forward(train(&[5.0, 9.0], Preconditions::default()))
        .await
        .unwrap();
    // The store loses the last acknowledged write (restored from an older copy).
    store
        .records
        .lock()
        .unwrap()
        .insert("bn".into(), (older, None));
    let refused = registry
        .forward(train(&[1.0, 3.0], Preconditions::default()))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, SessionError::DataLoss { reason, .. } if reason.contains("went back in time")),
        "{refused:?}"
    );
    // And stays refused: nothing is computed on the older state.
    assert!(matches!(
        registry.get(&id()).await,
        Err(SessionError::DataLoss { .. })
    ));
    assert_eq!(store.stored("bn").unwrap().version, 2);
}
