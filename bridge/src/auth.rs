//! Token verification: a JWT becomes a connection's [`Permissions`].
//!
//! HS256 with a shared secret (`BRIDGE_JWT_SECRET`), or RS256 / ES256 with the
//! public keys of a JWKS document (a file for `bridge serve`, a URL such as a
//! Cognito user pool's for the Lambda authorizer). Each key only accepts its
//! own algorithm, so a token cannot pick a weaker one. `exp` is required and
//! holds for the connection's whole life ([`Credentials::expires_at`]).
//! Tokens are never logged; errors say what was wrong in fixed words, never
//! echoing what was sent (a token's text could end up in logs or a 401 body).

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::permissions::{ChannelsClaim, Permissions};

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no token: pass ?token=... or an Authorization: Bearer header")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(&'static str),
    #[error("no key in the key set matches the token")]
    UnknownKey,
}

/// The token a handshake presents: `?token=` when given and not empty (what
/// browsers can send), else an `Authorization: Bearer` header's. Both
/// deployments take it this way.
pub fn presented<'a>(
    query_token: Option<&'a str>,
    authorization: Option<&'a str>,
) -> Option<&'a str> {
    if let Some(t) = query_token.filter(|t| !t.is_empty()) {
        return Some(t);
    }
    let (scheme, token) = authorization?.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Shortest HS256 secret accepted: RFC 7518 §3.2 requires a key at least as
/// long as the hash output (256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// What a verified token grants a connection, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub perms: Permissions,
    /// Seconds since the Unix epoch at which the connection's token stops
    /// holding: its `exp` plus the deployment's leeway. `None` with auth off.
    pub expires_at: Option<u64>,
}

impl Credentials {
    /// Auth off: everything (but reserved channels), for ever.
    pub fn anonymous() -> Self {
        Credentials {
            perms: Permissions::allow_all(),
            expires_at: None,
        }
    }

    /// Whether the token has expired at `now` (seconds since the epoch).
    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Claim checks besides the signature.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Required (the validation checks it is there and in the future).
    exp: f64,
    #[serde(default)]
    channels: ChannelsClaim,
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies tokens against one secret or a set of public keys.
pub struct Verifier {
    keys: Vec<Key>,
    settings: AuthSettings,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// Key material that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the JWT secret is empty")]
    EmptySecret,
    #[error(
        "the JWT secret is {0} bytes; HS256 needs at least {MIN_SECRET_BYTES} \
         (e.g. `openssl rand -hex 32`)"
    )]
    WeakSecret(usize),
    #[error("not a JWKS document: {0}")]
    Parse(String),
    #[error("the key set has no RS256 or ES256 (P-256) key")]
    NoUsableKey,
}

impl Verifier {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8], settings: AuthSettings) -> Result<Self, KeyError> {
        if secret.is_empty() {
            return Err(KeyError::EmptySecret);
        }
        if secret.len() < MIN_SECRET_BYTES {
            return Err(KeyError::WeakSecret(secret.len()));
        }
        let key = DecodingKey::from_secret(secret).map_err(|_| KeyError::EmptySecret)?;
        let key = Key {
            kid: None,
            alg: Algorithm::HS256,
            key,
        };
        Ok(Verifier {
            keys: vec![key],
            settings,
        })
    }

    /// RS256 / ES256 public keys from a JWKS JSON document.
    pub fn from_jwks_json(json: &str, settings: AuthSettings) -> Result<Self, KeyError> {
        let set: JwkSet = serde_json::from_str(json).map_err(|e| KeyError::Parse(e.to_string()))?;
        Self::from_jwk_set(&set, settings)
    }

    /// RS256 / ES256 public keys from a parsed key set; other keys are skipped.
    pub fn from_jwk_set(set: &JwkSet, settings: AuthSettings) -> Result<Self, KeyError> {
        let keys: Vec<Key> =
            set.keys
                .iter()
                .filter_map(|jwk| {
                    let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
                        (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => {
                            Algorithm::RS256
                        }
                        (
                            AlgorithmParameters::EllipticCurve(ec),
                            None | Some(KeyAlgorithm::ES256),
                        ) if ec.curve == EllipticCurve::P256 => Algorithm::ES256,
                        _ => return None,
                    };
                    let key = DecodingKey::from_jwk(jwk).ok()?;
                    Some(Key {
                        kid: jwk.common.key_id.clone(),
                        alg,
                        key,
                    })
                })
                .collect();
        if keys.is_empty() {
            return Err(KeyError::NoUsableKey);
        }
        Ok(Verifier { keys, settings })
    }

    /// Whether this key set has the key `token` names (by `kid`; a token
    /// without one needs a set of one key). Unreadable tokens: false.
    pub fn has_key_for(&self, token: &str) -> bool {
        match decode_header(token) {
            Ok(header) => self.key_for(header.kid.as_deref()).is_some(),
            Err(_) => false,
        }
    }

    fn key_for(&self, kid: Option<&str>) -> Option<&Key> {
        match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
    }

    /// Checks a token and returns what its claims grant, until when.
    pub fn verify(&self, token: &str) -> Result<Credentials, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header =
            decode_header(token).map_err(|_| AuthError::Invalid("malformed token header"))?;
        let key = self
            .key_for(header.kid.as_deref())
            .ok_or(AuthError::UnknownKey)?;
        if header.alg != key.alg {
            return Err(AuthError::Invalid("the token's algorithm is not accepted"));
        }
        let mut validation = Validation::new(key.alg);
        validation.leeway = self.settings.leeway_secs;
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_nbf = true;
        match &self.settings.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.settings.issuer {
            validation.set_issuer(&[iss]);
        }
        let data = decode::<Claims>(token, &key.key, &validation).map_err(|e| refusal(&e))?;
        let claims = data.claims;
        let credentials = Credentials {
            perms: Permissions::from_claims(claims.sub.as_deref(), &claims.channels),
            expires_at: Some(
                (claims.exp.max(0.0) as u64).saturating_add(self.settings.leeway_secs),
            ),
        };
        // jsonwebtoken still accepts a token in the second of its `exp`; a
        // connection ends at that second, so the handshake refuses it too.
        if credentials.expired(now_secs()) {
            return Err(AuthError::Expired);
        }
        Ok(credentials)
    }
}

/// A refusal in fixed words: jsonwebtoken's messages may quote the token.
fn refusal(e: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    AuthError::Invalid(match e.kind() {
        ErrorKind::ExpiredSignature => return AuthError::Expired,
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::ImmatureSignature => "not valid yet (nbf)",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::MissingRequiredClaim(_) => "a required claim (exp, iss or aud) is missing",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "the token's algorithm is not accepted"
        }
        ErrorKind::Json(_) => "malformed claims",
        _ => "malformed token",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn hs256() {
        let v = Verifier::hs256(SECRET, AuthSettings::default()).unwrap();
        assert!(matches!(
            Verifier::hs256(b"", AuthSettings::default()),
            Err(KeyError::EmptySecret)
        ));
        assert!(matches!(
            Verifier::hs256(&SECRET[..31], AuthSettings::default()),
            Err(KeyError::WeakSecret(31))
        ));
        let exp = now() + 60;
        let t = token(
            SECRET,
            json!({"sub":"u1","exp":exp,"channels":{"subscribe":["users/{sub}/#"]}}),
        );
        let c = v.verify(&t).unwrap();
        assert_eq!(c.expires_at, Some(exp));
        assert!(!c.expired(exp - 1) && c.expired(exp));
        assert!(c.perms.can_subscribe("users/u1/x"));
        assert!(!c.perms.can_publish("users/u1/x"));
        assert_eq!(v.verify(""), Err(AuthError::Missing));
        assert!(matches!(v.verify("abc"), Err(AuthError::Invalid(_))));
        let wrong = token(b"another-secret-another-secret-xx", json!({"exp":now()+60}));
        assert_eq!(v.verify(&wrong), Err(AuthError::Invalid("bad signature")));
        let expired = token(SECRET, json!({"exp":now()-10}));
        assert_eq!(v.verify(&expired), Err(AuthError::Expired));
        // In the second of its `exp`, a token no longer opens a connection
        // that would end at once.
        let ending = token(SECRET, json!({"exp":now()}));
        assert_eq!(v.verify(&ending), Err(AuthError::Expired));
        let no_exp = token(SECRET, json!({"sub":"x"}));
        assert!(matches!(v.verify(&no_exp), Err(AuthError::Invalid(_))));
        // The leeway moves the end of the connection too.
        let lenient = AuthSettings {
            leeway_secs: 30,
            ..AuthSettings::default()
        };
        let v = Verifier::hs256(SECRET, lenient).unwrap();
        assert_eq!(v.verify(&t).unwrap().expires_at, Some(exp + 30));
    }

    #[test]
    fn refusals_never_quote_the_token() {
        let v = Verifier::hs256(SECRET, AuthSettings::default()).unwrap();
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for header in [
            r#"{"alg":"<script>alert(1)</script>","typ":"JWT"}"#,
            r#"{"alg":"HS256","kid":"\u001b[31mred"}"#,
            "<b>not json</b>",
        ] {
            let t = format!("{}.{}.sig", b64(header), b64(r#"{"exp":1}"#));
            let e = v.verify(&t).unwrap_err().to_string();
            assert!(
                !e.contains('<') && !e.contains("script") && !e.contains("red"),
                "{e}"
            );
        }
        let claims = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"HS256"}"#),
            b64(r#"{"exp":"<i>soon</i>"}"#)
        );
        let e = v.verify(&claims).unwrap_err().to_string();
        assert!(!e.contains("soon"), "{e}");
    }

    #[test]
    fn audience_and_issuer() {
        let settings = AuthSettings {
            leeway_secs: 0,
            issuer: Some("me".into()),
            audience: Some("bridge".into()),
        };
        let v = Verifier::hs256(SECRET, settings).unwrap();
        let good = token(SECRET, json!({"exp":now()+60,"iss":"me","aud":"bridge"}));
        assert!(v.verify(&good).is_ok());
        let bad = token(SECRET, json!({"exp":now()+60,"iss":"you","aud":"bridge"}));
        assert!(v.verify(&bad).is_err());
    }

    #[test]
    fn presented_token() {
        assert_eq!(presented(Some("q"), Some("Bearer h")), Some("q"));
        assert_eq!(presented(Some(""), Some("Bearer h")), Some("h"));
        assert_eq!(presented(None, Some("bearer  h ")), Some("h"));
        assert_eq!(presented(None, Some("Basic h")), None);
        assert_eq!(presented(None, Some("Bearer ")), None);
        assert_eq!(presented(None, None), None);
    }

    #[test]
    fn jwks_without_usable_keys() {
        assert!(matches!(
            Verifier::from_jwks_json(r#"{"keys":[]}"#, AuthSettings::default()),
            Err(KeyError::NoUsableKey)
        ));
        assert!(Verifier::from_jwks_json("nope", AuthSettings::default()).is_err());
    }
}
