//! The server process under test: how it is started (`Opts`), where it
//! listens, and what can be read from outside it (logs, `/metrics`, RSS, its
//! exit status). Usually `bridge serve`; for the AWS backend the
//! `aws-local serve` process that plays API Gateway (see `awslocal`), which
//! has no `/metrics`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::http::http_get;
use crate::mosquitto::Mosquitto;
use crate::processes::{append, built_binary, die_with_parent, free_port, on_lines, WAIT};

/// The `bridge` binary of this build (target/<profile>/bridge).
pub fn bridge_bin() -> PathBuf {
    built_binary("bridge", "BRIDGE_BIN", "bridge")
}

/// A running `bridge serve`.
pub struct Bridge {
    pub addr: SocketAddr,
    /// The MQTT port devices use (the embedded broker's, or the external one's).
    pub mqtt_port: u16,
    /// The `--topic-prefix` (or `BRIDGE_TOPIC_PREFIX`) it was started with.
    topic_prefix: Option<String>,
    child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

/// Options for starting a bridge.
#[derive(Default, Clone)]
pub struct Opts {
    /// `bridge serve` flags.
    pub args: Vec<String>,
    /// Environment of the server (either kind).
    pub env: Vec<(String, String)>,
    /// `aws-local serve` flags (e.g. `--parameter MaxSubscriptions=3`).
    pub aws_args: Vec<String>,
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
    pub fn aws_args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.aws_args.extend(a.into_iter().map(Into::into));
        self
    }

    /// The topic prefix these options give the bridge (the flag over the
    /// environment variable; slashes around it and an empty one mean what
    /// they mean to the bridge).
    pub(crate) fn topic_prefix(&self) -> Option<String> {
        let flag = self.args.iter().enumerate().find_map(|(i, a)| {
            if a == "--topic-prefix" {
                self.args.get(i + 1).cloned()
            } else {
                a.strip_prefix("--topic-prefix=").map(str::to_string)
            }
        });
        let env = || {
            self.env
                .iter()
                .rev()
                .find(|(k, _)| k == "BRIDGE_TOPIC_PREFIX")
                .map(|(_, v)| v.clone())
        };
        flag.or_else(env)
            .map(|p| p.trim_matches('/').to_string())
            .filter(|p| !p.is_empty())
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
        let topic_prefix = opts.topic_prefix();
        let mut cmd = Command::new(bridge_bin());
        die_with_parent(&mut cmd);
        cmd.arg("serve");
        // A free port, unless the options name one (a test that restarts
        // the bridge where its clients reconnect).
        if !opts
            .args
            .iter()
            .any(|a| a == "--listen" || a.starts_with("--listen="))
        {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(&opts.args);
        cmd.env_remove("BRIDGE_JWT_SECRET")
            .env("RUST_LOG", "info,rmqtt=warn,rmqtt_net=warn,rumqttc=warn");
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bridge");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr.clone();
        on_lines(child.stderr.take().unwrap(), move |line| {
            append(&sink, &line)
        });
        let (tx, rx) = std::sync::mpsc::channel();
        on_lines(child.stdout.take().unwrap(), move |line| {
            if let Some(rest) = line.strip_prefix("bridge listening on ") {
                let rest = rest
                    .trim_start_matches("ws://")
                    .trim_start_matches("wss://");
                let _ = tx.send(rest.trim_end_matches("/ws").to_string());
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
            topic_prefix,
            child,
            stderr,
        }
    }

    /// A server process started elsewhere (aws-local), listening on `addr`,
    /// its output collected in `logs`.
    pub(crate) fn adopt(
        child: Child,
        addr: SocketAddr,
        mqtt_port: u16,
        topic_prefix: Option<String>,
        logs: std::sync::Arc<std::sync::Mutex<String>>,
    ) -> Bridge {
        Bridge {
            addr,
            mqtt_port,
            topic_prefix,
            child,
            stderr: logs,
        }
    }

    /// The broker topic prefix web clients never see (channel `a/b` is the
    /// MQTT topic `PREFIX/a/b`), if the bridge was started with one.
    pub fn topic_prefix(&self) -> Option<&str> {
        self.topic_prefix.as_deref()
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
        crate::processes::terminate(&mut self.child, "bridge")
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
