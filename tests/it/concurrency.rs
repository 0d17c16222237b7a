//! Many clients at once: mutations of one session are serialized, creates of
//! one id settle on one session, limits hold under races.

use std::collections::BTreeSet;

use tokio::task::JoinSet;
use tonic::Code;

use crate::server::TestServer;
use crate::support::requests::{bn1d, create, get, named, train};
use crate::support::tensors::batch;

const CLIENTS: usize = 8;
const CALLS_PER_CLIENT: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_train_forwards_on_one_session_are_serialized() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;

    let mut clients = JoinSet::new();
    for _ in 0..CLIENTS {
        // A channel of its own: a separate HTTP/2 connection per client.
        let mut client = server.batch_norm().await;
        let id = id.clone();
        clients.spawn(async move {
            let mut acknowledged = Vec::new();
            for _ in 0..CALLS_PER_CLIENT {
                let reply = client.forward(train(&id, batch(4, 2))).await.unwrap();
                let reply = reply.into_inner();
                acknowledged.push((reply.version, reply.num_batches_tracked));
            }
            acknowledged
        });
    }
    let mut versions = BTreeSet::new();
    let mut acknowledged = 0;
    while let Some(replies) = clients.join_next().await {
        let replies = replies.unwrap();
        // One client's calls are sequential, so its versions grow.
        assert!(replies.windows(2).all(|w| w[0].0 < w[1].0), "{replies:?}");
        for (version, count) in replies {
            assert_eq!(count as u64, version - 1);
            assert!(versions.insert(version), "version {version} seen twice");
            acknowledged += 1;
        }
    }
    assert_eq!(acknowledged, CLIENTS * CALLS_PER_CLIENT);
    let all: BTreeSet<u64> = (2..=1 + acknowledged as u64).collect();
    assert_eq!(versions, all);

    let session = get(&mut client, &id).await;
    assert_eq!(session.num_batches_tracked, acknowledged as i64);
    assert_eq!(session.version - 1, acknowledged as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_id_make_exactly_one_session() {
    let server = TestServer::start().await;
    let mut creators = JoinSet::new();
    for _ in 0..CLIENTS {
        let mut client = server.batch_norm().await;
        creators.spawn(async move {
            client
                .create_session(named("shared", bn1d(4)))
                .await
                .unwrap()
                .into_inner()
        });
    }
    let mut created = 0;
    let mut created_at = BTreeSet::new();
    while let Some(reply) = creators.join_next().await {
        let reply = reply.unwrap();
        if !reply.already_existed {
            created += 1;
        }
        let session = reply.session.unwrap();
        assert_eq!(session.session_id, "shared");
        assert_eq!(session.version, 1);
        let at = session.created_at.unwrap();
        created_at.insert((at.seconds, at.nanos));
    }
    assert_eq!(created, 1);
    assert_eq!(created_at.len(), 1, "one session, one creation time");

    let mut client = server.batch_norm().await;
    let page = client
        .list_sessions(normserve::proto::v1::ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.sessions.len(), 1);
    assert_eq!(get(&mut client, "shared").await.version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_never_exceed_max_sessions() {
    let limit = 5;
    let server = TestServer::start_with(|c| c.max_sessions = limit).await;
    let mut creators = JoinSet::new();
    for i in 0..CLIENTS {
        let mut client = server.batch_norm().await;
        creators.spawn(async move {
            client
                .create_session(named(&format!("s{i}"), bn1d(2)))
                .await
                .map(|_| ())
        });
    }
    let (mut accepted, mut refused) = (0, 0);
    while let Some(outcome) = creators.join_next().await {
        match outcome.unwrap() {
            Ok(()) => accepted += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("max_sessions"), "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((accepted, refused), (limit, CLIENTS as u64 - limit));
    let mut client = server.batch_norm().await;
    let page = client
        .list_sessions(normserve::proto::v1::ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.sessions.len() as u64, limit);
}
