//! The process around the protocol: /healthz, /metrics, graceful shutdown,
//! JSON logs, the little `bridge sub` / `bridge pub` client.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tests::{both_backends, bridge_bin, http_get, Backend, Opts, Setup};

// Not on RabbitMQ (here): nothing in this file depends on how the broker
// speaks MQTT, Mosquitto covers an external broker, and a RabbitMQ node costs
// a test binary about 13 s (6 s of CPU) to boot.
both_backends!(health_and_metrics, |s: Setup| async move {
    let (status, body) = http_get(&s.bridge.http("/healthz")).await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let mut a = s.client().await;
    let mut b = s.client().await;
    a.subscribe("m/#").await;
    b.subscribe("m/1").await;
    b.subscribe("m/+").await;
    let mut dev = s.device("d").await;
    dev.publish("m/1", "1", 1, false).await;
    a.next_message().await;
    b.next_message().await;
    b.publish("m/2", json!(2)).await;
    a.next_message().await;
    b.next_message().await;
    a.expect_error(
        json!({"action":"publish","channel":"m/#","data":1}),
        "invalid_channel",
    )
    .await;
    let (status, metrics) = http_get(&s.bridge.http("/metrics")).await;
    assert_eq!(status, 200);
    for line in [
        "bridge_connections 2",
        "bridge_subscriptions 3",
        "bridge_broker_subscriptions 1",
        "bridge_broker_up 1",
        "bridge_mqtt_messages_received_total 2",
        "bridge_ws_publishes_total 1",
        "bridge_messages_delivered_total 4",
        "bridge_errors_total{code=\"invalid_channel\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    assert!(
        metrics.contains("bridge_delivery_latency_seconds_bucket"),
        "{metrics}"
    );
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, metrics) = http_get(&s.bridge.http("/metrics")).await;
    assert!(
        metrics.lines().any(|l| l == "bridge_connections 1"),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "bridge_subscriptions 2"),
        "{metrics}"
    );
});

both_backends!(graceful_shutdown, |s: Setup| async move {
    let mut s = s;
    let mut c = s.client().await;
    c.subscribe("bye").await;
    let status = tokio::task::block_in_place(|| s.bridge.terminate());
    assert!(status.success(), "exit status {status}");
    assert_eq!(c.expect_close().await, Some(1001));
    assert!(s.bridge.logs().contains("shutting down"));
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs() {
    let s = Setup::with(
        Backend::Embedded,
        Opts::default().args(["--log-format", "json"]),
    );
    let mut c = s.client().await;
    c.assert_alive().await;
    let logs = s.bridge.logs();
    let lines: Vec<&str> = logs.lines().filter(|l| !l.is_empty()).collect();
    assert!(!lines.is_empty());
    for line in lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line: {line:?}: {e}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_and_pub_commands() {
    let s = Setup::new(Backend::Embedded);
    let url = s.bridge.ws_url();
    let sub = Command::new(bridge_bin())
        .args(["sub", &url, "cmd/+", "--count", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the subscription is active: a web client sees its own publish.
    let mut probe = s.client().await;
    probe.subscribe("cmd/+").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for data in ["{\"temp\":21.5}", "plain words"] {
        let status = Command::new(bridge_bin())
            .args(["pub", &url, "cmd/x", data])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let out = tokio::task::spawn_blocking(move || sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            json!({"type":"message","channel":"cmd/x","data":{"temp":21.5}}),
            json!({"type":"message","channel":"cmd/x","data":"plain words","encoding":"text"}),
        ]
    );
    // A refused publish exits non-zero with the server's reason.
    let out = Command::new(bridge_bin())
        .args(["pub", &url, "cmd/+", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_channel"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_token_from_the_environment() {
    let secret = "lifecycle-secret-0123456789abcdef0123";
    let s = Setup::with(
        Backend::Embedded,
        Opts::default().env("BRIDGE_JWT_SECRET", secret),
    );
    let url = s.bridge.ws_url();
    let token = tests::hs256_token(
        secret,
        json!({"exp": tests::now() + 60, "channels": {"publish": ["ok"]}}),
    );
    let out = Command::new(bridge_bin())
        .args(["pub", &url, "ok", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bridge_bin())
        .args(["pub", &url, "ok", "1"])
        .env("BRIDGE_TOKEN", &token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bridge_bin())
        .args(["pub", &url, "nope", "1"])
        .env("BRIDGE_TOKEN", &token)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offered_subprotocol_is_echoed() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let s = Setup::new(Backend::Embedded);
    let mut req = s.bridge.ws_url().into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "channels.v1, other".parse().unwrap(),
    );
    let (_ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("handshake");
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "channels.v1"
    );
}
