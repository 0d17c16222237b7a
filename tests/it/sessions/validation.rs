//! Requests refused before anything changes: invalid configurations, the
//! server's limits (sessions, tensor elements, message bytes) and malformed
//! tensors.

use std::collections::HashMap;

use normserve::proto::v1 as pb;
use tonic::Code;

use crate::server::TestServer;
use crate::support::requests::{bn1d, check_status, create, expect_status, get, named, train};
use crate::support::state::list_ids;
use crate::support::tensors::{batch, f32_raw, raw, typed_f32};

#[tokio::test]
async fn invalid_configurations_are_rejected_and_create_nothing() {
    let server = TestServer::start_with(|c| c.max_num_features = 16).await;
    let mut client = server.batch_norm().await;
    let with = |change: fn(&mut pb::CreateSessionRequest)| {
        let mut request = bn1d(3);
        change(&mut request);
        request
    };
    let (invalid, exhausted) = (Code::InvalidArgument, Code::ResourceExhausted);
    let cases = [
        (
            "eps 0",
            with(|r| r.eps = Some(0.0)),
            invalid,
            "batch_norm eps must be positive",
        ),
        (
            "eps < 0",
            with(|r| r.eps = Some(-1e-3)),
            invalid,
            "batch_norm eps must be positive",
        ),
        (
            "eps NaN",
            with(|r| r.eps = Some(f64::NAN)),
            invalid,
            "batch_norm eps must be positive",
        ),
        (
            "momentum NaN",
            with(|r| r.momentum = Some(f64::NAN)),
            invalid,
            "momentum",
        ),
        (
            "momentum Inf",
            with(|r| r.momentum = Some(f64::INFINITY)),
            invalid,
            "momentum",
        ),
        (
            "momentum and cumulative average",
            with(|r| {
                r.momentum = Some(0.1);
                r.cumulative_average = true;
            }),
            invalid,
            "momentum",
        ),
        ("kind unspecified", with(|r| r.kind = 0), invalid, "kind"),
        ("kind unknown", with(|r| r.kind = 42), invalid, "kind"),
        (
            "param_dtype unknown",
            with(|r| r.param_dtype = 42),
            invalid,
            "param_dtype",
        ),
        (
            "default_mode unknown",
            with(|r| r.default_mode = 9),
            invalid,
            "mode",
        ),
        (
            "num_features 0",
            with(|r| r.num_features = 0),
            invalid,
            "num_features",
        ),
        (
            "num_features < 0",
            with(|r| r.num_features = -3),
            invalid,
            "num_features",
        ),
        (
            "num_features > max",
            with(|r| r.num_features = 17),
            exhausted,
            "max_num_features",
        ),
        (
            "weight of the wrong shape",
            with(|r| r.weight = Some(f32_raw(&[2], &[1.0, 2.0]))),
            invalid,
            "size mismatch for weight",
        ),
        (
            "weight without affine",
            with(|r| {
                r.affine = Some(false);
                r.weight = Some(f32_raw(&[3], &[1.0; 3]));
            }),
            invalid,
            "weight",
        ),
        (
            "negative num_batches_tracked",
            with(|r| r.num_batches_tracked = Some(-1)),
            invalid,
            "num_batches_tracked",
        ),
        (
            "empty label key",
            with(|r| r.labels = HashMap::from([(String::new(), "v".to_owned())])),
            invalid,
            "labels",
        ),
        (
            "unknown device",
            with(|r| r.device = "tpu:0".into()),
            invalid,
            "device",
        ),
    ];
    for (case, request, code, text) in cases {
        let status = client.create_session(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{case}: {status:?}");
        assert!(status.message().contains(text), "{case}: {status:?}");
    }
    assert!(list_ids(&mut client).await.is_empty());

    // The limit itself is allowed.
    let widest = create(&mut client, bn1d(16)).await;
    assert_eq!(widest.config.unwrap().num_features, 16);
}

#[tokio::test]
async fn cuda_device_without_cuda_is_a_failed_precondition() {
    if tch::Cuda::is_available() {
        println!("skipped: CUDA is present, so cuda:0 is a valid device here");
        return;
    }
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    for device in ["cuda:0", "cuda"] {
        let request = pb::CreateSessionRequest {
            device: device.to_owned(),
            ..bn1d(3)
        };
        expect_status(
            client.create_session(request).await,
            Code::FailedPrecondition,
            "cuda:0",
        );
    }
    assert!(list_ids(&mut client).await.is_empty());
}

#[tokio::test]
async fn sessions_beyond_max_sessions_are_resource_exhausted() {
    let server = TestServer::start_with(|c| c.max_sessions = 3).await;
    let mut client = server.batch_norm().await;
    for i in 0..3 {
        create(&mut client, named(&format!("s{i}"), bn1d(2))).await;
    }
    expect_status(
        client.create_session(named("s3", bn1d(2))).await,
        Code::ResourceExhausted,
        "max_sessions",
    );
    expect_status(
        client.create_session(bn1d(2)).await,
        Code::ResourceExhausted,
        "max_sessions",
    );
    // Re-creating an existing session adds none, so it still works.
    let again = client
        .create_session(named("s1", bn1d(2)))
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_existed);
    // A deletion makes room again.
    client
        .delete_session(pb::DeleteSessionRequest {
            session_id: "s0".into(),
            expected_version: None,
        })
        .await
        .unwrap();
    create(&mut client, named("s3", bn1d(2))).await;
    assert_eq!(list_ids(&mut client).await, ["s1", "s2", "s3"]);
}

#[tokio::test]
async fn tensors_beyond_max_tensor_elements_are_resource_exhausted() {
    let server = TestServer::start_with(|c| c.max_tensor_elements = 64).await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(4)).await.session_id;

    // 64 elements is the limit itself.
    let at_limit = client.forward(train(&id, batch(16, 4))).await.unwrap();
    assert_eq!(at_limit.into_inner().output.unwrap().shape, [16, 4]);

    let over = [
        ("just over", batch(17, 4)),
        (
            "overflowing shape",
            raw(pb::DataType::Float32, &[i64::MAX, i64::MAX, 4], vec![]),
        ),
    ];
    for (case, input) in over {
        let status = client.forward(train(&id, input)).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{case}: {status:?}");
        assert!(
            status.message().contains("max_tensor_elements"),
            "{case}: {status:?}"
        );
    }
    let update = pb::UpdateParametersRequest {
        session_id: id.clone(),
        weight: Some(f32_raw(&[65], &[1.0; 65])),
        ..Default::default()
    };
    expect_status(
        client.update_parameters(update).await,
        Code::ResourceExhausted,
        "max_tensor_elements",
    );
    assert_eq!(get(&mut client, &id).await.version, 2);
}

#[tokio::test]
async fn messages_beyond_max_message_bytes_are_resource_exhausted() {
    let limit = 64 * 1024;
    let server = TestServer::start_with(|c| c.max_message_bytes = limit).await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(4)).await.session_id;

    // 4096 x 4 float32 values: 64 KiB of tensor bytes plus the envelope.
    let status = client
        .forward(train(&id, batch(4096, 4)))
        .await
        .unwrap_err();
    check_status(&status, Code::ResourceExhausted, "max_message_bytes");

    // Nothing was applied, and the server goes on serving.
    let session = get(&mut client, &id).await;
    assert_eq!((session.version, session.num_batches_tracked), (1, 0));
    client.forward(train(&id, batch(1024, 4))).await.unwrap();
}

#[tokio::test]
async fn malformed_tensors_are_invalid_arguments() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(3)).await.session_id;
    let cases = [
        (
            "raw length mismatch",
            raw(pb::DataType::Float32, &[2, 3], vec![0; 23]),
            "input.raw",
        ),
        (
            "negative dimension",
            raw(pb::DataType::Float32, &[-2, 3], vec![]),
            "input.shape",
        ),
        (
            "raw without dtype",
            raw(pb::DataType::Unspecified, &[2, 3], vec![0; 24]),
            "input.dtype",
        ),
        (
            "unknown dtype",
            pb::Tensor {
                dtype: 99,
                ..batch(2, 3)
            },
            "input.dtype",
        ),
        (
            "typed values of the wrong count",
            typed_f32(&[2, 3], &[1.0; 5]),
            "input.float_values",
        ),
        (
            "no values",
            pb::Tensor {
                values: None,
                ..batch(2, 3)
            },
            "input",
        ),
    ];
    for (case, input, text) in cases {
        let status = client.forward(train(&id, input)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
        assert!(status.message().contains(text), "{case}: {status:?}");
    }
    let missing_input = pb::ForwardRequest {
        session_id: id.clone(),
        ..Default::default()
    };
    expect_status(
        client.forward(missing_input).await,
        Code::InvalidArgument,
        "input",
    );
    let unknown_mode = pb::ForwardRequest {
        mode: 7,
        ..train(&id, batch(2, 3))
    };
    expect_status(
        client.forward(unknown_mode).await,
        Code::InvalidArgument,
        "mode",
    );
    let session = get(&mut client, &id).await;
    assert_eq!((session.version, session.num_batches_tracked), (1, 0));
}
