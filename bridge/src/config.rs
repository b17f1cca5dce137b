//! Settings for `bridge serve`: a TOML file (`--config`), overridden by
//! `BRIDGE_*` environment variables, overridden by flags. Each setting is
//! resolved here once into [`Settings`]; the server never looks at the
//! environment itself.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::frame::FrameLimits;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_EMBEDDED_BROKER: &str = "127.0.0.1:1883";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `bridge serve` flags. Every value may also come from the environment
/// (`BRIDGE_...`) or the config file; unset flags fall back to those.
#[derive(Debug, Clone, Args, Default)]
#[command(
    after_help = "Precedence: flags, then BRIDGE_* environment variables, then the --config \
file, then the defaults shown. Secrets (BRIDGE_JWT_SECRET, BRIDGE_MQTT_PASSWORD) are read from \
the environment or the config file only, never from flags."
)]
pub struct ServeArgs {
    /// TOML config file with any of the settings below (see README, "Configuration").
    #[arg(long, env = "BRIDGE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address of the WebSocket and HTTP listener (WebSocket at /ws, /healthz, /metrics)
    /// [default: 127.0.0.1:8080]. Port 0 picks a free port.
    #[arg(long, env = "BRIDGE_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// PEM certificate chain for wss:// on the listener (with --tls-key); without it the
    /// listener speaks ws:// (terminate TLS in front of it).
    #[arg(long, env = "BRIDGE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "BRIDGE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// External MQTT broker: mqtt://HOST:PORT or mqtts://HOST:PORT (TLS). Without it the
    /// bridge runs an embedded broker.
    #[arg(long, env = "BRIDGE_MQTT_URL", value_name = "URL")]
    pub mqtt_url: Option<String>,

    /// Address of the embedded MQTT broker, used when --mqtt-url is not given
    /// [default: 127.0.0.1:1883].
    #[arg(long, env = "BRIDGE_EMBEDDED_BROKER", value_name = "ADDR")]
    pub embedded_broker: Option<SocketAddr>,

    /// Username devices must give the embedded broker (with the password from
    /// BRIDGE_EMBEDDED_BROKER_PASSWORD or the config file). Without it devices connect
    /// anonymously.
    #[arg(long, env = "BRIDGE_EMBEDDED_BROKER_USER", value_name = "NAME")]
    pub embedded_broker_user: Option<String>,

    /// The embedded broker's device password: from BRIDGE_EMBEDDED_BROKER_PASSWORD (set by
    /// the caller) or the config file, never a flag.
    #[arg(skip)]
    pub embedded_broker_password: Option<Secret>,

    /// MQTT client id of the bridge (unique per node) (default: `bridge-<random>`).
    #[arg(long, env = "BRIDGE_MQTT_CLIENT_ID", value_name = "ID")]
    pub mqtt_client_id: Option<String>,

    /// MQTT username (the password comes from BRIDGE_MQTT_PASSWORD or the config file).
    #[arg(long, env = "BRIDGE_MQTT_USERNAME", value_name = "NAME")]
    pub mqtt_username: Option<String>,

    /// PEM file of the CA that signs the broker's certificate (mqtts) [default: system roots].
    #[arg(long, env = "BRIDGE_MQTT_CA", value_name = "FILE")]
    pub mqtt_ca: Option<PathBuf>,

    /// PEM client certificate for mqtts (e.g. an AWS IoT device certificate).
    #[arg(long, env = "BRIDGE_MQTT_CERT", value_name = "FILE")]
    pub mqtt_cert: Option<PathBuf>,

    /// PEM private key of --mqtt-cert.
    #[arg(long, env = "BRIDGE_MQTT_KEY", value_name = "FILE")]
    pub mqtt_key: Option<PathBuf>,

    /// MQTT keep-alive in seconds [default: 30].
    #[arg(long, env = "BRIDGE_MQTT_KEEP_ALIVE", value_name = "SECS")]
    pub mqtt_keep_alive: Option<u64>,

    /// Broker topic prefix that web clients never see: channel a/b is topic PREFIX/a/b.
    #[arg(long, env = "BRIDGE_TOPIC_PREFIX", value_name = "PREFIX")]
    pub topic_prefix: Option<String>,

    /// Reserved ($...) filter every connection may use, e.g. '$SYS/#' (repeatable).
    #[arg(
        long = "reserved-channel",
        env = "BRIDGE_RESERVED_CHANNELS",
        value_delimiter = ',',
        value_name = "FILTER"
    )]
    pub reserved_channels: Vec<String>,

    /// JWKS file with RS256/ES256 public keys; turns auth on. (HS256: set BRIDGE_JWT_SECRET.)
    #[arg(long, env = "BRIDGE_JWKS", value_name = "FILE")]
    pub jwks: Option<PathBuf>,

    /// Required token issuer (iss), when set.
    #[arg(long, env = "BRIDGE_JWT_ISSUER", value_name = "ISS")]
    pub jwt_issuer: Option<String>,

    /// Required token audience (aud), when set.
    #[arg(long, env = "BRIDGE_JWT_AUDIENCE", value_name = "AUD")]
    pub jwt_audience: Option<String>,

    /// Clock skew tolerated on exp/nbf, in seconds [default: 0].
    #[arg(long, env = "BRIDGE_JWT_LEEWAY", value_name = "SECS")]
    pub jwt_leeway: Option<u64>,

    /// Largest text frame answered normally; larger ones get a too_large error
    /// [default: 131072].
    #[arg(long, env = "BRIDGE_MAX_FRAME_BYTES", value_name = "BYTES")]
    pub max_frame_bytes: Option<usize>,

    /// Largest decoded publish payload, and largest MQTT payload delivered to web
    /// clients [default: 131072].
    #[arg(long, env = "BRIDGE_MAX_PAYLOAD_BYTES", value_name = "BYTES")]
    pub max_payload_bytes: Option<usize>,

    /// Hard cap on a WebSocket message; beyond it the connection is closed with 1009
    /// [default: 1048576].
    #[arg(long, env = "BRIDGE_HARD_FRAME_BYTES", value_name = "BYTES")]
    pub hard_frame_bytes: Option<usize>,

    /// Subscriptions one connection may hold [default: 100].
    #[arg(long, env = "BRIDGE_MAX_SUBSCRIPTIONS", value_name = "N")]
    pub max_subscriptions: Option<usize>,

    /// Publishes per second one connection may make on average; 0 = unlimited
    /// [default: 100].
    #[arg(long, env = "BRIDGE_PUBLISH_RATE", value_name = "PER_SEC")]
    pub publish_rate: Option<f64>,

    /// Publishes one connection may make in a burst [default: 200].
    #[arg(long, env = "BRIDGE_PUBLISH_BURST", value_name = "N")]
    pub publish_burst: Option<f64>,

    /// Frames queued for one connection before it loses messages (and is sent `lagged`)
    /// [default: 1024].
    #[arg(long, env = "BRIDGE_OUTBOUND_QUEUE", value_name = "FRAMES")]
    pub outbound_queue: Option<usize>,

    /// Bytes queued for one connection (messages and retained replays) before it loses
    /// messages (and is sent `lagged`) [default: 1048576].
    #[arg(long, env = "BRIDGE_OUTBOUND_BYTES", value_name = "BYTES")]
    pub outbound_bytes: Option<usize>,

    /// Requests per second one connection may make on average, every action counted;
    /// 0 = unlimited [default: 200].
    #[arg(long, env = "BRIDGE_REQUEST_RATE", value_name = "PER_SEC")]
    pub request_rate: Option<f64>,

    /// Requests one connection may make in a burst [default: 400].
    #[arg(long, env = "BRIDGE_REQUEST_BURST", value_name = "N")]
    pub request_burst: Option<f64>,

    /// A connection whose socket accepts no data for this long is closed (1008)
    /// [default: 30].
    #[arg(long, env = "BRIDGE_WRITE_TIMEOUT", value_name = "SECS")]
    pub write_timeout: Option<f64>,

    /// The kernel send buffer of each accepted connection, so that a peer that stops
    /// reading stalls the bridge's writes (and meets --write-timeout) within seconds
    /// instead of after the kernel grew the buffer to megabytes; 0 = the kernel's own
    /// sizing [default: 131072].
    #[arg(long, env = "BRIDGE_SEND_BUFFER", value_name = "BYTES")]
    pub send_buffer: Option<usize>,

    /// An HTTP request must complete its headers within this time, or its TCP
    /// connection is closed [default: 10].
    #[arg(long, env = "BRIDGE_HEADER_TIMEOUT", value_name = "SECS")]
    pub header_timeout: Option<f64>,

    /// WebSocket connections served at once; beyond it the upgrade gets HTTP 503
    /// [default: 50000, at most the open-files limit allows].
    #[arg(long, env = "BRIDGE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,

    /// An Origin (e.g. https://dash.example.com) whose pages may open WebSockets when auth
    /// is off; '*' allows any (repeatable). The bridge's own origin is always allowed, and
    /// with auth on every origin is (the token is the credential).
    #[arg(
        long = "allowed-origin",
        env = "BRIDGE_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    pub allowed_origins: Vec<String>,

    /// Log format (logs go to stderr; filter with RUST_LOG) [default: text].
    #[arg(long, env = "BRIDGE_LOG_FORMAT", value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Also run 12 simulated devices (demo-01 ... demo-12, as `bridge simulate`) on the
    /// embedded broker, so the dashboard at / shows a live fleet.
    #[arg(long)]
    pub demo: bool,
}

/// The config file. Sections group the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub allowed_origins: Option<Vec<String>>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    #[serde(default)]
    pub mqtt: MqttFile,
    #[serde(default)]
    pub auth: AuthFile,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub channels: ChannelsFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttFile {
    pub url: Option<String>,
    pub embedded_broker: Option<SocketAddr>,
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub keep_alive: Option<u64>,
    pub embedded_user: Option<String>,
    pub embedded_password: Option<Secret>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    pub jwt_secret: Option<Secret>,
    pub jwks: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_frame_bytes: Option<usize>,
    pub max_payload_bytes: Option<usize>,
    pub hard_frame_bytes: Option<usize>,
    pub max_subscriptions: Option<usize>,
    pub publish_rate: Option<f64>,
    pub publish_burst: Option<f64>,
    pub outbound_queue: Option<usize>,
    pub outbound_bytes: Option<usize>,
    pub request_rate: Option<f64>,
    pub request_burst: Option<f64>,
    pub write_timeout: Option<f64>,
    pub send_buffer: Option<usize>,
    pub header_timeout: Option<f64>,
    pub max_connections: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelsFile {
    pub prefix: Option<String>,
    pub reserved: Option<Vec<String>>,
}

/// Where the MQTT side is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// Run the embedded broker (rmqtt) in the process on this address.
    Embedded(SocketAddr),
    /// Connect to an external broker.
    External { host: String, port: u16, tls: bool },
}

/// A password or key: never printed, not even by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Auth mode.
#[derive(Clone, PartialEq, Eq)]
pub enum AuthMode {
    Off,
    Secret(String),
    Jwks(PathBuf),
}

impl std::fmt::Debug for AuthMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthMode::Off => write!(f, "Off"),
            AuthMode::Secret(_) => write!(f, "Secret(<redacted>)"),
            AuthMode::Jwks(p) => write!(f, "Jwks({p:?})"),
        }
    }
}

/// Every setting, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// wss:// certificate and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub broker: Broker,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub keep_alive_secs: u64,
    pub prefix: Option<String>,
    pub reserved: Vec<String>,
    pub auth: AuthMode,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub jwt_leeway: u64,
    pub limits: FrameLimits,
    pub hard_frame_bytes: usize,
    pub max_subscriptions: usize,
    pub publish_rate: f64,
    pub publish_burst: f64,
    pub outbound_queue: usize,
    pub outbound_bytes: usize,
    pub request_rate: f64,
    pub request_burst: f64,
    pub write_timeout: std::time::Duration,
    /// Kernel send buffer per accepted connection (0: the kernel's sizing).
    pub send_buffer: usize,
    pub header_timeout: std::time::Duration,
    pub max_connections: usize,
    pub allowed_origins: Vec<String>,
    pub log_format: LogFormat,
    /// Run the demo devices (`--demo`).
    pub demo: bool,
    /// The embedded broker's device login (username, password), if any.
    pub embedded_user: Option<(String, Secret)>,
}

/// A setting that makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config file {0}: {1}")]
    Parse(PathBuf, String),
    #[error("{0}")]
    Invalid(String),
}

/// Parses `mqtt://host:port` / `mqtts://host:port`.
pub fn parse_mqtt_url(url: &str) -> Result<Broker, ConfigError> {
    // The URL as an error may show it: any `user:password@` taken out.
    let shown = match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://<credentials>@{host}"),
            None => url.to_string(),
        },
        None => match url.rsplit_once('@') {
            Some((_, host)) => format!("<credentials>@{host}"),
            None => url.to_string(),
        },
    };
    let bad = |why: &str| ConfigError::Invalid(format!("--mqtt-url {shown:?}: {why}"));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected mqtt://HOST:PORT or mqtts://HOST:PORT"))?;
    let tls = match scheme {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        _ => return Err(bad("the scheme must be mqtt or mqtts")),
    };
    if rest.contains('@') {
        return Err(bad(
            "do not put credentials in the URL; use --mqtt-username and BRIDGE_MQTT_PASSWORD",
        ));
    }
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    // HOST, HOST:PORT, [V6], [V6]:PORT
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        match after.strip_prefix(':') {
            Some(p) => (
                host,
                p.parse::<u16>()
                    .map_err(|_| bad("the port must be a number"))?,
            ),
            None if after.is_empty() => (host, default_port),
            None => return Err(bad("unexpected text after the address")),
        }
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad("the port must be a number"))?,
            ),
            None => (rest, default_port),
        }
    };
    if host.is_empty() || host.contains('/') {
        return Err(bad("missing host"));
    }
    Ok(Broker::External {
        host: host.to_string(),
        port,
        tls,
    })
}

/// A duration setting in seconds: positive and finite.
fn seconds(
    name: &str,
    value: Option<f64>,
    default: f64,
) -> Result<std::time::Duration, ConfigError> {
    let secs = value.unwrap_or(default);
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(ConfigError::Invalid(format!(
            "{name} must be a positive number of seconds (got {secs})"
        )));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn default_client_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("bridge-{:08x}", (std::process::id() << 16) ^ nanos)
}

impl Settings {
    /// Resolves flags (with their environment variables) over the config file
    /// over defaults. `secret_env` is `BRIDGE_JWT_SECRET`, `password_env` is
    /// `BRIDGE_MQTT_PASSWORD` (passed in so tests need not touch the process
    /// environment).
    pub fn resolve(
        args: &ServeArgs,
        secret_env: Option<String>,
        password_env: Option<String>,
    ) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError::Read(path.clone(), e))?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|e| ConfigError::Parse(path.clone(), e.to_string()))?
            }
            None => FileConfig::default(),
        };
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));
        let broker = match args.mqtt_url.clone().or(file.mqtt.url) {
            Some(url) => parse_mqtt_url(&url)?,
            None => Broker::Embedded(
                args.embedded_broker
                    .or(file.mqtt.embedded_broker)
                    .unwrap_or_else(|| DEFAULT_EMBEDDED_BROKER.parse().expect("valid default")),
            ),
        };
        let secret = secret_env
            .filter(|s| !s.is_empty())
            .or(file.auth.jwt_secret.map(|s| s.0));
        let jwks = args.jwks.clone().or(file.auth.jwks);
        let auth = match (secret, jwks) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "set either BRIDGE_JWT_SECRET (HS256) or --jwks (RS256/ES256), not both".into(),
                ))
            }
            (Some(s), None) => AuthMode::Secret(s),
            (None, Some(p)) => AuthMode::Jwks(p),
            (None, None) => AuthMode::Off,
        };
        let limits = FrameLimits {
            max_frame_bytes: args
                .max_frame_bytes
                .or(file.limits.max_frame_bytes)
                .unwrap_or(128 * 1024),
            max_payload_bytes: args
                .max_payload_bytes
                .or(file.limits.max_payload_bytes)
                .unwrap_or(128 * 1024),
        };
        let hard_frame_bytes = args
            .hard_frame_bytes
            .or(file.limits.hard_frame_bytes)
            .unwrap_or(1024 * 1024);
        if hard_frame_bytes < limits.max_frame_bytes {
            return Err(ConfigError::Invalid(format!(
                "hard_frame_bytes ({hard_frame_bytes}) must be at least max_frame_bytes ({})",
                limits.max_frame_bytes
            )));
        }
        let outbound_queue = args
            .outbound_queue
            .or(file.limits.outbound_queue)
            .unwrap_or(1024);
        if outbound_queue < 2 {
            return Err(ConfigError::Invalid(
                "outbound_queue must be at least 2".into(),
            ));
        }
        let outbound_bytes = args
            .outbound_bytes
            .or(file.limits.outbound_bytes)
            .unwrap_or(1024 * 1024);
        if outbound_bytes < limits.max_payload_bytes + 1024 {
            return Err(ConfigError::Invalid(format!(
                "outbound_bytes ({outbound_bytes}) must hold at least one message of \
                 max_payload_bytes ({}) plus its frame (1024 bytes)",
                limits.max_payload_bytes
            )));
        }
        let allowed_origins = if args.allowed_origins.is_empty() {
            file.allowed_origins.unwrap_or_default()
        } else {
            args.allowed_origins.clone()
        };
        for o in &allowed_origins {
            if o != "*" && o != "null" && !o.contains("://") {
                return Err(ConfigError::Invalid(format!(
                    "allowed origin {o:?}: expected SCHEME://HOST[:PORT] (e.g. https://dash.example.com), \
                     'null' or '*'"
                )));
            }
        }
        let reserved = if args.reserved_channels.is_empty() {
            file.channels.reserved.unwrap_or_default()
        } else {
            args.reserved_channels.clone()
        };
        for r in &reserved {
            crate::channel::validate_filter(r)
                .map_err(|e| ConfigError::Invalid(format!("reserved channel {r:?}: {e}")))?;
        }
        if args.demo && !matches!(broker, Broker::Embedded(_)) {
            return Err(ConfigError::Invalid(
                "--demo runs its devices on the embedded broker; with --mqtt-url, run them with \
                 `bridge simulate --mqtt-url URL --devices N` instead"
                    .into(),
            ));
        }
        let embedded_user = match (
            args.embedded_broker_user
                .clone()
                .or(file.mqtt.embedded_user),
            args.embedded_broker_password
                .clone()
                .filter(|p| !p.expose().is_empty())
                .or(file.mqtt.embedded_password),
        ) {
            (Some(name), Some(password)) if !name.is_empty() => Some((name, password)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "the embedded broker's device login needs both --embedded-broker-user and \
                     BRIDGE_EMBEDDED_BROKER_PASSWORD (or both in the config file)"
                        .into(),
                ))
            }
        };
        if embedded_user.is_some() && !matches!(broker, Broker::Embedded(_)) {
            return Err(ConfigError::Invalid(
                "--embedded-broker-user applies to the embedded broker, not to --mqtt-url".into(),
            ));
        }
        let prefix = args.topic_prefix.clone().or(file.channels.prefix);
        crate::channel::Prefix::new(prefix.as_deref())
            .map_err(|e| ConfigError::Invalid(format!("topic prefix: {e}")))?;
        let client_id = args
            .mqtt_client_id
            .clone()
            .or(file.mqtt.client_id)
            .unwrap_or_else(default_client_id);
        let cert = args.mqtt_cert.clone().or(file.mqtt.cert);
        let key = args.mqtt_key.clone().or(file.mqtt.key);
        if cert.is_some() != key.is_some() {
            return Err(ConfigError::Invalid(
                "--mqtt-cert and --mqtt-key go together".into(),
            ));
        }
        let tls = match (
            args.tls_cert.clone().or(file.tls_cert),
            args.tls_key.clone().or(file.tls_key),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "--tls-cert and --tls-key go together".into(),
                ))
            }
        };
        Ok(Settings {
            listen,
            tls,
            broker,
            client_id,
            username: args.mqtt_username.clone().or(file.mqtt.username),
            password: password_env
                .filter(|s| !s.is_empty())
                .map(Secret)
                .or(file.mqtt.password),
            ca: args.mqtt_ca.clone().or(file.mqtt.ca),
            cert,
            key,
            keep_alive_secs: args
                .mqtt_keep_alive
                .or(file.mqtt.keep_alive)
                .unwrap_or(30)
                .max(5),
            prefix,
            reserved,
            auth,
            jwt_issuer: args.jwt_issuer.clone().or(file.auth.issuer),
            jwt_audience: args.jwt_audience.clone().or(file.auth.audience),
            jwt_leeway: args.jwt_leeway.or(file.auth.leeway).unwrap_or(0),
            limits,
            hard_frame_bytes,
            max_subscriptions: args
                .max_subscriptions
                .or(file.limits.max_subscriptions)
                .unwrap_or(100),
            publish_rate: args
                .publish_rate
                .or(file.limits.publish_rate)
                .unwrap_or(100.0),
            publish_burst: args
                .publish_burst
                .or(file.limits.publish_burst)
                .unwrap_or(200.0),
            outbound_queue,
            outbound_bytes,
            request_rate: args
                .request_rate
                .or(file.limits.request_rate)
                .unwrap_or(200.0),
            request_burst: args
                .request_burst
                .or(file.limits.request_burst)
                .unwrap_or(400.0),
            write_timeout: seconds(
                "write_timeout",
                args.write_timeout.or(file.limits.write_timeout),
                30.0,
            )?,
            send_buffer: args
                .send_buffer
                .or(file.limits.send_buffer)
                .unwrap_or(128 * 1024),
            header_timeout: seconds(
                "header_timeout",
                args.header_timeout.or(file.limits.header_timeout),
                10.0,
            )?,
            max_connections: args
                .max_connections
                .or(file.limits.max_connections)
                .unwrap_or(50_000),
            allowed_origins,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            demo: args.demo,
            embedded_user,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_mqtt_url("mqtt://localhost:1884").unwrap(),
            Broker::External {
                host: "localhost".into(),
                port: 1884,
                tls: false
            }
        );
        assert_eq!(
            parse_mqtt_url("mqtts://x.iot.eu-west-1.amazonaws.com").unwrap(),
            Broker::External {
                host: "x.iot.eu-west-1.amazonaws.com".into(),
                port: 8883,
                tls: true
            }
        );
        assert!(parse_mqtt_url("http://x").is_err());
        let e = parse_mqtt_url("mqtt://user:hunter2@x:1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("credentials") && !e.contains("hunter2"), "{e}");
        let e = parse_mqtt_url("http://u:hunter2@x")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(parse_mqtt_url("mqtt://:1").is_err());
    }

    #[test]
    fn secrets_never_in_debug() {
        let args = ServeArgs::default();
        let s = Settings::resolve(
            &args,
            Some("jwt-secret-value".into()),
            Some("hunter2".into()),
        )
        .unwrap();
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("jwt-secret-value"),
            "{shown}"
        );
        assert_eq!(s.password.as_ref().map(Secret::expose), Some("hunter2"));
    }

    #[test]
    fn abuse_limits() {
        let s = Settings::resolve(&ServeArgs::default(), None, None).unwrap();
        assert_eq!(s.outbound_bytes, 1024 * 1024);
        assert_eq!(s.write_timeout, std::time::Duration::from_secs(30));
        assert_eq!(s.header_timeout, std::time::Duration::from_secs(10));
        assert_eq!((s.request_rate, s.request_burst), (200.0, 400.0));
        for bad in [
            ServeArgs {
                write_timeout: Some(0.0),
                ..ServeArgs::default()
            },
            ServeArgs {
                header_timeout: Some(f64::NAN),
                ..ServeArgs::default()
            },
            ServeArgs {
                outbound_bytes: Some(1000),
                ..ServeArgs::default()
            },
            ServeArgs {
                allowed_origins: vec!["example.com".into()],
                ..ServeArgs::default()
            },
            // The demo devices live on the embedded broker only.
            ServeArgs {
                demo: true,
                mqtt_url: Some("mqtt://127.0.0.1:1883".into()),
                ..ServeArgs::default()
            },
        ] {
            assert!(matches!(
                Settings::resolve(&bad, None, None),
                Err(ConfigError::Invalid(_))
            ));
        }
    }

    #[test]
    fn example_config_parses() {
        let path = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../bridge.example.toml"
        ));
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        let s = Settings::resolve(&args, None, None).unwrap();
        assert_eq!(s.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(s.outbound_queue, 1024);
        assert_eq!(s.auth, AuthMode::Off);
    }

    #[test]
    fn precedence() {
        let dir = std::env::temp_dir().join(format!("bridge-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\n[limits]\nmax_subscriptions = 5\noutbound_queue = 64\n[auth]\njwt_secret = \"file\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            max_subscriptions: Some(7),
            ..ServeArgs::default()
        };
        let s = Settings::resolve(&args, None, None).unwrap();
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.max_subscriptions, 7);
        assert_eq!(s.outbound_queue, 64);
        assert_eq!(s.auth, AuthMode::Secret("file".into()));
        assert_eq!(
            s.broker,
            Broker::Embedded("127.0.0.1:1883".parse().unwrap())
        );
        let s = Settings::resolve(&args, Some("env".into()), None).unwrap();
        assert_eq!(s.auth, AuthMode::Secret("env".into()));
        std::fs::write(&path, "bogus = 1\n").unwrap();
        assert!(matches!(
            Settings::resolve(&args, None, None),
            Err(ConfigError::Parse(..))
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
