//! The template passes `cfn-lint` and `checkov`, offline. Every checkov
//! suppression in the template carries a one-line reason.
//!
//! Tools: `pip install cfn-lint`; checkov in its own venv (it pins an older
//! boto3): `python3 -m venv /opt/checkov-venv && /opt/checkov-venv/bin/pip
//! install checkov`. Set `CHECKOV=/path/to/checkov` if it lives elsewhere.

mod support;

use std::path::PathBuf;
use std::process::Command;

fn find(tool: &str, env: &str, fallback: &str, install: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(tool))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    if let Some(p) = on_path {
        return p;
    }
    let fallback = PathBuf::from(fallback);
    if fallback.is_file() {
        return fallback;
    }
    panic!(
        "{tool} is not installed (looked at ${env}, PATH and {}). Install it with: {install}",
        fallback.display()
    );
}

#[test]
fn cfn_lint_passes() {
    let cfn_lint = find(
        "cfn-lint",
        "CFN_LINT",
        "/opt/cfn-lint-venv/bin/cfn-lint",
        "pip install cfn-lint",
    );
    let out = Command::new(cfn_lint)
        .arg(support::template_path())
        .output()
        .expect("run cfn-lint");
    assert!(
        out.status.success(),
        "cfn-lint found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn checkov_passes() {
    let checkov = find(
        "checkov",
        "CHECKOV",
        "/opt/checkov-venv/bin/checkov",
        "python3 -m venv /opt/checkov-venv && /opt/checkov-venv/bin/pip install checkov",
    );
    let out = Command::new(checkov)
        .args([
            "--framework",
            "cloudformation",
            "--skip-download",
            "--compact",
            "--quiet",
            "-f",
        ])
        .arg(support::template_path())
        .env("BC_SKIP_MAPPING", "TRUE")
        .output()
        .expect("run checkov");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Failed checks: 0"),
        "checkov found problems:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_suppression_has_a_reason() {
    let t = support::template();
    let mut n = 0;
    for (name, r) in t["Resources"].as_mapping().unwrap() {
        for skip in r["Metadata"]["checkov"]["skip"]
            .as_sequence()
            .into_iter()
            .flatten()
        {
            n += 1;
            let reason = skip["comment"].as_str().unwrap_or("");
            assert!(
                reason.len() > 20 && !reason.contains('\n'),
                "{name:?} {:?}: give a one-line reason",
                skip["id"]
            );
        }
    }
    assert!(n > 0);
}
