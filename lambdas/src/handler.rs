//! `ws-handler`: the WebSocket API's routes.
//!
//! * `$connect`: the connection's credentials (permissions and the token's
//!   end) come from the authorizer context (see [`crate::authorizer`]); the
//!   connection is stored with a TTL; an offered `Sec-WebSocket-Protocol` is
//!   echoed.
//! * `$disconnect`: every row of the connection is deleted.
//! * `$default` (every client frame): the core parses the frame, decides
//!   ([`bridge::session::decide_request`]) and carries the decision out
//!   ([`bridge::request::carry_out`]) through this module's [`Effects`]:
//!   DynamoDB, IoT Core and `@connections`. Acks, pongs and errors go back as
//!   the route response body, with no extra API call. Retained messages for
//!   a `subscribe` with `retained: true` are posted through `@connections`
//!   while the request runs, so they reach the client before its ack.
//!
//! A subscribe is acked only once every fan-out sees it: the fan-out reuses
//! its reads for up to `BRIDGE_LOOKUP_CACHE_MS` (see [`crate::lookup`]), so
//! the ack waits that long plus [`ACK_MARGIN`] after the subscription's last
//! write returned (overlapping any retained replay). A subscribe without an
//! `id` gets no ack and does not wait.
//!
//! Token lifetime: a frame from a connection whose token has ended is not
//! served: the connection is told `token_expired` and closed (API Gateway
//! closes with its own code; 4001 cannot be chosen there). A ping needs no
//! state and is answered without touching DynamoDB while the token the
//! authorizer saw is still valid; after that, the stored end decides (an
//! `auth` may have moved it).

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use bridge::auth::Credentials;
use bridge::frame::{self, ErrorCode, FrameError, Request};
use bridge::permissions::Permissions;
use bridge::request::{self, Effects, Hold, Publish, Refusal, Settle};
use bridge::session::{self, Action};
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{HeaderMap, HeaderValue};

use crate::budget::Budget;
use crate::config::HandlerConfig;
use crate::iot::{Iot, IotError, RetainedLimits};
use crate::keys::{InitError, Keys};
use crate::sender::{self, Outcome, Sender};
use crate::signed;
use crate::store::{Connection, Store, StoreError, Subscribed};

/// Retained messages posted at once for one subscribe.
const RETAINED_POSTS: usize = 16;

/// Added to the lookup cache's age before a subscribe is acked: covers the
/// rate at which two hosts' clocks may drift apart over that time, and the
/// scheduling between the write's answer and the handler reading its clock.
pub const ACK_MARGIN: std::time::Duration = std::time::Duration::from_millis(50);

/// The authorizer context key that carries the permissions (a JSON string).
pub const PERMISSIONS_KEY: &str = "permissions";
/// The authorizer context key that carries the token's end (seconds since
/// the epoch, as a string).
pub const EXPIRES_KEY: &str = "expires";

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
#[derive(Debug)]
pub struct Handler {
    config: HandlerConfig,
    store: Store,
    iot: Iot,
    sender: Sender,
    /// With auth on: the keys that check `auth` requests.
    keys: Option<Keys>,
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

/// The credentials the authorizer put in the request context, if readable.
pub fn context_credentials(event: &ApiGatewayWebsocketProxyRequest) -> Option<Credentials> {
    let fields = &event.request_context.authorizer.fields;
    let perms: Permissions = serde_json::from_str(fields.get(PERMISSIONS_KEY)?.as_str()?).ok()?;
    let expires_at = context_expiry(event);
    Some(Credentials { perms, expires_at })
}

/// The token's end the authorizer saw (it arrives as a string, or a number).
fn context_expiry(event: &ApiGatewayWebsocketProxyRequest) -> Option<u64> {
    let value = event.request_context.authorizer.fields.get(EXPIRES_KEY)?;
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
}

impl Handler {
    pub fn new(
        config: HandlerConfig,
        store: Store,
        iot: Iot,
        sender: Sender,
    ) -> Result<Self, InitError> {
        let keys = config.auth.as_ref().map(Keys::new).transpose()?;
        Ok(Handler {
            config,
            store,
            iot,
            sender,
            keys,
        })
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
                    Some(refused(&id, session::decide_binary()))
                } else {
                    let text = event.body.as_deref().unwrap_or("");
                    self.message(&id, text, context_expiry(&event)).await
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
        let credentials = if self.config.auth.is_some() {
            match context_credentials(event) {
                Some(c) => c,
                None => {
                    tracing::warn!(
                        connection = id,
                        "refused: no permissions from the authorizer (is $connect behind it?)"
                    );
                    return Ok(response(403, None));
                }
            }
        } else {
            Credentials::anonymous()
        };
        let now = crate::now_millis();
        let connected_at = match event.request_context.connected_at {
            t if t > 0 => t,
            _ => now,
        };
        let expires = connected_at / 1000 + self.config.connection_ttl_secs;
        self.store
            .put_connection(id, &credentials, connected_at, expires)
            .await?;
        tracing::debug!(
            connection = id,
            subject = credentials.perms.subject.as_deref().unwrap_or("-"),
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

    /// One client text frame; the reply to send, if any. `context_expires`
    /// is the token's end the authorizer saw.
    pub async fn message(
        &self,
        id: &str,
        text: &str,
        context_expires: Option<u64>,
    ) -> Option<String> {
        let policy = &self.config.policy;
        let (req_id, request) = match frame::parse(text, &policy.limits) {
            Ok(parsed) => parsed,
            Err(e) => return Some(refused(id, Action::Refuse(e))),
        };
        let now = crate::now_secs();
        // With auth on, only a context that says so vouches for the token.
        let still_valid = match (&self.keys, context_expires) {
            (None, _) => true,
            (Some(_), Some(at)) => (now as u64) < at,
            (Some(_), None) => false,
        };
        if request == Request::Ping && still_valid {
            // Stateless: no need to read the connection.
            return Some(frame::pong(req_id.as_ref()));
        }
        let conn = match self.store.load_connection(id, now).await {
            Ok(Some(conn)) => conn,
            Ok(None) => return Some(not_registered().with_id(req_id).to_json()),
            Err(e) => return Some(store_failed(id, &e).with_id(req_id).to_json()),
        };
        if conn.token_expired(now) {
            self.close_expired(id, now).await;
            return None;
        }
        let verifier = match (&request, &self.keys) {
            (_, None) => None,
            (Request::Auth { token }, Some(keys)) => {
                Some(keys.verifier_for(token.as_deref().unwrap_or("")).await)
            }
            (_, Some(keys)) => Some(keys.verifier().await),
        };
        let verifier = match (verifier, &self.keys) {
            (Some(Ok(v)), _) => Some(v),
            (Some(Err(e)), _) => {
                tracing::error!(connection = id, error = %e, "no keys to check tokens with");
                let refusal = Refusal::new(
                    ErrorCode::Unavailable,
                    "tokens cannot be checked right now; retry later",
                );
                return Some(refusal.with_id(req_id).to_json());
            }
            (None, _) => None,
        };
        let action = session::decide_request(
            req_id,
            request,
            &conn.perms,
            &conn.held,
            policy,
            verifier.as_deref(),
        );
        let mut shell = Shell {
            h: self,
            id,
            now,
            conn: &conn,
            reply: None,
            visible_at: None,
        };
        request::carry_out(&mut shell, action).await;
        if let (Some(at), Some(_)) = (shell.visible_at, &shell.reply) {
            tokio::time::sleep_until(at).await;
        }
        shell.reply
    }

    /// A connection whose token ended: told once, closed, its rows gone.
    async fn close_expired(&self, id: &str, now: i64) {
        let said = Bytes::from(frame::token_expired().to_json());
        let outcome = self.sender.say_and_close(id, said).await;
        tracing::debug!(connection = id, ?outcome, "token expired: closed");
        if let Err(e) = self.store.remove_connection(id, now).await {
            tracing::warn!(connection = id, error = %e, "cannot remove an expired connection");
        }
    }

    /// Posts the retained messages `mqtt` matches, marked `retained`,
    /// within the replay's bounds ([`RetainedLimits`]); what the bounds
    /// leave out, the client is told with one `lagged` frame after them (its
    /// `dropped` counts the messages left out, and 1 for the rest of a
    /// listing cut short).
    async fn replay_retained(&self, id: &str, mqtt: &str) -> Result<(), IotError> {
        let limits = RetainedLimits::with_messages(self.config.max_retained);
        let budget = Budget::unlimited().at_most(limits.time);
        let found = self.iot.retained_matching(mqtt, &limits, &budget).await?;
        let policy = &self.config.policy;
        let max = policy.limits.max_payload_bytes;
        let frames = found.messages.into_iter().filter_map(|(topic, payload)| {
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
            Some(signed::Body::new(Bytes::from(message)))
        });
        let budget = &budget;
        let outcomes: Vec<Outcome> = stream::iter(frames)
            .map(|f| async move { self.sender.post(id, &f, budget).await })
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
        let not_started = outcomes.iter().filter(|o| **o == Outcome::Later).count();
        let dropped = found.skipped + not_started + usize::from(found.listing_cut);
        if dropped > 0 {
            let lagged = signed::Body::new(Bytes::from(frame::lagged(dropped as u64)));
            self.sender.post(id, &lagged, &Budget::unlimited()).await;
        }
        Ok(())
    }
}

/// A refusal's reply, logged.
fn refused(connection: &str, action: Action) -> String {
    match action {
        Action::Refuse(e) => {
            tracing::debug!(connection, code = %e.code, "refused");
            e.to_json()
        }
        other => {
            // decide_binary and parse failures only ever refuse.
            tracing::error!(connection, ?other, "unexpected decision");
            frame::error(other.id(), ErrorCode::Internal, "internal error")
        }
    }
}

/// The refusal of a frame from a connection the store no longer knows.
fn not_registered() -> Refusal {
    Refusal::new(
        ErrorCode::Unavailable,
        "this connection is no longer registered; reconnect",
    )
}

fn store_failed(connection: &str, e: &StoreError) -> Refusal {
    tracing::error!(connection, error = %e, "subscription store failed");
    Refusal::new(
        ErrorCode::Unavailable,
        "the subscription store is unavailable; retry later",
    )
}

fn iot_failed(e: IotError) -> Refusal {
    Refusal::new(e.code, e.message)
}

/// This deployment's effects, for one frame.
struct Shell<'a> {
    h: &'a Handler,
    id: &'a str,
    now: i64,
    conn: &'a Connection,
    /// The route response body.
    reply: Option<String>,
    /// When a subscription this request holds is seen by every fan-out: its
    /// ack waits until then.
    visible_at: Option<tokio::time::Instant>,
}

impl Shell<'_> {
    /// The subscription's writes are done: every fan-out sees it once its
    /// cached reads are all younger than now.
    fn written(&mut self) {
        let wait = self.h.config.lookup_max_age;
        if !wait.is_zero() {
            self.visible_at = Some(tokio::time::Instant::now() + wait + ACK_MARGIN);
        }
    }
}

impl Effects for Shell<'_> {
    async fn hold(&mut self, channel: &str, mqtt: &str) -> Result<Hold, Refusal> {
        if self.conn.held.contains(channel) {
            // Held since an earlier request, which may still be waiting.
            self.written();
            return Ok(Hold::AlreadyHeld);
        }
        let h = self.h;
        let policy = &h.config.policy;
        let outcome = h
            .store
            .subscribe(
                self.id,
                channel,
                mqtt,
                self.conn.expires,
                self.conn.token_expires,
                policy.max_subscriptions,
                self.now,
                h.config.connection_ttl_secs,
            )
            .await;
        match outcome {
            Ok(Subscribed::Added) => {
                self.written();
                Ok(Hold::Added)
            }
            Ok(Subscribed::AlreadyHeld) => {
                self.written();
                Ok(Hold::AlreadyHeld)
            }
            Ok(Subscribed::TooMany) => {
                let e = session::too_many_subscriptions(None, policy);
                Err(Refusal::new(e.code, e.message))
            }
            Ok(Subscribed::Gone) => Err(not_registered()),
            Err(e) => Err(store_failed(self.id, &e)),
        }
    }

    async fn release(&mut self, channel: &str, mqtt: &str) -> Result<(), Refusal> {
        self.h
            .store
            .unsubscribe(self.id, channel, mqtt, self.now)
            .await
            .map_err(|e| store_failed(self.id, &e))
    }

    async fn replay_retained(&mut self, mqtt: &str) -> Result<(), Refusal> {
        self.h
            .replay_retained(self.id, mqtt)
            .await
            .map_err(iot_failed)
    }

    async fn publish(&mut self, publish: Publish, settle: Settle) {
        let Publish {
            mqtt,
            payload,
            qos,
            retain,
        } = publish;
        let outcome = self.h.iot.publish(&mqtt, payload, qos, retain).await;
        match settle.answer(outcome.map_err(iot_failed)) {
            Ok(ack) => self.reply = ack,
            Err(e) => self.refuse(e).await,
        }
    }

    async fn store_credentials(&mut self, credentials: Credentials) -> Result<(), Refusal> {
        let prefix = &self.h.config.policy.prefix;
        let mqtt: Vec<String> = self.conn.held.iter().map(|c| prefix.to_mqtt(c)).collect();
        match self
            .h
            .store
            .update_credentials(self.id, &credentials, &mqtt)
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(not_registered()),
            Err(e) => Err(store_failed(self.id, &e)),
        }
    }

    async fn reply(&mut self, frame: String) {
        self.reply = Some(frame);
    }

    async fn refuse(&mut self, error: FrameError) {
        // Nothing held is acked: no need to wait.
        self.visible_at = None;
        tracing::debug!(connection = self.id, code = %error.code, "refused");
        self.reply = Some(error.to_json());
    }
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
