//! Packed `repeated double` fields read and written whole: the statistics
//! messages of synchronized steps (ReduceStatistics' requests and answers,
//! a step's `StepStatistics`) carry a few thousand float64 values each,
//! which prost codes one value at a time. On the wire a packed field is a
//! key, a length and the values' little-endian bytes, so it decodes as one
//! conversion of a byte slice and encodes as a few block copies.
//!
//! Only those fields take this path: every other field of these messages
//! goes through prost's own `merge_field` (unknown fields skipped, an
//! unpacked `repeated double`, which proto3 parsers must accept, appended
//! value by value), and a message the fast path does not accept whole is
//! decoded by prost from the start, so prost's verdict and error text stand.
//! The encoders write exactly prost's bytes (fields in tag order, proto3
//! defaults omitted); they destructure each message without `..`, so a
//! field added to the proto does not compile until it is written here.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{
    decode_key, decode_varint, encode_key, encode_varint, DecodeContext, WireType,
};
use prost::Message;

use crate::proto::v1 as pb;
use pb::reduce_statistics_stream_response::Result as StreamResult;

/// Merges the message in `buf` into `message` as prost's `merge` does,
/// except that `fast` reads the fields it knows (returns `Some(true)`);
/// `Some(false)` hands the field to prost; `None` gives up (the caller then
/// lets prost decode the whole message).
fn merge_with<M: Message>(
    message: &mut M,
    mut buf: Bytes,
    mut fast: impl FnMut(&mut M, u32, WireType, &mut Bytes) -> Option<bool>,
) -> Option<()> {
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf).ok()?;
        if !fast(message, tag, wire_type, &mut buf)? {
            message
                .merge_field(tag, wire_type, &mut buf, DecodeContext::default())
                .ok()?;
        }
    }
    Some(())
}

/// The bytes of a length-delimited field whose key was just read.
fn delimited(buf: &mut Bytes) -> Option<Bytes> {
    let len = usize::try_from(decode_varint(buf).ok()?).ok()?;
    (len <= buf.remaining()).then(|| buf.split_to(len))
}

/// A `repeated double` field: packed, its values appended to `values`
/// (`Some(true)`); unpacked (one value per key), left to prost.
fn merge_doubles(wire_type: WireType, values: &mut Vec<f64>, buf: &mut Bytes) -> Option<bool> {
    if wire_type != WireType::LengthDelimited {
        return Some(false);
    }
    let bytes = delimited(buf)?;
    if bytes.len() % 8 != 0 {
        return None;
    }
    values.reserve(bytes.len() / 8);
    values.extend(bytes.chunks_exact(8).map(|chunk| {
        let mut value = [0u8; 8];
        value.copy_from_slice(chunk);
        f64::from_le_bytes(value)
    }));
    Some(true)
}

/// A singular message field: merged into the one already there, as prost does.
fn merge_nested<M: Message + Default>(
    wire_type: WireType,
    target: &mut Option<M>,
    buf: &mut Bytes,
    merge: impl FnOnce(&mut M, Bytes) -> Option<()>,
) -> Option<bool> {
    if wire_type != WireType::LengthDelimited {
        return None;
    }
    let bytes = delimited(buf)?;
    merge(target.get_or_insert_with(M::default), bytes)?;
    Some(true)
}

pub(super) fn merge_step_statistics(message: &mut pb::StepStatistics, buf: Bytes) -> Option<()> {
    merge_with(message, buf, |m, tag, wire_type, buf| match tag {
        3 => merge_doubles(wire_type, &mut m.mean, buf),
        4 => merge_doubles(wire_type, &mut m.var, buf),
        5 => merge_doubles(wire_type, &mut m.unbiased_var, buf),
        _ => Some(false),
    })
}

pub(super) fn merge_reduce_request(
    message: &mut pb::ReduceStatisticsRequest,
    buf: Bytes,
) -> Option<()> {
    merge_with(message, buf, |m, tag, wire_type, buf| match tag {
        5 => merge_doubles(wire_type, &mut m.mean, buf),
        6 => merge_doubles(wire_type, &mut m.m2, buf),
        7 => merge_doubles(wire_type, &mut m.sum_grad_output, buf),
        8 => merge_doubles(wire_type, &mut m.sum_grad_output_centered, buf),
        _ => Some(false),
    })
}

pub(super) fn merge_reduce_response(
    message: &mut pb::ReduceStatisticsResponse,
    buf: Bytes,
) -> Option<()> {
    merge_with(message, buf, |m, tag, wire_type, buf| match tag {
        1 => merge_nested(wire_type, &mut m.statistics, buf, merge_step_statistics),
        2 => merge_doubles(wire_type, &mut m.sum_grad_output, buf),
        3 => merge_doubles(wire_type, &mut m.sum_grad_output_centered, buf),
        _ => Some(false),
    })
}

pub(super) fn merge_reduce_stream_response(
    message: &mut pb::ReduceStatisticsStreamResponse,
    buf: Bytes,
) -> Option<()> {
    merge_with(message, buf, |m, tag, wire_type, buf| match tag {
        2 => {
            // A oneof's message variant merges into the same variant and
            // replaces another one, as prost's generated code does.
            let mut response = match m.result.take() {
                Some(StreamResult::Response(response)) => Some(response),
                _ => None,
            };
            let merged = merge_nested(wire_type, &mut response, buf, merge_reduce_response);
            m.result = response.map(StreamResult::Response);
            merged
        }
        _ => Some(false),
    })
}

pub(super) fn merge_forward_response(message: &mut pb::ForwardResponse, buf: Bytes) -> Option<()> {
    merge_with(message, buf, |m, tag, wire_type, buf| match tag {
        5 => merge_nested(
            wire_type,
            &mut m.step_statistics,
            buf,
            merge_step_statistics,
        ),
        _ => Some(false),
    })
}

/// Values per block copied at once when encoding.
const BLOCK_VALUES: usize = 512;

/// A packed `repeated double` as prost's `double::encode_packed` writes it
/// (nothing when empty).
fn put_doubles(tag: u32, values: &[f64], buf: &mut impl BufMut) {
    if values.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint((values.len() * 8) as u64, buf);
    let mut block = [0u8; BLOCK_VALUES * 8];
    for part in values.chunks(BLOCK_VALUES) {
        for (bytes, value) in block.chunks_exact_mut(8).zip(part) {
            bytes.copy_from_slice(&value.to_le_bytes());
        }
        buf.put_slice(&block[..part.len() * 8]);
    }
}

/// A singular message field written with `encode_raw` for its body.
fn put_nested<M: Message, B: BufMut>(
    tag: u32,
    message: &M,
    buf: &mut B,
    encode_raw: impl FnOnce(&M, &mut B),
) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(message.encoded_len() as u64, buf);
    encode_raw(message, buf);
}

pub(super) fn encode_step_statistics(message: &pb::StepStatistics, buf: &mut impl BufMut) {
    let pb::StepStatistics {
        step,
        count,
        mean,
        var,
        unbiased_var,
    } = message;
    if *step != 0 {
        prost::encoding::uint64::encode(1, step, buf);
    }
    if *count != 0 {
        prost::encoding::int64::encode(2, count, buf);
    }
    put_doubles(3, mean, buf);
    put_doubles(4, var, buf);
    put_doubles(5, unbiased_var, buf);
}

pub(super) fn encode_reduce_response(
    message: &pb::ReduceStatisticsResponse,
    buf: &mut impl BufMut,
) {
    let pb::ReduceStatisticsResponse {
        statistics,
        sum_grad_output,
        sum_grad_output_centered,
        version,
        num_batches_tracked,
        replayed,
    } = message;
    if let Some(statistics) = statistics {
        put_nested(1, statistics, buf, encode_step_statistics);
    }
    put_doubles(2, sum_grad_output, buf);
    put_doubles(3, sum_grad_output_centered, buf);
    if *version != 0 {
        prost::encoding::uint64::encode(4, version, buf);
    }
    if *num_batches_tracked != 0 {
        prost::encoding::int64::encode(5, num_batches_tracked, buf);
    }
    if *replayed {
        prost::encoding::bool::encode(6, replayed, buf);
    }
}

pub(super) fn encode_reduce_stream_response(
    message: &pb::ReduceStatisticsStreamResponse,
    buf: &mut impl BufMut,
) {
    let pb::ReduceStatisticsStreamResponse { index, result } = message;
    if *index != 0 {
        prost::encoding::uint64::encode(1, index, buf);
    }
    match result {
        Some(StreamResult::Response(response)) => {
            put_nested(2, response, buf, encode_reduce_response);
        }
        Some(StreamResult::Error(error)) => prost::encoding::message::encode(3, error, buf),
        None => {}
    }
}

pub(super) fn encode_forward_response(message: &pb::ForwardResponse, buf: &mut impl BufMut) {
    let pb::ForwardResponse {
        output,
        version,
        num_batches_tracked,
        replayed,
        step_statistics,
        output_region,
    } = message;
    if let Some(output) = output {
        prost::encoding::message::encode(1, output, buf);
    }
    if *version != 0 {
        prost::encoding::uint64::encode(2, version, buf);
    }
    if *num_batches_tracked != 0 {
        prost::encoding::int64::encode(3, num_batches_tracked, buf);
    }
    if *replayed {
        prost::encoding::bool::encode(4, replayed, buf);
    }
    if let Some(statistics) = step_statistics {
        put_nested(5, statistics, buf, encode_step_statistics);
    }
    if let Some(region) = output_region {
        prost::encoding::message::encode(10, region, buf);
    }
}

pub(super) fn encode_reduce_request(message: &pb::ReduceStatisticsRequest, buf: &mut impl BufMut) {
    let pb::ReduceStatisticsRequest {
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
    } = message;
    if !session_id.is_empty() {
        prost::encoding::string::encode(1, session_id, buf);
    }
    if let Some(step) = step {
        prost::encoding::message::encode(2, step, buf);
    }
    if *phase != 0 {
        prost::encoding::int32::encode(3, phase, buf);
    }
    if *count != 0 {
        prost::encoding::int64::encode(4, count, buf);
    }
    put_doubles(5, mean, buf);
    put_doubles(6, m2, buf);
    put_doubles(7, sum_grad_output, buf);
    put_doubles(8, sum_grad_output_centered, buf);
    if *update_running_stats {
        prost::encoding::bool::encode(9, update_running_stats, buf);
    }
    if !request_id.is_empty() {
        prost::encoding::string::encode(10, request_id, buf);
    }
}
