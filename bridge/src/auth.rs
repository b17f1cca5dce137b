//! Token verification: a JWT becomes a connection's [`Permissions`].
//!
//! HS256 with a shared secret (`BRIDGE_JWT_SECRET`), or RS256 / ES256 with the
//! public keys of a JWKS document (a file for `bridge serve`, a URL such as a
//! Cognito user pool's for the Lambda authorizer). Each key only accepts its
//! own algorithm, so a token cannot pick a weaker one. `exp` is required.
//! Tokens are never logged; errors say what was wrong, not what was sent.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::permissions::{ChannelsClaim, Permissions};

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no token: pass ?token=... or an Authorization: Bearer header")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(String),
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
    #[error("not a JWKS document: {0}")]
    Parse(String),
    #[error("the key set has no RS256 or ES256 (P-256) key")]
    NoUsableKey,
}

impl Verifier {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8], settings: AuthSettings) -> Result<Self, KeyError> {
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

    /// Checks a token and returns the permissions its claims grant.
    pub fn verify(&self, token: &str) -> Result<Permissions, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid.as_str())),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
        .ok_or(AuthError::UnknownKey)?;
        if header.alg != key.alg {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted (expected {:?})",
                header.alg, key.alg
            )));
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
        let data = decode::<Claims>(token, &key.key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            }
        })?;
        Ok(Permissions::from_claims(
            data.claims.sub.as_deref(),
            &data.claims.channels,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

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
        let v = Verifier::hs256(b"s3cret", AuthSettings::default()).unwrap();
        assert!(Verifier::hs256(b"", AuthSettings::default()).is_err());
        let t = token(
            b"s3cret",
            json!({"sub":"u1","exp":now()+60,"channels":{"subscribe":["users/{sub}/#"]}}),
        );
        let p = v.verify(&t).unwrap();
        assert!(p.can_subscribe("users/u1/x"));
        assert!(!p.can_publish("users/u1/x"));
        assert_eq!(v.verify(""), Err(AuthError::Missing));
        assert!(matches!(v.verify("abc"), Err(AuthError::Invalid(_))));
        let wrong = token(b"other", json!({"exp":now()+60}));
        assert!(matches!(v.verify(&wrong), Err(AuthError::Invalid(_))));
        let expired = token(b"s3cret", json!({"exp":now()-10}));
        assert_eq!(v.verify(&expired), Err(AuthError::Expired));
        let no_exp = token(b"s3cret", json!({"sub":"x"}));
        assert!(matches!(v.verify(&no_exp), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn audience_and_issuer() {
        let settings = AuthSettings {
            leeway_secs: 0,
            issuer: Some("me".into()),
            audience: Some("bridge".into()),
        };
        let v = Verifier::hs256(b"k", settings).unwrap();
        let good = token(b"k", json!({"exp":now()+60,"iss":"me","aud":"bridge"}));
        assert!(v.verify(&good).is_ok());
        let bad = token(b"k", json!({"exp":now()+60,"iss":"you","aud":"bridge"}));
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
