//! The MQTT side on AWS: AWS IoT Core through the IoT Data Plane API.
//!
//! A web `publish` becomes one `Publish` call with the frame's qos and retain
//! (the call returns once IoT Core accepted the message, which is when the
//! client gets its ack). A `subscribe` with `retained: true` reads the
//! retained messages: `GetRetainedMessage` for a topic, `ListRetainedMessages`
//! (paginated, 200 topics a page) and one `GetRetainedMessage` per matching
//! topic for a filter. Which topics a filter matches is the core's
//! [`bridge::channel::matches`].
//!
//! A replay is bounded ([`RetainedLimits`]): in messages (`BRIDGE_MAX_RETAINED`),
//! in payload bytes (1 MiB, as `bridge serve` bounds a connection's queue), in
//! listed pages (IoT Core lists the whole account's retained topics, whatever
//! the filter: 25 pages, 5,000 topics) and in time (10 s, well within API
//! Gateway's fixed 29 s for the request). What a bound leaves out is counted
//! ([`Retained::skipped`], [`Retained::listing_cut`]) for the client to be told.

use aws_sdk_iotdataplane::error::DisplayErrorContext;
use aws_sdk_iotdataplane::primitives::Blob;
use aws_sdk_iotdataplane::Client;
use bridge::frame::ErrorCode;
use futures_util::stream::{self, StreamExt};

use crate::budget::Budget;

/// Retained messages fetched at once for one subscribe.
const FETCH_CONCURRENCY: usize = 16;
/// Topics per `ListRetainedMessages` page (the API's most).
const LIST_PAGE: usize = 200;

/// How far one replay may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedLimits {
    /// Messages replayed (`BRIDGE_MAX_RETAINED`).
    pub messages: usize,
    /// Payload bytes replayed in all.
    pub bytes: usize,
    /// `ListRetainedMessages` pages read.
    pub pages: usize,
    /// Time from the subscribe's start to the last fetch or post started.
    pub time: std::time::Duration,
}

impl RetainedLimits {
    /// The bounds with at most `messages` messages.
    pub fn with_messages(messages: usize) -> RetainedLimits {
        RetainedLimits {
            messages,
            bytes: 1024 * 1024,
            pages: 25,
            time: std::time::Duration::from_secs(10),
        }
    }
}

/// What a replay found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retained {
    /// (topic, payload), in topic order.
    pub messages: Vec<(String, Vec<u8>)>,
    /// Matching retained messages left out by the bounds.
    pub skipped: usize,
    /// The listing stopped before the account's last retained topic (page
    /// or time bound): more may match.
    pub listing_cut: bool,
}

/// An IoT Data Plane call failed; `code` is the protocol error to answer with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct IotError {
    pub code: ErrorCode,
    pub message: String,
}

/// The IoT Data Plane.
#[derive(Debug, Clone)]
pub struct Iot {
    client: Client,
}

/// Maps an SDK error to the protocol's error code: throttling and server
/// errors are `unavailable` (retry later), a payload IoT Core will not take is
/// `too_large`, anything else (IAM, configuration) is `internal`.
fn classify<E>(
    operation: &str,
    e: aws_sdk_iotdataplane::error::SdkError<E, aws_sdk_iotdataplane::config::http::HttpResponse>,
) -> IotError
where
    E: std::error::Error
        + aws_sdk_iotdataplane::error::ProvideErrorMetadata
        + Send
        + Sync
        + 'static,
{
    use aws_sdk_iotdataplane::error::SdkError;
    let code = match &e {
        SdkError::ServiceError(se) => match se.err().code() {
            Some("RequestEntityTooLargeException") => ErrorCode::TooLarge,
            Some(
                "ThrottlingException" | "ServiceUnavailableException" | "InternalFailureException",
            ) => ErrorCode::Unavailable,
            _ if se.raw().status().is_server_error() || se.raw().status().as_u16() == 429 => {
                ErrorCode::Unavailable
            }
            _ => ErrorCode::Internal,
        },
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            ErrorCode::Unavailable
        }
        _ => ErrorCode::Internal,
    };
    let detail = DisplayErrorContext(&e).to_string();
    tracing::warn!(operation, error = %detail, "IoT Data Plane call failed");
    let message = match code {
        ErrorCode::TooLarge => "AWS IoT Core refused the payload as too large".to_string(),
        ErrorCode::Unavailable => {
            "AWS IoT Core cannot take the request now; retry later".to_string()
        }
        _ => format!("AWS IoT Core refused the {operation} request"),
    };
    IotError { code, message }
}

impl Iot {
    pub fn new(client: Client) -> Self {
        Iot { client }
    }

    /// Publishes `payload` to the broker topic `mqtt`.
    pub async fn publish(
        &self,
        mqtt: &str,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
    ) -> Result<(), IotError> {
        self.client
            .publish()
            .topic(mqtt)
            .qos(i32::from(qos))
            .retain(retain)
            .payload(Blob::new(payload))
            .send()
            .await
            .map_err(|e| classify("Publish", e))?;
        Ok(())
    }

    /// The retained message on one topic, if any.
    pub async fn retained(&self, topic: &str) -> Result<Option<Vec<u8>>, IotError> {
        match self.client.get_retained_message().topic(topic).send().await {
            Ok(out) => Ok(Some(out.payload.map(Blob::into_inner).unwrap_or_default())),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_resource_not_found_exception()) =>
            {
                Ok(None)
            }
            Err(e) => Err(classify("GetRetainedMessage", e)),
        }
    }

    /// The retained messages on the topics broker filter `mqtt` matches, in
    /// topic order, within `limits`; fetches and listing start only within
    /// `budget`.
    pub async fn retained_matching(
        &self,
        mqtt: &str,
        limits: &RetainedLimits,
        budget: &Budget,
    ) -> Result<Retained, IotError> {
        let mut out = Retained::default();
        if !bridge::channel::has_wildcards(mqtt) {
            if limits.messages == 0 {
                return Ok(out);
            }
            match self.retained(mqtt).await? {
                Some(p) if p.len() > limits.bytes => out.skipped = 1,
                Some(p) => out.messages.push((mqtt.to_string(), p)),
                None => {}
            }
            return Ok(out);
        }
        // (topic, payload size) of every matching topic listed.
        let mut topics: Vec<(String, usize)> = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            if pages >= limits.pages || !budget.may_start() {
                out.listing_cut = true;
                break;
            }
            pages += 1;
            let page = self
                .client
                .list_retained_messages()
                .set_next_token(token.take())
                .max_results(LIST_PAGE as i32)
                .send()
                .await
                .map_err(|e| classify("ListRetainedMessages", e))?;
            for t in page.retained_topics() {
                if let Some(topic) = t.topic() {
                    if bridge::channel::matches(mqtt, topic) {
                        let size = usize::try_from(t.payload_size()).unwrap_or(usize::MAX);
                        topics.push((topic.to_string(), size));
                    }
                }
            }
            match page.next_token {
                // Past the count bound already: no need to list further.
                Some(next) if !next.is_empty() && topics.len() > limits.messages => {
                    out.listing_cut = true;
                    break;
                }
                Some(next) if !next.is_empty() => token = Some(next),
                _ => break,
            }
        }
        if out.listing_cut {
            tracing::warn!(filter = mqtt, pages, "retained listing cut short");
        }
        topics.sort();
        topics.dedup_by(|a, b| a.0 == b.0);
        // Within the count and byte bounds, in topic order.
        let mut bytes = 0usize;
        let mut chosen = Vec::new();
        for (topic, size) in topics {
            if chosen.len() < limits.messages && bytes.saturating_add(size) <= limits.bytes {
                bytes += size;
                chosen.push(topic);
            } else {
                out.skipped += 1;
            }
        }
        let fetched: Vec<Result<Fetched, IotError>> = stream::iter(chosen)
            .map(|topic| async move {
                if !budget.may_start() {
                    return Ok(Fetched::NotStarted);
                }
                Ok(match self.retained(&topic).await? {
                    Some(p) => Fetched::Found(topic, p),
                    None => Fetched::Gone,
                })
            })
            .buffered(FETCH_CONCURRENCY)
            .collect()
            .await;
        for f in fetched {
            match f? {
                Fetched::Found(topic, payload) => out.messages.push((topic, payload)),
                Fetched::NotStarted => out.skipped += 1,
                Fetched::Gone => {}
            }
        }
        if out.skipped > 0 {
            tracing::warn!(
                filter = mqtt,
                skipped = out.skipped,
                "retained replay bounded"
            );
        }
        Ok(out)
    }
}

/// One topic's fetch.
enum Fetched {
    Found(String, Vec<u8>),
    /// Cleared since it was listed.
    Gone,
    /// The time bound came first.
    NotStarted,
}
