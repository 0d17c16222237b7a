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
//! ForwardStream answers the messages already received when it reads one as
//! a group ([`answer_groups`]), so their mutations share commits;
//! ReduceStatisticsStream too ([`answer_waiting_groups`]), so that its
//! messages of different sessions wait in their barriers side by side, and
//! its group is dropped (its waiting ranks withdrawn) as soon as the client
//! goes away instead of once it is answered; the group
//! is bounded in count and bytes, by the look-ahead's free room, and its
//! messages are charged to the memory budget while held. Looking for them
//! does not wait for the client (it arms no idle timer).
//!
//! Answers computed ahead of what the client has taken are bounded in bytes
//! (`--stream-look-ahead-bytes`, [`LookAhead`]): past the bound the loop
//! reads no further message until the client reads, so a client that never
//! reads holds at most that much (one answer always goes through, however
//! large). Those answers are also counted in the memory budget
//! (`--memory-budget`, kind `stream_lookahead`) until the connection takes
//! them; never refused there, since each output was charged (and refused
//! when it did not fit) before it was computed. What the HTTP/2 stream window
//! lets the server send before the client reads comes on top.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::{Status, Streaming};

use super::{auth, idle, status};
use crate::auth::Credential;
use crate::memory::budget::{Charge, Kind, MemoryBudget};

/// Bytes of answers a stream may have computed and not yet handed to the
/// client's connection (`--stream-look-ahead-bytes`).
#[derive(Clone, Debug)]
pub struct LookAhead {
    bytes: u32,
    budget: Arc<MemoryBudget>,
}

impl LookAhead {
    /// At most `bytes` ahead (at least 1; at most 4 GiB, the most one
    /// semaphore counts in a single acquisition), counted in `budget`.
    pub fn new(bytes: u64, budget: Arc<MemoryBudget>) -> LookAhead {
        LookAhead {
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX).max(1),
            budget,
        }
    }
}

/// An answer, its share of the look-ahead and its charge in the memory
/// budget, both returned when the client's connection takes it.
type Queued<Resp> = (Result<Resp, Status>, Option<(OwnedSemaphorePermit, Charge)>);

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
            .map(|queued| queued.map(|(answer, _held)| answer))
    }
}

/// At most this many messages answered as one group: enough to share one
/// commit among the small messages a pipelining client has in flight.
pub const MAX_GROUP_MESSAGES: usize = 64;
/// At most this many bytes of messages in one group (the first message
/// always goes, whatever its size): past a few MiB a message's compute
/// outweighs a commit, so larger groups gain nothing and only hold memory.
pub const MAX_GROUP_BYTES: usize = 4 << 20;

/// Answers every message of `inbound` with `answer`, in order, as the
/// response stream of the current request, at most `look_ahead` bytes of
/// answers ahead of the client. `credential`: the one the request was
/// admitted with (None without authentication).
pub fn answer_each<Req, Resp, F, Fut>(
    inbound: Streaming<Req>,
    credential: Option<Credential>,
    look_ahead: LookAhead,
    mut answer: F,
) -> Replies<Resp>
where
    Req: prost::Message + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnMut(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Resp> + Send,
{
    let one_at_a_time = move |group: Vec<Req>| {
        let answers: Vec<Fut> = group.into_iter().map(&mut answer).collect();
        async move {
            let mut replies = Vec::with_capacity(answers.len());
            for answer in answers {
                replies.push(answer.await);
            }
            replies
        }
    };
    run(
        inbound,
        credential,
        look_ahead,
        1,
        OnDeparture::Finish,
        one_at_a_time,
    )
}

/// As [`answer_each`], but the messages already received when one is read
/// (at most [`MAX_GROUP_MESSAGES`] and [`MAX_GROUP_BYTES`], and no more than
/// the look-ahead has room for) are handed to `answer` together, which
/// answers each of them, in order (one answer per message); their answers
/// are sent in order once all of them are ready.
pub fn answer_groups<Req, Resp, F, Fut>(
    inbound: Streaming<Req>,
    credential: Option<Credential>,
    look_ahead: LookAhead,
    answer: F,
) -> Replies<Resp>
where
    Req: prost::Message + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnMut(Vec<Req>) -> Fut + Send + 'static,
    Fut: Future<Output = Vec<Resp>> + Send,
{
    run(
        inbound,
        credential,
        look_ahead,
        MAX_GROUP_MESSAGES,
        OnDeparture::Finish,
        answer,
    )
}

/// As [`answer_groups`], for answers that wait on others (a synchronized
/// step's barrier): when the client goes away (the response stream is
/// dropped) the group being answered is dropped at once, so that its
/// waiting messages withdraw, rather than answered first.
pub fn answer_waiting_groups<Req, Resp, F, Fut>(
    inbound: Streaming<Req>,
    credential: Option<Credential>,
    look_ahead: LookAhead,
    answer: F,
) -> Replies<Resp>
where
    Req: prost::Message + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnMut(Vec<Req>) -> Fut + Send + 'static,
    Fut: Future<Output = Vec<Resp>> + Send,
{
    run(
        inbound,
        credential,
        look_ahead,
        MAX_GROUP_MESSAGES,
        OnDeparture::Withdraw,
        answer,
    )
}

/// What happens to the group being answered when the client goes away.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnDeparture {
    /// It is answered to the end (its mutations applied), then the loop ends.
    Finish,
    /// It is dropped at once (what it waits for is given up).
    Withdraw,
}

/// How the stream ends after the group being answered.
enum Ending {
    /// The client half-closed the stream.
    Closed,
    /// A broken or oversized frame: answered with this status, then ended.
    Broken(Status),
}

/// The loop of [`answer_each`], [`answer_groups`] and
/// [`answer_waiting_groups`]: groups of at most `max_group` messages.
fn run<Req, Resp, F, Fut>(
    mut inbound: Streaming<Req>,
    credential: Option<Credential>,
    look_ahead: LookAhead,
    max_group: usize,
    on_departure: OnDeparture,
    mut answer: F,
) -> Replies<Resp>
where
    Req: prost::Message + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnMut(Vec<Req>) -> Fut + Send + 'static,
    Fut: Future<Output = Vec<Resp>> + Send,
{
    // Unbounded in count, bounded in bytes by the semaphore: every answer
    // takes its encoded size from it (the bound, for larger ones) first.
    let (replies, receiver) = mpsc::unbounded_channel::<Queued<Resp>>();
    let window = Arc::new(Semaphore::new(look_ahead.bytes as usize));
    let rpc = crate::telemetry::current_rpc();
    let deadline = crate::compute::current_deadline();
    let caller = crate::compute::current_caller();
    let stream_loop = crate::telemetry::in_request(rpc, async move {
        // A message read ahead that did not fit in the last group.
        let mut carried: Option<Req> = None;
        loop {
            let first = match carried.take() {
                Some(request) => request,
                None => match inbound.message().await {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(error) => {
                        let _ = replies.send((Err(status::decoding_error(error)), None));
                        break;
                    }
                },
            };
            // The messages already here join the first, while their answers
            // (about their size: a Forward's output is its input's size) fit
            // in what the look-ahead has free.
            let mut room = window
                .available_permits()
                .min(MAX_GROUP_BYTES)
                .saturating_sub(first.encoded_len());
            let mut group = vec![first];
            // The messages taken ahead are held until the group is answered:
            // charged as requests in flight (the body charges only the
            // message it receives and the one computed on), and left for the
            // next group when the budget has no room for them.
            let mut held: Vec<Charge> = Vec::new();
            let mut ending = None;
            while group.len() < max_group {
                match idle::peek(|| already_received(&mut inbound)) {
                    None => break,
                    Some(Ok(Some(request))) => {
                        let size = request.encoded_len();
                        let charge = (size <= room)
                            .then(|| look_ahead.budget.try_charge(size as u64, Kind::Requests))
                            .and_then(Result::ok);
                        let Some(charge) = charge else {
                            carried = Some(request);
                            break;
                        };
                        room -= size;
                        held.push(charge);
                        group.push(request);
                    }
                    Some(Ok(None)) => {
                        ending = Some(Ending::Closed);
                        break;
                    }
                    Some(Err(error)) => {
                        ending = Some(Ending::Broken(status::decoding_error(error)));
                        break;
                    }
                }
            }
            // Checked before the group is applied: every message of it is
            // applied at once, after this check.
            if let Err(refused) = auth::check_still_authorized(credential.as_ref()) {
                let _ = replies.send((Err(refused), None));
                break;
            }
            let answers = match on_departure {
                OnDeparture::Finish => answer(group).await,
                OnDeparture::Withdraw => tokio::select! {
                    answers = answer(group) => answers,
                    () = replies.closed() => return, // the client went away
                },
            };
            drop(held);
            for reply in answers {
                let share = u32::try_from(reply.encoded_len())
                    .unwrap_or(u32::MAX)
                    .clamp(1, look_ahead.bytes);
                // Waits while the answers not yet taken fill the look-ahead;
                // the semaphore is never closed.
                let Ok(permit) = window.clone().acquire_many_owned(share).await else {
                    return;
                };
                let charge = look_ahead
                    .budget
                    .charge_anyway(u64::from(share), Kind::StreamLookahead);
                if replies.send((Ok(reply), Some((permit, charge)))).is_err() {
                    return; // the client went away
                }
            }
            match ending {
                None => {}
                Some(Ending::Closed) => break,
                Some(Ending::Broken(status)) => {
                    let _ = replies.send((Err(status), None));
                    break;
                }
            }
        }
    });
    tokio::spawn(crate::compute::as_caller(
        caller,
        crate::compute::with_deadline(deadline, stream_loop),
    ));
    Replies { receiver }
}

/// The next message if it has already arrived (decoded from what the
/// connection holds), without waiting: None when it has not.
fn already_received<Req: prost::Message + Send + 'static>(
    inbound: &mut Streaming<Req>,
) -> Option<Result<Option<Req>, Status>> {
    let mut context = Context::from_waker(Waker::noop());
    match Pin::new(inbound).poll_next(&mut context) {
        Poll::Pending => None,
        Poll::Ready(None) => Some(Ok(None)),
        Poll::Ready(Some(result)) => Some(result.map(Some)),
    }
}
