//! wss://: TLS on the bridge's own listener with --tls-cert / --tls-key.

use futures_util::{SinkExt, StreamExt};
use tests::{client_tls, make_pki, Bridge, Device, Opts};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_listener() {
    let dir = std::env::temp_dir().join(format!("bridge-tls-{}", std::process::id()));
    make_pki(&dir);
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let bridge = Bridge::embedded(Opts::default().args([
        "--tls-cert",
        &p("server.pem"),
        "--tls-key",
        &p("server.key"),
    ]));

    let url = format!("wss://localhost:{}/ws", bridge.addr.port());
    let connector = Connector::Rustls(client_tls(&dir.join("ca.pem")));
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(
        url.as_str(),
        None,
        false,
        Some(connector),
    )
    .await
    .expect("wss connect");
    ws.send(Message::text(
        r#"{"action":"subscribe","channel":"secure/#","id":1}"#,
    ))
    .await
    .unwrap();
    let ack = ws.next().await.unwrap().unwrap();
    assert_eq!(ack.to_text().unwrap(), r#"{"type":"ack","id":1}"#);
    let mut dev = Device::connect(bridge.mqtt_port, "d").await;
    dev.publish("secure/x", "1", 1, false).await;
    let m = ws.next().await.unwrap().unwrap();
    assert_eq!(
        m.to_text().unwrap(),
        r#"{"type":"message","channel":"secure/x","data":1}"#
    );

    // Plain ws:// is not served on a TLS listener.
    let plain = format!("ws://127.0.0.1:{}/ws", bridge.addr.port());
    assert!(tokio_tungstenite::connect_async(plain.as_str())
        .await
        .is_err());
    std::fs::remove_dir_all(&dir).ok();
}
