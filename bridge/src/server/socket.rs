//! One WebSocket as the connection task uses it: every write has a deadline.
//!
//! A peer that stops reading makes writes wait for ever: its task would then
//! neither read its requests nor notice its ping timeout, and whatever it had
//! queued would stay in memory. So each write (a frame, a batch, a flush)
//! must make progress within `write_timeout` (PROTOCOL.md: a socket that
//! accepts no data for 30 s is closed with 1008); callers keep each write
//! small (a batch is bounded in frames and bytes), so the deadline is about
//! the peer, not about the amount.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;

/// Why a write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// The peer is gone (or the WebSocket failed).
    Gone,
    /// The peer accepted no data for `write_timeout`.
    Stalled,
}

/// How long the close frame may take; the connection ends either way.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Socket {
    ws: Box<WebSocket>,
    write_timeout: Duration,
}

impl Socket {
    pub fn new(ws: WebSocket, write_timeout: Duration) -> Self {
        Socket {
            ws: Box::new(ws),
            write_timeout,
        }
    }

    /// The next message from the peer.
    pub async fn recv(&mut self) -> Option<Result<Message, axum::Error>> {
        self.ws.recv().await
    }

    /// Writes one text frame and flushes.
    pub async fn send(&mut self, text: Utf8Bytes) -> Result<(), Broken> {
        within(self.write_timeout, self.ws.send(Message::Text(text))).await
    }

    /// Buffers one text frame (written out when the buffer fills, or on flush).
    pub async fn feed(&mut self, text: Utf8Bytes) -> Result<(), Broken> {
        within(self.write_timeout, self.ws.feed(Message::Text(text))).await
    }

    pub async fn flush(&mut self) -> Result<(), Broken> {
        within(self.write_timeout, self.ws.flush()).await
    }

    /// A WebSocket ping (the keep-alive).
    pub async fn ping(&mut self) -> Result<(), Broken> {
        let ping = self.ws.send(Message::Ping(Default::default()));
        within(self.write_timeout, ping).await
    }

    /// Sends a close frame, best effort.
    pub async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = within(CLOSE_TIMEOUT, self.ws.send(Message::Close(Some(frame)))).await;
    }
}

async fn within(
    limit: Duration,
    write: impl std::future::Future<Output = Result<(), axum::Error>>,
) -> Result<(), Broken> {
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Broken::Gone),
        Err(_) => Err(Broken::Stalled),
    }
}
