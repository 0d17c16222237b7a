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
//! send the HTTP/2 connection preface ([`PrefaceDeadline`]). With TLS the
//! server does the handshake itself ([`TlsIncoming`]), each connection in a
//! task of its own so that a slow one never holds up the others, and the
//! same deadline covers the handshake and the preface read through it. A
//! connection that sends nothing, half a handshake, or a handshake and then
//! nothing, is closed instead of holding a descriptor for ever.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Sleep;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpIncoming};

use super::coalesce::CoalescedWrites;
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
    type Item = std::io::Result<PrefaceDeadline<CoalescedWrites<TcpStream>>>;

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
        next.map(|accepted| {
            accepted.map(|io| {
                io.map(|io| {
                    PrefaceDeadline::new(
                        CoalescedWrites::new(io),
                        tokio::time::Instant::now() + timeout,
                    )
                })
            })
        })
    }
}

/// The HTTP/2 client connection preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_BYTES: usize = 24;

/// A connection that must deliver its first [`PREFACE_BYTES`] bytes before
/// a deadline: reading fails with `TimedOut` past it (and the server closes
/// the connection). Under TLS it wraps the decrypted stream, so the bytes
/// counted are the preface's own.
pub struct PrefaceDeadline<IO> {
    io: IO,
    /// None once the preface's bytes arrived.
    deadline: Option<Pin<Box<Sleep>>>,
    awaited: usize,
}

impl<IO> PrefaceDeadline<IO> {
    fn new(io: IO, deadline: tokio::time::Instant) -> Self {
        PrefaceDeadline {
            io,
            deadline: Some(Box::pin(tokio::time::sleep_until(deadline))),
            awaited: PREFACE_BYTES,
        }
    }

    /// The connection and when its deadline is (None: already lifted).
    fn into_parts(self) -> (IO, Option<tokio::time::Instant>) {
        (self.io, self.deadline.map(|sleep| sleep.deadline()))
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

/// `TcpConnectInfo` for a plain connection; `TlsConnectInfo` (the peer's
/// certificates, for mutual TLS) for a TLS one.
impl<IO: Connected> Connected for PrefaceDeadline<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> IO::ConnectInfo {
        self.io.connect_info()
    }
}

/// The connections of a [`ThrottledIncoming`] after their TLS handshake,
/// each handshake in its own task, all bounded by the connection's
/// deadline; the decrypted stream keeps that deadline for its preface.
/// Connections whose handshake fails or times out are closed and logged
/// (debug), never handed on. Dropping it (the server stops accepting)
/// closes the listener and ends the handshakes under way.
pub struct TlsIncoming {
    inner: Option<ThrottledIncoming>,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<std::io::Result<PrefaceDeadline<CoalescedWrites<TlsStream<TcpStream>>>>>,
}

impl TlsIncoming {
    pub fn new(inner: ThrottledIncoming, config: Arc<ServerConfig>) -> Self {
        TlsIncoming {
            inner: Some(inner),
            acceptor: TlsAcceptor::from(config),
            handshakes: JoinSet::new(),
        }
    }

    fn start(&mut self, connection: PrefaceDeadline<CoalescedWrites<TcpStream>>) {
        let acceptor = self.acceptor.clone();
        let (io, deadline) = connection.into_parts();
        // The handshake on the plain connection; the decrypted stream's
        // writes are the ones coalesced (one TLS record for a small reply).
        let io = io.into_inner();
        // A fresh PrefaceDeadline always has its deadline; the fallback only
        // keeps the type total.
        let deadline = deadline.unwrap_or_else(tokio::time::Instant::now);
        self.handshakes.spawn(async move {
            match tokio::time::timeout_at(deadline, acceptor.accept(io)).await {
                Ok(Ok(tls)) => Ok(PrefaceDeadline::new(CoalescedWrites::new(tls), deadline)),
                Ok(Err(error)) => Err(error),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no TLS handshake within the handshake timeout",
                )),
            }
        });
    }
}

impl Stream for TlsIncoming {
    type Item = std::io::Result<PrefaceDeadline<CoalescedWrites<TlsStream<TcpStream>>>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            // Start the handshake of every connection accepted so far.
            while let Some(inner) = this.inner.as_mut() {
                match Pin::new(inner).poll_next(cx) {
                    Poll::Ready(Some(Ok(connection))) => this.start(connection),
                    Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                    Poll::Ready(None) => this.inner = None,
                    Poll::Pending => break,
                }
            }
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Ok(tls)))) => return Poll::Ready(Some(Ok(tls))),
                Poll::Ready(Some(Ok(Err(error)))) => {
                    tracing::debug!(%error, "TLS handshake failed; connection closed");
                }
                Poll::Ready(Some(Err(error))) => {
                    tracing::warn!(%error, "TLS handshake task ended abnormally");
                }
                Poll::Ready(None) if this.inner.is_none() => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}
