//! One WebSocket connection: the handshake (origin, connection cap, token),
//! then one task that reads client frames, has [`session::decide`] say what
//! each means and [`request::carry_out`] carry it out through this shell's
//! [`Effects`], and writes the connection's queued messages.
//!
//! The task owns the socket, so replies (acks, errors, pongs, retained
//! replays) are written in order with the messages. Publishes are pipelined:
//! several may wait for the broker's ack at once, each acked when it is in.
//! What one connection may cost the others is bounded: its requests by a
//! rate (every action) and a lower one for publishes, its queue in frames
//! and bytes (a slow reader loses messages, told with `lagged`), its writes
//! by a deadline (a socket that accepts nothing is closed, 1008), and its
//! life by its token's `exp` (`token_expired`, then close 4001).

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tungstenite::{Message, Utf8Bytes};

use crate::auth::{self, Credentials};
use crate::frame::{self, ErrorCode, FrameError};
use crate::rate::RateLimiter;
use crate::request::{self, Effects, Hold, Publish, Refusal, Settle};
use crate::server::hub::{Conn, Outbound};
use crate::server::metrics::DropReason;
use crate::server::mqtt::LinkError;
use crate::server::origin;
use crate::server::socket::{Broken, ReadError, Socket};
use crate::server::App;
use crate::session::{self, Undeliverable};

mod handshake;

use self::handshake::Handshake;

/// Publishes one connection may have waiting for the broker at once.
const MAX_PIPELINED: usize = 64;
/// Frames written per wake-up before the reader gets a turn...
const WRITE_BATCH: usize = 64;
/// ...and bytes: each write must be small enough that the write deadline
/// measures the peer, not the batch.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// The server pings every connection this often; a client that sent nothing
/// (not even a pong) for three of these is gone.
const KEEPALIVE: Duration = Duration::from_secs(30);

type Pending = Pin<Box<dyn Future<Output = Result<Option<String>, FrameError>> + Send>>;

/// A reserved place under the connection cap, given back when dropped
/// (when the connection ends, or when the upgrade never happens).
struct Slot(Arc<App>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /ws`: checks the origin, the connection cap and the token, then
/// upgrades.
pub async fn upgrade(
    handshake: Handshake,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    State(app): State<Arc<App>>,
) -> Response {
    if app.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    if !origin::allowed(&headers, &app.origins, app.verifier.is_some()) {
        app.metrics.handshakes_refused("origin");
        tracing::info!("WebSocket handshake refused: origin not allowed");
        return (
            StatusCode::FORBIDDEN,
            "this origin may not open WebSockets here (see --allowed-origin)",
        )
            .into_response();
    }
    let credentials = match &app.verifier {
        None => Credentials::anonymous(),
        Some(verifier) => {
            let authorization = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let token = auth::presented(query.get("token").map(String::as_str), authorization);
            match verifier.verify(token.unwrap_or("")) {
                Ok(credentials) => credentials,
                Err(e) => {
                    app.metrics.auth_rejected.inc();
                    // The reason only (fixed words), never the token.
                    tracing::info!(reason = %e, "WebSocket handshake refused");
                    return (StatusCode::UNAUTHORIZED, e.to_string()).into_response();
                }
            }
        }
    };
    let open = app.open_connections.fetch_add(1, Ordering::Relaxed);
    let slot = Slot(app.clone());
    if open >= app.max_connections {
        app.metrics.handshakes_refused("capacity");
        tracing::warn!(
            limit = app.max_connections,
            "WebSocket handshake refused: at the connection cap"
        );
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the bridge is at its connection limit; retry later",
        )
            .into_response();
    }
    // A browser that offers subprotocols fails the handshake unless one is
    // selected: take the first, as the AWS deployment does.
    let protocol = handshake.offered_protocols().next().cloned();
    let (response, upgraded) = handshake.accept(protocol);
    let tracker = app.tracker.clone();
    tokio::spawn(tracker.track_future(async move {
        match upgraded.await {
            Ok(io) => {
                let (hard, write_timeout) = (app.hard_frame_bytes, app.write_timeout);
                let socket = Socket::new(TokioIo::new(io), hard, write_timeout).await;
                connection(socket, app, credentials, slot).await;
            }
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    }));
    response
}

/// Everything one connection task keeps.
struct Session {
    app: Arc<App>,
    conn: Arc<Conn>,
    credentials: Credentials,
    /// Client filters held (client names, not prefixed).
    held: BTreeSet<String>,
    requests: RateLimiter,
    publishes: RateLimiter,
}

enum Closing {
    /// The peer closed or vanished.
    Gone,
    /// We close with this code.
    Close(u16, &'static str),
}

impl From<Broken> for Closing {
    fn from(b: Broken) -> Self {
        match b {
            Broken::Gone => Closing::Gone,
            Broken::Stalled => Closing::Close(1008, "not reading"),
        }
    }
}

/// When `expires_at` (seconds since the epoch) comes, as a timer instant.
fn deadline(expires_at: u64) -> tokio::time::Instant {
    let at = UNIX_EPOCH + Duration::from_secs(expires_at);
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::Instant::now() + left
}

/// One connection's task. Its future is what every idle connection costs, so
/// the rarely used, large parts (handling a request) are boxed.
async fn connection(mut socket: Socket, app: Arc<App>, credentials: Credentials, _slot: Slot) {
    let id = app.next_conn_id();
    let (tx, mut rx) = mpsc::channel(app.outbound_queue);
    let conn = Arc::new(Conn::new(id, tx, app.outbound_bytes));
    app.metrics.connections.inc();
    tracing::debug!(
        conn = id,
        subject = credentials.perms.subject.as_deref().unwrap_or("-"),
        "connected"
    );
    let now = Instant::now();
    let mut s = Session {
        app: app.clone(),
        conn,
        credentials,
        held: BTreeSet::new(),
        requests: RateLimiter::new(app.request_rate, app.request_burst, now),
        publishes: RateLimiter::new(app.publish_rate, app.publish_burst, now),
    };
    let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
    let mut last_heard = Instant::now();
    let mut keepalive =
        tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    // The token's end; boxed, and only with auth on.
    let mut expiry = s
        .credentials
        .expires_at
        .map(|at| (at, Box::pin(tokio::time::sleep_until(deadline(at)))));
    let closing = loop {
        // Unbiased: a busy queue must not starve the client's requests, nor
        // a chatty client its deliveries.
        tokio::select! {
            _ = app.shutdown.cancelled() => break Closing::Close(1001, "server shutting down"),
            _ = async { expiry.as_mut().expect("guarded").1.as_mut().await }, if expiry.is_some() => {
                break s.token_expired(&mut socket).await;
            }
            Some(reply) = pending.next(), if !pending.is_empty() => {
                let sent = match reply {
                    Ok(Some(ack)) => socket.send(ack.into()).await,
                    Ok(None) => Ok(()),
                    Err(e) => s.refuse(&mut socket, e).await,
                };
                if let Err(b) = sent {
                    break b.into();
                }
            }
            Some(out) = rx.recv() => {
                if let Err(b) = write_queued(&mut socket, &mut rx, &s, out).await {
                    break b.into();
                }
            }
            incoming = socket.recv(), if pending.len() < MAX_PIPELINED => {
                last_heard = Instant::now();
                let text = match incoming {
                    None | Some(Ok(Message::Close(_))) => break Closing::Gone,
                    Some(Err(e)) => break closing_for(e),
                    Some(Ok(Message::Text(text))) => Some(text),
                    Some(Ok(Message::Binary(_))) => None,
                    Some(Ok(_)) => continue, // ping / pong: tungstenite answers pings itself
                };
                if s.credentials.expired(auth::now_secs()) {
                    break s.token_expired(&mut socket).await;
                }
                if let Some(closing) = Box::pin(s.handle(text.as_ref(), &mut socket, &mut pending)).await {
                    break closing;
                }
                // An `auth` may have moved the end of the connection.
                match (s.credentials.expires_at, &mut expiry) {
                    (Some(at), Some((current, timer))) if at != *current => {
                        *current = at;
                        timer.as_mut().reset(deadline(at));
                    }
                    _ => {}
                }
            }
            _ = keepalive.tick() => {
                if last_heard.elapsed() > 3 * KEEPALIVE {
                    app.metrics.silent_closed.inc();
                    tracing::info!(conn = id, "closed a connection that answered no pings");
                    break Closing::Close(1001, "no answer to pings");
                }
                if let Err(b) = socket.ping().await {
                    break b.into();
                }
            }
        }
    };
    if let Closing::Close(code, reason) = closing {
        if code == 1008 {
            app.metrics.stalled_closed.inc();
            tracing::info!(conn = id, "closed a connection that accepted no data");
        }
        socket.close(code, reason).await;
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

/// A read error: over the hard cap is closed with 1009, a protocol error with
/// 1002; a failed write is a broken write; anything else means the peer is
/// gone.
fn closing_for(e: ReadError) -> Closing {
    match e {
        ReadError::Ws(tungstenite::Error::Capacity(_)) => Closing::Close(1009, "message too big"),
        ReadError::Ws(tungstenite::Error::Protocol(_)) => Closing::Close(1002, "protocol error"),
        ReadError::Ws(_) => Closing::Gone,
        ReadError::Broken(b) => b.into(),
    }
}

/// Writes `first` and whatever else is queued (up to a batch, in frames and
/// bytes), then reports losses with `lagged` once the queue has run dry.
async fn write_queued(
    socket: &mut Socket,
    rx: &mut mpsc::Receiver<Outbound>,
    s: &Session,
    first: Outbound,
) -> Result<(), Broken> {
    let metrics = &s.app.metrics;
    let mut sent: Vec<Instant> = Vec::new();
    let mut next = Some(first);
    let (mut n, mut bytes) = (0, 0);
    while let Some(out) = next.take() {
        match out {
            Outbound::Message(delivery) => {
                let len = delivery.frame.len();
                s.conn.dequeued(len);
                socket.feed(delivery.frame.clone()).await?;
                sent.push(delivery.at);
                bytes += len;
            }
            Outbound::Lagged(dropped) => socket.feed(frame::lagged(dropped).into()).await?,
        }
        n += 1;
        if n < WRITE_BATCH && bytes < WRITE_BATCH_BYTES {
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
            socket.send(frame::lagged(dropped).into()).await?;
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
        text: Option<&Utf8Bytes>,
        socket: &mut Socket,
        pending: &mut FuturesUnordered<Pending>,
    ) -> Option<Closing> {
        if !self.requests.try_take(Instant::now()) {
            let e = FrameError::new(
                text.and_then(|t| frame::peek_id(t)),
                ErrorCode::RateLimited,
                format!(
                    "over {} requests per second; this request was dropped (retry in {} ms)",
                    self.app.request_rate,
                    self.requests.retry_after().as_millis().max(1)
                ),
            );
            return self.refuse(socket, e).await.err().map(Closing::from);
        }
        let mut shell = Shell {
            s: self,
            socket,
            pending,
            broken: None,
        };
        let outcome = AssertUnwindSafe(async {
            let s = &shell.s;
            let action = match text {
                Some(text) => session::decide(
                    text,
                    &s.credentials.perms,
                    &s.held,
                    &s.app.policy,
                    s.app.verifier.as_ref(),
                ),
                None => session::decide_binary(),
            };
            #[cfg(debug_assertions)]
            fault_injection(&s.app, &action);
            request::carry_out(&mut shell, action).await;
        })
        .catch_unwind()
        .await;
        match outcome {
            Ok(()) => shell.broken.map(Closing::from),
            Err(_) => {
                let reference = format!("c{}-{}", self.conn.id, self.app.next_conn_id());
                tracing::error!(reference, "bug: panic while handling a frame");
                let id = text.and_then(|t| frame::peek_id(t));
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

    async fn refuse(&self, socket: &mut Socket, e: FrameError) -> Result<(), Broken> {
        self.app.metrics.error(e.code.as_str());
        socket.send(e.to_json().into()).await
    }

    /// The token's time is up: say so, then close with 4001.
    async fn token_expired(&self, socket: &mut Socket) -> Closing {
        let _ = self.refuse(socket, frame::token_expired()).await;
        tracing::debug!(conn = self.conn.id, "token expired");
        Closing::Close(frame::TOKEN_EXPIRED_CLOSE, "token expired")
    }
}

/// Debug builds with BRIDGE_FAULT_INJECTION set: a publish to
/// `fault-injection/panic` panics (tests the `internal` error path).
#[cfg(debug_assertions)]
fn fault_injection(app: &App, action: &session::Action) {
    if app.fault_injection {
        if let session::Action::Publish { channel, .. } = action {
            assert!(channel != "fault-injection/panic", "fault injection");
        }
    }
}

/// This deployment's effects, for the duration of one request.
struct Shell<'a> {
    s: &'a mut Session,
    socket: &'a mut Socket,
    pending: &'a mut FuturesUnordered<Pending>,
    /// The first failed write: the connection is over.
    broken: Option<Broken>,
}

impl Shell<'_> {
    async fn write(&mut self, result: Result<(), Broken>) {
        if let Err(b) = result {
            self.broken.get_or_insert(b);
        }
    }
}

fn refusal(e: LinkError) -> Refusal {
    match e {
        LinkError::Unavailable(m) => Refusal::new(ErrorCode::Unavailable, m),
        LinkError::Refused(m) => Refusal::new(ErrorCode::Forbidden, m),
    }
}

impl Effects for Shell<'_> {
    async fn hold(&mut self, channel: &str, mqtt: &str) -> Result<Hold, Refusal> {
        if self.s.held.contains(channel) {
            return Ok(Hold::AlreadyHeld);
        }
        self.s
            .app
            .link
            .subscribe(&self.s.conn, mqtt)
            .await
            .map_err(refusal)?;
        self.s.held.insert(channel.to_string());
        Ok(Hold::Added)
    }

    async fn release(&mut self, channel: &str, mqtt: &str) -> Result<(), Refusal> {
        if self.s.held.remove(channel) {
            self.s.app.link.unsubscribe(self.s.conn.id, mqtt);
        }
        Ok(())
    }

    async fn replay_retained(&mut self, mqtt: &str) -> Result<(), Refusal> {
        let app = self.s.app.clone();
        let set = app.retained.fetch(mqtt).await.map_err(refusal)?;
        // The same bound as the queue: what does not fit is lost for this
        // connection and reported with `lagged`, as for live messages.
        let policy = &app.policy;
        let max = policy.limits.max_payload_bytes;
        let (mut sent, mut bytes, mut lost) = (0u64, 0usize, set.overflow);
        for (topic, payload) in &set.messages {
            match session::deliverable(&policy.prefix, max, topic, payload.len()) {
                Ok(name) => {
                    let message = frame::message(name, payload, true);
                    if bytes + message.len() > app.outbound_bytes {
                        lost += 1;
                        continue;
                    }
                    bytes += message.len();
                    let written = self.socket.feed(message.into()).await;
                    self.write(written).await;
                    if self.broken.is_some() {
                        return Ok(());
                    }
                    sent += 1;
                }
                Err(reason @ Undeliverable::TooLarge { .. }) => {
                    app.metrics.dropped(DropReason::TooLarge, 1);
                    tracing::warn!(topic, %reason, "retained message not delivered");
                }
                // The fetch asked for a filter inside the prefix.
                Err(Undeliverable::OutsidePrefix) => {}
            }
        }
        app.metrics.deliveries.inc_by(sent);
        if lost > 0 {
            app.metrics.dropped(DropReason::Lagged, lost);
            let written = self.socket.feed(frame::lagged(lost).into()).await;
            self.write(written).await;
        }
        let flushed = self.socket.flush().await;
        self.write(flushed).await;
        Ok(())
    }

    async fn publish(&mut self, publish: Publish, settle: Settle) {
        let app = self.s.app.clone();
        if !self.s.publishes.try_take(Instant::now()) {
            let wait = self.s.publishes.retry_after();
            let refusal = Refusal::new(
                ErrorCode::RateLimited,
                format!(
                    "over {} publishes per second; this publish was dropped (retry in {} ms)",
                    app.publish_rate,
                    wait.as_millis().max(1)
                ),
            );
            if let Err(e) = settle.answer(Err(refusal)) {
                self.refuse(e).await;
            }
            return;
        }
        let Publish {
            mqtt,
            payload,
            qos,
            retain,
        } = publish;
        match app.link.publish(&mqtt, payload, qos, retain) {
            Ok(acked) => self.pending.push(Box::pin(async move {
                settle.answer(acked.await.map_err(refusal))
            })),
            Err(e) => {
                if let Err(e) = settle.answer(Err(refusal(e))) {
                    self.refuse(e).await;
                }
            }
        }
    }

    async fn store_credentials(&mut self, credentials: Credentials) -> Result<(), Refusal> {
        self.s.credentials = credentials;
        Ok(())
    }

    async fn reply(&mut self, frame: String) {
        let written = self.socket.send(frame.into()).await;
        self.write(written).await;
    }

    async fn refuse(&mut self, error: FrameError) {
        let written = self.s.refuse(self.socket, error).await;
        self.write(written).await;
    }
}
