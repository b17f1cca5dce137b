//! `bridge simulate` as a process under test: started on a broker, its
//! device ids read from the line it prints, killed (SIGKILL: its devices'
//! last wills fire) or stopped (SIGTERM: they say offline themselves).

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bridge::bridge_bin;
use crate::processes::{append, die_with_parent, on_lines, WAIT};

/// A running `bridge simulate`.
pub struct Simulator {
    /// Its devices' ids, in order (`TAG-01` ...).
    pub ids: Vec<String>,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

impl Simulator {
    /// Starts `bridge simulate --mqtt-url URL --devices N` with `args` after
    /// them, and waits for the line that names its devices.
    pub fn start(mqtt_url: &str, devices: u32, args: &[&str]) -> Simulator {
        let mut cmd = Command::new(bridge_bin());
        die_with_parent(&mut cmd);
        cmd.args(["simulate", "--mqtt-url", mqtt_url, "--devices"])
            .arg(devices.to_string())
            .args(args)
            .env_remove("BRIDGE_MQTT_PASSWORD")
            .env("RUST_LOG", "info,rumqttc=warn");
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bridge simulate");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        on_lines(child.stderr.take().unwrap(), move |line| {
            append(&sink, &line)
        });
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let lines = stdout.clone();
        on_lines(child.stdout.take().unwrap(), move |line| {
            lines.lock().unwrap().push(line)
        });
        let mut sim = Simulator {
            ids: Vec::new(),
            child,
            stdout,
            stderr,
        };
        // "simulating N devices FIRST..LAST on URL (...)"
        let line = sim.wait_line("simulating ");
        let range = line.split_whitespace().nth(3).expect("device range");
        let (first, last) = range.split_once("..").expect("FIRST..LAST");
        let (tag, first_n) = first.rsplit_once('-').expect("TAG-NN");
        let width = first_n.len();
        let last_n: usize = last.rsplit_once('-').unwrap().1.parse().unwrap();
        assert_eq!(last_n, devices as usize, "{line}");
        sim.ids = (1..=last_n).map(|n| format!("{tag}-{n:0width$}")).collect();
        sim
    }

    /// Waits for a stdout line starting with `start` and returns it.
    pub fn wait_line(&mut self, start: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self
                .stdout
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with(start))
            {
                return line.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "bridge simulate exited ({status}) before printing {start:?}; stderr:\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "bridge simulate did not print {start:?} within {WAIT:?}; stderr:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every device has connected (the "all N devices online" line).
    pub fn wait_online(&mut self) {
        self.wait_line("all ");
    }

    /// Whether it printed a line starting with `start`.
    pub fn printed(&self, start: &str) -> bool {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with(start))
    }

    /// What it logged so far (stderr).
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGKILL: the process ends without a word to the broker.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        crate::processes::terminate(&mut self.child, "bridge simulate")
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.kill();
    }
}
