//! The accepted connections, with a pause when accepting fails for want of
//! resources. When the process is out of file descriptors (EMFILE, ENFILE)
//! or kernel memory (ENOBUFS, ENOMEM), `accept` fails at once, again and
//! again, while the pending connection stays in the backlog: tonic logs the
//! error and asks for the next connection straight away, a loop that burns a
//! whole core and starves the connections being served. Here each such
//! failure is logged (at most once a second) and counted, and accepting
//! pauses, from 5 ms doubling to 1 s, until a connection is accepted again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;

use crate::telemetry::Metrics;

const FIRST_PAUSE: Duration = Duration::from_millis(5);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// Whether an accept error means the process or the system ran out of
/// something, so that accepting again at once would fail the same way.
fn is_resource_exhaustion(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// [`TcpIncoming`] that pauses after accept errors caused by exhaustion.
pub struct ThrottledIncoming {
    inner: TcpIncoming,
    pause: Option<Pin<Box<Sleep>>>,
    next_pause: Duration,
    last_logged: Option<Instant>,
    metrics: Arc<Metrics>,
}

impl ThrottledIncoming {
    pub fn new(inner: TcpIncoming, metrics: Arc<Metrics>) -> Self {
        ThrottledIncoming {
            inner,
            pause: None,
            next_pause: FIRST_PAUSE,
            last_logged: None,
            metrics,
        }
    }

    fn exhausted(&mut self, error: &std::io::Error) {
        self.metrics.accept_paused();
        if self
            .last_logged
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            self.last_logged = Some(Instant::now());
            tracing::warn!(%error, pause_ms = self.next_pause.as_millis() as u64,
                "cannot accept connections (out of file descriptors or memory); pausing accept");
        }
        self.pause = Some(Box::pin(tokio::time::sleep(self.next_pause)));
        self.next_pause = (self.next_pause * 2).min(LONGEST_PAUSE);
    }
}

impl Stream for ThrottledIncoming {
    type Item = std::io::Result<TcpStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(pause) = self.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        let next = Pin::new(&mut self.inner).poll_next(cx);
        match &next {
            Poll::Ready(Some(Ok(_))) => self.next_pause = FIRST_PAUSE,
            Poll::Ready(Some(Err(error))) if is_resource_exhaustion(error) => {
                self.exhausted(error);
            }
            _ => {}
        }
        next
    }
}
