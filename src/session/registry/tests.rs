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
/// check and the write. `failing_puts`: that many writes fail. `commits`:
/// the writes committed.
#[derive(Default)]
struct MemoryStore {
    shared: bool,
    records: Mutex<BTreeMap<String, (SessionRecord, Option<Stamp>)>>,
    stale_checks: AtomicUsize,
    failing_puts: AtomicUsize,
    conflicts: AtomicUsize,
    commits: AtomicUsize,
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
        self.commits.fetch_add(1, Ordering::SeqCst);
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
            memory_budget: crate::memory::MemoryBudget::unlimited(),
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
    create_named(registry, "bn").await;
}

/// [`create`] under the name `name`.
async fn create_named(registry: &Registry, name: &str) {
    let created = registry
        .create(CreateSession {
            id: Some(SessionId::parse(name).unwrap()),
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
                exact_statistics: false,
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
    train_on("bn", values, preconditions)
}

/// [`train`] on the session `name`.
fn train_on(name: &str, values: &[f64], preconditions: Preconditions) -> Forward {
    Forward {
        id: SessionId::parse(name).unwrap(),
        input: TensorData::from_f64(
            "input",
            DType::Float64,
            vec![values.len() as i64, 1],
            values,
            1 << 20,
        )
        .unwrap()
        .into(),
        mode: Some(Mode::Train),
        preconditions,
        output_memory: None,
        input_memory: None,
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

/// PyTorch's train step on a (N, 1) batch, written out by hand: the output
/// (x - mean) / sqrt(biased var + eps), and the running statistics after
/// the update with momentum 0.5 (the unbiased variance).
struct HandOracle {
    mean: f64,
    var: f64,
    batches: i64,
}

impl HandOracle {
    fn new() -> HandOracle {
        HandOracle {
            mean: 0.0,
            var: 1.0,
            batches: 0,
        }
    }

    fn train(&mut self, values: &[f64]) -> Vec<f64> {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let squares = values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>();
        let (biased, unbiased) = (squares / n, squares / (n - 1.0));
        self.mean = (1.0 - MOMENTUM) * self.mean + MOMENTUM * mean;
        self.var = (1.0 - MOMENTUM) * self.var + MOMENTUM * unbiased;
        self.batches += 1;
        values
            .iter()
            .map(|x| (x - mean) / (biased + 1e-5).sqrt())
            .collect()
    }

    fn eval(&self, values: &[f64]) -> Vec<f64> {
        values
            .iter()
            .map(|x| (x - self.mean) / (self.var + 1e-5).sqrt())
            .collect()
    }

    fn check(&self, snapshot: &SessionSnapshot) {
        let tensors = snapshot.tensors.as_ref().unwrap();
        let var = tensors.running_var.as_ref().unwrap().to_f64_vec()[0];
        assert!((running_mean(snapshot) - self.mean).abs() < 1e-12);
        assert!((var - self.var).abs() < 1e-12, "{var} vs {}", self.var);
        assert_eq!(snapshot.num_batches_tracked, self.batches);
    }
}

fn assert_output(outcome: &ForwardOutcome, expected: &[f64]) {
    let output = outcome.output.as_ref().unwrap().to_f64_vec();
    assert_eq!(output.len(), expected.len());
    for (got, want) in output.iter().zip(expected) {
        assert!((got - want).abs() < 1e-9, "{output:?} vs {expected:?}");
    }
}

fn eval(values: &[f64]) -> Forward {
    Forward {
        mode: Some(Mode::Eval),
        ..train(values, Preconditions::default())
    }
}

const BATCHES: [[f64; 2]; 5] = [
    [1.0, 3.0],
    [5.0, 9.0],
    [-2.0, 4.0],
    [0.5, 0.25],
    [7.0, -7.0],
];

#[tokio::test]
async fn a_group_of_forwards_is_applied_in_order_and_committed_once() {
    let store = Arc::new(MemoryStore::default());
    let registry = new_registry(Some(store.clone()));
    create(&registry).await;
    let committed = store.commits.load(Ordering::SeqCst);
    let commands = BATCHES
        .iter()
        .enumerate()
        .map(|(i, batch)| train(batch, with_request_id(&format!("r{i}"))))
        .collect();
    let answers = registry.forward_group(commands).await;
    assert_eq!(store.commits.load(Ordering::SeqCst), committed + 1);
    let mut oracle = HandOracle::new();
    for (i, (answer, batch)) in answers.iter().zip(BATCHES).enumerate() {
        let outcome = answer.as_ref().unwrap();
        assert_output(outcome, &oracle.train(&batch));
        assert!(!outcome.replayed);
        assert_eq!(
            (outcome.version, outcome.num_batches_tracked),
            (i as u64 + 2, i as i64 + 1)
        );
    }
    oracle.check(&registry.get(&id()).await.unwrap());
    // One record, with every request id and the position each produced.
    let stored = store.stored("bn").unwrap();
    assert_eq!(stored.version, 6);
    let recent: Vec<_> = stored
        .recent_requests
        .iter()
        .map(|r| (r.request_id.as_str(), r.version, r.num_batches_tracked))
        .collect();
    assert_eq!(
        recent,
        [
            ("r0", 2, 1),
            ("r1", 3, 2),
            ("r2", 4, 3),
            ("r3", 5, 4),
            ("r4", 6, 5)
        ]
    );

    // After a restart every id of the group is still known.
    let restarted = new_registry(Some(store));
    restarted.recover().await.unwrap();
    oracle.check(&restarted.get(&id()).await.unwrap());
    let replayed = restarted
        .forward(train(&BATCHES[2], with_request_id("r2")))
        .await
        .unwrap();
    assert!(replayed.replayed);
    assert_eq!((replayed.version, replayed.num_batches_tracked), (4, 3));
}

#[tokio::test]
async fn each_forward_of_a_group_answers_its_own_error_and_the_others_apply() {
    let store = Arc::new(MemoryStore::default());
    let registry = new_registry(Some(store.clone()));
    create(&registry).await;
    create_named(&registry, "other").await;
    let committed = store.commits.load(Ordering::SeqCst);
    let answers = registry
        .forward_group(vec![
            train(&BATCHES[0], with_request_id("a")),
            // One value per channel: PyTorch refuses it in train mode.
            train(&[1.0], Preconditions::default()),
            train_on("other", &BATCHES[1], Preconditions::default()),
            // Expects the version before the first forward.
            train(
                &BATCHES[1],
                Preconditions {
                    expected_version: Some(1),
                    request_id: None,
                },
            ),
            // Sees the statistics the first forward left.
            eval(&[2.0, -1.0]),
            train_on("ghost", &BATCHES[1], Preconditions::default()),
            // The same request id again: its first answer, not applied twice.
            train(&BATCHES[0], with_request_id("a")),
            // Expects the version the first forward left.
            train(
                &BATCHES[2],
                Preconditions {
                    expected_version: Some(2),
                    request_id: Some("b".into()),
                },
            ),
            train_on("other", &BATCHES[3], Preconditions::default()),
        ])
        .await;
    // Both sessions committed, each once.
    assert_eq!(store.commits.load(Ordering::SeqCst), committed + 2);
    let mut oracle = HandOracle::new();
    let mut other = HandOracle::new();
    assert_output(answers[0].as_ref().unwrap(), &oracle.train(&BATCHES[0]));
    let refused = answers[1].as_ref().unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("Expected more than 1 value per channel when training"),
        "{refused}"
    );
    assert_output(answers[2].as_ref().unwrap(), &other.train(&BATCHES[1]));
    assert!(
        matches!(
            answers[3],
            Err(SessionError::VersionMismatch {
                expected: 1,
                actual: 2,
                ..
            })
        ),
        "{:?}",
        answers[3]
    );
    assert_output(answers[4].as_ref().unwrap(), &oracle.eval(&[2.0, -1.0]));
    assert!(
        matches!(&answers[5], Err(SessionError::NotFound(id)) if id.as_str() == "ghost"),
        "{:?}",
        answers[5]
    );
    let again = answers[6].as_ref().unwrap();
    assert!(again.replayed);
    assert_eq!(again.output, answers[0].as_ref().unwrap().output);
    let applied = answers[7].as_ref().unwrap();
    assert_output(applied, &oracle.train(&BATCHES[2]));
    assert_eq!((applied.version, applied.num_batches_tracked), (3, 2));
    assert_output(answers[8].as_ref().unwrap(), &other.train(&BATCHES[3]));
    oracle.check(&registry.get(&id()).await.unwrap());
    other.check(
        &registry
            .get(&SessionId::parse("other").unwrap())
            .await
            .unwrap(),
    );
    let recent: Vec<_> = store
        .stored("bn")
        .unwrap()
        .recent_requests
        .iter()
        .map(|r| r.request_id.clone())
        .collect();
    assert_eq!(recent, ["a", "b"]);
}

#[tokio::test]
async fn a_failed_group_commit_fails_every_forward_and_changes_nothing() {
    let store = Arc::new(MemoryStore::default());
    let registry = new_registry(Some(store.clone()));
    create(&registry).await;
    store.failing_puts.store(1, Ordering::SeqCst);
    let commands = || {
        vec![
            train(&BATCHES[0], with_request_id("r0")),
            eval(&[1.0, 2.0]),
            train(&BATCHES[1], with_request_id("r1")),
        ]
    };
    let answers = registry.forward_group(commands()).await;
    for answer in &answers {
        assert!(matches!(answer, Err(SessionError::Store(_))), "{answer:?}");
    }
    let snapshot = registry.get(&id()).await.unwrap();
    assert_eq!((snapshot.version, snapshot.num_batches_tracked), (1, 0));
    assert_eq!(store.stored("bn").unwrap().version, 1);
    // Nothing was remembered: the retried group applies, once.
    let answers = registry.forward_group(commands()).await;
    let mut oracle = HandOracle::new();
    assert_output(answers[0].as_ref().unwrap(), &oracle.train(&BATCHES[0]));
    assert_output(answers[1].as_ref().unwrap(), &oracle.eval(&[1.0, 2.0]));
    assert_output(answers[2].as_ref().unwrap(), &oracle.train(&BATCHES[1]));
    assert!(answers.iter().all(|a| !a.as_ref().unwrap().replayed));
    oracle.check(&registry.get(&id()).await.unwrap());
}

#[tokio::test]
async fn a_group_that_loses_the_compare_and_set_is_recomputed_whole() {
    let store = Arc::new(MemoryStore {
        shared: true,
        ..Default::default()
    });
    let (a, b) = (
        new_registry(Some(store.clone())),
        new_registry(Some(store.clone())),
    );
    create(&a).await;
    assert_eq!(b.get(&id()).await.unwrap().version, 1);
    a.forward(train(&BATCHES[0], Preconditions::default()))
        .await
        .unwrap();
    // b computes its group on the stale version 1, loses the
    // compare-and-set, reloads and computes the whole group again.
    store.stale_checks.store(1, Ordering::SeqCst);
    let answers = b
        .forward_group(
            BATCHES[1..]
                .iter()
                .map(|batch| train(batch, Preconditions::default()))
                .collect(),
        )
        .await;
    assert_eq!(store.conflicts.load(Ordering::SeqCst), 1);
    let mut oracle = HandOracle::new();
    oracle.train(&BATCHES[0]);
    for (answer, batch) in answers.iter().zip(&BATCHES[1..]) {
        assert_output(answer.as_ref().unwrap(), &oracle.train(batch));
    }
    for replica in [&a, &b] {
        let snapshot = replica.get(&id()).await.unwrap();
        assert_eq!(snapshot.version, 6);
        oracle.check(&snapshot);
    }
}

/// A /dev/shm object of `bytes` zero bytes, registered in tenant "t" of its
/// own SharedMemory; removed when dropped.
struct SharedObject {
    path: std::path::PathBuf,
    name: String,
    shm: crate::shm::SharedMemory,
}

impl SharedObject {
    fn new(bytes: usize) -> SharedObject {
        let name = format!(
            "normserve-unit-registry-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let path = std::path::PathBuf::from("/dev/shm").join(&name);
        std::fs::write(&path, vec![0u8; bytes]).unwrap();
        let shm = crate::shm::SharedMemory::new(crate::shm::ShmLimits {
            enabled: true,
            dir: std::path::PathBuf::from("/dev/shm"),
            max_bytes: 1 << 30,
            tenant_max_regions: 4,
            tenant_max_bytes: 1 << 30,
            idle: None,
        });
        shm.register("t", &name, 0, bytes as u64).unwrap();
        SharedObject { path, name, shm }
    }

    /// `len` bytes from `offset`, as the memory a Forward writes its output into.
    fn memory(&self, offset: u64, len: u64) -> Arc<dyn crate::numerics::ExternalMemory> {
        let request = crate::shm::RangeRequest {
            region: self.name.clone(),
            offset,
            byte_size: len,
        };
        Arc::new(self.shm.range("t", "output", &request, 8).unwrap())
    }

    /// The float64 values at `offset` in the object, read through the file.
    fn f64s(&self, offset: usize, count: usize) -> Vec<f64> {
        let bytes = std::fs::read(&self.path).unwrap();
        bytes[offset..offset + 8 * count]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

impl Drop for SharedObject {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[tokio::test]
async fn an_output_computed_into_memory_is_copied_for_its_replay() {
    let registry = new_registry(Some(Arc::new(MemoryStore::default())));
    create(&registry).await;
    let object = SharedObject::new(4096);
    let mut oracle = HandOracle::new();
    let values = [1.0, 3.0, 8.0];
    let command = Forward {
        output_memory: Some(object.memory(64, 24)),
        ..train(&values, with_request_id("r1"))
    };
    let first = registry.forward(command.clone()).await.unwrap();
    let expected = oracle.train(&values);
    assert!(first.written && first.output.is_none() && !first.replayed);
    for (got, want) in object.f64s(64, 3).iter().zip(&expected) {
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }
    // The client reuses its range; the replay answers the kept copy (the
    // transport writes it in again) and applies nothing.
    std::fs::write(&object.path, vec![0xFFu8; 4096]).unwrap();
    let again = registry.forward(command).await.unwrap();
    assert!(again.replayed && !again.written);
    assert_output(&again, &expected);
    assert_eq!((again.version, again.num_batches_tracked), (2, 1));
    oracle.check(&registry.get(&id()).await.unwrap());
    // Without a request id nothing is copied: the output is in the range only.
    let values = [2.0, -4.0, 5.0];
    let plain = Forward {
        output_memory: Some(object.memory(64, 24)),
        ..train(&values, Preconditions::default())
    };
    let outcome = registry.forward(plain).await.unwrap();
    assert!(outcome.written && outcome.output.is_none());
    let expected = oracle.train(&values);
    for (got, want) in object.f64s(64, 3).iter().zip(&expected) {
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }
    oracle.check(&registry.get(&id()).await.unwrap());
}

#[tokio::test]
async fn a_step_whose_output_memory_lost_pages_is_not_applied() {
    let store = Arc::new(MemoryStore::default());
    let registry = new_registry(Some(store.clone()));
    create(&registry).await;
    let object = SharedObject::new(8192);
    // 512 float64 values: exactly the object's second page.
    let values: Vec<f64> = (0..512).map(|i| f64::from(i % 7) - 2.5).collect();
    let memory = object.memory(4096, 4096);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&object.path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let command = Forward {
        output_memory: Some(memory),
        ..train(&values, with_request_id("lost"))
    };
    let err = registry.forward(command).await.unwrap_err();
    assert!(matches!(&err, SessionError::MemoryLost(_)), "{err:?}");
    assert!(err.to_string().ends_with("nothing was applied"), "{err}");
    // Nothing committed: the session and its store are as created, and the
    // request id is free (a retry elsewhere is applied, once).
    let mut oracle = HandOracle::new();
    oracle.check(&registry.get(&id()).await.unwrap());
    assert_eq!(registry.get(&id()).await.unwrap().version, 1);
    assert_eq!(store.commits.load(Ordering::SeqCst), 1);
    let retried = registry
        .forward(train(&values, with_request_id("lost")))
        .await
        .unwrap();
    assert!(!retried.replayed);
    assert_output(&retried, &oracle.train(&values));
    oracle.check(&registry.get(&id()).await.unwrap());
}
