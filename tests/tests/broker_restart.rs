//! The broker can come and go: kill the external broker, restart it, and
//! deliveries resume to the same WebSocket clients without them reconnecting;
//! meanwhile publishes and subscribes get `unavailable` and /healthz says 503.

use std::time::{Duration, Instant};

use serde_json::json;
use tests::{http_get, Backend, Setup};

async fn wait_health(s: &Setup, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = http_get(&s.bridge.http("/healthz")).await;
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz stayed {status}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_resume_after_a_broker_restart() {
    let mut s = Setup::new(Backend::Mosquitto);
    wait_health(&s, 200).await;
    let mut a = s.client().await;
    let mut b = s.client().await;
    a.subscribe("plant/+/temp").await;
    b.subscribe("plant/#").await;
    b.subscribe("+/p1/temp").await;
    {
        let mut dev = s.device("p1").await;
        dev.publish("plant/p1/temp", "20", 1, false).await;
        assert_eq!(a.next_message().await["data"], 20);
        assert_eq!(b.next_message().await["data"], 20);
    }

    s.mosquitto.as_mut().unwrap().kill();
    wait_health(&s, 503).await;
    // The web clients stay connected and are told to retry.
    a.expect_error(
        json!({"action":"publish","channel":"plant/p1/cmd","data":1}),
        "unavailable",
    )
    .await;
    a.expect_error(
        json!({"action":"subscribe","channel":"new/#"}),
        "unavailable",
    )
    .await;
    a.assert_alive().await;
    b.assert_alive().await;
    // Unsubscribing needs no broker.
    b.unsubscribe("+/p1/temp").await;

    s.mosquitto.as_mut().unwrap().restart();
    wait_health(&s, 200).await;
    let mut dev = s.device("p1").await;
    dev.publish("plant/p1/temp", "21", 1, false).await;
    assert_eq!(a.next_message().await["data"], 21);
    assert_eq!(b.next_message().await["data"], 21);
    a.expect_silence().await;
    b.expect_silence().await;
    // Requests work again.
    a.subscribe("new/#").await;
    dev.subscribe("plant/p1/cmd").await;
    a.publish("plant/p1/cmd", json!({"go":1})).await;
    assert_eq!(dev.next_publish().await.payload.as_ref(), br#"{"go":1}"#);
    let (_, metrics) = http_get(&s.bridge.http("/metrics")).await;
    assert!(
        metrics.contains("bridge_broker_connects_total 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_starts_while_the_broker_is_down() {
    let mut m = tests::Mosquitto::start();
    let url = m.url();
    m.kill();
    let bridge = tests::Bridge::external(&m, tests::Opts::default());
    let s = Setup {
        backend: Backend::Mosquitto,
        mosquitto: None,
        bridge,
    };
    let (status, body) = http_get(&s.bridge.http("/healthz")).await;
    assert_eq!(status, 503, "{body}");
    let mut c = s.client().await;
    c.expect_error(json!({"action":"subscribe","channel":"x"}), "unavailable")
        .await;
    m.restart();
    assert_eq!(m.url(), url);
    wait_health(&s, 200).await;
    c.subscribe("x").await;
    let mut dev = tests::Device::connect(m.port, "d").await;
    dev.publish("x", "1", 1, false).await;
    assert_eq!(c.next_message().await["data"], 1);
}
