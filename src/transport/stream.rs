//! Streams of independent requests (ForwardStream, Triton's
//! ModelStreamInfer): one loop for both that reads each message, has it
//! answered, and sends the answers in order. The loop stays part of the
//! request that opened the stream (its span, its RPC label, its deadline,
//! its caller for fair scheduling), and it ends the stream — after the
//! answers already sent — on a broken or oversized frame (the bytes that
//! follow cannot be trusted to start a new message), on a token revoked since
//! the stream opened (checked before each message is applied), when the
//! client sent nothing for `--request-idle-timeout-seconds` while its next
//! message was awaited, or when the client goes away.
//!
//! Answers computed ahead of what the client has taken are bounded in bytes
//! (`--stream-look-ahead-bytes`, [`LookAhead`]): past the bound the loop
//! reads no further message until the client reads, so a client that never
//! reads holds at most that much (one answer always goes through, however
//! large). What the HTTP/2 stream window lets the server send before the
//! client reads comes on top.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::{Status, Streaming};

use super::{auth, status};
use crate::auth::Credential;

/// Bytes of answers a stream may have computed and not yet handed to the
/// client's connection (`--stream-look-ahead-bytes`).
#[derive(Clone, Copy, Debug)]
pub struct LookAhead {
    bytes: u32,
}

impl LookAhead {
    /// At most `bytes` ahead (at least 1; at most 4 GiB, the most one
    /// semaphore counts in a single acquisition).
    pub fn new(bytes: u64) -> LookAhead {
        LookAhead {
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX).max(1),
        }
    }
}

/// An answer and its share of the look-ahead, returned when the client's
/// connection takes it.
type Queued<Resp> = (Result<Resp, Status>, Option<OwnedSemaphorePermit>);

/// The answers of [`answer_each`], as the response stream of its request.
pub struct Replies<Resp> {
    receiver: mpsc::UnboundedReceiver<Queued<Resp>>,
}

impl<Resp> Stream for Replies<Resp> {
    type Item = Result<Resp, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // The permit is dropped here: the answer leaves the look-ahead as
        // the connection takes it to encode and send.
        self.receiver
            .poll_recv(cx)
            .map(|queued| queued.map(|(answer, _permit)| answer))
    }
}

/// Answers every message of `inbound` with `answer`, in order, as the
/// response stream of the current request, at most `look_ahead` bytes of
/// answers ahead of the client. `credential`: the one the request was
/// admitted with (None without authentication).
pub fn answer_each<Req, Resp, F, Fut>(
    mut inbound: Streaming<Req>,
    credential: Option<Credential>,
    look_ahead: LookAhead,
    mut answer: F,
) -> Replies<Resp>
where
    Req: Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnMut(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Resp> + Send,
{
    // Unbounded in count, bounded in bytes by the semaphore: every answer
    // takes its encoded size from it (the bound, for larger ones) first.
    let (replies, receiver) = mpsc::unbounded_channel::<Queued<Resp>>();
    let budget = Arc::new(Semaphore::new(look_ahead.bytes as usize));
    let rpc = crate::telemetry::current_rpc();
    let deadline = crate::compute::current_deadline();
    let caller = crate::compute::current_caller();
    let stream_loop = crate::telemetry::in_request(rpc, async move {
        loop {
            let request = match inbound.message().await {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(error) => {
                    let _ = replies.send((Err(status::decoding_error(error)), None));
                    break;
                }
            };
            if let Err(refused) = auth::check_still_authorized(credential.as_ref()) {
                let _ = replies.send((Err(refused), None));
                break;
            }
            let reply = answer(request).await;
            let share = u32::try_from(reply.encoded_len())
                .unwrap_or(u32::MAX)
                .clamp(1, look_ahead.bytes);
            // Waits while the answers not yet taken fill the look-ahead;
            // the semaphore is never closed.
            let Ok(permit) = budget.clone().acquire_many_owned(share).await else {
                break;
            };
            if replies.send((Ok(reply), Some(permit))).is_err() {
                break; // the client went away
            }
        }
    });
    tokio::spawn(crate::compute::as_caller(
        caller,
        crate::compute::with_deadline(deadline, stream_loop),
    ));
    Replies { receiver }
}
