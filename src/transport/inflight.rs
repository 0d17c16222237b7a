//! Messages in flight against the memory budget: a tower layer that charges
//! request messages as they arrive and reply messages as they are sent, so a
//! flood of large requests is refused before the server holds them.
//!
//! Requests: the body is read through a parser of gRPC's length prefixes (a
//! flag byte and a 4-byte big-endian length before each message). When a
//! prefix arrives, the whole message it announces is charged at once, before
//! tonic buffers any of it; a message that does not fit ends the body with
//! RESOURCE_EXHAUSTED naming the budget (the handler never runs, nothing is
//! applied). A message stays charged until the call ends — a unary request
//! is held through its computation — except on streams, where only the last
//! two messages are (the one being received and the one being computed on;
//! what a stream computes ahead is the stream's own charge, as look-ahead).
//! Messages announced above `--max-message-bytes` are left to tonic, which
//! refuses them after the prefix without reading them.
//!
//! Small messages (up to [`SMALL_MESSAGE_BYTES`]) are charged but never
//! refused: they cost little, and refusing them once sessions fill the
//! budget would stop health checks and every call on the existing sessions.
//! Their total is bounded by the calls in progress (the per-connection
//! stream limit, `--max-concurrent-requests`).
//!
//! Replies: each data frame is charged while it is being sent (until the
//! next one is asked for, or the call ends), without refusal: a reply is
//! computed already, and an applied mutation's answer must not be lost. It
//! counts, so that new requests are refused while large replies are out.
//!
//! Owns no domain logic and knows nothing of sessions.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::Frame;
use tonic::body::Body;
use tonic::Status;

use crate::memory::{Charge, Kind, MemoryBudget, ALWAYS_ADMITTED_BYTES};

/// Messages up to this size (length prefix included) are charged but never
/// refused.
pub const SMALL_MESSAGE_BYTES: u64 = ALWAYS_ADMITTED_BYTES;

/// gRPC's length prefix: a compression flag and a 4-byte length.
const PREFIX_BYTES: usize = 5;

/// The tower layer of [`InflightBytes`].
#[derive(Clone)]
pub struct InflightLayer {
    budget: Arc<MemoryBudget>,
    max_message_bytes: u64,
}

impl InflightLayer {
    /// Charges messages to `budget`; those announced above
    /// `max_message_bytes` are left to tonic's own limit.
    pub fn new(budget: Arc<MemoryBudget>, max_message_bytes: usize) -> InflightLayer {
        InflightLayer {
            budget,
            max_message_bytes: max_message_bytes as u64,
        }
    }
}

impl<S> tower::Layer<S> for InflightLayer {
    type Service = InflightBytes<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InflightBytes {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct InflightBytes<S> {
    inner: S,
    layer: InflightLayer,
}

impl<S> tower::Service<http::Request<Body>> for InflightBytes<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let budget = &self.layer.budget;
        // Shared by the request body (which tonic may drop once it decoded a
        // unary message) and the reply: the call's requests stay charged
        // until its reply is sent or the call is dropped.
        let requests = Arc::new(Mutex::new(budget.empty(Kind::Requests)));
        let request = request.map(|body| {
            Body::new(ChargedRequest {
                body,
                requests: requests.clone(),
                max_message_bytes: self.layer.max_message_bytes,
                prefix: Prefix::default(),
                held: [0, 0],
            })
        });
        let replies = budget.empty(Kind::Replies);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                Body::new(ChargedReply {
                    body,
                    replies,
                    _requests: requests,
                })
            }))
        })
    }
}

/// Where the parser is in the request's message framing.
#[derive(Default)]
struct Prefix {
    /// Bytes of the current length prefix read so far (0 to 5).
    read: usize,
    bytes: [u8; PREFIX_BYTES],
    /// Bytes of the current message still to come after its prefix.
    message_left: u64,
}

/// A request body whose messages are charged as their prefixes arrive.
struct ChargedRequest {
    body: Body,
    requests: Arc<Mutex<Charge>>,
    max_message_bytes: u64,
    prefix: Prefix,
    /// Charged bytes of the previous and the current message.
    held: [u64; 2],
}

impl ChargedRequest {
    /// Walks `data` through the framing, charging each message whose prefix
    /// completes in it.
    fn account(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.prefix.message_left > 0 {
                let step = self.prefix.message_left.min(data.len() as u64);
                self.prefix.message_left -= step;
                data.advance(step as usize);
                continue;
            }
            let take = (PREFIX_BYTES - self.prefix.read).min(data.len());
            self.prefix.bytes[self.prefix.read..self.prefix.read + take]
                .copy_from_slice(&data[..take]);
            self.prefix.read += take;
            data.advance(take);
            if self.prefix.read == PREFIX_BYTES {
                let [_, a, b, c, d] = self.prefix.bytes;
                let length = u64::from(u32::from_be_bytes([a, b, c, d]));
                self.prefix = Prefix {
                    message_left: length,
                    ..Prefix::default()
                };
                self.charge_message(length)?;
            }
        }
        Ok(())
    }

    /// A new message of `length` bytes: the one before the previous is given
    /// back, this one charged (refused when large and over the budget).
    fn charge_message(&mut self, length: u64) -> Result<(), Status> {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        requests.shrink(self.held[0]);
        self.held = [self.held[1], 0];
        if length > self.max_message_bytes {
            // tonic refuses it from the prefix alone, without buffering it.
            return Ok(());
        }
        let bytes = length + PREFIX_BYTES as u64;
        if bytes <= SMALL_MESSAGE_BYTES {
            requests.grow_anyway(bytes);
        } else {
            requests
                .try_grow(bytes)
                .map_err(|refused| Status::resource_exhausted(refused.to_string()))?;
        }
        self.held[1] = bytes;
        Ok(())
    }
}

impl http_body::Body for ChargedRequest {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let data = data.clone();
                if let Err(refused) = self.account(&data) {
                    return Poll::Ready(Some(Err(refused)));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A reply body whose data frames are charged while sent; it keeps the
/// call's request charge alive until the reply ends.
struct ChargedReply {
    body: Body,
    replies: Charge,
    _requests: Arc<Mutex<Charge>>,
}

impl http_body::Body for ChargedReply {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(frame) = &polled {
            // Asked for the next frame: the previous one was handed on.
            let sent = self.replies.bytes();
            self.replies.shrink(sent);
            if let Some(Ok(frame)) = frame {
                if let Some(data) = frame.data_ref() {
                    let bytes = data.len() as u64;
                    self.replies.grow_anyway(bytes);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request(budget: &Arc<MemoryBudget>) -> ChargedRequest {
        ChargedRequest {
            body: Body::empty(),
            requests: Arc::new(Mutex::new(budget.empty(Kind::Requests))),
            max_message_bytes: 1 << 30,
            prefix: Prefix::default(),
            held: [0, 0],
        }
    }

    fn prefix(length: u32) -> Vec<u8> {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes
    }

    #[test]
    fn a_message_is_charged_whole_when_its_prefix_arrives_even_split_across_frames() {
        let budget = MemoryBudget::new(1 << 20);
        let mut body = request(&budget);
        let header = prefix(100_000);
        body.account(&header[..2]).unwrap();
        assert_eq!(budget.charged(), 0);
        body.account(&header[2..]).unwrap();
        assert_eq!(budget.charged(), 100_005);
        // Its bytes arriving charge nothing more.
        body.account(&vec![7u8; 100_000]).unwrap();
        assert_eq!(budget.charged(), 100_005);
    }

    #[test]
    fn streams_hold_their_last_two_messages_and_a_large_one_over_the_budget_is_refused() {
        let budget = MemoryBudget::new(250_000);
        let mut body = request(&budget);
        for _ in 0..3 {
            let mut frame = prefix(100_000);
            frame.extend(vec![0u8; 100_000]);
            body.account(&frame).unwrap();
        }
        assert_eq!(budget.charged(), 200_010);
        let refused = body.account(&prefix(150_000)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--memory-budget"), "{refused:?}");
        // Small messages pass whatever the budget holds.
        let _full = budget.charge_anyway(1 << 20, Kind::Sessions);
        body.account(&prefix(10)).unwrap();
        drop(body);
        drop(_full);
        assert_eq!(budget.charged(), 0);
    }
}
