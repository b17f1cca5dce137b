//! The shell scripts in infra/: `token.sh` mints tokens the authorizer
//! accepts; `deploy.sh` and `teardown.sh` are valid bash, pass `shellcheck`,
//! use only constructs bash 3.2 (macOS) has, and do the right thing run after
//! run. They run for real against stand-in `aws`, `sam` and `cargo` commands
//! (one recording script on `PATH`) that keep a stack's state between runs as
//! CloudFormation and `sam deploy` do: a parameter not passed keeps its
//! previous value, `SetApiGatewayCloudWatchRole=true` creates the logging
//! role and points the account at it, `false` deletes it again.
//!
//! Tools: bash, `shellcheck` (`apt-get install shellcheck`), python3 (runs the
//! stand-in), openssl (token.sh).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
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
        .env("BRIDGE_JWT_SECRET", "s3cret-for-test-0123456789abcdef01")
        .output()
        .expect("run token.sh (needs bash and openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    let verifier =
        bridge::auth::Verifier::hs256(b"s3cret-for-test-0123456789abcdef01", Default::default())
            .unwrap();
    let p = verifier.verify(token.trim()).expect("a valid token").perms;
    assert_eq!(p.subject.as_deref(), Some("user-7"));
    assert!(p.can_subscribe("users/user-7/inbox"));
    assert!(p.can_subscribe("fleet/d/telemetry"));
    assert!(!p.can_subscribe("fleet/#"));
    assert!(p.can_publish("fleet/d/commands"));
    let wrong =
        bridge::auth::Verifier::hs256(b"other-secret-0123456789abcdef0123", Default::default())
            .unwrap();
    assert!(wrong.verify(token.trim()).is_err());
}

const SCRIPTS: [&str; 3] = ["deploy.sh", "teardown.sh", "token.sh"];

#[test]
fn scripts_parse_and_have_help() {
    for script in SCRIPTS {
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

#[test]
fn shellcheck_passes() {
    for script in SCRIPTS {
        let out = Command::new("shellcheck")
            .arg(infra(script))
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run shellcheck ({e}); install it with: apt-get install shellcheck")
            });
        assert!(
            out.status.success(),
            "shellcheck {script}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Constructs bash 3.2 (macOS's /bin/bash) lacks or treats differently.
/// No bash 3.2 can be installed here (Debian ships bash 5), so the scripts
/// are checked by rule; `bash -n` and the runs below use bash 5.
const NOT_IN_BASH_32: &[(&str, &str)] = &[
    ("declare -A", "associative arrays (bash 4)"),
    ("local -A", "associative arrays (bash 4)"),
    ("typeset -A", "associative arrays (bash 4)"),
    ("declare -n", "namerefs (bash 4.3)"),
    ("local -n", "namerefs (bash 4.3)"),
    ("mapfile", "mapfile (bash 4)"),
    ("readarray", "readarray (bash 4)"),
    ("coproc", "coproc (bash 4)"),
    ("&>>", "&>> (bash 4)"),
    ("|&", "|& (bash 4)"),
    (";;&", ";;& (bash 4)"),
    (";&", ";& (bash 4)"),
    (",,}", "case conversion (bash 4)"),
    ("^^}", "case conversion (bash 4)"),
    ("[[ -v", "[[ -v (bash 4.2)"),
    ("@Q}", "${x@Q} (bash 4.4)"),
    ("EPOCHSECONDS", "EPOCHSECONDS (bash 5)"),
    ("EPOCHREALTIME", "EPOCHREALTIME (bash 5)"),
    ("wait -n", "wait -n (bash 4.3)"),
    ("globstar", "globstar (bash 4)"),
    ("inherit_errexit", "inherit_errexit (bash 4.4)"),
    ("[-1]", "negative subscripts (bash 4.3)"),
];

/// Every `"${name[@]}"` in `text` that is not written
/// `${name[@]+"${name[@]}"}`: under `set -u`, bash before 4.4 stops with
/// "unbound variable" on an empty array expanded bare.
fn unguarded_array_expansions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        for (i, _) in line.match_indices("\"${") {
            let after = &line[i + 3..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.is_empty() || !after[name.len()..].starts_with("[@]}\"") {
                continue;
            }
            let guard = format!("${{{name}[@]+");
            let guarded = format!("{guard}\"${{{name}[@]}}\"}}");
            let ok = line[..i].ends_with(&guard) && line[i - guard.len()..].starts_with(&guarded);
            if !ok {
                out.push(format!("{name}: {}", line.trim()));
            }
        }
    }
    out
}

#[test]
fn scripts_use_only_what_bash_32_has() {
    // The rule catches what it claims to.
    assert_eq!(
        unguarded_array_expansions(r#"sam deploy "${params[@]}" "${extra[@]}""#).len(),
        2
    );
    assert!(
        unguarded_array_expansions(r#"sam ${extra[@]+"${extra[@]}"} "${params[0]}""#).is_empty()
    );
    assert!(unguarded_array_expansions("# \"${extra[@]}\"").is_empty());
    for script in SCRIPTS {
        let text = std::fs::read_to_string(infra(script)).unwrap();
        let bad = unguarded_array_expansions(&text);
        assert!(
            bad.is_empty(),
            "{script}: empty arrays fail under set -u in bash 3.2; write ${{a[@]+\"${{a[@]}}\"}}: {bad:?}"
        );
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            for (construct, what) in NOT_IN_BASH_32 {
                assert!(
                    !line.contains(construct),
                    "{script} uses {what}, which bash 3.2 lacks: {line}"
                );
            }
        }
    }
}

// ------------------------------------------------------------------ stand-ins

/// `aws`, `sam` and `cargo` for the scripts: each call is appended to
/// calls.jsonl, and a stack's state lives in stack.json / account.json.
const STANDIN: &str = r#"
import json, os, re, sys

state = os.environ["STUB_STATE"]
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
with open(os.path.join(state, "calls.jsonl"), "a") as f:
    f.write(json.dumps({"cmd": name, "args": args}) + "\n")

def load(file, default):
    try:
        with open(os.path.join(state, file)) as f:
            return json.load(f)
    except FileNotFoundError:
        return default

def save(file, value):
    with open(os.path.join(state, file), "w") as f:
        json.dump(value, f)

def opt(flag):
    return args[args.index(flag) + 1] if flag in args else None

def no_stack(op):
    sys.stderr.write("\nAn error occurred (ValidationError) when calling the %s operation: "
                     "Stack with id %s does not exist\n" % (op, opt("--stack-name")))
    sys.exit(254)

if name == "cargo":
    if args[:2] == ["lambda", "--version"]:
        print("cargo-lambda 1.9.2 (stand-in)")
    elif args[:2] != ["lambda", "build"]:
        sys.exit("cargo stand-in: unexpected " + " ".join(args))
    sys.exit(0)

if name == "sam":
    stack = load("stack.json", None)
    if args[0] == "deploy":
        # The items come from --parameter-overrides, else from the config
        # file's [ENV.deploy.parameters] parameter_overrides, as sam reads them.
        if "--parameter-overrides" in args:
            i = args.index("--parameter-overrides") + 1
            items = []
            while i < len(args) and not args[i].startswith("--"):
                items.append(args[i])
                i += 1
        elif "--config-file" in args:
            import stat, tomllib
            path = opt("--config-file")
            if stat.S_IMODE(os.stat(path).st_mode) & 0o077:
                sys.exit("sam stand-in: the config file %s is readable by others" % path)
            with open(path, "rb") as f:
                config = tomllib.load(f)
            items = config[opt("--config-env") or "default"]["deploy"]["parameters"]["parameter_overrides"]
            if isinstance(items, str):
                items = [items]
        else:
            items = []
        with open(os.path.join(state, "deploys.jsonl"), "a") as f:
            f.write(json.dumps(items) + "\n")
        # sam deploy reuses the previous value of every parameter not passed.
        params = dict(stack["parameters"]) if stack else {}
        for item in items:
            m = re.fullmatch(r'([A-Za-z0-9]+)=("(?:\\.|[^"\\])*"|(?:\\.|[^ "\\])+)', item)
            if not m:
                sys.exit("Error: Invalid value for '--parameter-overrides': %s is not in valid format." % item)
            key, value = m.group(1), m.group(2)
            if value.startswith('"'):
                value = value[1:-1]
            params[key] = value.replace('\\"', '"')
        role = stack.get("role") if stack else None
        account = load("account.json", {})
        deleted = load("deleted_roles.json", [])
        if params.get("SetApiGatewayCloudWatchRole") == "true":
            if not role:
                role = "%s-ApiGatewayCloudWatchRole-STANDIN" % opt("--stack-name")
                account["role"] = "arn:aws:iam::123456789012:role/" + role
        elif role:
            # What CloudFormation does to a resource whose condition turned false.
            deleted.append(role)
            role = None
        save("stack.json", {"name": opt("--stack-name"), "parameters": params, "role": role})
        save("account.json", account)
        save("deleted_roles.json", deleted)
    elif args[0] == "delete":
        if stack is None:
            no_stack("DescribeStacks")
        os.remove(os.path.join(state, "stack.json"))
    else:
        sys.exit("sam stand-in: unexpected " + " ".join(args))
    sys.exit(0)

if name == "aws":
    stack = load("stack.json", None)
    if stack is not None and opt("--stack-name") not in (None, stack["name"]):
        stack = None
    if args[:3] == ["configure", "get", "region"]:
        sys.exit(1)
    elif args[:2] == ["iot", "describe-endpoint"]:
        print("abc123-ats.iot.%s.amazonaws.com" % opt("--region"))
    elif args[:2] == ["apigateway", "get-account"]:
        print(load("account.json", {}).get("role") or "None")
    elif args[:2] == ["cloudformation", "describe-stacks"]:
        if os.environ.get("STUB_DENY_DESCRIBE"):
            sys.stderr.write("An error occurred (AccessDenied) when calling the DescribeStacks operation: "
                             "not authorized to perform: cloudformation:DescribeStacks\n")
            sys.exit(254)
        if stack is None:
            no_stack("DescribeStacks")
        query = opt("--query") or ""
        m = re.search(r"Parameters\[\?ParameterKey=='(\w+)'\]", query)
        if m:
            print(stack["parameters"].get(m.group(1), ""))
        m = re.search(r"Outputs\[\?OutputKey=='(\w+)'\]", query)
        if m:
            print({"WebSocketApiId": "abc123", "StageName": "prod",
                   "WebSocketUrl": "wss://abc123.execute-api.eu-west-1.amazonaws.com/prod"}[m.group(1)])
    elif args[:2] == ["cloudformation", "describe-stack-resource"]:
        if stack is None:
            no_stack("DescribeStackResource")
        if opt("--logical-resource-id") != "ApiGatewayCloudWatchRole" or not stack.get("role"):
            sys.stderr.write("An error occurred (ValidationError): Resource does not exist\n")
            sys.exit(254)
        print(stack["role"])
    elif args[:2] == ["apigatewayv2", "create-deployment"]:
        print("{}")
    else:
        sys.exit("aws stand-in: unexpected " + " ".join(args))
    sys.exit(0)
"#;

fn python3() -> PathBuf {
    for p in ["/usr/bin/python3", "/bin/python3"] {
        if Path::new(p).is_file() {
            return p.into();
        }
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("python3"))
                .find(|p| p.is_file())
        })
        .expect("python3 runs the aws/sam/cargo stand-ins: apt-get install python3")
}

/// A copy of infra/ with the stand-ins on its `PATH`, and their state.
struct Sandbox {
    dir: PathBuf,
}

impl Sandbox {
    fn new(name: &str) -> Sandbox {
        let dir =
            std::env::temp_dir().join(format!("bridge-scripts-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["infra", "bin", "state"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        for f in ["deploy.sh", "teardown.sh", "template.yaml"] {
            std::fs::copy(infra(f), dir.join("infra").join(f)).unwrap();
        }
        let standin = dir.join("bin/standin.py");
        std::fs::write(&standin, format!("#!{}\n{STANDIN}", python3().display())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&standin, std::fs::Permissions::from_mode(0o755)).unwrap();
        for cmd in ["aws", "sam", "cargo"] {
            std::os::unix::fs::symlink(&standin, dir.join("bin").join(cmd)).unwrap();
        }
        Sandbox { dir }
    }

    /// Runs infra/SCRIPT with these arguments and extra environment.
    fn run(&self, script: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let out = Command::new("bash")
            .arg(self.dir.join("infra").join(script))
            .args(args)
            .env_clear()
            .env(
                "PATH",
                format!("{}:/usr/bin:/bin", self.dir.join("bin").display()),
            )
            .env("HOME", &self.dir)
            .env("STUB_STATE", self.dir.join("state"))
            .envs(env.iter().copied())
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "{script} {args:?} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    fn deploy(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut all = vec!["--region", "eu-west-1"];
        all.extend_from_slice(args);
        let out = self.run("deploy.sh", &all, env);
        assert!(out.status.success(), "deploy.sh {args:?} failed");
        out
    }

    fn state(&self, file: &str) -> Value {
        std::fs::read_to_string(self.dir.join("state").join(file))
            .map(|t| serde_json::from_str(&t).unwrap())
            .unwrap_or(Value::Null)
    }

    /// Every stand-in call so far: (command, arguments).
    fn calls(&self) -> Vec<(String, Vec<String>)> {
        std::fs::read_to_string(self.dir.join("state/calls.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                let args = v["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_string())
                    .collect();
                (v["cmd"].as_str().unwrap().to_string(), args)
            })
            .collect()
    }

    /// The parameter-override items of every `sam deploy`, in order, as sam
    /// read them (from its command line or its config file).
    fn overrides(&self) -> Vec<Vec<String>> {
        let text =
            std::fs::read_to_string(self.dir.join("state/deploys.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The deployed stack's parameters, as the stand-in CloudFormation holds them.
    fn parameters(&self) -> BTreeMap<String, String> {
        serde_json::from_value(self.state("stack.json")["parameters"].clone()).unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const SECRET: &[(&str, &str)] = &[(
    "BRIDGE_JWT_SECRET",
    "first-secret-0123456789abcdef0123456789",
)];

#[test]
fn a_second_deploy_keeps_the_account_logging_role() {
    let s = Sandbox::new("role");
    // First deploy on an account without a logging role: the stack creates it.
    s.deploy(&[], SECRET);
    assert_eq!(s.parameters()["SetApiGatewayCloudWatchRole"], "true");
    let role = s.state("stack.json")["role"].as_str().unwrap().to_string();
    assert!(s.state("account.json")["role"]
        .as_str()
        .unwrap()
        .ends_with(&role));
    // The account now has a role (this stack's): the next deploys keep it.
    s.deploy(&[], SECRET);
    s.deploy(&["--topic-filter", "fleet/#"], SECRET);
    assert!(
        s.overrides()[1..]
            .iter()
            .all(|o| o.contains(&"SetApiGatewayCloudWatchRole=\"true\"".to_string())),
        "{:?}",
        s.overrides()
    );
    assert_eq!(s.state("stack.json")["role"].as_str(), Some(role.as_str()));
    assert_eq!(s.state("deleted_roles.json"), serde_json::json!([]));
}

#[test]
fn a_role_the_account_already_has_is_left_alone() {
    let s = Sandbox::new("other-role");
    std::fs::write(
        s.dir.join("state/account.json"),
        r#"{"role": "arn:aws:iam::123456789012:role/someone-elses"}"#,
    )
    .unwrap();
    s.deploy(&[], SECRET);
    s.deploy(&[], SECRET);
    assert_eq!(s.parameters()["SetApiGatewayCloudWatchRole"], "false");
    assert!(s.state("stack.json")["role"].is_null());
    assert_eq!(
        s.state("account.json")["role"].as_str(),
        Some("arn:aws:iam::123456789012:role/someone-elses")
    );
}

#[test]
fn a_stack_that_cannot_be_read_stops_the_deploy() {
    let s = Sandbox::new("unreadable");
    // describe-stacks fails for another reason than a missing stack.
    let out = s.run(
        "deploy.sh",
        &["--region", "eu-west-1"],
        &[SECRET[0], ("STUB_DENY_DESCRIBE", "1")],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read stack"));
    assert!(s.overrides().is_empty(), "no sam deploy");
}

#[test]
fn switching_auth_mode_never_leaves_both_set() {
    let s = Sandbox::new("auth");
    let url = "https://cognito-idp.eu-west-1.amazonaws.com/pool/.well-known/jwks.json";
    let auth = |p: &BTreeMap<String, String>| {
        (
            p["AuthMode"].clone(),
            p["JwtSecret"].clone(),
            p["JwksUrl"].clone(),
        )
    };
    s.deploy(&[], SECRET);
    assert_eq!(
        auth(&s.parameters()),
        (
            "token".into(),
            "first-secret-0123456789abcdef0123456789".into(),
            "".into()
        )
    );
    // To --jwks-url: the secret is emptied, explicitly (sam would otherwise
    // keep its previous value).
    s.deploy(&["--jwks-url", url, "--jwt-issuer", "https://idp"], SECRET);
    let last = s.overrides().pop().unwrap();
    for item in [
        "JwtSecret=\"\"".to_string(),
        format!("JwksUrl=\"{url}\""),
        "JwtIssuer=\"https://idp\"".into(),
        "JwtAudience=\"\"".into(),
        "JwtLeeway=\"0\"".into(),
        "AuthMode=\"token\"".into(),
    ] {
        assert!(last.contains(&item), "{item} not in {last:?}");
    }
    assert_eq!(
        auth(&s.parameters()),
        ("token".into(), "".into(), url.into())
    );
    assert_eq!(s.parameters()["JwtIssuer"], "https://idp");
    // Back to a secret: the URL and the issuer go.
    s.deploy(
        &[],
        &[(
            "BRIDGE_JWT_SECRET",
            "second-secret-0123456789abcdef0123456789",
        )],
    );
    assert_eq!(
        auth(&s.parameters()),
        (
            "token".into(),
            "second-secret-0123456789abcdef0123456789".into(),
            "".into()
        )
    );
    assert_eq!(s.parameters()["JwtIssuer"], "");
    // Off: neither.
    s.deploy(&["--no-auth"], SECRET);
    assert_eq!(auth(&s.parameters()), ("off".into(), "".into(), "".into()));
}

#[test]
fn the_secret_is_never_on_a_command_line() {
    let s = Sandbox::new("secret");
    s.deploy(&[], SECRET);
    // sam got it (from a config file only this user could read)...
    assert_eq!(s.parameters()["JwtSecret"], SECRET[0].1);
    // ...and no command line carried it, where `ps` shows it to everyone.
    for (cmd, args) in s.calls() {
        assert!(
            !args.iter().any(|a| a.contains(SECRET[0].1)),
            "{cmd} {args:?}"
        );
    }
    // The config file is gone after the run.
    let config = s
        .calls()
        .into_iter()
        .find(|(cmd, _)| cmd == "sam")
        .and_then(|(_, args)| {
            let i = args.iter().position(|a| a == "--config-file")?;
            args.get(i + 1).cloned()
        })
        .expect("sam deploy --config-file");
    assert!(
        !std::path::Path::new(&config).exists(),
        "{config} left behind"
    );
}

#[test]
fn a_short_hs256_secret_is_refused_before_anything_is_deployed() {
    let s = Sandbox::new("short");
    let out = s.run(
        "deploy.sh",
        &["--region", "eu-west-1"],
        &[("BRIDGE_JWT_SECRET", "short")],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at least 32"), "{stderr}");
    assert!(s.overrides().is_empty(), "no sam deploy");
}

#[test]
fn values_reach_sam_whole() {
    let s = Sandbox::new("quoting");
    let filter = r#"my "odd" topic/#"#;
    s.deploy(&["--topic-filter", filter, "--topic-prefix", "a b"], SECRET);
    assert_eq!(s.parameters()["TopicFilter"], filter);
    assert_eq!(s.parameters()["TopicPrefix"], "a b");
    let out = s.run(
        "deploy.sh",
        &["--region", "eu-west-1", "--topic-prefix", r"a\b"],
        SECRET,
    );
    assert_eq!(out.status.code(), Some(2), "a backslash is refused");
}

#[test]
fn extra_overrides_pass_through_and_none_is_fine_under_set_u() {
    let s = Sandbox::new("extra");
    s.deploy(&[], SECRET);
    s.deploy(&["--"], SECRET);
    s.deploy(
        &["--", "MaxSubscriptions=50", "LogRetentionDays=30"],
        SECRET,
    );
    let runs = s.overrides();
    assert_eq!(runs.len(), 3);
    assert_eq!(runs[0], runs[1]);
    assert!(runs[2].ends_with(&["MaxSubscriptions=50".into(), "LogRetentionDays=30".into()]));
    assert_eq!(s.parameters()["MaxSubscriptions"], "50");
    // Auth settings come from the options, never after `--` (and a secret
    // never on the command line of ours).
    for bad in [
        "JwtSecret=s",
        "JwksUrl=https://x",
        "AuthMode=off",
        "SetApiGatewayCloudWatchRole=false",
    ] {
        let out = s.run("deploy.sh", &["--region", "eu-west-1", "--", bad], SECRET);
        assert_eq!(out.status.code(), Some(2), "{bad}");
    }
    assert_eq!(
        s.overrides().len(),
        3,
        "no sam deploy after a refused option"
    );
}

#[test]
fn deploy_builds_with_the_size_profile() {
    let s = Sandbox::new("build");
    s.deploy(&["--arch", "x86_64"], SECRET);
    let build = s
        .calls()
        .into_iter()
        .find(|(cmd, args)| cmd == "cargo" && args.get(1).map(String::as_str) == Some("build"))
        .expect("a cargo lambda build")
        .1;
    let profile = build
        .iter()
        .position(|a| a == "--profile")
        .expect("--profile");
    assert_eq!(build[profile + 1], "lambda");
    assert!(!build.contains(&"--release".to_string()), "{build:?}");
    assert!(build.contains(&"--x86-64".to_string()));
    // The functions without aws-local's dependencies (feature `local`).
    assert!(
        build.contains(&"--no-default-features".to_string()),
        "{build:?}"
    );
    // The profile: small binaries (Lambda bills init time and the package
    // limit counts bytes), no unwinding tables, no symbols.
    let cargo_toml =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
            .unwrap();
    let section: BTreeMap<&str, &str> = cargo_toml
        .split("[profile.lambda]")
        .nth(1)
        .expect("a [profile.lambda] in the workspace Cargo.toml")
        .lines()
        .take_while(|l| !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    assert_eq!(section.get("inherits"), Some(&"\"release\""));
    assert!(matches!(
        section.get("opt-level"),
        Some(&"\"s\"") | Some(&"\"z\"")
    ));
    assert!(matches!(
        section.get("lto"),
        Some(&"true") | Some(&"\"fat\"")
    ));
    assert_eq!(section.get("codegen-units"), Some(&"1"));
    assert_eq!(section.get("panic"), Some(&"\"abort\""));
    assert_eq!(section.get("strip"), Some(&"true"));
}

#[test]
fn teardown_keeps_the_logging_role_and_says_so() {
    let s = Sandbox::new("teardown");
    s.deploy(&[], SECRET);
    let role = s.state("stack.json")["role"].as_str().unwrap().to_string();
    let out = s.run("teardown.sh", &["--region", "eu-west-1"], &[]);
    assert!(out.status.success());
    assert!(s.state("stack.json").is_null(), "the stack is gone");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("kept IAM role {role}")),
        "{stdout}"
    );
    // Nothing touched the role or the account's setting.
    for (cmd, args) in s.calls() {
        let line = format!("{cmd} {}", args.join(" "));
        assert!(!line.contains(" iam "), "{line}");
        assert!(!line.contains("update-account"), "{line}");
    }
    // Without a role of its own, teardown says nothing about one.
    let s = Sandbox::new("teardown-plain");
    std::fs::write(
        s.dir.join("state/account.json"),
        r#"{"role": "arn:aws:iam::123456789012:role/someone-elses"}"#,
    )
    .unwrap();
    s.deploy(&[], SECRET);
    let out = s.run("teardown.sh", &["--region", "eu-west-1"], &[]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("kept IAM role"));
}
