//! Lingering close: when the server drops a connection, it first finishes
//! sending, then reads and discards what the client is still sending (for a
//! moment), and only then closes the socket.
//!
//! Why: closing a TCP socket that still has unread data makes the kernel
//! answer with a reset, and a reset can destroy the frames just sent. The
//! case that matters: a client sends a message over the hard cap, the server
//! answers with close code 1009 and hangs up while the rest of the huge
//! message is still arriving. Without lingering, the client sees "connection
//! reset" instead of 1009.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How long a closed connection is drained at most.
const LINGER: Duration = Duration::from_secs(2);
/// How much a closed connection may still send before it is cut off.
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// A TCP stream that lingers when dropped.
pub struct Lingering {
    inner: Option<TcpStream>,
}

impl Lingering {
    /// Wraps an accepted stream; `send_buffer` fixes the kernel's send
    /// buffer (see [`LingerListener`]).
    pub fn new(stream: TcpStream, send_buffer: Option<usize>) -> Self {
        // Frames are small and latency matters: no Nagle delay.
        let _ = stream.set_nodelay(true);
        if let Some(bytes) = send_buffer {
            let _ = socket2::SockRef::from(&stream).set_send_buffer_size(bytes);
        }
        Lingering {
            inner: Some(stream),
        }
    }

    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.inner.as_mut().expect("present until dropped"))
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(mut stream) = self.inner.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let _ = stream.shutdown().await;
            let mut buf = [0u8; 4096];
            let mut drained = 0;
            let deadline = tokio::time::Instant::now() + LINGER;
            while drained < LINGER_BYTES {
                match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => drained += n,
                    _ => break,
                }
            }
        });
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().stream().poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().stream().poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }
}

/// Accepts TCP connections as [`Lingering`] streams.
///
/// Each gets a fixed kernel send buffer: left to itself, Linux grows it up to
/// 4 MiB for a peer that stopped reading, which both hides the stall from the
/// bridge's write deadline (the socket keeps accepting data) and holds memory
/// outside the bridge's per-connection bound.
pub struct LingerListener {
    pub listener: TcpListener,
    pub send_buffer: Option<usize>,
}

impl LingerListener {
    /// The next connection; accept errors (out of file descriptors, say) are
    /// logged and retried after a pause.
    pub async fn next(&mut self) -> (Lingering, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => return (Lingering::new(stream, self.send_buffer), peer),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

impl axum::serve::Listener for LingerListener {
    type Io = Lingering;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.next().await
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}
