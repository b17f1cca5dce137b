//! `bridge smoke`: checks a deployed bridge end to end, both directions, the
//! way a browser and a device would use it.
//!
//! A WebSocket client connects to the `wss://` URL (with `BRIDGE_TOKEN`, when
//! set, as an `Authorization: Bearer` header) and an MQTT client connects to
//! AWS IoT Core with an X.509 device certificate over rustls (port 8883).
//! Then: the WebSocket client subscribes and the device publishes (device to
//! browser); the device subscribes and the WebSocket client publishes
//! (browser to device). Each step says what it did and how long it took;
//! the first step that fails ends the run with the reason.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{ClientError, Socket};
use crate::frame::json_string;

/// `bridge smoke` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SmokeArgs {
    /// The deployed WebSocket URL (the stack output WebSocketUrl), e.g.
    /// wss://abc123.execute-api.eu-west-1.amazonaws.com/prod
    #[arg(long, value_name = "URL")]
    pub url: String,

    /// The account's IoT data endpoint
    /// (aws iot describe-endpoint --endpoint-type iot:Data-ATS).
    #[arg(long, value_name = "HOST")]
    pub iot_endpoint: String,

    /// MQTT TLS port of the IoT endpoint.
    #[arg(long, default_value_t = 8883)]
    pub port: u16,

    /// PEM device certificate (an AWS IoT thing's certificate).
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,

    /// PEM private key of --cert.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,

    /// PEM CA bundle for the endpoint (Amazon Root CA 1) [default: the system's].
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// MQTT client id; the device's IoT policy must allow iot:Connect for it
    /// [default: bridge-smoke-<random>].
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,

    /// Channel the test uses: CHANNEL/from-device and CHANNEL/from-web
    /// [default: bridge-smoke/<random>].
    #[arg(long, value_name = "CHANNEL")]
    pub channel: Option<String>,

    /// The stack's topic prefix, if it has one (MQTT topic = PREFIX/channel).
    #[arg(long, value_name = "PREFIX")]
    pub topic_prefix: Option<String>,

    /// Seconds to wait for each step.
    #[arg(long, default_value_t = 15)]
    pub timeout: u64,
}

fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", t, std::process::id())
}

fn step(what: &str) {
    println!("smoke: {what}");
}

fn ok(what: &str, since: Instant) {
    println!("smoke:   ok: {what} ({} ms)", since.elapsed().as_millis());
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

async fn ws_connect(url: &str, token: Option<&str>) -> Result<Socket, String> {
    crate::client::connect(url, token)
        .await
        .map_err(|e| match e {
            ClientError::Connect(m) if m.starts_with("HTTP 401") || m.starts_with("HTTP 403") => {
                format!("the WebSocket handshake was refused: {m} (is BRIDGE_TOKEN set and valid?)")
            }
            other => format!("cannot connect the WebSocket: {other}"),
        })
}

/// Sends a request and waits for its ack; an error frame for it fails.
async fn ws_request(
    socket: &mut Socket,
    frame: String,
    id: &str,
    limit: Duration,
) -> Result<(), String> {
    crate::client::request(socket, frame, id, limit, |_, _| {})
        .await
        .map_err(|e| match e {
            ClientError::Refused { code, message } => {
                format!("the bridge answered {code}: {message}")
            }
            ClientError::Timeout(_) => format!("no answer on the WebSocket within {limit:?}"),
            ClientError::Closed => "the WebSocket was closed".into(),
            other => format!("WebSocket error: {other}"),
        })
}

/// Reads WebSocket frames until `want` accepts one.
async fn ws_until(
    socket: &mut Socket,
    limit: Duration,
    mut want: impl FnMut(&Value) -> bool,
) -> Result<Value, String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let next = tokio::time::timeout_at(deadline, socket.next())
            .await
            .map_err(|_| format!("no answer on the WebSocket within {limit:?}"))?;
        let msg = match next {
            None => return Err("the WebSocket was closed".into()),
            Some(Err(e)) => return Err(format!("WebSocket error: {e}")),
            Some(Ok(m)) => m,
        };
        let Message::Text(text) = msg else { continue };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return Err(format!("the server sent a frame that is not JSON: {text}"));
        };
        if want(&v) {
            return Ok(v);
        }
    }
}

/// Waits for an MQTT event `want` accepts.
async fn mqtt_until(
    events: &mut mpsc::UnboundedReceiver<Result<Event, String>>,
    limit: Duration,
    mut want: impl FnMut(&Event) -> bool,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let next = tokio::time::timeout_at(deadline, events.recv())
            .await
            .map_err(|_| format!("no answer from AWS IoT Core within {limit:?}"))?;
        match next {
            None => return Err("the MQTT connection ended".into()),
            Some(Err(e)) => return Err(e),
            Some(Ok(event)) if want(&event) => return Ok(()),
            Some(Ok(_)) => {}
        }
    }
}

/// Runs the smoke test; `Err` says which step failed and why.
pub async fn run(args: SmokeArgs) -> Result<(), String> {
    let limit = Duration::from_secs(args.timeout.max(1));
    let run_id = nonce();
    let base = args
        .channel
        .clone()
        .unwrap_or_else(|| format!("bridge-smoke/{run_id}"));
    let to_mqtt = |channel: &str| match args.topic_prefix.as_deref().map(|p| p.trim_matches('/')) {
        Some(p) if !p.is_empty() => format!("{p}/{channel}"),
        _ => channel.to_string(),
    };
    let from_device = format!("{base}/from-device");
    let from_web = format!("{base}/from-web");
    let token = std::env::var("BRIDGE_TOKEN").ok().filter(|t| !t.is_empty());

    // -- connect both sides
    let t = Instant::now();
    step(&format!(
        "connecting a WebSocket client to {} ({})",
        args.url,
        if token.is_some() {
            "with BRIDGE_TOKEN"
        } else {
            "no token"
        }
    ));
    let mut ws = ws_connect(&args.url, token.as_deref()).await?;
    ok("WebSocket connected", t);

    let t = Instant::now();
    let client_id = args
        .client_id
        .clone()
        .unwrap_or_else(|| format!("bridge-smoke-{run_id}"));
    step(&format!(
        "connecting MQTT client {client_id:?} to {}:{} with certificate {}",
        args.iot_endpoint,
        args.port,
        args.cert.display()
    ));
    let ca = match &args.ca {
        Some(p) => read(p, "CA bundle")?,
        None => {
            crate::server::mqtt::system_ca_bundle().ok_or("no system CA bundle found; pass --ca")?
        }
    };
    let client_auth = Some((read(&args.cert, "certificate")?, read(&args.key, "key")?));
    let mut opts = MqttOptions::new(client_id, args.iot_endpoint.clone(), args.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth,
    }));
    let (mqtt, mut eventloop) = AsyncClient::new(opts, 16);
    let (tx, mut events) = mpsc::unbounded_channel();
    // The event loop runs in its own task, alone.
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(event) => {
                    if tx.send(Ok(event)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("MQTT connection failed: {e}")));
                    return;
                }
            }
        }
    });
    let result = async {
        mqtt_until(&mut events, limit, |e| {
            matches!(e, Event::Incoming(Incoming::ConnAck(_)))
        })
        .await?;
        ok("MQTT connected", t);

        // -- device to browser
        let t = Instant::now();
        step(&format!("WebSocket: subscribe to {from_device:?}"));
        let sub = format!(
            r#"{{"action":"subscribe","channel":{},"id":"smoke-sub"}}"#,
            json_string(&from_device)
        );
        ws_request(&mut ws, sub, "smoke-sub", limit).await?;
        ok("subscribed", t);

        let t = Instant::now();
        let device_nonce = nonce();
        let topic = to_mqtt(&from_device);
        step(&format!("MQTT: publish to {topic:?} (QoS 1)"));
        mqtt.publish(
            topic.clone(),
            QoS::AtLeastOnce,
            false,
            format!(r#"{{"smoke":"{device_nonce}"}}"#),
        )
        .await
        .map_err(|e| format!("MQTT publish failed: {e}"))?;
        ws_until(&mut ws, limit, |v| {
            v["type"] == "message"
                && v["channel"].as_str() == Some(from_device.as_str())
                && v["data"]["smoke"].as_str() == Some(device_nonce.as_str())
        })
        .await
        .map_err(|e| format!("the device's message did not reach the WebSocket: {e}"))?;
        ok("device -> browser: the WebSocket client received the device's message", t);

        // -- browser to device
        let t = Instant::now();
        let topic = to_mqtt(&from_web);
        step(&format!("MQTT: subscribe to {topic:?}"));
        mqtt.subscribe(topic.clone(), QoS::AtLeastOnce)
            .await
            .map_err(|e| format!("MQTT subscribe failed: {e}"))?;
        mqtt_until(&mut events, limit, |e| {
            matches!(e, Event::Incoming(Incoming::SubAck(_)))
        })
        .await?;
        ok("subscribed", t);

        let t = Instant::now();
        let web_nonce = nonce();
        step(&format!("WebSocket: publish to {from_web:?}"));
        let publish = format!(
            r#"{{"action":"publish","channel":{},"data":{{"smoke":"{web_nonce}"}},"id":"smoke-pub"}}"#,
            json_string(&from_web)
        );
        ws_request(&mut ws, publish, "smoke-pub", limit).await?;
        let expected = format!(r#"{{"smoke":"{web_nonce}"}}"#);
        mqtt_until(&mut events, limit, |e| match e {
            Event::Incoming(Incoming::Publish(p)) => {
                p.topic == topic && p.payload.as_ref() == expected.as_bytes()
            }
            _ => false,
        })
        .await
        .map_err(|e| format!("the browser's message did not reach the device: {e}"))?;
        ok("browser -> device: the MQTT client received the WebSocket client's message", t);
        Ok::<(), String>(())
    }
    .await;

    let _ = ws.close(None).await;
    let _ = mqtt.disconnect().await;
    poller.abort();
    result?;
    println!("smoke: passed: both directions work");
    Ok(())
}
