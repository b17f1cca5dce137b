//! The IoT Data Plane endpoint (what `AWS_ENDPOINT_URL_IOT_DATA_PLANE`
//! names), as the SDK's `IotDataPlane` client calls it:
//!
//! * `POST /topics/{topic}?qos=&retain=`: `Publish`, to the broker
//!   ([`crate::local::broker::Publisher`]) with that qos (default 0, as on
//!   AWS) and retain flag, answered once the broker took it; MQTT 5 user
//!   properties (`x-amz-mqtt5-user-properties`) and `contentType` pass on.
//!   IoT Core's limits: a topic of 256 bytes and 8 levels without
//!   wildcards, a payload of 128 KB (`413`);
//! * `GET /retainedMessage/{topic}`: `GetRetainedMessage` (`404
//!   ResourceNotFoundException` when there is none);
//! * `GET /retainedMessage?maxResults=&nextToken=`: `ListRetainedMessages`,
//!   in topic order, paginated.
//!
//! Retained reads come from the broker's retained messages
//! ([`crate::local::retained::Mirror`]). Every request must be SigV4-signed.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::json;

use crate::local::broker::{PublishError, Publisher};
use crate::local::rest;
use crate::local::retained::Mirror;

/// IoT Core's largest payload.
pub const MAX_PAYLOAD: usize = 128 * 1024;
/// Most topics one `ListRetainedMessages` page holds.
const MAX_RESULTS: usize = 200;

/// The IoT Data Plane's state.
pub struct IotData {
    pub publisher: Publisher,
    pub mirror: Arc<Mirror>,
}

fn invalid(message: &str) -> Response {
    rest::error(StatusCode::BAD_REQUEST, "InvalidRequestException", message)
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// `POST /topics/{topic}`.
pub async fn publish(
    State(iot): State<Arc<IotData>>,
    Path(topic): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    uri: Uri,
    payload: Bytes,
) -> Response {
    if let Some(refusal) = rest::unsigned(&headers, uri.query()) {
        return refusal;
    }
    if let Err(e) = bridge::channel::validate_topic(&topic) {
        return invalid(&format!("invalid topic: {e}"));
    }
    let qos = match query.get("qos").map(String::as_str) {
        None | Some("0") => 0,
        Some("1") => 1,
        Some(_) => return invalid("qos must be 0 or 1"),
    };
    let retain = match query.get("retain").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return invalid("retain must be true or false"),
    };
    if payload.len() > MAX_PAYLOAD {
        return rest::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLargeException",
            "The payload exceeds the maximum size allowed",
        );
    }
    let mut properties = PublishProperties::default();
    if let Some(v) = headers.get("x-amz-mqtt5-user-properties") {
        match user_properties(v.as_bytes()) {
            Some(p) => properties.user_properties = p,
            None => {
                return invalid("x-amz-mqtt5-user-properties is not base64 JSON [{key: value}]")
            }
        }
    }
    properties.content_type = query.get("contentType").cloned();
    let user_properties = properties.user_properties.clone();
    match iot
        .publisher
        .publish(&topic, payload.clone(), qos, retain, properties)
        .await
    {
        Ok(()) => {
            if retain {
                // Readable at once, before the mirror's own copy arrives.
                iot.mirror.set(&topic, payload, qos, user_properties);
            }
            (StatusCode::OK, [("content-type", "application/json")], "{}").into_response()
        }
        Err(PublishError::Topic) => invalid("invalid topic"),
        Err(e) => {
            tracing::warn!(%topic, error = %e, "publish failed");
            rest::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableException",
                &e.to_string(),
            )
        }
    }
}

/// The header's value: base64 of a JSON array of one-key objects.
fn user_properties(header: &[u8]) -> Option<Vec<(String, String)>> {
    let json = b64().decode(header).ok()?;
    let list: Vec<HashMap<String, String>> = serde_json::from_slice(&json).ok()?;
    Some(list.into_iter().flat_map(|m| m.into_iter()).collect())
}

/// `GET /retainedMessage/{topic}`.
pub async fn get_retained(
    State(iot): State<Arc<IotData>>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Some(refusal) = rest::unsigned(&headers, uri.query()) {
        return refusal;
    }
    let Some(m) = iot.mirror.get(&topic) else {
        return rest::error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            "No retained message on this topic",
        );
    };
    let mut body = json!({
        "topic": topic,
        "payload": b64().encode(&m.payload),
        "qos": m.qos,
        "lastModifiedTime": m.modified,
    });
    if !m.user_properties.is_empty() {
        let list: Vec<_> = m
            .user_properties
            .iter()
            .map(|(k, v)| json!({ k: v }))
            .collect();
        body["userProperties"] = json!(b64().encode(serde_json::to_vec(&list).unwrap_or_default()));
    }
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `GET /retainedMessage`.
pub async fn list_retained(
    State(iot): State<Arc<IotData>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Some(refusal) = rest::unsigned(&headers, uri.query()) {
        return refusal;
    }
    let max = match query.get("maxResults").map(|m| m.parse::<usize>()) {
        None => MAX_RESULTS,
        Some(Ok(m)) if (1..=MAX_RESULTS).contains(&m) => m,
        Some(_) => return invalid("maxResults must be 1 to 200"),
    };
    let after = match query.get("nextToken") {
        None => None,
        Some(t) => match b64().decode(t).ok().and_then(|b| String::from_utf8(b).ok()) {
            Some(topic) => Some(topic),
            None => return invalid("nextToken is not one this API gave out"),
        },
    };
    let (page, more) = iot.mirror.page(after.as_deref(), max);
    let topics: Vec<_> = page
        .iter()
        .map(|(t, m)| {
            json!({"topic": t, "payloadSize": m.payload.len(), "qos": m.qos, "lastModifiedTime": m.modified})
        })
        .collect();
    let mut body = json!({ "retainedTopics": topics });
    if more {
        if let Some((last, _)) = page.last() {
            body["nextToken"] = json!(b64().encode(last));
        }
    }
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_property_header() {
        let h = b64().encode(r#"[{"a":"1"},{"b":"2"}]"#);
        assert_eq!(
            user_properties(h.as_bytes()),
            Some(vec![("a".into(), "1".into()), ("b".into(), "2".into())])
        );
        assert_eq!(user_properties(b"!!"), None);
    }
}
