//! `aws-local`, the AWS deployment on one machine (`lambdas`' binary: API
//! Gateway, the Lambda Runtime API, `@connections`, IoT Data and the topic
//! rule played around the real function binaries), as a backend: web
//! clients connect to its `/ws`, devices to a Mosquitto of the test's own
//! that plays IoT Core's message side.
//!
//! DynamoDB is one `aws-local dynamodb` (moto behind a one-request-at-a-time
//! front) per test process, shared by every aws-local of the process, each
//! with a table of its own. moto takes about 3 s to boot: the backend macros
//! start it early ([`warm_up`]).
//!
//! Every aws-local runs with `--parameter LookupCacheMillis=0` (the fan-out
//! then reads DynamoDB for every message, and a subscribe's ack does not wait
//! a second for cached reads to age) and two processes per function (each
//! takes a quarter of a second of CPU to start); a test's own flags win.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::bridge::{Bridge, Opts};
use crate::mosquitto::Mosquitto;
use crate::processes::{append, built_binary, die_with_parent, on_lines};

/// How long an aws-local may take to start (its Lambda processes' init
/// included) on a busy machine.
pub const START: Duration = Duration::from_secs(60);

/// The `aws-local` binary of this build (target/<profile>/aws-local), or
/// `$AWS_LOCAL_BIN`.
pub fn aws_local_bin() -> PathBuf {
    built_binary("aws-local", "AWS_LOCAL_BIN", "lambdas")
}

/// Reads a child's output lines into `sink`; sends each line holding
/// `marker` to `found`.
fn collect(
    out: impl std::io::Read + Send + 'static,
    sink: Arc<Mutex<String>>,
    marker: &'static str,
    found: std::sync::mpsc::Sender<String>,
) {
    on_lines(out, move |line| {
        if line.contains(marker) {
            let _ = found.send(line.clone());
        }
        append(&sink, &line);
    });
}

/// The URL after `marker` in a line.
fn url_after(line: &str, marker: &str) -> String {
    line.split(marker)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

/// The shared DynamoDB endpoint, or why it did not start.
static DYNAMODB: OnceLock<Result<String, String>> = OnceLock::new();

/// This process's DynamoDB (started on first use).
pub fn dynamodb() -> &'static str {
    match shared_dynamodb() {
        Ok(endpoint) => endpoint,
        Err(e) => panic!("aws-local dynamodb did not start: {e}"),
    }
}

/// Starts this process's DynamoDB in the background.
pub fn warm_up() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::thread::spawn(shared_dynamodb);
    });
}

fn shared_dynamodb() -> &'static Result<String, String> {
    DYNAMODB.get_or_init(|| {
        // It dies with the thread that started it: one that lives as long
        // as the process.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("aws-local-dynamodb".into())
            .spawn(move || {
                let logs = Arc::new(Mutex::new(String::new()));
                let (found_tx, found) = std::sync::mpsc::channel();
                let mut cmd = Command::new(aws_local_bin());
                die_with_parent(&mut cmd);
                let child = cmd
                    .args(["dynamodb", "--listen", "127.0.0.1:0"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn();
                let mut child = match child {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(format!("cannot start aws-local: {e}")));
                        return;
                    }
                };
                collect(
                    child.stdout.take().unwrap(),
                    logs.clone(),
                    "listening on",
                    found_tx.clone(),
                );
                collect(
                    child.stderr.take().unwrap(),
                    logs.clone(),
                    "listening on",
                    found_tx,
                );
                let started = match found.recv_timeout(START) {
                    Ok(line) => Ok(url_after(&line, "listening on ")),
                    Err(_) => {
                        let _ = child.kill();
                        Err(format!(
                            "no endpoint within {START:?}; output:\n{}",
                            logs.lock().unwrap()
                        ))
                    }
                };
                let _ = tx.send(started);
                let _ = child.wait();
            })
            .unwrap();
        rx.recv()
            .unwrap_or_else(|_| Err("the aws-local dynamodb thread died".into()))
    })
}

/// Starts `aws-local serve` on `mosquitto` with `opts.aws_args` and
/// `opts.env` (`opts.args` are `bridge serve` flags, not its).
pub fn spawn(opts: &Opts, mosquitto: &Mosquitto) -> Bridge {
    static TABLES: AtomicU32 = AtomicU32::new(0);
    let table = format!(
        "t{}-{}",
        std::process::id(),
        TABLES.fetch_add(1, Ordering::Relaxed)
    );
    let mut cmd = Command::new(aws_local_bin());
    die_with_parent(&mut cmd);
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(["--mqtt-url", &mosquitto.url()])
        .args(["--dynamodb-endpoint", dynamodb()])
        .args(["--table-name", &table])
        .args(["--parameter", "LookupCacheMillis=0", "--concurrency", "2"])
        .args(&opts.aws_args);
    cmd.env_remove("BRIDGE_JWT_SECRET")
        .env_remove("BRIDGE_JWKS_URL")
        .env("RUST_LOG", "info");
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start aws-local");
    let logs = Arc::new(Mutex::new(String::new()));
    let (found_tx, found) = std::sync::mpsc::channel();
    collect(
        child.stdout.take().unwrap(),
        logs.clone(),
        "listening on ws://",
        found_tx.clone(),
    );
    collect(
        child.stderr.take().unwrap(),
        logs.clone(),
        "listening on ws://",
        found_tx,
    );
    let started = Instant::now();
    let addr = match found.recv_timeout(START) {
        Ok(line) => url_after(&line, "listening on ws://")
            .trim_end_matches("/ws")
            .parse()
            .unwrap(),
        Err(_) => {
            let _ = child.kill();
            std::thread::sleep(Duration::from_millis(100));
            panic!(
                "aws-local did not start within {:?}; its output:\n{}",
                started.elapsed(),
                logs.lock().unwrap()
            );
        }
    };
    let prefix = opts
        .aws_args
        .iter()
        .find_map(|a| a.strip_prefix("TopicPrefix="))
        .map(|p| p.trim_matches('/').to_string())
        .filter(|p| !p.is_empty());
    Bridge::adopt(child, addr, mosquitto.port, prefix, logs)
}
