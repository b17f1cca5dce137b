//! The shell scripts in infra/: `token.sh` mints tokens the authorizer
//! accepts; the deploy and teardown scripts are valid bash and explain
//! themselves.

mod support;

use std::process::Command;

use support::infra;

#[test]
fn token_sh_mints_what_the_authorizer_accepts() {
    let out = Command::new("bash")
        .arg(infra("token.sh"))
        .args([
            "user-7",
            "fleet/+/telemetry,users/{sub}/#",
            "fleet/+/commands",
            "600",
        ])
        .env("BRIDGE_JWT_SECRET", "s3cret-for-test")
        .output()
        .expect("run token.sh (needs bash and openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let verifier = bridge::auth::Verifier::hs256(b"s3cret-for-test", Default::default()).unwrap();
    let p = verifier.verify(token.trim()).expect("a valid token");
    assert_eq!(p.subject.as_deref(), Some("user-7"));
    assert!(p.can_subscribe("users/user-7/inbox"));
    assert!(p.can_subscribe("fleet/d/telemetry"));
    assert!(!p.can_subscribe("fleet/#"));
    assert!(p.can_publish("fleet/d/commands"));
    let wrong = bridge::auth::Verifier::hs256(b"other", Default::default()).unwrap();
    assert!(wrong.verify(token.trim()).is_err());
}

#[test]
fn scripts_parse_and_have_help() {
    for script in ["deploy.sh", "teardown.sh", "token.sh"] {
        let status = Command::new("bash")
            .arg("-n")
            .arg(infra(script))
            .status()
            .unwrap();
        assert!(status.success(), "{script} is not valid bash");
    }
    for script in ["deploy.sh", "teardown.sh"] {
        let out = Command::new("bash")
            .arg(infra(script))
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(script),
            "{script} --help"
        );
    }
}
