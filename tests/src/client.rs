//! The browser side: a WebSocket client speaking the bridge protocol
//! (requests with ids, replies, messages, close codes) and what it received
//! (`Frame`).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::processes::{QUIET, WAIT};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What a WebSocket client received.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Json(Value),
    Close(Option<u16>),
}

/// A browser-side client.
pub struct Client {
    ws: Ws,
    next_id: u64,
    /// Frames read while waiting for a reply, in order.
    backlog: std::collections::VecDeque<Value>,
    /// On AWS, the message ids (`mid`) seen so far: see
    /// [`Client::with_message_ids`].
    mids: Option<std::collections::HashSet<String>>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Client::try_connect(url, None)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    /// Connects with optional extra headers; Err carries the HTTP status.
    pub async fn try_connect(url: &str, bearer: Option<&str>) -> Result<Client, String> {
        let mut req = url.into_client_request().unwrap();
        if let Some(token) = bearer {
            req.headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(Client {
                ws,
                next_id: 1,
                backlog: Default::default(),
                mids: None,
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                Err(format!("HTTP {}", resp.status().as_u16()))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Handles message ids as PROTOCOL.md tells a client of the AWS
    /// deployment to: every live `message` must carry a valid `mid` (a
    /// retained one none), a message whose `mid` was seen is dropped, and
    /// the `mid` is taken off, so the frames compare with the self-hosted
    /// bridge's.
    pub fn with_message_ids(mut self) -> Client {
        self.mids = Some(Default::default());
        self
    }

    /// A frame as the test sees it (None: a duplicate, dropped).
    fn admit(&mut self, mut v: Value) -> Option<Value> {
        let Some(seen) = &mut self.mids else {
            return Some(v);
        };
        if v["type"] != "message" {
            return Some(v);
        }
        let Some(obj) = v.as_object_mut() else {
            return Some(v);
        };
        let mid = obj.remove("mid");
        if obj.get("retained") == Some(&Value::Bool(true)) {
            assert!(mid.is_none(), "a retained message with a mid: {v}");
            return Some(v);
        }
        let mid = match mid {
            Some(Value::String(m))
                if (1..=64).contains(&m.len())
                    && m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
            {
                m
            }
            other => panic!("a live message without a valid mid ({other:?}): {v}"),
        };
        seen.insert(mid).then_some(v)
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws.send(Message::binary(data)).await.unwrap();
    }

    /// Sends `text` as one message in frames of at most `fragment` bytes
    /// (browsers send one frame; other clients fragment).
    pub async fn send_fragmented(&mut self, text: &str, fragment: usize) {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
        let chunks: Vec<&[u8]> = text.as_bytes().chunks(fragment.max(1)).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let opcode = if i == 0 { Data::Text } else { Data::Continue };
            let last = i + 1 == chunks.len();
            let frame = WsFrame::message(chunk.to_vec(), OpCode::Data(opcode), last);
            self.ws.send(Message::Frame(frame)).await.unwrap();
        }
    }

    /// The next frame (backlog first), or None after `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<Frame> {
        if let Some(v) = self.backlog.pop_front() {
            return Some(Frame::Json(v));
        }
        self.read_within(within).await
    }

    async fn read_within(&mut self, within: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match msg {
                None => return Some(Frame::Close(None)),
                Some(Err(_)) => return Some(Frame::Close(None)),
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t)
                        .unwrap_or_else(|e| panic!("server sent non-JSON {t:?}: {e}"));
                    match self.admit(v) {
                        Some(v) => return Some(Frame::Json(v)),
                        None => continue,
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    return Some(Frame::Close(frame.map(|f: CloseFrame| u16::from(f.code))));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next text frame as is (no JSON parsing, for load tests).
    pub async fn next_text(&mut self) -> String {
        if let Some(v) = self.backlog.pop_front() {
            return v.to_string();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next JSON frame; panics after WAIT.
    pub async fn next_json(&mut self) -> Value {
        match self.next_within(WAIT).await {
            Some(Frame::Json(v)) => v,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Sends a request with a fresh id and returns the reply carrying it; other
    /// frames read meanwhile are kept for `next_*`.
    pub async fn request(&mut self, mut v: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        v["id"] = json!(id);
        self.send(v).await;
        self.reply_to(json!(id)).await
    }

    /// Waits for the frame carrying `id`.
    pub async fn reply_to(&mut self, id: Value) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_within(left).await {
                Some(Frame::Json(f)) if f.get("id") == Some(&id) => return f,
                Some(Frame::Json(f)) => self.backlog.push_back(f),
                other => panic!("waiting for the reply to id {id}: got {other:?}"),
            }
        }
    }

    /// Sends `v` and expects the error `code` (with the request's id).
    pub async fn expect_error(&mut self, v: Value, code: &str) -> Value {
        let reply = self.request(v.clone()).await;
        assert_eq!(reply["type"], "error", "request {v} got {reply}");
        assert_eq!(reply["code"], code, "request {v} got {reply}");
        assert!(
            reply["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without a message: {reply}"
        );
        reply
    }

    pub async fn subscribe(&mut self, channel: &str) {
        let reply = self
            .request(json!({"action":"subscribe","channel":channel}))
            .await;
        assert_eq!(reply["type"], "ack", "subscribe {channel}: {reply}");
    }

    pub async fn unsubscribe(&mut self, channel: &str) {
        let reply = self
            .request(json!({"action":"unsubscribe","channel":channel}))
            .await;
        assert_eq!(reply["type"], "ack", "unsubscribe {channel}: {reply}");
    }

    pub async fn publish(&mut self, channel: &str, data: Value) {
        let reply = self
            .request(json!({"action":"publish","channel":channel,"data":data}))
            .await;
        assert_eq!(reply["type"], "ack", "publish {channel}: {reply}");
    }

    /// The next `message` frame (skipping nothing: any other frame fails).
    pub async fn next_message(&mut self) -> Value {
        let f = self.next_json().await;
        assert_eq!(f["type"], "message", "expected a message, got {f}");
        f
    }

    /// The next `n` frames, each of which must be a `message`.
    pub async fn next_messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next_message().await);
        }
        out
    }

    /// Asserts nothing arrives for QUIET.
    pub async fn expect_silence(&mut self) {
        if let Some(f) = self.next_within(QUIET).await {
            panic!("expected nothing, got {f:?}");
        }
    }

    /// Asserts the connection still answers (a ping round trip).
    pub async fn assert_alive(&mut self) {
        let reply = self.request(json!({"action":"ping"})).await;
        assert_eq!(reply["type"], "pong");
    }

    /// Waits for the server to close; returns the close code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.read_within(WAIT).await {
                Some(Frame::Close(code)) => return code,
                Some(Frame::Json(_)) => continue,
                None => panic!("the server did not close the connection"),
            }
        }
    }
}
