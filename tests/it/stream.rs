//! ForwardStream: one reply per request, in order, errors in band.

use normserve::proto::v1 as pb;
use pb::forward_stream_response::Result as Reply;
use tonic::Code;

use crate::server::TestServer;
use crate::support::requests::{bn1d, bn2d, check_status, create, get, train};
use crate::support::tensors::{batch, f32_raw};

/// What one request of the stream should get back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Output,
    Error(Code),
}

#[tokio::test]
async fn stream_answers_each_request_in_order_with_errors_in_band() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let a = create(&mut client, bn1d(3)).await.session_id;
    let b = create(&mut client, bn2d(2)).await.session_id;
    let input_b = || f32_raw(&[2, 2, 1, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);

    let mut requests = Vec::new();
    let mut expected = Vec::new();
    for i in 0..20 {
        let (request, expect) = match i % 5 {
            0 => (train("ghost", batch(4, 3)), Expect::Error(Code::NotFound)),
            3 => (
                train(&a, f32_raw(&[2, 3, 1, 1], &[0.0; 6])),
                Expect::Error(Code::InvalidArgument),
            ),
            _ if i % 2 == 0 => (train(&a, batch(4, 3)), Expect::Output),
            _ => (train(&b, input_b()), Expect::Output),
        };
        requests.push(request);
        expected.push(expect);
    }
    let sent_to = |id: &str| {
        requests
            .iter()
            .zip(&expected)
            .filter(|(r, e)| r.session_id == id && **e == Expect::Output)
            .count() as i64
    };
    let (count_a, count_b) = (sent_to(&a), sent_to(&b));
    assert!(count_a > 0 && count_b > 0);

    let mut replies = client
        .forward_stream(tokio_stream::iter(requests.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut received = Vec::new();
    while let Some(reply) = replies.message().await.unwrap() {
        received.push(reply);
    }

    assert_eq!(received.len(), requests.len());
    for (i, (reply, expect)) in received.iter().zip(&expected).enumerate() {
        assert_eq!(reply.index, i as u64);
        match (&reply.result, expect) {
            (Some(Reply::Response(response)), Expect::Output) => {
                let input = requests[i].input.as_ref().unwrap();
                assert_eq!(response.output.as_ref().unwrap().shape, input.shape);
            }
            (Some(Reply::Error(error)), Expect::Error(code)) => {
                assert_eq!(error.code, *code as i32, "request {i}: {error:?}");
                assert!(!error.message.is_empty());
            }
            (other, expect) => panic!("request {i}: expected {expect:?}, got {other:?}"),
        }
    }
    // The codes are google.rpc.Code numbers.
    assert_eq!(Code::NotFound as i32, 5);
    assert_eq!(Code::InvalidArgument as i32, 3);

    // Each valid request was applied once, the invalid ones not at all.
    let session_a = get(&mut client, &a).await;
    let session_b = get(&mut client, &b).await;
    assert_eq!(session_a.num_batches_tracked, count_a);
    assert_eq!(session_a.version, 1 + count_a as u64);
    assert_eq!(session_b.num_batches_tracked, count_b);
    assert_eq!(session_b.version, 1 + count_b as u64);
}

#[tokio::test]
async fn stream_message_beyond_max_message_bytes_ends_the_stream_with_resource_exhausted() {
    let server = TestServer::start_with(|c| c.max_message_bytes = 64 * 1024).await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(4)).await.session_id;
    let requests = vec![train(&id, batch(8, 4)), train(&id, batch(4096, 4))];

    let mut replies = client
        .forward_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let first = replies.message().await.unwrap().unwrap();
    assert!(
        matches!(first.result, Some(Reply::Response(_))),
        "{first:?}"
    );
    let status = replies.message().await.unwrap_err();
    check_status(&status, Code::ResourceExhausted, "max_message_bytes");

    let session = get(&mut client, &id).await;
    assert_eq!(session.num_batches_tracked, 1);
}
