//! Auth and permissions: tokens are checked at the handshake (401, never an
//! accepted-then-closed socket), and the `channels` claim decides what a
//! connection may subscribe to and publish to.

use std::process::Command;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tests::{hs256_token, now, Backend, Client, Opts, Setup};

const SECRET: &str = "test-secret-please-ignore-0123456789";

fn secured(backend: Backend) -> Setup {
    Setup::with(backend, Opts::default().env("BRIDGE_JWT_SECRET", SECRET))
}

fn claims() -> Value {
    json!({
        "sub": "user-42",
        "exp": now() + 600,
        "channels": {
            "subscribe": ["fleet/+/telemetry", "users/{sub}/#"],
            "publish": ["fleet/+/commands", "users/{sub}/outbox"]
        }
    })
}

async fn refused(url: &str, bearer: Option<&str>) {
    match Client::try_connect(url, bearer).await {
        Err(e) => assert_eq!(e, "HTTP 401"),
        Ok(_) => panic!("connect to {url} should be refused at the handshake"),
    }
}

// Not on AWS: a bad token gets the authorizer's Deny, 403 (aws_local.rs).
async fn handshake(backend: Backend) {
    let s = secured(backend);
    let url = s.bridge.ws_url();
    refused(&url, None).await;
    refused(&format!("{url}?token="), None).await;
    refused(&format!("{url}?token=not.a.jwt"), None).await;
    refused(&url, Some("garbage")).await;
    let wrong_key = hs256_token("another-secret", claims());
    refused(&format!("{url}?token={wrong_key}"), None).await;
    let mut expired = claims();
    expired["exp"] = json!(now() - 60);
    let expired = hs256_token(SECRET, expired);
    refused(&format!("{url}?token={expired}"), None).await;
    let mut no_exp = claims();
    no_exp.as_object_mut().unwrap().remove("exp");
    refused(
        &format!("{url}?token={}", hs256_token(SECRET, no_exp)),
        None,
    )
    .await;
    let mut future = claims();
    future["nbf"] = json!(now() + 3600);
    refused(
        &format!("{url}?token={}", hs256_token(SECRET, future)),
        None,
    )
    .await;

    let good = hs256_token(SECRET, claims());
    let mut c = Client::connect(&format!("{url}?token={good}")).await;
    c.assert_alive().await;
    let mut c = Client::try_connect(&url, Some(&good)).await.unwrap();
    c.assert_alive().await;
    // Tokens never reach the logs.
    let logs = s.bridge.logs();
    assert!(logs.contains("refused"), "refusals are logged:\n{logs}");
    for t in [&good, &expired, &wrong_key] {
        assert!(!logs.contains(t.as_str()), "a token was logged:\n{logs}");
    }
    let (_, metrics) = tests::http_get(&s.bridge.http("/metrics")).await;
    assert!(
        metrics.contains("bridge_auth_rejected_total 8"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_embedded() {
    handshake(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_mosquitto() {
    handshake(Backend::Mosquitto).await;
}

async fn permissions(backend: Backend) {
    let s = secured(backend);
    let token = hs256_token(SECRET, claims());
    let mut c = Client::try_connect(&s.bridge.ws_url(), Some(&token))
        .await
        .unwrap();
    // Subscribe: allowed when one allowed filter covers the request.
    c.subscribe("fleet/dev-1/telemetry").await;
    c.subscribe("fleet/+/telemetry").await;
    c.subscribe("users/user-42/#").await;
    c.subscribe("users/user-42/inbox").await;
    for escalation in [
        "fleet/#",
        "#",
        "+/+/telemetry",
        "fleet/+/+",
        "users/+/inbox",
        "users/user-43/inbox",
        "users/#",
    ] {
        c.expect_error(
            json!({"action":"subscribe","channel":escalation}),
            "forbidden",
        )
        .await;
    }
    // Publish: allowed when the topic matches an allowed publish filter.
    let mut dev = s.device("dev-1").await;
    dev.subscribe("#").await;
    c.publish("fleet/dev-1/commands", json!({"reboot":true}))
        .await;
    assert_eq!(dev.next_publish().await.topic, "fleet/dev-1/commands");
    c.publish("users/user-42/outbox", json!(1)).await;
    assert_eq!(dev.next_publish().await.topic, "users/user-42/outbox");
    // Its own message, through users/user-42/#.
    assert_eq!(c.next_message().await["channel"], "users/user-42/outbox");
    for denied in [
        "fleet/dev-1/telemetry",
        "users/user-43/outbox",
        "users/user-42/inbox",
        "other",
    ] {
        c.expect_error(
            json!({"action":"publish","channel":denied,"data":1}),
            "forbidden",
        )
        .await;
    }
    dev.expect_silence().await;
    // A refused subscription delivers nothing.
    dev.publish("fleet/x/status", "1", 1, false).await;
    dev.publish("fleet/dev-1/telemetry", "2", 1, false).await;
    let m = c.next_message().await;
    assert_eq!(m["channel"], "fleet/dev-1/telemetry");
    c.expect_silence().await;

    // A subject that is not a plain level cannot widen `{sub}`.
    let mut sneaky = claims();
    sneaky["sub"] = json!("#");
    let token = hs256_token(SECRET, sneaky);
    let mut c = Client::try_connect(&s.bridge.ws_url(), Some(&token))
        .await
        .unwrap();
    for f in ["users/#", "users/x/y", "users/+/#"] {
        c.expect_error(json!({"action":"subscribe","channel":f}), "forbidden")
            .await;
    }
    // No channels claim: nothing is allowed.
    let token = hs256_token(SECRET, json!({"sub":"x","exp":now()+60}));
    let mut c = Client::try_connect(&s.bridge.ws_url(), Some(&token))
        .await
        .unwrap();
    c.expect_error(json!({"action":"subscribe","channel":"a"}), "forbidden")
        .await;
    c.expect_error(
        json!({"action":"publish","channel":"a","data":1}),
        "forbidden",
    )
    .await;
    c.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_embedded() {
    permissions(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_mosquitto() {
    permissions(Backend::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_aws_local() {
    Setup::warm_up(&[Backend::AwsLocal]);
    permissions(Backend::AwsLocal).await;
}

/// Generates a key with openssl and returns (PKCS#8 PEM, its public JWK).
fn keypair(dir: &std::path::Path, alg: Algorithm, kid: &str) -> (EncodingKey, Jwk) {
    let pem = dir.join(format!("{kid}.pem"));
    let gen = match alg {
        Algorithm::RS256 => vec![
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        Algorithm::ES256 => vec![
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
        _ => unreachable!(),
    };
    let pem_name = format!("{kid}.pem");
    tests::openssl(dir, &[&gen[..], &["-out", &pem_name]].concat());
    let bytes = std::fs::read(&pem).unwrap();
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&bytes).unwrap(),
        _ => EncodingKey::from_ec_pem(&bytes).unwrap(),
    };
    let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    (key, jwk)
}

fn sign(key: &EncodingKey, alg: Algorithm, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// Serves `body` as JSON to every request on a free port (a JWKS endpoint
/// for aws-local's authorizer); its URL.
async fn serve_json(body: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(answer.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/.well-known/jwks.json")
}

/// RS256 and ES256 tokens checked against a JWKS: the bridge reads it from
/// a file (`--jwks`), the AWS deployment's authorizer from a URL
/// (`BRIDGE_JWKS_URL`), and refuses a bad token with its Deny, 403.
async fn jwks_rs256_and_es256(backend: Backend) {
    let dir = std::env::temp_dir().join(format!("bridge-jwks-{}-{backend:?}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (rsa, rsa_jwk) = keypair(&dir, Algorithm::RS256, "rsa-1");
    let (ec, ec_jwk) = keypair(&dir, Algorithm::ES256, "ec-1");
    let (other, _) = keypair(&dir, Algorithm::RS256, "rsa-unknown");
    let jwks = serde_json::to_string(&JwkSet {
        keys: vec![rsa_jwk, ec_jwk],
    })
    .unwrap();
    let (opts, refusal) = match backend {
        Backend::AwsLocal => (
            Opts::default().env("BRIDGE_JWKS_URL", &serve_json(jwks).await),
            "HTTP 403",
        ),
        _ => {
            let file = dir.join("jwks.json");
            std::fs::write(&file, jwks).unwrap();
            (
                Opts::default().arg("--jwks").arg(file.to_str().unwrap()),
                "HTTP 401",
            )
        }
    };
    let s = Setup::with(backend, opts);
    let url = s.bridge.ws_url();
    let c = claims();
    for token in [
        sign(&rsa, Algorithm::RS256, "rsa-1", &c),
        sign(&ec, Algorithm::ES256, "ec-1", &c),
    ] {
        let mut client = Client::try_connect(&url, Some(&token)).await.unwrap();
        client.subscribe("users/user-42/x").await;
        client
            .expect_error(
                json!({"action":"subscribe","channel":"fleet/#"}),
                "forbidden",
            )
            .await;
    }
    // Unknown key, a key posing under another's kid, HS256 against public keys.
    let mut expired = c.clone();
    expired["exp"] = json!(now() - 60);
    for bad in [
        sign(&other, Algorithm::RS256, "rsa-unknown", &c),
        sign(&other, Algorithm::RS256, "rsa-1", &c),
        sign(&rsa, Algorithm::RS256, "ec-1", &c),
        hs256_token(SECRET, c.clone()),
        sign(&rsa, Algorithm::RS256, "rsa-1", &expired),
    ] {
        match Client::try_connect(&url, Some(&bad)).await {
            Err(e) => assert_eq!(e, refusal),
            Ok(_) => panic!("connect to {url} should be refused at the handshake"),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rs256_and_es256_embedded() {
    jwks_rs256_and_es256(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rs256_and_es256_aws_local() {
    Setup::warm_up(&[Backend::AwsLocal]);
    jwks_rs256_and_es256(Backend::AwsLocal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_off_beyond_loopback_warns() {
    let port = tests::free_port();
    let mut cmd = Command::new(tests::bridge_bin());
    cmd.args([
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--embedded-broker",
        &format!("127.0.0.1:{port}"),
    ]);
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("auth is off"))
    });
    let found = tokio::time::timeout(tests::WAIT, line).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        matches!(found, Ok(Ok(Some(_)))),
        "no warning about auth off on 0.0.0.0"
    );
}
