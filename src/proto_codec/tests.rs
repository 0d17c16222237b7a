//! The codec against prost, its oracle: every message decoded here equals
//! prost's decode of the same bytes (compared as prost re-encodes them, so
//! NaN payloads count bit for bit), a message prost refuses is refused with
//! prost's text, and every message encoded here has exactly prost's bytes.
//! The inputs are built field by field: packed and unpacked `repeated
//! double`, fields in any order and repeated (merged), nested messages
//! split in pieces, unknown fields of every wire type, and then cut short or
//! with a byte changed.

use bytes::Bytes;
use proptest::prelude::*;
use prost::encoding::{encode_key, encode_varint, WireType};
use prost::Message;

use super::{decode_message, encode_message, packed};
use crate::proto::v1 as pb;
use pb::reduce_statistics_stream_response::Result as StreamResult;

/// One piece of a message on the wire.
#[derive(Debug, Clone)]
enum Piece {
    /// A whole message of the same type as prost encodes it (merged in).
    Encoded(Vec<u8>),
    Packed(u32, Vec<f64>),
    Unpacked(u32, f64),
    /// An unknown field: tag, wire type (0 varint, 1 fixed64, 2 bytes,
    /// 5 fixed32), payload.
    Unknown(u32, u8, Vec<u8>),
    /// A message field, itself in pieces.
    Nested(u32, Vec<Piece>),
}

fn wire(pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Encoded(bytes) => out.extend_from_slice(bytes),
            Piece::Packed(tag, values) => {
                encode_key(*tag, WireType::LengthDelimited, &mut out);
                encode_varint((values.len() * 8) as u64, &mut out);
                for value in values {
                    out.extend_from_slice(&value.to_le_bytes());
                }
            }
            Piece::Unpacked(tag, value) => {
                encode_key(*tag, WireType::SixtyFourBit, &mut out);
                out.extend_from_slice(&value.to_le_bytes());
            }
            Piece::Unknown(tag, kind, payload) => match kind {
                0 => {
                    encode_key(*tag, WireType::Varint, &mut out);
                    let value = payload
                        .iter()
                        .take(8)
                        .fold(0u64, |v, b| v << 8 | u64::from(*b));
                    encode_varint(value, &mut out);
                }
                1 => {
                    encode_key(*tag, WireType::SixtyFourBit, &mut out);
                    let mut value = [0u8; 8];
                    for (v, b) in value.iter_mut().zip(payload) {
                        *v = *b;
                    }
                    out.extend_from_slice(&value);
                }
                5 => {
                    encode_key(*tag, WireType::ThirtyTwoBit, &mut out);
                    let mut value = [0u8; 4];
                    for (v, b) in value.iter_mut().zip(payload) {
                        *v = *b;
                    }
                    out.extend_from_slice(&value);
                }
                _ => {
                    encode_key(*tag, WireType::LengthDelimited, &mut out);
                    encode_varint(payload.len() as u64, &mut out);
                    out.extend_from_slice(payload);
                }
            },
            Piece::Nested(tag, pieces) => {
                let inner = wire(pieces);
                encode_key(*tag, WireType::LengthDelimited, &mut out);
                encode_varint(inner.len() as u64, &mut out);
                out.extend_from_slice(&inner);
            }
        }
    }
    out
}

/// Any float64, NaN payloads, infinities, signed zeros and subnormals included.
fn double() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<u64>().prop_map(f64::from_bits),
        prop::sample::select(vec![
            0.0,
            -0.0,
            f64::NAN,
            -f64::NAN,
            f64::from_bits(0x7ff0_0000_0000_0001),
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE / 4.0,
            1.5,
        ]),
    ]
}

fn doubles() -> impl Strategy<Value = Vec<f64>> {
    prop_oneof![
        3 => prop::collection::vec(double(), 0..24),
        1 => prop::collection::vec(double(), 500..1100),
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z/é]{1,12}"]
}

fn unknown(known: u32) -> impl Strategy<Value = Piece> {
    (
        (known + 1)..2000u32,
        prop::sample::select(vec![0u8, 1, 2, 5]),
        prop::collection::vec(any::<u8>(), 0..12),
    )
        .prop_map(|(tag, kind, payload)| Piece::Unknown(tag, kind, payload))
}

fn step_spec() -> impl Strategy<Value = Option<pb::StepSpec>> {
    prop::option::of((any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
        |(step, world_size, rank)| pb::StepSpec {
            step,
            world_size,
            rank,
        },
    ))
}

fn step_statistics() -> impl Strategy<Value = pb::StepStatistics> {
    (any::<u64>(), any::<i64>(), doubles(), doubles(), doubles()).prop_map(
        |(step, count, mean, var, unbiased_var)| pb::StepStatistics {
            step,
            count,
            mean,
            var,
            unbiased_var,
        },
    )
}

fn reduce_request() -> impl Strategy<Value = pb::ReduceStatisticsRequest> {
    (
        (text(), step_spec(), -2..4i32, any::<i64>()),
        (doubles(), doubles(), doubles(), doubles()),
        (any::<bool>(), text()),
    )
        .prop_map(
            |(
                (session_id, step, phase, count),
                (mean, m2, sum_grad_output, sum_grad_output_centered),
                (update_running_stats, request_id),
            )| pb::ReduceStatisticsRequest {
                session_id,
                step,
                phase,
                count,
                mean,
                m2,
                sum_grad_output,
                sum_grad_output_centered,
                update_running_stats,
                request_id,
            },
        )
}

fn reduce_response() -> impl Strategy<Value = pb::ReduceStatisticsResponse> {
    (
        prop::option::of(step_statistics()),
        doubles(),
        doubles(),
        any::<u64>(),
        any::<i64>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                statistics,
                sum_grad_output,
                sum_grad_output_centered,
                version,
                num_batches_tracked,
                replayed,
            )| pb::ReduceStatisticsResponse {
                statistics,
                sum_grad_output,
                sum_grad_output_centered,
                version,
                num_batches_tracked,
                replayed,
            },
        )
}

fn stream_response() -> impl Strategy<Value = pb::ReduceStatisticsStreamResponse> {
    let result = prop_oneof![
        Just(None),
        reduce_response().prop_map(|r| Some(StreamResult::Response(r))),
        (any::<i32>(), text()).prop_map(|(code, message)| Some(StreamResult::Error(
            pb::StreamError { code, message }
        ))),
    ];
    (any::<u64>(), result)
        .prop_map(|(index, result)| pb::ReduceStatisticsStreamResponse { index, result })
}

fn forward_response() -> impl Strategy<Value = pb::ForwardResponse> {
    let output =
        prop::option::of(
            prop::collection::vec(any::<u8>(), 0..64).prop_map(|raw| pb::Tensor {
                dtype: pb::DataType::Float32 as i32,
                shape: vec![raw.len() as i64 / 4],
                values: Some(pb::tensor::Values::Raw(Bytes::from(raw))),
            }),
        );
    let region = prop::option::of((text(), any::<u64>(), any::<u64>()).prop_map(
        |(region, offset, byte_size)| pb::SharedMemoryRange {
            region,
            offset,
            byte_size,
        },
    ));
    (
        output,
        (any::<u64>(), any::<i64>(), any::<bool>()),
        prop::option::of(step_statistics()),
        region,
    )
        .prop_map(
            |(output, (version, num_batches_tracked, replayed), step_statistics, output_region)| {
                pb::ForwardResponse {
                    output,
                    version,
                    num_batches_tracked,
                    replayed,
                    step_statistics,
                    output_region,
                }
            },
        )
}

/// Pieces of a message whose `repeated double` fields are `tags`, whose
/// whole encodings come from `encoded`, with unknown fields after `known`.
fn pieces_of(
    encoded: BoxedStrategy<Vec<u8>>,
    tags: Option<std::ops::RangeInclusive<u32>>,
    known: u32,
    nested: Option<(u32, BoxedStrategy<Vec<Piece>>)>,
) -> BoxedStrategy<Vec<Piece>> {
    let mut piece = prop_oneof![encoded.prop_map(Piece::Encoded), unknown(known)].boxed();
    if let Some(tags) = tags {
        piece = prop_oneof![
            piece,
            (tags.clone(), doubles()).prop_map(|(t, v)| Piece::Packed(t, v)),
            (tags, double()).prop_map(|(t, v)| Piece::Unpacked(t, v)),
        ]
        .boxed();
    }
    if let Some((tag, inner)) = nested {
        piece =
            prop_oneof![3 => piece, 1 => inner.prop_map(move |p| Piece::Nested(tag, p))].boxed();
    }
    prop::collection::vec(piece, 0..6).boxed()
}

fn step_statistics_pieces() -> BoxedStrategy<Vec<Piece>> {
    pieces_of(
        step_statistics().prop_map(|m| m.encode_to_vec()).boxed(),
        Some(3..=5),
        5,
        None,
    )
}

fn reduce_response_pieces() -> BoxedStrategy<Vec<Piece>> {
    pieces_of(
        reduce_response().prop_map(|m| m.encode_to_vec()).boxed(),
        Some(2..=3),
        6,
        Some((1, step_statistics_pieces())),
    )
}

/// Damage to apply to a valid message: none, cut at a fraction of its
/// length, or one byte replaced at a fraction of its length.
#[derive(Debug, Clone)]
enum Damage {
    None,
    Cut(f64),
    Byte(f64, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        2 => Just(Damage::None),
        1 => (0.0..1.0f64).prop_map(Damage::Cut),
        1 => (0.0..1.0f64, any::<u8>()).prop_map(|(at, b)| Damage::Byte(at, b)),
    ]
}

fn damaged(mut bytes: Vec<u8>, damage: &Damage) -> Vec<u8> {
    let at = |fraction: f64, len: usize| ((len as f64 * fraction) as usize).min(len);
    match *damage {
        Damage::None => {}
        Damage::Cut(fraction) => bytes.truncate(at(fraction, bytes.len())),
        Damage::Byte(fraction, byte) => {
            let i = at(fraction, bytes.len());
            if let Some(b) = bytes.get_mut(i) {
                *b = byte;
            }
        }
    }
    bytes
}

/// `bytes` decoded here and by prost: the same message (as prost encodes
/// it), or both refused with the same text.
fn decodes_as_prost<M: Message + Default + 'static>(bytes: &[u8]) -> Result<(), TestCaseError> {
    let here = decode_message::<M>(Bytes::copy_from_slice(bytes));
    let oracle = M::decode(bytes);
    match (here, oracle) {
        (Ok(here), Ok(oracle)) => prop_assert_eq!(here.encode_to_vec(), oracle.encode_to_vec()),
        (Err(here), Err(oracle)) => prop_assert_eq!(here.to_string(), oracle.to_string()),
        (here, oracle) => prop_assert!(
            false,
            "decoded here: {}, by prost: {}",
            here.is_ok(),
            oracle.is_ok()
        ),
    }
    Ok(())
}

/// An undamaged message is read by the fast path itself (the comparison
/// with prost would pass as well if every message fell back to prost).
fn fast_path_takes<M: Message + Default>(
    bytes: &[u8],
    damage: &Damage,
    merge: fn(&mut M, Bytes) -> Option<()>,
) -> Result<(), TestCaseError> {
    if let Damage::None = damage {
        prop_assert!(merge(&mut M::default(), Bytes::copy_from_slice(bytes)).is_some());
    }
    Ok(())
}

/// `message` encoded here: prost's bytes.
fn encodes_as_prost<M: Message + 'static>(message: &M) -> Result<(), TestCaseError> {
    let mut here = Vec::new();
    encode_message(message, &mut here);
    prop_assert_eq!(here.len(), message.encoded_len());
    prop_assert_eq!(here, message.encode_to_vec());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn reduce_requests_decode_as_prost(
        pieces in pieces_of(
            reduce_request().prop_map(|m| m.encode_to_vec()).boxed(), Some(5..=8), 10, None),
        damage in damage(),
    ) {
        let bytes = damaged(wire(&pieces), &damage);
        decodes_as_prost::<pb::ReduceStatisticsRequest>(&bytes)?;
        fast_path_takes(&bytes, &damage, packed::merge_reduce_request)?;
    }

    #[test]
    fn step_statistics_decode_as_prost_inside_replies(
        pieces in reduce_response_pieces(),
        damage in damage(),
    ) {
        let bytes = damaged(wire(&pieces), &damage);
        decodes_as_prost::<pb::ReduceStatisticsResponse>(&bytes)?;
        fast_path_takes(&bytes, &damage, packed::merge_reduce_response)?;
    }

    #[test]
    fn stream_replies_decode_as_prost(
        pieces in pieces_of(
            stream_response().prop_map(|m| m.encode_to_vec()).boxed(),
            None,
            3,
            Some((2, reduce_response_pieces())),
        ),
        damage in damage(),
    ) {
        let bytes = damaged(wire(&pieces), &damage);
        decodes_as_prost::<pb::ReduceStatisticsStreamResponse>(&bytes)?;
        fast_path_takes(&bytes, &damage, packed::merge_reduce_stream_response)?;
    }

    #[test]
    fn forward_replies_decode_as_prost(
        pieces in pieces_of(
            forward_response().prop_map(|m| m.encode_to_vec()).boxed(),
            None,
            10,
            Some((5, step_statistics_pieces())),
        ),
        damage in damage(),
    ) {
        let bytes = damaged(wire(&pieces), &damage);
        decodes_as_prost::<pb::ForwardResponse>(&bytes)?;
        fast_path_takes(&bytes, &damage, packed::merge_forward_response)?;
    }

    #[test]
    fn statistics_messages_encode_as_prost(
        request in reduce_request(),
        response in reduce_response(),
        streamed in stream_response(),
        statistics in step_statistics(),
    ) {
        encodes_as_prost(&request)?;
        encodes_as_prost(&response)?;
        encodes_as_prost(&streamed)?;
        encodes_as_prost(&statistics)?;
    }

    #[test]
    fn forward_replies_encode_and_decode_as_prost(reply in forward_response()) {
        encodes_as_prost(&reply)?;
        decodes_as_prost::<pb::ForwardResponse>(&reply.encode_to_vec())?;
    }
}

#[test]
fn a_packed_field_cut_inside_a_value_is_refused_as_prost_refuses_it() {
    let request = pb::ReduceStatisticsRequest {
        mean: vec![1.0, 2.0],
        update_running_stats: true,
        ..Default::default()
    };
    let mut bytes = request.encode_to_vec();
    // The mean's length prefix (16) made 12: a value cut in the middle.
    assert_eq!(bytes[..2], [5 << 3 | 2, 16]);
    bytes[1] = 12;
    let here = decode_message::<pb::ReduceStatisticsRequest>(Bytes::from(bytes.clone()));
    let oracle = pb::ReduceStatisticsRequest::decode(bytes.as_slice());
    match (here, oracle) {
        (Err(here), Err(oracle)) => assert_eq!(here.to_string(), oracle.to_string()),
        (here, oracle) => panic!("here {here:?}, prost {oracle:?}"),
    }
}

#[test]
fn a_thousand_channels_round_trip_bit_for_bit() {
    let values: Vec<f64> = (0..1024u64)
        .map(|i| f64::from_bits(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
        .collect();
    let response = pb::ReduceStatisticsStreamResponse {
        index: 7,
        result: Some(StreamResult::Response(pb::ReduceStatisticsResponse {
            statistics: Some(pb::StepStatistics {
                step: 3,
                count: 512,
                mean: values.clone(),
                var: values.iter().rev().copied().collect(),
                unbiased_var: values.clone(),
            }),
            version: 4,
            num_batches_tracked: 2,
            ..Default::default()
        })),
    };
    let mut bytes = Vec::new();
    encode_message(&response, &mut bytes);
    assert_eq!(bytes, response.encode_to_vec());
    let decoded: pb::ReduceStatisticsStreamResponse =
        decode_message(Bytes::from(bytes)).unwrap_or_default();
    let Some(StreamResult::Response(reply)) = decoded.result else {
        panic!("no response decoded");
    };
    let mean = reply.statistics.map(|s| s.mean).unwrap_or_default();
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&mean), bits(&values));
}
