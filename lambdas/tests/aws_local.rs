//! `aws-local` from the functions' side: the AWS APIs it plays, called the
//! way the functions call them (SigV4-signed, through the SDK or the
//! library's own signer), and what it leaves in DynamoDB: `$disconnect` runs
//! however a connection ends. Its processes die with it, and a bad setting
//! stops it at start with what to do.
//!
//! (The protocol through aws-local, and where API Gateway differs from the
//! self-hosted bridge, are the black-box suites in `tests/`.)

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use lambdas::budget::Budget;
use lambdas::calls::Calls;
use lambdas::signed::{Body, Signer};
use serde_json::{json, Value};
use support::*;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

/// A Mosquitto of the test's own (IoT Core's message side for aws-local).
struct Mosquitto {
    port: u16,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mosquitto() -> Mosquitto {
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("mosquitto not found: install the Debian package mosquitto (scripts/install-test-deps.sh does)");
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("aws-local-mosq-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n"),
    )
    .unwrap();
    let mut cmd = Command::new(bin);
    die_with_parent(&mut cmd);
    let child = cmd
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto");
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Mosquitto { port, child, dir }
}

/// A running `aws-local serve`.
struct AwsLocal {
    child: std::process::Child,
    /// `http://ADDR`.
    base: String,
    table: String,
    logs: Arc<Mutex<String>>,
    _broker: Mosquitto,
}

impl Drop for AwsLocal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AwsLocal {
    fn ws(&self) -> String {
        format!("{}/ws", self.base.replace("http://", "ws://"))
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }
}

/// The command line of `aws-local serve` on `broker`, with this process's
/// DynamoDB and a table of its own.
fn serve_command(broker: u16, table: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aws-local"));
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(["--mqtt-url", &format!("mqtt://127.0.0.1:{broker}")])
        .args(["--dynamodb-endpoint", dynamodb_endpoint()])
        .args(["--table-name", table])
        .args(["--parameter", "LookupCacheMillis=0", "--concurrency", "2"])
        .args(args)
        .env_remove("BRIDGE_JWT_SECRET")
        .env_remove("BRIDGE_JWKS_URL")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn start(args: &[&str]) -> AwsLocal {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let broker = mosquitto();
    let table = format!(
        "al{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut cmd = serve_command(broker.port, &table, args);
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().expect("start aws-local");
    let logs = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    for out in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let (logs, tx) = (logs.clone(), tx.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(url) = line.split("listening on ws://").nth(1) {
                    let _ = tx.send(url.trim().trim_end_matches("/ws").to_string());
                }
                let mut l = logs.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
    }
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("aws-local did not start:\n{}", logs.lock().unwrap()));
    AwsLocal {
        child,
        base: format!("http://{addr}"),
        table,
        logs,
        _broker: broker,
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url)
        .await
        .expect("connect")
        .0
}

/// The next text frame, as JSON.
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).unwrap(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The close code the server sent.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(_) => return None,
            Err(_) => panic!("not closed within {WAIT:?}"),
        }
    }
}

fn ddb() -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&sdk(dynamodb_endpoint()))
}

/// The connections with rows in the table.
async fn connections(table: &str) -> Vec<String> {
    let prefix = lambdas::store::conn_pk("");
    let mut ids: Vec<String> = keys(&ddb(), table)
        .await
        .iter()
        .filter_map(|k| {
            k.split('|')
                .next()?
                .strip_prefix(&prefix)
                .map(str::to_string)
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Connects and subscribes; the connection's id (read from its rows).
async fn connected(al: &AwsLocal) -> (Ws, String) {
    let before = connections(&al.table).await;
    let mut ws = connect(&al.ws()).await;
    ws.send(Message::text(
        r#"{"action":"subscribe","channel":"d/x","id":1}"#,
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await, json!({"type":"ack","id":1}));
    let now = connections(&al.table).await;
    let new: Vec<_> = now.into_iter().filter(|c| !before.contains(c)).collect();
    assert_eq!(new.len(), 1, "one new connection's rows");
    (ws, new[0].clone())
}

/// Waits until `id` has no rows (its `$disconnect` ran).
async fn gone(al: &AwsLocal, id: &str, how: &str) {
    let deadline = Instant::now() + WAIT;
    while connections(&al.table).await.iter().any(|c| c == id) {
        assert!(
            Instant::now() < deadline,
            "{how}: the rows of {id} are still there; logs:\n{}",
            al.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn aws_sdk() -> aws_config::SdkConfig {
    sdk("http://unused.invalid")
}

fn management(al: &AwsLocal) -> lambdas::sender::Sender {
    lambdas::aws::sender(&aws_sdk(), &Calls::new(), &format!("{}/prod", al.base)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_runs_however_a_connection_ends() {
    let al = start(&["--idle-timeout", "3s"]);
    // The client closes.
    let (mut ws, id) = connected(&al).await;
    ws.close(None).await.unwrap();
    gone(&al, &id, "close frame").await;
    // The socket drops without a close frame.
    let (ws, id) = connected(&al).await;
    drop(ws);
    gone(&al, &id, "dropped socket").await;
    // A binary frame (1003), a frame over 32 KB (1009).
    let (mut ws, id) = connected(&al).await;
    ws.send(Message::binary(vec![1u8, 2])).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1003));
    gone(&al, &id, "binary frame").await;
    let (mut ws, id) = connected(&al).await;
    ws.send(Message::text("x".repeat(40 * 1024))).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1009));
    gone(&al, &id, "frame over 32 KB").await;
    // DeleteConnection (1000).
    let (mut ws, id) = connected(&al).await;
    let outcome = management(&al).close(&id).await;
    assert_eq!(outcome, lambdas::sender::Outcome::Delivered);
    assert_eq!(close_code(&mut ws).await, Some(1000));
    gone(&al, &id, "DeleteConnection").await;
    // The idle timeout (1001).
    let (mut ws, id) = connected(&al).await;
    assert_eq!(close_code(&mut ws).await, Some(1001));
    gone(&al, &id, "idle timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connections_api_answers_as_api_gateway_does() {
    let al = start(&["--client-buffer-bytes", "65536"]);
    let (mut ws, id) = connected(&al).await;
    let sender = management(&al);
    let unlimited = Budget::unlimited();
    // A signed post reaches the client as a text frame.
    let frame = Body::new(r#"{"type":"message","channel":"d/x","data":1}"#.into());
    assert_eq!(
        sender.post(&id, &frame, &unlimited).await,
        lambdas::sender::Outcome::Delivered
    );
    assert_eq!(next_json(&mut ws).await["data"], 1);
    // A connection that never was, or is no more: 410.
    assert_eq!(
        sender.post("AAAAAAAAAAAAAA==", &frame, &unlimited).await,
        lambdas::sender::Outcome::Gone
    );
    // GetConnection.
    let signer = Signer::new(
        &aws_sdk(),
        "execute-api",
        "ApiGatewayManagementApi",
        WAIT,
        &Calls::new(),
    )
    .unwrap();
    let url = |id: &str| {
        format!(
            "{}/prod/@connections/{}",
            al.base,
            lambdas::signed::encode_segment(id)
        )
    };
    let empty = Body::new(Default::default());
    let answer = signer
        .send("GetConnection", "GET", &url(&id), &[], &empty)
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    // Unsigned requests are refused, as API Gateway refuses them.
    let http = reqwest::Client::new();
    let unsigned = http.post(url(&id)).body("x").send().await.unwrap();
    assert_eq!(unsigned.status().as_u16(), 403);
    let got = http
        .get(url(&id))
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=x/y, SignedHeaders=host, Signature=00",
        )
        .send()
        .await
        .unwrap();
    let info: Value = serde_json::from_slice(&got.bytes().await.unwrap()).unwrap();
    assert_eq!(info["identity"]["sourceIp"], "127.0.0.1");
    assert!(
        info["connectedAt"].as_str().unwrap().ends_with('Z'),
        "{info}"
    );
    // Over 128 KB: 413, and the connection stays.
    let big = Body::new(bytes::Bytes::from(vec![b'x'; 128 * 1024 + 1]));
    assert!(matches!(
        sender.post(&id, &big, &unlimited).await,
        lambdas::sender::Outcome::Failed(_)
    ));
    // Closed: GetConnection and posts answer 410.
    ws.close(None).await.unwrap();
    gone(&al, &id, "close").await;
    let answer = signer
        .send("GetConnection", "GET", &url(&id), &[], &empty)
        .await
        .unwrap();
    assert_eq!(answer.status, 410);
    assert_eq!(
        sender.post(&id, &frame, &unlimited).await,
        lambdas::sender::Outcome::Gone
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_iot_data_plane_publishes_and_reads_retained_messages() {
    let al = start(&[]);
    let iot = lambdas::aws::iot_data(&sdk(&al.base), &Calls::new());
    let store = lambdas::iot::Iot::new(iot.clone());
    store
        .publish("r/a", b"one".to_vec(), 1, true)
        .await
        .expect("a retained publish");
    store
        .publish("r/b", b"two".to_vec(), 0, true)
        .await
        .unwrap();
    store
        .publish("r/c", b"live".to_vec(), 1, false)
        .await
        .unwrap();
    assert_eq!(store.retained("r/a").await.unwrap(), Some(b"one".to_vec()));
    assert_eq!(store.retained("r/c").await.unwrap(), None);
    // Listed and filtered as the handler reads them.
    let found = store
        .retained_matching(
            "r/+",
            &lambdas::iot::RetainedLimits::with_messages(10),
            &Budget::unlimited(),
        )
        .await
        .unwrap();
    let topics: Vec<_> = found.messages.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(topics, ["r/a", "r/b"]);
    // An empty retained publish removes it.
    store.publish("r/a", Vec::new(), 1, true).await.unwrap();
    assert_eq!(store.retained("r/a").await.unwrap(), None);
    // IoT Core's limits.
    let e = iot.publish().topic("a/+").qos(1).send().await.unwrap_err();
    assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(400));
    let e = iot
        .publish()
        .topic("big")
        .payload(aws_sdk_iotdataplane::primitives::Blob::new(vec![
            0u8;
            128 * 1024
                + 1
        ]))
        .send()
        .await
        .unwrap_err();
    assert_eq!(e.raw_response().map(|r| r.status().as_u16()), Some(413));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambdas_invoke_api_queues_and_refuses_as_lambda_does() {
    let al = start(&[]);
    let signer = Signer::new(&aws_sdk(), "lambda", "Lambda", WAIT, &Calls::new()).unwrap();
    let url = |f: &str| format!("{}/2015-03-31/functions/{f}/invocations", al.base);
    let event = Body::new(serde_json::to_vec(&rule_event("x/y", b"1")).unwrap().into());
    let headers = [("x-amz-invocation-type", "Event")];
    let answer = signer
        .send("Invoke", "POST", &url("iot-fanout"), &headers, &event)
        .await
        .unwrap();
    assert_eq!(answer.status, 202);
    let arn = "arn:aws:lambda:us-east-1:123456789012:function:iot-fanout";
    let answer = signer
        .send(
            "Invoke",
            "POST",
            &url(&lambdas::signed::encode_segment(arn)),
            &headers,
            &event,
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 202);
    let answer = signer
        .send("Invoke", "POST", &url("nope"), &headers, &event)
        .await
        .unwrap();
    assert_eq!(answer.status, 404);
    let bad = Body::new("not json".into());
    let answer = signer
        .send("Invoke", "POST", &url("iot-fanout"), &headers, &bad)
        .await
        .unwrap();
    assert_eq!(answer.status, 400);
    let unsigned = reqwest::Client::new()
        .post(url("iot-fanout"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status().as_u16(), 403);
    // The queued events ran.
    let deadline = Instant::now() + WAIT;
    while al.logs().matches("\"Function\":\"iot-fanout\"").count() < 2 {
        assert!(Instant::now() < deadline, "{}", al.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every process aws-local started goes when it goes, even by SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn its_processes_die_with_it() {
    let mut al = start(&[]);
    let pid = al.child.id();
    let children = |pid: u32| -> Vec<u32> {
        let mut out = Vec::new();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
        out
    };
    let kids = children(pid);
    // Two ws-handler, two iot-fanout (auth is off: no authorizer).
    assert!(kids.len() >= 4, "{kids:?}");
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = al.child.wait();
    let deadline = Instant::now() + WAIT;
    loop {
        let alive: Vec<_> = kids
            .iter()
            .filter(|k| {
                std::fs::read_to_string(format!("/proc/{k}/stat"))
                    .is_ok_and(|s| !s.contains(") Z "))
            })
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still running: {alive:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A setting aws-local cannot use stops it at start, saying what to do,
/// and never repeating a secret.
#[test]
fn bad_settings_stop_it_at_start() {
    let broker = mosquitto();
    let run = |port: u16, args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = serve_command(port, "unused", args);
        cmd.envs(env.iter().copied());
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout)
    };
    let out = run(broker.port, &["--functions-dir", "/nonexistent"], &[]);
    assert!(out.contains("cargo build --release -p lambdas"), "{out}");
    let out = run(
        broker.port,
        &["--parameter", "JwtSecret=hunter2hunter2"],
        &[],
    );
    assert!(
        out.contains("BRIDGE_JWT_SECRET") && !out.contains("hunter2"),
        "{out}"
    );
    let out = run(broker.port, &["--parameter", "MaxSubscriptions=0"], &[]);
    assert!(out.contains("MaxSubscriptions"), "{out}");
    let out = run(free_port(), &[], &[]);
    assert!(out.contains("cannot reach the MQTT broker"), "{out}");
    let out = run(
        broker.port,
        &[],
        &[("BRIDGE_JWT_SECRET", "short-secret-hunter2")],
    );
    assert!(!out.contains("hunter2"), "{out}");
    assert!(
        out.contains("ws-authorizer") || out.contains("ws-handler"),
        "{out}"
    );
}

/// A rebuilt function binary replaces the running processes once they are
/// idle (the development loop): connections stay and keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_function_takes_over_and_connections_stay() {
    // The functions behind small scripts, so "rebuilding" one is rewriting
    // its script.
    let dir = std::env::temp_dir().join(format!("aws-local-fns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let built = std::path::Path::new(env!("CARGO_BIN_EXE_aws-local"))
        .parent()
        .unwrap();
    let write = |name: &str, note: &str| {
        use std::os::unix::fs::PermissionsExt;
        let script = dir.join(name);
        let tmp = dir.join(format!(".{name}"));
        let body = format!(
            "#!/bin/sh\n# {note}\nexec {} \"$@\"\n",
            built.join(name).display()
        );
        std::fs::write(&tmp, body).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &script).unwrap();
    };
    for f in ["ws-handler", "ws-authorizer", "iot-fanout"] {
        write(f, "first build");
    }
    let al = start(&["--functions-dir", dir.to_str().unwrap()]);
    let (mut ws, _) = connected(&al).await;
    // Some time later, a build rewrites ws-handler.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    write("ws-handler", "second build");
    let deadline = Instant::now() + WAIT;
    while al.logs().matches("running the new binary").count() < 2 {
        assert!(Instant::now() < deadline, "not replaced:\n{}", al.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The same connection, served by the new processes.
    ws.send(Message::text(
        r#"{"action":"subscribe","channel":"d/y","id":2}"#,
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await, json!({"type":"ack","id":2}));
    // Only ws-handler's processes were replaced.
    let logs = al.logs();
    let replaced: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("running the new binary"))
        .collect();
    assert!(
        replaced.iter().all(|l| l.contains("ws-handler.")),
        "{replaced:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
