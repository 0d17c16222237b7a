//! Request builders and status checks shared by the test modules.

use std::fmt::Debug;

use normserve::proto::v1 as pb;
use tonic::{Code, Response, Status};

use crate::server::BatchNorm;

/// PyTorch's default `eps` of a batch-norm layer.
pub const EPS: f64 = 1e-5;

/// `torch.nn.BatchNorm1d(num_features)` with every default.
pub fn bn1d(num_features: i64) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        kind: pb::BatchNormKind::BatchNorm1d as i32,
        num_features,
        ..Default::default()
    }
}

/// `torch.nn.BatchNorm2d(num_features)` with every default.
pub fn bn2d(num_features: i64) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        kind: pb::BatchNormKind::BatchNorm2d as i32,
        num_features,
        ..Default::default()
    }
}

/// `request` with a client-chosen id.
pub fn named(id: &str, request: pb::CreateSessionRequest) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        session_id: id.to_owned(),
        ..request
    }
}

pub async fn create(client: &mut BatchNorm, request: pb::CreateSessionRequest) -> pb::Session {
    let created = client.create_session(request).await.unwrap().into_inner();
    assert!(!created.already_existed);
    created.session.unwrap()
}

pub async fn get(client: &mut BatchNorm, id: &str) -> pb::Session {
    let request = pb::GetSessionRequest {
        session_id: id.to_owned(),
    };
    client
        .get_session(request)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
}

pub fn forward(id: &str, input: pb::Tensor, mode: pb::Mode) -> pb::ForwardRequest {
    pb::ForwardRequest {
        session_id: id.to_owned(),
        input: Some(input),
        mode: mode as i32,
        ..Default::default()
    }
}

pub fn train(id: &str, input: pb::Tensor) -> pb::ForwardRequest {
    forward(id, input, pb::Mode::Train)
}

pub fn eval(id: &str, input: pb::Tensor) -> pb::ForwardRequest {
    forward(id, input, pb::Mode::Eval)
}

/// Asserts the call failed with `code` and a message containing `text`.
#[track_caller]
pub fn expect_status<T: Debug>(result: Result<Response<T>, Status>, code: Code, text: &str) {
    match result {
        Ok(response) => panic!("expected {code:?} containing {text:?}, got {response:?}"),
        Err(status) => check_status(&status, code, text),
    }
}

#[track_caller]
pub fn check_status(status: &Status, code: Code, text: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(text),
        "expected {text:?} in {:?}",
        status.message()
    );
}
