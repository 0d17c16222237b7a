//! Protobuf decoding: arbitrary bytes, and valid request encodings with
//! bytes flipped, cut, inserted or spliced, decoded (prost) as each request
//! message and then converted as the handlers convert them. Whatever
//! decodes must convert to a value or a clean INVALID_ARGUMENT /
//! RESOURCE_EXHAUSTED; nothing may panic.

use normserve::auth::Principal;
use normserve::proto::v1 as pb;
use normserve::session::parse_request_id;
use normserve::transport::convert;
use proptest::prelude::*;
use proptest::test_runner::TestCaseResult;
use prost::Message;

use crate::requests::{self, is_client_error};
use crate::{fuzz, tensors};

/// The server's limit is far larger; small keeps each case cheap and still
/// exercises the limit.
const MAX_ELEMENTS: u64 = 4096;

#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        xor: u8,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        at: usize,
        len: usize,
    },
    /// Overwrite with a varint: lengths and tags that lie.
    Varint {
        at: usize,
        value: u64,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        (at, 1u8..).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        at.prop_map(|at| Mutation::Truncate { at }),
        (at, prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (at, 1usize..8).prop_map(|(at, len)| Mutation::Remove { at, len }),
        (at, prop_oneof![0u64..300, any::<u64>()])
            .prop_map(|(at, value)| Mutation::Varint { at, value }),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let position = |at: usize, len: usize| if len == 0 { 0 } else { at % (len + 1) };
    match mutation {
        Mutation::Flip { at, xor } => {
            if !bytes.is_empty() {
                let i = at % bytes.len();
                bytes[i] ^= xor;
            }
        }
        Mutation::Truncate { at } => bytes.truncate(position(*at, bytes.len())),
        Mutation::Insert { at, bytes: new } => {
            let i = position(*at, bytes.len());
            bytes.splice(i..i, new.iter().copied());
        }
        Mutation::Remove { at, len } => {
            let i = position(*at, bytes.len());
            let end = (i + len).min(bytes.len());
            bytes.drain(i..end);
        }
        Mutation::Varint { at, value } => {
            let mut varint = Vec::new();
            prost::encoding::encode_varint(*value, &mut varint);
            let i = position(*at, bytes.len());
            let end = (i + varint.len()).min(bytes.len());
            bytes.splice(i..end, varint);
        }
    }
}

/// Encodings of valid-looking requests of every kind, to mutate.
fn seed() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        requests::create_session_request().prop_map(|r| r.encode_to_vec()),
        (tensors::case(), requests::text(), any::<i32>()).prop_map(|(input, session_id, mode)| {
            pb::ForwardRequest {
                session_id,
                input: Some(input.to_proto()),
                mode,
                ..Default::default()
            }
            .encode_to_vec()
        }),
        requests::compare_case().prop_map(|case| case.to_proto().encode_to_vec()),
        (
            tensors::case_with_rank(0..=2),
            proptest::option::of(requests::scalar())
        )
            .prop_map(|(weight, momentum)| {
                pb::UpdateParametersRequest {
                    weight: Some(weight.to_proto()),
                    momentum,
                    ..Default::default()
                }
                .encode_to_vec()
            }),
    ]
}

fn message_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256),
        4 => (seed(), prop::collection::vec(mutation(), 0..6)).prop_map(|(mut bytes, mutations)| {
            for mutation in &mutations {
                apply(&mut bytes, mutation);
            }
            bytes
        }),
    ]
}

fn ok_or_client_error<T, E>(result: Result<T, E>) -> TestCaseResult
where
    E: Into<tonic::Status> + std::fmt::Display,
{
    if let Err(error) = result {
        let text = error.to_string();
        prop_assert!(is_client_error(error), "not a client error: {text}");
    }
    Ok(())
}

/// Decodes `bytes` as each request message and converts what decodes.
fn check_message(bytes: &[u8]) -> TestCaseResult {
    let principal = Principal::anonymous();
    if let Ok(request) = pb::CreateSessionRequest::decode(bytes) {
        ok_or_client_error(convert::session_config(&request))?;
        ok_or_client_error(convert::optional_session_id(
            &principal,
            &request.session_id,
        ))?;
        ok_or_client_error(convert::state_tensors(
            request.weight,
            request.bias,
            request.running_mean,
            request.running_var,
            MAX_ELEMENTS,
        ))?;
    }
    if let Ok(request) = pb::ForwardRequest::decode(bytes) {
        ok_or_client_error(convert::session_id(&principal, &request.session_id))?;
        ok_or_client_error(convert::required_tensor(
            "input",
            request.input,
            MAX_ELEMENTS,
        ))?;
        ok_or_client_error(convert::mode(request.mode))?;
        ok_or_client_error(parse_request_id(&request.request_id))?;
    }
    if let Ok(request) = pb::UpdateParametersRequest::decode(bytes) {
        ok_or_client_error(convert::state_tensors(
            request.weight,
            request.bias,
            request.running_mean,
            request.running_var,
            MAX_ELEMENTS,
        ))?;
        ok_or_client_error(convert::momentum(
            request.momentum,
            request.cumulative_average.unwrap_or(false),
        ))?;
    }
    if let Ok(request) = pb::CompareRequest::decode(bytes) {
        ok_or_client_error(convert::compare_request(request, MAX_ELEMENTS))?;
    }
    if let Ok(request) = pb::ListSessionsRequest::decode(bytes) {
        // The handler turns any bad page token into INVALID_ARGUMENT.
        let _ = convert::optional_session_id(&principal, &request.page_token);
    }
    if let Ok(request) = pb::ImportStateRequest::decode(bytes) {
        ok_or_client_error(convert::session_id(&principal, &request.session_id))?;
    }
    Ok(())
}

#[test]
fn any_bytes_decode_and_convert_without_panicking() {
    fuzz("protobuf_decoding", message_bytes(), |bytes| {
        check_message(&bytes)
    });
}
