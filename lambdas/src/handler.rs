//! `ws-handler`: the WebSocket API's routes.
//!
//! * `$connect`: the connection's permissions come from the authorizer
//!   context (a JSON string, see [`crate::authorizer`]); the connection is
//!   stored with a TTL; an offered `Sec-WebSocket-Protocol` is echoed.
//! * `$disconnect`: every row of the connection is deleted.
//! * `$default` (every client frame): the core parses the frame and decides
//!   ([`bridge::session::decide_request`]); this module carries the decision
//!   out against DynamoDB and IoT Core. Acks, pongs and errors go back as the
//!   route response body, with no extra API call. Retained messages for a
//!   `subscribe` with `retained: true` are posted through `@connections`
//!   while the request runs, so they reach the client before its ack.
//!
//! A ping needs no state and is answered without touching DynamoDB.

use std::collections::BTreeSet;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use bridge::frame::{self, ErrorCode, Id, Request};
use bridge::permissions::Permissions;
use bridge::session::{self, Action};
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{HeaderMap, HeaderValue};

use crate::config::HandlerConfig;
use crate::iot::{Iot, IotError};
use crate::sender::{self, Outcome, Sender};
use crate::store::{Store, StoreError, Subscribed};

/// Retained messages posted at once for one subscribe.
const RETAINED_POSTS: usize = 16;

/// The authorizer context key that carries the permissions (a JSON string).
pub const PERMISSIONS_KEY: &str = "permissions";

/// Why an invocation failed (the Lambda invocation then errors; for
/// `$connect` that refuses the connection).
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("the event has no requestContext.connectionId")]
    NoConnectionId,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Everything `ws-handler` keeps between invocations.
#[derive(Debug, Clone)]
pub struct Handler {
    config: HandlerConfig,
    store: Store,
    iot: Iot,
    sender: Sender,
}

fn response(status: i64, body: Option<String>) -> ApiGatewayProxyResponse {
    let mut r = ApiGatewayProxyResponse::default();
    r.status_code = status;
    r.body = body.map(Body::Text);
    r
}

/// The first protocol a client offered, to echo in the handshake response.
pub fn offered_protocol(headers: &HeaderMap, multi: &HeaderMap) -> Option<String> {
    let value = headers
        .get("sec-websocket-protocol")
        .or_else(|| multi.get("sec-websocket-protocol"))?;
    let first = value.to_str().ok()?.split(',').next()?.trim();
    (!first.is_empty()).then(|| first.to_string())
}

/// The permissions the authorizer put in the request context, if readable.
pub fn context_permissions(event: &ApiGatewayWebsocketProxyRequest) -> Option<Permissions> {
    let raw = event
        .request_context
        .authorizer
        .fields
        .get(PERMISSIONS_KEY)?;
    serde_json::from_str(raw.as_str()?).ok()
}

impl Handler {
    pub fn new(config: HandlerConfig, store: Store, iot: Iot, sender: Sender) -> Self {
        Handler {
            config,
            store,
            iot,
            sender,
        }
    }

    /// One WebSocket route event.
    pub async fn handle(
        &self,
        event: ApiGatewayWebsocketProxyRequest,
    ) -> Result<ApiGatewayProxyResponse, HandlerError> {
        let id = event
            .request_context
            .connection_id
            .clone()
            .filter(|c| !c.is_empty())
            .ok_or(HandlerError::NoConnectionId)?;
        let route = event
            .request_context
            .route_key
            .clone()
            .or_else(|| event.request_context.event_type.clone())
            .unwrap_or_default();
        match route.as_str() {
            "$connect" | "CONNECT" => self.connect(&id, &event).await,
            "$disconnect" | "DISCONNECT" => {
                let held = self.store.remove_connection(&id, crate::now_secs()).await?;
                tracing::debug!(connection = %id, held, "disconnected");
                Ok(response(200, None))
            }
            _ => {
                let reply = if event.is_base64_encoded {
                    Some(self.refuse(&id, session::decide_binary()))
                } else {
                    self.message(&id, event.body.as_deref().unwrap_or("")).await
                };
                Ok(response(200, reply))
            }
        }
    }

    async fn connect(
        &self,
        id: &str,
        event: &ApiGatewayWebsocketProxyRequest,
    ) -> Result<ApiGatewayProxyResponse, HandlerError> {
        let perms = if self.config.auth {
            match context_permissions(event) {
                Some(p) => p,
                None => {
                    tracing::warn!(
                        connection = id,
                        "refused: no permissions from the authorizer (is $connect behind it?)"
                    );
                    return Ok(response(403, None));
                }
            }
        } else {
            Permissions::allow_all()
        };
        let now = crate::now_millis();
        let connected_at = match event.request_context.connected_at {
            t if t > 0 => t,
            _ => now,
        };
        let expires = connected_at / 1000 + self.config.connection_ttl_secs;
        self.store
            .put_connection(id, &perms, connected_at, expires)
            .await?;
        tracing::debug!(
            connection = id,
            subject = perms.subject.as_deref().unwrap_or("-"),
            "connected"
        );
        let mut r = response(200, None);
        if let Some(p) = offered_protocol(&event.headers, &event.multi_value_headers) {
            if let Ok(v) = HeaderValue::from_str(&p) {
                r.headers.insert("sec-websocket-protocol", v);
            }
        }
        Ok(r)
    }

    fn refuse(&self, id: &str, action: Action) -> String {
        match action {
            Action::Refuse(e) => {
                tracing::debug!(connection = id, code = %e.code, "refused");
                e.to_json()
            }
            other => {
                // decide_binary only ever refuses.
                tracing::error!(connection = id, ?other, "unexpected decision");
                frame::error(other.id(), ErrorCode::Internal, "internal error")
            }
        }
    }

    /// One client text frame; the reply to send, if any.
    pub async fn message(&self, id: &str, text: &str) -> Option<String> {
        let policy = &self.config.policy;
        let (req_id, request) = match frame::parse(text, &policy.limits) {
            Ok(parsed) => parsed,
            Err(e) => return Some(self.refuse(id, Action::Refuse(e))),
        };
        if request == Request::Ping {
            // Stateless: no need to read the connection.
            return match session::decide_request(
                req_id,
                request,
                &Permissions::allow_all(),
                &BTreeSet::new(),
                policy,
                None,
            ) {
                Action::Reply(reply) => reply,
                other => Some(self.refuse(id, other)),
            };
        }
        let now = crate::now_secs();
        let conn = match self.store.load_connection(id, now).await {
            Ok(Some(conn)) => conn,
            Ok(None) => return Some(not_registered(req_id.as_ref())),
            Err(e) => return Some(store_failed(req_id.as_ref(), id, &e)),
        };
        let held = &conn.held;
        let action = session::decide_request(req_id, request, &conn.perms, held, policy, None);
        let ack = action.ack();
        match action {
            Action::Reply(reply) => reply,
            Action::Auth { .. } => ack,
            Action::Refuse(e) => Some(self.refuse(id, Action::Refuse(e))),
            Action::Subscribe {
                id: req_id,
                channel,
                mqtt,
                retained,
            } => {
                // Whether this frame added the subscription (and so takes it
                // back if the retained replay fails).
                let mut added = false;
                if !held.contains(&channel) {
                    let outcome = self
                        .store
                        .subscribe(
                            id,
                            &channel,
                            &mqtt,
                            conn.expires,
                            policy.max_subscriptions,
                            now,
                            self.config.connection_ttl_secs,
                        )
                        .await;
                    match outcome {
                        Ok(Subscribed::Added) => added = true,
                        Ok(Subscribed::AlreadyHeld) => {}
                        Ok(Subscribed::TooMany) => {
                            return Some(session::too_many_subscriptions(req_id, policy).to_json())
                        }
                        Ok(Subscribed::Gone) => return Some(not_registered(req_id.as_ref())),
                        Err(e) => return Some(store_failed(req_id.as_ref(), id, &e)),
                    }
                }
                if retained {
                    if let Err(e) = self.replay_retained(id, &mqtt).await {
                        if added {
                            let _ = self.store.unsubscribe(id, &channel, &mqtt, now).await;
                        }
                        return Some(frame::error(req_id.as_ref(), e.code, &e.message));
                    }
                }
                ack
            }
            Action::Unsubscribe {
                id: req_id,
                channel,
                mqtt,
            } => match self.store.unsubscribe(id, &channel, &mqtt, now).await {
                Ok(()) => ack,
                Err(e) => Some(store_failed(req_id.as_ref(), id, &e)),
            },
            Action::Publish {
                id: req_id,
                mqtt,
                payload,
                qos,
                retain,
                ..
            } => match self.iot.publish(&mqtt, payload, qos, retain).await {
                Ok(()) => ack,
                Err(e) => Some(frame::error(req_id.as_ref(), e.code, &e.message)),
            },
        }
    }

    /// Posts the retained messages `mqtt` matches, marked `retained`.
    async fn replay_retained(&self, id: &str, mqtt: &str) -> Result<(), IotError> {
        let messages = self
            .iot
            .retained_matching(mqtt, self.config.max_retained)
            .await?;
        let policy = &self.config.policy;
        let max = policy.limits.max_payload_bytes;
        let frames = messages.into_iter().filter_map(|(topic, payload)| {
            let channel = match session::deliverable(&policy.prefix, max, &topic, payload.len()) {
                Ok(channel) => channel,
                Err(reason) => {
                    tracing::warn!(connection = id, topic, %reason, "retained message not delivered");
                    return None;
                }
            };
            let message = frame::message(channel, &payload, true);
            if let Some(reason) = sender::unpostable(message.as_bytes()) {
                tracing::warn!(connection = id, topic, %reason, "retained message not delivered");
                return None;
            }
            Some(Bytes::from(message))
        });
        let outcomes: Vec<Outcome> = stream::iter(frames)
            .map(|f| self.sender.post(id, f))
            .buffer_unordered(RETAINED_POSTS)
            .collect()
            .await;
        let failed = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Failed(_)))
            .count();
        if failed > 0 {
            tracing::warn!(
                connection = id,
                failed,
                "some retained messages were not posted"
            );
        }
        Ok(())
    }
}

/// The reply to a frame from a connection the store no longer knows.
fn not_registered(req_id: Option<&Id>) -> String {
    frame::error(
        req_id,
        ErrorCode::Unavailable,
        "this connection is no longer registered; reconnect",
    )
}

fn store_failed(req_id: Option<&Id>, connection: &str, e: &StoreError) -> String {
    tracing::error!(connection, error = %e, "subscription store failed");
    frame::error(
        req_id,
        ErrorCode::Unavailable,
        "the subscription store is unavailable; retry later",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_echo() {
        let mut h = HeaderMap::new();
        assert_eq!(offered_protocol(&h, &HeaderMap::new()), None);
        h.insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("chat, json"),
        );
        assert_eq!(
            offered_protocol(&h, &HeaderMap::new()).as_deref(),
            Some("chat")
        );
        let mut m = HeaderMap::new();
        m.insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        assert_eq!(
            offered_protocol(&HeaderMap::new(), &m).as_deref(),
            Some("mqtt")
        );
        h.insert("Sec-WebSocket-Protocol", HeaderValue::from_static(" "));
        assert_eq!(offered_protocol(&h, &HeaderMap::new()), None);
    }
}
