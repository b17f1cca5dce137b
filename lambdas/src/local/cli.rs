//! `aws-local`'s command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The AWS deployment of the channel bridge on one machine: API Gateway,
/// the Lambda Runtime API, `@connections`, the IoT Data Plane and the topic
/// rule played around the real ws-handler, ws-authorizer and iot-fanout
/// binaries, with DynamoDB in moto and an MQTT broker of yours as IoT Core's
/// message side. Configured from infra/template.yaml. Auth as deploy.sh sets
/// it: on with BRIDGE_JWT_SECRET (HS256) or BRIDGE_JWKS_URL in the
/// environment, off otherwise.
#[derive(Debug, Parser)]
#[command(name = "aws-local", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the deployment (WebSockets at ws://LISTEN/ws).
    Serve(Box<ServeArgs>),
    /// Runs only moto's DynamoDB (one request at a time) for several
    /// `serve --dynamodb-endpoint` to share; prints its endpoint.
    Dynamodb(DynamodbArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Where API Gateway listens: ws://ADDR/ws for clients, and the
    /// @connections and IoT Data Plane endpoints the functions call. Port 0
    /// picks a free one (the start banner says which).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// The MQTT broker that plays IoT Core's message side (MQTT 5):
    /// mqtt://[USER[:PASSWORD]@]HOST[:PORT].
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt_url: String,

    /// A DynamoDB endpoint to use (e.g. `aws-local dynamodb`'s); without it,
    /// aws-local starts moto's server on a free port.
    #[arg(long, value_name = "URL")]
    pub dynamodb_endpoint: Option<String>,

    /// The table's name (created from the template when it does not exist).
    #[arg(long, default_value = "channel-bridge-connections")]
    pub table_name: String,

    /// The template [default: infra/template.yaml of the working directory
    /// or of the repository aws-local was built in].
    #[arg(long, value_name = "FILE")]
    pub template: Option<PathBuf>,

    /// Where the function binaries are [default: aws-local's own directory,
    /// where `cargo build -p lambdas` puts them].
    #[arg(long, value_name = "DIR")]
    pub functions_dir: Option<PathBuf>,

    /// Processes per function, N for every function or NAME=N for one
    /// (never more than the function's reserved concurrency).
    #[arg(long, value_name = "[NAME=]N", default_value = "4")]
    pub concurrency: Vec<String>,

    /// A template parameter, as `sam deploy --parameter-overrides` takes it
    /// (repeatable); the auth parameters come from the environment instead.
    #[arg(long = "parameter", value_name = "NAME=VALUE", value_parser = pair)]
    pub parameters: Vec<(String, String)>,

    /// An environment variable for every function, after the template's
    /// (repeatable; for settings the template does not expose).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = pair)]
    pub env: Vec<(String, String)>,

    /// API Gateway's idle timeout (10 minutes); e.g. 2s, 500ms, 10m.
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "10m")]
    pub idle_timeout: Duration,

    /// API Gateway's maximum connection time (2 hours).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "2h")]
    pub max_connection_time: Duration,

    /// Bytes queued for one client before posts to it answer 429.
    #[arg(long, value_name = "BYTES", default_value_t = 1024 * 1024)]
    pub client_buffer_bytes: usize,
}

#[derive(Debug, Clone, Args)]
pub struct DynamodbArgs {
    /// Where the endpoint listens (port 0: a free one).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
}

/// `NAME=VALUE`.
fn pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

/// `250ms`, `2s`, `10m`, `2h`, or plain seconds.
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 2s, 10m, 2h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: the unit is ms, s, m or h")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{s:?} must be more than zero"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Processes for `function` under the `--concurrency` values.
pub fn concurrency_for(values: &[String], function: &str) -> Result<usize, String> {
    let mut all = None;
    let mut named = None;
    for v in values {
        let (name, n) = match v.split_once('=') {
            Some((name, n)) => (Some(name.trim()), n),
            None => (None, v.as_str()),
        };
        let n: usize = n
            .trim()
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("--concurrency {v:?}: a number of processes from 1"))?;
        match name {
            Some(name) if name == function => named = Some(n),
            Some(_) => {}
            None => all = Some(n),
        }
    }
    Ok(named.or(all).unwrap_or(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(duration("0s").is_err());
        assert!(duration("5 parsecs").is_err());
        assert!(duration("").is_err());
    }

    #[test]
    fn concurrency() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(concurrency_for(&v(&["4"]), "ws-handler"), Ok(4));
        assert_eq!(
            concurrency_for(&v(&["2", "iot-fanout=8"]), "iot-fanout"),
            Ok(8)
        );
        assert_eq!(
            concurrency_for(&v(&["iot-fanout=8", "2"]), "ws-handler"),
            Ok(2)
        );
        assert!(concurrency_for(&v(&["0"]), "x").is_err());
        assert!(concurrency_for(&v(&["a=b"]), "a").is_err());
    }

    #[test]
    fn pairs() {
        assert_eq!(pair("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(pair("=x").is_err());
        assert!(pair("novalue").is_err());
    }
}
