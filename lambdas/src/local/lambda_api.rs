//! Lambda's `Invoke` API (what `AWS_ENDPOINT_URL_LAMBDA` names), for the
//! functions that invoke functions (`iot-fanout` hands the parts of a big
//! fan-out to asynchronous invocations of itself):
//! `POST /2015-03-31/functions/{name or ARN}/invocations`.
//!
//! `X-Amz-Invocation-Type: Event` queues the payload as an asynchronous
//! invocation of that function's pool (retried as the topic rule's are) and
//! answers `202`; `RequestResponse` (the default) runs it and answers `200`
//! with its result, or with its error and `X-Amz-Function-Error: Unhandled`;
//! `DryRun` answers `204`. An unknown function is `404
//! ResourceNotFoundException`, a payload that is not JSON `400`. Every
//! request must be SigV4-signed.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::local::pool::{Functions, Pool};
use crate::local::rest;

/// Lambda's largest synchronous payload (6 MB); asynchronous ones take 1 MB.
const MAX_SYNC: usize = 6 * 1024 * 1024;
const MAX_ASYNC: usize = 1024 * 1024;

/// The pool a name, partial or full ARN names.
fn find<'f>(functions: &'f Functions, name: &str) -> Option<&'f Arc<Pool>> {
    let name = name
        .split(':')
        .rev()
        .find(|part| !part.is_empty() && *part != "$LATEST");
    let name = name?;
    functions.values().find(|p| p.spec.name == name)
}

/// `POST /2015-03-31/functions/{function}/invocations`.
pub async fn invoke(
    State(functions): State<Arc<Functions>>,
    Path(function): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    body: Bytes,
) -> Response {
    if let Some(refusal) = rest::unsigned(&headers, uri.query()) {
        return refusal;
    }
    let Some(pool) = find(&functions, &function) else {
        return rest::error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            &format!("Function not found: {function}"),
        );
    };
    let kind = headers
        .get("x-amz-invocation-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("RequestResponse");
    let limit = if kind == "Event" { MAX_ASYNC } else { MAX_SYNC };
    if body.len() > limit {
        return rest::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLargeException",
            "Request must be smaller than the invocation payload limit",
        );
    }
    let event: Value = if body.is_empty() {
        Value::Object(Default::default())
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => {
                return rest::error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequestContentException",
                    "Could not parse request body into json",
                )
            }
        }
    };
    match kind {
        "Event" => {
            pool.invoke_async(event, "Invoke (Event)".into());
            StatusCode::ACCEPTED.into_response()
        }
        "DryRun" => StatusCode::NO_CONTENT.into_response(),
        "RequestResponse" => {
            let (body, failed) = match pool.invoke(event).await {
                Ok(v) => (v, false),
                Err(e) => (e, true),
            };
            let mut resp = (
                StatusCode::OK,
                [("content-type", "application/json")],
                body.to_string(),
            )
                .into_response();
            if failed {
                resp.headers_mut().insert(
                    "x-amz-function-error",
                    axum::http::HeaderValue::from_static("Unhandled"),
                );
            }
            resp
        }
        other => rest::error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValueException",
            &format!("X-Amz-Invocation-Type {other:?} is not Event, RequestResponse or DryRun"),
        ),
    }
}
