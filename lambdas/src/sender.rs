//! Delivery to browsers: API Gateway's `@connections` `PostToConnection`,
//! and `DeleteConnection` to close one (a token that expired).
//!
//! A frame is built once and shared by every post (reference-counted bytes,
//! handed to the SDK without a copy). Posts run concurrently, at most a given
//! number at once, and only while the invocation's [`Budget`] lets work
//! start. Each one ends on its own ([`Outcome`]): delivered; gone (`410`: the
//! caller deletes the connection's rows); failed (logged); or *later*: not
//! started, or not retried, before the budget ran out, or still throttled
//! (`429`) after its tries: the caller hands it on to another invocation
//! instead of losing it.
//! Throttled posts and transient failures (5xx, timeouts, a dropped
//! connection) are retried with jittered exponential backoff. A transient
//! failure may hide a delivered post, so its retry may deliver a second copy:
//! `message` frames carry the message's id for the client to drop it.
//! Every `429` answer is counted ([`Sender::throttled`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_apigatewaymanagement::error::{DisplayErrorContext, SdkError};
use aws_sdk_apigatewaymanagement::primitives::Blob;
use aws_sdk_apigatewaymanagement::Client;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};

use crate::budget::Budget;
use crate::config::MAX_POST_BYTES;

/// Tries for one post (throttled or failed transiently).
pub const MAX_ATTEMPTS: u32 = 5;

/// Why API Gateway would refuse to post `frame`: over its 128 KB. Such a
/// frame is never truncated and never posted.
pub fn unpostable(frame: &[u8]) -> Option<String> {
    (frame.len() > MAX_POST_BYTES).then(|| {
        format!(
            "the message frame is {} bytes; API Gateway takes at most {MAX_POST_BYTES}",
            frame.len()
        )
    })
}

/// How one post ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// The connection no longer exists (410 Gone).
    Gone,
    Failed(String),
    /// Not delivered yet: never started (the budget ran out) or still
    /// throttled. The caller hands it on.
    Later,
}

/// What an attempt's error means.
enum Attempt {
    Gone,
    Throttled,
    Transient(String),
    Failed(String),
}

fn classify<E: std::error::Error + 'static>(
    err: &SdkError<E, aws_sdk_apigatewaymanagement::config::http::HttpResponse>,
    gone: bool,
    throttled: bool,
) -> Attempt {
    let status = err.raw_response().map(|r| r.status().as_u16());
    if gone || status == Some(410) {
        return Attempt::Gone;
    }
    if throttled || status == Some(429) {
        return Attempt::Throttled;
    }
    let reason = DisplayErrorContext(err).to_string();
    let transient = match err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        _ => status.is_some_and(|s| s >= 500),
    };
    if transient {
        Attempt::Transient(reason)
    } else {
        Attempt::Failed(reason)
    }
}

/// The `@connections` client.
#[derive(Debug, Clone)]
pub struct Sender {
    client: Client,
    throttled: Arc<AtomicU64>,
}

impl Sender {
    pub fn new(client: Client) -> Self {
        Sender {
            client,
            throttled: Arc::default(),
        }
    }

    /// `429` answers seen so far.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    /// Posts one frame to one connection, starting attempts only within `budget`.
    pub async fn post(&self, id: &str, frame: Bytes, budget: &Budget) -> Outcome {
        let mut attempt = 0;
        loop {
            if !budget.may_start() {
                return Outcome::Later;
            }
            attempt += 1;
            let result = self
                .client
                .post_to_connection()
                .connection_id(id)
                .data(Blob::from_maybe_shared(frame.clone()))
                .send()
                .await;
            let err = match result {
                Ok(_) => return Outcome::Delivered,
                Err(e) => e,
            };
            let service = err.as_service_error();
            let verdict = classify(
                &err,
                service.is_some_and(|e| e.is_gone_exception()),
                service.is_some_and(|e| e.is_limit_exceeded_exception()),
            );
            match &verdict {
                Attempt::Gone => return Outcome::Gone,
                Attempt::Failed(reason) => {
                    tracing::warn!(connection = id, attempt, error = %reason, "post failed");
                    return Outcome::Failed(reason.clone());
                }
                Attempt::Throttled => {
                    self.throttled.fetch_add(1, Ordering::Relaxed);
                }
                Attempt::Transient(_) => {}
            }
            if attempt >= MAX_ATTEMPTS {
                return match verdict {
                    Attempt::Transient(reason) => {
                        tracing::warn!(connection = id, attempt, error = %reason, "post failed");
                        Outcome::Failed(reason)
                    }
                    _ => Outcome::Later,
                };
            }
            let wait = backoff(attempt);
            if !budget.may_start_after(wait) {
                return Outcome::Later;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Closes a connection (API Gateway then sends `$disconnect`). A
    /// connection already gone counts as closed.
    pub async fn close(&self, id: &str) -> Outcome {
        match self
            .client
            .delete_connection()
            .connection_id(id)
            .send()
            .await
        {
            Ok(_) => Outcome::Delivered,
            Err(err) => {
                let status = err.raw_response().map(|r| r.status().as_u16());
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_gone_exception())
                    || status == Some(410)
                {
                    return Outcome::Gone;
                }
                let reason = DisplayErrorContext(&err).to_string();
                tracing::warn!(connection = id, error = %reason, "close failed");
                Outcome::Failed(reason)
            }
        }
    }

    /// Says `frame` (an error such as `token_expired`) and closes the
    /// connection.
    pub async fn say_and_close(&self, id: &str, frame: Bytes) -> Outcome {
        match self.post(id, frame, &Budget::unlimited()).await {
            Outcome::Gone => Outcome::Gone,
            _ => self.close(id).await,
        }
    }

    /// Posts one frame to many connections, at most `concurrency` at once,
    /// starting posts only within `budget`. Returns each connection's outcome.
    pub async fn post_all(
        &self,
        ids: Vec<String>,
        frame: Bytes,
        concurrency: usize,
        budget: &Budget,
    ) -> Vec<(String, Outcome)> {
        stream::iter(ids)
            .map(|id| {
                let frame = frame.clone();
                async move {
                    let outcome = self.post(&id, frame, budget).await;
                    (id, outcome)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await
    }
}

/// Full jitter: a random wait up to 25 ms × 2^attempt (at most 800 ms).
fn backoff(attempt: u32) -> Duration {
    let cap = 25u64 << attempt.min(5);
    Duration::from_millis(fastrand::u64(1..=cap.min(800)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_bounded() {
        for _ in 0..100 {
            assert!(backoff(1) <= Duration::from_millis(50));
            assert!(backoff(30) <= Duration::from_millis(800));
        }
    }
}
