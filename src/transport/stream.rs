//! Streams of independent requests (ForwardStream, Triton's
//! ModelStreamInfer): one loop for both that reads each message, has it
//! answered, and sends the answers in order. The loop stays part of the
//! request that opened the stream (its span, its RPC label, its deadline),
//! and it ends the stream — after the answers already sent — on a broken or
//! oversized frame (the bytes that follow cannot be trusted to start a new
//! message), on a token revoked since the stream opened (checked before each
//! message is applied), or when the client goes away.

use std::future::Future;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::{auth, status};
use crate::auth::Credential;

/// Answers computed ahead of what the client has read, at most.
const LOOK_AHEAD: usize = 16;

/// Answers every message of `inbound` with `answer`, in order, as the
/// response stream of the current request. `credential`: the one the
/// request was admitted with (None without authentication).
pub fn answer_each<Req, Resp, F, Fut>(
    mut inbound: Streaming<Req>,
    credential: Option<Credential>,
    mut answer: F,
) -> ReceiverStream<Result<Resp, Status>>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: FnMut(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Resp> + Send,
{
    let (replies, receiver) = mpsc::channel(LOOK_AHEAD);
    let rpc = crate::telemetry::current_rpc();
    let deadline = crate::compute::current_deadline();
    let stream_loop = crate::telemetry::in_request(rpc, async move {
        loop {
            let request = match inbound.message().await {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(error) => {
                    let _ = replies.send(Err(status::decoding_error(error))).await;
                    break;
                }
            };
            if let Err(refused) = auth::check_still_authorized(credential.as_ref()) {
                let _ = replies.send(Err(refused)).await;
                break;
            }
            if replies.send(Ok(answer(request).await)).await.is_err() {
                break; // the client went away
            }
        }
    });
    tokio::spawn(crate::compute::with_deadline(deadline, stream_loop));
    ReceiverStream::new(receiver)
}
