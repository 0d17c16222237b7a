//! Forward's input checks with PyTorch's texts (rank, channels, one value
//! per channel in train mode) and its dtype rules.

use normserve::proto::v1 as pb;
use tonic::Code;

use crate::server::TestServer;
use crate::support::requests::{bn1d, bn2d, create, eval, expect_status, forward, get, train, EPS};
use crate::support::state::fingerprint;
use crate::support::tensors::{assert_close, batch, f16_raw, f32_raw, f64_raw, typed_f32, values};

#[tokio::test]
async fn wrong_rank_fails_with_pytorch_text() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let bn2 = create(&mut client, bn2d(3)).await.session_id;
    let bn1 = create(&mut client, bn1d(3)).await.session_id;
    let input_3d = f32_raw(&[2, 3, 2], &[0.5; 12]);
    let input_4d = f32_raw(&[2, 3, 1, 1], &[0.5; 6]);
    let cases = [
        (&bn2, input_3d.clone(), "expected 4D input (got 3D input)"),
        (&bn1, input_4d, "expected 2D or 3D input (got 4D input)"),
        (
            &bn1,
            f32_raw(&[3], &[0.5; 3]),
            "expected 2D or 3D input (got 1D input)",
        ),
    ];
    for (id, input, text) in cases {
        for mode in [pb::Mode::Train, pb::Mode::Eval] {
            expect_status(
                client.forward(forward(id, input.clone(), mode)).await,
                Code::InvalidArgument,
                text,
            );
        }
    }
    assert_eq!(get(&mut client, &bn2).await.version, 1);
}

#[tokio::test]
async fn channel_mismatch_fails_with_pytorch_text() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(5)).await.session_id;
    for mode in [pb::Mode::Train, pb::Mode::Eval] {
        expect_status(
            client.forward(forward(&id, batch(4, 3), mode)).await,
            Code::InvalidArgument,
            "running_mean should contain 3 elements not 5",
        );
    }
    let session = get(&mut client, &id).await;
    assert_eq!((session.version, session.num_batches_tracked), (1, 0));
}

#[tokio::test]
async fn one_value_per_channel_in_train_mode_is_refused_without_counting_it() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(5)).await.session_id;
    let before = get(&mut client, &id).await;

    expect_status(
        client.forward(train(&id, batch(1, 5))).await,
        Code::InvalidArgument,
        "Expected more than 1 value per channel when training, got input size torch.Size([1, 5])",
    );
    // PyTorch increments num_batches_tracked before this check; normserve
    // refuses the whole request instead.
    let after = get(&mut client, &id).await;
    assert_eq!(fingerprint(&after), fingerprint(&before));
    assert_eq!((after.version, after.num_batches_tracked), (1, 0));

    // Eval mode normalizes with the running statistics: one row is fine.
    client.forward(eval(&id, batch(1, 5))).await.unwrap();
}

#[tokio::test]
async fn mixed_input_dtypes_follow_pytorch_cpu_rules() {
    let server = TestServer::start_on_cpu().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(1)).await.session_id;

    // float16 into a float32 layer: accepted, answered in float16.
    let reply = client
        .forward(train(&id, f16_raw(&[2, 1], &[1.0, 3.0])))
        .await
        .unwrap()
        .into_inner();
    let output = reply.output.unwrap();
    assert_eq!(output.dtype, pb::DataType::Float16 as i32);
    assert_eq!(output.shape, [2, 1]);
    let Some(pb::tensor::Values::Raw(bytes)) = &output.values else {
        panic!("raw in, raw out: {output:?}");
    };
    assert_eq!(bytes.len(), 2 * 2);
    assert_close(&values(&output), &[-1.0, 1.0], 1e-3);

    let before = get(&mut client, &id).await;
    expect_status(
        client
            .forward(train(&id, f64_raw(&[2, 1], &[1.0, 3.0])))
            .await,
        Code::InvalidArgument,
        "mixed dtype (CPU): all inputs must share same datatype.",
    );
    assert_eq!(
        fingerprint(&get(&mut client, &id).await),
        fingerprint(&before)
    );
}

#[tokio::test]
async fn typed_float_values_in_give_typed_float_values_out() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(1)).await.session_id;
    let output = client
        .forward(train(&id, typed_f32(&[2, 1], &[1.0, 3.0])))
        .await
        .unwrap()
        .into_inner()
        .output
        .unwrap();
    assert!(
        matches!(output.values, Some(pb::tensor::Values::FloatValues(_))),
        "{output:?}"
    );
    assert_eq!(output.shape, [2, 1]);
    let expected = 1.0 / (1.0 + EPS).sqrt();
    assert_close(&values(&output), &[-expected, expected], 1e-6);
}
