//! The `@connections` management API of the stage, at
//! `http://ADDR/{stage}/@connections/{connectionId}` (what
//! `WEBSOCKET_ENDPOINT` names on AWS), as the SDK's
//! `ApiGatewayManagementApi` client calls it:
//!
//! * `POST`: the body goes to the client as one frame (text when it is
//!   UTF-8, binary otherwise); `410 GoneException` for a connection that
//!   does not exist (or no longer does), `413 PayloadTooLargeException`
//!   over 128 KB, `429 LimitExceededException` when the client's queue is
//!   full;
//! * `GET`: `connectedAt`, `identity` (`sourceIp`, `userAgent`),
//!   `lastActiveAt`;
//! * `DELETE`: closes the connection with 1000 (`$disconnect` follows),
//!   `204`.
//!
//! Every request must be SigV4-signed ([`crate::local::rest`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::local::api_gateway::Gateway;
use crate::local::connections::{Outbound, SendError};
use crate::local::rest;
use crate::local::time;

/// API Gateway's largest message.
pub const MAX_POST_BYTES: usize = 128 * 1024;

fn gone() -> Response {
    rest::error(StatusCode::GONE, "GoneException", "")
}

/// The refusal of an unsigned request, or of one for another stage.
fn refusal(gw: &Gateway, stage: &str, headers: &HeaderMap, uri: &Uri) -> Option<Response> {
    rest::unsigned(headers, uri.query()).or_else(|| {
        (stage != gw.deployment.stage)
            .then(|| rest::error(StatusCode::FORBIDDEN, "ForbiddenException", "Forbidden"))
    })
}

/// `POST /{stage}/@connections/{id}`.
pub async fn post(
    State(gw): State<Arc<Gateway>>,
    Path((stage, id)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    if let Some(refusal) = refusal(&gw, &stage, &headers, &uri) {
        return refusal;
    }
    if body.len() > MAX_POST_BYTES {
        return rest::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLargeException",
            "Message too long",
        );
    }
    let Some(conn) = gw.connections.get(&id) else {
        return gone();
    };
    let frame = if std::str::from_utf8(&body).is_ok() {
        Outbound::Text(body)
    } else {
        Outbound::Binary(body)
    };
    match conn.send(frame) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(SendError::Gone) => gone(),
        Err(SendError::Full) => rest::error(
            StatusCode::TOO_MANY_REQUESTS,
            "LimitExceededException",
            "The WebSocket client side buffer is full",
        ),
    }
}

/// `GET /{stage}/@connections/{id}`.
pub async fn get(
    State(gw): State<Arc<Gateway>>,
    Path((stage, id)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Some(refusal) = refusal(&gw, &stage, &headers, &uri) {
        return refusal;
    }
    let Some(conn) = gw.connections.get(&id) else {
        return gone();
    };
    let h = &conn.handshake;
    let mut identity = json!({"sourceIp": h.source_ip});
    if let Some(ua) = &h.user_agent {
        identity["userAgent"] = json!(ua);
    }
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        json!({
            "connectedAt": time::iso8601(h.connected_at),
            "identity": identity,
            "lastActiveAt": time::iso8601(conn.last_active()),
        })
        .to_string(),
    )
        .into_response()
}

/// `DELETE /{stage}/@connections/{id}`.
pub async fn delete(
    State(gw): State<Arc<Gateway>>,
    Path((stage, id)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Some(refusal) = refusal(&gw, &stage, &headers, &uri) {
        return refusal;
    }
    // Gone for later calls at once, as on AWS.
    let Some(conn) = gw.connections.remove(&id) else {
        return gone();
    };
    conn.close(1000, "");
    StatusCode::NO_CONTENT.into_response()
}
