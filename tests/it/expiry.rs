//! The idle-session TTL: sessions nobody uses for `--session-ttl-seconds`
//! leave memory (evict: the stored record stays and the next use loads it
//! again) or are deleted, counted in `normserve_session_evictions_total`;
//! GetSession and ListSessions show the last use and do not count as one.

use std::time::{Duration, Instant, SystemTime};

use normserve::config::{Durability, TtlAction};
use normserve::proto::v1 as pb;
use tonic::Code;

use crate::server::{BatchNorm, TestServer};
use crate::support::metrics::{sample, scrape};
use crate::support::requests::{bn1d, create, get, named, train};
use crate::support::state::list_ids;
use crate::support::tensors::batch;

const EVICTED: &str = "normserve_session_evictions_total{action=\"evict\"}";
const DELETED: &str = "normserve_session_evictions_total{action=\"delete\"}";

fn time(timestamp: &Option<prost_types::Timestamp>) -> SystemTime {
    SystemTime::try_from((*timestamp).unwrap()).unwrap()
}

/// Keeps `id` in use (a train step every 100 ms) until `until` returns true,
/// or fails after 15 s.
async fn use_until<F, Fut>(client: &mut BatchNorm, id: &str, mut until: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let give_up = Instant::now() + Duration::from_secs(15);
    while !until().await {
        assert!(Instant::now() < give_up, "gave up waiting for the TTL");
        client.forward(train(id, batch(4, 2))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_evicted_from_memory_and_loaded_again_on_use() {
    let data = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_metrics(|c| {
        c.durability = Durability::Sync;
        c.data_dir = data.path().to_owned();
        c.session_ttl_seconds = 1;
        c.session_ttl_action = TtlAction::Evict;
    })
    .await;
    let mut client = server.batch_norm().await;
    create(&mut client, named("idle", bn1d(2))).await;
    create(&mut client, named("busy", bn1d(2))).await;
    let before_use = SystemTime::now();
    client.forward(train("idle", batch(4, 2))).await.unwrap();
    let idle = get(&mut client, "idle").await;
    let last_use = time(&idle.last_used_at);
    assert!(last_use >= before_use, "{idle:?}");

    // Looking at a session is not using it.
    let looked = get(&mut client, "idle").await;
    assert_eq!(time(&looked.last_used_at), last_use);

    let mut busy = server.batch_norm().await;
    use_until(&mut busy, "busy", || async {
        sample(&scrape(&server).await, EVICTED) == Some(1.0)
    })
    .await;
    let text = scrape(&server).await;
    assert_eq!(sample(&text, "normserve_sessions"), Some(1.0), "{text}");

    // Listed from the store without coming back into memory, last use kept.
    assert_eq!(list_ids(&mut client).await, ["busy", "idle"]);
    let text = scrape(&server).await;
    assert_eq!(sample(&text, "normserve_sessions"), Some(1.0), "{text}");

    // Named again, it is loaded with its state and its last use.
    let again = get(&mut client, "idle").await;
    assert_eq!(again.num_batches_tracked, 1);
    assert_eq!(again.version, idle.version);
    assert_eq!(again.running_mean, idle.running_mean);
    assert_eq!(time(&again.last_used_at), last_use);
    let stepped = client
        .forward(train("idle", batch(4, 2)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stepped.num_batches_tracked, 2);
    assert!(time(&get(&mut client, "idle").await.last_used_at) > last_use);
    assert_eq!(sample(&scrape(&server).await, DELETED), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_deleted_with_the_delete_action_while_used_ones_stay() {
    let server = TestServer::start_with_metrics(|c| {
        c.session_ttl_seconds = 1;
        c.session_ttl_action = TtlAction::Delete;
    })
    .await;
    let mut client = server.batch_norm().await;
    create(&mut client, named("idle", bn1d(2))).await;
    create(&mut client, named("busy", bn1d(2))).await;

    // Polling GetSession does not keep it alive.
    let watcher = server.batch_norm().await;
    let mut busy = server.batch_norm().await;
    use_until(&mut busy, "busy", || {
        let request = pb::GetSessionRequest {
            session_id: "idle".into(),
        };
        let mut watcher = watcher.clone();
        async move {
            match watcher.get_session(request).await {
                Ok(_) => false,
                Err(status) => {
                    assert_eq!(status.code(), Code::NotFound, "{status:?}");
                    true
                }
            }
        }
    })
    .await;
    let text = scrape(&server).await;
    assert_eq!(sample(&text, DELETED), Some(1.0), "{text}");
    assert_eq!(sample(&text, EVICTED), Some(0.0), "{text}");
    assert_eq!(list_ids(&mut client).await, ["busy"]);
    assert!(get(&mut client, "busy").await.num_batches_tracked >= 1);
}
