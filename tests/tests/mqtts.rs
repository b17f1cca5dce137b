//! TLS on both sides, as against AWS IoT Core: `bridge serve` reaches a
//! Mosquitto that requires X.509 client certificates over mqtts://, serves
//! wss:// itself, and `bridge smoke` checks the whole path both ways.

use std::path::{Path, PathBuf};
use std::process::Command;

use tests::{bridge_bin, make_pki, Bridge, Client, Mosquitto, Opts};

/// A Mosquitto that speaks only TLS and requires a client certificate.
fn tls_mosquitto(dir: &Path) -> Mosquitto {
    Mosquitto::start_with(&format!(
        "cafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\nrequire_certificate true\n",
        d = dir.display()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_client_certificate_and_smoke() {
    let dir: PathBuf = std::env::temp_dir().join(format!("bridge-mqtts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    make_pki(&dir);
    let broker = tls_mosquitto(&dir);
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let bridge = Bridge::spawn(
        Opts::default().args([
            "--mqtt-url".to_string(),
            format!("mqtts://localhost:{}", broker.port),
            "--mqtt-ca".into(),
            p("ca.pem"),
            "--mqtt-cert".into(),
            p("client.pem"),
            "--mqtt-key".into(),
            p("client.key"),
            "--tls-cert".into(),
            p("server.pem"),
            "--tls-key".into(),
            p("server.key"),
        ]),
        broker.port,
    );
    let (status, _) = tests::https_healthz(&bridge, &dir.join("ca.pem")).await;
    assert_eq!(
        status,
        200,
        "the bridge is not connected to the TLS broker:\n{}",
        bridge.logs()
    );

    // Without a client certificate the broker refuses the bridge.
    let refused = Bridge::spawn(
        Opts::default().args([
            "--mqtt-url".to_string(),
            format!("mqtts://localhost:{}", broker.port),
            "--mqtt-ca".into(),
            p("ca.pem"),
        ]),
        broker.port,
    );
    let mut c = Client::connect(&refused.ws_url()).await;
    c.expect_error(
        serde_json::json!({"action":"subscribe","channel":"x"}),
        "unavailable",
    )
    .await;

    // bridge smoke: wss:// to the bridge, mqtts:// with the client certificate to the broker.
    let (cert, key, ca) = (p("client.pem"), p("client.key"), p("ca.pem"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bridge_bin())
            .args([
                "smoke",
                "--url",
                &format!("wss://localhost:{}/ws", bridge.addr.port()),
            ])
            .args([
                "--iot-endpoint",
                "localhost",
                "--port",
                &broker.port.to_string(),
            ])
            .args(["--cert", &cert, "--key", &key, "--ca", &ca])
            .env("SSL_CERT_FILE", &ca)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "bridge smoke failed:\n{text}");
    std::fs::remove_dir_all(&dir).ok();
}
