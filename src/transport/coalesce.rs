//! Small writes of one connection coalesced into one system call.
//!
//! HTTP/2 (h2) writes a DATA frame of 256 bytes or more as its own vectored
//! write and flushes before it buffers the next frame, so a small unary
//! reply leaves in two writes: the headers with the message, then the
//! trailers. Each write is a system call and, on the peer, a wake-up.
//!
//! This connection tells h2 it has no vectored writes: h2 then copies DATA
//! frames under 1 KiB into its own buffer with the frames around them (the
//! unary Forward hands small replies over in such pieces, see
//! `transport::wire`), and writes a larger frame's header and payload as two
//! writes. Writes that fit in [`COALESCE_BYTES`] are held here until the
//! connection is flushed or a large write comes; a large write goes out at
//! once with the held bytes in front of it, in one vectored write, so a
//! frame's header and payload still leave together and bulk data is never
//! copied here. (Delaying a flush instead, to let the trailers catch up,
//! costs a wake-up of another runtime thread per reply: measured slower.)

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Writes adding up to at most this many bytes are held until a flush.
pub const COALESCE_BYTES: usize = 16 * 1024;

/// A connection whose small writes are held and written together on flush.
pub struct CoalescedWrites<IO> {
    io: IO,
    /// Bytes accepted from the writer and not yet written out, from `sent`.
    held: Vec<u8>,
    sent: usize,
}

impl<IO> CoalescedWrites<IO> {
    pub fn new(io: IO) -> Self {
        CoalescedWrites {
            io,
            held: Vec::new(),
            sent: 0,
        }
    }

    pub fn into_inner(self) -> IO {
        self.io
    }

    #[cfg(test)]
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    fn held_len(&self) -> usize {
        self.held.len() - self.sent
    }
}

impl<IO: AsyncWrite + Unpin> CoalescedWrites<IO> {
    /// Writes out every held byte.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.held_len() > 0 {
            let n =
                std::task::ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes the held bytes and then as much of `bufs` as the connection
    /// takes, in vectored writes; how much of `bufs` was written.
    fn poll_write_through(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let held = self.held_len();
            if held == 0 {
                return Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
            }
            let mut slices = Vec::with_capacity(bufs.len() + 1);
            slices.push(IoSlice::new(&self.held[self.sent..]));
            slices.extend(bufs.iter().map(|b| IoSlice::new(b)));
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            if n < held {
                self.sent += n;
                continue;
            }
            self.held.clear();
            self.sent = 0;
            return Poll::Ready(Ok(n - held));
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for CoalescedWrites<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.held_len() + total <= COALESCE_BYTES {
            for buf in bufs {
                this.held.extend_from_slice(buf);
            }
            return Poll::Ready(Ok(total));
        }
        this.poll_write_through(cx, bufs)
    }

    /// False so that h2 buffers small DATA frames with the frames around
    /// them (see the module's documentation).
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for CoalescedWrites<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> IO::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach the connection.
    struct CountingIo {
        written: Vec<u8>,
        writes: usize,
    }

    impl AsyncWrite for CountingIo {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.writes += 1;
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.writes += 1;
            let mut n = 0;
            for buf in bufs {
                self.written.extend_from_slice(buf);
                n += buf.len();
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_writes_leave_in_one_write_on_flush() {
        let mut io = CoalescedWrites::new(CountingIo {
            written: Vec::new(),
            writes: 0,
        });
        io.write_all(b"headers").await.unwrap();
        io.write_all(&[7u8; 1000]).await.unwrap();
        io.write_all(b"trailers").await.unwrap();
        assert_eq!(io.get_ref().writes, 0);
        io.flush().await.unwrap();
        let mut expected = b"headers".to_vec();
        expected.extend_from_slice(&[7u8; 1000]);
        expected.extend_from_slice(b"trailers");
        assert_eq!(io.get_ref().written, expected);
        assert_eq!(io.get_ref().writes, 1);
    }

    #[tokio::test]
    async fn large_writes_go_through_behind_the_held_bytes() {
        let mut io = CoalescedWrites::new(CountingIo {
            written: Vec::new(),
            writes: 0,
        });
        io.write_all(b"head").await.unwrap();
        let big = vec![3u8; COALESCE_BYTES * 2];
        io.write_all(&big).await.unwrap();
        // One vectored write: the held bytes, then the large buffer.
        assert_eq!(io.get_ref().writes, 1);
        io.flush().await.unwrap();
        let mut expected = b"head".to_vec();
        expected.extend_from_slice(&big);
        assert_eq!(io.get_ref().written, expected);
        assert_eq!(io.get_ref().writes, 1);
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_held() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let mut io = CoalescedWrites::new(client);
        io.write_all(b"last words").await.unwrap();
        io.shutdown().await.unwrap();
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"last words");
    }
}
