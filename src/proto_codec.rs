//! The gRPC codec of every service and client generated from `proto/`
//! (`build.rs` names it): prost's messages, each sent message encoded into
//! room reserved for its whole length first, and each
//! received message decoded from one `Bytes` of its own instead of through
//! tonic's decode buffer. The message's bytes are taken whole (a split of
//! the buffer, no copy) and prost reads them as a plain slice: packed
//! numeric fields (ReduceStatistics' 1024-value float64 fields) decode in
//! less than half the time, since every value read through the buffer
//! advanced it. `bytes` fields stay slices of the received message, as
//! before. A malformed message fails as prost's codec fails it (INTERNAL
//! with prost's text; `transport::status` maps decoding failures).
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

use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// Encodes `T` into room reserved for all of it, decodes `U` from the
/// message's own bytes.
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

/// Encodes `T` as prost does, after reserving its encoded length.
#[derive(Debug, Clone, Copy)]
pub struct SizedEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        // prost fails only when the buffer lacks room, which the reservation
        // rules out; the error is kept rather than unwrapped all the same.
        item.encode(buf)
            .map_err(|error| Status::internal(error.to_string()))
    }
}

/// Decodes `U` from the whole message taken as one `Bytes`.
#[derive(Debug, Clone, Copy)]
pub struct WholeMessageDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for WholeMessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let message = buf.copy_to_bytes(buf.remaining());
        U::decode(message)
            .map(Some)
            .map_err(|error| Status::internal(error.to_string()))
    }
}
