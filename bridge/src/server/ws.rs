//! One WebSocket connection: the handshake (auth), then one task that reads
//! client frames, carries out what [`session::decide`] says, and writes the
//! connection's queued messages.
//!
//! The task owns the socket, so replies (acks, errors, pongs, retained
//! replays) are written in order with the messages. Publishes are pipelined:
//! several may wait for the broker's ack at once, each acked when it is in.
//! A connection that stops reading fills its own bounded queue and loses
//! messages (told with `lagged`); nothing else waits for it.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::auth;
use crate::frame::{self, ErrorCode, FrameError, Id};
use crate::permissions::Permissions;
use crate::rate::RateLimiter;
use crate::server::hub::{Conn, Outbound};
use crate::server::metrics::DropReason;
use crate::server::mqtt::LinkError;
use crate::server::App;
use crate::session::{self, Action, Undeliverable};

/// tungstenite's read buffer per connection (its default, 128 KiB, would be
/// most of an idle connection's memory). Larger frames grow it as needed.
const READ_BUFFER: usize = 2 * 1024;
/// Frames are batched up to this size before a write.
const WRITE_BUFFER: usize = 8 * 1024;
/// Publishes one connection may have waiting for the broker at once.
const MAX_PIPELINED: usize = 64;
/// Frames written per wake-up before the reader gets a turn.
const WRITE_BATCH: usize = 64;
/// The server pings every connection this often; a client that sent nothing
/// (not even a pong) for three of these is gone.
const KEEPALIVE: Duration = Duration::from_secs(30);

type Pending = Pin<Box<dyn Future<Output = Option<String>> + Send>>;

/// `GET /ws`: checks the token, then upgrades.
pub async fn upgrade(
    mut ws: WebSocketUpgrade,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    State(app): State<Arc<App>>,
) -> Response {
    if app.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let perms = match &app.verifier {
        None => Permissions::allow_all(),
        Some(verifier) => {
            let authorization = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let token = auth::presented(query.get("token").map(String::as_str), authorization);
            match verifier.verify(token.unwrap_or("")) {
                Ok(perms) => perms,
                Err(e) => {
                    app.metrics.auth_rejected.inc();
                    // The reason only, never the token.
                    tracing::info!(reason = %e, "WebSocket handshake refused");
                    return (StatusCode::UNAUTHORIZED, e.to_string()).into_response();
                }
            }
        }
    };
    // A browser that offers subprotocols fails the handshake unless one is
    // selected: take the first, as the AWS deployment does.
    let first = ws.requested_protocols().next().cloned();
    if let Some(first) = first {
        ws.set_selected_protocol(first);
    }
    let hard = app.hard_frame_bytes;
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + 2 * hard)
        .max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| {
            let tracker = app.tracker.clone();
            // Boxed: the socket would otherwise be stored twice in the task.
            tracker.track_future(connection(Box::new(socket), app, perms))
        })
}

/// Everything one connection task keeps.
struct Session {
    app: Arc<App>,
    conn: Arc<Conn>,
    perms: Permissions,
    /// Client filters held (client names, not prefixed).
    held: BTreeSet<String>,
    limiter: RateLimiter,
}

enum Closing {
    /// The peer closed or vanished.
    Gone,
    /// We close with this code.
    Close(u16, &'static str),
}

/// One connection's task. Its future is what every idle connection costs, so
/// the rarely used, large parts (handling a request) are boxed.
async fn connection(mut socket: Box<WebSocket>, app: Arc<App>, perms: Permissions) {
    let id = app.next_conn_id();
    let (tx, mut rx) = mpsc::channel(app.outbound_queue);
    let conn = Arc::new(Conn::new(id, tx));
    app.metrics.connections.inc();
    tracing::debug!(
        conn = id,
        subject = perms.subject.as_deref().unwrap_or("-"),
        "connected"
    );
    let limiter = RateLimiter::new(app.publish_rate, app.publish_burst, Instant::now());
    let mut s = Session {
        app: app.clone(),
        conn,
        perms,
        held: BTreeSet::new(),
        limiter,
    };
    let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut last_heard = Instant::now();
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    let closing = loop {
        // Unbiased: a busy queue must not starve the client's requests, nor
        // a chatty client its deliveries.
        tokio::select! {
            _ = app.shutdown.cancelled() => break Closing::Close(1001, "server shutting down"),
            Some(reply) = pending.next(), if !pending.is_empty() => {
                if let Some(reply) = reply {
                    if socket.send(Message::Text(reply.into())).await.is_err() {
                        break Closing::Gone;
                    }
                }
            }
            Some(out) = rx.recv() => {
                if write_queued(&mut socket, &mut rx, &s, out).await.is_err() {
                    break Closing::Gone;
                }
            }
            incoming = socket.recv(), if pending.len() < MAX_PIPELINED => {
                last_heard = Instant::now();
                match incoming {
                    None | Some(Ok(Message::Close(_))) => break Closing::Gone,
                    Some(Err(e)) => break closing_for(e),
                    Some(Ok(Message::Text(text))) => {
                        if let Some(closing) = Box::pin(s.handle(Some(&text), &mut socket, &mut pending)).await {
                            break closing;
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        if let Some(closing) = Box::pin(s.handle(None, &mut socket, &mut pending)).await {
                            break closing;
                        }
                    }
                    Some(Ok(_)) => {} // ping / pong: tungstenite answers pings itself
                }
            }
            _ = keepalive.tick() => {
                if last_heard.elapsed() > 3 * KEEPALIVE {
                    break Closing::Close(1001, "no answer to pings");
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break Closing::Gone;
                }
            }
        }
    };
    if let Closing::Close(code, reason) = closing {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            socket.send(Message::Close(Some(frame))),
        )
        .await;
    }
    let mqtt: Vec<String> = s
        .held
        .iter()
        .map(|c| app.policy.prefix.to_mqtt(c))
        .collect();
    app.link.drop_conn(id, &mqtt);
    app.metrics.connections.dec();
    tracing::debug!(conn = id, "disconnected");
}

/// A read error: over the hard cap is closed with 1009, anything else means
/// the peer is gone or broke the WebSocket protocol.
fn closing_for(e: axum::Error) -> Closing {
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => Closing::Close(1009, "message too big"),
        Some(tungstenite::Error::Protocol(_)) => Closing::Close(1002, "protocol error"),
        _ => Closing::Gone,
    }
}

/// Writes `first` and whatever else is queued (up to a batch), then reports
/// losses with `lagged` once the queue has run dry.
async fn write_queued(
    socket: &mut WebSocket,
    rx: &mut mpsc::Receiver<Outbound>,
    s: &Session,
    first: Outbound,
) -> Result<(), axum::Error> {
    let metrics = &s.app.metrics;
    let mut sent: Vec<Instant> = Vec::new();
    let mut next = Some(first);
    let mut n = 0;
    while let Some(out) = next.take() {
        match out {
            Outbound::Message(delivery) => {
                socket.feed(Message::Text(delivery.frame.clone())).await?;
                sent.push(delivery.at);
            }
            Outbound::Lagged(dropped) => {
                socket
                    .feed(Message::Text(frame::lagged(dropped).into()))
                    .await?
            }
        }
        n += 1;
        if n < WRITE_BATCH {
            next = rx.try_recv().ok();
        }
    }
    // Counted before the flush, so a client that has read a frame can see it counted.
    metrics.deliveries.inc_by(sent.len() as u64);
    socket.flush().await?;
    for at in sent {
        metrics.latency.observe(at.elapsed().as_secs_f64());
    }
    if rx.is_empty() {
        let dropped = s.conn.take_dropped();
        if dropped > 0 {
            socket
                .send(Message::Text(frame::lagged(dropped).into()))
                .await?;
        }
    }
    Ok(())
}

impl Session {
    /// Decides and carries out one frame (`None`: a binary frame). A bug
    /// (a panic) is contained to this connection: it is logged with a
    /// reference, the client gets an `internal` error with the same
    /// reference, and the connection is closed (its state may be off).
    async fn handle(
        &mut self,
        text: Option<&str>,
        socket: &mut WebSocket,
        pending: &mut FuturesUnordered<Pending>,
    ) -> Option<Closing> {
        let outcome = AssertUnwindSafe(async {
            let action = match text {
                Some(text) => session::decide(text, &self.perms, &self.held, &self.app.policy),
                None => session::decide_binary(),
            };
            self.carry_out(action, socket, pending).await
        })
        .catch_unwind()
        .await;
        match outcome {
            Ok(Ok(())) => None,
            Ok(Err(_)) => Some(Closing::Gone),
            Err(_) => {
                let reference = format!("c{}-{}", self.conn.id, self.app.next_conn_id());
                tracing::error!(reference, "bug: panic while handling a frame");
                let id = text.and_then(frame::peek_id);
                let e = FrameError::new(
                    id,
                    ErrorCode::Internal,
                    format!("internal error (reference {reference})"),
                );
                let _ = self.refuse(socket, e).await;
                Some(Closing::Close(1011, "internal error"))
            }
        }
    }

    async fn send(&self, socket: &mut WebSocket, text: String) -> Result<(), axum::Error> {
        socket.send(Message::Text(text.into())).await
    }

    async fn refuse(&self, socket: &mut WebSocket, e: FrameError) -> Result<(), axum::Error> {
        self.app.metrics.error(e.code.as_str());
        self.send(socket, e.to_json()).await
    }

    async fn carry_out(
        &mut self,
        action: Action,
        socket: &mut WebSocket,
        pending: &mut FuturesUnordered<Pending>,
    ) -> Result<(), axum::Error> {
        // Debug builds only, for the test of the `internal` error path.
        #[cfg(debug_assertions)]
        if self.app.fault_injection {
            if let Action::Publish { channel, .. } = &action {
                assert!(channel != "fault-injection/panic", "fault injection");
            }
        }
        let ack = action.ack();
        match action {
            Action::Reply(None) => Ok(()),
            Action::Reply(Some(text)) => self.send(socket, text).await,
            Action::Refuse(e) => self.refuse(socket, e).await,
            Action::Subscribe {
                id,
                channel,
                mqtt,
                retained,
            } => {
                let fresh = !self.held.contains(&channel);
                if let Err(e) = self.app.link.subscribe(&self.conn, &mqtt).await {
                    return self.refuse(socket, link_error(id, e)).await;
                }
                self.held.insert(channel.clone());
                if !retained {
                    return match ack {
                        Some(ack) => self.send(socket, ack).await,
                        None => Ok(()),
                    };
                }
                let messages = match self.app.retained.fetch(&mqtt).await {
                    Ok(messages) => messages,
                    Err(e) => {
                        if fresh {
                            self.held.remove(&channel);
                            self.app.link.unsubscribe(self.conn.id, &mqtt);
                        }
                        return self.refuse(socket, link_error(id, e)).await;
                    }
                };
                // The retained messages first, then the ack, then live
                // messages: the order the AWS deployment gives too (there the
                // ack is the route response, sent when the request ends).
                let policy = &self.app.policy;
                let mut sent = 0;
                for (topic, payload) in &messages {
                    let max = policy.limits.max_payload_bytes;
                    match session::deliverable(&policy.prefix, max, topic, payload.len()) {
                        Ok(name) => {
                            socket
                                .feed(Message::Text(frame::message(name, payload, true).into()))
                                .await?;
                            sent += 1;
                        }
                        Err(reason @ Undeliverable::TooLarge { .. }) => {
                            self.app.metrics.dropped(DropReason::TooLarge, 1);
                            tracing::warn!(topic, %reason, "retained message not delivered");
                        }
                        // The fetch asked for a filter inside the prefix.
                        Err(Undeliverable::OutsidePrefix) => {}
                    }
                }
                self.app.metrics.deliveries.inc_by(sent);
                if let Some(ack) = ack {
                    socket.feed(Message::Text(ack.into())).await?;
                }
                socket.flush().await
            }
            Action::Unsubscribe { channel, mqtt, .. } => {
                self.held.remove(&channel);
                self.app.link.unsubscribe(self.conn.id, &mqtt);
                match ack {
                    Some(ack) => self.send(socket, ack).await,
                    None => Ok(()),
                }
            }
            Action::Publish {
                id,
                mqtt,
                payload,
                qos,
                retain,
                ..
            } => {
                if !self.limiter.try_take(Instant::now()) {
                    let wait = self.limiter.retry_after();
                    let e = FrameError::new(
                        id,
                        ErrorCode::RateLimited,
                        format!(
                            "over {} publishes per second; this publish was dropped (retry in {} ms)",
                            self.app.publish_rate,
                            wait.as_millis().max(1)
                        ),
                    );
                    return self.refuse(socket, e).await;
                }
                let acked = match self.app.link.publish(&mqtt, payload, qos, retain) {
                    Ok(acked) => acked,
                    Err(e) => return self.refuse(socket, link_error(id, e)).await,
                };
                let app = self.app.clone();
                pending.push(Box::pin(async move {
                    match acked.await {
                        Ok(()) => ack,
                        Err(e) => {
                            let e = link_error(id, e);
                            app.metrics.error(e.code.as_str());
                            Some(e.to_json())
                        }
                    }
                }));
                Ok(())
            }
        }
    }
}

fn link_error(id: Option<Id>, e: LinkError) -> FrameError {
    match e {
        LinkError::Unavailable(m) => FrameError::new(id, ErrorCode::Unavailable, m),
        LinkError::Refused(m) => FrameError::new(id, ErrorCode::Forbidden, m),
    }
}
