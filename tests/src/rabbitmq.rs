//! RabbitMQ with its MQTT plugin, the second real external broker: a node of
//! the test process's own (Debian's `rabbitmq-server`), on free loopback
//! ports, with its own epmd, data and log directories in a temp dir.
//!
//! A node takes seconds to boot (the MQTT plugin alone waits 3-6 s for
//! cluster peers on a fresh node), so tests share one per test binary:
//! [`RabbitMq::shared`] starts it on first use and it lives until the process
//! exits. Tests on the shared node keep apart by topic prefix (see
//! `Setup::with`), not by node.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::processes::{die_with_parent, free_port};

/// The server start script of the Debian package. Not `/usr/sbin/rabbitmq-server`:
/// run as root, that wrapper switches to the `rabbitmq` user and the system's
/// directories.
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// How long a node may take to answer its first MQTT CONNECT. Booting takes
/// about 13 s on an idle 2-core machine; a test run keeps the cores busy.
const BOOT: Duration = Duration::from_secs(120);

/// A node's directory is `DIR_PREFIX<test process id>-<MQTT port>` in the
/// temp dir.
const DIR_PREFIX: &str = "bridge-test-rabbitmq-";

/// The node of [`RabbitMq::shared`], or why it did not start.
static SHARED: OnceLock<Result<RabbitMq, String>> = OnceLock::new();

/// A RabbitMQ node with the MQTT plugin, of the test's own.
pub struct RabbitMq {
    /// Where MQTT clients (devices, the bridge) connect.
    pub mqtt_port: u16,
    /// The AMQP 0-9-1 listener (unused by the tests, but a node must have one).
    pub amqp_port: u16,
    /// From spawning the node to its first CONNACK.
    pub boot_time: Duration,
    dir: PathBuf,
    /// The Erlang VM, leader of a process group with its port programs.
    node: Mutex<Child>,
    epmd: Mutex<Child>,
}

impl RabbitMq {
    /// Starts a node and waits until its MQTT listener answers a CONNECT.
    /// The caller's thread must outlive the node: the node is killed when the
    /// thread that started it exits (see `die_with_parent`).
    pub fn start() -> RabbitMq {
        assert!(
            Path::new(SERVER).exists(),
            "{SERVER} not found: install the Debian package `rabbitmq-server` \
             (scripts/install-test-deps.sh does)"
        );
        remove_dirs_of_dead_runs();
        let mut ports = Vec::new();
        while ports.len() < 4 {
            let port = free_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let (mqtt_port, amqp_port, dist_port, epmd_port) = (ports[0], ports[1], ports[2], ports[3]);
        let dir =
            std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{mqtt_port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_mqtt].\n").unwrap();
        // No environment file of the system's (/etc/rabbitmq/rabbitmq-env.conf).
        std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{amqp_port}\n\
                 mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}\n\
                 mqtt.allow_anonymous = true\n\
                 log.console = false\n\
                 log.file = rabbit.log\n\
                 log.file.level = info\n"
            ),
        )
        .unwrap();

        // An epmd of our own on a free port, so nothing of ours outlives the
        // test and nothing of the machine's (a system RabbitMQ) is in the way.
        let epmd = die_with_parent(&mut Command::new("epmd"))
            .args(["-address", "127.0.0.1", "-port", &epmd_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("epmd (Debian package erlang-base, a dependency of rabbitmq-server)");

        let out = std::fs::File::create(dir.join("stdout.log")).unwrap();
        let err = out.try_clone().unwrap();
        let mut cmd = Command::new(SERVER);
        die_with_parent(&mut cmd);
        {
            use std::os::unix::process::CommandExt;
            // One process group for the VM and its port programs, killed as one.
            cmd.process_group(0);
        }
        let node = cmd
            .current_dir(&dir)
            .env("HOME", &dir) // the Erlang cookie
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_NODENAME", "bridge-test@localhost")
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            // The start script then execs the VM (the PID stays ours and the
            // VM inherits die_with_parent) instead of forking it from a shell
            // that traps signals; -noinput keeps it from reading stdin.
            .env("RABBITMQ_ALLOW_INPUT", "true")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-noinput -start_epmd false -kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start rabbitmq-server");
        let mut rabbit = RabbitMq {
            mqtt_port,
            amqp_port,
            boot_time: Duration::ZERO,
            dir,
            node: Mutex::new(node),
            epmd: Mutex::new(epmd),
        };
        let started = Instant::now();
        let deadline = started + BOOT;
        loop {
            if mqtt_connack(mqtt_port) {
                break;
            }
            let exited = rabbit.node.get_mut().unwrap().try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "RabbitMQ did not answer an MQTT CONNECT on port {mqtt_port} within {:?} \
                     (exit status: {exited:?}); output:\n{}\nlog:\n{}",
                    started.elapsed(),
                    rabbit.read("stdout.log"),
                    rabbit.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        rabbit.boot_time = started.elapsed();
        rabbit
    }

    /// The node every test of this process shares, started on first use
    /// (or by [`RabbitMq::warm_up`]). It is killed when the process exits,
    /// also when the process is killed.
    pub fn shared() -> &'static RabbitMq {
        match shared_node() {
            Ok(rabbit) => rabbit,
            Err(e) => panic!("the shared RabbitMQ node did not start: {e}"),
        }
    }

    /// Starts booting the shared node in the background, so that it is up by
    /// the time a test needs it (`all_backends!` calls this from the tests of
    /// the other backends, which run first). A failure shows in `shared`.
    pub fn warm_up() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            std::thread::spawn(shared_node);
        });
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt_port)
    }

    /// What the node logged so far.
    pub fn logs(&self) -> String {
        self.read("log/rabbit.log")
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Kills the node's whole process group and its epmd, reaps them and
    /// removes the data directory.
    fn stop(&self) {
        let mut node = self.node.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: signals the process group this struct started.
        unsafe { libc::kill(-(node.id() as i32), libc::SIGKILL) };
        let _ = node.wait();
        let mut epmd = self.epmd.lock().unwrap_or_else(|e| e.into_inner());
        let _ = epmd.kill();
        let _ = epmd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The shared node, started on the first call; later callers wait for it.
fn shared_node() -> &'static Result<RabbitMq, String> {
    SHARED.get_or_init(|| {
        // Tests run on threads that end with the test, and the node dies with
        // the thread that started it: start it on one that lives as long as
        // the process.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("rabbitmq".into())
            .spawn(move || {
                let started = std::panic::catch_unwind(RabbitMq::start).map_err(|e| {
                    e.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                });
                let _ = tx.send(started);
                loop {
                    std::thread::park();
                }
            })
            .unwrap();
        let started = rx.recv().unwrap();
        if started.is_ok() {
            // SAFETY: registers a plain function; it runs at exit.
            unsafe { libc::atexit(stop_shared) };
        }
        started
    })
}

/// At exit, the shared node goes the way an owned one does on drop (were the
/// process killed instead, `die_with_parent` still kills the node and epmd;
/// only the temp dir would stay).
extern "C" fn stop_shared() {
    if let Some(Ok(rabbit)) = SHARED.get() {
        rabbit.stop();
    }
}

/// Removes the directories of nodes whose test process is gone: a killed
/// process cannot remove its own (its node dies with it, see `start`).
fn remove_dirs_of_dead_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Does an MQTT 3.1.1 CONNECT on `port` get a CONNACK that accepts it?
fn mqtt_connack(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let id = b"bridge-test-probe";
    let mut connect = vec![0x10, (12 + id.len()) as u8];
    // Protocol name, level 4, clean session, keep alive 60 s, client id.
    connect.extend_from_slice(&[
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0x02,
        0,
        60,
        0,
        id.len() as u8,
    ]);
    connect.extend_from_slice(id);
    if s.write_all(&connect).is_err() {
        return false;
    }
    let mut connack = [0u8; 4];
    let ok = s.read_exact(&mut connack).is_ok() && connack == [0x20, 0x02, 0x00, 0x00];
    let _ = s.write_all(&[0xe0, 0x00]); // DISCONNECT
    ok
}
