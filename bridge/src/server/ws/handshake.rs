//! The WebSocket opening handshake (RFC 6455 §4.2) over hyper's HTTP
//! upgrade: which requests are WebSocket upgrades, and the answer that
//! accepts one.
//!
//! The bridge answers it itself rather than with axum's `WebSocketUpgrade`,
//! which hands over only its own WebSocket, built over a connection no one
//! else can reach: the connection's [`Socket`](crate::server::socket::Socket)
//! needs the upgraded connection itself, to read it through its frame bounds
//! and to put a new WebSocket on it after a large message.

use axum::extract::FromRequestParts;
use axum::http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use tungstenite::handshake::derive_accept_key;

/// A WebSocket upgrade request, valid and not answered yet. Extracting it
/// refuses any other request to the route with a 4xx and a plain reason.
pub struct Handshake {
    key: HeaderValue,
    /// The subprotocols the client offered, in its order.
    offered: Vec<HeaderValue>,
    on_upgrade: OnUpgrade,
}

impl<S: Send + Sync> FromRequestParts<S> for Handshake {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Response> {
        let headers = &parts.headers;
        if parts.method != Method::GET {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket handshake is a GET request",
            ));
        }
        if !has_token(headers, CONNECTION, "upgrade") {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "not a WebSocket handshake: the Connection header must include `upgrade`",
            ));
        }
        if !has_token(headers, UPGRADE, "websocket") {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "not a WebSocket handshake: the Upgrade header must include `websocket`",
            ));
        }
        if headers
            .get(SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            != Some(b"13")
        {
            // RFC 6455 §4.2.2: say which version the server speaks.
            let mut refused = refuse(
                StatusCode::UPGRADE_REQUIRED,
                "only WebSocket version 13 is supported",
            );
            refused
                .headers_mut()
                .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            return Err(refused);
        }
        let Some(key) = headers.get(SEC_WEBSOCKET_KEY).cloned() else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "the Sec-WebSocket-Key header is missing",
            ));
        };
        let offered = tokens(headers, SEC_WEBSOCKET_PROTOCOL)
            .filter_map(|p| HeaderValue::from_bytes(p).ok())
            .collect();
        let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
            return Err(refuse(
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded to a WebSocket",
            ));
        };
        Ok(Handshake {
            key,
            offered,
            on_upgrade,
        })
    }
}

impl Handshake {
    /// The subprotocols the client offered, in its order.
    pub fn offered_protocols(&self) -> impl Iterator<Item = &HeaderValue> {
        self.offered.iter()
    }

    /// The answer that accepts the handshake (101, with `protocol` if one is
    /// chosen) and the connection it hands over once hyper has sent it.
    pub fn accept(self, protocol: Option<HeaderValue>) -> (Response, OnUpgrade) {
        let accept = derive_accept_key(self.key.as_bytes());
        let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let headers = response.headers_mut();
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(
            SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
        );
        if let Some(protocol) = protocol {
            headers.insert(SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        (response, self.on_upgrade)
    }
}

fn refuse(status: StatusCode, reason: &'static str) -> Response {
    (status, reason).into_response()
}

/// The comma-separated tokens of every `name` header, trimmed.
fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Whether a `name` header lists `token` (case-insensitively).
fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    /// The request `headers` make, with hyper's upgrade handle as a real
    /// server connection would give it (here one that never completes).
    fn parts(method: Method, headers: &[(&str, &str)]) -> Parts {
        let mut request = Request::builder().method(method).uri("/ws");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(()).unwrap();
        let on_upgrade = hyper::upgrade::on(&mut request);
        request.extensions_mut().insert(on_upgrade);
        request.into_parts().0
    }

    const VALID: &[(&str, &str)] = &[
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    async fn extract(mut parts: Parts) -> Result<Handshake, Response> {
        Handshake::from_request_parts(&mut parts, &()).await
    }

    fn without(name: &str) -> Vec<(&'static str, &'static str)> {
        VALID.iter().copied().filter(|(n, _)| *n != name).collect()
    }

    #[tokio::test]
    async fn accepts_with_the_rfc_answer_and_the_chosen_protocol() {
        let mut headers = VALID.to_vec();
        headers.push(("sec-websocket-protocol", "channels.v1, other"));
        headers.push(("sec-websocket-protocol", "third"));
        let handshake = extract(parts(Method::GET, &headers)).await.ok().unwrap();
        let offered: Vec<_> = handshake.offered_protocols().cloned().collect();
        assert_eq!(offered, ["channels.v1", "other", "third"]);
        let (response, _) = handshake.accept(Some(offered[0].clone()));
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let h = response.headers();
        // The example of RFC 6455 §1.3.
        assert_eq!(h[SEC_WEBSOCKET_ACCEPT], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h[SEC_WEBSOCKET_PROTOCOL], "channels.v1");
        let (response, _) = extract(parts(Method::GET, VALID))
            .await
            .ok()
            .unwrap()
            .accept(None);
        assert!(response.headers().get(SEC_WEBSOCKET_PROTOCOL).is_none());
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_websocket_handshake() {
        let status = |r: Result<Handshake, Response>| r.err().map(|r| r.status());
        let bad = StatusCode::BAD_REQUEST;
        assert_eq!(
            status(extract(parts(Method::POST, VALID)).await),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
        for missing in ["connection", "upgrade", "sec-websocket-key"] {
            let r = extract(parts(Method::GET, &without(missing))).await;
            assert_eq!(status(r), Some(bad), "without {missing}");
        }
        let mut wrong = without("upgrade");
        wrong.push(("upgrade", "h2c"));
        assert_eq!(status(extract(parts(Method::GET, &wrong)).await), Some(bad));
        let mut old = without("sec-websocket-version");
        old.push(("sec-websocket-version", "8"));
        let refused = extract(parts(Method::GET, &old)).await.err().unwrap();
        assert_eq!(refused.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(refused.headers()[SEC_WEBSOCKET_VERSION], "13");
        // A request hyper cannot upgrade (no upgrade handle).
        let mut plain = parts(Method::GET, VALID);
        plain.extensions.clear();
        assert_eq!(
            status(extract(plain).await),
            Some(StatusCode::UPGRADE_REQUIRED)
        );
    }
}
