//! Child processes and timing: every process a test starts dies with the
//! test, listens on a port nobody else has, and is waited for with the same
//! patience (`WAIT` for what should happen, `QUIET` for what should not).

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Makes a child die with the test process (a killed or timed-out test run
/// must not leave brokers and bridges behind).
pub(crate) fn die_with_parent(cmd: &mut Command) -> &mut Command {
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

pub(crate) fn wait_connectable(port: u16, what: &str) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on port {port} within {WAIT:?}");
}

/// Sends `child` SIGTERM and waits (at most [`WAIT`]) for its exit status.
pub(crate) fn terminate(child: &mut Child, what: &str) -> ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A binary of this build (`target/<profile>/NAME`, beside the test
/// binary's `deps/`), or the path in `env_var`.
pub(crate) fn built_binary(name: &str, env_var: &str, package: &str) -> PathBuf {
    if let Ok(path) = std::env::var(env_var) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test binary>
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p {package}`; `cargo test --workspace` does)",
        bin.display()
    );
    bin
}

/// Reads a child's `pipe` line by line on a thread of its own, handing each
/// line to `each`.
pub(crate) fn on_lines(
    pipe: impl Read + Send + 'static,
    mut each: impl FnMut(String) + Send + 'static,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            each(line);
        }
    });
}

/// Appends a line to a log shared with the test.
pub(crate) fn append(log: &Mutex<String>, line: &str) {
    let mut log = log.lock().unwrap();
    log.push_str(line);
    log.push('\n');
}
