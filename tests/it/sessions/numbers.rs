//! Forward's numbers against values derived by hand: train and eval, 1d and
//! 2d, empty batches, non-finite inputs.

use normserve::proto::v1 as pb;
use tonic::Code;

use crate::server::TestServer;
use crate::support::requests::{bn1d, bn2d, create, eval, expect_status, forward, get, train, EPS};
use crate::support::tensors::{assert_close, f32_raw, values};

/// BatchNorm1d(1), train on [[1], [3]]: batch mean 2, biased variance 1,
/// unbiased variance 2. Output (x - 2) / sqrt(1 + eps); running_mean
/// 0.9 * 0 + 0.1 * 2 = 0.2; running_var 0.9 * 1 + 0.1 * 2 = 1.1.
#[tokio::test]
async fn train_normalizes_with_batch_stats_and_updates_running_stats() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(1)).await.session_id;
    let reply = client
        .forward(train(&id, f32_raw(&[2, 1], &[1.0, 3.0])))
        .await
        .unwrap()
        .into_inner();
    let expected = 1.0 / (1.0 + EPS).sqrt();
    assert_close(
        &values(reply.output.as_ref().unwrap()),
        &[-expected, expected],
        1e-6,
    );
    assert_eq!((reply.version, reply.num_batches_tracked), (2, 1));
    assert!(!reply.replayed);

    let session = get(&mut client, &id).await;
    assert_eq!((session.version, session.num_batches_tracked), (2, 1));
    assert_close(
        &values(session.running_mean.as_ref().unwrap()),
        &[0.2],
        1e-6,
    );
    assert_close(&values(session.running_var.as_ref().unwrap()), &[1.1], 1e-6);
    // Weight and bias are parameters, not statistics: unchanged.
    assert_eq!(values(session.weight.as_ref().unwrap()), [1.0]);
    assert_eq!(values(session.bias.as_ref().unwrap()), [0.0]);
}

/// After the step above, eval normalizes with running_mean 0.2 and
/// running_var 1.1: 1.2 -> 1 / sqrt(1.1 + eps), 0.2 -> 0.
#[tokio::test]
async fn eval_uses_running_stats_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(1)).await.session_id;
    client
        .forward(train(&id, f32_raw(&[2, 1], &[1.0, 3.0])))
        .await
        .unwrap();
    let reply = client
        .forward(eval(&id, f32_raw(&[2, 1], &[1.2, 0.2])))
        .await
        .unwrap()
        .into_inner();
    let expected = 1.0 / (1.1 + EPS).sqrt();
    assert_close(
        &values(reply.output.as_ref().unwrap()),
        &[expected, 0.0],
        1e-6,
    );
    assert_eq!((reply.version, reply.num_batches_tracked), (2, 1));
    assert_eq!(get(&mut client, &id).await.version, 2);
}

/// BatchNorm2d(2) with weight (2, 3) and bias (1, -1), N=1, H=1, W=2:
/// channel 0 holds {0, 4} (mean 2, biased variance 4, unbiased 8) and
/// channel 1 {5, 7} (mean 6, biased variance 1, unbiased 2). Output:
/// 2 * (x - 2) / sqrt(4 + eps) + 1 and 3 * (x - 6) / sqrt(1 + eps) - 1.
#[tokio::test]
async fn batch_norm_2d_normalizes_each_channel_over_batch_and_space() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let request = pb::CreateSessionRequest {
        weight: Some(f32_raw(&[2], &[2.0, 3.0])),
        bias: Some(f32_raw(&[2], &[1.0, -1.0])),
        ..bn2d(2)
    };
    let id = create(&mut client, request).await.session_id;
    let input = f32_raw(&[1, 2, 1, 2], &[0.0, 4.0, 5.0, 7.0]);
    let output = client
        .forward(train(&id, input))
        .await
        .unwrap()
        .into_inner()
        .output
        .unwrap();
    assert_eq!(output.shape, [1, 2, 1, 2]);
    let scaled_0 = 2.0 * 2.0 / (4.0 + EPS).sqrt();
    let scaled_1 = 3.0 / (1.0 + EPS).sqrt();
    assert_close(
        &values(&output),
        &[
            1.0 - scaled_0,
            1.0 + scaled_0,
            -1.0 - scaled_1,
            -1.0 + scaled_1,
        ],
        1e-5,
    );
    // running_mean = 0.1 * mean, running_var = 0.9 + 0.1 * unbiased variance.
    let session = get(&mut client, &id).await;
    assert_close(
        &values(session.running_mean.as_ref().unwrap()),
        &[0.2, 0.6],
        1e-6,
    );
    assert_close(
        &values(session.running_var.as_ref().unwrap()),
        &[1.7, 1.1],
        1e-6,
    );
}

#[tokio::test]
async fn empty_batch_in_train_mode_returns_empty_output_and_counts_the_batch() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(3)).await.session_id;
    let reply = client
        .forward(train(&id, f32_raw(&[0, 3], &[])))
        .await
        .unwrap()
        .into_inner();
    let output = reply.output.unwrap();
    assert_eq!(output.shape, [0, 3]);
    assert!(values(&output).is_empty());
    assert_eq!((reply.version, reply.num_batches_tracked), (2, 1));

    let session = get(&mut client, &id).await;
    assert_eq!(session.num_batches_tracked, 1);
    assert_eq!(values(session.running_mean.as_ref().unwrap()), [0.0; 3]);
    assert_eq!(values(session.running_var.as_ref().unwrap()), [1.0; 3]);
}

#[tokio::test]
async fn reject_non_finite_sessions_refuse_nan_and_inf_and_change_nothing() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let request = pb::CreateSessionRequest {
        reject_non_finite: true,
        ..bn1d(2)
    };
    let id = create(&mut client, request).await.session_id;
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let input = f32_raw(&[2, 2], &[1.0, bad, 3.0, 4.0]);
        for mode in [pb::Mode::Train, pb::Mode::Eval] {
            expect_status(
                client.forward(forward(&id, input.clone(), mode)).await,
                Code::InvalidArgument,
                "NaN",
            );
        }
    }
    let session = get(&mut client, &id).await;
    assert_eq!((session.version, session.num_batches_tracked), (1, 0));
    assert_eq!(values(session.running_mean.as_ref().unwrap()), [0.0; 2]);

    // Without the option NaN propagates, as in PyTorch.
    let lenient = create(&mut client, bn1d(2)).await.session_id;
    let output = client
        .forward(train(
            &lenient,
            f32_raw(&[2, 2], &[1.0, f32::NAN, 3.0, 4.0]),
        ))
        .await
        .unwrap()
        .into_inner()
        .output
        .unwrap();
    assert!(values(&output)[1].is_nan());
}

/// A 4 MiB input arrives in several HTTP/2 frames (the server accepts
/// frames of at most 1 MiB) and its reply leaves as a chunk of its own:
/// BatchNorm1d(1) on alternating 1 and 3 (mean 2, biased variance 1) is
/// -+1 / sqrt(1 + eps), whatever the session name's length does to the
/// tensor bytes' alignment in the message.
#[tokio::test]
async fn large_inputs_split_across_frames_normalize_exactly() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let rows = 1usize << 20;
    let input: Vec<f32> = (0..rows)
        .map(|i| if i % 2 == 0 { 1.0 } else { 3.0 })
        .collect();
    let expected = 1.0 / (1.0 + EPS).sqrt();
    for name in ["a", "ab", "abc", "abcd"] {
        let id = create(&mut client, crate::support::requests::named(name, bn1d(1)))
            .await
            .session_id;
        let reply = client
            .forward(train(&id, f32_raw(&[rows as i64, 1], &input)))
            .await
            .unwrap()
            .into_inner();
        let output = values(reply.output.as_ref().unwrap());
        assert_eq!(output.len(), rows);
        for (i, value) in output.iter().enumerate() {
            let want = if i % 2 == 0 { -expected } else { expected };
            assert!(
                (value - want).abs() < 1e-6,
                "{name}: [{i}] {value} != {want}"
            );
        }
        assert_eq!((reply.version, reply.num_batches_tracked), (2, 1));
    }
}
