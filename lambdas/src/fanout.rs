//! `iot-fanout`: the IoT topic rule's target. One device message is pushed
//! to every connection holding a filter that matches it, by one invocation
//! or by several in parallel ([`crate::parts`]).
//!
//! The rule's event is what its SQL selects ([`RULE_FIELDS`]):
//! `{"topic": "...", "payload": "<base64>", "timestamp": <ms>, "id": "<uuid>"}`;
//! the `id` (the rule's `newuuid()`) names the message in logs, in progress
//! rows and, as `mid`, in the `message` frames, so a client can drop a copy
//! it already has.
//!
//! Finding the connections: the rows of the topic itself, of its
//! literal-prefix ancestors (`#`, `a/#`, ...) and of the registered `+`
//! filters that match it ([`crate::store::lookup_keys`]), each read through
//! this environment's cache ([`crate::lookup`]: reused for at most
//! `BRIDGE_LOOKUP_CACHE_MS`, never missing an acked subscription). The match
//! itself is the core's [`bridge::channel::matches`]. A connection found
//! through several filters gets one copy.
//!
//! Scaling out: with more recipients than `BRIDGE_FANOUT_PART_SIZE`, the
//! root invocation keeps the first chunk and hands every other chunk to a
//! parallel, asynchronous invocation of this function ([`crate::invoke`]); a
//! chunk it cannot hand off, it posts itself.
//!
//! Delivery: the `message` frame is built once by the core and shared by all
//! posts ([`crate::sender`]), at most `BRIDGE_FANOUT_CONCURRENCY` in flight;
//! connections that answer `410 Gone` have their rows deleted; throttled
//! posts are retried; a frame over API Gateway's 128 KB (or a payload over
//! the configured limit) is refused with a logged reason, never truncated.
//! Each invocation ends with one EMF line: metrics delivered, failed,
//! throttled (`429` answers), parts handed off and duration; gone, expired,
//! handed on, recipients, lookup time and DynamoDB requests as properties.
//!
//! Time: posts start only within the invocation's [`Budget`] (the Lambda
//! deadline less a reserve), so no invocation is killed by its timeout
//! mid-post. What is left (not started, or still throttled) is handed on as
//! one more part. Only if that hand-on fails does the invocation fail, after
//! recording in the store what it still owes ([`Store::save_progress`]):
//! Lambda retries the event a minute later, and the retry reads the record
//! first ([`Store::progress`]) and posts to those connections only. So a
//! retry re-posts nothing that was posted, except when an invocation dies
//! without a word (a crash): that retry starts over, and clients drop the
//! copies by `mid`. A failed lookup fails the invocation before any post.
//! After Lambda's retries an event lands in the dead-letter queue.
//!
//! Token lifetime: a connection whose token has ended gets no message. Its
//! filter row says when the token ends; when that has passed, the connection
//! row decides (an `auth` may have moved the end, see [`crate::store`]), and a
//! connection whose token really ended is told `token_expired`, closed and
//! its rows deleted, instead of being posted the message.

use std::time::Instant;

use base64::Engine;
use bridge::channel;
use bridge::frame;
use bridge::session;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::calls::Calls;
use crate::clock::Clock;
use crate::config::FanoutConfig;
use crate::invoke::Invoker;
use crate::lookup::{Found, Lookups};
use crate::parts::{self, Part, PartEvent};
use crate::sender::{self, Outcome, Sender};
use crate::store::{Store, StoreError};

/// The fields the topic rule selects, and this function reads.
pub const RULE_FIELDS: &[&str] = &["topic", "payload", "timestamp", "id"];

/// Connections cleaned up at once after `410 Gone`.
const CLEANUP_CONCURRENCY: usize = 16;
/// Parts handed off at once.
const HANDOFF_CONCURRENCY: usize = 16;
/// How long a progress row is kept: beyond the event's last retry (the
/// template keeps an event at most 300 s; retries wait 1 and 2 minutes).
const PROGRESS_TTL_SECS: i64 = 3600;

/// The rule's output.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct RuleEvent {
    /// The MQTT topic (`topic()`).
    pub topic: String,
    /// The payload, base64 (`encode(*, 'base64')`).
    pub payload: String,
    /// When IoT Core received it, in ms (`timestamp()`).
    #[serde(default)]
    pub timestamp: Option<i64>,
    /// A fresh id per rule evaluation (`newuuid()`).
    #[serde(default)]
    pub id: Option<String>,
}

impl RuleEvent {
    /// The message's id, when it is one this function can use as a key and
    /// put in a frame as is: 1 to 64 ASCII letters, digits and dashes (a
    /// UUID is).
    pub fn message_id(&self) -> Option<&str> {
        self.id.as_deref().filter(|id| {
            (1..=64).contains(&id.len())
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
    }
}

/// `frame` (a `message` frame from [`bridge::frame::message`]) with the
/// message's id as `mid`.
pub fn with_message_id(mut frame: String, mid: Option<&str>) -> String {
    if let (Some(mid), Some(b'}')) = (mid, frame.as_bytes().last()) {
        frame.pop();
        frame.push_str(",\"mid\":\"");
        frame.push_str(mid);
        frame.push_str("\"}");
    }
    frame
}

/// Why an invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error("not a topic rule event: {0}")]
    BadEvent(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Posts are left that could not be handed on; Lambda retries the event.
    #[error("{left} connections not delivered yet ({reason}); {recorded}")]
    Unfinished {
        left: usize,
        reason: String,
        recorded: &'static str,
    },
}

/// What one invocation did (also its response, for tests and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The part of the delivery this invocation did (`"0"`: the root).
    pub part: String,
    /// Filters that matched the topic and were looked up (the root).
    pub filters: usize,
    /// Distinct connections the message was for (the root: all of them;
    /// a part: its own).
    pub recipients: usize,
    pub delivered: usize,
    pub gone: usize,
    pub failed: usize,
    /// Connections whose token had ended: closed, not posted to.
    pub expired: usize,
    /// `429` answers seen.
    pub throttled: u64,
    /// Parts handed to other invocations.
    pub handed_off: usize,
    /// Connections handed on to another invocation (time or throttling).
    pub handed_on: usize,
    /// Whether an earlier attempt recorded what was left, and this one
    /// posted only that.
    pub resumed: bool,
    /// Why the message was not delivered at all, if it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Time spent finding the connections (and reading the progress row).
    pub lookup_ms: u64,
    pub duration_ms: u64,
    pub dynamodb_requests: u64,
}

/// Everything `iot-fanout` keeps between invocations.
#[derive(Debug)]
pub struct Fanout {
    config: FanoutConfig,
    store: Store,
    lookups: Lookups,
    sender: Sender,
    /// Hands parts to other invocations; none outside Lambda.
    invoker: Option<Invoker>,
    calls: Calls,
}

impl Fanout {
    pub fn new(config: FanoutConfig, store: Store, sender: Sender, calls: Calls) -> Self {
        Self::with_clock(config, store, sender, calls, Clock::System)
    }

    /// With the clock the lookup cache ages by (a manual one for replays).
    pub fn with_clock(
        config: FanoutConfig,
        store: Store,
        sender: Sender,
        calls: Calls,
        clock: Clock,
    ) -> Self {
        let lookups = Lookups::new(store.clone(), config.lookup_max_age, clock);
        Fanout {
            config,
            store,
            lookups,
            sender,
            invoker: None,
            calls,
        }
    }

    /// Hands parts on through `invoker` (without one, nothing is split, and
    /// what is left when the budget runs out is recorded for the retry).
    pub fn with_invoker(mut self, invoker: Invoker) -> Self {
        self.invoker = Some(invoker);
        self
    }

    /// One event, without a deadline.
    pub async fn handle(&self, event: serde_json::Value) -> Result<Report, FanoutError> {
        self.handle_within(event, Budget::unlimited()).await
    }

    /// One event (the rule's, or a part), starting posts only within `budget`.
    pub async fn handle_within(
        &self,
        event: serde_json::Value,
        budget: Budget,
    ) -> Result<Report, FanoutError> {
        let started = Instant::now();
        let dynamodb_before = self.calls.total("DynamoDB");
        let throttled_before = self.sender.throttled();
        let mut report = Report::default();
        // Boxed: the delivery future is deep, and callers nest it further.
        let result = Box::pin(self.deliver(event, &budget, &mut report)).await;
        report.duration_ms = started.elapsed().as_millis() as u64;
        report.dynamodb_requests = self.calls.total("DynamoDB") - dynamodb_before;
        report.throttled = self.sender.throttled() - throttled_before;
        // Metrics: what the alarms and a dashboard read (each costs per
        // month); the rest of the report rides along as properties.
        crate::emf::emit(
            "iot-fanout",
            &[
                ("Delivered", report.delivered as f64, "Count"),
                ("Failed", report.failed as f64, "Count"),
                ("Throttled", report.throttled as f64, "Count"),
                ("HandedOff", report.handed_off as f64, "Count"),
                ("Duration", report.duration_ms as f64, "Milliseconds"),
            ],
            &[
                ("Gone", report.gone as f64),
                ("Expired", report.expired as f64),
                ("HandedOn", report.handed_on as f64),
                ("Refused", f64::from(u8::from(report.refused.is_some()))),
                ("Recipients", report.recipients as f64),
                ("Lookup", report.lookup_ms as f64),
                ("DynamoDbRequests", report.dynamodb_requests as f64),
            ],
        );
        if let Err(e) = &result {
            tracing::error!(part = %report.part, error = %e, "fan-out failed");
        }
        result.map(|()| report)
    }

    async fn deliver(
        &self,
        event: serde_json::Value,
        budget: &Budget,
        report: &mut Report,
    ) -> Result<(), FanoutError> {
        let (part, root) = parse(event)?;
        report.part = part.key.clone();
        let msg = &part.message;
        let payload = base64::engine::general_purpose::STANDARD
            .decode(msg.payload.as_bytes())
            .map_err(|e| FanoutError::BadEvent(format!("payload is not base64: {e}")))?;
        let mid = msg.message_id();
        let id = mid.unwrap_or("-");
        if channel::validate_topic(&msg.topic).is_err() {
            return Err(FanoutError::BadEvent(format!(
                "{:?} is not an MQTT topic name",
                msg.topic
            )));
        }
        let max = self.config.max_payload_bytes;
        let name = match session::deliverable(&self.config.prefix, max, &msg.topic, payload.len()) {
            Ok(name) => name,
            Err(reason) => {
                tracing::warn!(id, topic = %msg.topic, %reason, "not delivered");
                report.refused = Some(reason.to_string());
                return Ok(());
            }
        };
        let now = crate::now_secs();
        // What an earlier attempt of this part recorded it still owed (read
        // alongside the root's lookup, which it then replaces).
        let progress = async {
            match mid {
                Some(mid) => self.store.progress(mid, &part.key, now).await,
                None => Ok(None),
            }
        };
        let looking = Instant::now();
        let (resumed, found) = if root {
            let (resumed, found) =
                tokio::join!(progress, self.lookups.subscribers(&msg.topic, now));
            (resumed?, Some(found?))
        } else {
            (progress.await?, None)
        };
        report.lookup_ms = looking.elapsed().as_millis() as u64;
        report.resumed = resumed.is_some();
        let recipients = match (resumed, found) {
            (Some(left), _) => left,
            (None, Some(found)) => self.recipients(found, now, report).await?,
            (None, None) => part.recipients.clone(),
        };
        if !root || report.resumed {
            report.recipients = recipients.len();
        }
        if recipients.is_empty() {
            return self.done(&part, mid, report.resumed).await;
        }
        // Built once for every recipient, and only when there is one.
        let message = with_message_id(frame::message(name, &payload, false), mid);
        if let Some(reason) = sender::unpostable(message.as_bytes()) {
            tracing::warn!(id, topic = %msg.topic, %reason, "not delivered");
            report.refused = Some(reason);
            return Ok(());
        }
        let message = Bytes::from(message);
        let recipients = if root && !report.resumed {
            self.split(&part, recipients, report).await
        } else {
            recipients
        };

        let outcomes = self
            .sender
            .post_all(recipients, message, self.config.concurrency, budget)
            .await;
        let mut gone = Vec::new();
        let mut later = Vec::new();
        for (conn, outcome) in outcomes {
            match outcome {
                Outcome::Delivered => report.delivered += 1,
                Outcome::Gone => gone.push(conn),
                Outcome::Failed(_) => report.failed += 1,
                Outcome::Later => later.push(conn),
            }
        }
        report.gone = gone.len();
        stream::iter(gone)
            .for_each_concurrent(CLEANUP_CONCURRENCY, |conn| async move {
                self.lookups.forget(&conn);
                if let Err(e) = self.store.remove_connection(&conn, now).await {
                    tracing::warn!(connection = %conn, error = %e, "cannot remove a gone connection");
                }
            })
            .await;
        if later.is_empty() {
            tracing::debug!(id, topic = %msg.topic, ?report, "fan-out done");
            return self.done(&part, mid, report.resumed).await;
        }
        if part.round >= parts::MAX_ROUNDS {
            tracing::warn!(
                id,
                part = %part.key,
                left = later.len(),
                "posts still throttled after every hand-on: failed"
            );
            report.failed += later.len();
            return self.done(&part, mid, report.resumed).await;
        }
        self.hand_on(&part, later, mid, now, report).await
    }

    /// The connections the root's lookup found, less those whose token
    /// ended (closed here).
    async fn recipients(
        &self,
        found: Found,
        now: i64,
        report: &mut Report,
    ) -> Result<Vec<String>, FanoutError> {
        report.filters = found.filters;
        report.recipients = found.connections.len();
        let (live, ended): (Vec<_>, Vec<_>) = found
            .connections
            .into_iter()
            .partition(|(_, end)| end.is_none_or(|at| now < at));
        let mut recipients: Vec<String> = live.into_iter().map(|(id, _)| id).collect();
        let ended = ended.into_iter().map(|(id, _)| id).collect();
        let expired = self.expired(ended, now, &mut recipients).await?;
        report.expired = expired.len();
        self.close_expired(expired, now).await;
        Ok(recipients)
    }

    /// Keeps the first chunk of `recipients` and hands the others to
    /// parallel invocations; a chunk that cannot be handed off stays here.
    async fn split(
        &self,
        part: &Part,
        recipients: Vec<String>,
        report: &mut Report,
    ) -> Vec<String> {
        let size = self.config.part_size;
        let Some(invoker) = &self.invoker else {
            return recipients;
        };
        if size == 0 || recipients.len() <= size {
            return recipients;
        }
        let mut chunks = parts::chunks(recipients, size, &part.message).into_iter();
        let mut own = chunks.next().unwrap_or_default();
        let handed: Vec<(Part, Result<(), String>)> = stream::iter(chunks.enumerate())
            .map(|(i, chunk)| async move {
                let p = Part {
                    key: part.chunk_key(i + 1),
                    round: 0,
                    message: part.message.clone(),
                    recipients: chunk,
                };
                let result = invoker.hand_off(&p).await;
                (p, result)
            })
            .buffer_unordered(HANDOFF_CONCURRENCY)
            .collect()
            .await;
        for (p, result) in handed {
            match result {
                Ok(()) => report.handed_off += 1,
                Err(e) => {
                    tracing::warn!(part = %p.key, error = %e, "cannot hand a part off: posting it here");
                    own.extend(p.recipients);
                }
            }
        }
        own
    }

    /// Hands the connections `left` on as one more part; if that fails,
    /// records them for this event's retry and fails the invocation.
    async fn hand_on(
        &self,
        part: &Part,
        left: Vec<String>,
        mid: Option<&str>,
        now: i64,
        report: &mut Report,
    ) -> Result<(), FanoutError> {
        let rest = part.rest(left);
        let reason = match &self.invoker {
            Some(invoker) => match invoker.hand_off(&rest).await {
                Ok(()) => {
                    report.handed_on = rest.recipients.len();
                    return Ok(());
                }
                Err(e) => e,
            },
            None => "no function to hand it on to".to_string(),
        };
        let left = rest.recipients.len();
        let recorded = match mid {
            Some(mid) => match self
                .store
                .save_progress(mid, &part.key, &rest.recipients, now + PROGRESS_TTL_SECS)
                .await
            {
                Ok(()) => "recorded for the retry",
                Err(e) => {
                    tracing::error!(part = %part.key, error = %e, "cannot record what is left");
                    "not recorded: the retry posts the whole part again"
                }
            },
            None => "not recorded (the event has no id): the retry posts the whole part again",
        };
        Err(FanoutError::Unfinished {
            left,
            reason,
            recorded,
        })
    }

    /// This part owes nothing more. A part resumed from a record clears it,
    /// so a late duplicate of the event posts nothing again.
    async fn done(&self, part: &Part, mid: Option<&str>, resumed: bool) -> Result<(), FanoutError> {
        if let (true, Some(mid)) = (resumed, mid) {
            let expires = crate::now_secs() + PROGRESS_TTL_SECS;
            if let Err(e) = self.store.save_progress(mid, &part.key, &[], expires).await {
                tracing::warn!(part = %part.key, error = %e, "cannot record the part as done");
            }
        }
        Ok(())
    }

    /// Of the connections whose rows say their token ended, those whose
    /// connection row agrees; the others (refreshed by `auth`) go back into
    /// `recipients`.
    async fn expired(
        &self,
        ended: Vec<String>,
        now: i64,
        recipients: &mut Vec<String>,
    ) -> Result<Vec<String>, StoreError> {
        let mut expired = Vec::new();
        for id in ended {
            match self.store.token_expiry(&id, now).await? {
                Some(Some(at)) if now >= at => expired.push(id),
                Some(_) => recipients.push(id),
                None => {} // gone already
            }
        }
        Ok(expired)
    }

    /// Tells each connection `token_expired`, closes it, deletes its rows.
    async fn close_expired(&self, expired: Vec<String>, now: i64) {
        if expired.is_empty() {
            return;
        }
        let said = Bytes::from(frame::token_expired().to_json());
        stream::iter(expired)
            .for_each_concurrent(CLEANUP_CONCURRENCY, |conn| {
                let said = said.clone();
                async move {
                    self.lookups.forget(&conn);
                    let outcome = self.sender.say_and_close(&conn, said).await;
                    tracing::debug!(connection = %conn, ?outcome, "token expired: closed");
                    if let Err(e) = self.store.remove_connection(&conn, now).await {
                        tracing::warn!(connection = %conn, error = %e, "cannot remove an expired connection");
                    }
                }
            })
            .await;
    }
}

/// The event as a part: a part event as sent, or the rule's event as the
/// root part. `true` for the root.
fn parse(event: serde_json::Value) -> Result<(Part, bool), FanoutError> {
    let bad = |e: serde_json::Error| FanoutError::BadEvent(e.to_string());
    if event.get("part").is_some() {
        let PartEvent { part } = serde_json::from_value(event).map_err(bad)?;
        if part.key == parts::ROOT {
            return Err(FanoutError::BadEvent("a part cannot be the root".into()));
        }
        return Ok((part, false));
    }
    let message: RuleEvent = serde_json::from_value(event).map_err(bad)?;
    Ok((
        Part {
            key: parts::ROOT.to_string(),
            round: 0,
            message,
            recipients: Vec::new(),
        },
        true,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_id_goes_into_the_frame_only_when_it_is_plain() {
        let frame = frame::message("a/b", b"{\"t\":1}", false);
        let with = with_message_id(frame.clone(), Some("7d2c1b7e-0000-4000-8000-000000000001"));
        let v: serde_json::Value = serde_json::from_str(&with).unwrap();
        assert_eq!(v["mid"], "7d2c1b7e-0000-4000-8000-000000000001");
        assert_eq!(v["data"]["t"], 1);
        assert_eq!(with_message_id(frame.clone(), None), frame);
        let event = |id: &str| RuleEvent {
            topic: "a".into(),
            payload: String::new(),
            timestamp: None,
            id: Some(id.into()),
        };
        assert_eq!(event("abc-1").message_id(), Some("abc-1"));
        for bad in ["", "a\"b", "a b", &"x".repeat(65), "é"] {
            assert_eq!(event(bad).message_id(), None, "{bad:?}");
        }
    }
}
