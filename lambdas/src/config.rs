//! The functions' settings, read from the environment once at start.
//!
//! Each function has its own settings type with the list of variables it
//! reads ([`HandlerConfig::VARS`], ...): `infra/template.yaml` must set every
//! one of them, and a test checks that it does. An empty value counts as
//! unset, so the template can pass optional parameters through unchanged.
//! A bad value stops the function at init with a message naming the variable.

use bridge::channel::Prefix;
use bridge::frame::FrameLimits;
use bridge::session::Policy;

/// A setting that could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0} is not set")]
    Missing(&'static str),
    #[error("{name} is not valid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// Reads one variable; tests pass a map instead of the process environment.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment as a [`Lookup`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn get(env: Lookup, name: &'static str) -> Option<String> {
    env(name).filter(|v| !v.trim().is_empty())
}

fn required(env: Lookup, name: &'static str) -> Result<String, ConfigError> {
    get(env, name).ok_or(ConfigError::Missing(name))
}

fn number<T>(env: Lookup, name: &'static str, default: T, min: T) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let Some(raw) = get(env, name) else {
        return Ok(default);
    };
    let value: T = raw.trim().parse().map_err(|_| ConfigError::Invalid {
        name,
        reason: format!("{raw:?} is not a number"),
    })?;
    if value < min {
        return Err(ConfigError::Invalid {
            name,
            reason: format!("must be at least {min}"),
        });
    }
    Ok(value)
}

fn https_url(env: Lookup, name: &'static str) -> Result<String, ConfigError> {
    let url = required(env, name)?;
    let url = url.trim().trim_end_matches('/').to_string();
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(ConfigError::Invalid {
            name,
            reason: "must be an https:// URL".into(),
        });
    }
    Ok(url)
}

fn prefix(env: Lookup) -> Result<Prefix, ConfigError> {
    let raw = get(env, "BRIDGE_TOPIC_PREFIX");
    Prefix::new(raw.as_deref()).map_err(|e| ConfigError::Invalid {
        name: "BRIDGE_TOPIC_PREFIX",
        reason: e.to_string(),
    })
}

/// API Gateway's largest WebSocket message (128 KB): a frame over it cannot
/// be posted and is never truncated.
pub const MAX_POST_BYTES: usize = 128 * 1024;
/// API Gateway closes a connection after 2 hours; rows live this much longer.
pub const DEFAULT_CONNECTION_TTL_SECS: i64 = 2 * 3600 + 10 * 60;
/// Recipients per fan-out invocation before it splits (see [`crate::parts`]).
pub const DEFAULT_PART_SIZE: usize = 500;
/// How long a fan-out environment may reuse a DynamoDB read (see
/// [`crate::lookup`]) unless `BRIDGE_LOOKUP_CACHE_MS` says otherwise.
pub const DEFAULT_LOOKUP_CACHE_MS: u64 = 1000;
/// The most `BRIDGE_LOOKUP_CACHE_MS` may be: a subscribe's ack waits that
/// long, within API Gateway's 29 s.
pub const MAX_LOOKUP_CACHE_MS: u64 = 10_000;

/// `BRIDGE_LOOKUP_CACHE_MS`: how long the fan-out may reuse a read, and so
/// how long ws-handler holds back a subscribe's ack (both functions read
/// the same template parameter).
fn lookup_max_age(env: Lookup) -> Result<std::time::Duration, ConfigError> {
    let name = "BRIDGE_LOOKUP_CACHE_MS";
    let ms = number(env, name, DEFAULT_LOOKUP_CACHE_MS, 0)?;
    if ms > MAX_LOOKUP_CACHE_MS {
        return Err(ConfigError::Invalid {
            name,
            reason: format!("must be at most {MAX_LOOKUP_CACHE_MS}"),
        });
    }
    Ok(std::time::Duration::from_millis(ms))
}

/// `ws-handler`.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    pub table: String,
    /// The stage's management API (`https://{api}.execute-api.{region}.amazonaws.com/{stage}`).
    pub websocket_endpoint: String,
    /// With auth on (`$connect` must carry the authorizer's permissions), the
    /// keys that check the tokens of `auth` requests: the authorizer's.
    pub auth: Option<AuthorizerConfig>,
    pub policy: Policy,
    /// Seconds a connection's rows outlive its `$connect`.
    pub connection_ttl_secs: i64,
    /// Most retained messages replayed for one subscribe.
    pub max_retained: usize,
    /// How long a fan-out may reuse a read: a subscribe's ack waits this
    /// long (plus a margin) after its writes, see [`crate::lookup`].
    pub lookup_max_age: std::time::Duration,
}

impl HandlerConfig {
    pub const VARS: &'static [&'static str] = &[
        "TABLE_NAME",
        "WEBSOCKET_ENDPOINT",
        "BRIDGE_AUTH",
        "BRIDGE_TOPIC_PREFIX",
        "BRIDGE_RESERVED_CHANNELS",
        "BRIDGE_MAX_FRAME_BYTES",
        "BRIDGE_MAX_PAYLOAD_BYTES",
        "BRIDGE_MAX_SUBSCRIPTIONS",
        "BRIDGE_CONNECTION_TTL_SECS",
        "BRIDGE_MAX_RETAINED",
        "BRIDGE_LOOKUP_CACHE_MS",
        "BRIDGE_JWT_SECRET",
        "BRIDGE_JWKS_URL",
        "BRIDGE_JWT_ISSUER",
        "BRIDGE_JWT_AUDIENCE",
        "BRIDGE_JWT_LEEWAY",
    ];

    pub fn from_env(env: Lookup) -> Result<Self, ConfigError> {
        let table = required(env, "TABLE_NAME")?;
        let websocket_endpoint = https_url(env, "WEBSOCKET_ENDPOINT")?;
        let auth = match get(env, "BRIDGE_AUTH").as_deref().map(str::trim) {
            None | Some("token") => Some(AuthorizerConfig::from_env(env)?),
            Some("off") => None,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "BRIDGE_AUTH",
                    reason: format!("{other:?}: expected \"token\" or \"off\""),
                })
            }
        };
        let reserved: Vec<String> = get(env, "BRIDGE_RESERVED_CHANNELS")
            .map(|r| {
                r.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        for r in &reserved {
            bridge::channel::validate_filter(r).map_err(|e| ConfigError::Invalid {
                name: "BRIDGE_RESERVED_CHANNELS",
                reason: format!("{r:?}: {e}"),
            })?;
        }
        let defaults = FrameLimits::default();
        let limits = FrameLimits {
            max_frame_bytes: number(env, "BRIDGE_MAX_FRAME_BYTES", defaults.max_frame_bytes, 1)?,
            max_payload_bytes: number(
                env,
                "BRIDGE_MAX_PAYLOAD_BYTES",
                defaults.max_payload_bytes,
                1,
            )?,
        };
        Ok(HandlerConfig {
            table,
            websocket_endpoint,
            auth,
            policy: Policy {
                prefix: prefix(env)?,
                reserved,
                limits,
                max_subscriptions: number(
                    env,
                    "BRIDGE_MAX_SUBSCRIPTIONS",
                    Policy::default().max_subscriptions,
                    1,
                )?,
            },
            connection_ttl_secs: number(
                env,
                "BRIDGE_CONNECTION_TTL_SECS",
                DEFAULT_CONNECTION_TTL_SECS,
                60,
            )?,
            max_retained: number(env, "BRIDGE_MAX_RETAINED", 1000, 0)?,
            lookup_max_age: lookup_max_age(env)?,
        })
    }
}

/// `iot-fanout`.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    pub table: String,
    pub websocket_endpoint: String,
    pub prefix: Prefix,
    /// Largest MQTT payload delivered (the core's payload limit).
    pub max_payload_bytes: usize,
    /// Posts in flight at once.
    pub concurrency: usize,
    /// How long a read may be reused (see [`crate::lookup`]).
    pub lookup_max_age: std::time::Duration,
    /// Most recipients one invocation posts to before handing chunks to
    /// parallel invocations (0: never split). See [`crate::parts`].
    pub part_size: usize,
    /// This function's name, to invoke itself with (Lambda sets
    /// `AWS_LAMBDA_FUNCTION_NAME`); none outside Lambda.
    pub function_name: Option<String>,
}

impl FanoutConfig {
    pub const VARS: &'static [&'static str] = &[
        "TABLE_NAME",
        "WEBSOCKET_ENDPOINT",
        "BRIDGE_TOPIC_PREFIX",
        "BRIDGE_MAX_PAYLOAD_BYTES",
        "BRIDGE_FANOUT_CONCURRENCY",
        "BRIDGE_FANOUT_PART_SIZE",
        "BRIDGE_LOOKUP_CACHE_MS",
    ];

    pub fn from_env(env: Lookup) -> Result<Self, ConfigError> {
        Ok(FanoutConfig {
            table: required(env, "TABLE_NAME")?,
            websocket_endpoint: https_url(env, "WEBSOCKET_ENDPOINT")?,
            prefix: prefix(env)?,
            max_payload_bytes: number(
                env,
                "BRIDGE_MAX_PAYLOAD_BYTES",
                FrameLimits::default().max_payload_bytes,
                1,
            )?,
            concurrency: number(env, "BRIDGE_FANOUT_CONCURRENCY", 128, 1)?,
            lookup_max_age: lookup_max_age(env)?,
            part_size: number(env, "BRIDGE_FANOUT_PART_SIZE", DEFAULT_PART_SIZE, 0)?,
            function_name: get(env, "AWS_LAMBDA_FUNCTION_NAME"),
        })
    }
}

/// Where the authorizer's keys come from.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// HS256 with a shared secret.
    Secret(String),
    /// RS256 / ES256 keys from a JWKS URL (e.g. a Cognito user pool's
    /// `https://cognito-idp.{region}.amazonaws.com/{pool}/.well-known/jwks.json`).
    JwksUrl(String),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Never the secret.
            KeySource::Secret(_) => f.write_str("Secret(<redacted>)"),
            KeySource::JwksUrl(url) => f.debug_tuple("JwksUrl").field(url).finish(),
        }
    }
}

/// `ws-authorizer` (and `ws-handler`, for `auth` requests).
#[derive(Debug, Clone)]
pub struct AuthorizerConfig {
    pub keys: KeySource,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: u64,
}

impl AuthorizerConfig {
    pub const VARS: &'static [&'static str] = &[
        "BRIDGE_JWT_SECRET",
        "BRIDGE_JWKS_URL",
        "BRIDGE_JWT_ISSUER",
        "BRIDGE_JWT_AUDIENCE",
        "BRIDGE_JWT_LEEWAY",
    ];

    pub fn from_env(env: Lookup) -> Result<Self, ConfigError> {
        let keys = match (get(env, "BRIDGE_JWT_SECRET"), get(env, "BRIDGE_JWKS_URL")) {
            (Some(secret), None) => KeySource::Secret(secret),
            (None, Some(_)) => KeySource::JwksUrl(https_url(env, "BRIDGE_JWKS_URL")?),
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    name: "BRIDGE_JWKS_URL",
                    reason: "set either BRIDGE_JWT_SECRET or BRIDGE_JWKS_URL, not both".into(),
                })
            }
            (None, None) => return Err(ConfigError::Missing("BRIDGE_JWT_SECRET")),
        };
        Ok(AuthorizerConfig {
            keys,
            issuer: get(env, "BRIDGE_JWT_ISSUER"),
            audience: get(env, "BRIDGE_JWT_AUDIENCE"),
            leeway_secs: number(env, "BRIDGE_JWT_LEEWAY", 0, 0)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name: &str| map.get(name).cloned()
    }

    #[test]
    fn handler_defaults_and_errors() {
        let e = env(&[
            ("TABLE_NAME", "t"),
            (
                "WEBSOCKET_ENDPOINT",
                "https://x.execute-api.eu-west-1.amazonaws.com/prod/",
            ),
            ("BRIDGE_TOPIC_PREFIX", ""),
            ("BRIDGE_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
        ]);
        let c = HandlerConfig::from_env(&e).unwrap();
        assert!(c.auth.is_some());
        assert!(!format!("{c:?}").contains("0123456789abcdef"), "{c:?}");
        assert_eq!(
            c.websocket_endpoint,
            "https://x.execute-api.eu-west-1.amazonaws.com/prod"
        );
        assert_eq!(c.policy.max_subscriptions, 100);
        assert_eq!(c.connection_ttl_secs, DEFAULT_CONNECTION_TTL_SECS);
        let e = env(&[("WEBSOCKET_ENDPOINT", "https://x"), ("BRIDGE_AUTH", "off")]);
        assert_eq!(
            HandlerConfig::from_env(&e).unwrap_err(),
            ConfigError::Missing("TABLE_NAME")
        );
        // Auth on needs the keys, for `auth` requests.
        let e = env(&[("TABLE_NAME", "t"), ("WEBSOCKET_ENDPOINT", "https://x")]);
        assert_eq!(
            HandlerConfig::from_env(&e).unwrap_err(),
            ConfigError::Missing("BRIDGE_JWT_SECRET")
        );
        let e = env(&[
            ("TABLE_NAME", "t"),
            ("WEBSOCKET_ENDPOINT", "https://x"),
            ("BRIDGE_MAX_SUBSCRIPTIONS", "many"),
            ("BRIDGE_AUTH", "off"),
        ]);
        let err = HandlerConfig::from_env(&e).unwrap_err().to_string();
        assert!(err.contains("BRIDGE_MAX_SUBSCRIPTIONS"), "{err}");
        let e = env(&[
            ("TABLE_NAME", "t"),
            ("WEBSOCKET_ENDPOINT", "wss://x"),
            ("BRIDGE_AUTH", "off"),
        ]);
        assert!(HandlerConfig::from_env(&e).is_err());
        let e = env(&[
            ("TABLE_NAME", "t"),
            ("WEBSOCKET_ENDPOINT", "https://x"),
            ("BRIDGE_AUTH", "maybe"),
        ]);
        assert!(HandlerConfig::from_env(&e).is_err());
        let e = env(&[
            ("TABLE_NAME", "t"),
            ("WEBSOCKET_ENDPOINT", "https://x"),
            ("BRIDGE_RESERVED_CHANNELS", "$SYS/#, a/#/b"),
            ("BRIDGE_AUTH", "off"),
        ]);
        assert!(HandlerConfig::from_env(&e).is_err());
    }

    #[test]
    fn the_lookup_cache_age_is_bounded() {
        let base = [
            ("TABLE_NAME", "t"),
            ("WEBSOCKET_ENDPOINT", "https://x"),
            ("BRIDGE_AUTH", "off"),
        ];
        let with = |v: &str| {
            let mut vars = base.to_vec();
            vars.push(("BRIDGE_LOOKUP_CACHE_MS", v));
            env(&vars)
        };
        let c = FanoutConfig::from_env(&env(&base)).unwrap();
        assert_eq!(c.lookup_max_age, std::time::Duration::from_secs(1));
        let h = HandlerConfig::from_env(&with("250")).unwrap();
        assert_eq!(h.lookup_max_age, std::time::Duration::from_millis(250));
        assert!(FanoutConfig::from_env(&with("0"))
            .unwrap()
            .lookup_max_age
            .is_zero());
        for bad in ["10001", "-1", "soon"] {
            let err = FanoutConfig::from_env(&with(bad)).unwrap_err().to_string();
            assert!(err.contains("BRIDGE_LOOKUP_CACHE_MS"), "{bad}: {err}");
            assert!(HandlerConfig::from_env(&with(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn authorizer_keys() {
        let c = AuthorizerConfig::from_env(&env(&[("BRIDGE_JWT_SECRET", "s")])).unwrap();
        assert_eq!(c.keys, KeySource::Secret("s".into()));
        let c = AuthorizerConfig::from_env(&env(&[
            ("BRIDGE_JWT_SECRET", ""),
            ("BRIDGE_JWKS_URL", "https://idp/.well-known/jwks.json"),
        ]))
        .unwrap();
        assert!(matches!(c.keys, KeySource::JwksUrl(_)));
        assert!(AuthorizerConfig::from_env(&env(&[])).is_err());
        assert!(AuthorizerConfig::from_env(&env(&[
            ("BRIDGE_JWT_SECRET", "s"),
            ("BRIDGE_JWKS_URL", "https://idp")
        ]))
        .is_err());
    }
}
