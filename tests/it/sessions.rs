//! Session lifecycle, validation and state semantics of BatchNormService.

use std::collections::HashMap;

use normserve::proto::v1 as pb;
use tonic::Code;

use crate::requests::{
    bn1d, bn2d, check_status, create, eval, expect_status, forward, get, named, train,
};
use crate::server::{BatchNorm, TestServer};
use crate::tensors::{assert_close, batch, f16_raw, f32_raw, f64_raw, raw, typed_f32, values};

const EPS: f64 = 1e-5;

fn ids(sessions: &[pb::Session]) -> Vec<String> {
    sessions.iter().map(|s| s.session_id.clone()).collect()
}

fn list_request(page_size: i32, page_token: &str) -> pb::ListSessionsRequest {
    pb::ListSessionsRequest {
        page_size,
        page_token: page_token.to_owned(),
        ..Default::default()
    }
}

async fn list_all(client: &mut BatchNorm) -> Vec<String> {
    let page = client
        .list_sessions(list_request(1000, ""))
        .await
        .unwrap()
        .into_inner();
    assert!(page.next_page_token.is_empty());
    ids(&page.sessions)
}

/// The state a refused request must leave untouched.
fn fingerprint(session: &pb::Session) -> (u64, i64, Vec<Vec<f64>>) {
    let tensors = [
        &session.weight,
        &session.bias,
        &session.running_mean,
        &session.running_var,
    ];
    (
        session.version,
        session.num_batches_tracked,
        tensors
            .iter()
            .map(|t| t.as_ref().map(values).unwrap_or_default())
            .collect(),
    )
}

// ---------------------------------------------------------------- lifecycle

#[tokio::test]
async fn create_without_an_id_generates_one_with_pytorch_defaults() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let first = create(&mut client, bn1d(3)).await;
    let second = create(&mut client, bn1d(3)).await;
    assert!(!first.session_id.is_empty());
    assert_ne!(first.session_id, second.session_id);

    assert_eq!(first.version, 1);
    assert_eq!(first.num_batches_tracked, 0);
    let config = first.config.clone().unwrap();
    assert_eq!(config.kind, pb::BatchNormKind::BatchNorm1d as i32);
    assert_eq!(config.num_features, 3);
    assert_eq!(config.eps, EPS);
    assert_eq!(config.momentum, Some(0.1));
    assert!(!config.cumulative_average);
    assert!(config.affine);
    assert!(config.track_running_stats);
    assert_eq!(config.param_dtype, pb::DataType::Float32 as i32);
    assert_eq!(config.default_mode, pb::Mode::Train as i32);
    assert_eq!(values(first.weight.as_ref().unwrap()), [1.0; 3]);
    assert_eq!(values(first.bias.as_ref().unwrap()), [0.0; 3]);
    assert_eq!(values(first.running_mean.as_ref().unwrap()), [0.0; 3]);
    assert_eq!(values(first.running_var.as_ref().unwrap()), [1.0; 3]);
    assert_eq!(first.weight.as_ref().unwrap().shape, [3]);

    let fetched = get(&mut client, &first.session_id).await;
    assert_eq!(fingerprint(&fetched), fingerprint(&first));
    assert_eq!(fetched.config, first.config);
}

#[tokio::test]
async fn client_chosen_id_is_idempotent_only_for_the_same_configuration() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let request = named("layer-1.a_B", bn1d(3));
    let created = create(&mut client, request.clone()).await;
    assert_eq!(created.session_id, "layer-1.a_B");
    client
        .forward(train("layer-1.a_B", batch(4, 3)))
        .await
        .unwrap();

    // The same configuration again: the existing session, as it is now.
    let again = client
        .create_session(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(again.already_existed);
    let session = again.session.unwrap();
    assert_eq!(session.session_id, "layer-1.a_B");
    assert_eq!(session.version, 2);
    assert_eq!(session.num_batches_tracked, 1);
    assert_eq!(session.created_at, created.created_at);

    let different = [
        ("num_features", named("layer-1.a_B", bn1d(4))),
        (
            "eps",
            pb::CreateSessionRequest {
                eps: Some(1e-3),
                ..request.clone()
            },
        ),
        (
            "kind",
            pb::CreateSessionRequest {
                kind: pb::BatchNormKind::BatchNorm2d as i32,
                ..request.clone()
            },
        ),
    ];
    for (field, request) in different {
        expect_status(
            client.create_session(request).await,
            Code::AlreadyExists,
            field,
        );
    }
    assert_eq!(list_all(&mut client).await, ["layer-1.a_B"]);
}

#[tokio::test]
async fn list_pages_through_every_session_once_in_id_order() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let mut created = Vec::new();
    for i in 0..10 {
        let team = if i % 2 == 0 { "a" } else { "b" };
        let request = pb::CreateSessionRequest {
            labels: HashMap::from([("team".to_owned(), team.to_owned())]),
            ..named(&format!("s{i:02}"), bn1d(2))
        };
        created.push(create(&mut client, request).await.session_id);
    }

    let mut seen = Vec::new();
    let mut page_sizes = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_sessions(list_request(3, &token))
            .await
            .unwrap()
            .into_inner();
        page_sizes.push(page.sessions.len());
        // Without include_tensors the pages carry no tensors.
        assert!(page.sessions.iter().all(|s| s.weight.is_none()));
        seen.extend(ids(&page.sessions));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(page_sizes, [3, 3, 3, 1]);
    assert_eq!(seen, created);

    let team_a = pb::ListSessionsRequest {
        label_selector: HashMap::from([("team".to_owned(), "a".to_owned())]),
        include_tensors: true,
        ..Default::default()
    };
    let page = client.list_sessions(team_a).await.unwrap().into_inner();
    assert_eq!(ids(&page.sessions), ["s00", "s02", "s04", "s06", "s08"]);
    assert!(page.sessions.iter().all(|s| s.weight.is_some()));

    let nobody = pb::ListSessionsRequest {
        label_selector: HashMap::from([
            ("team".to_owned(), "a".to_owned()),
            ("tier".to_owned(), "gold".to_owned()),
        ]),
        ..Default::default()
    };
    let page = client.list_sessions(nobody).await.unwrap().into_inner();
    assert!(page.sessions.is_empty());

    expect_status(
        client.list_sessions(list_request(-1, "")).await,
        Code::InvalidArgument,
        "page_size",
    );
    expect_status(
        client.list_sessions(list_request(3, "not/a/token")).await,
        Code::InvalidArgument,
        "page_token",
    );
}

#[tokio::test]
async fn deleted_session_is_not_found_afterwards() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;
    let delete = || pb::DeleteSessionRequest {
        session_id: id.clone(),
        expected_version: None,
    };
    client.delete_session(delete()).await.unwrap();

    let get = pb::GetSessionRequest {
        session_id: id.clone(),
    };
    expect_status(client.get_session(get).await, Code::NotFound, &id);
    expect_status(client.delete_session(delete()).await, Code::NotFound, &id);
    assert!(list_all(&mut client).await.is_empty());
}

#[tokio::test]
async fn unknown_session_is_not_found_on_every_rpc() {
    let server = TestServer::start().await;
    let mut c = server.batch_norm().await;
    let id = "no-such-session";
    let s = || id.to_owned();
    let outcomes = [
        (
            "GetSession",
            c.get_session(pb::GetSessionRequest { session_id: s() })
                .await
                .err(),
        ),
        (
            "DeleteSession",
            c.delete_session(pb::DeleteSessionRequest {
                session_id: s(),
                expected_version: None,
            })
            .await
            .err(),
        ),
        (
            "ResetRunningStats",
            c.reset_running_stats(pb::ResetRunningStatsRequest {
                session_id: s(),
                ..Default::default()
            })
            .await
            .err(),
        ),
        (
            "UpdateParameters",
            c.update_parameters(pb::UpdateParametersRequest {
                session_id: s(),
                eps: Some(1e-3),
                ..Default::default()
            })
            .await
            .err(),
        ),
        ("Forward", c.forward(train(id, batch(2, 3))).await.err()),
        (
            "ExportState",
            c.export_state(pb::ExportStateRequest { session_id: s() })
                .await
                .err(),
        ),
        (
            "ImportState",
            c.import_state(pb::ImportStateRequest {
                session_id: s(),
                ..Default::default()
            })
            .await
            .err(),
        ),
    ];
    for (rpc, status) in outcomes {
        let status = status.unwrap_or_else(|| panic!("{rpc} succeeded on an unknown session"));
        assert_eq!(status.code(), Code::NotFound, "{rpc}: {status:?}");
        assert!(status.message().contains(id), "{rpc}: {status:?}");
    }
}

#[tokio::test]
async fn malformed_session_ids_are_invalid_arguments() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let too_long = "x".repeat(129);
    for bad in ["a/b", "has space", "ünï", "semi;colon", too_long.as_str()] {
        expect_status(
            client.create_session(named(bad, bn1d(2))).await,
            Code::InvalidArgument,
            "session_id",
        );
        let get = pb::GetSessionRequest {
            session_id: bad.to_owned(),
        };
        expect_status(
            client.get_session(get).await,
            Code::InvalidArgument,
            "session_id",
        );
        expect_status(
            client.forward(train(bad, batch(2, 2))).await,
            Code::InvalidArgument,
            "session_id",
        );
    }
    // Empty means "generate one" only for CreateSession.
    let get = pb::GetSessionRequest::default();
    expect_status(
        client.get_session(get).await,
        Code::InvalidArgument,
        "session_id",
    );
    // 128 characters is the longest valid id.
    let longest = "y".repeat(128);
    create(&mut client, named(&longest, bn1d(2))).await;
    assert_eq!(list_all(&mut client).await, [longest]);
}

// --------------------------------------------------------------- validation

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
    assert!(list_all(&mut client).await.is_empty());

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
    assert!(list_all(&mut client).await.is_empty());
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
    assert_eq!(list_all(&mut client).await, ["s1", "s2", "s3"]);
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

// ------------------------------------------------- PyTorch's forward checks

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

// ------------------------------------------------------------------ numbers

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

// ------------------------------------------------- versions and idempotency

#[tokio::test]
async fn expected_version_mismatch_is_aborted_and_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;
    let before = get(&mut client, &id).await;

    let stale_forward = pb::ForwardRequest {
        expected_version: Some(7),
        ..train(&id, batch(2, 2))
    };
    expect_status(client.forward(stale_forward).await, Code::Aborted, "7");
    let stale_eval = pb::ForwardRequest {
        expected_version: Some(7),
        ..eval(&id, batch(2, 2))
    };
    expect_status(client.forward(stale_eval).await, Code::Aborted, "7");
    let stale_update = pb::UpdateParametersRequest {
        session_id: id.clone(),
        eps: Some(1e-3),
        expected_version: Some(0),
        ..Default::default()
    };
    expect_status(
        client.update_parameters(stale_update).await,
        Code::Aborted,
        "",
    );
    let stale_reset = pb::ResetRunningStatsRequest {
        session_id: id.clone(),
        expected_version: Some(2),
        ..Default::default()
    };
    expect_status(
        client.reset_running_stats(stale_reset).await,
        Code::Aborted,
        "",
    );
    let stale_delete = pb::DeleteSessionRequest {
        session_id: id.clone(),
        expected_version: Some(2),
    };
    expect_status(client.delete_session(stale_delete).await, Code::Aborted, "");

    let after = get(&mut client, &id).await;
    assert_eq!(fingerprint(&after), fingerprint(&before));
    assert_eq!(after.config, before.config);

    // The current version applies.
    let current = pb::ForwardRequest {
        expected_version: Some(1),
        ..train(&id, batch(2, 2))
    };
    assert_eq!(
        client.forward(current).await.unwrap().into_inner().version,
        2
    );
}

#[tokio::test]
async fn retried_request_id_is_replayed_and_counted_once() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(3)).await.session_id;
    let request = pb::ForwardRequest {
        request_id: "batch-17".into(),
        ..train(&id, batch(4, 3))
    };
    let first = client.forward(request.clone()).await.unwrap().into_inner();
    let retry = client.forward(request).await.unwrap().into_inner();
    assert!(!first.replayed);
    assert!(retry.replayed);
    assert_eq!(retry.output, first.output);
    assert_eq!((retry.version, retry.num_batches_tracked), (2, 1));

    let session = get(&mut client, &id).await;
    assert_eq!((session.version, session.num_batches_tracked), (2, 1));

    let reset = pb::ResetRunningStatsRequest {
        session_id: id.clone(),
        request_id: "reset-1".into(),
        ..Default::default()
    };
    let first = client
        .reset_running_stats(reset.clone())
        .await
        .unwrap()
        .into_inner();
    let retry = client
        .reset_running_stats(reset)
        .await
        .unwrap()
        .into_inner();
    assert!(!first.replayed && retry.replayed);
    assert_eq!(retry.session.unwrap().version, 3);
    assert_eq!(get(&mut client, &id).await.version, 3);
}

#[tokio::test]
async fn request_id_reused_by_a_different_call_is_already_exists() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(3)).await.session_id;
    let forward = pb::ForwardRequest {
        request_id: "r1".into(),
        ..train(&id, batch(4, 3))
    };
    client.forward(forward).await.unwrap();
    let before = get(&mut client, &id).await;

    let reset = pb::ResetRunningStatsRequest {
        session_id: id.clone(),
        request_id: "r1".into(),
        ..Default::default()
    };
    expect_status(
        client.reset_running_stats(reset).await,
        Code::AlreadyExists,
        "r1",
    );
    let update = pb::UpdateParametersRequest {
        session_id: id.clone(),
        eps: Some(1e-3),
        request_id: "r1".into(),
        ..Default::default()
    };
    expect_status(
        client.update_parameters(update.clone()).await,
        Code::AlreadyExists,
        "r1",
    );
    assert_eq!(
        fingerprint(&get(&mut client, &id).await),
        fingerprint(&before)
    );

    // And the other way round: an update's id reused by a forward.
    let update = pb::UpdateParametersRequest {
        request_id: "u1".into(),
        ..update
    };
    client.update_parameters(update).await.unwrap();
    let forward = pb::ForwardRequest {
        request_id: "u1".into(),
        ..train(&id, batch(4, 3))
    };
    expect_status(client.forward(forward).await, Code::AlreadyExists, "u1");
    assert_eq!(get(&mut client, &id).await.num_batches_tracked, 1);
}

// ------------------------------------------------------ state-changing RPCs

#[tokio::test]
async fn update_parameters_with_a_wrong_shape_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(3)).await.session_id;
    let before = get(&mut client, &id).await;

    // A valid bias with an invalid weight: all or nothing.
    let update = pb::UpdateParametersRequest {
        session_id: id.clone(),
        weight: Some(f32_raw(&[4], &[2.0; 4])),
        bias: Some(f32_raw(&[3], &[5.0; 3])),
        eps: Some(1e-3),
        ..Default::default()
    };
    expect_status(
        client.update_parameters(update).await,
        Code::InvalidArgument,
        "size mismatch for weight",
    );
    let after = get(&mut client, &id).await;
    assert_eq!(fingerprint(&after), fingerprint(&before));
    assert_eq!(after.config, before.config);

    // The valid update applies whole.
    let update = pb::UpdateParametersRequest {
        session_id: id.clone(),
        weight: Some(f32_raw(&[3], &[2.0; 3])),
        bias: Some(typed_f32(&[3], &[5.0; 3])),
        eps: Some(1e-3),
        num_batches_tracked: Some(40),
        ..Default::default()
    };
    let session = client
        .update_parameters(update)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!((session.version, session.num_batches_tracked), (2, 40));
    assert_eq!(values(session.weight.as_ref().unwrap()), [2.0; 3]);
    assert_eq!(values(session.bias.as_ref().unwrap()), [5.0; 3]);
    assert_eq!(session.config.unwrap().eps, 1e-3);
}

#[tokio::test]
async fn reset_running_stats_restores_zero_mean_unit_var_and_zero_count() {
    let server = TestServer::start().await;
    let mut client = server.batch_norm().await;
    let id = create(&mut client, bn1d(2)).await.session_id;
    for _ in 0..3 {
        client.forward(train(&id, batch(4, 2))).await.unwrap();
    }
    let trained = get(&mut client, &id).await;
    assert_eq!(trained.num_batches_tracked, 3);
    assert_ne!(values(trained.running_mean.as_ref().unwrap()), [0.0; 2]);

    let reset = pb::ResetRunningStatsRequest {
        session_id: id.clone(),
        ..Default::default()
    };
    let session = client
        .reset_running_stats(reset)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!((session.version, session.num_batches_tracked), (5, 0));
    assert_eq!(values(session.running_mean.as_ref().unwrap()), [0.0; 2]);
    assert_eq!(values(session.running_var.as_ref().unwrap()), [1.0; 2]);
    assert_eq!(
        fingerprint(&get(&mut client, &id).await),
        fingerprint(&session)
    );
}
