//! API Gateway's WebSocket API at `ws://ADDR/ws`, configured from the
//! template's routes.
//!
//! The handshake: the `$connect` route's REQUEST authorizer (if it has one)
//! is invoked with the authorizer event; `Unauthorized` as its error answers
//! `401`, a Deny (or no Allow for the `methodArn`) `403`, anything else that
//! is not a well-formed answer `500`, and an answer over 8 KB or with a
//! context value that is not a string, number or boolean `500` too. Then the
//! `$connect` integration runs with the authorizer's context (as strings);
//! a status other than 2xx is the handshake's status, and a
//! `Sec-WebSocket-Protocol` it returns is the one the handshake selects.
//! Only then is the connection upgraded: a refused client never gets a
//! socket.
//!
//! Each text message is routed by the route selection expression
//! (`$request.body.action`): a JSON body whose value there names a route
//! goes to that route, anything else to `$default`. Every message is its own
//! invocation, run concurrently as API Gateway runs them (a client's
//! requests are not ordered). A route with a route response sends the
//! integration's `body` back as a text frame; a failed invocation sends
//! `{"message": "Internal server error", ...}`, as API Gateway does.
//!
//! API Gateway's own limits: a frame over 32 KB or a message over 128 KB
//! closes the connection with 1009, a binary frame with 1003; a connection
//! idle for 10 minutes, or open for 2 hours, is closed with 1001 (both
//! shortenable with `--idle-timeout` and `--max-connection-time`). However a
//! connection ends (the client, a limit, `DeleteConnection` with 1000, a
//! dropped socket), `$disconnect` runs once, with the status code and reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};

use crate::local::connections::{Connection, Connections, Outbound};
use crate::local::events::{self, Handshake};
use crate::local::ids;
use crate::local::pool::Functions;
use crate::local::runtime_api::Outcome;
use crate::local::template::{Deployment, IdentitySource};

/// API Gateway's limit on an authorizer's answer (policy and context).
pub const MAX_AUTHORIZER_RESPONSE: usize = 8 * 1024;
/// API Gateway's integration timeout.
pub const INTEGRATION_TIMEOUT: Duration = Duration::from_secs(29);

/// API Gateway's limits, some of them shortenable for tests.
#[derive(Debug, Clone)]
pub struct Limits {
    pub idle: Duration,
    pub max_life: Duration,
    /// Largest frame (32 KB).
    pub frame: usize,
    /// Largest message (128 KB).
    pub message: usize,
    /// Bytes queued for one client before posts are refused (429).
    pub client_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle: Duration::from_secs(10 * 60),
            max_life: Duration::from_secs(2 * 3600),
            frame: 32 * 1024,
            message: 128 * 1024,
            client_buffer: 1024 * 1024,
        }
    }
}

/// The WebSocket API.
pub struct Gateway {
    pub deployment: Arc<Deployment>,
    pub functions: Functions,
    pub connections: Arc<Connections>,
    pub limits: Limits,
}

fn status(code: StatusCode, message: &str) -> Response {
    (
        code,
        [("content-type", "application/json")],
        json!({ "message": message }).to_string(),
    )
        .into_response()
}

/// `GET /ws`: the handshake.
pub async fn websocket(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let names = &gw.deployment.names;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let handshake = Handshake {
        connection_id: ids::gateway_id(),
        api_id: names.api_id.clone(),
        stage: gw.deployment.stage.clone(),
        region: names.region.clone(),
        account: names.account.clone(),
        domain: header("host").unwrap_or_default(),
        source_ip: peer.ip().to_string(),
        user_agent: header("user-agent"),
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        query: uri.query().map(query_pairs).unwrap_or_default(),
        connected_at: crate::now_millis(),
    };
    let id = handshake.connection_id.clone();
    let connect = gw.deployment.routes.get("$connect");

    // The authorizer.
    let mut authorizer = None;
    if let Some(auth) = connect.and_then(|r| r.authorizer.as_ref()) {
        let missing = auth.identity.iter().any(|source| match source {
            IdentitySource::Header(h) => {
                header(&h.to_ascii_lowercase()).is_none_or(|v| v.is_empty())
            }
            IdentitySource::Query(q) => {
                !handshake.query.iter().any(|(k, v)| k == q && !v.is_empty())
            }
        });
        if missing {
            tracing::info!(connection = %id, "refused (401): no identity source");
            return status(StatusCode::UNAUTHORIZED, "Unauthorized");
        }
        let pool = &gw.functions[&auth.function];
        let outcome = invoke(pool, handshake.authorizer_event()).await;
        match authorize(outcome, &handshake.method_arn()) {
            Ok(context) => authorizer = Some(context),
            Err((code, why)) => {
                tracing::info!(connection = %id, status = code.as_u16(), "refused: {why}");
                let message = match code {
                    StatusCode::UNAUTHORIZED => "Unauthorized",
                    StatusCode::FORBIDDEN => "Forbidden",
                    _ => "Internal Server Error",
                };
                return status(code, message);
            }
        }
    }

    // The $connect integration.
    let mut protocol = None;
    if let Some(route) = connect {
        let event = handshake.connect_event(authorizer.as_ref());
        let pool = &gw.functions[&route.function];
        match invoke(pool, event).await {
            Ok(resp) => {
                let code = resp
                    .get("statusCode")
                    .and_then(Value::as_u64)
                    .unwrap_or(200) as u16;
                if !(200..300).contains(&code) {
                    tracing::info!(connection = %id, status = code, "refused by $connect");
                    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
                    let body = resp
                        .get("body")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    return (code, body).into_response();
                }
                protocol = response_header(&resp, "sec-websocket-protocol");
            }
            Err(e) => {
                tracing::warn!(connection = %id, error = %error_message(&e), "$connect failed");
                return status(StatusCode::BAD_GATEWAY, "Internal server error");
            }
        }
    }

    let limits = gw.limits.clone();
    let mut ws = ws
        .max_frame_size(limits.frame)
        .max_message_size(limits.message);
    if let Some(p) = protocol {
        ws = ws.protocols([p]);
    }
    let (conn, rx) = Connection::new(handshake, authorizer, limits.client_buffer);
    let failed = {
        let gw = gw.clone();
        let conn = conn.clone();
        move |e: axum::Error| {
            tracing::info!(connection = %conn.id(), error = %e, "upgrade failed");
            tokio::spawn(async move { disconnect(&gw, &conn, 1006, "Upgrade failed").await });
        }
    };
    ws.on_failed_upgrade(failed)
        .on_upgrade(move |socket| run(gw, socket, conn, rx))
}

/// A header of a Lambda proxy response, by name in any case.
fn response_header(resp: &Value, name: &str) -> Option<String> {
    let find = |map: &Value| {
        map.as_object().and_then(|m| {
            m.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        })
    };
    if let Some(v) = resp.get("headers").and_then(find) {
        return v.as_str().map(str::to_string);
    }
    resp.get("multiValueHeaders")
        .and_then(find)
        .and_then(|v| v.get(0).and_then(Value::as_str).map(str::to_string))
}

async fn invoke(pool: &crate::local::pool::Pool, event: Value) -> Outcome {
    match tokio::time::timeout(INTEGRATION_TIMEOUT, pool.invoke(event)).await {
        Ok(outcome) => outcome,
        Err(_) => {
            Err(json!({"errorType": "Timeout", "errorMessage": "Endpoint request timed out"}))
        }
    }
}

fn error_message(e: &Value) -> String {
    e.get("errorMessage")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| e.to_string())
}

/// The authorizer's answer → `requestContext.authorizer`, or the status to
/// refuse with and why (never the token).
fn authorize(outcome: Outcome, method_arn: &str) -> Result<Value, (StatusCode, String)> {
    let answer = match outcome {
        Ok(answer) => answer,
        Err(e) if error_message(&e) == "Unauthorized" => {
            return Err((
                StatusCode::UNAUTHORIZED,
                "the authorizer said Unauthorized".into(),
            ))
        }
        Err(e) => {
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the authorizer failed: {}", error_message(&e)),
            ))
        }
    };
    let internal = |why: &str| Err((StatusCode::INTERNAL_SERVER_ERROR, why.to_string()));
    if answer.to_string().len() > MAX_AUTHORIZER_RESPONSE {
        return internal("the authorizer's answer is over 8 KB");
    }
    let Some(principal) = answer.get("principalId").and_then(Value::as_str) else {
        return internal("the authorizer's answer has no principalId");
    };
    let empty = Map::new();
    let context = match answer.get("context") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return internal("the authorizer's context is not an object"),
    };
    if context.values().any(|v| v.is_object() || v.is_array()) {
        return internal("a context value of the authorizer is an object or array");
    }
    let policy = answer
        .get("policyDocument")
        .or_else(|| answer.get("PolicyDocument"));
    match policy.map(|p| allows(p, method_arn)) {
        None => internal("the authorizer's answer has no policyDocument"),
        Some(Ok(true)) => Ok(events::authorizer_context(principal, context)),
        Some(Ok(false)) => Err((
            StatusCode::FORBIDDEN,
            "the policy does not allow $connect".into(),
        )),
        Some(Err(why)) => internal(&why),
    }
}

/// Whether an IAM policy document allows `execute-api:Invoke` on `arn`:
/// an Allow statement matches and no Deny statement does.
fn allows(policy: &Value, arn: &str) -> Result<bool, String> {
    let field = |v: &Value, name: &str| -> Option<Value> {
        v.as_object().and_then(|m| {
            m.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        })
    };
    let list = |v: Option<Value>| -> Vec<String> {
        match v {
            Some(Value::String(s)) => vec![s],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            _ => vec![],
        }
    };
    let statements = match field(policy, "Statement") {
        Some(Value::Array(s)) => s,
        Some(s @ Value::Object(_)) => vec![s],
        _ => return Err("the policy has no Statement".into()),
    };
    let mut allowed = false;
    for s in &statements {
        let actions = list(field(s, "Action"));
        let resources = list(field(s, "Resource"));
        let applies = actions
            .iter()
            .any(|a| glob(&a.to_ascii_lowercase(), "execute-api:invoke"))
            && resources.iter().any(|r| glob(r, arn));
        if !applies {
            continue;
        }
        match field(s, "Effect")
            .and_then(|e| e.as_str().map(str::to_string))
            .as_deref()
        {
            Some("Deny") => return Ok(false),
            Some("Allow") => allowed = true,
            other => return Err(format!("a statement's Effect is {other:?}")),
        }
    }
    Ok(allowed)
}

/// IAM wildcard matching: `*` any run of characters, `?` one.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// `a=1&b=x%20y` → pairs, decoded as a form is (`+` is a space).
fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The route a message goes to.
fn route_of<'d>(
    deployment: &'d Deployment,
    body: &str,
) -> Option<&'d crate::local::template::Route> {
    let selected = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        let mut at = &v;
        for part in &deployment.route_selection {
            at = at.get(part)?;
        }
        at.as_str().map(str::to_string)
    });
    let routes = &deployment.routes;
    selected
        .filter(|k| k != "$connect" && k != "$disconnect")
        .and_then(|k| routes.get(&k))
        .or_else(|| routes.get("$default"))
}

/// One connection, from the upgrade to `$disconnect`.
async fn run(
    gw: Arc<Gateway>,
    socket: WebSocket,
    conn: Arc<Connection>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Outbound>,
) {
    gw.connections.insert(conn.clone());
    tracing::debug!(connection = %conn.id(), "connected");
    let (mut sink, mut stream) = socket.split();
    let writer = {
        let conn = conn.clone();
        tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                let (msg, size, last) = match out {
                    Outbound::Text(b) => {
                        let size = b.len();
                        match Utf8Bytes::try_from(b) {
                            Ok(t) => (Message::Text(t), size, false),
                            Err(_) => continue,
                        }
                    }
                    Outbound::Binary(b) => {
                        let size = b.len();
                        (Message::Binary(b), size, false)
                    }
                    Outbound::Close(code, reason) => (
                        Message::Close(Some(CloseFrame {
                            code,
                            reason: reason.into(),
                        })),
                        0,
                        true,
                    ),
                };
                let sent = sink.send(msg).await.is_ok();
                conn.written(size);
                if !sent || last {
                    break;
                }
            }
            let _ = sink.close().await;
        })
    };

    let limits = &gw.limits;
    let ends_at = tokio::time::Instant::now() + limits.max_life;
    let (code, reason, send_close): (u16, String, Option<(u16, &'static str)>) = loop {
        let idle_at = {
            let idle_ms = limits.idle.as_millis() as i64;
            let left = (conn.last_active() + idle_ms - crate::now_millis()).max(0);
            tokio::time::Instant::now() + Duration::from_millis(left as u64)
        };
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    conn.touch();
                    let gw = gw.clone();
                    let conn = conn.clone();
                    tokio::spawn(async move { message(&gw, &conn, text.as_str()).await });
                }
                Some(Ok(Message::Binary(_))) => {
                    break (1003, "Binary frames are not supported".into(), Some((1003, "Unsupported data")));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    break match frame {
                        Some(f) => (f.code, f.reason.as_str().to_string(), Some((f.code, ""))),
                        None => (1005, "Client-side close frame status not set".into(), Some((1000, ""))),
                    };
                }
                Some(Err(e)) => {
                    if too_big(e) {
                        break (1009, "Message too big".into(), Some((1009, "Message too big")));
                    }
                    break (1006, "Connection closed abnormally".into(), None);
                }
                None => break (1006, "Connection closed abnormally".into(), None),
            },
            _ = tokio::time::sleep_until(idle_at) => {
                if crate::now_millis() - conn.last_active() >= limits.idle.as_millis() as i64 {
                    break (1001, "Idle timeout".into(), Some((1001, "Going away")));
                }
            }
            _ = tokio::time::sleep_until(ends_at) => {
                break (1001, "Maximum connection time reached".into(), Some((1001, "Going away")));
            }
            (code, reason) = conn.closed() => {
                break (code, "Connection Closed Normally".into(), Some((code, reason)));
            }
        }
    };
    // Gone for @connections from now on.
    gw.connections.remove(conn.id());
    match send_close {
        Some((code, reason)) => {
            let _ = conn.send(Outbound::Close(code, reason));
        }
        None => writer.abort(),
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    tracing::debug!(connection = %conn.id(), code, "disconnected");
    disconnect(&gw, &conn, code, &reason).await;
}

/// Whether a read error is a frame or message over the limits.
fn too_big(e: axum::Error) -> bool {
    match e.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) => matches!(*e, tungstenite::Error::Capacity(_)),
        Err(_) => false,
    }
}

/// Runs `$disconnect`, if the API has that route.
async fn disconnect(gw: &Gateway, conn: &Connection, code: u16, reason: &str) {
    let Some(route) = gw.deployment.routes.get("$disconnect") else {
        return;
    };
    let event = conn
        .handshake
        .disconnect_event(code, reason, conn.authorizer.as_ref());
    if let Err(e) = invoke(&gw.functions[&route.function], event).await {
        tracing::warn!(connection = %conn.id(), error = %error_message(&e), "$disconnect failed");
    }
}

/// One text message: routed, invoked, answered.
async fn message(gw: &Gateway, conn: &Connection, body: &str) {
    let Some(route) = route_of(&gw.deployment, body) else {
        let reply = json!({"message": "Forbidden", "connectionId": conn.id(), "requestId": ids::gateway_id()});
        let _ = conn.send(Outbound::Text(reply.to_string().into()));
        return;
    };
    let event = conn
        .handshake
        .message_event(&route.key, body, conn.authorizer.as_ref());
    match invoke(&gw.functions[&route.function], event).await {
        Ok(resp) => {
            if !route.route_response {
                return;
            }
            let Some(text) = resp.get("body").and_then(Value::as_str) else {
                return;
            };
            if text.is_empty() {
                return;
            }
            let frame = if resp.get("isBase64Encoded").and_then(Value::as_bool) == Some(true) {
                use base64::Engine;
                match base64::engine::general_purpose::STANDARD.decode(text) {
                    Ok(b) => Outbound::Binary(b.into()),
                    Err(_) => return,
                }
            } else {
                Outbound::Text(bytes::Bytes::copy_from_slice(text.as_bytes()))
            };
            if conn.send(frame).is_err() {
                tracing::debug!(connection = %conn.id(), "route response not sent: the connection is gone or full");
            }
        }
        Err(e) => {
            let message = if e["errorType"] == "Timeout" {
                "Endpoint request timed out"
            } else {
                "Internal server error"
            };
            tracing::warn!(connection = %conn.id(), route = %route.key, error = %error_message(&e), "integration failed");
            let reply = json!({"message": message, "connectionId": conn.id(), "requestId": ids::gateway_id()});
            let _ = conn.send(Outbound::Text(reply.to_string().into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:execute-api:us-east-1:123456789012:awslocal00/prod/$connect";

    fn answer(effect: &str, resource: &str, context: Value) -> Value {
        json!({
            "principalId": "user-1",
            "policyDocument": {"Version": "2012-10-17", "Statement": [
                {"Action": ["execute-api:Invoke"], "Effect": effect, "Resource": [resource]}
            ]},
            "context": context
        })
    }

    #[test]
    fn authorizer_answers() {
        let ok = authorize(Ok(answer("Allow", ARN, json!({"expires": 5}))), ARN).unwrap();
        assert_eq!(ok, json!({"principalId": "user-1", "expires": "5"}));
        let wild = authorize(
            Ok(answer(
                "Allow",
                "arn:aws:execute-api:*:*:awslocal00/*",
                json!({}),
            )),
            ARN,
        );
        assert!(wild.is_ok());
        let code = |r: Result<Value, (StatusCode, String)>| r.unwrap_err().0.as_u16();
        assert_eq!(
            code(authorize(Ok(answer("Deny", ARN, json!({}))), ARN)),
            403
        );
        assert_eq!(
            code(authorize(Ok(answer("Allow", "arn:other", json!({}))), ARN)),
            403
        );
        assert_eq!(
            code(authorize(
                Err(json!({"errorType": "x", "errorMessage": "Unauthorized"})),
                ARN
            )),
            401
        );
        assert_eq!(
            code(authorize(
                Err(json!({"errorType": "x", "errorMessage": "boom"})),
                ARN
            )),
            500
        );
        assert_eq!(
            code(authorize(
                Ok(answer("Allow", ARN, json!({"p": {"a": 1}}))),
                ARN
            )),
            500
        );
        let big = "x".repeat(MAX_AUTHORIZER_RESPONSE);
        assert_eq!(
            code(authorize(Ok(answer("Allow", ARN, json!({"p": big}))), ARN)),
            500
        );
        assert_eq!(code(authorize(Ok(json!({"policyDocument": {}})), ARN)), 500);
    }

    #[test]
    fn globs_and_queries() {
        assert!(glob("a*c", "abbbc"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "abbc"));
        assert!(glob("*", ""));
        assert_eq!(
            query_pairs("token=a.b%2Ec&x=1+2&flag"),
            vec![
                ("token".into(), "a.b.c".into()),
                ("x".into(), "1 2".into()),
                ("flag".into(), "".into())
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
