//! Black-box test harness: starts real processes (the `bridge` binary, a
//! Mosquitto of its own on a free port) and talks to them over real sockets
//! with ordinary clients (tokio-tungstenite for the browser side, rumqttc for
//! devices). Nothing here knows the bridge's internals.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Makes a child die with the test process (a killed or timed-out test run
/// must not leave brokers and bridges behind).
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long a test watches for something that should not happen.
pub const QUIET: Duration = Duration::from_millis(400);

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_connectable(port: u16, what: &str) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on port {port} within {WAIT:?}");
}

/// The `bridge` binary of this build (target/<profile>/bridge).
pub fn bridge_bin() -> PathBuf {
    if let Ok(path) = std::env::var("BRIDGE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test binary>
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join("bridge");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p bridge`; `cargo test --workspace` does)",
        bin.display()
    );
    bin
}

fn mosquitto_bin() -> PathBuf {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if std::path::Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("mosquitto not found: install the Debian package `mosquitto` (.ci/run does)");
}

/// A Mosquitto broker of the test's own, on a free port.
pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    /// Further configuration lines (they apply to the one listener).
    extra_conf: String,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::start_with("")
    }

    /// Starts one with further configuration lines for its listener (TLS
    /// files, say).
    pub fn start_with(extra_conf: &str) -> Mosquitto {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("bridge-test-mosq-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = Mosquitto {
            port,
            dir,
            extra_conf: extra_conf.to_string(),
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n\
                 max_queued_messages 100000\nmax_inflight_messages 100\nlog_dest stderr\nlog_type error\n{}",
                self.port, self.extra_conf
            ),
        )
        .unwrap();
        let child = die_with_parent(&mut Command::new(mosquitto_bin()))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        wait_connectable(self.port, "mosquitto");
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Kills the broker (no goodbye to its clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Which broker the bridge talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Mosquitto,
}

/// A running `bridge serve`.
pub struct Bridge {
    pub addr: SocketAddr,
    /// The MQTT port devices use (the embedded broker's, or Mosquitto's).
    pub mqtt_port: u16,
    child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

/// Options for starting a bridge.
#[derive(Default, Clone)]
pub struct Opts {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Opts {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

impl Bridge {
    /// Starts a bridge on its embedded broker.
    pub fn embedded(opts: Opts) -> Bridge {
        let mqtt_port = free_port();
        let opts = opts.args([
            "--embedded-broker".to_string(),
            format!("127.0.0.1:{mqtt_port}"),
        ]);
        Bridge::spawn(opts, mqtt_port)
    }

    /// Starts a bridge on an external broker.
    pub fn external(mosquitto: &Mosquitto, opts: Opts) -> Bridge {
        Bridge::spawn(
            opts.args(["--mqtt-url".to_string(), mosquitto.url()]),
            mosquitto.port,
        )
    }

    /// Starts a bridge with exactly these options (they say where the broker
    /// is); `mqtt_port` is where devices connect.
    pub fn spawn(opts: Opts, mqtt_port: u16) -> Bridge {
        let mut cmd = Command::new(bridge_bin());
        die_with_parent(&mut cmd);
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(&opts.args);
        cmd.env_remove("BRIDGE_JWT_SECRET").env(
            "RUST_LOG",
            "info,rumqttd=off,rumqttd::segments=warn,rumqttc=warn",
        );
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bridge");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("bridge listening on ") {
                    let rest = rest
                        .trim_start_matches("ws://")
                        .trim_start_matches("wss://");
                    let _ = tx.send(rest.trim_end_matches("/ws").to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(WAIT) {
            Ok(addr) => addr.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                std::thread::sleep(Duration::from_millis(100));
                panic!("bridge did not start; stderr:\n{}", stderr.lock().unwrap());
            }
        };
        Bridge {
            addr,
            mqtt_port,
            child,
            stderr,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// One value from `/metrics`: the sample whose line starts with `name`
    /// (labels included, e.g. `bridge_messages_dropped_total{reason="lagged"}`).
    pub async fn metric(&self, name: &str) -> f64 {
        let (_, text) = http_get(&self.http("/metrics")).await;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("metric {name} missing in\n{text}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the bridge logged so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Resident memory of the bridge process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "bridge did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP GET, returning (status, body).
pub async fn http_get(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Runs `openssl` in `dir` and checks it succeeded.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (Debian package openssl) is needed to make test keys and certificates");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throw-away PKI in `dir`: `ca.pem`/`ca.key`, `server.pem`/`server.key`
/// (for localhost and 127.0.0.1) and `client.pem`/`client.key` (a client
/// certificate, as an AWS IoT device has), all signed by the CA.
pub fn make_pki(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    let rsa = ["-newkey", "rsa:2048", "-nodes"];
    openssl(
        dir,
        &[
            &["req", "-x509"],
            &rsa[..],
            &[
                "-days",
                "1",
                "-subj",
                "/CN=test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    for (name, cn) in [("server", "localhost"), ("client", "bridge-device")] {
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let subj = format!("/CN={cn}");
        openssl(
            dir,
            &[
                &["req"],
                &rsa[..],
                &["-subj", &subj, "-keyout", &key, "-out", &csr],
            ]
            .concat(),
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ],
        );
    }
}

/// A rustls client configuration that trusts the PEM CA `ca`.
pub fn client_tls(ca: &std::path::Path) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// GET /healthz over https, trusting `ca` (a PEM file): (status, response).
pub async fn https_healthz(bridge: &Bridge, ca: &std::path::Path) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connector = tokio_rustls::TlsConnector::from(client_tls(ca));
    let tcp = tokio::net::TcpStream::connect(bridge.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// One broker and one bridge on it.
pub struct Setup {
    pub backend: Backend,
    pub mosquitto: Option<Mosquitto>,
    pub bridge: Bridge,
}

impl Setup {
    pub fn new(backend: Backend) -> Setup {
        Setup::with(backend, Opts::default())
    }

    pub fn with(backend: Backend, opts: Opts) -> Setup {
        match backend {
            Backend::Embedded => Setup {
                backend,
                mosquitto: None,
                bridge: Bridge::embedded(opts),
            },
            Backend::Mosquitto => {
                let m = Mosquitto::start();
                let bridge = Bridge::external(&m, opts);
                Setup {
                    backend,
                    mosquitto: Some(m),
                    bridge,
                }
            }
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.bridge.ws_url()).await
    }

    pub async fn device(&self, id: &str) -> Device {
        Device::connect(self.bridge.mqtt_port, id).await
    }
}

/// Generates one test per backend from `async fn body(setup: Setup)`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                ($body)($crate::Setup::new($crate::Backend::Embedded)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() {
                ($body)($crate::Setup::new($crate::Backend::Mosquitto)).await;
            }
        }
    };
    ($name:ident, $opts:expr, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                ($body)($crate::Setup::with($crate::Backend::Embedded, $opts)).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() {
                ($body)($crate::Setup::with($crate::Backend::Mosquitto, $opts)).await;
            }
        }
    };
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What a WebSocket client received.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Json(Value),
    Close(Option<u16>),
}

/// A browser-side client.
pub struct Client {
    ws: Ws,
    next_id: u64,
    /// Frames read while waiting for a reply, in order.
    backlog: std::collections::VecDeque<Value>,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Client::try_connect(url, None)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    /// Connects with optional extra headers; Err carries the HTTP status.
    pub async fn try_connect(url: &str, bearer: Option<&str>) -> Result<Client, String> {
        let mut req = url.into_client_request().unwrap();
        if let Some(token) = bearer {
            req.headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(Client {
                ws,
                next_id: 1,
                backlog: Default::default(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                Err(format!("HTTP {}", resp.status().as_u16()))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws.send(Message::binary(data)).await.unwrap();
    }

    /// The next frame (backlog first), or None after `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<Frame> {
        if let Some(v) = self.backlog.pop_front() {
            return Some(Frame::Json(v));
        }
        self.read_within(within).await
    }

    async fn read_within(&mut self, within: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match msg {
                None => return Some(Frame::Close(None)),
                Some(Err(_)) => return Some(Frame::Close(None)),
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t)
                        .unwrap_or_else(|e| panic!("server sent non-JSON {t:?}: {e}"));
                    return Some(Frame::Json(v));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Some(Frame::Close(frame.map(|f: CloseFrame| u16::from(f.code))));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next text frame as is (no JSON parsing, for load tests).
    pub async fn next_text(&mut self) -> String {
        if let Some(v) = self.backlog.pop_front() {
            return v.to_string();
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next JSON frame; panics after WAIT.
    pub async fn next_json(&mut self) -> Value {
        match self.next_within(WAIT).await {
            Some(Frame::Json(v)) => v,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Sends a request with a fresh id and returns the reply carrying it; other
    /// frames read meanwhile are kept for `next_*`.
    pub async fn request(&mut self, mut v: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        v["id"] = json!(id);
        self.send(v).await;
        self.reply_to(json!(id)).await
    }

    /// Waits for the frame carrying `id`.
    pub async fn reply_to(&mut self, id: Value) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_within(left).await {
                Some(Frame::Json(f)) if f.get("id") == Some(&id) => return f,
                Some(Frame::Json(f)) => self.backlog.push_back(f),
                other => panic!("waiting for the reply to id {id}: got {other:?}"),
            }
        }
    }

    /// Sends `v` and expects the error `code` (with the request's id).
    pub async fn expect_error(&mut self, v: Value, code: &str) -> Value {
        let reply = self.request(v.clone()).await;
        assert_eq!(reply["type"], "error", "request {v} got {reply}");
        assert_eq!(reply["code"], code, "request {v} got {reply}");
        assert!(
            reply["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error without a message: {reply}"
        );
        reply
    }

    pub async fn subscribe(&mut self, channel: &str) {
        let reply = self
            .request(json!({"action":"subscribe","channel":channel}))
            .await;
        assert_eq!(reply["type"], "ack", "subscribe {channel}: {reply}");
    }

    pub async fn unsubscribe(&mut self, channel: &str) {
        let reply = self
            .request(json!({"action":"unsubscribe","channel":channel}))
            .await;
        assert_eq!(reply["type"], "ack", "unsubscribe {channel}: {reply}");
    }

    pub async fn publish(&mut self, channel: &str, data: Value) {
        let reply = self
            .request(json!({"action":"publish","channel":channel,"data":data}))
            .await;
        assert_eq!(reply["type"], "ack", "publish {channel}: {reply}");
    }

    /// The next `message` frame (skipping nothing: any other frame fails).
    pub async fn next_message(&mut self) -> Value {
        let f = self.next_json().await;
        assert_eq!(f["type"], "message", "expected a message, got {f}");
        f
    }

    /// Asserts nothing arrives for QUIET.
    pub async fn expect_silence(&mut self) {
        if let Some(f) = self.next_within(QUIET).await {
            panic!("expected nothing, got {f:?}");
        }
    }

    /// Asserts the connection still answers (a ping round trip).
    pub async fn assert_alive(&mut self) {
        let reply = self.request(json!({"action":"ping"})).await;
        assert_eq!(reply["type"], "pong");
    }

    /// Waits for the server to close; returns the close code.
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.read_within(WAIT).await {
                Some(Frame::Close(code)) => return code,
                Some(Frame::Json(_)) => continue,
                None => panic!("the server did not close the connection"),
            }
        }
    }
}

/// A device: an ordinary MQTT client (rumqttc) on the broker.
pub struct Device {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<rumqttc::Publish>,
    subacks: mpsc::UnboundedReceiver<()>,
    pubacks: mpsc::UnboundedReceiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    pub async fn connect(port: u16, id: &str) -> Device {
        let mut opts = MqttOptions::new(format!("{id}-{}", free_port()), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        opts.set_inflight(1000);
        let (client, mut eventloop) = AsyncClient::new(opts, 100_000);
        let (tx, rx) = mpsc::unbounded_channel();
        let (stx, subacks) = mpsc::unbounded_channel();
        let (ptx, pubacks) = mpsc::unbounded_channel();
        let (ctx, mut connected) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        let _ = ctx.send(());
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = stx.send(());
                    }
                    Ok(Event::Incoming(Incoming::PubAck(_))) => {
                        let _ = ptx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, connected.recv())
            .await
            .expect("device connect")
            .unwrap();
        Device {
            client,
            rx,
            subacks,
            pubacks,
            task,
        }
    }

    /// Publishes and, for QoS 1, waits for the broker's PUBACK.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        qos: u8,
        retain: bool,
    ) {
        let q = if qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        self.client
            .publish(topic, q, retain, payload.into())
            .await
            .unwrap();
        if qos == 1 {
            tokio::time::timeout(WAIT, self.pubacks.recv())
                .await
                .expect("puback")
                .unwrap();
        }
    }

    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(WAIT, self.subacks.recv())
            .await
            .expect("suback")
            .unwrap();
    }

    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("no MQTT message")
            .unwrap()
    }

    pub async fn expect_silence(&mut self) {
        if let Ok(Some(p)) = tokio::time::timeout(QUIET, self.rx.recv()).await {
            panic!("expected no MQTT message, got {p:?}");
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Signs a test token with an HS256 secret.
pub fn hs256_token(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
