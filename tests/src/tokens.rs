//! Test tokens: HS256 JWTs signed with a test secret, hostile ones, and the
//! clock their `exp`/`iat` claims are computed from.

use serde_json::Value;

/// Signs a test token with an HS256 secret.
pub fn hs256_token(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Tokens whose header is markup or terminal escapes: refused, their text
/// must reach neither the answer nor any log.
pub fn hostile_header_tokens() -> Vec<String> {
    use base64::Engine;
    let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    [
        r#"{"alg":"<script>alert(1)</script>","typ":"JWT"}"#,
        "\u{1b}[31mnot json at all",
    ]
    .iter()
    .map(|header| format!("{}.{}.sig", b64(header), b64(r#"{"exp":1}"#)))
    .collect()
}

/// Opens a WebSocket to `url` that the server must refuse, checks that the
/// refusal's body echoes nothing of a [`hostile_header_tokens`] header, and
/// returns its HTTP status.
pub async fn refused_without_echo(url: &str) -> u16 {
    let (status, body) = match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string(),
        ),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    };
    assert!(
        !body.contains("script") && !body.contains('\u{1b}'),
        "{body}"
    );
    status
}
