//! The command line ([`Cli`]) and the settings resolved from it ([`Opts`]):
//! which servers ([`Target`]) and scenarios to run, and each scenario's knobs.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use rumqttc::QoS;

use crate::device::{self, Rate};
use crate::payload;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// `bridge serve` with its embedded broker (the device publishes to it).
    Bridge,
    /// `bridge serve --mqtt-url` in front of a Mosquitto the bench starts.
    BridgeMosquitto,
    /// Mosquitto's own WebSocket listener, MQTT-over-WebSocket subscribers.
    Mosquitto,
    /// Reference: Mosquitto's plain MQTT listener, MQTT-over-TCP subscribers
    /// (no WebSocket anywhere).
    MosquittoTcp,
}

impl Target {
    pub fn label(self) -> &'static str {
        match self {
            Target::Bridge => "bridge (embedded broker)",
            Target::BridgeMosquitto => "bridge + Mosquitto broker",
            Target::Mosquitto => "Mosquitto WebSocket listener",
            Target::MosquittoTcp => "Mosquitto MQTT/TCP (reference)",
        }
    }

    /// Runs `bridge serve`.
    pub fn needs_bridge(self) -> bool {
        matches!(self, Target::Bridge | Target::BridgeMosquitto)
    }

    /// Runs a Mosquitto (as the bridge's broker or as the server measured).
    pub fn needs_mosquitto(self) -> bool {
        matches!(
            self,
            Target::BridgeMosquitto | Target::Mosquitto | Target::MosquittoTcp
        )
    }

    pub fn tag(self) -> &'static str {
        match self {
            Target::Bridge => "bridge",
            Target::BridgeMosquitto => "bridge-mosquitto",
            Target::Mosquitto => "mosquitto",
            Target::MosquittoTcp => "mosquitto-tcp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MqttClient {
    Raw,
    Rumqttc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    Fanout,
    Idle,
    /// Honest subscribers while an attacker runs (bridge targets only; not
    /// in the default run).
    Abuse,
}

/// One row of the abuse scenario: what runs beside the honest subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Attack {
    /// No attacker: the row the others are compared with.
    Baseline,
    /// Connections that subscribe to the honest channel and never read.
    SlowReaders,
    /// HTTP requests whose head trickles in a few bytes at a time, never
    /// finished (slowloris).
    SlowRequests,
    /// Connections sending subscribe / unsubscribe / ping as fast as the
    /// server answers, every subscribe to a new filter.
    Flood,
    /// Publishes to and subscribes to channels with control characters and
    /// Unicode non-characters, as fast as the server answers.
    Poison,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdleTopics {
    /// Every idle connection subscribes to one channel `bench/idle`.
    Shared,
    /// Connection i subscribes to its own channel `bench/idle/i`.
    Distinct,
    /// Both, one after the other.
    Both,
}

/// Fan-out throughput and latency, and idle memory per connection, of the
/// channel bridge and of Mosquitto's WebSocket listener; the bridge under abuse.
#[derive(Debug, Parser)]
#[command(
    name = "bench",
    after_help = "Build first: cargo build --release -p bridge && cargo build --release -p bench. \
Then: target/release/bench --quick (about 2 minutes), or target/release/bench for the full run \
(1,000 subscribers, 10,000 idle connections). The abuse scenario runs on request: \
target/release/bench --scenarios abuse --targets bridge,bridge-mosquitto (about 15 minutes; \
--quick about 6). See bench/README.md for the method."
)]
pub struct Cli {
    /// A short run: 100 subscribers, 1,000 idle connections, 3 s phases;
    /// abuse rows of 10 s (the slow-reader row 110 s) with the bridge's
    /// write and header timeouts shortened to 5 s and 3 s (explicit options
    /// still win).
    #[arg(long)]
    quick: bool,

    /// Servers to measure (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "bridge,bridge-mosquitto,mosquitto"
    )]
    targets: Vec<Target>,

    /// Scenarios to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fanout,idle")]
    scenarios: Vec<Scenario>,

    /// WebSocket subscribers on the fan-out channel (fan-out and abuse
    /// scenarios) [default: 1000; --quick: 100].
    #[arg(long, value_name = "N")]
    subscribers: Option<usize>,

    /// Device payload size in bytes (valid JSON, at least 80).
    #[arg(long, default_value_t = 256, value_name = "BYTES")]
    payload: usize,

    /// Offered device rates, messages per second, or `max` (as fast as the
    /// broker acknowledges), comma-separated; each is one phase.
    #[arg(long, value_delimiter = ',', value_parser = device::parse_rate, default_value = "20,50,100,200,500,1000,max")]
    rates: Vec<Rate>,

    /// Seconds the device publishes in each phase [default: 10; --quick: 3].
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,

    /// After a phase, wait this long without progress before counting the
    /// missing messages as lost.
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    drain_timeout: f64,

    /// MQTT QoS of the device's publishes (0 or 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    device_qos: u8,

    /// MQTT QoS of the MQTT-over-WebSocket subscribers (0 or 1).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    sub_qos: u8,

    /// MQTT subscriber implementation for the Mosquitto targets: `raw` (a
    /// minimal MQTT 3.1.1 client on tokio-tungstenite, as light as the bridge
    /// subscribers) or `rumqttc` (heavier: the load tool may become the
    /// bottleneck).
    #[arg(long, value_enum, default_value = "raw")]
    mqtt_client: MqttClient,

    /// Idle connections for the memory scenario [default: 10000; --quick: 1000].
    #[arg(long, value_name = "N")]
    idle_connections: Option<usize>,

    /// Channels of the idle connections.
    #[arg(long, value_enum, default_value = "both")]
    idle_topics: IdleTopics,

    /// Seconds to let the server settle before reading its memory.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    settle: f64,

    /// The bridge's --outbound-queue (frames per connection before `lagged`).
    #[arg(long, default_value_t = 16384, value_name = "FRAMES")]
    outbound_queue: usize,

    /// Abuse scenario: the rows to run (comma-separated), each against a
    /// freshly started server.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "baseline,slow-readers,slow-requests,flood,poison"
    )]
    attacks: Vec<Attack>,

    /// Abuse scenario: seconds the device publishes in each row while the
    /// attacker runs [default: 60; --quick: 10].
    #[arg(long, value_name = "SECS")]
    abuse_duration: Option<f64>,

    /// Abuse scenario: the same, for the slow-reader row [default: 150;
    /// --quick: 110]. A slow reader's socket first takes up to the kernel's
    /// send buffer (4 MiB by default: about 95 s at 100 msg/s) before the
    /// bridge's write deadline starts; the row must outlast both.
    #[arg(long, value_name = "SECS")]
    slow_reader_duration: Option<f64>,

    /// Abuse scenario: messages per second on the honest channel.
    #[arg(long, default_value_t = 100.0, value_name = "PER_SEC")]
    abuse_rate: f64,

    /// Abuse scenario: connections that subscribe and never read.
    #[arg(long, default_value_t = 50, value_name = "N")]
    slow_readers: usize,

    /// Abuse scenario: half-open HTTP requests held at once (each one the
    /// server closes is reopened).
    #[arg(long, default_value_t = 500, value_name = "N")]
    slow_requests: usize,

    /// Abuse scenario: connections of the subscribe/unsubscribe/ping flood.
    #[arg(long, default_value_t = 4, value_name = "N")]
    flooders: usize,

    /// Abuse scenario: the bridge's --write-timeout [default: the bridge's
    /// own, 30; --quick: 5].
    #[arg(long, value_name = "SECS")]
    abuse_write_timeout: Option<f64>,

    /// Abuse scenario: the bridge's --header-timeout [default: the bridge's
    /// own, 10; --quick: 3].
    #[arg(long, value_name = "SECS")]
    abuse_header_timeout: Option<f64>,

    /// RUST_LOG for the bridge under test.
    #[arg(long, default_value = "warn", value_name = "FILTER")]
    bridge_log: String,

    /// Connections being opened at once.
    #[arg(long, default_value_t = 100, value_name = "N")]
    connect_concurrency: usize,

    /// The bridge binary [default: `bridge` next to this executable].
    #[arg(long, value_name = "PATH")]
    bridge: Option<PathBuf>,

    /// The Mosquitto binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto", value_name = "PATH")]
    mosquitto: PathBuf,

    /// Keep the servers' configs and logs (in $TMPDIR/bridge-bench-PID).
    #[arg(long)]
    keep_logs: bool,
}

/// Settings resolved from the command line.
pub struct Opts {
    pub targets: Vec<Target>,
    pub scenarios: Vec<Scenario>,
    pub subscribers: usize,
    pub payload: usize,
    pub rates: Vec<Rate>,
    pub duration: Duration,
    pub drain_timeout: Duration,
    pub device_qos: QoS,
    pub sub_qos: QoS,
    pub mqtt_client: MqttClient,
    pub idle_connections: usize,
    pub idle_topics: Vec<IdleTopics>,
    pub settle: Duration,
    pub outbound_queue: usize,
    pub abuse: AbuseOpts,
    pub bridge_log: String,
    pub concurrency: usize,
    pub bridge: PathBuf,
    pub mosquitto: PathBuf,
    pub keep_logs: bool,
}

/// The abuse scenario's settings.
pub struct AbuseOpts {
    pub attacks: Vec<Attack>,
    pub duration: Duration,
    pub slow_reader_duration: Duration,
    pub rate: f64,
    pub slow_readers: usize,
    pub slow_requests: usize,
    pub flooders: usize,
    /// The bridge's --write-timeout and --header-timeout when not its
    /// defaults (`None`: not passed).
    pub write_timeout: Option<f64>,
    pub header_timeout: Option<f64>,
}

fn qos(n: u8) -> QoS {
    if n == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

impl Opts {
    pub fn resolve(cli: Cli) -> Result<Opts, String> {
        if cli.payload < payload::MIN_SIZE {
            return Err(format!(
                "--payload must be at least {} bytes",
                payload::MIN_SIZE
            ));
        }
        let bridge = match cli.bridge {
            Some(p) => p,
            None => std::env::current_exe()
                .map_err(|e| format!("cannot find my own executable: {e}"))?
                .parent()
                .map(|d| d.join("bridge"))
                .ok_or("cannot find my own directory")?,
        };
        let idle_topics = match cli.idle_topics {
            IdleTopics::Both => vec![IdleTopics::Shared, IdleTopics::Distinct],
            t => vec![t],
        };
        let secs = |s: f64, what: &str| {
            Duration::try_from_secs_f64(s).map_err(|_| format!("{what}: {s} is not a duration"))
        };
        if !(cli.abuse_rate > 0.0 && cli.abuse_rate.is_finite()) {
            return Err(format!(
                "--abuse-rate: {} is not a positive rate",
                cli.abuse_rate
            ));
        }
        let timeout = |given: Option<f64>, quick: f64, what: &str| match given {
            Some(s) if !(s > 0.0 && s.is_finite()) => Err(format!("{what}: {s} is not a timeout")),
            Some(s) => Ok(Some(s)),
            None => Ok(cli.quick.then_some(quick)),
        };
        let abuse = AbuseOpts {
            attacks: cli.attacks,
            duration: secs(
                cli.abuse_duration
                    .unwrap_or(if cli.quick { 10.0 } else { 60.0 }),
                "--abuse-duration",
            )?,
            slow_reader_duration: secs(
                cli.slow_reader_duration
                    .unwrap_or(if cli.quick { 110.0 } else { 150.0 }),
                "--slow-reader-duration",
            )?,
            rate: cli.abuse_rate,
            slow_readers: cli.slow_readers,
            slow_requests: cli.slow_requests,
            flooders: cli.flooders.max(1),
            write_timeout: timeout(cli.abuse_write_timeout, 5.0, "--abuse-write-timeout")?,
            header_timeout: timeout(cli.abuse_header_timeout, 3.0, "--abuse-header-timeout")?,
        };
        Ok(Opts {
            targets: cli.targets,
            scenarios: cli.scenarios,
            subscribers: cli
                .subscribers
                .unwrap_or(if cli.quick { 100 } else { 1000 })
                .max(1),
            payload: cli.payload,
            rates: cli.rates,
            duration: secs(
                cli.duration.unwrap_or(if cli.quick { 3.0 } else { 10.0 }),
                "--duration",
            )?,
            drain_timeout: secs(cli.drain_timeout, "--drain-timeout")?,
            device_qos: qos(cli.device_qos),
            sub_qos: qos(cli.sub_qos),
            mqtt_client: cli.mqtt_client,
            idle_connections: cli
                .idle_connections
                .unwrap_or(if cli.quick { 1000 } else { 10_000 })
                .max(1),
            idle_topics,
            settle: secs(cli.settle, "--settle")?,
            outbound_queue: cli.outbound_queue.max(1),
            abuse,
            bridge_log: cli.bridge_log,
            concurrency: cli.connect_concurrency.max(1),
            bridge,
            mosquitto: cli.mosquitto,
            keep_logs: cli.keep_logs,
        })
    }
}
