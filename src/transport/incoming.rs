//! The accepted connections, with a pause when accepting fails for want of
//! resources. When the process is out of file descriptors (EMFILE, ENFILE)
//! or kernel memory (ENOBUFS, ENOMEM), `accept` fails at once, again and
//! again, while the pending connection stays in the backlog: tonic logs the
//! error and asks for the next connection straight away, a loop that burns a
//! whole core and starves the connections being served. Here each such
//! failure is logged (at most once a second) and counted, and accepting
//! pauses, from 5 ms doubling to 1 s, until a connection is accepted again.
//!
//! Each connection then has `--handshake-timeout-seconds` from its accept to
//! send the HTTP/2 connection preface ([`PrefaceDeadline`]); with TLS, the
//! handshake must complete within the same time (tonic's TLS acceptor is
//! given it). A connection that sends nothing, or half a handshake, is
//! closed instead of holding a descriptor for ever.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

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
    handshake_timeout: Duration,
}

impl ThrottledIncoming {
    /// The connections of `inner`, each with `handshake_timeout` to send
    /// its HTTP/2 preface.
    pub fn new(inner: TcpIncoming, metrics: Arc<Metrics>, handshake_timeout: Duration) -> Self {
        ThrottledIncoming {
            inner,
            pause: None,
            next_pause: FIRST_PAUSE,
            last_logged: None,
            metrics,
            handshake_timeout,
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
    type Item = std::io::Result<PrefaceDeadline<TcpStream>>;

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
        let timeout = self.handshake_timeout;
        next.map(|accepted| accepted.map(|io| io.map(|io| PrefaceDeadline::new(io, timeout))))
    }
}

/// The HTTP/2 client connection preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_BYTES: usize = 24;

/// A connection that must deliver its first [`PREFACE_BYTES`] bytes before
/// a deadline: reading fails with `TimedOut` past it (and the server closes
/// the connection). Under TLS the bytes counted are the encrypted ones, so
/// there it bounds the start of the handshake, and the TLS acceptor's own
/// timeout the rest of it.
pub struct PrefaceDeadline<IO> {
    io: IO,
    /// None once the preface's bytes arrived.
    deadline: Option<Pin<Box<Sleep>>>,
    awaited: usize,
}

impl<IO> PrefaceDeadline<IO> {
    fn new(io: IO, timeout: Duration) -> Self {
        PrefaceDeadline {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            awaited: PREFACE_BYTES,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for PrefaceDeadline<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Some(deadline) = this.deadline.as_mut() {
            match &polled {
                Poll::Ready(Ok(())) => {
                    let read = buf.filled().len() - before;
                    this.awaited = this.awaited.saturating_sub(read);
                    if this.awaited == 0 {
                        this.deadline = None;
                    }
                }
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no HTTP/2 connection preface within the handshake timeout",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for PrefaceDeadline<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for PrefaceDeadline<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}
