//! What AWS's REST-JSON APIs (the `@connections` management API, the IoT
//! Data Plane) answer besides success: the error shape the SDKs parse (the
//! `x-amzn-errortype` header and a `{"message": ...}` body), and the
//! refusal of a request that is not SigV4-signed.
//!
//! Signatures are not verified (any credentials are accepted, as moto
//! accepts them), but a request must carry one: a client that forgot to
//! sign works locally and fails on AWS otherwise.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An AWS error answer.
pub fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        [
            ("x-amzn-errortype", kind),
            ("content-type", "application/json"),
        ],
        json!({ "message": message }).to_string(),
    )
        .into_response()
}

/// `403 ForbiddenException` for a request without a SigV4 `Authorization`
/// header (or a presigned query); `None` for a signed one.
pub fn unsigned(headers: &HeaderMap, query: Option<&str>) -> Option<Response> {
    let signed_header = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("AWS4-HMAC-SHA256 ")
                && v.contains("Credential=")
                && v.contains("Signature=")
        });
    let presigned = query.is_some_and(|q| q.contains("X-Amz-Signature="));
    (!signed_header && !presigned).then(|| {
        error(
            StatusCode::FORBIDDEN,
            "ForbiddenException",
            "Missing Authentication Token",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsigned_requests_are_refused() {
        let mut h = HeaderMap::new();
        assert!(unsigned(&h, None).is_some());
        h.insert("authorization", "Bearer x".parse().unwrap());
        assert!(unsigned(&h, None).is_some());
        h.insert(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=a/b, SignedHeaders=host, Signature=00"
                .parse()
                .unwrap(),
        );
        assert!(unsigned(&h, None).is_none());
        assert!(unsigned(&HeaderMap::new(), Some("X-Amz-Signature=ab")).is_none());
    }
}
