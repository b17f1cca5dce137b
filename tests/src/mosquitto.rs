//! Mosquitto, the reference external broker: one of the test's own on a free
//! port, without persistence, that a test can kill and restart.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::processes::{die_with_parent, free_port, wait_connectable};

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
