//! `bridge sub` and `bridge pub`: a small client of the protocol for people
//! and scripts. It speaks the same frames as a browser would.
//!
//! The token, when the server wants one, comes from `BRIDGE_TOKEN` and is
//! sent in an `Authorization: Bearer` header (never on the command line, and
//! never in the URL where proxies log it).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::frame::json_string;

/// What went wrong, for the exit message.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL {0:?}: {1}")]
    Url(String, String),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("the server refused: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("connection closed by the server")]
    Closed,
    #[error("no answer from the server within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(String),
}

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// `ws://host:port` means `ws://host:port/ws`.
pub fn normalize_url(url: &str) -> String {
    match url.split_once("://") {
        Some((_, rest)) if !rest.contains('/') => format!("{url}/ws"),
        Some((_, rest)) if rest.ends_with('/') && rest.matches('/').count() == 1 => {
            format!("{url}ws")
        }
        _ => url.to_string(),
    }
}

/// Opens a WebSocket to the bridge, with the token as a Bearer header.
pub async fn connect(url: &str, token: Option<&str>) -> Result<Socket, ClientError> {
    let url = normalize_url(url);
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ClientError::Url(url.clone(), e.to_string()))?;
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ClientError::Connect("BRIDGE_TOKEN is not a valid header value".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).trim().to_string());
                ClientError::Connect(format!(
                    "HTTP {}: {}",
                    resp.status(),
                    body.unwrap_or_default()
                ))
            }
            other => ClientError::Connect(other.to_string()),
        })?;
    Ok(socket)
}

/// How long `bridge sub` and `bridge pub` wait for the server's reply.
const REPLY_WAIT: Duration = Duration::from_secs(15);

/// Sends a request frame and reads frames until the reply to its `id` (an
/// ack is `Ok`, an error frame is [`ClientError::Refused`]), within `limit`.
/// Other frames read meanwhile go to `on_other`.
pub async fn request(
    socket: &mut Socket,
    frame: String,
    id: &str,
    limit: Duration,
    on_other: impl FnMut(&str, &Value),
) -> Result<(), ClientError> {
    socket
        .send(Message::text(frame))
        .await
        .map_err(|e| ClientError::Io(e.to_string()))?;
    tokio::time::timeout(limit, await_reply(socket, id, on_other))
        .await
        .map_err(|_| ClientError::Timeout(limit))?
}

/// Reads frames until the reply to request `id` (an ack or an error).
async fn await_reply(
    socket: &mut Socket,
    id: &str,
    mut on_other: impl FnMut(&str, &Value),
) -> Result<(), ClientError> {
    while let Some(msg) = socket.next().await {
        let msg = msg.map_err(|e| ClientError::Io(e.to_string()))?;
        let Message::Text(text) = msg else { continue };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if v["id"].as_str() == Some(id) {
            return match v["type"].as_str() {
                Some("error") => Err(ClientError::Refused {
                    code: v["code"].as_str().unwrap_or("?").to_string(),
                    message: v["message"].as_str().unwrap_or("").to_string(),
                }),
                _ => Ok(()),
            };
        }
        on_other(&text, &v);
    }
    Err(ClientError::Closed)
}

/// Prints every `message` frame on `channel` as one JSON line; stops after
/// `count` messages when given.
pub async fn sub(
    url: &str,
    channel: &str,
    retained: bool,
    count: Option<u64>,
    token: Option<&str>,
) -> Result<(), ClientError> {
    let mut socket = connect(url, token).await?;
    let request_frame = format!(
        r#"{{"action":"subscribe","channel":{},"id":"sub","retained":{retained}}}"#,
        json_string(channel)
    );
    let seen = std::cell::Cell::new(0u64);
    let print = |text: &str, v: &Value| match v["type"].as_str() {
        Some("message") => {
            println!("{text}");
            seen.set(seen.get() + 1);
        }
        Some("lagged") => eprintln!(
            "bridge: {} messages were dropped (reading too slowly)",
            v["dropped"]
        ),
        _ => {}
    };
    request(&mut socket, request_frame, "sub", REPLY_WAIT, print).await?;
    eprintln!("bridge: subscribed to {channel}");
    let mut ping = tokio::time::interval(Duration::from_secs(240));
    loop {
        if count.is_some_and(|c| seen.get() >= c) {
            let _ = socket.close(None).await;
            return Ok(());
        }
        tokio::select! {
            msg = socket.next() => {
                let Some(msg) = msg else { return Err(ClientError::Closed) };
                match msg.map_err(|e| ClientError::Io(e.to_string()))? {
                    Message::Text(text) => {
                        if let Ok(v) = serde_json::from_str::<Value>(&text) {
                            print(&text, &v);
                        }
                    }
                    Message::Close(_) => return Err(ClientError::Closed),
                    _ => {}
                }
            }
            _ = ping.tick() => {
                socket.send(Message::text(r#"{"action":"ping"}"#)).await.map_err(|e| ClientError::Io(e.to_string()))?;
            }
        }
    }
}

/// Publishes `data` and waits for the ack.
pub async fn publish(
    url: &str,
    channel: &str,
    data: &str,
    encoding: Option<&str>,
    qos: u8,
    retain: bool,
    token: Option<&str>,
) -> Result<(), ClientError> {
    // Without --encoding: JSON when DATA is JSON, text otherwise.
    let (data, encoding) = match encoding {
        Some("json") | None if serde_json::from_str::<Value>(data).is_ok() => {
            (data.to_string(), "json")
        }
        None => (json_string(data), "text"),
        Some(e) => (json_string(data), e),
    };
    let frame = format!(
        r#"{{"action":"publish","channel":{},"data":{data},"encoding":"{encoding}","qos":{qos},"retain":{retain},"id":"pub"}}"#,
        json_string(channel)
    );
    let mut socket = connect(url, token).await?;
    request(&mut socket, frame, "pub", REPLY_WAIT, |_, _| {}).await?;
    let _ = socket.close(None).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::normalize_url;

    #[test]
    fn urls() {
        assert_eq!(normalize_url("ws://h:1"), "ws://h:1/ws");
        assert_eq!(normalize_url("ws://h:1/"), "ws://h:1/ws");
        assert_eq!(normalize_url("ws://h:1/ws"), "ws://h:1/ws");
        assert_eq!(normalize_url("wss://x/prod"), "wss://x/prod");
    }
}
