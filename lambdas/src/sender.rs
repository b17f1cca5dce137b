//! Delivery to browsers: API Gateway's `@connections` `PostToConnection`,
//! and `DeleteConnection` to close one (a token that expired).
//!
//! A frame is built once and shared by every post: its bytes and its SHA-256
//! (which every signature covers) are computed once ([`Body`]), and each
//! post is a signed request straight to the HTTP connector
//! ([`crate::signed`]). Posts run concurrently, at most a given number at
//! once, and only while the invocation's [`Budget`] lets work start. Each
//! one ends on its own ([`Outcome`]): delivered; gone (`410`: the caller
//! deletes the connection's rows); failed (logged); or *later*: not started,
//! or not retried, before the budget ran out, or still throttled (`429`)
//! after its tries: the caller hands it on to another invocation instead of
//! losing it. Throttled posts and transient failures (5xx, no answer within
//! [`crate::aws::POST_ATTEMPT_TIMEOUT`], a dropped connection) are retried
//! with jittered exponential backoff. A transient failure may hide a
//! delivered post, so its retry may deliver a second copy: `message` frames
//! carry the message's id for the client to drop it. Every `429` answer is
//! counted ([`Sender::throttled`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};

use crate::budget::Budget;
use crate::config::MAX_POST_BYTES;
use crate::signed::{encode_segment, Answer, Body, SendError, Signer};

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

/// What one attempt's answer means.
enum Attempt {
    Delivered,
    Gone,
    Throttled,
    Transient(String),
    Failed(String),
}

fn classify(result: Result<Answer, SendError>) -> Attempt {
    match result {
        Ok(Answer {
            status: 200..=299, ..
        }) => Attempt::Delivered,
        Ok(Answer { status: 410, .. }) => Attempt::Gone,
        Ok(Answer { status: 429, .. }) => Attempt::Throttled,
        Ok(Answer { status, error }) if status >= 500 => {
            Attempt::Transient(error.unwrap_or_default())
        }
        Ok(Answer { error, .. }) => Attempt::Failed(error.unwrap_or_default()),
        Err(e @ (SendError::Timeout(_) | SendError::Dispatch(_))) => {
            Attempt::Transient(e.to_string())
        }
        Err(e @ SendError::Invalid(_)) => Attempt::Failed(e.to_string()),
    }
}

/// The stage's `@connections` API.
#[derive(Debug, Clone)]
pub struct Sender {
    signer: Signer,
    /// `https://{api}.execute-api.{region}.amazonaws.com/{stage}`.
    endpoint: String,
    throttled: Arc<AtomicU64>,
}

impl Sender {
    /// Posts through `signer` (signing for `execute-api`) to the stage at
    /// `endpoint`.
    pub fn new(signer: Signer, endpoint: &str) -> Self {
        Sender {
            signer,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            throttled: Arc::default(),
        }
    }

    /// `429` answers seen so far.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    fn url(&self, id: &str) -> String {
        format!("{}/@connections/{}", self.endpoint, encode_segment(id))
    }

    /// Posts one frame (see [`Body`]) to one connection, starting attempts
    /// only within `budget`.
    pub async fn post(&self, id: &str, frame: &Body, budget: &Budget) -> Outcome {
        let url = self.url(id);
        let mut attempt = 0;
        loop {
            if !budget.may_start() {
                return Outcome::Later;
            }
            attempt += 1;
            let result = self
                .signer
                .send("PostToConnection", "POST", &url, &[], frame)
                .await;
            let verdict = match classify(result) {
                Attempt::Delivered => return Outcome::Delivered,
                Attempt::Gone => return Outcome::Gone,
                Attempt::Failed(reason) => {
                    tracing::warn!(connection = id, attempt, error = %reason, "post failed");
                    return Outcome::Failed(reason);
                }
                Attempt::Throttled => {
                    self.throttled.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Attempt::Transient(reason) => Some(reason),
            };
            if attempt >= MAX_ATTEMPTS {
                return match verdict {
                    Some(reason) => {
                        tracing::warn!(connection = id, attempt, error = %reason, "post failed");
                        Outcome::Failed(reason)
                    }
                    None => Outcome::Later,
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
        let empty = Body::new(Bytes::new());
        let result = self
            .signer
            .send("DeleteConnection", "DELETE", &self.url(id), &[], &empty)
            .await;
        match classify(result) {
            Attempt::Delivered => Outcome::Delivered,
            Attempt::Gone => Outcome::Gone,
            Attempt::Throttled => Outcome::Failed("throttled".into()),
            Attempt::Transient(reason) | Attempt::Failed(reason) => {
                tracing::warn!(connection = id, error = %reason, "close failed");
                Outcome::Failed(reason)
            }
        }
    }

    /// Says `frame` (an error such as `token_expired`) and closes the
    /// connection.
    pub async fn say_and_close(&self, id: &str, frame: Bytes) -> Outcome {
        match self.post(id, &Body::new(frame), &Budget::unlimited()).await {
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
        let frame = Body::new(frame);
        let frame = &frame;
        stream::iter(ids)
            .map(|id| async move {
                let outcome = self.post(&id, frame, budget).await;
                (id, outcome)
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
