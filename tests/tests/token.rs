//! Token lifetime (PROTOCOL.md, v1.1): a token's `exp` holds for the
//! connection's whole life. At `exp` the server says `token_expired` and
//! closes with 4001 within a second; `auth` replaces the token before that,
//! within the rules; refusals never echo what was sent.

use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tests::{
    both_backends, both_backends_and_aws, hostile_header_tokens, hs256_token, now,
    refused_without_echo, Client, Frame, Opts, Setup,
};

const SECRET: &str = "token-tests-secret-0123456789abcdef";

fn secured() -> Opts {
    Opts::default().env("BRIDGE_JWT_SECRET", SECRET)
}

fn token(sub: &str, subscribe: &[&str], exp: u64) -> String {
    hs256_token(
        SECRET,
        json!({"sub": sub, "exp": exp, "channels": {"subscribe": subscribe, "publish": ["t/#"]}}),
    )
}

async fn connect(s: &Setup, token: &str) -> Client {
    Client::connect(&format!("{}?token={token}", s.bridge.ws_url())).await
}

/// Reads until the server closes: the frames before, and the close code.
async fn until_close(c: &mut Client, within: Duration) -> (Vec<Value>, Option<u16>) {
    let mut frames = Vec::new();
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_within(left).await {
            Some(Frame::Json(v)) => frames.push(v),
            Some(Frame::Close(code)) => return (frames, code),
            None => panic!("not closed within {within:?}; got {frames:?}"),
        }
    }
}

// Not on AWS: there the connection closes at its next frame or message, with
// API Gateway's code (aws_local.rs).
both_backends!(
    at_exp_the_connection_is_told_and_closed,
    secured(),
    |s: Setup| async move {
        let exp = now() + 2;
        let mut c = connect(&s, &token("u", &["a/#"], exp)).await;
        c.subscribe("a/b").await;
        let mut other = connect(&s, &token("v", &["a/#"], now() + 600)).await;
        other.subscribe("a/b").await;
        let (frames, code) = until_close(&mut c, Duration::from_secs(5)).await;
        let closed_at = now();
        assert_eq!(code, Some(4001));
        let last = frames.last().expect("told before the close");
        assert_eq!(last["type"], "error");
        assert_eq!(last["code"], "token_expired");
        assert!(closed_at <= exp + 1, "closed at {closed_at}, exp {exp}");
        // The other connection is untouched and the expired one holds nothing.
        let mut dev = s.device("d").await;
        dev.publish("a/b", "1", 1, false).await;
        assert_eq!(other.next_message().await["data"], json!(1));
        assert_eq!(s.bridge.metric("bridge_subscriptions").await, 1.0);
    }
);

both_backends_and_aws!(
    auth_keeps_a_connection_past_its_first_token,
    secured(),
    |s: Setup| async move {
        let mut c = connect(&s, &token("u", &["a/#"], now() + 2)).await;
        c.subscribe("a/b").await;
        // A fresh token before the end: acknowledged, and the connection lives on.
        let fresh = token("u", &["a/#", "b/#"], now() + 600);
        let reply = c.request(json!({"action":"auth","token":fresh})).await;
        assert_eq!(reply["type"], "ack", "{reply}");
        tokio::time::sleep(Duration::from_millis(3000)).await;
        c.assert_alive().await;
        // Its permissions are the new token's.
        c.subscribe("b/x").await;
        let mut dev = s.device("d").await;
        dev.publish("a/b", "1", 1, false).await;
        assert_eq!(c.next_message().await["data"], json!(1));
    }
);

both_backends_and_aws!(
    auth_refusals_change_nothing,
    secured(),
    |s: Setup| async move {
        let exp = now() + 600;
        let mut c = connect(&s, &token("u", &["fleet/#"], exp)).await;
        c.subscribe("fleet/+/t").await;
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let refused = [
            // Another subject, another key, expired, not a JWT, none at all.
            token("mallory", &["fleet/#"], exp),
            hs256_token(
                "another-secret-0123456789abcdef0123",
                json!({"sub":"u","exp":exp}),
            ),
            token("u", &["fleet/#"], now() - 10),
            "garbage".to_string(),
            format!(
                "{}.{}.sig",
                b64(r#"{"alg":"<script>x</script>"}"#),
                b64("{}")
            ),
        ];
        for t in &refused {
            let e = c
                .expect_error(json!({"action":"auth","token":t}), "unauthorized")
                .await;
            assert!(!e["message"].as_str().unwrap().contains("script"), "{e}");
        }
        c.expect_error(json!({"action":"auth"}), "unauthorized")
            .await;
        // A token that does not allow a held filter: forbidden.
        let narrower = token("u", &["other/#"], exp);
        c.expect_error(json!({"action":"auth","token":narrower}), "forbidden")
            .await;
        // Nothing changed: the old permissions and the old end hold.
        c.subscribe("fleet/x/y").await;
        c.expect_error(
            json!({"action":"subscribe","channel":"other/1"}),
            "forbidden",
        )
        .await;
        let logs = s.bridge.logs();
        assert!(!logs.contains("<script>"), "{logs}");
    }
);

both_backends_and_aws!(with_auth_off_auth_is_acknowledged, |s: Setup| async move {
    let mut c = s.client().await;
    let reply = c.request(json!({"action":"auth","token":"anything"})).await;
    assert_eq!(reply["type"], "ack");
    c.subscribe("x").await;
});

/// A token whose header is text an attacker chose: neither the 401 body
/// nor the logs echo it.
// On AWS (a 403, the authorizer's Deny): aws_local.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_header_is_not_echoed() {
    let s = Setup::with(tests::Backend::Embedded, secured());
    for t in hostile_header_tokens() {
        let url = format!("{}?token={t}", s.bridge.ws_url());
        assert_eq!(refused_without_echo(&url).await, 401);
    }
    let logs = s.bridge.logs();
    assert!(!logs.contains("script") && !logs.contains("[31m"), "{logs}");
}

/// HS256 needs a secret of at least 32 bytes (RFC 7518 §3.2): a short one
/// is refused at start, with what to do.
#[test]
fn a_short_hs256_secret_is_refused_at_start() {
    let out = Command::new(tests::bridge_bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args([
            "--embedded-broker",
            &format!("127.0.0.1:{}", tests::free_port()),
        ])
        .env("BRIDGE_JWT_SECRET", "hunter2hunter2")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least 32"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "the secret is not echoed: {stderr}"
    );
}
