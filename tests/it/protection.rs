//! Protection: the server-wide limit on requests in progress sheds the excess
//! at once, exempts health checks, and gives places back as requests end.

use normserve::proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::server::TestServer;
use crate::support::requests::{bn1d, check_status, create, get, train};
use crate::support::tensors::batch;

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

/// Repeats in a batch large enough to be computed on a blocking thread
/// (a repeat is 32 bytes of input), where a cancelled caller can go away
/// while its step runs.
const BLOCKING_REPEATS: usize = normserve::compute::INLINE_BYTES / 32 * 2;

/// (4 × `repeats`, 2) float32 rows cycling through the four rows of
/// `batch(4, 2)`: channel means -1.5 and -1.0 whatever `repeats` is.
fn repeated_batch(repeats: usize) -> pb::Tensor {
    let rows = [[-3.0f32, -2.5], [-2.0, -1.5], [-1.0, -0.5], [0.0, 0.5]];
    let values: Vec<f32> = (0..repeats)
        .flat_map(|_| rows.iter().flatten().copied())
        .collect();
    crate::support::tensors::f32_raw(&[4 * repeats as i64, 2], &values)
}

/// The session's counters and running mean describe the same number of
/// applied steps: `momentum` 0.1 from zeros gives mean × (1 - 0.9^k).
#[track_caller]
fn assert_steps_consistent(session: &pb::Session) -> i64 {
    let steps = session.num_batches_tracked;
    assert_eq!(session.version, steps as u64 + 1, "{session:?}");
    let running_mean = crate::support::tensors::values(session.running_mean.as_ref().unwrap());
    let decay = 1.0 - 0.9f64.powi(steps as i32);
    for (got, mean) in running_mean.iter().zip([-1.5, -1.0]) {
        let want = mean * decay;
        assert!(
            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
            "after {steps} steps: {got} != {want}"
        );
    }
    steps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_forwards_are_applied_whole_or_not_at_all() {
    const CALLS: u64 = 48;
    let server = TestServer::start_with(|c| c.compute_threads = 1).await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        // A connection per call: cancellations reset streams, and h2 closes a
        // connection that sees many resets (rapid-reset protection).
        let mut client = server.batch_norm().await;
        let request = train(&id, repeated_batch(BLOCKING_REPEATS));
        // Deadlines from 0 to about 5 ms: some calls are cancelled before they
        // are sent, some while queued, some during compute, some not at all.
        let patience = std::time::Duration::from_micros((i % 12) * 400);
        calls.spawn(async move {
            tokio::time::timeout(patience, client.forward(request))
                .await
                .ok()
                .map(|reply| reply.unwrap().into_inner())
        });
    }
    let mut acknowledged = Vec::new();
    while let Some(outcome) = calls.join_next().await {
        if let Some(reply) = outcome.unwrap() {
            assert_eq!(reply.version, reply.num_batches_tracked as u64 + 1);
            acknowledged.push(reply.num_batches_tracked);
        }
    }
    let cancelled = CALLS - acknowledged.len() as u64;
    assert!(
        cancelled > 0,
        "no call was cancelled: the test proves nothing"
    );

    // Cancelled calls may still be finishing on the server: every snapshot
    // must be consistent, and count at least every acknowledged step.
    let steps = assert_steps_consistent(&get(&mut client, &id).await);
    assert!(
        steps >= acknowledged.len() as i64 && steps <= CALLS as i64,
        "{steps}"
    );
    assert!(acknowledged.iter().all(|&k| k <= steps));
    let last = client
        .forward(train(&id, repeated_batch(BLOCKING_REPEATS)))
        .await
        .unwrap()
        .into_inner();
    assert!(last.num_batches_tracked > steps);
    let final_steps = assert_steps_consistent(&get(&mut client, &id).await);
    assert!(final_steps >= last.num_batches_tracked && final_steps <= CALLS as i64 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_whose_deadline_has_passed_are_not_computed() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;
    let mut bare = server.batch_norm_without_client_deadlines().await;

    // A 1 ns grpc-timeout has passed by the time the server handles the call:
    // small (inline) and large (blocking-thread) train steps alike must fail
    // without moving the session.
    for input in [batch(4, 2), repeated_batch(BLOCKING_REPEATS)] {
        for _ in 0..20 {
            let mut request = tonic::Request::new(train(&id, input.clone()));
            request.set_timeout(std::time::Duration::from_nanos(1));
            let status = bare.forward(request).await.unwrap_err();
            assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        }
    }
    let session = get(&mut client, &id).await;
    assert_eq!(session.num_batches_tracked, 0, "{session:?}");
    assert_eq!(session.version, 1, "{session:?}");

    // A deadline still in the future computes as usual.
    let mut request = tonic::Request::new(train(&id, batch(4, 2)));
    request.set_timeout(std::time::Duration::from_secs(60));
    let reply = client.forward(request).await.unwrap().into_inner();
    assert_eq!(reply.num_batches_tracked, 1);
}

/// The trailers-only status of a raw gRPC POST of `body` to `path`.
async fn raw_grpc_status(server: &TestServer, path: &str, body: Vec<u8>) -> tonic::Status {
    use tower::{Service, ServiceExt};
    let mut bare = server.bare_http2().await;
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}{path}", server.address))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from(body),
        )))
        .unwrap();
    let response = bare.ready().await.unwrap().call(request).await.unwrap();
    tonic::Status::from_header_map(response.headers()).expect("a trailers-only status")
}

#[tokio::test]
async fn a_request_body_ending_inside_or_before_its_message_is_invalid_argument_not_internal() {
    let server = TestServer::start().await;
    // A gRPC frame announcing 100 bytes of message, then 10 and the end.
    let mut body = vec![0u8, 0, 0, 0, 100];
    body.extend_from_slice(&[0x0a, 8, b's', b'e', b's', b's', b'i', b'o', b'n', b'1']);
    let status = raw_grpc_status(&server, "/normserve.v1.BatchNormService/GetSession", body).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("truncated"), "{status:?}");

    // No message at all (what a call cancelled before sending leaves).
    let path = "/normserve.v1.BatchNormService/GetSession";
    let status = raw_grpc_status(&server, path, Vec::new()).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("no message"), "{status:?}");
}

/// The unary Forward's request is read beside tonic's codec: each bad body
/// gets the status tonic's path gives the same body on another method.
#[tokio::test]
async fn the_unary_forward_refuses_bad_bodies_as_tonic_does() {
    let server = TestServer::start().await;
    let forward = "/normserve.v1.BatchNormService/Forward";
    let tonic_path = "/normserve.v1.BatchNormService/GetSession";
    let mut truncated = vec![0u8, 0, 0, 0, 100];
    truncated.extend_from_slice(&[0x0a, 2, b's', b'1']);
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", truncated),
        ("empty", Vec::new()),
        ("prefix only", vec![0, 0, 0]),
        // Field 1 announcing more bytes than the message has.
        ("malformed", vec![0, 0, 0, 0, 3, 0x0a, 0x7f, 0x01]),
        // An invalid wire type.
        ("bad wire type", vec![0, 0, 0, 0, 2, 0x0f, 0x01]),
        ("oversized", vec![0, 0xff, 0xff, 0xff, 0xff]),
    ];
    for (name, body) in bodies {
        let ours = raw_grpc_status(&server, forward, body.clone()).await;
        let theirs = raw_grpc_status(&server, tonic_path, body).await;
        assert_eq!(ours.code(), theirs.code(), "{name}: {ours:?} vs {theirs:?}");
        assert_ne!(ours.code(), Code::Internal, "{name}: {ours:?}");
        assert_ne!(ours.code(), Code::Ok, "{name}: {ours:?}");
    }
    // A compression flag on an uncompressed call is the client's fault.
    let status = raw_grpc_status(&server, forward, vec![1, 0, 0, 0, 0]).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}
