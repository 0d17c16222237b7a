//! Idle request bodies: a call that sends nothing while the server waits
//! for its next bytes (the request's message, a stream's next message, the
//! end of a unary request) for longer than `--request-idle-timeout-seconds`
//! fails with DEADLINE_EXCEEDED, and whatever it held (its admission place,
//! its HTTP/2 stream) is freed as its call ends.
//!
//! Only the time the server spends waiting counts: a stream whose next
//! message is not read yet (its answers are still being computed, or the
//! client does not read them) is not idle. Each frame that arrives starts
//! the count again, so a large message arriving slowly is not cut off.
//!
//! Owns no domain logic and knows nothing of gRPC methods.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Sleep;
use tonic::body::Body;
use tonic::Status;

tokio::task_local! {
    /// Set while a stream looks at what has already arrived without waiting.
    static PEEKING: ();
}

/// Runs `look` as a look at what the client has already sent: a body found
/// empty inside it was not awaited, so it arms no idle timer (the stream may
/// then compute for a while before it waits for the client).
pub fn peek<T>(look: impl FnOnce() -> T) -> T {
    PEEKING.sync_scope((), look)
}

/// A request body that fails once the client has sent nothing for
/// `limit` while it was awaited.
pub struct IdleBody {
    body: Body,
    limit: Option<Duration>,
    /// Armed when a poll finds nothing, disarmed when a frame arrives.
    timer: Option<Pin<Box<Sleep>>>,
    expired: bool,
}

impl IdleBody {
    /// `body` ended after `limit` without a frame; `None`: never.
    pub fn new(body: Body, limit: Option<Duration>) -> IdleBody {
        IdleBody {
            body,
            limit,
            timer: None,
            expired: false,
        }
    }
}

/// The status of a call ended for sending nothing for `limit`.
pub fn idle_status(limit: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "the call sent nothing for {} s while the server waited for its message \
         (request_idle_timeout_seconds); it was ended, and no message after the \
         ones already answered was applied",
        limit.as_secs_f64()
    ))
}

impl http_body::Body for IdleBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        if self.expired {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.timer = None;
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let Some(limit) = this.limit else {
                    return Poll::Pending;
                };
                if PEEKING.try_with(|_| ()).is_ok() {
                    return Poll::Pending;
                }
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.timer = None;
                this.expired = true;
                Poll::Ready(Some(Err(idle_status(limit))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body whose frames come from `receiver`, as the client sends them.
    fn channel_body() -> (
        tokio::sync::mpsc::Sender<Result<http_body::Frame<Bytes>, Status>>,
        Body,
    ) {
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        (sender, Body::new(http_body_util::StreamBody::new(stream)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_sends_nothing_for_the_limit_fails_deadline_exceeded() {
        let (sender, body) = channel_body();
        let mut body = IdleBody::new(body, Some(Duration::from_secs(5)));
        sender
            .send(Ok(http_body::Frame::data(Bytes::from_static(b"abc"))))
            .await
            .unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"abc"));
        let started = tokio::time::Instant::now();
        let failed = body.frame().await.unwrap().unwrap_err();
        assert_eq!(failed.code(), tonic::Code::DeadlineExceeded);
        assert!(failed.message().contains("request_idle_timeout_seconds"));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(body.frame().await.is_none());
        drop(sender);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peek_at_an_empty_body_is_not_waiting() {
        let (sender, body) = channel_body();
        let mut body = IdleBody::new(body, Some(Duration::from_secs(5)));
        let mut context = Context::from_waker(std::task::Waker::noop());
        let peeked = peek(|| http_body::Body::poll_frame(Pin::new(&mut body), &mut context));
        assert!(peeked.is_pending());
        // The stream computes for longer than the limit before it waits:
        // only the wait counts.
        tokio::time::advance(Duration::from_secs(8)).await;
        let feeder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            let data = http_body::Frame::data(Bytes::from_static(b"x"));
            sender.send(Ok(data)).await.unwrap();
            sender
        });
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"x"));
        drop(feeder.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn each_frame_starts_the_count_again() {
        let (sender, body) = channel_body();
        let mut body = IdleBody::new(body, Some(Duration::from_secs(5)));
        let feeder = tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                let data = http_body::Frame::data(Bytes::from_static(b"x"));
                sender.send(Ok(data)).await.unwrap();
            }
        });
        for _ in 0..4 {
            assert!(body.frame().await.unwrap().is_ok());
        }
        // 16 s in all, never 5 s without a frame; then the sender is gone.
        feeder.await.unwrap();
        assert!(body.frame().await.is_none());
    }
}
