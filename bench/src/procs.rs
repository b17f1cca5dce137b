//! The servers under test, started and stopped by the bench itself: `bridge
//! serve` (embedded broker or an external Mosquitto) and Mosquitto with its
//! own WebSocket listener. Also what the bench reads about a process from
//! /proc (resident memory, CPU time), free ports, and the file limit.
//!
//! Every server is a child process owned by a [`Proc`]; dropping it stops the
//! process (SIGTERM, then SIGKILL after 5 s), so an error or Ctrl-C in the
//! middle of a run leaves nothing behind.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A temporary directory for configs and logs, removed on drop (unless kept).
pub struct TempDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl TempDir {
    pub fn new() -> Result<Self, String> {
        let path = std::env::temp_dir().join(format!("bridge-bench-{}", std::process::id()));
        fs::create_dir_all(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Raises this process's soft RLIMIT_NOFILE to the hard limit (children
/// inherit it). Returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

/// The kernel's send queue of established IPv4 TCP connections on this host
/// (/proc/net/tcp): over those whose local port is `local` and remote port
/// one of `remotes` (each counted once), how many there are and the bytes
/// they hold not yet acknowledged by the peer (`tx_queue`). Memory the
/// kernel holds for a process, not counted in its RSS.
pub fn tcp_send_queues(local: u16, remotes: &HashSet<u16>) -> (usize, u64) {
    const ESTABLISHED: &str = "01";
    let text = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = |addr: &str| {
        let hex = addr.rsplit(':').next()?;
        u16::from_str_radix(hex, 16).ok()
    };
    let mut seen = HashSet::new();
    let mut bytes = 0;
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, l, r, state, queues, ..] = fields[..] else {
            continue;
        };
        if state != ESTABLISHED || port(l) != Some(local) {
            continue;
        }
        let Some(r) = port(r).filter(|p| remotes.contains(p)) else {
            continue;
        };
        if seen.insert(r) {
            let tx = queues.split(':').next().unwrap_or("0");
            bytes += u64::from_str_radix(tx, 16).unwrap_or(0);
        }
    }
    (seen.len(), bytes)
}

/// A free TCP port on 127.0.0.1 (never 1883, which the system broker uses).
pub fn free_port() -> Result<u16, String> {
    for _ in 0..10 {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
        let port = l.local_addr().map_err(|e| e.to_string())?.port();
        if port != 1883 {
            return Ok(port);
        }
    }
    Err("no free port".into())
}

/// A field of /proc/PID/status in KiB (e.g. `VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// User + system CPU seconds of a process (`None` for this process: "self").
pub fn cpu_secs(pid: Option<u32>) -> f64 {
    match pid {
        Some(pid) => stat_cpu_secs(&format!("/proc/{pid}/stat")),
        None => stat_cpu_secs("/proc/self/stat"),
    }
}

/// The calling thread's kernel id (for [`thread_cpu_secs`]).
pub fn thread_id() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// User + system CPU seconds of one of this process's threads.
pub fn thread_cpu_secs(tid: u32) -> f64 {
    stat_cpu_secs(&format!("/proc/self/task/{tid}/stat"))
}

/// User + system CPU seconds from a `stat` file of /proc.
fn stat_cpu_secs(path: &str) -> f64 {
    let Ok(text) = fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is the
    // first, utime the 12th, stime the 13th.
    let Some(rest) = text.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// A server process the bench started.
pub struct Proc {
    pub name: &'static str,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmRSS").unwrap_or(0)
    }

    /// Peak resident memory (since the start, or the last [`Proc::reset_peak`]).
    pub fn hwm_kib(&self) -> u64 {
        status_kib(self.pid(), "VmHWM").unwrap_or(0)
    }

    /// Starts measuring the peak resident memory afresh (VmHWM := VmRSS),
    /// so a phase's peak is its own.
    pub fn reset_peak(&self) -> Result<(), String> {
        let path = format!("/proc/{}/clear_refs", self.pid());
        fs::write(&path, "5").map_err(|e| format!("cannot reset the peak RSS ({path}): {e}"))
    }

    pub fn cpu_secs(&self) -> f64 {
        cpu_secs(Some(self.pid()))
    }

    /// An error if the process has exited, with the end of its log.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} exited ({status}); end of its log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            )),
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }
}

impl Proc {
    /// SIGTERM, then SIGKILL after 5 s. Says how it went.
    pub fn stop(mut self) -> String {
        self.terminate()
    }

    fn terminate(&mut self) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("{} had already exited ({status})", self.name);
        }
        let start = Instant::now();
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return format!(
                    "{} stopped {:.1} s after SIGTERM",
                    self.name,
                    start.elapsed().as_secs_f64()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        format!("{} did not stop within 5 s of SIGTERM: killed", self.name)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate();
    }
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

pub fn check_executable(path: &Path, what: &str, hint: &str) -> Result<(), String> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        _ => Err(format!("{what} not found at {}: {hint}", path.display())),
    }
}

pub const BRIDGE_HINT: &str =
    "build it first with `cargo build --release -p bridge` (same target dir), or pass --bridge PATH";
pub const MOSQUITTO_HINT: &str = "install it (`apt-get install mosquitto`), pass --mosquitto \
     PATH, or leave the mosquitto targets out (--targets bridge)";

/// How the bridge reaches its broker.
pub enum BrokerMode {
    /// The embedded broker on this port (devices connect there).
    Embedded(u16),
    /// An external broker at mqtt://127.0.0.1:PORT.
    External(u16),
}

/// Starts `bridge serve` with `args` beyond its listener and broker, and
/// waits for its "listening" line. The caller has checked `bin` with
/// [`check_executable`].
pub fn start_bridge(
    bin: &Path,
    broker: &BrokerMode,
    args: &[String],
    log_filter: &str,
    dir: &Path,
    tag: &str,
) -> Result<(Proc, SocketAddr), String> {
    let log = dir.join(format!("bridge-{tag}.log"));
    let stderr = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(["--mqtt-client-id", &format!("bench-bridge-{tag}")])
        .args(args);
    match broker {
        BrokerMode::Embedded(port) => {
            cmd.args(["--embedded-broker", &format!("127.0.0.1:{port}")]);
        }
        BrokerMode::External(port) => {
            cmd.args(["--mqtt-url", &format!("mqtt://127.0.0.1:{port}")]);
        }
    }
    // The bridge reads its settings from `BRIDGE_*` too: none of the
    // caller's (a config file, auth, TLS) may change what is measured.
    for (key, _) in std::env::vars_os() {
        if key.as_encoded_bytes().starts_with(b"BRIDGE_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", log_filter)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut proc = Proc {
        name: "bridge",
        child,
        log,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                // Nobody listens any more: keep draining so the pipe never fills.
                continue;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = tokio::task::block_in_place(|| loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("bridge did not print its listening line within 20 s".to_string());
        }
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("bridge listening on ws://") {
                    let addr = rest.trim_end_matches("/ws").trim();
                    return addr
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("bad listening line {line:?}: {e}"));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => proc.check_alive()?,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                proc.check_alive()?;
                return Err("bridge closed its stdout without a listening line".to_string());
            }
        }
    });
    match addr {
        Ok(addr) => Ok((proc, addr)),
        Err(e) => {
            let tail = log_tail(&proc.log);
            Err(format!("{e}\nbridge log:\n{tail}"))
        }
    }
}

/// The ports of a started Mosquitto.
pub struct MosquittoPorts {
    pub mqtt: u16,
    pub ws: Option<u16>,
}

/// Starts Mosquitto from a config file in `dir`: an MQTT listener and, with
/// `websockets`, its own WebSocket listener, both on 127.0.0.1 only. The
/// caller has checked `bin` with [`check_executable`].
pub async fn start_mosquitto(
    bin: &Path,
    websockets: bool,
    max_queued: usize,
    dir: &Path,
    tag: &str,
) -> Result<(Proc, MosquittoPorts), String> {
    let mqtt = free_port()?;
    let ws = if websockets {
        let mut p = free_port()?;
        while p == mqtt {
            p = free_port()?;
        }
        Some(p)
    } else {
        None
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut conf = String::from(
        "# Written by the channel bridge bench.\n\
         allow_anonymous true\n\
         persistence false\n\
         connection_messages false\n\
         # Like the bridge, which sets TCP_NODELAY on its sockets.\n\
         set_tcp_nodelay true\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         websockets_log_level 0\n",
    );
    // Per-client queue bound: the same number of messages as the bridge's
    // outbound queue, so both drop at the same backlog.
    conf.push_str(&format!("max_queued_messages {max_queued}\n"));
    if root {
        // Started as root, Mosquitto would drop to user `mosquitto`.
        conf.push_str("user root\n");
    }
    conf.push_str(&format!("listener {mqtt} 127.0.0.1\n"));
    if let Some(ws) = ws {
        conf.push_str(&format!(
            "listener {ws} 127.0.0.1\nprotocol websockets\nsocket_domain ipv4\n"
        ));
    }
    let conf_path = dir.join(format!("mosquitto-{tag}.conf"));
    fs::write(&conf_path, conf).map_err(|e| format!("{}: {e}", conf_path.display()))?;
    let log = dir.join(format!("mosquitto-{tag}.log"));
    let out = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut proc = Proc {
        name: "mosquitto",
        child,
        log,
    };
    for port in std::iter::once(mqtt).chain(ws) {
        wait_for_port(&mut proc, port).await?;
    }
    Ok((proc, MosquittoPorts { mqtt, ws }))
}

async fn wait_for_port(proc: &mut Proc, port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        proc.check_alive()?;
        if Instant::now() > deadline {
            return Err(format!(
                "{} is not listening on 127.0.0.1:{port} after 10 s; log:\n{}",
                proc.name,
                log_tail(&proc.log)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` over plain HTTP/1.1; the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| "no HTTP header".to_string())?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(head.lines().next().unwrap_or("").to_string());
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| format!("GET {path}: timed out"))?
}

/// The value of one sample in Prometheus text (`name` with its labels, as
/// written), or 0 when absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            if !rest.starts_with(' ') {
                return None;
            }
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0.0)
}
