//! One WebSocket as the connection task uses it: every write has a deadline,
//! and what a large message made tungstenite allocate is given back.
//!
//! Writes. A peer that stops reading makes writes wait for ever: its task
//! would then neither read its requests nor notice its ping timeout, and
//! whatever it had queued would stay in memory. So each write (a frame, a
//! batch, a flush) must make progress within `write_timeout` (PROTOCOL.md: a
//! socket that accepts no data for 30 s is closed with 1008); callers keep
//! each write small (a batch is bounded in frames and bytes), so the deadline
//! is about the peer, not about the amount.
//!
//! Buffers. tungstenite keeps its read buffer as large as the largest frame
//! it read, and its write buffer as large as the most it held at once: after
//! one frame near the hard cap, an idle connection would keep ~1 MiB for
//! life, and after one 128 KiB message every subscriber that got it would
//! keep 128 KiB. So the socket reads through [`FrameBounds`], and after a
//! large frame read or a large write, once tungstenite holds none of the
//! client's bytes (before the next read), it writes out what tungstenite
//! still has to send and puts a new WebSocket, with small buffers, on the
//! same connection (`renew`). Nothing is lost, and the settings stay.

mod frame_bounds;

use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, Utf8Bytes};

use self::frame_bounds::{FrameBounds, LARGE};

/// tungstenite's read buffer per connection, allocated up front (its default,
/// 128 KiB, would be most of an idle connection's memory; 2 KiB was a third of
/// it). Client requests are a few hundred bytes; larger frames grow it as
/// needed, and after a large one it is renewed.
const READ_BUFFER: usize = 512;
/// Frames are batched up to this size before a write.
const WRITE_BUFFER: usize = 8 * 1024;
/// How long the close frame may take; the connection ends either way.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// The peer is gone (or the WebSocket failed).
    Gone,
    /// The peer accepted no data for `write_timeout`.
    Stalled,
}

/// Why no message was read.
#[derive(Debug)]
pub enum ReadError {
    /// The WebSocket failed: the peer broke the protocol, sent a frame or
    /// message over the hard cap, or the connection failed.
    Ws(tungstenite::Error),
    /// Renewing the buffers needed a write, which did not happen.
    Broken(Broken),
}

/// A server-side WebSocket over `S` (the upgraded HTTP connection).
pub struct Socket<S = TokioIo<Upgraded>> {
    /// Always there, except for the moment `renew` swaps it.
    ws: Option<Box<WebSocketStream<FrameBounds<S>>>>,
    write_timeout: Duration,
    /// Bytes given to tungstenite to send since its last flush: the most its
    /// write buffer can have held at once (frame headers aside).
    unflushed: usize,
    #[cfg(test)]
    renewals: usize,
}

/// The WebSocket settings of every connection: frames and messages up to the
/// hard cap (beyond it tungstenite fails the read, and the connection is
/// closed with 1009), and room in the write buffer for two of them.
fn config(hard_frame_bytes: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + 2 * hard_frame_bytes)
        .max_message_size(Some(hard_frame_bytes))
        .max_frame_size(Some(hard_frame_bytes))
}

impl<S: AsyncRead + AsyncWrite + Unpin> Socket<S> {
    /// The server side of a WebSocket whose handshake is done.
    pub async fn new(io: S, hard_frame_bytes: usize, write_timeout: Duration) -> Self {
        let ws = WebSocketStream::from_raw_socket(
            FrameBounds::new(io),
            Role::Server,
            Some(config(hard_frame_bytes)),
        )
        .await;
        Socket {
            ws: Some(Box::new(ws)),
            write_timeout,
            unflushed: 0,
            #[cfg(test)]
            renewals: 0,
        }
    }

    fn ws(&mut self) -> &mut WebSocketStream<FrameBounds<S>> {
        self.ws
            .as_mut()
            .expect("a socket has its WebSocket outside `renew`")
    }

    /// The next message from the peer. Cancel-safe: a message is either
    /// returned or left unread.
    pub async fn recv(&mut self) -> Option<Result<Message, ReadError>> {
        if self.ws().get_ref().renewable() {
            if let Err(broken) = self.renew().await {
                return Some(Err(ReadError::Broken(broken)));
            }
        }
        let received = self.ws().next().await;
        if let Some(Ok(_)) = &received {
            self.ws().get_mut().returned();
        }
        received.map(|r| r.map_err(ReadError::Ws))
    }

    /// Puts a new WebSocket on the connection, with fresh buffers. The old
    /// one holds no byte read from the peer (`renewable`); what it still
    /// has to send (a pong, say) is written first.
    async fn renew(&mut self) -> Result<(), Broken> {
        within(self.write_timeout, self.ws().flush()).await?;
        self.unflushed = 0;
        let old = self.ws.take().expect("a socket has its WebSocket");
        let config = *old.get_config();
        let mut io = old.into_inner();
        io.renewed();
        let new = WebSocketStream::from_raw_socket(io, Role::Server, Some(config))
            .now_or_never()
            .expect("a WebSocket without a handshake is ready at once");
        self.ws = Some(Box::new(new));
        #[cfg(test)]
        {
            self.renewals += 1;
        }
        Ok(())
    }

    /// Writes one text frame and flushes.
    pub async fn send(&mut self, text: Utf8Bytes) -> Result<(), Broken> {
        self.unflushed += text.len();
        let limit = self.write_timeout;
        within(limit, self.ws().send(Message::Text(text))).await?;
        self.flushed();
        Ok(())
    }

    /// Buffers one text frame (written out when the buffer fills, or on flush).
    pub async fn feed(&mut self, text: Utf8Bytes) -> Result<(), Broken> {
        self.unflushed += text.len();
        let limit = self.write_timeout;
        within(limit, self.ws().feed(Message::Text(text))).await
    }

    pub async fn flush(&mut self) -> Result<(), Broken> {
        let limit = self.write_timeout;
        within(limit, self.ws().flush()).await?;
        self.flushed();
        Ok(())
    }

    /// A WebSocket ping (the keep-alive).
    pub async fn ping(&mut self) -> Result<(), Broken> {
        let limit = self.write_timeout;
        within(limit, self.ws().send(Message::Ping(Default::default()))).await?;
        self.flushed();
        Ok(())
    }

    /// tungstenite's write buffer is empty, but as large as it grew: after a
    /// large write, a renewal is wanted.
    fn flushed(&mut self) {
        if std::mem::take(&mut self.unflushed) > LARGE {
            self.ws().get_mut().want_renewal();
        }
    }

    /// Sends a close frame, best effort.
    pub async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: Utf8Bytes::from_static(reason),
        };
        let close = self.ws().send(Message::Close(Some(frame)));
        let _ = within(CLOSE_TIMEOUT, close).await;
    }
}

async fn within(
    limit: Duration,
    write: impl std::future::Future<Output = Result<(), tungstenite::Error>>,
) -> Result<(), Broken> {
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Broken::Gone),
        Err(_) => Err(Broken::Stalled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures_util::stream::SplitStream;
    use proptest::prelude::*;
    use tokio::io::{AsyncWriteExt, DuplexStream};
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::Frame;

    const HARD: usize = 1024 * 1024;

    /// One frame a client sends.
    #[derive(Debug, Clone)]
    enum Sent {
        /// A text fragment (`first`: it starts a message; `last`: it ends one).
        Text {
            data: String,
            first: bool,
            last: bool,
        },
        Ping(Vec<u8>),
    }

    /// What the server must receive for `frames`, in order: a text message
    /// when its last fragment arrives, a ping as it arrives.
    fn expected(frames: &[Sent]) -> Vec<Message> {
        let mut out = Vec::new();
        let mut text = String::new();
        for f in frames {
            match f {
                Sent::Text { data, last, .. } => {
                    text.push_str(data);
                    if *last {
                        out.push(Message::text(std::mem::take(&mut text)));
                    }
                }
                Sent::Ping(p) => out.push(Message::Ping(Bytes::from(p.clone()))),
            }
        }
        out
    }

    /// Text messages with a frame over `LARGE`: each must renew the socket.
    fn large_messages(frames: &[Sent]) -> usize {
        let mut large = (0, false);
        for f in frames {
            if let Sent::Text { data, last, .. } = f {
                large.1 |= data.len() > LARGE;
                if *last {
                    large.0 += usize::from(std::mem::take(&mut large.1));
                }
            }
        }
        large.0
    }

    fn frame(sent: &Sent) -> Message {
        match sent {
            Sent::Text { data, first, last } => {
                let op = if *first { Data::Text } else { Data::Continue };
                Message::Frame(Frame::message(data.clone(), OpCode::Data(op), *last))
            }
            Sent::Ping(p) => Message::Ping(Bytes::from(p.clone())),
        }
    }

    /// A client and the server's socket over an in-memory connection that
    /// carries at most `chunk` bytes at a time.
    async fn pair(chunk: usize) -> (WebSocketStream<DuplexStream>, Socket<DuplexStream>) {
        let (client, server) = tokio::io::duplex(chunk);
        let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let server = Socket::new(server, HARD, Duration::from_secs(5)).await;
        (client, server)
    }

    /// The pongs the client gets until the server's `done`.
    async fn pongs(mut from_server: SplitStream<WebSocketStream<DuplexStream>>) -> Vec<Bytes> {
        let mut pongs = Vec::new();
        loop {
            match from_server.next().await {
                Some(Ok(Message::Pong(p))) => pongs.push(p),
                Some(Ok(Message::Text(t))) if t.as_str() == "done" => return pongs,
                other => panic!("the client got {other:?}"),
            }
        }
    }

    /// The client sends `frames`; the server must receive exactly the
    /// messages they make, answer every ping, and renew its WebSocket once
    /// per message with a large frame.
    async fn exchange(frames: Vec<Sent>, chunk: usize) {
        let (client, mut server) = pair(chunk).await;
        let (mut to_server, from_server) = client.split();
        let want = expected(&frames);
        let pings: Vec<Bytes> = want
            .iter()
            .filter_map(|m| match m {
                Message::Ping(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        let large = large_messages(&frames);
        let sender = tokio::spawn(async move {
            for f in &frames {
                to_server.feed(frame(f)).await.unwrap();
            }
            to_server.flush().await.unwrap();
            to_server
        });
        let reader = tokio::spawn(pongs(from_server));
        let mut got = Vec::new();
        while got.len() < want.len() {
            let Ok(received) = tokio::time::timeout(Duration::from_secs(10), server.recv()).await
            else {
                panic!("messages lost: {} of {} arrived", got.len(), want.len());
            };
            match received {
                Some(Ok(m)) => got.push(m),
                other => panic!("the server got {other:?} after {} messages", got.len()),
            }
        }
        assert!(got == want, "the messages changed on the way");
        server.send("done".into()).await.unwrap();
        assert_eq!(reader.await.unwrap(), pings);
        assert_eq!(server.renewals, large);
        drop(sender.await.unwrap());
    }

    fn text(len: usize, first: bool, last: bool) -> Sent {
        let data = (0..len)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        Sent::Text { data, first, last }
    }

    #[tokio::test]
    async fn a_large_message_renews_the_websocket_and_loses_nothing() {
        let frames = vec![
            text(10, true, true),
            text(3 * LARGE, true, true),
            Sent::Ping(b"p1".to_vec()),
            text(5, true, true),
            // Fragmented, a ping in the middle.
            text(LARGE + 1, true, false),
            Sent::Ping(b"p2".to_vec()),
            text(3, false, false),
            text(LARGE * 2, false, true),
            text(1, true, true),
        ];
        for chunk in [1, 7, 2048, 64 * 1024] {
            exchange(frames.clone(), chunk).await;
        }
    }

    #[tokio::test]
    async fn half_a_frame_after_a_large_one_does_not_delay_the_renewal() {
        let (mut client, mut server) = pair(1024 * 1024).await;
        client
            .send(Message::text("x".repeat(LARGE * 4)))
            .await
            .unwrap();
        // A masked text frame `hi` (mask 0), of which only 3 bytes come now.
        let rest = [0x81, 0x82, 0, 0, 0, 0, b'h', b'i'];
        client.get_mut().write_all(&rest[..3]).await.unwrap();
        let large = server.recv().await.unwrap().unwrap();
        assert_eq!(large.len(), LARGE * 4);
        let waiting = tokio::time::timeout(Duration::from_millis(100), server.recv()).await;
        assert!(waiting.is_err(), "half a frame made a message: {waiting:?}");
        assert_eq!(server.renewals, 1);
        client.get_mut().write_all(&rest[3..]).await.unwrap();
        let hi = server.recv().await.unwrap().unwrap();
        assert_eq!(hi, Message::text("hi"));
        assert_eq!(server.renewals, 1);
    }

    #[tokio::test]
    async fn a_large_write_renews_the_websocket_before_the_next_read() {
        let (mut client, mut server) = pair(1024 * 1024).await;
        for _ in 0..10 {
            server.send("small".into()).await.unwrap();
        }
        client.send(Message::text("1")).await.unwrap();
        assert_eq!(server.recv().await.unwrap().unwrap(), Message::text("1"));
        assert_eq!(server.renewals, 0, "after small writes");
        server.send("y".repeat(LARGE + 1).into()).await.unwrap();
        client.send(Message::text("2")).await.unwrap();
        assert_eq!(server.recv().await.unwrap().unwrap(), Message::text("2"));
        assert_eq!(server.renewals, 1, "after a large frame");
        for _ in 0..20 {
            server.feed("z".repeat(1000).into()).await.unwrap();
        }
        server.flush().await.unwrap();
        client.send(Message::text("3")).await.unwrap();
        assert_eq!(server.recv().await.unwrap().unwrap(), Message::text("3"));
        assert_eq!(server.renewals, 2, "after a large batch");
        // The client got everything, in order.
        let mut lens = Vec::new();
        for _ in 0..31 {
            lens.push(client.next().await.unwrap().unwrap().len());
        }
        let mut want = vec![5; 10];
        want.push(LARGE + 1);
        want.extend([1000; 20]);
        assert_eq!(lens, want);
    }

    #[tokio::test]
    async fn over_the_hard_cap_is_a_capacity_error() {
        let (mut client, mut server) = pair(64 * 1024).await;
        let sending = tokio::spawn(async move {
            let _ = client.send(Message::text("x".repeat(HARD + 1))).await;
            client
        });
        match server.recv().await {
            Some(Err(ReadError::Ws(tungstenite::Error::Capacity(_)))) => {}
            other => panic!("expected a capacity error, got {other:?}"),
        }
        drop(sending);
    }

    /// Message sizes around the ones that matter: small, just under and over
    /// `LARGE`, and several times it.
    fn size() -> impl Strategy<Value = usize> {
        prop_oneof![
            0..100usize,
            (LARGE - 2)..(LARGE + 3),
            (2 * LARGE)..(5 * LARGE)
        ]
    }

    /// Messages of 1 to 3 fragments, with pings before, between and after.
    fn frames() -> impl Strategy<Value = Vec<Sent>> {
        let message = (
            prop::collection::vec((size(), any::<bool>()), 1..4),
            any::<bool>(),
        );
        prop::collection::vec(message, 1..6).prop_map(|messages| {
            let mut frames = Vec::new();
            for (fragments, ping_first) in messages {
                if ping_first {
                    frames.push(Sent::Ping(b"before".to_vec()));
                }
                let n = fragments.len();
                for (i, (len, ping_after)) in fragments.into_iter().enumerate() {
                    frames.push(text(len, i == 0, i + 1 == n));
                    if ping_after {
                        frames.push(Sent::Ping(i.to_be_bytes().to_vec()));
                    }
                }
            }
            // Renewal happens as the next message is read.
            frames.push(text(1, true, true));
            frames
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn renewals_lose_nothing(frames in frames(), chunk in 100..70_000usize) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(exchange(frames, chunk));
        }
    }
}
