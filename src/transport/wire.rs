//! The unary Forward's messages on the wire without tonic's buffers: the
//! request read from the HTTP/2 DATA frames as received, the reply encoded
//! with its tensor bytes as a chunk of their own.
//!
//! Request: the frames' bytes stay where h2 put them ([`Frames`]); prost
//! decodes straight from them, and the tensor's `raw` bytes are a slice of
//! the frame that holds them (no copy) or, when they straddle frames, one
//! copy into a fresh allocation (aligned for every dtype). tonic instead
//! copies every frame into one growing buffer first.
//!
//! Reply: protobuf lets the fields of a message come in any order, so the
//! reply is encoded as the response without its output tensor, then the
//! output field (a `Tensor` without its values, then the `raw` field's key
//! and length) and finally the output tensor's bytes themselves: the bytes
//! the computation wrote go to the connection as they are, instead of being
//! copied into one encode buffer. Every protobuf parser reads the same
//! message (`decode(reply) == response`, checked against prost's own
//! encoding in the tests).

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::proto::v1 as pb;

/// gRPC's length prefix: a compression flag and a 4-byte big-endian length.
pub const PREFIX_BYTES: usize = 5;

/// Output tensors at least this large leave as a chunk of their own; smaller
/// ones are copied into the reply (a copy cheaper than another body frame).
pub const SPLICE_BYTES: usize = 16 * 1024;

/// h2 copies DATA frames below this size into its write buffer and writes
/// larger ones on their own (a write each, before the trailers can be
/// buffered): a small reply handed over in pieces below it leaves with its
/// headers and trailers in one write.
pub const PIECE_BYTES: usize = 1000;

/// Replies up to this size are handed over in [`PIECE_BYTES`] pieces.
pub const PIECED_REPLY_BYTES: usize = 4 * PIECE_BYTES;

/// The bytes of a request body as received, frame by frame.
#[derive(Default)]
pub struct Frames {
    chunks: VecDeque<Bytes>,
    remaining: usize,
}

impl Frames {
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.remaining += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// The first `len` bytes as a buffer of their own (the rest stays).
    pub fn split_to(&mut self, len: usize) -> Frames {
        let mut taken = Frames::default();
        let mut wanted = len.min(self.remaining);
        while wanted > 0 {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let piece = if front.len() <= wanted {
                self.chunks.pop_front().unwrap_or_default()
            } else {
                front.split_to(wanted)
            };
            wanted -= piece.len();
            self.remaining -= piece.len();
            taken.push(piece);
        }
        taken
    }
}

impl Buf for Frames {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map(|c| c.as_ref()).unwrap_or_default()
    }

    fn advance(&mut self, mut cnt: usize) {
        // `Buf::advance` must not be called past `remaining` (prost never
        // does); clamp instead of panicking all the same.
        cnt = cnt.min(self.remaining);
        self.remaining -= cnt;
        while cnt > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if front.len() <= cnt {
                cnt -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(cnt);
                cnt = 0;
            }
        }
    }

    /// A slice of the frame when it holds all `len` bytes (no copy); one
    /// copy into a fresh, aligned allocation when they straddle frames.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        let len = len.min(self.remaining);
        if let Some(front) = self.chunks.front_mut() {
            if front.len() >= len {
                let bytes = front.split_to(len);
                self.remaining -= len;
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                return bytes;
            }
        }
        let mut gathered = Vec::with_capacity(len);
        let mut taken = self.split_to(len);
        while taken.has_remaining() {
            let chunk = taken.chunk();
            gathered.extend_from_slice(chunk);
            let n = chunk.len();
            taken.advance(n);
        }
        Bytes::from(gathered)
    }
}

/// Why a request body is not one well-formed gRPC message.
#[derive(Debug, PartialEq, Eq)]
pub enum FramingError {
    /// The compression flag is set (the server accepts no compressed
    /// requests) or is neither 0 nor 1.
    Compressed(u8),
    /// The declared length is above the limit.
    TooLarge { declared: usize, limit: usize },
}

/// The gRPC prefix at the start of `frames`, once all of its 5 bytes are
/// there: the message's declared length.
pub fn message_length(frames: &Frames, limit: usize) -> Option<Result<usize, FramingError>> {
    if frames.remaining() < PREFIX_BYTES {
        return None;
    }
    let mut prefix = [0u8; PREFIX_BYTES];
    let mut copied = 0;
    for chunk in &frames.chunks {
        let n = (PREFIX_BYTES - copied).min(chunk.len());
        prefix[copied..copied + n].copy_from_slice(&chunk[..n]);
        copied += n;
        if copied == PREFIX_BYTES {
            break;
        }
    }
    let flag = prefix[0];
    if flag != 0 {
        return Some(Err(FramingError::Compressed(flag)));
    }
    let declared = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if declared > limit {
        return Some(Err(FramingError::TooLarge { declared, limit }));
    }
    Some(Ok(declared))
}

/// Decodes the request message of `frames` (prefix included, all of it
/// received).
pub fn decode_request(
    mut frames: Frames,
    length: usize,
) -> Result<pb::ForwardRequest, prost::DecodeError> {
    frames.advance(PREFIX_BYTES);
    let message = frames.split_to(length);
    pb::ForwardRequest::decode(message)
}

/// The reply message with its gRPC prefix, as body chunks: the tensor's
/// bytes (when at least [`SPLICE_BYTES`]) a chunk of their own, small
/// replies in [`PIECE_BYTES`] pieces. Fails with the encoded length when it
/// is above `limit`.
pub fn encode_reply(mut response: pb::ForwardResponse, limit: usize) -> Result<Vec<Bytes>, usize> {
    let raw = match response.output.as_mut().map(|output| output.values.take()) {
        Some(Some(pb::tensor::Values::Raw(raw))) if raw.len() >= SPLICE_BYTES => raw,
        Some(values) => {
            if let (Some(output), Some(values)) = (response.output.as_mut(), values) {
                output.values = Some(values);
            }
            return encode_whole(&response, limit);
        }
        None => return encode_whole(&response, limit),
    };
    let Some(output) = response.output.take() else {
        return encode_whole(&response, limit);
    };
    const OUTPUT_KEY: u8 = 1 << 3 | 2; // field 1, length-delimited
    const RAW_KEY: u8 = 3 << 3 | 2; // Tensor field 3, length-delimited
    let tensor_head = output.encoded_len();
    let tensor_len = tensor_head + 1 + prost::length_delimiter_len(raw.len()) + raw.len();
    let rest = response.encoded_len();
    let message_len = rest + 1 + prost::length_delimiter_len(tensor_len) + tensor_len;
    if message_len > limit || message_len > u32::MAX as usize {
        return Err(message_len);
    }
    let head_len = PREFIX_BYTES + message_len - raw.len();
    let mut head = BytesMut::with_capacity(head_len);
    head.put_u8(0);
    head.put_u32(message_len as u32);
    // A step's statistics (packed float64) written whole; prost's bytes.
    crate::proto_codec::encode_message(&response, &mut head);
    head.put_u8(OUTPUT_KEY);
    let _ = prost::encode_length_delimiter(tensor_len, &mut head);
    let _ = output.encode(&mut head);
    head.put_u8(RAW_KEY);
    let _ = prost::encode_length_delimiter(raw.len(), &mut head);
    Ok(vec![head.freeze(), raw])
}

fn encode_whole(response: &pb::ForwardResponse, limit: usize) -> Result<Vec<Bytes>, usize> {
    let message_len = response.encoded_len();
    if message_len > limit || message_len > u32::MAX as usize {
        return Err(message_len);
    }
    let mut buf = BytesMut::with_capacity(PREFIX_BYTES + message_len);
    buf.put_u8(0);
    buf.put_u32(message_len as u32);
    crate::proto_codec::encode_message(response, &mut buf);
    let mut whole = buf.freeze();
    if whole.len() > PIECED_REPLY_BYTES {
        return Ok(vec![whole]);
    }
    let mut pieces = Vec::with_capacity(whole.len().div_ceil(PIECE_BYTES));
    while whole.len() > PIECE_BYTES {
        pieces.push(whole.split_to(PIECE_BYTES));
    }
    pieces.push(whole);
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn tensor(len: usize) -> pb::Tensor {
        pb::Tensor {
            dtype: pb::DataType::Float32 as i32,
            shape: vec![(len / 4) as i64],
            values: Some(pb::tensor::Values::Raw(Bytes::from(
                (0..len).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>(),
            ))),
        }
    }

    fn response(len: usize) -> pb::ForwardResponse {
        pb::ForwardResponse {
            output: Some(tensor(len)),
            version: 300,
            num_batches_tracked: 12,
            replayed: true,
            ..Default::default()
        }
    }

    fn joined(chunks: &[Bytes]) -> Vec<u8> {
        chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    /// The message behind a prefix, checked against the prefix.
    fn unprefixed(bytes: &[u8]) -> &[u8] {
        assert_eq!(bytes[0], 0);
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        assert_eq!(len, bytes.len() - PREFIX_BYTES);
        &bytes[PREFIX_BYTES..]
    }

    #[test]
    fn spliced_replies_decode_as_prost_encoded_them() {
        for len in [SPLICE_BYTES, SPLICE_BYTES + 4, 1 << 20] {
            let original = response(len);
            let chunks = encode_reply(original.clone(), usize::MAX).unwrap();
            assert_eq!(
                chunks.len(),
                2,
                "the tensor's bytes are a chunk of their own"
            );
            let pb::tensor::Values::Raw(raw) =
                original.output.as_ref().unwrap().values.clone().unwrap()
            else {
                unreachable!()
            };
            assert_eq!(chunks[1].as_ptr(), raw.as_ptr(), "no copy of the tensor");
            let bytes = joined(&chunks);
            let message = unprefixed(&bytes);
            // prost's own encoding is the same size and decodes the same.
            assert_eq!(message.len(), original.encoded_len());
            assert_eq!(pb::ForwardResponse::decode(message).unwrap(), original);
        }
    }

    #[test]
    fn small_replies_are_prost_encoding_in_pieces() {
        for len in [0, 4, 1024, 3000, SPLICE_BYTES - 4] {
            let original = response(len);
            let chunks = encode_reply(original.clone(), usize::MAX).unwrap();
            let bytes = joined(&chunks);
            assert_eq!(unprefixed(&bytes), original.encode_to_vec().as_slice());
            if bytes.len() <= PIECED_REPLY_BYTES {
                assert!(chunks.iter().all(|c| c.len() <= PIECE_BYTES));
            } else {
                assert_eq!(chunks.len(), 1);
            }
        }
        // Typed values and no output at all.
        let typed = pb::ForwardResponse {
            output: Some(pb::Tensor {
                dtype: pb::DataType::Float64 as i32,
                shape: vec![2],
                values: Some(pb::tensor::Values::DoubleValues(pb::DoubleValues {
                    values: vec![1.5, -2.0],
                })),
            }),
            version: 1,
            ..Default::default()
        };
        for original in [typed, pb::ForwardResponse::default()] {
            let bytes = joined(&encode_reply(original.clone(), usize::MAX).unwrap());
            assert_eq!(unprefixed(&bytes), original.encode_to_vec().as_slice());
        }
    }

    #[test]
    fn replies_over_the_limit_are_refused_with_their_length() {
        let original = response(1 << 20);
        let expected = original.encoded_len();
        assert_eq!(encode_reply(original, 1000), Err(expected));
        let small = response(64);
        let expected = small.encoded_len();
        assert_eq!(encode_reply(small, 10), Err(expected));
    }

    fn request(len: usize) -> pb::ForwardRequest {
        pb::ForwardRequest {
            session_id: "tenant-session".to_owned(),
            input: Some(tensor(len)),
            mode: 1,
            expected_version: Some(7),
            request_id: "r-1".to_owned(),
            ..Default::default()
        }
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&(message.len() as u32).to_be_bytes());
        bytes.extend_from_slice(message);
        bytes
    }

    /// `bytes` cut at `cuts` into frames.
    fn frames_of(bytes: &[u8], cuts: &[usize]) -> Frames {
        let mut frames = Frames::default();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
            frames.push(Bytes::copy_from_slice(&bytes[start..cut]));
            start = cut;
        }
        frames
    }

    #[test]
    fn requests_decode_from_frames_split_anywhere() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        for len in [0usize, 4, 1024, 70_000] {
            let original = request(len);
            let encoded = original.encode_to_vec();
            let bytes = framed(&encoded);
            for _ in 0..64 {
                let count = rng.random_range(0..6);
                let mut cuts: Vec<usize> = (0..count)
                    .map(|_| rng.random_range(0..=bytes.len()))
                    .collect();
                cuts.sort_unstable();
                let frames = frames_of(&bytes, &cuts);
                let length = message_length(&frames, usize::MAX).unwrap().unwrap();
                assert_eq!(length, encoded.len());
                let decoded = decode_request(frames, length).unwrap();
                assert_eq!(decoded, original, "cuts {cuts:?}");
            }
        }
    }

    #[test]
    fn raw_bytes_inside_one_frame_are_not_copied() {
        let original = request(4096);
        let bytes = Bytes::from(framed(&original.encode_to_vec()));
        let mut frames = Frames::default();
        frames.push(bytes.clone());
        let length = message_length(&frames, usize::MAX).unwrap().unwrap();
        let decoded = decode_request(frames, length).unwrap();
        let Some(pb::tensor::Values::Raw(raw)) = decoded.input.unwrap().values else {
            panic!("raw values expected");
        };
        let start = raw.as_ptr() as usize - bytes.as_ptr() as usize;
        assert!(
            start < bytes.len(),
            "the raw bytes are a slice of the frame"
        );
    }

    #[test]
    fn malformed_requests_are_errors_not_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(61);
        let encoded = request(256).encode_to_vec();
        for _ in 0..2000 {
            let mut message = encoded.clone();
            // Flip, truncate or garble.
            match rng.random_range(0..3) {
                0 => {
                    let at = rng.random_range(0..message.len());
                    message[at] ^= 1 << rng.random_range(0..8);
                }
                1 => message.truncate(rng.random_range(0..message.len())),
                _ => {
                    for byte in message.iter_mut().take(16) {
                        *byte = rng.random();
                    }
                }
            }
            let bytes = framed(&message);
            let cut = rng.random_range(0..=bytes.len());
            let frames = frames_of(&bytes, &[cut]);
            let length = message_length(&frames, usize::MAX).unwrap().unwrap();
            // The oracle: prost on the contiguous bytes.
            let expected = pb::ForwardRequest::decode(message.as_slice());
            let decoded = decode_request(frames, length);
            assert_eq!(decoded.is_ok(), expected.is_ok());
            if let (Ok(decoded), Ok(expected)) = (decoded, expected) {
                assert_eq!(decoded, expected);
            }
        }
    }

    #[test]
    fn prefixes_are_checked_before_anything_is_read() {
        let mut frames = Frames::default();
        frames.push(Bytes::from_static(&[0, 0, 0]));
        assert_eq!(message_length(&frames, 100), None);
        frames.push(Bytes::from_static(&[1, 200]));
        assert_eq!(
            message_length(&frames, 100),
            Some(Err(FramingError::TooLarge {
                declared: 456,
                limit: 100
            }))
        );
        let mut compressed = Frames::default();
        compressed.push(Bytes::from_static(&[1, 0, 0, 0, 0]));
        assert_eq!(
            message_length(&compressed, 100),
            Some(Err(FramingError::Compressed(1)))
        );
    }
}
