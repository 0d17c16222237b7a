//! The gRPC codec of every service and client generated from `proto/`
//! (`build.rs` names it): prost's messages, each sent message encoded into
//! room reserved for its whole length first, and each received message
//! decoded from one `Bytes` of its own instead of through tonic's decode
//! buffer. The message's bytes are taken whole (a split of the buffer, no
//! copy) and prost reads them as a plain slice; `bytes` fields stay slices
//! of the received message. A malformed message fails as prost's codec
//! fails it (INTERNAL with prost's text; `transport::status` maps decoding
//! failures).
//!
//! Why the reservation: prost writes a message field by field into tonic's
//! encode buffer (8 KiB at first), which grows as a `Vec` does. A 16 MiB
//! tensor's bytes grow it to exactly their size, and the next field's first
//! byte then doubles it to 32 MiB: above glibc's largest mmap threshold, so
//! every such call mapped 32 MiB afresh, copied 16 MiB into it and
//! faulted its pages in (how often depended on the allocator's history:
//! the load generator sending 16 MiB requests slowed by about a third after
//! a run of 1 MiB calls). Reserving `encoded_len` first grows the buffer
//! once, to the message's size.
//!
//! The statistics messages of synchronized steps (ReduceStatistics'
//! requests and answers, a Forward's `step_statistics`) have their packed
//! `repeated double` fields read and written whole (`packed`): the same
//! messages and bytes as prost's, without coding a thousand values one at
//! a time. Every other message is prost's alone.

mod packed;
#[cfg(test)]
mod tests;

use std::any::Any;
use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use prost::{DecodeError, Message};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

use crate::proto::v1 as pb;

/// Encodes `T`, decodes `U` from the message's own bytes.
#[derive(Debug, Clone, Copy)]
pub struct WholeMessageCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for WholeMessageCodec<T, U> {
    fn default() -> Self {
        WholeMessageCodec(PhantomData)
    }
}

impl<T, U> Codec for WholeMessageCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedEncoder<T>;
    type Decoder = WholeMessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SizedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        WholeMessageDecoder(PhantomData)
    }
}

/// Decodes `U` from the whole message taken as one `Bytes`.
#[derive(Debug, Clone, Copy)]
pub struct WholeMessageDecoder<U>(PhantomData<U>);

impl<U: Message + Default + 'static> Decoder for WholeMessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let message = buf.copy_to_bytes(buf.remaining());
        decode_message(message)
            .map(Some)
            .map_err(|error| Status::internal(error.to_string()))
    }
}

/// Encodes `T` as prost does (the same bytes), after reserving its encoded
/// length.
#[derive(Debug, Clone, Copy)]
pub struct SizedEncoder<T>(PhantomData<T>);

impl<T: Message + 'static> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        encode_message(&item, buf);
        Ok(())
    }
}

/// Decodes one message as prost's `U::decode` would, reading the packed
/// float64 fields of the statistics messages whole.
pub fn decode_message<U: Message + Default + 'static>(bytes: Bytes) -> Result<U, DecodeError> {
    let mut message = U::default();
    if merge_packed(&mut message, bytes.clone()).is_some() {
        return Ok(message);
    }
    // Not one of them, or one the fast path would not take whole: prost's
    // decode (and its error) from the start.
    U::decode(bytes)
}

/// `Some` when `message` is one of the statistics messages and the fast
/// path merged all of `bytes` into it.
fn merge_packed(message: &mut dyn Any, bytes: Bytes) -> Option<()> {
    if let Some(m) = message.downcast_mut::<pb::ReduceStatisticsRequest>() {
        return packed::merge_reduce_request(m, bytes);
    }
    if let Some(m) = message.downcast_mut::<pb::ReduceStatisticsStreamResponse>() {
        return packed::merge_reduce_stream_response(m, bytes);
    }
    if let Some(m) = message.downcast_mut::<pb::ReduceStatisticsResponse>() {
        return packed::merge_reduce_response(m, bytes);
    }
    if let Some(m) = message.downcast_mut::<pb::ForwardResponse>() {
        return packed::merge_forward_response(m, bytes);
    }
    None
}

/// Encodes one message with exactly prost's bytes (`encode_raw`: no length
/// prefix), writing the packed float64 fields of the statistics messages
/// whole. `buf` must have room for `message.encoded_len()` bytes or grow.
pub fn encode_message<T: Message + 'static>(message: &T, buf: &mut impl BufMut) {
    let source: &dyn Any = message;
    if let Some(m) = source.downcast_ref::<pb::ReduceStatisticsStreamResponse>() {
        packed::encode_reduce_stream_response(m, buf);
    } else if let Some(m) = source.downcast_ref::<pb::ReduceStatisticsResponse>() {
        packed::encode_reduce_response(m, buf);
    } else if let Some(m) = source.downcast_ref::<pb::ReduceStatisticsRequest>() {
        packed::encode_reduce_request(m, buf);
    } else if let Some(m) = source.downcast_ref::<pb::ForwardResponse>() {
        packed::encode_forward_response(m, buf);
    } else if let Some(m) = source.downcast_ref::<pb::StepStatistics>() {
        packed::encode_step_statistics(m, buf);
    } else {
        message.encode_raw(buf);
    }
}
