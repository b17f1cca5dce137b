//! The command-line contract: flag names other tools rely on, and the
//! clear error when the embedded broker's port is taken.

use std::net::TcpListener;
use std::process::Command;

fn bridge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bridge"))
}

#[test]
fn serve_help_lists_the_contract() {
    let out = bridge().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--mqtt-url",
        "--embedded-broker",
        "--config",
        "--jwks",
        "--mqtt-ca",
        "--mqtt-cert",
        "--mqtt-key",
        "--max-frame-bytes",
        "--max-payload-bytes",
        "--max-subscriptions",
        "--publish-rate",
        "--outbound-queue",
        "--log-format",
        "BRIDGE_JWT_SECRET",
        "127.0.0.1:8080",
        "127.0.0.1:1883",
    ] {
        assert!(
            help.contains(flag),
            "serve --help does not mention {flag}:\n{help}"
        );
    }
    for sub in ["serve", "sub", "pub"] {
        let out = bridge().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub} --help");
    }
}

#[test]
fn embedded_port_in_use_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = bridge()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--embedded-broker",
            &addr.to_string(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already in use") && err.contains("--mqtt-url"),
        "{err}"
    );
}

#[test]
fn listen_port_in_use_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let broker = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = bridge()
        .args([
            "serve",
            "--listen",
            &taken.local_addr().unwrap().to_string(),
            "--embedded-broker",
            &broker.to_string(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot listen"), "{err}");
}

#[test]
fn bad_settings_are_refused() {
    for args in [
        vec!["serve", "--mqtt-url", "http://x"],
        vec!["serve", "--mqtt-url", "mqtt://user:pw@host"],
        vec!["serve", "--topic-prefix", "a/#"],
        vec![
            "serve",
            "--mqtt-url",
            "mqtt://h:1",
            "--reserved-channel",
            "$a/#/b",
        ],
        vec!["serve", "--max-frame-bytes", "2000000"],
    ] {
        let out = bridge().args(&args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = bridge()
        .args(["serve", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.toml"));
}
