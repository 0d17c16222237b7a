//! ReduceStatisticsStream: the unary ReduceStatistics' rules (barrier,
//! replay, order, atomic failure, limits) on one stream per rank, answers in
//! order with errors in band, and a stream that ends while waiting counting
//! as missing. Expected statistics are derived by hand from the ranks'
//! (count, mean, M2).

use std::time::Duration;

use normserve::proto::v1 as pb;
use pb::reduce_statistics_stream_response::Result as Reply;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

use normserve::proto::v1::batch_norm_service_client::BatchNormServiceClient;

use crate::server::{BareHttp2, BatchNorm, TestServer};
use crate::support::requests::{bn1d, check_status, create, get};

/// Rank `rank`'s FORWARD reduction of `step` of two channels.
fn reduce(
    id: &str,
    step: u64,
    world_size: u32,
    rank: u32,
    count: i64,
    mean: [f64; 2],
    m2: [f64; 2],
) -> pb::ReduceStatisticsRequest {
    pb::ReduceStatisticsRequest {
        session_id: id.to_owned(),
        step: Some(pb::StepSpec {
            step,
            world_size,
            rank,
        }),
        phase: pb::ReducePhase::Forward as i32,
        count,
        mean: mean.to_vec(),
        m2: m2.to_vec(),
        update_running_stats: true,
        ..Default::default()
    }
}

/// The two ranks of the hand-computed step: rank 0 holds (count 2, mean
/// [1, 2], M2 [2, 8]), rank 1 (count 2, mean [3, 2], M2 [2, 0]). Global:
/// count 4, mean [2, 2], M2 = 2 + 2 + (3 - 1)² · 2 · 2 / 4 = 8 and 8 + 0 + 0
/// = 8, so var = 8 / 4 = 2 and unbiased var = 8 / 3 per channel.
fn rank0(id: &str, step: u64) -> pb::ReduceStatisticsRequest {
    reduce(id, step, 2, 0, 2, [1.0, 2.0], [2.0, 8.0])
}

fn rank1(id: &str, step: u64) -> pb::ReduceStatisticsRequest {
    reduce(id, step, 2, 1, 2, [3.0, 2.0], [2.0, 0.0])
}

#[track_caller]
fn assert_global(statistics: &pb::StepStatistics, step: u64) {
    assert_eq!(statistics.step, step);
    assert_eq!(statistics.count, 4);
    assert_eq!(statistics.mean, vec![2.0, 2.0]);
    assert_eq!(statistics.var, vec![2.0, 2.0]);
    for v in &statistics.unbiased_var {
        assert!((v - 8.0 / 3.0).abs() < 1e-12, "{v}");
    }
}

/// A stream of rank messages: what is sent, what comes back.
struct RankStream {
    sender: mpsc::Sender<pb::ReduceStatisticsRequest>,
    replies: Streaming<pb::ReduceStatisticsStreamResponse>,
}

impl RankStream {
    async fn open(client: &mut BatchNorm) -> RankStream {
        let (sender, receiver) = mpsc::channel(16);
        let replies = client
            .reduce_statistics_stream(ReceiverStream::new(receiver))
            .await
            .unwrap()
            .into_inner();
        RankStream { sender, replies }
    }

    async fn send(&self, request: pb::ReduceStatisticsRequest) {
        self.sender.send(request).await.unwrap();
    }

    async fn next(&mut self) -> pb::ReduceStatisticsStreamResponse {
        self.replies.message().await.unwrap().unwrap()
    }
}

#[track_caller]
fn response(reply: &pb::ReduceStatisticsStreamResponse) -> &pb::ReduceStatisticsResponse {
    match &reply.result {
        Some(Reply::Response(response)) => response,
        other => panic!("expected a response, got {other:?}"),
    }
}

#[track_caller]
fn error(reply: &pb::ReduceStatisticsStreamResponse, code: Code, text: &str) {
    match &reply.result {
        Some(Reply::Error(error)) => {
            assert_eq!(error.code, code as i32, "{error:?}");
            assert!(error.message.contains(text), "{text:?} in {error:?}");
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn stream_ranks_meet_unary_ranks_and_answers_come_in_order_with_errors_in_band() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;
    let version_before = get(&mut client, &id).await.version;

    // Rank 0 streams steps 1 to 3 at once, with an invalid message (three
    // channels) between steps 1 and 2; rank 1 calls the unary RPC per step.
    let mut stream = RankStream::open(&mut client).await;
    stream.send(rank0(&id, 1)).await;
    stream
        .send(reduce(&id, 2, 2, 0, 2, [1.0, 2.0], [2.0, 8.0]))
        .await;
    let mut invalid = rank0(&id, 5);
    invalid.mean.push(0.0);
    invalid.m2.push(0.0);
    stream.send(invalid).await;
    stream.send(rank0(&id, 3)).await;
    let mut unary = server.batch_norm().await;
    let mut versions = Vec::new();
    for step in 1..=3 {
        let answer = unary.reduce_statistics(rank1(&id, step)).await.unwrap();
        let answer = answer.into_inner();
        assert_global(answer.statistics.as_ref().unwrap(), step);
        versions.push(answer.version);
    }

    let mut received = Vec::new();
    for _ in 0..4 {
        received.push(stream.next().await);
    }
    for (index, reply) in received.iter().enumerate() {
        assert_eq!(reply.index, index as u64);
    }
    let steps: Vec<u64> = [0, 1, 3]
        .iter()
        .map(|&i| {
            let answered = response(&received[i]);
            assert!(!answered.replayed);
            answered.statistics.as_ref().unwrap().step
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3]);
    for (i, &place) in [0usize, 1, 3].iter().enumerate() {
        let answered = response(&received[place]);
        assert_global(answered.statistics.as_ref().unwrap(), i as u64 + 1);
        assert_eq!(answered.version, versions[i]);
        assert_eq!(answered.num_batches_tracked, i as i64 + 1);
    }
    error(
        &received[2],
        Code::InvalidArgument,
        "expected num_features = 2 values, got 3",
    );
    // Three steps, each applied once: version + 3, running statistics
    // updated three times with mean 2 and unbiased var 8/3 (momentum 0.1).
    let session = get(&mut client, &id).await;
    assert_eq!(session.version, version_before + 3);
    assert_eq!(
        versions,
        vec![version_before + 1, version_before + 2, version_before + 3]
    );
    drop(stream.sender);
    assert!(stream.replies.message().await.unwrap().is_none());
}

#[tokio::test]
async fn stream_replays_an_applied_step_and_refuses_an_older_one() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;
    let mut stream = RankStream::open(&mut client).await;
    stream.send(rank0(&id, 7)).await;
    let mut unary = server.batch_norm().await;
    unary.reduce_statistics(rank1(&id, 7)).await.unwrap();
    let first = stream.next().await;
    let version = response(&first).version;

    // The same rank and step again: the applied step's answer, not a second update.
    stream.send(rank0(&id, 7)).await;
    let again = stream.next().await;
    let replayed = response(&again);
    assert!(replayed.replayed);
    assert_eq!(replayed.version, version);
    assert_global(replayed.statistics.as_ref().unwrap(), 7);
    // A step below the last applied one that is not among the applied ones.
    stream.send(rank0(&id, 3)).await;
    error(
        &stream.next().await,
        Code::FailedPrecondition,
        "is not after the last applied step 7",
    );
    assert_eq!(get(&mut client, &id).await.version, version);
}

#[tokio::test]
async fn a_missing_rank_aborts_the_streamed_step_and_the_stream_goes_on() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let request = pb::CreateSessionRequest {
        step_timeout_seconds: Some(0.3),
        ..bn1d(2)
    };
    let id = create(&mut client, request).await.session_id;
    let version = get(&mut client, &id).await.version;
    let mut stream = RankStream::open(&mut client).await;
    stream.send(rank0(&id, 1)).await;
    error(&stream.next().await, Code::Aborted, "waiting for rank 1");
    assert_eq!(get(&mut client, &id).await.version, version);

    // The retry on the same stream completes once rank 1 comes.
    stream.send(rank0(&id, 1)).await;
    let mut unary = server.batch_norm().await;
    let answer = unary.reduce_statistics(rank1(&id, 1)).await.unwrap();
    assert_global(answer.into_inner().statistics.as_ref().unwrap(), 1);
    assert_global(
        response(&stream.next().await).statistics.as_ref().unwrap(),
        1,
    );
    assert_eq!(get(&mut client, &id).await.version, version + 1);
}

/// Rank 1 of a three-rank step 1 waits for at most 300 ms (its own
/// deadline), and the server's answer names the ranks still missing.
async fn missing_at_rank1(client: &mut BatchNormServiceClient<BareHttp2>, id: &str) -> String {
    let mut request = tonic::Request::new(reduce(id, 1, 3, 1, 2, [3.0, 2.0], [2.0, 0.0]));
    request.set_timeout(Duration::from_millis(300));
    let status = client.reduce_statistics(request).await.unwrap_err();
    check_status(&status, Code::Aborted, "waited for");
    status.message().to_owned()
}

#[tokio::test]
async fn a_stream_that_ends_while_waiting_withdraws_its_rank() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;
    let version = get(&mut client, &id).await.version;
    let stream = RankStream::open(&mut client).await;
    stream
        .send(reduce(&id, 1, 3, 0, 2, [1.0, 2.0], [2.0, 8.0]))
        .await;
    let mut unary = server.batch_norm_without_client_deadlines().await;
    // Rank 0 is in the step once rank 1 hears only rank 2 is missing.
    let mut attempts = 0;
    while !missing_at_rank1(&mut unary, &id)
        .await
        .contains("waited for rank 2;")
    {
        attempts += 1;
        assert!(attempts < 100, "rank 0's message never arrived");
    }
    // The client goes away: its waiting message counts as missing again.
    drop(stream);
    let mut attempts = 0;
    while !missing_at_rank1(&mut unary, &id)
        .await
        .contains("waited for ranks 0, 2;")
    {
        attempts += 1;
        assert!(attempts < 100, "rank 0 never withdrew");
    }
    assert_eq!(get(&mut client, &id).await.version, version);
}

#[tokio::test]
async fn a_streamed_waiting_message_counts_against_the_open_step_limit() {
    let server = TestServer::start_with(|config| config.max_open_steps = 1).await;
    let mut client = server.batch_norm().await;
    let a = create(&mut client, bn1d(2)).await.session_id;
    let b = create(&mut client, bn1d(2)).await.session_id;
    let mut stream = RankStream::open(&mut client).await;
    stream.send(rank0(&a, 1)).await;
    // Session b's step 1 (two ranks, rank 0 alone, 300 ms at most) is
    // refused once the stream's message holds the one open step.
    let mut unary = server.batch_norm_without_client_deadlines().await;
    let mut attempts = 0;
    let refused = loop {
        let mut request = tonic::Request::new(rank0(&b, 1));
        request.set_timeout(Duration::from_millis(300));
        let status = unary.reduce_statistics(request).await.unwrap_err();
        if status.code() == Code::ResourceExhausted {
            break status;
        }
        check_status(&status, Code::Aborted, "waited for rank 1");
        attempts += 1;
        assert!(attempts < 100, "the stream's message never held its step");
    };
    check_status(&refused, Code::ResourceExhausted, "--max-open-steps");
    // The stream's step completes; then b's step has room.
    unary.reduce_statistics(rank1(&a, 1)).await.unwrap();
    assert_global(
        response(&stream.next().await).statistics.as_ref().unwrap(),
        1,
    );
    stream.send(rank0(&b, 1)).await;
    unary.reduce_statistics(rank1(&b, 1)).await.unwrap();
    assert_global(
        response(&stream.next().await).statistics.as_ref().unwrap(),
        1,
    );
}
