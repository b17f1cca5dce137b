//! The AWS deployment on one machine (aws-local): the README's tour through
//! it, and where AWS differs from `bridge serve` by design, each difference
//! with its own test (the protocol suites run against aws-local for
//! everything else):
//!
//! * API Gateway's limits: a binary frame closes the connection with 1003
//!   (self-hosted: a `bad_request` error); a frame over 32 KB or a message
//!   over 128 KB closes it with 1009 (self-hosted: `too_large` up to a hard
//!   cap); idle connections close after 10 minutes and all after 2 hours,
//!   with 1001.
//! * The handshake: a missing token is 401, a bad one 403 (the authorizer's
//!   Deny; self-hosted answers 401 for both).
//! * Token expiry: no frame is served and no message delivered after `exp`,
//!   but the connection closes on its next frame or message, after
//!   `token_expired`, with API Gateway's code for `DeleteConnection` (1000),
//!   not within a second with 4001.
//! * A slow reader is never told it lagged: a reader too slow for API
//!   Gateway's buffer makes posts to it fail (429) and the fan-out gives them
//!   up, with no `lagged` frame (AWS sends `lagged` only for a bounded
//!   retained replay).
//! * No per-connection request rate (`rate_limited`); the stage's throttling
//!   is API Gateway's (not played by aws-local).
//! * Order: every device message is its own asynchronous invocation of
//!   iot-fanout, several run at once, and API Gateway invokes the handler
//!   for each frame on its own: messages and replies arrive in any order.
//! * Message ids: a live `message` carries `mid` (the same in every copy, so
//!   a client drops duplicates); a retained one does not. The harness's
//!   clients of the AWS backend check and drop them (`Setup::client`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::{
    hostile_header_tokens, hs256_token, now, refused_without_echo, Backend, Client, Frame, Opts,
    Setup, WAIT,
};

const SECRET: &str = "aws-local-tests-secret-0123456789abcdef";

fn aws(opts: Opts) -> Setup {
    Setup::warm_up(&[Backend::AwsLocal]);
    Setup::with(Backend::AwsLocal, opts)
}

fn secured() -> Opts {
    Opts::default().env("BRIDGE_JWT_SECRET", SECRET)
}

fn token(sub: &str, exp: u64) -> String {
    hs256_token(
        SECRET,
        json!({"sub": sub, "exp": exp, "channels": {"subscribe": ["t/#"], "publish": ["t/#"]}}),
    )
}

/// A child process of the test, killed when it goes out of scope (also when
/// the test fails).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a child's lines into a channel.
fn lines(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first line `rx` gives that holds `what`, within WAIT.
fn wait_line(rx: &std::sync::mpsc::Receiver<String>, what: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(what) => return line,
            Ok(_) => {}
            Err(_) => panic!("no line with {what:?} within {WAIT:?}"),
        }
    }
}

/// The README's tour, through the AWS deployment: `bridge sub` sees a
/// `mosquitto_pub`, and a device sees a `bridge pub`. With the lookup cache
/// at the template's default (a subscribe's ack waits for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tour() {
    let s = aws(Opts::default().aws_args(["--parameter", "LookupCacheMillis=1000"]));
    let url = s.bridge.ws_url();
    let port = s.bridge.mqtt_port.to_string();
    // The device that takes the commands (mosquitto_sub's place in the
    // README: its output is block-buffered into a pipe).
    let mut dev = s.device("dev-7").await;
    dev.subscribe("fleet/+/commands").await;
    tokio::task::block_in_place(|| {
        let mut sub = Child(
            Command::new(tests::bridge_bin())
                .args(["sub", &url, "fleet/+/telemetry", "--count", "1"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let out = lines(sub.0.stdout.take().unwrap());
        let err = lines(sub.0.stderr.take().unwrap());
        wait_line(&err, "subscribed to fleet/+/telemetry");
        let status = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-t",
                "fleet/dev-7/telemetry",
            ])
            .args(["-m", r#"{"temp":21.5}"#])
            .status()
            .expect("mosquitto_pub (Debian package mosquitto-clients) must be installed");
        assert!(status.success());
        let line = wait_line(&out, "message");
        let mut got: Value = serde_json::from_str(&line).unwrap();
        let mid = got.as_object_mut().unwrap().remove("mid");
        assert!(mid.is_some_and(|m| m.is_string()), "{line}");
        assert_eq!(
            got,
            json!({"type":"message","channel":"fleet/dev-7/telemetry","data":{"temp":21.5}})
        );
        assert!(sub.0.wait().unwrap().success(), "--count 1 ends it");

        let out = Command::new(tests::bridge_bin())
            .args(["pub", &url, "fleet/dev-7/commands", r#"{"reboot":true}"#])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bridge pub: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    let p = dev.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), p.payload.as_ref()),
        ("fleet/dev-7/commands", &br#"{"reboot":true}"#[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_close_the_connection_with_1003() {
    let s = aws(Opts::default());
    let mut other = s.client().await;
    other.subscribe("b/#").await;
    let mut c = s.client().await;
    c.subscribe("b/#").await;
    c.send_binary(vec![1, 2, 3]).await;
    assert_eq!(c.expect_close().await, Some(1003));
    // The others carry on.
    let mut dev = s.device("d").await;
    dev.publish("b/1", "1", 1, false).await;
    assert_eq!(other.next_message().await["data"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_over_32_kb_and_messages_over_128_kb_close_with_1009() {
    let s = aws(Opts::default());
    let ping = |pad: usize| format!(r#"{{"action":"ping","id":1,"pad":"{}"}}"#, "x".repeat(pad));
    let mut c = s.client().await;
    // Within both limits: one 31 KB frame, a 90 KB message in 30 KB frames.
    c.send_text(&ping(31 * 1024)).await;
    assert_eq!(c.next_json().await, json!({"type":"pong","id":1}));
    c.send_fragmented(&ping(90 * 1024), 30 * 1024).await;
    assert_eq!(c.next_json().await, json!({"type":"pong","id":1}));
    // One frame over 32 KB.
    c.send_text(&ping(33 * 1024)).await;
    assert_eq!(c.expect_close().await, Some(1009));
    // A message over 128 KB, in frames within the limit.
    let mut c = s.client().await;
    c.send_fragmented(&ping(129 * 1024), 30 * 1024).await;
    assert_eq!(c.expect_close().await, Some(1009));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_long_connections_close_with_1001() {
    let s = aws(Opts::default().aws_args(["--idle-timeout", "1s", "--max-connection-time", "3s"]));
    let started = Instant::now();
    let mut idle = s.client().await;
    let mut busy = s.client().await;
    // A ping every 300 ms keeps a connection from idling...
    let mut closed_idle = None;
    while started.elapsed() < Duration::from_millis(2500) {
        busy.assert_alive().await;
        if closed_idle.is_none() {
            if let Some(Frame::Close(code)) = idle.next_within(Duration::from_millis(300)).await {
                closed_idle = Some((code, started.elapsed()));
            }
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let (code, at) = closed_idle.expect("the idle connection was closed");
    assert_eq!(code, Some(1001));
    assert!(at >= Duration::from_millis(900), "closed after {at:?}");
    // ...but not past the maximum connection time.
    assert_eq!(busy.expect_close().await, Some(1001));
    let at = started.elapsed();
    assert!(
        at >= Duration::from_millis(2900) && at < Duration::from_secs(6),
        "{at:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_is_401_and_a_bad_one_403() {
    let s = aws(secured());
    let url = s.bridge.ws_url();
    let status = |r: Result<Client, String>| match r {
        Err(e) => e,
        Ok(_) => "connected".to_string(),
    };
    assert_eq!(status(Client::try_connect(&url, None).await), "HTTP 401");
    let expired = token("u", now() - 60);
    let wrong_key = hs256_token(
        "another-secret-0123456789abcdef0123",
        json!({"sub":"u","exp":now()+60}),
    );
    for bad in ["garbage", expired.as_str(), wrong_key.as_str()] {
        let r = Client::try_connect(&format!("{url}?token={bad}"), None).await;
        assert_eq!(status(r), "HTTP 403", "{bad}");
    }
    let good = token("u", now() + 600);
    let mut c = Client::try_connect(&url, Some(&good)).await.unwrap();
    c.assert_alive().await;
    // Every component logs into one stream, tagged; no token in it.
    let logs = s.bridge.logs();
    for tag in ["aws-local ", "ws-authorizer.", "api-gateway "] {
        assert!(logs.contains(tag), "no {tag} lines in\n{logs}");
    }
    for t in [&good, &expired, &wrong_key] {
        assert!(!logs.contains(t.as_str()), "a token was logged:\n{logs}");
    }
}

/// A token whose header is markup or terminal escapes is refused (403, the
/// authorizer's Deny) without its text in the answer or in any component's
/// log (the self-hosted bridge's check: token.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_token_header_is_neither_echoed_nor_logged() {
    let s = aws(secured());
    for t in hostile_header_tokens() {
        let url = format!("{}?token={t}", s.bridge.ws_url());
        assert_eq!(refused_without_echo(&url).await, 403);
    }
    let logs = s.bridge.logs();
    assert!(
        logs.contains("ws-authorizer."),
        "the authorizer ran:\n{logs}"
    );
    assert!(!logs.contains("script") && !logs.contains("[31m"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offered_subprotocol_is_echoed() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let s = aws(Opts::default());
    let mut req = s.bridge.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "chat, json".parse().unwrap());
    let (_, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "chat");
}

/// After `exp`, nothing is served or delivered; the connection is told
/// `token_expired` and closed with 1000 at its next frame or message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_closes_on_the_next_frame_or_message() {
    let s = aws(secured());
    let url = s.bridge.ws_url();
    let exp = now() + 2;
    let mut by_frame = Client::connect(&format!("{url}?token={}", token("a", exp))).await;
    let mut by_message = Client::connect(&format!("{url}?token={}", token("b", exp))).await;
    let mut other = Client::connect(&format!("{url}?token={}", token("c", now() + 600))).await;
    for c in [&mut by_frame, &mut by_message, &mut other] {
        c.subscribe("t/x").await;
    }
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still open: AWS closes nothing on its own.
    by_frame.expect_silence().await;
    by_frame.send(json!({"action":"ping","id":1})).await;
    let told = by_frame.next_json().await;
    assert_eq!(
        (told["type"].as_str(), told["code"].as_str()),
        (Some("error"), Some("token_expired"))
    );
    assert_eq!(by_frame.expect_close().await, Some(1000));
    let mut dev = s.device("d").await;
    dev.publish("t/x", "1", 1, false).await;
    assert_eq!(other.next_message().await["data"], 1);
    let told = by_message.next_json().await;
    assert_eq!(
        told["code"], "token_expired",
        "no message after exp: {told}"
    );
    assert_eq!(by_message.expect_close().await, Some(1000));
}

/// API Gateway has no `lagged`: posts to a client whose buffer is full
/// answer 429, and the client is never told what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_never_told_it_lagged() {
    let s = aws(Opts::default().aws_args(["--client-buffer-bytes", "65536"]));
    let mut slow = s.client().await;
    slow.subscribe("big").await;
    let mut dev = s.device("d").await;
    let payload = "x".repeat(100 * 1024);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0;
    // Until the kernel's buffers and then aws-local's are full.
    while !s.bridge.logs().contains("client side buffer is full") {
        assert!(
            Instant::now() < deadline,
            "the client's buffer never filled:\n{}",
            s.bridge.logs()
        );
        dev.publish("big", payload.clone(), 1, false).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut got = 0;
    while let Some(f) = slow.next_within(Duration::from_secs(3)).await {
        match f {
            Frame::Json(v) => {
                assert!(v["type"] == "message", "a {} frame", v["type"]);
                got += 1;
            }
            Frame::Close(code) => panic!("closed with {code:?}"),
        }
    }
    assert!(got <= sent, "{got} of {sent}");
    slow.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn there_is_no_per_connection_request_rate() {
    let s = aws(Opts::default());
    let mut c = s.client().await;
    for i in 0..200 {
        c.send(json!({"action":"ping","id":i})).await;
    }
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let f = c.next_json().await;
        assert_eq!(f["type"], "pong", "{f}");
        ids.insert(f["id"].as_u64().unwrap());
    }
    assert_eq!(ids.len(), 200);
}

/// Every device message arrives exactly once, in whatever order the
/// concurrent fan-outs deliver it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_messages_arrive_once_each_in_any_order() {
    let s = aws(Opts::default());
    let mut c = s.client().await;
    c.subscribe("seq/+").await;
    let mut dev = s.device("seq").await;
    for i in 0..300 {
        dev.publish("seq/a", i.to_string(), 1, false).await;
    }
    let mut got: Vec<u64> = c
        .next_messages(300)
        .await
        .iter()
        .map(|m| m["data"].as_u64().unwrap())
        .collect();
    got.sort();
    assert_eq!(got, (0..300).collect::<Vec<_>>());
    c.expect_silence().await;
}

/// Pipelined web publishes: each is acknowledged and reaches the broker
/// exactly once, in whatever order the concurrent handler invocations
/// (one per frame) finish (self-hosted keeps their order: delivery.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_web_publishes_arrive_once_each_in_any_order() {
    let s = aws(Opts::default());
    let mut a = s.client().await;
    let mut dev = s.device("d").await;
    dev.subscribe("w/#").await;
    for i in 0..100 {
        a.send(json!({"action":"publish","channel":"w/x","data":i,"id":i,"qos": i % 2}))
            .await;
    }
    let mut acks = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let f = a.next_json().await;
        assert_eq!(f["type"], "ack", "{f}");
        acks.insert(f["id"].as_u64().unwrap());
    }
    assert_eq!(acks, (0..100).collect());
    let mut got = Vec::new();
    for _ in 0..100 {
        let p = dev.next_publish().await;
        got.push(
            String::from_utf8(p.payload.to_vec())
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        );
    }
    got.sort();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    dev.expect_silence().await;
    a.expect_silence().await;
}

/// A live message carries its `mid`, the same for every recipient and
/// different for the next message; a retained one carries none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_messages_carry_a_mid_and_retained_ones_none() {
    let s = aws(Opts::default());
    // Plain clients: they see the frames as sent.
    let mut a = Client::connect(&s.bridge.ws_url()).await;
    let mut b = Client::connect(&s.bridge.ws_url()).await;
    a.subscribe("m/#").await;
    b.subscribe("m/1").await;
    let mut dev = s.device("d").await;
    dev.publish("m/1", "1", 1, true).await;
    dev.publish("m/1", "2", 1, true).await;
    let (a1, a2) = (a.next_message().await, a.next_message().await);
    let (b1, b2) = (b.next_message().await, b.next_message().await);
    let mid = |m: &Value| m["mid"].as_str().expect("a mid").to_string();
    let by_data = |x: &Value, y: &Value| {
        if x["data"] == 1 {
            (x.clone(), y.clone())
        } else {
            (y.clone(), x.clone())
        }
    };
    let ((a1, a2), (b1, b2)) = (by_data(&a1, &a2), by_data(&b1, &b2));
    assert_eq!(mid(&a1), mid(&b1));
    assert_eq!(mid(&a2), mid(&b2));
    assert_ne!(mid(&a1), mid(&a2));
    let mut late = Client::connect(&s.bridge.ws_url()).await;
    late.send(json!({"action":"subscribe","channel":"m/1","retained":true,"id":"r"}))
        .await;
    let replay = late.next_json().await;
    assert_eq!(
        replay,
        json!({"type":"message","channel":"m/1","data":2,"retained":true})
    );
}

/// A fan-out with more recipients than one invocation posts to is split
/// into parts that iot-fanout hands to asynchronous invocations of itself
/// through Lambda's `Invoke` API (played by aws-local): every recipient gets
/// the message once, and the function's own metrics say parts were handed
/// off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_fan_out_is_posted_in_parts_by_parallel_invocations() {
    let s = aws(Opts::default().aws_args(["--parameter", "FanoutPartSize=3"]));
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut c = s.client().await;
        c.subscribe("many").await;
        clients.push(c);
    }
    let mut dev = s.device("d").await;
    dev.publish("many", "1", 1, false).await;
    for c in &mut clients {
        assert_eq!(c.next_message().await["data"], 1);
        c.expect_silence().await;
    }
    // The fan-out's EMF lines, as CloudWatch would read them.
    let metrics: Vec<Value> = s
        .bridge
        .logs()
        .lines()
        .filter(|l| l.starts_with("iot-fanout."))
        .filter_map(|l| l.split_once(" | ").map(|(_, json)| json.to_string()))
        .filter_map(|json| serde_json::from_str::<Value>(&json).ok())
        .filter(|v| v.get("_aws").is_some())
        .collect();
    let sum = |name: &str| metrics.iter().filter_map(|m| m[name].as_f64()).sum::<f64>();
    assert_eq!(sum("Delivered"), 10.0, "{metrics:?}");
    assert!(
        sum("HandedOff") >= 1.0,
        "no part was handed off: {metrics:?}"
    );
    assert!(metrics.len() >= 2, "{metrics:?}");
}
