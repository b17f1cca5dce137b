//! `ws-authorizer`: the REQUEST authorizer in front of `$connect`.
//!
//! The token comes from `?token=...` (browsers cannot set headers on a
//! WebSocket) or an `Authorization: Bearer` header, and is checked by the
//! core's [`bridge::auth::Verifier`]: HS256 with `BRIDGE_JWT_SECRET`, or
//! RS256 / ES256 with the keys of `BRIDGE_JWKS_URL` (e.g. a Cognito user
//! pool), downloaded once and kept across invocations (re-read after an hour,
//! or when a token names a key the set lacks, at most once a minute).
//!
//! The answer: no token fails with the exact message `Unauthorized` (API
//! Gateway answers 401); a bad token gets a Deny policy (403); a good one an
//! Allow policy with the permissions in the context as a JSON *string* (the
//! context may hold only strings, numbers and booleans), within API Gateway's
//! 8 KB context limit. Tokens are never logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lambda_events::apigw::{
    ApiGatewayCustomAuthorizerPolicy, ApiGatewayCustomAuthorizerRequestTypeRequest,
    ApiGatewayCustomAuthorizerResponse,
};
use aws_lambda_events::iam::{IamPolicyEffect, IamPolicyStatement};
use bridge::auth::{AuthError, AuthSettings, Verifier};
use serde_json::{Map, Value};

use crate::config::{AuthorizerConfig, KeySource};
use crate::handler::PERMISSIONS_KEY;

/// API Gateway's limit on the authorizer context (serialized).
pub const MAX_CONTEXT_BYTES: usize = 8 * 1024;
/// How long a downloaded key set is used before it is read again.
const JWKS_TTL: Duration = Duration::from_secs(3600);
/// Shortest time between two downloads prompted by unknown keys.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(60);

/// The authorizer's answer.
pub type Response = ApiGatewayCustomAuthorizerResponse<Map<String, Value>>;

/// The one failure API Gateway turns into 401: the message must be exactly
/// `Unauthorized`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Unauthorized")]
pub struct Unauthorized;

/// A key set that could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("BRIDGE_JWT_SECRET cannot be used: {0}")]
    Secret(String),
    #[error("cannot build the HTTP client for BRIDGE_JWKS_URL: {0}")]
    Http(String),
}

struct Cached {
    verifier: Arc<Verifier>,
    fetched: Instant,
}

enum Keys {
    Fixed(Arc<Verifier>),
    Jwks {
        url: String,
        http: reqwest::Client,
        cache: tokio::sync::Mutex<Option<Cached>>,
    },
}

/// Everything `ws-authorizer` keeps between invocations.
pub struct Authorizer {
    keys: Keys,
    settings: AuthSettings,
    jwks_ttl: Duration,
    jwks_min_refresh: Duration,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.keys {
            Keys::Fixed(_) => "secret",
            Keys::Jwks { .. } => "jwks",
        };
        f.debug_struct("Authorizer").field("keys", &kind).finish()
    }
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

/// An Allow answer carrying the permissions, or `None` when they do not fit
/// in the context.
pub fn allow(perms: &bridge::permissions::Permissions, resource: &str) -> Option<Response> {
    let json = serde_json::to_string(perms).ok()?;
    let mut context = Map::new();
    context.insert(PERMISSIONS_KEY.to_string(), Value::String(json));
    if let Some(sub) = &perms.subject {
        context.insert("sub".to_string(), Value::String(sub.clone()));
    }
    if Value::Object(context.clone()).to_string().len() > MAX_CONTEXT_BYTES {
        return None;
    }
    let mut r = Response::default();
    r.principal_id = Some(perms.subject.clone().unwrap_or_else(|| "anonymous".into()));
    r.policy_document = policy(IamPolicyEffect::Allow, resource);
    r.context = context;
    Some(r)
}

impl Authorizer {
    pub fn new(config: &AuthorizerConfig) -> Result<Self, InitError> {
        let settings = AuthSettings {
            leeway_secs: config.leeway_secs,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
        };
        let keys = match &config.keys {
            KeySource::Secret(secret) => Keys::Fixed(Arc::new(
                Verifier::hs256(secret.as_bytes(), settings.clone())
                    .map_err(|e| InitError::Secret(e.to_string()))?,
            )),
            KeySource::JwksUrl(url) => Keys::Jwks {
                url: url.clone(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| InitError::Http(e.to_string()))?,
                cache: tokio::sync::Mutex::new(None),
            },
        };
        Ok(Authorizer {
            keys,
            settings,
            jwks_ttl: JWKS_TTL,
            jwks_min_refresh: JWKS_MIN_REFRESH,
        })
    }

    /// Changes how long a key set is kept and how soon an unknown key may
    /// prompt a new download (defaults: an hour, a minute).
    pub fn with_refresh(mut self, ttl: Duration, min_refresh: Duration) -> Self {
        self.jwks_ttl = ttl;
        self.jwks_min_refresh = min_refresh;
        self
    }

    async fn download(&self, url: &str, http: &reqwest::Client) -> Result<Verifier, String> {
        let resp = http
            .get(url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", resp.status()));
        }
        let body = resp.text().await.map_err(|e| format!("GET {url}: {e}"))?;
        Verifier::from_jwks_json(&body, self.settings.clone()).map_err(|e| format!("{url}: {e}"))
    }

    /// The verifier to use; `refresh` asks for a fresh key set (an unknown key).
    async fn verifier(&self, refresh: bool) -> Result<Arc<Verifier>, String> {
        let (url, http, cache) = match &self.keys {
            Keys::Fixed(v) => return Ok(v.clone()),
            Keys::Jwks { url, http, cache } => (url, http, cache),
        };
        let mut cache = cache.lock().await;
        let stale = match cache.as_ref() {
            None => true,
            Some(c) => {
                c.fetched.elapsed() > self.jwks_ttl
                    || (refresh && c.fetched.elapsed() >= self.jwks_min_refresh)
            }
        };
        if stale {
            match self.download(url, http).await {
                Ok(v) => {
                    *cache = Some(Cached {
                        verifier: Arc::new(v),
                        fetched: Instant::now(),
                    })
                }
                // Keep using the keys we have, if any.
                Err(e) => tracing::error!(error = %e, "cannot read the JWKS"),
            }
        }
        cache
            .as_ref()
            .map(|c| c.verifier.clone())
            .ok_or_else(|| "no key set available".to_string())
    }

    async fn verify(&self, token: &str) -> Result<bridge::permissions::Permissions, String> {
        let verifier = self.verifier(false).await?;
        match verifier.verify(token) {
            Err(AuthError::UnknownKey) if matches!(self.keys, Keys::Jwks { .. }) => {
                let fresh = self.verifier(true).await?;
                fresh.verify(token).map(|c| c.perms).map_err(|e| e.to_string())
            }
            other => other.map(|c| c.perms).map_err(|e| e.to_string()),
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
        match self.verify(&token).await {
            Ok(perms) => match allow(&perms, &resource) {
                Some(r) => Ok(r),
                None => {
                    tracing::warn!(
                        subject = perms.subject.as_deref().unwrap_or("-"),
                        limit = MAX_CONTEXT_BYTES,
                        "refused: the token's channels do not fit in the authorizer context"
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
