//! Delivery to browsers: API Gateway's `@connections` `PostToConnection`,
//! and `DeleteConnection` to close one (a token that expired).
//!
//! A frame is built once and shared by every post (reference-counted bytes,
//! handed to the SDK without a copy). Posts run concurrently, at most a given
//! number at once; each one ends on its own: delivered, gone (`410`: the
//! caller deletes the connection's rows) or failed (logged). Throttled posts
//! (`429`) are retried with jittered exponential backoff; nothing else is
//! retried, so a post that may have been delivered is never sent twice.

use std::time::Duration;

use aws_sdk_apigatewaymanagement::error::DisplayErrorContext;
use aws_sdk_apigatewaymanagement::primitives::Blob;
use aws_sdk_apigatewaymanagement::Client;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};

use crate::config::MAX_POST_BYTES;

/// Tries for a throttled post.
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
}

/// The `@connections` client.
#[derive(Debug, Clone)]
pub struct Sender {
    client: Client,
}

impl Sender {
    pub fn new(client: Client) -> Self {
        Sender { client }
    }

    /// Posts one frame to one connection.
    pub async fn post(&self, id: &str, frame: Bytes) -> Outcome {
        let mut attempt = 0;
        loop {
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
            let status = err.raw_response().map(|r| r.status().as_u16());
            let service = err.as_service_error();
            if service.is_some_and(|e| e.is_gone_exception()) || status == Some(410) {
                return Outcome::Gone;
            }
            let throttled =
                service.is_some_and(|e| e.is_limit_exceeded_exception()) || status == Some(429);
            if throttled && attempt < MAX_ATTEMPTS {
                tokio::time::sleep(backoff(attempt)).await;
                continue;
            }
            let reason = DisplayErrorContext(&err).to_string();
            tracing::warn!(connection = id, attempt, error = %reason, "post failed");
            return Outcome::Failed(reason);
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
        match self.post(id, frame).await {
            Outcome::Gone => Outcome::Gone,
            _ => self.close(id).await,
        }
    }

    /// Posts one frame to many connections, at most `concurrency` at once.
    /// Returns each connection's outcome.
    pub async fn post_all(
        &self,
        ids: Vec<String>,
        frame: Bytes,
        concurrency: usize,
    ) -> Vec<(String, Outcome)> {
        stream::iter(ids)
            .map(|id| {
                let frame = frame.clone();
                async move {
                    let outcome = self.post(&id, frame).await;
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
