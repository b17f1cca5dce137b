//! Handing a part of a delivery to another invocation of this function: an
//! asynchronous self-invocation (Lambda `Invoke` with `InvocationType:
//! Event`), signed by [`crate::signed`].
//!
//! Why this and not an SQS queue between the parts: an asynchronous invoke
//! starts a parallel environment at once (Lambda scales a function by up to
//! 1,000 environments every 10 seconds), while an SQS event source starts
//! with a handful of pollers and adds them by the minute, which is what a
//! burst of big fan-outs cannot wait for. It needs no other service, keeps
//! the function's retries and dead-letter queue for every part, and costs
//! one Lambda request per part ($0.20 per million) where SQS adds its own
//! requests on top ($0.40 per million, a part up to 64 KB being one
//! request, for the send, the receive and the delete) besides the same
//! Lambda invocation. See the README's cost section for the figures.
//!
//! Lambda answers `202` once the event is queued. A throttled (`429`) or
//! failed (5xx, no answer) call is tried again, three times in all; a call
//! that timed out may have been queued, so a part can rarely run twice (its
//! posts then reach a client twice, with the same `mid`).

use std::time::Duration;

use bytes::Bytes;

use crate::calls::Calls;
use crate::parts::{Part, PartEvent};
use crate::signed::{encode_segment, Body, SendError, Signer};

/// Tries for one hand-off.
const ATTEMPTS: u32 = 3;
/// One `Invoke` attempt is cut after this.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Invokes this function asynchronously.
#[derive(Debug, Clone)]
pub struct Invoker {
    signer: Signer,
    url: String,
}

impl Invoker {
    /// Invokes `function` (its name or ARN) at Lambda's regional endpoint,
    /// or at `endpoint` when given (`AWS_ENDPOINT_URL_LAMBDA`).
    pub fn new(
        sdk: &aws_config::SdkConfig,
        function: &str,
        endpoint: Option<String>,
        calls: &Calls,
    ) -> Result<Invoker, SendError> {
        let signer = Signer::new(sdk, "lambda", "Lambda", TIMEOUT, calls)?;
        let base = endpoint.unwrap_or_else(|| {
            let suffix = if signer.region().starts_with("cn-") {
                "amazonaws.com.cn"
            } else {
                "amazonaws.com"
            };
            format!("https://lambda.{}.{suffix}", signer.region())
        });
        let url = format!(
            "{}/2015-03-31/functions/{}/invocations",
            base.trim_end_matches('/'),
            encode_segment(function)
        );
        Ok(Invoker { signer, url })
    }

    /// Queues `part` for a parallel invocation.
    pub async fn hand_off(&self, part: &Part) -> Result<(), String> {
        let event = PartEvent { part: part.clone() };
        let body = serde_json::to_vec(&event).map_err(|e| e.to_string())?;
        let body = Body::new(Bytes::from(body));
        let headers = [
            ("content-type", "application/json"),
            ("x-amz-invocation-type", "Event"),
        ];
        let mut attempt = 0;
        loop {
            attempt += 1;
            let reason = match self
                .signer
                .send("Invoke", "POST", &self.url, &headers, &body)
                .await
            {
                Ok(answer) if (200..300).contains(&answer.status) => return Ok(()),
                Ok(answer) if answer.status == 429 || answer.status >= 500 => {
                    answer.error.unwrap_or_default()
                }
                Ok(answer) => return Err(answer.error.unwrap_or_default()),
                Err(SendError::Invalid(e)) => return Err(e),
                Err(e) => e.to_string(),
            };
            if attempt >= ATTEMPTS {
                return Err(reason);
            }
            tokio::time::sleep(crate::store::backoff(attempt)).await;
        }
    }
}
