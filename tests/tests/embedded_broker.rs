//! The embedded broker as devices meet it: MQTT 3.1.1 as Mosquitto speaks it
//! (keep alive 0, `$` topics, retained messages, persistent sessions), memory
//! that does not grow with subscription churn, a warning when it listens
//! beyond loopback, and (once the flags are wired) device credentials.
//!
//! Besides rumqttc, a hand-written MQTT 3.1.1 client on a raw socket ([`Raw`])
//! speaks here: it sends exactly the bytes the specification allows, where
//! rumqttc would round them (rumqttc refuses a keep alive below 5 s).

use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::json;
use tests::{free_port, Bridge, Client, Device, Opts, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An MQTT 3.1.1 client written from the specification, one packet at a time.
struct Raw(TcpStream);

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { byte | 0x80 } else { byte });
        if n == 0 {
            return;
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![header];
    remaining_length(body.len(), &mut p);
    p.extend_from_slice(body);
    p
}

impl Raw {
    /// Sends CONNECT (clean session) and returns the CONNACK return code.
    async fn connect(port: u16, keep_alive: u16, login: Option<(&str, &str)>) -> (Raw, u8) {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut raw = Raw(stream);
        let mut body = Vec::new();
        string(b"MQTT", &mut body);
        body.push(4); // protocol level: 3.1.1
        body.push(0x02 | if login.is_some() { 0xc0 } else { 0 });
        body.extend_from_slice(&keep_alive.to_be_bytes());
        string(format!("raw-{}", free_port()).as_bytes(), &mut body);
        if let Some((user, password)) = login {
            string(user.as_bytes(), &mut body);
            string(password.as_bytes(), &mut body);
        }
        raw.send(&packet(0x10, &body)).await;
        let (header, ack) = raw
            .read()
            .await
            .expect("the broker closed the connection instead of answering CONNECT");
        assert_eq!(header, 0x20, "expected CONNACK");
        (raw, ack[1])
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).await.unwrap();
    }

    /// The next packet (fixed header byte, body), or None when the broker
    /// closed the connection or sent nothing within WAIT.
    async fn read(&mut self) -> Option<(u8, Vec<u8>)> {
        tokio::time::timeout(WAIT, async {
            let header = self.0.read_u8().await.ok()?;
            let (mut len, mut shift) = (0usize, 0);
            loop {
                let b = self.0.read_u8().await.ok()?;
                len |= ((b & 0x7f) as usize) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
            let mut body = vec![0; len];
            self.0.read_exact(&mut body).await.ok()?;
            Some((header, body))
        })
        .await
        .ok()
        .flatten()
    }

    /// SUBSCRIBE with QoS 0; returns the SUBACK's return code.
    async fn subscribe(&mut self, filter: &str) -> u8 {
        let mut body = 1u16.to_be_bytes().to_vec();
        string(filter.as_bytes(), &mut body);
        body.push(0);
        self.send(&packet(0x82, &body)).await;
        let (header, ack) = self.read().await.expect("no SUBACK");
        assert_eq!(header, 0x90, "expected SUBACK");
        ack[2]
    }

    /// PUBLISH with QoS 0.
    async fn publish(&mut self, topic: &str, payload: &[u8]) {
        let mut body = Vec::new();
        string(topic.as_bytes(), &mut body);
        body.extend_from_slice(payload);
        self.send(&packet(0x30, &body)).await;
    }

    /// The next PUBLISH as (topic, payload).
    async fn next_publish(&mut self) -> (String, Vec<u8>) {
        let (header, body) = self.read().await.expect("no PUBLISH");
        assert_eq!(header & 0xf0, 0x30, "expected PUBLISH, got {header:#x}");
        let len = u16::from_be_bytes([body[0], body[1]]) as usize;
        let topic = String::from_utf8(body[2..2 + len].to_vec()).unwrap();
        let skip = if header & 0x06 != 0 { 2 } else { 0 }; // packet id for QoS > 0
        (topic, body[2 + len + skip..].to_vec())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_accepted_and_the_device_works() {
    let bridge = Bridge::embedded(Opts::default());
    // MQTT 3.1.1 §3.1.2.10: "A Keep Alive value of zero (0) has the effect of
    // turning off the keep alive mechanism."
    let (mut raw, code) = Raw::connect(bridge.mqtt_port, 0, None).await;
    assert_eq!(code, 0, "CONNACK with keep alive 0");
    assert_eq!(raw.subscribe("ka0/in").await, 0);

    let mut device = Device::connect(bridge.mqtt_port, "ka0-peer").await;
    device.subscribe("ka0/out").await;
    device.publish("ka0/in", "to raw", 1, false).await;
    assert_eq!(
        raw.next_publish().await,
        ("ka0/in".into(), b"to raw".to_vec())
    );
    raw.publish("ka0/out", b"from raw").await;
    let p = device.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("ka0/out", &b"from raw"[..])
    );

    // And through the bridge to a web client.
    let mut web = Client::connect(&bridge.ws_url()).await;
    web.subscribe("ka0/web").await;
    raw.publish("ka0/web", b"\"hi\"").await;
    let m = web.next_message().await;
    assert_eq!(
        (m["channel"].clone(), m["data"].clone()),
        (json!("ka0/web"), json!("hi"))
    );
    assert!(
        !bridge.logs().contains("listens beyond loopback"),
        "warned on loopback:\n{}",
        bridge.logs()
    );
}

/// MQTT 3.1.1 §4.7.2: a filter starting with a wildcard never matches a topic
/// starting with `$`; a filter starting with `$` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_never_match_dollar_topics() {
    let bridge = Bridge::embedded(Opts::default());
    let port = bridge.mqtt_port;
    let mut everything = Device::connect(port, "hash").await;
    everything.subscribe("#").await;
    let mut one_level = Device::connect(port, "plus").await;
    one_level.subscribe("+/y").await;
    let mut dollar = Device::connect(port, "dollar").await;
    dollar.subscribe("$x/#").await;
    let mut exact = Device::connect(port, "exact").await;
    exact.subscribe("$x/y").await;

    let mut publisher = Device::connect(port, "pub").await;
    publisher.publish("$x/y", "reserved", 1, false).await;
    publisher.publish("x/y", "plain", 1, false).await;

    // The wildcard subscribers' first message is the plain one.
    for device in [&mut everything, &mut one_level] {
        let p = device.next_publish().await;
        assert_eq!((p.topic.as_str(), &p.payload[..]), ("x/y", &b"plain"[..]));
    }
    for device in [&mut dollar, &mut exact] {
        let p = device.next_publish().await;
        assert_eq!(
            (p.topic.as_str(), &p.payload[..]),
            ("$x/y", &b"reserved"[..])
        );
        device.expect_silence().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_reach_devices_and_web_clients() {
    let bridge = Bridge::embedded(Opts::default());
    let mut publisher = Device::connect(bridge.mqtt_port, "ret-pub").await;
    publisher.publish("ret/a", "\"kept\"", 1, true).await;
    publisher.publish("ret/b", "\"gone\"", 1, true).await;
    publisher.publish("ret/b", "", 1, true).await; // clears it

    let mut late = Device::connect(bridge.mqtt_port, "ret-late").await;
    late.subscribe("ret/#").await;
    let p = late.next_publish().await;
    assert_eq!((p.topic.as_str(), p.retain), ("ret/a", true));
    late.expect_silence().await;

    let mut web = Client::connect(&bridge.ws_url()).await;
    let reply = web
        .request(json!({"action":"subscribe","channel":"ret/#","retained":true}))
        .await;
    assert_eq!(reply["type"], "ack", "{reply}");
    let mut retained: Vec<_> = Vec::new();
    while let Some(tests::Frame::Json(f)) = web.next_within(Duration::from_millis(500)).await {
        retained.push(f);
    }
    assert_eq!(retained.len(), 1, "{retained:?}");
    assert_eq!(retained[0]["channel"], "ret/a");
    assert_eq!(retained[0]["data"], "kept");
    assert_eq!(retained[0]["retained"], true);
}

/// A device with a persistent session (clean session off) that went away
/// gets, on its return, the QoS 1 messages published meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_keep_what_was_published_meanwhile() {
    let bridge = Bridge::embedded(Opts::default());
    let id = format!("persistent-{}", free_port());
    let session = |id: &str| {
        let mut opts = MqttOptions::new(id, "127.0.0.1", bridge.mqtt_port);
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(30));
        AsyncClient::new(opts, 100)
    };
    let (client, mut eventloop) = session(&id);
    client.subscribe("away/#", QoS::AtLeastOnce).await.unwrap();
    client.disconnect().await.unwrap();
    // Run until the DISCONNECT has gone out, then close the socket.
    tokio::time::timeout(WAIT, async {
        while !matches!(
            eventloop.poll().await.unwrap(),
            Event::Outgoing(rumqttc::Outgoing::Disconnect)
        ) {}
    })
    .await
    .expect("disconnect");
    drop(eventloop);

    let mut publisher = Device::connect(bridge.mqtt_port, "away-pub").await;
    for n in 0..3 {
        publisher
            .publish(&format!("away/{n}"), format!("m{n}"), 1, false)
            .await;
    }

    let (_client, mut eventloop) = session(&id);
    let mut present = None;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, async {
        while got.len() < 3 {
            match eventloop.poll().await.unwrap() {
                Event::Incoming(Incoming::ConnAck(ack)) => present = Some(ack.session_present),
                Event::Incoming(Incoming::Publish(p)) => got.push(p.payload.to_vec()),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("got {got:?} of 3 queued messages"));
    assert_eq!(present, Some(true), "session present");
    assert_eq!(got, [b"m0".to_vec(), b"m1".to_vec(), b"m2".to_vec()]);
}

/// A device that subscribes and unsubscribes ever new filters leaves nothing
/// behind (rumqttd kept about 6 KiB per filter for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_churn_leaves_no_memory_behind() {
    const FILTERS: usize = 20_000;
    let bridge = Bridge::embedded(Opts::default());
    let (mut raw, code) = Raw::connect(bridge.mqtt_port, 60, None).await;
    assert_eq!(code, 0);
    // Warm up (allocator arenas, the broker's first subscription).
    assert_eq!(raw.subscribe("warm/up").await, 0);
    let before = bridge.rss_kib();

    let (mut rd, mut wr) = raw.0.into_split();
    let reader = tokio::spawn(async move {
        // SUBACK is 5 bytes, UNSUBACK 4.
        let mut left = FILTERS * 9;
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let n = rd.read(&mut buf).await.unwrap();
            assert!(n > 0, "the broker closed the connection");
            left = left.saturating_sub(n);
        }
    });
    for i in 0..FILTERS {
        let filter = format!("churn/{i}/+");
        let id = ((i % 60_000) + 1) as u16;
        let mut body = id.to_be_bytes().to_vec();
        string(filter.as_bytes(), &mut body);
        let mut unsubscribe = packet(0xa2, &body);
        body.push(1); // QoS 1
        let mut both = packet(0x82, &body);
        both.append(&mut unsubscribe);
        wr.write_all(&both).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("acks for every subscribe and unsubscribe")
        .unwrap();
    let grown = bridge.rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "{FILTERS} filters subscribed and unsubscribed left {grown} KiB behind"
    );
}

/// The bridge subscribes the embedded broker to `#` and matches itself, so
/// the broker must deliver every topic to such a subscriber, also when each
/// message goes to a topic of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_subscriber_gets_every_topic() {
    const TOPICS: usize = 2_000;
    let bridge = Bridge::embedded(Opts::default());
    let mut all = Device::connect(bridge.mqtt_port, "all").await;
    all.subscribe("#").await;
    let mut publisher = Device::connect(bridge.mqtt_port, "many").await;
    for i in 0..TOPICS {
        publisher.publish(&format!("many/{i}"), "x", 1, false).await;
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..TOPICS {
        let p = all.next_publish().await;
        assert!(p.topic.starts_with("many/"), "{}", p.topic);
        seen.insert(p.topic);
    }
    assert_eq!(seen.len(), TOPICS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_beyond_loopback_without_credentials_warns() {
    let port = free_port();
    let bridge = Bridge::spawn(
        Opts::default().args(["--embedded-broker".to_string(), format!("0.0.0.0:{port}")]),
        port,
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while !bridge
        .logs()
        .contains("embedded MQTT broker listens beyond loopback")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no warning about an open embedded broker:\n{}",
            bridge.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Device credentials: `--embedded-broker-user NAME`, the password from the
// environment variable BRIDGE_EMBEDDED_BROKER_PASSWORD.

const USER: &str = "sensor";
const PASSWORD: &str = "right horse battery";

fn with_credentials() -> Opts {
    Opts::default()
        .args(["--embedded-broker-user", USER])
        .env("BRIDGE_EMBEDDED_BROKER_PASSWORD", PASSWORD)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_credentials_only_the_right_password_connects() {
    let bridge = Bridge::embedded(with_credentials());
    let port = bridge.mqtt_port;
    // CONNACK 4: bad user name or password; 5: not authorized.
    assert_eq!(Raw::connect(port, 30, Some((USER, "wrong"))).await.1, 4);
    assert_eq!(
        Raw::connect(port, 30, Some(("nobody", PASSWORD))).await.1,
        4
    );
    assert_eq!(Raw::connect(port, 30, None).await.1, 5);
    let (mut device, code) = Raw::connect(port, 30, Some((USER, PASSWORD))).await;
    assert_eq!(code, 0);

    // The bridge's own connections got in too: a device message reaches a
    // web client, and the password shows in no log.
    let mut web = Client::connect(&bridge.ws_url()).await;
    web.subscribe("cred/t").await;
    device.publish("cred/t", b"1").await;
    assert_eq!(web.next_message().await["data"], 1);
    assert!(!bridge.logs().contains(PASSWORD), "{}", bridge.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_credentials_beyond_loopback_there_is_no_warning() {
    let port = free_port();
    let bridge = Bridge::spawn(
        with_credentials().args(["--embedded-broker".to_string(), format!("0.0.0.0:{port}")]),
        port,
    );
    let (mut device, code) = Raw::connect(port, 30, Some((USER, PASSWORD))).await;
    assert_eq!(code, 0);
    assert_eq!(device.subscribe("quiet").await, 0);
    assert!(
        !bridge.logs().contains("listens beyond loopback"),
        "{}",
        bridge.logs()
    );
}
