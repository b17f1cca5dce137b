//! The MQTT side on AWS: AWS IoT Core through the IoT Data Plane API.
//!
//! A web `publish` becomes one `Publish` call with the frame's qos and retain
//! (the call returns once IoT Core accepted the message, which is when the
//! client gets its ack). A `subscribe` with `retained: true` reads the
//! retained messages: `GetRetainedMessage` for a topic, `ListRetainedMessages`
//! (paginated) and one `GetRetainedMessage` per matching topic for a filter.
//! Which topics a filter matches is the core's [`bridge::channel::matches`].

use aws_sdk_iotdataplane::error::DisplayErrorContext;
use aws_sdk_iotdataplane::primitives::Blob;
use aws_sdk_iotdataplane::Client;
use bridge::frame::ErrorCode;
use futures_util::stream::{self, StreamExt, TryStreamExt};

/// Retained messages fetched at once for one subscribe.
const FETCH_CONCURRENCY: usize = 16;

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

    /// The retained messages on the topics broker filter `mqtt` matches, as
    /// (topic, payload), at most `limit` of them, in topic order.
    pub async fn retained_matching(
        &self,
        mqtt: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, IotError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        if !bridge::channel::has_wildcards(mqtt) {
            return Ok(self
                .retained(mqtt)
                .await?
                .map(|p| vec![(mqtt.to_string(), p)])
                .unwrap_or_default());
        }
        let mut topics = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_retained_messages()
                .set_next_token(token.take())
                .max_results(200)
                .send()
                .await
                .map_err(|e| classify("ListRetainedMessages", e))?;
            for t in page.retained_topics() {
                if let Some(topic) = t.topic() {
                    if bridge::channel::matches(mqtt, topic) {
                        topics.push(topic.to_string());
                    }
                }
            }
            match page.next_token {
                Some(next) if !next.is_empty() && topics.len() < limit => token = Some(next),
                _ => break,
            }
        }
        topics.sort();
        topics.dedup();
        if topics.len() > limit {
            tracing::warn!(filter = mqtt, limit, "retained replay truncated");
            topics.truncate(limit);
        }
        let found: Vec<Option<(String, Vec<u8>)>> = stream::iter(topics)
            .map(|topic| async move {
                Ok::<_, IotError>(self.retained(&topic).await?.map(|p| (topic, p)))
            })
            .buffered(FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }
}
