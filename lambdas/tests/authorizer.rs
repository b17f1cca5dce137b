//! `ws-authorizer` in-process with the REQUEST authorizer event API Gateway
//! sends for `$connect`: HS256 secrets, and ES256 keys from a JWKS URL served
//! by the test.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use base64::Engine;
use bridge::permissions::Permissions;
use lambdas::authorizer::{Authorizer, Unauthorized};
use lambdas::config::AuthorizerConfig;
use serde_json::{json, Value};
use support::*;

const SECRET: &str = "test-secret-0123456789-0123456789ab";
const ARN: &str = "arn:aws:execute-api:us-east-1:123456789012:abcd1234/test/$connect";

fn hs256() -> Authorizer {
    let env = env_lookup(&[("BRIDGE_JWT_SECRET", SECRET)]);
    Authorizer::new(&AuthorizerConfig::from_env(&env).unwrap()).unwrap()
}

async fn authorize(a: &Authorizer, event: Value) -> Result<Value, Unauthorized> {
    let event = serde_json::from_value(event).expect("the authorizer event parses");
    a.handle(event)
        .await
        .map(|r| serde_json::to_value(r).unwrap())
}

fn effect(r: &Value) -> &str {
    r["policyDocument"]["Statement"][0]["Effect"]
        .as_str()
        .unwrap()
}

fn context_perms(r: &Value) -> Permissions {
    serde_json::from_str(r["context"]["permissions"].as_str().expect("a JSON string")).unwrap()
}

#[tokio::test]
async fn a_good_token_is_allowed_with_its_permissions_in_the_context() {
    let a = hs256();
    let token = hs256_token(
        SECRET,
        json!({"sub":"user-42","exp":now_secs()+600,
               "channels":{"subscribe":["fleet/+/telemetry","users/{sub}/#"],"publish":["fleet/+/commands"]}}),
    );
    for event in [
        authorizer_event(Some(&token), None),
        authorizer_event(None, Some(&format!("Bearer {token}"))),
    ] {
        let r = authorize(&a, event).await.unwrap();
        assert_eq!(effect(&r), "Allow");
        assert_eq!(r["principalId"], "user-42");
        assert_eq!(r["policyDocument"]["Version"], "2012-10-17");
        assert_eq!(
            r["policyDocument"]["Statement"][0]["Action"],
            json!(["execute-api:Invoke"])
        );
        assert_eq!(
            r["policyDocument"]["Statement"][0]["Resource"],
            json!([ARN])
        );
        // Only strings, numbers and booleans: API Gateway answers 500 otherwise.
        for (_, v) in r["context"].as_object().unwrap() {
            assert!(v.is_string() || v.is_number() || v.is_boolean(), "{v}");
        }
        // The token's end goes with the connection (as a string).
        assert_eq!(
            r["context"]["expires"]
                .as_str()
                .and_then(|e| e.parse::<i64>().ok()),
            Some(token_exp(&token))
        );
        let p = context_perms(&r);
        assert!(p.can_subscribe("users/user-42/inbox"));
        assert!(p.can_subscribe("fleet/d1/telemetry"));
        assert!(!p.can_subscribe("fleet/#"));
        assert!(p.can_publish("fleet/d1/commands"));
    }
}

#[tokio::test]
async fn no_token_is_unauthorized_and_bad_tokens_are_denied() {
    let a = hs256();
    let err = authorize(&a, authorizer_event(None, None))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Unauthorized",
        "API Gateway needs this exact message for a 401"
    );
    assert!(authorize(&a, authorizer_event(Some(""), Some("Basic abc")))
        .await
        .is_err());

    let now = now_secs();
    let forged = hs256_token(
        "another-secret",
        json!({"sub":"x","exp":now+600,"channels":{"subscribe":["#"]}}),
    );
    let expired = hs256_token(SECRET, json!({"sub":"x","exp":now-60}));
    let no_exp = hs256_token(SECRET, json!({"sub":"x"}));
    // alg "none": header {"alg":"none"}, no signature.
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(format!(
            r##"{{"sub":"x","exp":{},"channels":{{"subscribe":["#"]}}}}"##,
            now + 600
        ))
    );
    for token in [forged, expired, no_exp, none, "garbage".to_string()] {
        let r = authorize(&a, authorizer_event(Some(&token), None))
            .await
            .unwrap();
        assert_eq!(effect(&r), "Deny", "{token}");
        assert_eq!(r["principalId"], "anonymous");
        assert!(r["context"].as_object().is_none_or(|c| c.is_empty()));
    }
}

#[tokio::test]
async fn a_crafted_subject_cannot_widen_a_pattern() {
    let a = hs256();
    for sub in ["#", "+", "a/b"] {
        let token = hs256_token(
            SECRET,
            json!({"sub":sub,"exp":now_secs()+600,"channels":{"subscribe":["users/{sub}/#"]}}),
        );
        let r = authorize(&a, authorizer_event(Some(&token), None))
            .await
            .unwrap();
        let p = context_perms(&r);
        assert!(!p.can_subscribe("users/x/y"), "{sub}");
        assert!(!p.can_subscribe("users/+/y"), "{sub}");
    }
}

#[tokio::test]
async fn permissions_over_the_context_limit_are_denied() {
    let a = hs256();
    let many: Vec<String> = (0..400)
        .map(|i| format!("some/long/channel/name/{i}/#"))
        .collect();
    let token = hs256_token(
        SECRET,
        json!({"sub":"big","exp":now_secs()+600,"channels":{"subscribe":many}}),
    );
    let r = authorize(&a, authorizer_event(Some(&token), None))
        .await
        .unwrap();
    assert_eq!(effect(&r), "Deny");
}

/// The `exp` claim of a token (read without checking it).
fn token_exp(token: &str) -> i64 {
    let claims = token.split('.').nth(1).unwrap();
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .unwrap();
    serde_json::from_slice::<Value>(&claims).unwrap()["exp"]
        .as_i64()
        .unwrap()
}

#[test]
fn the_whole_response_must_fit_in_8_kb_not_only_the_context() {
    use bridge::auth::Credentials;
    use lambdas::authorizer::{allow, MAX_RESPONSE_BYTES};
    // Grow the permissions until the context alone is just under 8 KB: the
    // policy around it then takes the response over the limit.
    let mut filters: Vec<String> = Vec::new();
    let credentials = |filters: &Vec<String>| Credentials {
        perms: perms(
            "big",
            &filters.iter().map(String::as_str).collect::<Vec<_>>(),
            &[],
        ),
        expires_at: Some(now_secs() as u64 + 600),
    };
    loop {
        filters.push(format!("c/{:04}", filters.len()));
        let c = credentials(&filters);
        let context_len = json!({
            "permissions": serde_json::to_string(&c.perms).unwrap(),
            "expires": c.expires_at.unwrap().to_string(),
            "sub": "big",
        })
        .to_string()
        .len();
        if context_len > MAX_RESPONSE_BYTES - 100 {
            assert!(context_len <= MAX_RESPONSE_BYTES);
            assert!(allow(&c, ARN).is_none(), "over 8 KB in all must be denied");
            break;
        }
        let r = allow(&c, ARN);
        if let Some(r) = r {
            assert!(serde_json::to_string(&r).unwrap().len() <= MAX_RESPONSE_BYTES);
        }
    }
}

/// A JWKS endpoint served by the test, counting downloads.
struct Jwks {
    url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
}

async fn serve_jwks() -> Jwks {
    let keys: Arc<Mutex<Vec<Value>>> = Arc::default();
    let fetches: Arc<AtomicUsize> = Arc::default();
    let (k, f) = (keys.clone(), fetches.clone());
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let (k, f) = (k.clone(), f.clone());
            async move {
                f.fetch_add(1, Ordering::SeqCst);
                axum::Json(json!({"keys": *k.lock().unwrap()}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Jwks {
        url: format!("http://{addr}/.well-known/jwks.json"),
        keys,
        fetches,
    }
}

/// A fresh ES256 key: (its JWK, a signing key).
fn es256_key(kid: &str) -> (Value, jsonwebtoken::EncodingKey) {
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pair.public_key().as_ref();
    assert_eq!(point.len(), 65);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwk = json!({"kty":"EC","crv":"P-256","alg":"ES256","use":"sig","kid":kid,
                     "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..])});
    (jwk, jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()))
}

fn es256_token(kid: &str, key: &jsonwebtoken::EncodingKey, claims: Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn jwks_authorizer(url: &str, extra: &[(&str, &str)]) -> Authorizer {
    let mut vars = vec![("BRIDGE_JWKS_URL", url)];
    vars.extend_from_slice(extra);
    let env = env_lookup(&vars);
    Authorizer::new(&AuthorizerConfig::from_env(&env).unwrap()).unwrap()
}

#[tokio::test]
async fn jwks_keys_are_cached_and_reread_for_a_new_key() {
    let jwks = serve_jwks().await;
    let (jwk1, key1) = es256_key("k1");
    jwks.keys.lock().unwrap().push(jwk1);
    let a = jwks_authorizer(&jwks.url, &[("BRIDGE_JWT_ISSUER", "https://idp.example")])
        .with_refresh(Duration::from_secs(3600), Duration::from_millis(200));
    let claims = json!({"sub":"u","exp":now_secs()+600,"iss":"https://idp.example","channels":{"subscribe":["a/#"]}});
    for _ in 0..3 {
        let r = authorize(
            &a,
            authorizer_event(Some(&es256_token("k1", &key1, claims.clone())), None),
        )
        .await
        .unwrap();
        assert_eq!(effect(&r), "Allow");
        assert!(context_perms(&r).can_subscribe("a/b"));
    }
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        1,
        "downloaded once, kept across invocations"
    );

    // Wrong issuer, and an HS256 token against RS/ES keys: denied.
    let wrong_iss = json!({"sub":"u","exp":now_secs()+600,"iss":"https://evil.example"});
    let r = authorize(
        &a,
        authorizer_event(Some(&es256_token("k1", &key1, wrong_iss)), None),
    )
    .await
    .unwrap();
    assert_eq!(effect(&r), "Deny");
    let hs = hs256_token(
        "k1",
        json!({"sub":"u","exp":now_secs()+600,"iss":"https://idp.example"}),
    );
    let r = authorize(&a, authorizer_event(Some(&hs), None))
        .await
        .unwrap();
    assert_eq!(effect(&r), "Deny");

    // The identity provider rotates its keys: a token with the new kid
    // prompts one new download (not sooner than the minimum interval).
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (jwk2, key2) = es256_key("k2");
    jwks.keys.lock().unwrap().push(jwk2);
    let before = jwks.fetches.load(Ordering::SeqCst);
    let r = authorize(
        &a,
        authorizer_event(Some(&es256_token("k2", &key2, claims.clone())), None),
    )
    .await
    .unwrap();
    assert_eq!(effect(&r), "Allow");
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), before + 1);
    // An unknown kid right after a download: denied without hammering the IdP.
    let (_, key3) = es256_key("k3");
    let r = authorize(
        &a,
        authorizer_event(Some(&es256_token("k3", &key3, claims)), None),
    )
    .await
    .unwrap();
    assert_eq!(effect(&r), "Deny");
    assert_eq!(jwks.fetches.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn an_unreachable_jwks_fails_closed() {
    // A port nothing listens on.
    let url = format!("http://127.0.0.1:{}/.well-known/jwks.json", free_port());
    let a = jwks_authorizer(&url, &[]);
    let (_, key) = es256_key("k1");
    let token = es256_token("k1", &key, json!({"sub":"u","exp":now_secs()+600}));
    let r = authorize(&a, authorizer_event(Some(&token), None))
        .await
        .unwrap();
    assert_eq!(effect(&r), "Deny");
}
