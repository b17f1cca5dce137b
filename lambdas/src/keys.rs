//! The deployment's token keys, shared by `ws-authorizer` (at `$connect`) and
//! `ws-handler` (the `auth` action): an HS256 secret, or the RS256 / ES256
//! keys of a JWKS URL (e.g. a Cognito user pool's), downloaded once and kept
//! across invocations, read again after an hour, or when a token names a key
//! the set lacks (at most once a minute), so a key rotation is picked up.
//! The checks themselves are the core's [`bridge::auth::Verifier`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bridge::auth::{AuthError, AuthSettings, Credentials, Verifier};

use crate::config::{AuthorizerConfig, KeySource};

/// How long a downloaded key set is used before it is read again.
const JWKS_TTL: Duration = Duration::from_secs(3600);
/// Shortest time between two downloads prompted by unknown keys.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(60);

/// Keys that could not be set up at start.
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

enum Source {
    Fixed(Arc<Verifier>),
    Jwks {
        url: String,
        http: reqwest::Client,
        cache: tokio::sync::Mutex<Option<Cached>>,
    },
}

/// The keys, and the claim checks besides the signature.
pub struct Keys {
    source: Source,
    settings: AuthSettings,
    jwks_ttl: Duration,
    jwks_min_refresh: Duration,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.source {
            Source::Fixed(_) => "secret",
            Source::Jwks { .. } => "jwks",
        };
        f.debug_struct("Keys").field("source", &kind).finish()
    }
}

impl Keys {
    pub fn new(config: &AuthorizerConfig) -> Result<Self, InitError> {
        let settings = AuthSettings {
            leeway_secs: config.leeway_secs,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
        };
        let source = match &config.keys {
            KeySource::Secret(secret) => Source::Fixed(Arc::new(
                Verifier::hs256(secret.as_bytes(), settings.clone())
                    .map_err(|e| InitError::Secret(e.to_string()))?,
            )),
            KeySource::JwksUrl(url) => Source::Jwks {
                url: url.clone(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| InitError::Http(e.to_string()))?,
                cache: tokio::sync::Mutex::new(None),
            },
        };
        Ok(Keys {
            source,
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
    async fn current(&self, refresh: bool) -> Result<Arc<Verifier>, String> {
        let (url, http, cache) = match &self.source {
            Source::Fixed(v) => return Ok(v.clone()),
            Source::Jwks { url, http, cache } => (url, http, cache),
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

    /// The current verifier.
    pub async fn verifier(&self) -> Result<Arc<Verifier>, String> {
        self.current(false).await
    }

    /// The verifier for `token`: the current keys, read again first when
    /// they lack the key the token names (a rotation).
    pub async fn verifier_for(&self, token: &str) -> Result<Arc<Verifier>, String> {
        let verifier = self.current(false).await?;
        if matches!(self.source, Source::Jwks { .. }) && !verifier.has_key_for(token) {
            return self.current(true).await;
        }
        Ok(verifier)
    }

    /// Checks a token: what it grants and until when, or why not (in fixed
    /// words: never the token).
    pub async fn verify(&self, token: &str) -> Result<Credentials, String> {
        let verifier = self.verifier_for(token).await?;
        verifier.verify(token).map_err(|e: AuthError| e.to_string())
    }
}
