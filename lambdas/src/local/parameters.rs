//! The template parameters aws-local deploys with, chosen as
//! `infra/deploy.sh` chooses them.
//!
//! Auth, from the environment as `deploy.sh` reads it: `BRIDGE_JWKS_URL`
//! set → `AuthMode=token` with those keys; else `BRIDGE_JWT_SECRET` set →
//! `AuthMode=token` with that HS256 secret; else `AuthMode=off` (where
//! `deploy.sh` would generate a secret, aws-local leaves auth off).
//! `BRIDGE_JWT_ISSUER`, `BRIDGE_JWT_AUDIENCE` and `BRIDGE_JWT_LEEWAY` pass
//! through. Secrets come only from the environment, never from the command
//! line, and are never printed.
//!
//! `IotDataEndpoint` (which `deploy.sh` looks up in the account) names a
//! local endpoint: the functions reach aws-local's IoT Data Plane through
//! `AWS_ENDPOINT_URL_IOT_DATA_PLANE` anyway. Every other parameter keeps
//! the template's default unless `--parameter NAME=VALUE` says otherwise;
//! the ones above cannot be given that way, as `deploy.sh` refuses them
//! after `--`.

use std::collections::BTreeMap;

use crate::config::Lookup;
use crate::local::template::{self, TemplateError};

/// Parameters aws-local sets itself.
pub const MANAGED: &[&str] = &[
    "AuthMode",
    "JwtSecret",
    "JwksUrl",
    "JwtIssuer",
    "JwtAudience",
    "JwtLeeway",
    "IotDataEndpoint",
    "SetApiGatewayCloudWatchRole",
    "Architecture",
];

/// How auth ended up (for the start banner; never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    Off,
    Secret,
    Jwks(String),
}

/// Every parameter's value, checked against the template's definitions.
pub fn resolve(
    text: &str,
    env: Lookup,
    overrides: &[(String, String)],
    region: &str,
) -> Result<(BTreeMap<String, String>, Auth), TemplateError> {
    let defs = template::parameters(text)?;
    let get = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let mut managed: BTreeMap<&str, String> = BTreeMap::new();
    let auth = match (get("BRIDGE_JWKS_URL"), get("BRIDGE_JWT_SECRET")) {
        (Some(url), _) => {
            managed.insert("AuthMode", "token".into());
            managed.insert("JwksUrl", url.clone());
            managed.insert("JwtSecret", String::new());
            Auth::Jwks(url)
        }
        (None, Some(secret)) => {
            managed.insert("AuthMode", "token".into());
            managed.insert("JwtSecret", secret);
            managed.insert("JwksUrl", String::new());
            Auth::Secret
        }
        (None, None) => {
            managed.insert("AuthMode", "off".into());
            managed.insert("JwtSecret", String::new());
            managed.insert("JwksUrl", String::new());
            Auth::Off
        }
    };
    managed.insert("JwtIssuer", get("BRIDGE_JWT_ISSUER").unwrap_or_default());
    managed.insert(
        "JwtAudience",
        get("BRIDGE_JWT_AUDIENCE").unwrap_or_default(),
    );
    managed.insert(
        "JwtLeeway",
        get("BRIDGE_JWT_LEEWAY").unwrap_or_else(|| "0".into()),
    );
    managed.insert(
        "IotDataEndpoint",
        format!("aws-local.iot.{region}.amazonaws.com"),
    );
    managed.insert("SetApiGatewayCloudWatchRole", "false".into());
    let arch = if std::env::consts::ARCH == "aarch64" {
        "arm64"
    } else {
        "x86_64"
    };
    managed.insert("Architecture", arch.into());

    let mut values = BTreeMap::new();
    for (name, def) in &defs {
        if let Some(v) = managed.get(name.as_str()) {
            values.insert(name.clone(), v.clone());
        } else if let Some(d) = &def.default {
            values.insert(name.clone(), d.clone());
        }
    }
    for (name, value) in overrides {
        if MANAGED.contains(&name.as_str()) {
            return Err(TemplateError(format!(
                "parameter {name} is set by aws-local as deploy.sh sets it \
                 (auth: BRIDGE_JWT_SECRET or BRIDGE_JWKS_URL in the environment), not by --parameter"
            )));
        }
        if !defs.iter().any(|(n, _)| n == name) {
            return Err(TemplateError(format!(
                "the template has no parameter {name}"
            )));
        }
        values.insert(name.clone(), value.clone());
    }
    for (name, def) in &defs {
        match values.get(name) {
            Some(v) => def.check(name, v)?,
            None => {
                return Err(TemplateError(format!(
                    "parameter {name} has no default: pass --parameter {name}=VALUE"
                )))
            }
        }
    }
    Ok((values, auth))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../infra/template.yaml"
        ))
        .unwrap()
    }

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn auth_as_deploy_sh_sets_it() {
        let (p, auth) = resolve(&text(), &env(&[]), &[], "us-east-1").unwrap();
        assert_eq!(auth, Auth::Off);
        assert_eq!(p["AuthMode"], "off");
        let secret = "0123456789abcdef0123456789abcdef";
        let e = [("BRIDGE_JWT_SECRET", secret), ("BRIDGE_JWT_LEEWAY", "5")];
        let e: &'static [(&str, &str)] = Box::leak(Box::new(e));
        let (p, auth) = resolve(&text(), &env(e), &[], "us-east-1").unwrap();
        assert_eq!(auth, Auth::Secret);
        assert_eq!(
            (p["AuthMode"].as_str(), p["JwtSecret"].as_str()),
            ("token", secret)
        );
        assert_eq!(p["JwtLeeway"], "5");
        assert_eq!(p["JwksUrl"], "");
        let (p, auth) = resolve(
            &text(),
            &env(&[
                ("BRIDGE_JWKS_URL", "https://idp/.well-known/jwks.json"),
                ("BRIDGE_JWT_SECRET", "x"),
            ]),
            &[],
            "us-east-1",
        )
        .unwrap();
        assert!(matches!(auth, Auth::Jwks(_)));
        assert_eq!(p["JwtSecret"], "", "one key source, as deploy.sh passes it");
    }

    #[test]
    fn overrides_are_checked() {
        let o = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let (p, _) = resolve(&text(), &env(&[]), &o("MaxSubscriptions", "3"), "us-east-1").unwrap();
        assert_eq!(p["MaxSubscriptions"], "3");
        let e = resolve(&text(), &env(&[]), &o("MaxSubscriptions", "0"), "us-east-1").unwrap_err();
        assert!(e.0.contains("MaxSubscriptions"), "{e}");
        let e = resolve(&text(), &env(&[]), &o("JwtSecret", "s"), "us-east-1").unwrap_err();
        assert!(e.0.contains("BRIDGE_JWT_SECRET"), "{e}");
        assert!(resolve(&text(), &env(&[]), &o("NoSuch", "1"), "us-east-1").is_err());
        assert!(resolve(&text(), &env(&[]), &o("TopicPrefix", "/bad"), "us-east-1").is_err());
    }
}
