//! `iot-fanout`: the IoT topic rule's target. One invocation is one MQTT
//! message, pushed to every connection holding a filter that matches it.
//!
//! The event is what the rule's SQL selects ([`RULE_FIELDS`]):
//! `{"topic": "...", "payload": "<base64>", "timestamp": <ms>, "id": "<uuid>"}`.
//!
//! Finding the connections: the rows of the topic itself, of its
//! literal-prefix ancestors (`#`, `a/#`, ...) and of the registered `+`
//! filters that match it ([`crate::store::lookup_keys`]), each read through
//! this environment's cache ([`crate::lookup`]: reused for at most
//! `BRIDGE_LOOKUP_CACHE_MS`, never missing an acked subscription). The match
//! itself is the core's [`bridge::channel::matches`]. A connection found
//! through several filters gets one copy.
//!
//! Delivery: the `message` frame is built once by the core and shared by all
//! posts ([`crate::sender`]); connections that answer `410 Gone` have their
//! rows deleted; a frame over API Gateway's 128 KB (or a payload over the
//! configured limit) is refused with a logged reason, never truncated. Each
//! invocation ends with one EMF line: delivered, gone, failed, duration and
//! the DynamoDB requests it made.
//!
//! Token lifetime: a connection whose token has ended gets no message. Its
//! filter row says when the token ends; when that has passed, the connection
//! row decides (an `auth` may have moved the end, see [`crate::store`]), and a
//! connection whose token really ended is told `token_expired`, closed and
//! its rows deleted, instead of being posted the message.
//!
//! A failed post does not fail the invocation (the rule invokes
//! asynchronously and a retry would repeat every successful post); a failed
//! lookup does, so Lambda retries it and, after that, it lands in the
//! function's dead-letter queue.

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
use crate::lookup::Lookups;
use crate::sender::{self, Outcome, Sender};
use crate::store::{Store, StoreError};

/// The fields the topic rule selects, and this function reads.
pub const RULE_FIELDS: &[&str] = &["topic", "payload", "timestamp", "id"];

/// Connections cleaned up at once after `410 Gone`.
const CLEANUP_CONCURRENCY: usize = 16;

/// The rule's output.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RuleEvent {
    /// The MQTT topic (`topic()`).
    pub topic: String,
    /// The payload, base64 (`encode(*, 'base64')`).
    pub payload: String,
    /// When IoT Core received it, in ms (`timestamp()`).
    #[serde(default)]
    pub timestamp: Option<i64>,
    /// A fresh id per rule evaluation (`newuuid()`), for the logs.
    #[serde(default)]
    pub id: Option<String>,
}

/// Why an invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error("not a topic rule event: {0}")]
    BadEvent(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one invocation did (also its response, for tests and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Filters that matched the topic and were looked up.
    pub filters: usize,
    /// Distinct connections the message was for.
    pub recipients: usize,
    pub delivered: usize,
    pub gone: usize,
    pub failed: usize,
    /// Connections whose token had ended: closed, not posted to.
    pub expired: usize,
    /// Why the message was not delivered at all, if it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
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
            calls,
        }
    }

    /// One rule event.
    pub async fn handle(&self, event: serde_json::Value) -> Result<Report, FanoutError> {
        let started = Instant::now();
        let dynamodb_before = self.calls.total("DynamoDB");
        let mut report = Report::default();
        // Boxed: the delivery future is deep, and callers nest it further.
        let result = Box::pin(self.deliver(event, &mut report)).await;
        report.duration_ms = started.elapsed().as_millis() as u64;
        report.dynamodb_requests = self.calls.total("DynamoDB") - dynamodb_before;
        crate::emf::emit(
            "iot-fanout",
            &[
                ("Delivered", report.delivered as f64, "Count"),
                ("Gone", report.gone as f64, "Count"),
                ("Failed", report.failed as f64, "Count"),
                ("Expired", report.expired as f64, "Count"),
                (
                    "Refused",
                    f64::from(u8::from(report.refused.is_some())),
                    "Count",
                ),
                ("Recipients", report.recipients as f64, "Count"),
                ("Duration", report.duration_ms as f64, "Milliseconds"),
                ("DynamoDbRequests", report.dynamodb_requests as f64, "Count"),
            ],
        );
        result.map(|()| report)
    }

    async fn deliver(
        &self,
        event: serde_json::Value,
        report: &mut Report,
    ) -> Result<(), FanoutError> {
        let event: RuleEvent =
            serde_json::from_value(event).map_err(|e| FanoutError::BadEvent(e.to_string()))?;
        let payload = base64::engine::general_purpose::STANDARD
            .decode(event.payload.as_bytes())
            .map_err(|e| FanoutError::BadEvent(format!("payload is not base64: {e}")))?;
        let id = event.id.as_deref().unwrap_or("-");
        if channel::validate_topic(&event.topic).is_err() {
            return Err(FanoutError::BadEvent(format!(
                "{:?} is not an MQTT topic name",
                event.topic
            )));
        }
        let max = self.config.max_payload_bytes;
        let name = match session::deliverable(&self.config.prefix, max, &event.topic, payload.len())
        {
            Ok(name) => name,
            Err(reason) => {
                tracing::warn!(id, topic = %event.topic, %reason, "not delivered");
                report.refused = Some(reason.to_string());
                return Ok(());
            }
        };
        let now = crate::now_secs();
        let found = self.lookups.subscribers(&event.topic, now).await?;
        report.filters = found.filters;
        report.recipients = found.connections.len();
        let (mut recipients, ended): (Vec<String>, Vec<String>) = {
            let (live, ended): (Vec<_>, Vec<_>) = found
                .connections
                .into_iter()
                .partition(|(_, end)| end.is_none_or(|at| now < at));
            (
                live.into_iter().map(|(id, _)| id).collect(),
                ended.into_iter().map(|(id, _)| id).collect(),
            )
        };
        let expired = self.expired(ended, now, &mut recipients).await?;
        report.expired = expired.len();
        self.close_expired(expired, now).await;
        if recipients.is_empty() {
            return Ok(());
        }
        // Built once for every recipient, and only when there is one.
        let message = frame::message(name, &payload, false);
        if let Some(reason) = sender::unpostable(message.as_bytes()) {
            tracing::warn!(id, topic = %event.topic, %reason, "not delivered");
            report.refused = Some(reason);
            return Ok(());
        }
        let message = Bytes::from(message);

        let outcomes = self
            .sender
            .post_all(
                recipients,
                message,
                self.config.concurrency,
                &Budget::unlimited(),
            )
            .await;
        let mut gone = Vec::new();
        for (conn, outcome) in outcomes {
            match outcome {
                Outcome::Delivered => report.delivered += 1,
                Outcome::Gone => gone.push(conn),
                Outcome::Failed(_) | Outcome::Later => report.failed += 1,
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
        tracing::debug!(id, topic = %event.topic, ?report, "fan-out done");
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
