//! Protocol frames: client text frames parsed into typed [`Request`]s with the
//! exact error codes of PROTOCOL.md, and server frames built as JSON text.
//!
//! Parsing only checks the shape of a frame (JSON, fields and their types,
//! channel syntax, payload encoding and size). What a well-formed request is
//! allowed to do is [`crate::session`]'s decision.

use std::fmt;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Number;

use crate::channel::{self, ChannelError};
use crate::payload::{self, Data, Encoding};

/// Longest string `id`, in characters.
pub const MAX_ID_CHARS: usize = 64;

/// The error codes of PROTOCOL.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    InvalidChannel,
    Forbidden,
    TooLarge,
    TooManySubscriptions,
    RateLimited,
    /// (v1.1) The token of an `auth` request was refused.
    Unauthorized,
    /// (v1.1) The connection's token expired; the server closes it (4001).
    TokenExpired,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request `id`: a string of at most 64 characters or an integer, echoed
/// back exactly as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Id {
    Str(String),
    Int(Number),
}

impl Id {
    /// The id as JSON text.
    pub fn to_json(&self) -> String {
        match self {
            Id::Str(s) => json_string(s),
            Id::Int(n) => n.to_string(),
        }
    }

    fn parse(raw: &RawValue) -> Option<Id> {
        match serde_json::from_str::<serde_json::Value>(raw.get()).ok()? {
            serde_json::Value::String(s) if s.chars().count() <= MAX_ID_CHARS => Some(Id::Str(s)),
            serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Some(Id::Int(n)),
            _ => None,
        }
    }
}

/// A well-formed client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Subscribe {
        channel: String,
        retained: bool,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
    },
    Ping,
    /// (v1.1) Replace the connection's token; `None` when the frame has none.
    Auth {
        token: Option<String>,
    },
}

/// A refused frame: the error frame to send back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub id: Option<Id>,
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    pub fn new(id: Option<Id>, code: ErrorCode, message: impl Into<String>) -> Self {
        FrameError {
            id,
            code,
            message: message.into(),
        }
    }

    pub fn to_json(&self) -> String {
        error(self.id.as_ref(), self.code, &self.message)
    }
}

/// Size limits that frame parsing enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest text frame, in bytes, answered normally (default 128 KiB).
    pub max_frame_bytes: usize,
    /// Largest decoded payload, in bytes (default 128 KiB).
    pub max_payload_bytes: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits {
            max_frame_bytes: 128 * 1024,
            max_payload_bytes: 128 * 1024,
        }
    }
}

/// Every field any request may carry, as raw JSON; unknown fields are ignored.
/// A field given as `null` is present (and then mistyped, or JSON `null` data).
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    action: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    encoding: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    qos: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    retain: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    retained: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    token: Option<&'a RawValue>,
}

/// A field that is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The reply to a binary frame.
pub fn binary_frame_error() -> FrameError {
    FrameError::new(
        None,
        ErrorCode::BadRequest,
        "binary frames are not supported; send JSON text",
    )
}

/// Parses one client text frame.
pub fn parse(text: &str, limits: &FrameLimits) -> Result<(Option<Id>, Request), FrameError> {
    let bad = |id: &Option<Id>, msg: &str| FrameError::new(id.clone(), ErrorCode::BadRequest, msg);
    if text.len() > limits.max_frame_bytes {
        return Err(FrameError::new(
            peek_id(text),
            ErrorCode::TooLarge,
            format!(
                "frame is {} bytes; the limit is {}",
                text.len(),
                limits.max_frame_bytes
            ),
        ));
    }
    if !text.trim_start().starts_with('{') {
        let msg = if serde_json::from_str::<&RawValue>(text).is_ok() {
            "a frame must be a JSON object"
        } else {
            "a frame must be valid JSON"
        };
        return Err(bad(&None, msg));
    }
    let raw: RawFrame = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) if e.is_syntax() || e.is_eof() => {
            return Err(bad(&None, "a frame must be valid JSON"))
        }
        Err(e) => return Err(bad(&None, &format!("malformed frame: {e}"))),
    };
    let id = match raw.id {
        None => None,
        Some(r) => Some(Id::parse(r).ok_or_else(|| {
            bad(
                &None,
                "id must be a string of at most 64 characters or an integer",
            )
        })?),
    };
    let action: String =
        field(&id, "action", raw.action)?.ok_or_else(|| bad(&id, "missing field \"action\""))?;
    let request = match action.as_str() {
        "subscribe" => {
            let channel = channel_field(&id, raw.channel)?;
            channel::validate_filter(&channel).map_err(|e| channel_error(&id, e))?;
            let retained = field(&id, "retained", raw.retained)?.unwrap_or(false);
            Request::Subscribe { channel, retained }
        }
        "unsubscribe" => {
            let channel = channel_field(&id, raw.channel)?;
            channel::validate_filter(&channel).map_err(|e| channel_error(&id, e))?;
            Request::Unsubscribe { channel }
        }
        "publish" => {
            let channel = channel_field(&id, raw.channel)?;
            channel::validate_topic(&channel).map_err(|e| channel_error(&id, e))?;
            let data = raw.data.ok_or_else(|| bad(&id, "missing field \"data\""))?;
            let encoding = match field::<String>(&id, "encoding", raw.encoding)? {
                None => Encoding::Json,
                Some(name) => Encoding::parse(&name)
                    .ok_or_else(|| bad(&id, "encoding must be \"json\", \"text\" or \"base64\""))?,
            };
            let qos = match field::<serde_json::Value>(&id, "qos", raw.qos)? {
                None => 1,
                Some(v) => match v.as_u64() {
                    Some(q @ (0 | 1)) => q as u8,
                    _ => return Err(bad(&id, "qos must be 0 or 1")),
                },
            };
            let retain = field(&id, "retain", raw.retain)?.unwrap_or(false);
            let payload = payload::encode(data, encoding).map_err(|e| bad(&id, &e.to_string()))?;
            if payload.len() > limits.max_payload_bytes {
                return Err(FrameError::new(
                    id,
                    ErrorCode::TooLarge,
                    format!(
                        "payload is {} bytes; the limit is {}",
                        payload.len(),
                        limits.max_payload_bytes
                    ),
                ));
            }
            Request::Publish {
                channel,
                payload,
                qos,
                retain,
            }
        }
        "ping" => Request::Ping,
        "auth" => Request::Auth {
            token: field(&id, "token", raw.token)?,
        },
        other => {
            let msg = format!(
                "unknown action {}; expected subscribe, unsubscribe, publish, ping or auth",
                json_string(other)
            );
            return Err(bad(&id, &msg));
        }
    };
    Ok((id, request))
}

/// Reads an optional typed field; present with the wrong type is bad_request.
fn field<T: serde::de::DeserializeOwned>(
    id: &Option<Id>,
    name: &str,
    raw: Option<&RawValue>,
) -> Result<Option<T>, FrameError> {
    let Some(raw) = raw else { return Ok(None) };
    serde_json::from_str(raw.get()).map(Some).map_err(|_| {
        let expected = match name {
            "retain" | "retained" => "a boolean",
            _ => "a string",
        };
        FrameError::new(
            id.clone(),
            ErrorCode::BadRequest,
            format!("{name} must be {expected}"),
        )
    })
}

fn channel_field(id: &Option<Id>, raw: Option<&RawValue>) -> Result<String, FrameError> {
    field(id, "channel", raw)?.ok_or_else(|| {
        FrameError::new(
            id.clone(),
            ErrorCode::BadRequest,
            "missing field \"channel\"",
        )
    })
}

fn channel_error(id: &Option<Id>, e: ChannelError) -> FrameError {
    FrameError::new(id.clone(), ErrorCode::InvalidChannel, e.to_string())
}

/// Reads just the `id` of a frame that will not be parsed further.
pub fn peek_id(text: &str) -> Option<Id> {
    #[derive(Deserialize)]
    struct OnlyId<'a> {
        #[serde(borrow, default, deserialize_with = "present")]
        id: Option<&'a RawValue>,
    }
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let only: OnlyId = serde_json::from_str(text).ok()?;
    Id::parse(only.id?)
}

// ---- server frames ----

/// A JSON string literal.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

fn with_id(body: &str, id: Option<&Id>) -> String {
    match id {
        Some(id) => format!("{{{body},\"id\":{}}}", id.to_json()),
        None => format!("{{{body}}}"),
    }
}

/// `{"type":"ack","id":...}`
pub fn ack(id: &Id) -> String {
    with_id("\"type\":\"ack\"", Some(id))
}

/// `{"type":"pong"}` with the ping's id if it had one.
pub fn pong(id: Option<&Id>) -> String {
    with_id("\"type\":\"pong\"", id)
}

/// `{"type":"error","code":...,"message":...}` with the request's id.
pub fn error(id: Option<&Id>, code: ErrorCode, message: &str) -> String {
    with_id(
        &format!(
            "\"type\":\"error\",\"code\":\"{}\",\"message\":{}",
            code,
            json_string(message)
        ),
        id,
    )
}

/// The WebSocket close code after `token_expired` (PROTOCOL.md, v1.1).
pub const TOKEN_EXPIRED_CLOSE: u16 = 4001;

/// The error sent once, just before a connection whose token expired is
/// closed (both deployments).
pub fn token_expired() -> FrameError {
    FrameError::new(
        None,
        ErrorCode::TokenExpired,
        "the connection's token expired; reconnect with a fresh token \
         (send `auth` with a new one before it expires to stay connected)",
    )
}

/// `{"type":"lagged","dropped":n}`
pub fn lagged(dropped: u64) -> String {
    format!("{{\"type\":\"lagged\",\"dropped\":{dropped}}}")
}

/// A `message` frame for a payload on `channel` (the client's name for the
/// topic). Built once per MQTT message and shared by every recipient.
pub fn message(channel: &str, payload: &[u8], retained: bool) -> String {
    let mut out = String::with_capacity(channel.len() + payload.len() + 64);
    out.push_str("{\"type\":\"message\",\"channel\":");
    out.push_str(&json_string(channel));
    out.push_str(",\"data\":");
    match payload::decode(payload) {
        Data::Json(raw) => out.push_str(raw),
        Data::Text(text) => {
            out.push_str(&json_string(text));
            out.push_str(",\"encoding\":\"text\"");
        }
        Data::Base64(b64) => {
            out.push('"');
            out.push_str(&b64);
            out.push_str("\",\"encoding\":\"base64\"");
        }
    }
    if retained {
        out.push_str(",\"retained\":true");
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn p(text: &str) -> Result<(Option<Id>, Request), FrameError> {
        parse(text, &FrameLimits::default())
    }

    fn code(text: &str) -> ErrorCode {
        p(text).unwrap_err().code
    }

    #[test]
    fn requests() {
        assert_eq!(
            p(r#"{"action":"subscribe","channel":"fleet/+/t","id":1}"#).unwrap(),
            (
                Some(Id::Int(1.into())),
                Request::Subscribe {
                    channel: "fleet/+/t".into(),
                    retained: false
                }
            )
        );
        assert_eq!(
            p(r#"{"action":"publish","channel":"a/b","data":{"x": 1},"id":"c1","qos":0,"retain":true}"#)
                .unwrap(),
            (
                Some(Id::Str("c1".into())),
                Request::Publish {
                    channel: "a/b".into(),
                    payload: br#"{"x":1}"#.to_vec(),
                    qos: 0,
                    retain: true
                }
            )
        );
        assert_eq!(
            p(r#"{"action":"ping","extra":[1]}"#).unwrap(),
            (None, Request::Ping)
        );
        assert_eq!(
            p(r#"{"action":"auth","token":"t.k.n","id":3}"#).unwrap(),
            (
                Some(Id::Int(3.into())),
                Request::Auth {
                    token: Some("t.k.n".into())
                }
            )
        );
        assert_eq!(
            p(r#"{"action":"auth"}"#).unwrap(),
            (None, Request::Auth { token: None })
        );
        assert!(matches!(
            p(r#"{"action":"publish","channel":"a","data":null}"#)
                .unwrap()
                .1,
            Request::Publish {
                qos: 1,
                retain: false,
                ..
            }
        ));
    }

    #[test]
    fn bad_requests() {
        for text in [
            "not json",
            "[1,2]",
            "42",
            r#"{"channel":"a"}"#,
            r#"{"action":"dance"}"#,
            r#"{"action":7}"#,
            r#"{"action":"subscribe"}"#,
            r#"{"action":"subscribe","channel":5}"#,
            r#"{"action":"subscribe","channel":"a","retained":"yes"}"#,
            r#"{"action":"publish","channel":"a"}"#,
            r#"{"action":"publish","channel":"a","data":1,"qos":2}"#,
            r#"{"action":"publish","channel":"a","data":1,"qos":"1"}"#,
            r#"{"action":"publish","channel":"a","data":1,"qos":1.0}"#,
            r#"{"action":"publish","channel":"a","data":1,"retain":1}"#,
            r#"{"action":"publish","channel":"a","data":1,"encoding":"hex"}"#,
            r#"{"action":"publish","channel":"a","data":1,"encoding":"text"}"#,
            r#"{"action":"publish","channel":"a","data":"!!","encoding":"base64"}"#,
            r#"{"action":"ping","id":1.5}"#,
            r#"{"action":"ping","id":null}"#,
            r#"{"action":"ping","id":{"a":1}}"#,
            r#"{"action":"ping","action":"ping"}"#,
            r#"{"action":"auth","token":5}"#,
            r#"{"action":"auth","token":null}"#,
        ] {
            assert_eq!(code(text), ErrorCode::BadRequest, "{text}");
        }
        let long = format!(r#"{{"action":"ping","id":"{}"}}"#, "x".repeat(65));
        assert_eq!(code(&long), ErrorCode::BadRequest);
        let ok = format!(r#"{{"action":"ping","id":"{}"}}"#, "é".repeat(64));
        assert!(p(&ok).is_ok());
    }

    #[test]
    fn errors_echo_valid_id() {
        let e = p(r#"{"action":"dance","id":"x"}"#).unwrap_err();
        assert_eq!(e.id, Some(Id::Str("x".into())));
        let e = p(r#"{"action":"ping","id":1.5}"#).unwrap_err();
        assert_eq!(e.id, None);
    }

    #[test]
    fn invalid_channels() {
        for text in [
            r#"{"action":"publish","channel":"fleet/+/commands","data":1}"#,
            r#"{"action":"publish","channel":"a/#","data":1}"#,
            r#"{"action":"subscribe","channel":"a/#/b"}"#,
            r#"{"action":"subscribe","channel":""}"#,
            r#"{"action":"subscribe","channel":"a\u0000b"}"#,
            r#"{"action":"subscribe","channel":"1/2/3/4/5/6/7/8/9"}"#,
            r#"{"action":"unsubscribe","channel":"a+"}"#,
        ] {
            assert_eq!(code(text), ErrorCode::InvalidChannel, "{text}");
        }
        let long = format!(
            r#"{{"action":"subscribe","channel":"{}"}}"#,
            "x".repeat(257)
        );
        assert_eq!(code(&long), ErrorCode::InvalidChannel);
    }

    #[test]
    fn sizes() {
        let limits = FrameLimits {
            max_frame_bytes: 100,
            max_payload_bytes: 10,
        };
        let big = format!(r#"{{"action":"ping","id":7,"pad":"{}"}}"#, "x".repeat(100));
        let e = parse(&big, &limits).unwrap_err();
        assert_eq!(
            (e.code, e.id),
            (ErrorCode::TooLarge, Some(Id::Int(7.into())))
        );
        let e = parse(
            r#"{"action":"publish","channel":"a","data":"12345678901"}"#,
            &limits,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        // Base64 counts decoded bytes: 12 chars decode to 9 bytes.
        assert!(parse(
            r#"{"action":"publish","channel":"a","data":"AAAAAAAAAAAA","encoding":"base64"}"#,
            &limits
        )
        .is_ok());
    }

    #[test]
    fn server_frames() {
        let v: Value = serde_json::from_str(&message("a/b", br#"{"temp":21.5}"#, false)).unwrap();
        assert_eq!(
            v,
            json!({"type":"message","channel":"a/b","data":{"temp":21.5}})
        );
        let v: Value = serde_json::from_str(&message("a", b"hi \"x\"", true)).unwrap();
        assert_eq!(
            v,
            json!({"type":"message","channel":"a","data":"hi \"x\"","encoding":"text","retained":true})
        );
        let v: Value = serde_json::from_str(&message("a", &[0xff], false)).unwrap();
        assert_eq!(
            v,
            json!({"type":"message","channel":"a","data":"/w==","encoding":"base64"})
        );
        assert_eq!(ack(&Id::Str("c1".into())), r#"{"type":"ack","id":"c1"}"#);
        assert_eq!(pong(None), r#"{"type":"pong"}"#);
        let v: Value = serde_json::from_str(&error(
            Some(&Id::Int(2.into())),
            ErrorCode::InvalidChannel,
            "no",
        ))
        .unwrap();
        assert_eq!(
            v,
            json!({"type":"error","id":2,"code":"invalid_channel","message":"no"})
        );
        assert_eq!(lagged(3), r#"{"type":"lagged","dropped":3}"#);
        assert_eq!(peek_id(r#"{"id":"z","x":[]}"#), Some(Id::Str("z".into())));
    }
}
