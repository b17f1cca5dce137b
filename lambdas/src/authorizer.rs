//! `ws-authorizer`: the REQUEST authorizer in front of `$connect`.
//!
//! The token comes from `?token=...` (browsers cannot set headers on a
//! WebSocket) or an `Authorization: Bearer` header, and is checked with the
//! deployment's [`Keys`] (HS256 with `BRIDGE_JWT_SECRET`, or RS256 / ES256
//! with the keys of `BRIDGE_JWKS_URL`).
//!
//! The answer: no token fails with the exact message `Unauthorized` (API
//! Gateway answers 401); a bad token gets a Deny policy (403); a good one an
//! Allow policy with, in the context, the permissions as a JSON *string* (the
//! context may hold only strings, numbers and booleans) and the token's end
//! (`expires`, seconds since the epoch, as a string): `ws-handler` stores
//! both with the connection, so the token's lifetime holds after `$connect`
//! too. The whole response (policy and context) must stay within API
//! Gateway's 8 KB. Tokens are never logged.

use aws_lambda_events::apigw::{
    ApiGatewayCustomAuthorizerPolicy, ApiGatewayCustomAuthorizerRequestTypeRequest,
    ApiGatewayCustomAuthorizerResponse,
};
use aws_lambda_events::iam::{IamPolicyEffect, IamPolicyStatement};
use bridge::auth::Credentials;
use serde_json::{Map, Value};

use crate::config::AuthorizerConfig;
use crate::handler::{EXPIRES_KEY, PERMISSIONS_KEY};
pub use crate::keys::InitError;
use crate::keys::Keys;

/// API Gateway's limit on an authorizer's response (policy and context,
/// serialized).
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024;

/// The authorizer's answer.
pub type Response = ApiGatewayCustomAuthorizerResponse<Map<String, Value>>;

/// The one failure API Gateway turns into 401: the message must be exactly
/// `Unauthorized`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Unauthorized")]
pub struct Unauthorized;

/// Everything `ws-authorizer` keeps between invocations.
#[derive(Debug)]
pub struct Authorizer {
    keys: Keys,
}

/// The token of a `$connect` request: `?token=` first, then the header.
pub fn token(event: &ApiGatewayCustomAuthorizerRequestTypeRequest) -> Option<String> {
    let authorization = event
        .headers
        .get(http::header::AUTHORIZATION)
        .or_else(|| event.multi_value_headers.get(http::header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok());
    bridge::auth::presented(event.query_string_parameters.first("token"), authorization)
        .map(str::to_string)
}

fn policy(effect: IamPolicyEffect, resource: &str) -> ApiGatewayCustomAuthorizerPolicy {
    let mut statement = IamPolicyStatement::default();
    statement.action = vec!["execute-api:Invoke".to_string()];
    statement.effect = effect;
    statement.resource = vec![resource.to_string()];
    let mut p = ApiGatewayCustomAuthorizerPolicy::default();
    p.version = Some("2012-10-17".to_string());
    p.statement = vec![statement];
    p
}

/// A Deny answer for `resource`.
pub fn deny(principal: &str, resource: &str) -> Response {
    let mut r = Response::default();
    r.principal_id = Some(principal.to_string());
    r.policy_document = policy(IamPolicyEffect::Deny, resource);
    r
}

/// An Allow answer carrying the credentials, or `None` when the whole
/// response would not fit in API Gateway's 8 KB.
pub fn allow(credentials: &Credentials, resource: &str) -> Option<Response> {
    let perms = &credentials.perms;
    let json = serde_json::to_string(perms).ok()?;
    let mut context = Map::new();
    context.insert(PERMISSIONS_KEY.to_string(), Value::String(json));
    if let Some(at) = credentials.expires_at {
        context.insert(EXPIRES_KEY.to_string(), Value::String(at.to_string()));
    }
    if let Some(sub) = &perms.subject {
        context.insert("sub".to_string(), Value::String(sub.clone()));
    }
    let mut r = Response::default();
    r.principal_id = Some(perms.subject.clone().unwrap_or_else(|| "anonymous".into()));
    r.policy_document = policy(IamPolicyEffect::Allow, resource);
    r.context = context;
    let size = serde_json::to_string(&r).ok()?.len();
    (size <= MAX_RESPONSE_BYTES).then_some(r)
}

impl Authorizer {
    pub fn new(config: &AuthorizerConfig) -> Result<Self, InitError> {
        Ok(Authorizer {
            keys: Keys::new(config)?,
        })
    }

    /// Changes how long a key set is kept and how soon an unknown key may
    /// prompt a new download (see [`Keys::with_refresh`]).
    pub fn with_refresh(self, ttl: std::time::Duration, min_refresh: std::time::Duration) -> Self {
        Authorizer {
            keys: self.keys.with_refresh(ttl, min_refresh),
        }
    }

    /// One `$connect` authorization request.
    pub async fn handle(
        &self,
        event: ApiGatewayCustomAuthorizerRequestTypeRequest,
    ) -> Result<Response, Unauthorized> {
        let resource = event.method_arn.clone().unwrap_or_default();
        let Some(token) = token(&event) else {
            tracing::info!("refused: no token");
            return Err(Unauthorized);
        };
        match self.keys.verify(&token).await {
            Ok(credentials) => match allow(&credentials, &resource) {
                Some(r) => Ok(r),
                None => {
                    tracing::warn!(
                        subject = credentials.perms.subject.as_deref().unwrap_or("-"),
                        limit = MAX_RESPONSE_BYTES,
                        "refused: the token's channels do not fit in the authorizer response"
                    );
                    Ok(deny("anonymous", &resource))
                }
            },
            Err(reason) => {
                // The reason only, never the token.
                tracing::info!(%reason, "refused");
                Ok(deny("anonymous", &resource))
            }
        }
    }
}
