//! The memory budget (`--memory-budget`): sessions, replay caches and
//! messages in flight charged to one server-wide number of bytes, and what
//! would exceed it refused with RESOURCE_EXHAUSTED naming the budget, before
//! anything is allocated. Expected counts and bytes follow from the
//! documented charges (a session: dtype size x num_features x its tensors,
//! plus 8 KiB; a message: its length prefix and bytes; a replay: the output
//! bytes), never from the server's own numbers.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use normserve::proto::v1 as pb;
use tokio::sync::oneshot;
use tonic::Code;

use crate::server::TestServer;
use crate::support::metrics::{sample, scrape};
use crate::support::requests::{bn1d, check_status, create, named, train};
use crate::support::tensors::{batch, values};

const MIB: u64 = 1 << 20;
/// What every session is charged beside its tensors.
const OVERHEAD: u64 = 8 * 1024;

/// A BatchNorm1d of `c` float64 channels: four (C,) float64 tensors.
fn big_session(id: &str, c: i64) -> pb::CreateSessionRequest {
    named(
        id,
        pb::CreateSessionRequest {
            param_dtype: pb::DataType::Float64 as i32,
            ..bn1d(c)
        },
    )
}

fn assert_names_the_budget(status: &tonic::Status, budget: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let text = status.message();
    assert!(
        text.contains(&format!("memory budget of {budget} exhausted"))
            && text.contains("--memory-budget"),
        "{status:?}"
    );
}

async fn charged(server: &TestServer) -> u64 {
    let request = pb::GetServerInfoRequest {};
    let info = server
        .server_info()
        .await
        .get_server_info(request)
        .await
        .unwrap();
    info.into_inner().limits.unwrap().memory_charged_bytes
}

/// Waits (at most 10 s) until the bytes charged satisfy `done`.
async fn charged_until(server: &TestServer, done: impl Fn(u64) -> bool) -> u64 {
    let start = Instant::now();
    loop {
        let now = charged(server).await;
        if done(now) || start.elapsed() > Duration::from_secs(10) {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_flood_of_large_sessions_is_refused_once_the_budget_is_full_and_deleting_gives_room_back()
{
    let server = TestServer::start_with(|c| c.memory_budget = Some(32 * MIB)).await;
    let mut client = server.batch_norm().await;
    let info = server
        .server_info()
        .await
        .get_server_info(pb::GetServerInfoRequest {})
        .await;
    assert_eq!(
        info.unwrap()
            .into_inner()
            .limits
            .unwrap()
            .memory_budget_bytes,
        32 * MIB
    );

    let per_session = 65_536 * 8 * 4 + OVERHEAD;
    let fits = 32 * MIB / per_session;
    let mut accepted = Vec::new();
    for i in 0..200 {
        let id = format!("big-{i}");
        match client.create_session(big_session(&id, 65_536)).await {
            Ok(_) => accepted.push(id),
            Err(status) => assert_names_the_budget(&status, "32 MiB"),
        }
    }
    assert_eq!(accepted.len() as u64, fits);
    assert!(charged(&server).await >= fits * per_session);

    // The sessions held are still served (a 512 KiB eval Forward fits in
    // what the sessions leave).
    let input = crate::support::tensors::f64_raw(&[1, 65_536], &vec![2.0; 65_536]);
    let reply = client
        .forward(crate::support::requests::eval(&accepted[0], input))
        .await
        .unwrap()
        .into_inner();
    // Fresh running statistics (mean 0, var 1): eval leaves 2.0 at 2/sqrt(1+eps).
    let expected = 2.0 / (1.0f64 + 1e-5).sqrt();
    assert!(values(&reply.output.unwrap())
        .iter()
        .all(|v| (v - expected).abs() < 1e-12));

    for id in &accepted[..2] {
        let request = pb::DeleteSessionRequest {
            session_id: id.clone(),
            expected_version: None,
        };
        client.delete_session(request).await.unwrap();
    }
    create(&mut client, big_session("again-1", 65_536)).await;
    create(&mut client, big_session("again-2", 65_536)).await;
    let refused = client.create_session(big_session("again-3", 65_536)).await;
    assert_names_the_budget(&refused.unwrap_err(), "32 MiB");
}

/// A request body that sends `first` and then stays open, sending nothing
/// more, until its `release` sender is dropped (then it ends).
struct HeldBody {
    first: Option<Bytes>,
    release: oneshot::Receiver<()>,
}

impl http_body::Body for HeldBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        match Pin::new(&mut self.release).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(None),
        }
    }
}

use std::future::Future;

/// A Forward whose message announces `length` bytes but sends only the first
/// KiB of them, held open; the call's status once it ends, and the sender
/// whose drop ends its body.
async fn held_forward(
    server: &TestServer,
    length: u32,
) -> (tokio::task::JoinHandle<tonic::Status>, oneshot::Sender<()>) {
    use tower::{Service, ServiceExt};
    let mut first = vec![0u8];
    first.extend_from_slice(&length.to_be_bytes());
    first.extend(std::iter::repeat_n(0u8, 1024));
    let (keep, release) = oneshot::channel();
    let body = HeldBody {
        first: Some(Bytes::from(first)),
        release,
    };
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/normserve.v1.BatchNormService/Forward",
            server.address
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(body))
        .unwrap();
    let mut bare = server.bare_http2().await;
    let call = tokio::spawn(async move {
        let response = bare.ready().await.unwrap().call(request).await.unwrap();
        if let Some(status) = tonic::Status::from_header_map(response.headers()) {
            return status;
        }
        let collected = http_body_util::BodyExt::collect(response.into_body()).await;
        let trailers = collected.unwrap().trailers().cloned().unwrap_or_default();
        tonic::Status::from_header_map(&trailers).unwrap()
    });
    (call, keep)
}

#[tokio::test]
async fn large_requests_in_flight_beyond_the_budget_are_refused_at_their_length_prefix_while_small_ones_pass(
) {
    let server = TestServer::start_with(|c| c.memory_budget = Some(48 * MIB)).await;
    let mut client = server.batch_norm().await;
    create(&mut client, named("s", bn1d(2))).await;
    let session = OVERHEAD + 2 * 4 * 4;

    // Two 20 MiB messages announced, 1 KiB of each sent: 40 MiB charged
    // before their bytes arrive.
    let message = 20 * MIB as u32;
    let (first, keep_first) = held_forward(&server, message).await;
    let (second, keep_second) = held_forward(&server, message).await;
    let held = 2 * (u64::from(message) + 5);
    let now = charged_until(&server, |bytes| bytes >= session + held).await;
    assert!(now >= session + held, "{now}");

    // A third does not fit beside them: refused from its prefix.
    let (third, _keep_third) = held_forward(&server, message).await;
    assert_names_the_budget(&third.await.unwrap(), "48 MiB");
    // Nor does a complete 12 MiB Forward (1.5 Mi rows of 2 float32).
    let large = client.forward(train("s", batch(1_572_864, 2))).await;
    assert_names_the_budget(&large.unwrap_err(), "48 MiB");
    // A small Forward is served, and applied once.
    let reply = client.forward(train("s", batch(8, 2))).await.unwrap();
    assert_eq!(reply.into_inner().num_batches_tracked, 1);

    // The held calls end (their bodies end inside the message): their
    // bytes come back, and the large Forward fits now.
    drop((keep_first, keep_second));
    for call in [first, second] {
        assert_eq!(call.await.unwrap().code(), Code::InvalidArgument);
    }
    let now = charged_until(&server, |bytes| bytes < session + 64 * 1024).await;
    assert!(now < session + 64 * 1024, "{now}");
    let reply = client
        .forward(train("s", batch(1_572_864, 2)))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().num_batches_tracked, 2);
}

fn with_id(request_id: &str, request: pb::ForwardRequest) -> pb::ForwardRequest {
    pb::ForwardRequest {
        request_id: request_id.to_owned(),
        ..request
    }
}

#[tokio::test]
async fn replay_caches_are_charged_to_the_budget_and_what_does_not_fit_is_not_held() {
    // 512 KiB outputs: 65536 rows of 2 float32.
    let input = || batch(65_536, 2);
    let output_bytes = 65_536 * 2 * 4;
    let session = OVERHEAD + 2 * 4 * 4;

    // Room for the output: it is held, charged as replay caches, and a retry
    // answers with it.
    let roomy = TestServer::start_with_metrics(|c| c.memory_budget = Some(4 * MIB)).await;
    let mut client = roomy.batch_norm().await;
    create(&mut client, named("r", bn1d(2))).await;
    let first = client.forward(with_id("step-1", train("r", input()))).await;
    let first = first.unwrap().into_inner();
    let text = scrape(&roomy).await;
    let kind = |k: &str| {
        sample(
            &text,
            &format!("normserve_memory_charged_bytes{{kind=\"{k}\"}}"),
        )
    };
    assert_eq!(kind("replay_caches"), Some(output_bytes as f64));
    assert_eq!(kind("sessions"), Some(session as f64));
    assert_eq!(
        sample(&text, "normserve_memory_budget_bytes"),
        Some((4 * MIB) as f64)
    );
    let retry = client.forward(with_id("step-1", train("r", input()))).await;
    let retry = retry.unwrap().into_inner();
    assert!(retry.replayed);
    assert_eq!(retry.num_batches_tracked, 1);
    assert_eq!(retry.output, first.output);
    // Deleting the session gives its replay log back.
    let request = pb::DeleteSessionRequest {
        session_id: "r".into(),
        expected_version: None,
    };
    client.delete_session(request).await.unwrap();
    let text = scrape(&roomy).await;
    let kind = |k: &str| {
        sample(
            &text,
            &format!("normserve_memory_charged_bytes{{kind=\"{k}\"}}"),
        )
    };
    assert_eq!(kind("replay_caches"), Some(0.0));
    assert_eq!(kind("sessions"), Some(0.0));

    // 1400 KiB: the request and its output (512 KiB each, the output charged
    // while it is computed) fit beside the session, the output held for
    // replays beside them does not. The step is applied; its retry is a
    // replay without the output, never a second step.
    let tight = TestServer::start_with(|c| c.memory_budget = Some(1400 * 1024)).await;
    let mut client = tight.batch_norm().await;
    create(&mut client, named("r", bn1d(2))).await;
    let first = client.forward(with_id("step-1", train("r", input()))).await;
    assert!(first.unwrap().into_inner().output.is_some());
    let retry = client.forward(with_id("step-1", train("r", input()))).await;
    let retry = retry.unwrap().into_inner();
    assert!(retry.replayed && retry.output.is_none(), "{retry:?}");
    assert_eq!(retry.num_batches_tracked, 1);
    check_status(
        &client
            .create_session(big_session("big", 65_536))
            .await
            .unwrap_err(),
        Code::ResourceExhausted,
        "memory budget of 1.4 MiB exhausted",
    );
}
