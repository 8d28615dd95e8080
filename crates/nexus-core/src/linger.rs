//! Lingering close: when the server ends a connection, it first half-closes
//! (the client sees the answer and the end), then reads and discards what
//! the client is still sending, for a bounded time and amount, before
//! letting go. Without it a server that answers early (413 for a body over
//! the limit, 401 before reading a body) closes with unread data, the
//! kernel resets the connection, and the client, still writing, never reads
//! the answer: a broken pipe instead of a clear error. nginx does the same
//! (`lingering_close`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long a closing connection waits for more of what the client is
/// still sending before letting go (restarted by every read, as nginx's
/// `lingering_timeout`): a busy machine may starve a client that is still
/// writing for a moment, and an early close then resets the connection.
pub const LINGER: Duration = Duration::from_secs(2);
/// Longest a closing connection lingers in all (nginx's `lingering_time`).
pub const LINGER_MAX: Duration = Duration::from_secs(30);
/// How much it reads, at most, before letting go.
pub const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// An IO whose `poll_shutdown` lingers (see the module).
pub struct Lingering<I> {
    io: I,
    /// The idle deadline, pushed back by every read.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When lingering must end whatever the client does.
    until: Option<tokio::time::Instant>,
    drained: usize,
    write_closed: bool,
}

impl<I> Lingering<I> {
    /// Wraps `io`.
    pub fn new(io: I) -> Self {
        Self {
            io,
            deadline: None,
            until: None,
            drained: 0,
            write_closed: false,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Lingering<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        if !me.write_closed {
            // FIN (and a TLS close_notify): the client now has the whole answer.
            std::task::ready!(Pin::new(&mut me.io).poll_shutdown(cx))?;
            me.write_closed = true;
            me.deadline = Some(Box::pin(tokio::time::sleep(LINGER)));
            me.until = Some(tokio::time::Instant::now() + LINGER_MAX);
        }
        let mut scratch = [0u8; 16 * 1024];
        loop {
            if let Some(deadline) = me.deadline.as_mut() {
                if deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ok(()));
                }
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut me.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    me.drained += buf.filled().len();
                    if me.drained >= LINGER_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                    // Still sending: wait for the rest, up to the overall cap.
                    let now = tokio::time::Instant::now();
                    let until = me.until.unwrap_or(now);
                    if let Some(deadline) = me.deadline.as_mut() {
                        deadline.as_mut().reset((now + LINGER).min(until));
                    }
                }
                // The client closed too (or the connection broke): done.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
