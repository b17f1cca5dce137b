//! The decision both deployments share: given one client frame, the
//! connection's permissions and the filters it already holds, what happens.
//!
//! Pure: no sockets, no AWS (the one clock read is a token's expiry check,
//! inside [`Verifier::verify`]). `bridge serve` and the `ws-handler` Lambda
//! call [`decide`] and then carry out the [`Action`] in the order
//! [`crate::request::carry_out`] gives (update their subscription store,
//! publish to MQTT, send the reply). Every protocol rule about what a request
//! may do lives here, once.

use std::collections::{BTreeSet, HashSet};

use crate::auth::{Credentials, Verifier};
use crate::channel::{self, ChannelError, Prefix};
use crate::frame::{self, ErrorCode, FrameError, FrameLimits, Id, Request};
use crate::permissions::Permissions;

/// The deployment's rules.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Broker-side prefix clients never see.
    pub prefix: Prefix,
    /// Reserved (`$`) filters the deployment allows to every connection,
    /// in client terms (e.g. `$SYS/#`).
    pub reserved: Vec<String>,
    pub limits: FrameLimits,
    /// Filters one connection may hold (default 100).
    pub max_subscriptions: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            prefix: Prefix::default(),
            reserved: Vec::new(),
            limits: FrameLimits::default(),
            max_subscriptions: 100,
        }
    }
}

/// The filters a connection holds, however the deployment stores them.
pub trait Held {
    fn holds(&self, filter: &str) -> bool;
    fn count(&self) -> usize;
    fn filters(&self) -> Vec<&str>;
}

impl Held for BTreeSet<String> {
    fn holds(&self, filter: &str) -> bool {
        self.contains(filter)
    }
    fn count(&self) -> usize {
        self.len()
    }
    fn filters(&self) -> Vec<&str> {
        self.iter().map(String::as_str).collect()
    }
}

impl Held for HashSet<String> {
    fn holds(&self, filter: &str) -> bool {
        self.contains(filter)
    }
    fn count(&self) -> usize {
        self.len()
    }
    fn filters(&self) -> Vec<&str> {
        self.iter().map(String::as_str).collect()
    }
}

/// What to do with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to carry out; send this frame back (if any).
    Reply(Option<String>),
    /// The request is refused: send this error back.
    Refuse(FrameError),
    /// Start delivering `channel` (a filter) to this connection; `mqtt` is
    /// the broker filter. With `retained`, replay the retained messages first.
    Subscribe {
        id: Option<Id>,
        channel: String,
        mqtt: String,
        retained: bool,
    },
    /// Stop delivering `channel`, which the connection holds.
    Unsubscribe {
        id: Option<Id>,
        channel: String,
        mqtt: String,
    },
    /// Publish to the broker topic `mqtt`.
    Publish {
        id: Option<Id>,
        channel: String,
        mqtt: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
    },
    /// (v1.1) Replace the connection's credentials (permissions and expiry)
    /// with these, already verified and checked against what it holds.
    Auth {
        id: Option<Id>,
        credentials: Credentials,
    },
}

impl Action {
    /// The `ack` to send once a subscribe, unsubscribe or publish took effect.
    pub fn ack(&self) -> Option<String> {
        match self {
            Action::Reply(_) | Action::Refuse(_) => None,
            Action::Subscribe { id, .. }
            | Action::Unsubscribe { id, .. }
            | Action::Publish { id, .. }
            | Action::Auth { id, .. } => id.as_ref().map(frame::ack),
        }
    }

    /// The request's id, for an error reply.
    pub fn id(&self) -> Option<&Id> {
        match self {
            Action::Reply(_) => None,
            Action::Refuse(e) => e.id.as_ref(),
            Action::Subscribe { id, .. }
            | Action::Unsubscribe { id, .. }
            | Action::Publish { id, .. }
            | Action::Auth { id, .. } => id.as_ref(),
        }
    }
}

fn refuse(e: FrameError) -> Action {
    Action::Refuse(e)
}

fn refuse_with(id: &Option<Id>, code: ErrorCode, message: impl Into<String>) -> Action {
    refuse(FrameError::new(id.clone(), code, message))
}

/// Decides what one text frame does. `verifier` is the deployment's token
/// check (`None`: auth is off).
pub fn decide(
    text: &str,
    perms: &Permissions,
    held: &dyn Held,
    policy: &Policy,
    verifier: Option<&Verifier>,
) -> Action {
    let (id, request) = match frame::parse(text, &policy.limits) {
        Ok(parsed) => parsed,
        Err(e) => return refuse(e),
    };
    decide_request(id, request, perms, held, policy, verifier)
}

/// What a binary frame gets: the protocol is JSON text only.
pub fn decide_binary() -> Action {
    refuse(frame::binary_frame_error())
}

/// Decides what an already parsed request does.
pub fn decide_request(
    id: Option<Id>,
    request: Request,
    perms: &Permissions,
    held: &dyn Held,
    policy: &Policy,
    verifier: Option<&Verifier>,
) -> Action {
    match request {
        Request::Ping => Action::Reply(Some(frame::pong(id.as_ref()))),
        Request::Subscribe { channel, retained } => {
            if let Err((code, message)) = may_subscribe(&channel, perms, policy) {
                return refuse_with(&id, code, message);
            }
            if !held.holds(&channel) && held.count() >= policy.max_subscriptions {
                return refuse(too_many_subscriptions(id, policy));
            }
            let mqtt = policy.prefix.to_mqtt(&channel);
            Action::Subscribe {
                id,
                channel,
                mqtt,
                retained,
            }
        }
        Request::Unsubscribe { channel } => {
            if !held.holds(&channel) {
                // Not an error: the request's effect (not subscribed) holds.
                return Action::Reply(id.as_ref().map(frame::ack));
            }
            let mqtt = policy.prefix.to_mqtt(&channel);
            Action::Unsubscribe { id, channel, mqtt }
        }
        Request::Publish {
            channel,
            payload,
            qos,
            retain,
        } => {
            if let Err(e) = check_channel(&channel, policy, perms.names_for_publish(&channel)) {
                return refuse_with(&id, ErrorCode::InvalidChannel, e.to_string());
            }
            if !perms.can_publish(&channel) {
                return refuse_with(
                    &id,
                    ErrorCode::Forbidden,
                    format!("not allowed to publish to {}", frame::json_string(&channel)),
                );
            }
            let mqtt = policy.prefix.to_mqtt(&channel);
            Action::Publish {
                id,
                channel,
                mqtt,
                payload,
                qos,
                retain,
            }
        }
        Request::Auth { token } => {
            let Some(verifier) = verifier else {
                // Auth off: acknowledged, nothing changes.
                return Action::Reply(id.as_ref().map(frame::ack));
            };
            let credentials = match verifier.verify(token.as_deref().unwrap_or("")) {
                Ok(c) => c,
                Err(e) => return refuse_with(&id, ErrorCode::Unauthorized, e.to_string()),
            };
            if credentials.perms.subject != perms.subject {
                return refuse_with(
                    &id,
                    ErrorCode::Unauthorized,
                    "the token names another subject than the connection's",
                );
            }
            for filter in held.filters() {
                if may_subscribe(filter, &credentials.perms, policy).is_err() {
                    return refuse_with(
                        &id,
                        ErrorCode::Forbidden,
                        format!(
                            "the new token does not allow {}, which this connection holds; \
                             unsubscribe first",
                            frame::json_string(filter)
                        ),
                    );
                }
            }
            Action::Auth { id, credentials }
        }
    }
}

/// Whether `perms` may subscribe to `channel` under the deployment's rules;
/// the refusal's code and message when not.
fn may_subscribe(
    channel: &str,
    perms: &Permissions,
    policy: &Policy,
) -> Result<(), (ErrorCode, String)> {
    if let Err(e) = check_channel(channel, policy, perms.names_for_subscribe(channel)) {
        return Err((ErrorCode::InvalidChannel, e.to_string()));
    }
    if !perms.can_subscribe(channel) {
        return Err((
            ErrorCode::Forbidden,
            format!(
                "not allowed to subscribe to {}",
                frame::json_string(channel)
            ),
        ));
    }
    Ok(())
}

/// The refusal of a subscribe over the per-connection limit; also for stores
/// that find the limit reached only when they write (two frames racing).
pub fn too_many_subscriptions(id: Option<Id>, policy: &Policy) -> FrameError {
    FrameError::new(
        id,
        ErrorCode::TooManySubscriptions,
        format!(
            "a connection holds at most {} subscriptions",
            policy.max_subscriptions
        ),
    )
}

/// Why a broker message is not delivered to web clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undeliverable {
    /// Its topic is outside the deployment's prefix (no channel names it).
    OutsidePrefix,
    /// Its payload is over the payload limit.
    TooLarge { bytes: usize, limit: usize },
}

impl std::fmt::Display for Undeliverable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Undeliverable::OutsidePrefix => write!(f, "the topic is outside the prefix"),
            Undeliverable::TooLarge { bytes, limit } => {
                write!(f, "payload of {bytes} bytes is over the {limit}-byte limit")
            }
        }
    }
}

/// Whether a broker message (live or retained) on `topic` with a payload of
/// `payload_len` bytes goes to web clients, and under which channel name.
/// A message over the payload limit is never delivered, never truncated.
pub fn deliverable<'a>(
    prefix: &Prefix,
    max_payload_bytes: usize,
    topic: &'a str,
    payload_len: usize,
) -> Result<&'a str, Undeliverable> {
    let channel = prefix
        .to_channel(topic)
        .ok_or(Undeliverable::OutsidePrefix)?;
    if payload_len > max_payload_bytes {
        return Err(Undeliverable::TooLarge {
            bytes: payload_len,
            limit: max_payload_bytes,
        });
    }
    Ok(channel)
}

/// The deployment-dependent channel rules: reserved names and the prefix.
fn check_channel(channel: &str, policy: &Policy, named: bool) -> Result<(), ChannelError> {
    if channel::is_reserved(channel)
        && !named
        && !policy.reserved.iter().any(|r| channel::covers(r, channel))
    {
        return Err(ChannelError::Reserved);
    }
    policy.prefix.check_fits(channel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::permissions::ChannelsClaim;

    fn run(text: &str, perms: &Permissions, held: &BTreeSet<String>) -> Action {
        decide(text, perms, held, &Policy::default(), None)
    }

    fn error_code(action: &Action) -> String {
        match action {
            Action::Refuse(e) => e.code.as_str().to_string(),
            other => panic!("expected an error reply, got {other:?}"),
        }
    }

    #[test]
    fn delivery_gate() {
        let none = Prefix::default();
        assert_eq!(deliverable(&none, 5, "a/b", 5), Ok("a/b"));
        assert_eq!(
            deliverable(&none, 5, "a/b", 6),
            Err(Undeliverable::TooLarge { bytes: 6, limit: 5 })
        );
        let p = Prefix::new(Some("site")).unwrap();
        assert_eq!(deliverable(&p, 5, "site/a", 1), Ok("a"));
        assert_eq!(
            deliverable(&p, 5, "other/a", 1),
            Err(Undeliverable::OutsidePrefix)
        );
    }

    #[test]
    fn subscribe_and_limits() {
        let all = Permissions::allow_all();
        let mut held = BTreeSet::new();
        let a = run(
            r#"{"action":"subscribe","channel":"a/#","id":1}"#,
            &all,
            &held,
        );
        assert_eq!(a.ack().as_deref(), Some(r#"{"type":"ack","id":1}"#));
        assert!(matches!(a, Action::Subscribe { ref mqtt, .. } if mqtt == "a/#"));
        let policy = Policy {
            max_subscriptions: 2,
            ..Policy::default()
        };
        held.insert("x".into());
        held.insert("y".into());
        let a = decide(
            r#"{"action":"subscribe","channel":"z"}"#,
            &all,
            &held,
            &policy,
            None,
        );
        assert_eq!(error_code(&a), "too_many_subscriptions");
        // Re-subscribing a held filter is not a new subscription.
        let a = decide(
            r#"{"action":"subscribe","channel":"x"}"#,
            &all,
            &held,
            &policy,
            None,
        );
        assert!(matches!(a, Action::Subscribe { .. }));
    }

    #[test]
    fn unsubscribe_not_held_is_ack() {
        let held = BTreeSet::new();
        let a = run(
            r#"{"action":"unsubscribe","channel":"q","id":"u"}"#,
            &Permissions::allow_all(),
            &held,
        );
        assert_eq!(a, Action::Reply(Some(r#"{"type":"ack","id":"u"}"#.into())));
        let a = run(
            r#"{"action":"unsubscribe","channel":"q"}"#,
            &Permissions::allow_all(),
            &held,
        );
        assert_eq!(a, Action::Reply(None));
    }

    #[test]
    fn reserved_channels() {
        let held = BTreeSet::new();
        let all = Permissions::allow_all();
        let a = run(r#"{"action":"subscribe","channel":"$SYS/#"}"#, &all, &held);
        assert_eq!(error_code(&a), "invalid_channel");
        let a = run(
            r#"{"action":"publish","channel":"$aws/x","data":1}"#,
            &all,
            &held,
        );
        assert_eq!(error_code(&a), "invalid_channel");
        let policy = Policy {
            reserved: vec!["$SYS/#".into()],
            ..Policy::default()
        };
        let a = decide(
            r#"{"action":"subscribe","channel":"$SYS/load"}"#,
            &all,
            &held,
            &policy,
            None,
        );
        assert!(matches!(a, Action::Subscribe { .. }));
        let named = Permissions::from_claims(
            None,
            &ChannelsClaim {
                subscribe: vec!["$SYS/#".into()],
                publish: vec![],
            },
        );
        let a = run(
            r#"{"action":"subscribe","channel":"$SYS/x"}"#,
            &named,
            &held,
        );
        assert!(matches!(a, Action::Subscribe { .. }));
    }

    #[test]
    fn permissions_and_prefix() {
        let held = BTreeSet::new();
        let p = Permissions::from_claims(
            Some("u"),
            &ChannelsClaim {
                subscribe: vec!["fleet/+/telemetry".into()],
                publish: vec!["fleet/+/commands".into()],
            },
        );
        let a = run(
            r#"{"action":"subscribe","channel":"fleet/#","id":3}"#,
            &p,
            &held,
        );
        assert_eq!(error_code(&a), "forbidden");
        let a = run(
            r#"{"action":"publish","channel":"fleet/d/telemetry","data":1}"#,
            &p,
            &held,
        );
        assert_eq!(error_code(&a), "forbidden");
        let policy = Policy {
            prefix: Prefix::new(Some("t1")).unwrap(),
            ..Policy::default()
        };
        let a = decide(
            r#"{"action":"publish","channel":"fleet/d/commands","data":1}"#,
            &p,
            &held,
            &policy,
            None,
        );
        assert!(matches!(a, Action::Publish { ref mqtt, .. } if mqtt == "t1/fleet/d/commands"));
        let a = decide(
            r#"{"action":"subscribe","channel":"1/2/3/4/5/6/7/8"}"#,
            &Permissions::allow_all(),
            &held,
            &policy,
            None,
        );
        assert_eq!(error_code(&a), "invalid_channel");
    }

    fn token(claims: serde_json::Value) -> String {
        use jsonwebtoken::{encode, EncodingKey, Header};
        let key = EncodingKey::from_secret(SECRET).unwrap();
        encode(&Header::default(), &claims, &key).unwrap()
    }

    const SECRET: &[u8] = b"session-tests-secret-0123456789ab";

    fn auth_frame(claims: serde_json::Value) -> String {
        serde_json::json!({"action":"auth","id":"a","token":token(claims)}).to_string()
    }

    #[test]
    fn auth_replaces_credentials_within_the_rules() {
        use crate::auth::{AuthSettings, Verifier};
        let v = Verifier::hs256(SECRET, AuthSettings::default()).unwrap();
        let exp = crate::auth::now_secs() + 600;
        let old = Permissions::from_claims(
            Some("u1"),
            &ChannelsClaim {
                subscribe: vec!["fleet/#".into()],
                publish: vec![],
            },
        );
        let mut held = BTreeSet::new();
        held.insert("fleet/+/t".to_string());
        let policy = Policy::default();
        let claims = |sub: &str, filters: &[&str], exp: u64| serde_json::json!({"sub": sub, "exp": exp, "channels": {"subscribe": filters}});
        // Same subject, still allows what is held: the new credentials.
        let a = decide(
            &auth_frame(claims("u1", &["fleet/+/t", "x"], exp)),
            &old,
            &held,
            &policy,
            Some(&v),
        );
        match &a {
            Action::Auth { credentials, .. } => {
                assert_eq!(credentials.expires_at, Some(exp));
                assert!(credentials.perms.can_subscribe("x"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(a.ack().as_deref(), Some(r#"{"type":"ack","id":"a"}"#));
        // No longer allows a held filter: forbidden, nothing changes.
        let a = decide(
            &auth_frame(claims("u1", &["x"], exp)),
            &old,
            &held,
            &policy,
            Some(&v),
        );
        assert_eq!(error_code(&a), "forbidden");
        // Another subject, an expired token, garbage, no token: unauthorized.
        for frame in [
            auth_frame(claims("u2", &["fleet/#"], exp)),
            auth_frame(claims("u1", &["fleet/#"], exp - 1200)),
            r#"{"action":"auth","token":"x.y.z"}"#.to_string(),
            r#"{"action":"auth"}"#.to_string(),
        ] {
            let a = decide(&frame, &old, &held, &policy, Some(&v));
            assert_eq!(error_code(&a), "unauthorized", "{frame}");
        }
        // Auth off: acknowledged, nothing to do.
        let a = decide(r#"{"action":"auth","id":1}"#, &old, &held, &policy, None);
        assert_eq!(a, Action::Reply(Some(r#"{"type":"ack","id":1}"#.into())));
    }

    #[test]
    fn ping_and_binary() {
        let held = BTreeSet::new();
        let a = run(
            r#"{"action":"ping","id":9}"#,
            &Permissions::allow_all(),
            &held,
        );
        assert_eq!(a, Action::Reply(Some(r#"{"type":"pong","id":9}"#.into())));
        assert_eq!(error_code(&decide_binary()), "bad_request");
    }
}
