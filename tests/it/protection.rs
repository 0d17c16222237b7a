//! Protection: the server-wide limit on requests in progress sheds the excess
//! at once, exempts health checks, and gives places back as requests end.

use normserve::proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::requests::{bn1d, check_status, create, get, train};
use crate::server::TestServer;
use crate::tensors::batch;

const LIMIT: u64 = 3;

/// An open ForwardStream that has had one reply: a request in progress until
/// `sender` is dropped.
struct OpenStream {
    sender: mpsc::Sender<pb::ForwardRequest>,
    replies: tonic::Streaming<pb::ForwardStreamResponse>,
}

async fn open_stream(server: &TestServer, id: &str) -> Result<OpenStream, tonic::Status> {
    let mut client = server.batch_norm().await;
    let (sender, receiver) = mpsc::channel(4);
    sender.send(train(id, batch(4, 2))).await.unwrap();
    let mut replies = client
        .forward_stream(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    let first = replies.message().await?.expect("one reply");
    assert!(first.result.is_some(), "{first:?}");
    Ok(OpenStream { sender, replies })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_max_concurrent_requests_are_shed_until_places_free() {
    let server = TestServer::start_with(|c| c.max_concurrent_requests = LIMIT).await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;

    let mut open = Vec::new();
    for _ in 0..LIMIT {
        open.push(open_stream(&server, &id).await.unwrap());
    }

    // Every place is taken: a unary call and a further stream are refused.
    let refused = client
        .get_session(pb::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .unwrap_err();
    check_status(&refused, Code::ResourceExhausted, "max_concurrent_requests");
    let Err(refused) = open_stream(&server, &id).await else {
        panic!("a stream beyond the limit was admitted");
    };
    check_status(&refused, Code::ResourceExhausted, "max_concurrent_requests");

    // Health is exempt: an overloaded server is alive.
    let mut health = HealthClient::new(server.channel().await);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    // One stream ends: exactly one place comes back.
    let OpenStream {
        sender,
        mut replies,
    } = open.pop().unwrap();
    drop(sender);
    assert!(replies.message().await.unwrap().is_none());
    let reopened = open_stream(&server, &id).await.unwrap();
    let refused = client
        .get_session(pb::GetSessionRequest {
            session_id: id.clone(),
        })
        .await
        .unwrap_err();
    check_status(&refused, Code::ResourceExhausted, "max_concurrent_requests");

    // All end: calls succeed again, and the shed calls changed nothing.
    open.push(reopened);
    for OpenStream {
        sender,
        mut replies,
    } in open
    {
        drop(sender);
        assert!(replies.message().await.unwrap().is_none());
    }
    let session = get(&mut client, &id).await;
    // LIMIT + 1 streams were admitted, each with one train step.
    assert_eq!(session.num_batches_tracked, LIMIT as i64 + 1);
    for _ in 0..2 * LIMIT {
        client.forward(train(&id, batch(4, 2))).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_max_concurrent_requests_sheds_nothing() {
    let server = TestServer::start_with(|c| c.max_concurrent_requests = 0).await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;
    let mut open = Vec::new();
    for _ in 0..2 * LIMIT {
        open.push(open_stream(&server, &id).await.unwrap());
    }
    assert_eq!(
        get(&mut client, &id).await.num_batches_tracked,
        2 * LIMIT as i64
    );
    drop(open);
}
