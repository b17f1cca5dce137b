//! Request floods: connections that send requests as fast as the server
//! answers them (at most [`WINDOW`] unanswered at a time, so the flood goes
//! at the server's pace and never turns into a slow reader), and count the
//! answers by kind.
//!
//! * [`subscribe_flood`]: subscribe, unsubscribe and ping, every subscribe
//!   to a filter not used before in the cycle (PROTOCOL.md: every request
//!   counts against the connection's request rate, answered `rate_limited`).
//! * [`poison`]: publishes to and subscribes to channels holding control
//!   characters and Unicode non-characters (refused `invalid_channel`; none
//!   may reach the broker, which would drop the bridge's session).
//!
//! The frames are built before the flood starts and cycled (a clone is a
//! reference count), so the flood itself allocates nothing per request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{watch, Semaphore};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::attacker::{stopped, Outcome, Signals};
use crate::clients;
use crate::report::{counted, thousands};

/// Requests one flooding connection may have unanswered.
const WINDOW: usize = 128;
/// Distinct filters (or poison names) per connection before the cycle repeats.
const CYCLE: usize = 1000;
/// Code points no channel may hold (PROTOCOL.md v1.1): C0 and C1 controls,
/// DEL, and non-characters (U+FDD0..U+FDEF, every U+xxFFFE / U+xxFFFF).
const POISON: [char; 10] = [
    '\u{7}',
    '\u{0}',
    '\u{1b}',
    '\u{7f}',
    '\u{85}',
    '\u{fdd0}',
    '\u{fdef}',
    '\u{fffe}',
    '\u{ffff}',
    '\u{10ffff}',
];

/// The `subscribe` / `unsubscribe` / `ping` flood of connection `conn`.
fn flood_frames(conn: usize) -> Vec<Utf8Bytes> {
    let mut frames = Vec::with_capacity(3 * CYCLE);
    for i in 0..CYCLE {
        let channel = format!("flood/{conn}/{i}");
        let id = 3 * i;
        frames.push(
            serde_json::json!({"action": "subscribe", "channel": channel, "id": id}).to_string(),
        );
        frames.push(
            serde_json::json!({"action": "unsubscribe", "channel": channel, "id": id + 1})
                .to_string(),
        );
        frames.push(serde_json::json!({"action": "ping", "id": id + 2}).to_string());
    }
    frames.into_iter().map(Utf8Bytes::from).collect()
}

/// Two publishes and a subscribe per poison character, each name new.
fn poison_frames() -> Vec<Utf8Bytes> {
    let mut frames = Vec::with_capacity(CYCLE);
    for i in 0..CYCLE {
        let c = POISON[i % POISON.len()];
        let frame = match i % 3 {
            0 => {
                serde_json::json!({"action": "publish", "channel": format!("fleet/dev{c}/commands"),
                "data": {"n": i}, "id": i})
            }
            1 => serde_json::json!({"action": "publish", "channel": format!("fleet/dev-{i}/{c}"),
                "data": "x", "id": i}),
            _ => serde_json::json!({"action": "subscribe", "channel": format!("fleet/+/{c}{i}"),
                "id": i}),
        };
        frames.push(Utf8Bytes::from(frame.to_string()));
    }
    frames
}

/// The answers, by kind, over every connection of a flood.
#[derive(Default)]
struct Replies {
    sent: AtomicU64,
    ack: AtomicU64,
    pong: AtomicU64,
    rate_limited: AtomicU64,
    invalid_channel: AtomicU64,
    too_many_subscriptions: AtomicU64,
    other: AtomicU64,
    first_other: Mutex<Option<String>>,
    /// Connections the server closed, and the first reason.
    ended: AtomicU64,
    first_end: Mutex<Option<String>>,
}

impl Replies {
    fn count(&self, frame: &[u8]) {
        const ERROR: &[u8] = b"{\"type\":\"error\",\"code\":\"";
        let counter = if frame.starts_with(b"{\"type\":\"ack\"") {
            &self.ack
        } else if frame.starts_with(b"{\"type\":\"pong\"") {
            &self.pong
        } else if let Some(rest) = frame.strip_prefix(ERROR) {
            let code = rest.split(|&b| b == b'"').next().unwrap_or_default();
            match code {
                b"rate_limited" => &self.rate_limited,
                b"invalid_channel" => &self.invalid_channel,
                b"too_many_subscriptions" => &self.too_many_subscriptions,
                _ => self.other_frame(frame),
            }
        } else {
            self.other_frame(frame)
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn other_frame(&self, frame: &[u8]) -> &AtomicU64 {
        let mut first = self.first_other.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(|| String::from_utf8_lossy(&frame[..frame.len().min(200)]).into());
        &self.other
    }

    fn ended(&self, why: String) {
        self.ended.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_end.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(why);
    }
}

/// `n` connections flooding subscribe / unsubscribe / ping.
pub async fn subscribe_flood(addr: SocketAddr, n: usize, signals: Signals) -> Outcome {
    let frames = (0..n).map(flood_frames).collect();
    let (r, secs) = flood(addr, frames, signals).await;
    let answered = r.answered();
    r.outcome(format!(
        "{n} connections, {} requests/s answered; {:.0} % rate_limited, {} accepted/s",
        thousands(answered / secs),
        get(&r.rate_limited) / answered.max(1.0) * 100.0,
        thousands((get(&r.ack) + get(&r.pong)) / secs),
    ))
}

/// One connection publishing to and subscribing to poison names.
pub async fn poison(addr: SocketAddr, signals: Signals) -> Outcome {
    let (r, secs) = flood(addr, vec![poison_frames()], signals).await;
    r.outcome(format!(
        "{} requests/s answered: {} refused invalid_channel, {} rate_limited, {} accepted",
        thousands(r.answered() / secs),
        thousands(get(&r.invalid_channel)),
        thousands(get(&r.rate_limited)),
        thousands(get(&r.ack)),
    ))
}

fn get(c: &AtomicU64) -> f64 {
    c.load(Ordering::Relaxed) as f64
}

impl Replies {
    fn kinds(&self) -> [(&'static str, &AtomicU64); 6] {
        [
            ("ack", &self.ack),
            ("pong", &self.pong),
            ("rate_limited", &self.rate_limited),
            ("invalid_channel", &self.invalid_channel),
            ("too_many_subscriptions", &self.too_many_subscriptions),
            ("other", &self.other),
        ]
    }

    fn answered(&self) -> f64 {
        self.kinds().into_iter().map(|(_, c)| get(c)).sum()
    }

    /// The outcome: `summary`, and notes with every answer by kind and
    /// whatever went other than planned.
    fn outcome(&self, summary: String) -> Outcome {
        let lock = |m: &Mutex<Option<String>>| m.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let by_kind: Vec<String> = self
            .kinds()
            .into_iter()
            .filter(|(_, c)| get(c) > 0.0)
            .map(|(kind, c)| format!("{} {kind}", thousands(get(c))))
            .collect();
        let mut notes = vec![format!(
            "{} requests sent, {} answered: {}",
            thousands(get(&self.sent)),
            thousands(self.answered()),
            by_kind.join(", ")
        )];
        let other = self.other.load(Ordering::Relaxed);
        notes.extend(counted(
            other,
            "unexpected answers",
            lock(&self.first_other).as_deref(),
        ));
        let ended = self.ended.load(Ordering::Relaxed);
        notes.extend(counted(
            ended,
            "flooding connections ended",
            lock(&self.first_end).as_deref(),
        ));
        Outcome { summary, notes }
    }
}

/// Runs one flooding connection per frame set until stopped; the answers
/// and the seconds the flood ran.
async fn flood(
    addr: SocketAddr,
    frame_sets: Vec<Vec<Utf8Bytes>>,
    mut signals: Signals,
) -> (Arc<Replies>, f64) {
    let replies = Arc::new(Replies::default());
    let mut conns = Vec::with_capacity(frame_sets.len());
    for _ in &frame_sets {
        match clients::connect_ws(addr, 64 * 1024, None).await {
            Ok(ws) => conns.push(ws),
            Err(e) => {
                signals.ready(Err(format!("a flooding connection failed: {e}")));
                return (replies, 1.0);
            }
        }
    }
    signals.ready(Ok(()));
    let started = std::time::Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .zip(frame_sets)
        .map(|(ws, frames)| tokio::spawn(one(ws, frames, replies.clone(), signals.stop.clone())))
        .collect();
    stopped(&mut signals.stop).await;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    for t in tasks {
        let _ = t.await;
    }
    (replies, secs)
}

/// One flooding connection: a writer keeping [`WINDOW`] requests
/// unanswered, a reader counting the answers.
async fn one(
    ws: clients::BridgeWs,
    frames: Vec<Utf8Bytes>,
    replies: Arc<Replies>,
    mut stop: watch::Receiver<bool>,
) {
    let (mut sink, mut stream) = ws.split();
    let window = Arc::new(Semaphore::new(WINDOW));
    let reader = {
        let (window, replies) = (window.clone(), replies.clone());
        async move {
            loop {
                match stream.next().await {
                    Some(Ok(Message::Text(text))) => {
                        replies.count(text.as_bytes());
                        window.add_permits(1);
                    }
                    Some(Ok(Message::Close(frame))) => {
                        return format!("closed by the server: {frame:?}");
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return format!("read error: {e}"),
                    None => return "connection closed".to_string(),
                }
            }
        }
    };
    let writer = async {
        let mut next = 0;
        loop {
            let Ok(permit) = window.acquire().await else {
                return "window closed".to_string();
            };
            permit.forget();
            let mut batch = 0u64;
            loop {
                if let Err(e) = sink.feed(Message::Text(frames[next].clone())).await {
                    return format!("write error: {e}");
                }
                next = (next + 1) % frames.len();
                batch += 1;
                match window.try_acquire() {
                    Ok(p) if batch < WINDOW as u64 => p.forget(),
                    Ok(p) => {
                        drop(p);
                        break;
                    }
                    Err(_) => break,
                }
            }
            replies.sent.fetch_add(batch, Ordering::Relaxed);
            if let Err(e) = sink.flush().await {
                return format!("write error: {e}");
            }
        }
    };
    tokio::select! {
        _ = stopped(&mut stop) => {}
        why = reader => replies.ended(why),
        why = writer => replies.ended(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_counted_by_kind() {
        let r = Replies::default();
        r.count(br#"{"type":"ack","id":1}"#);
        r.count(br#"{"type":"pong","id":2}"#);
        r.count(br#"{"type":"error","code":"rate_limited","message":"x","id":3}"#);
        r.count(br#"{"type":"error","code":"invalid_channel","message":"x","id":4}"#);
        r.count(br#"{"type":"error","code":"forbidden","message":"x","id":5}"#);
        assert_eq!(get(&r.ack), 1.0);
        assert_eq!(get(&r.pong), 1.0);
        assert_eq!(get(&r.rate_limited), 1.0);
        assert_eq!(get(&r.invalid_channel), 1.0);
        assert_eq!(get(&r.other), 1.0);
        assert!(r
            .first_other
            .lock()
            .unwrap()
            .as_deref()
            .unwrap()
            .contains("forbidden"));
    }

    #[test]
    fn every_poison_name_holds_a_forbidden_character() {
        for frame in poison_frames() {
            let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
            let channel = v["channel"].as_str().unwrap();
            assert!(channel.chars().any(|c| POISON.contains(&c)), "{channel:?}");
        }
    }
}
