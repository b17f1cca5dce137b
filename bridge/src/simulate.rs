//! `bridge simulate` (and `bridge serve --demo`): a fleet of simulated
//! devices, each its own real MQTT connection, so a dashboard has something
//! to watch and command before any real device exists.
//!
//! A device `{id}` publishes JSON telemetry to `ROOT/{id}/telemetry`, keeps a
//! retained `online`/`offline` in `ROOT/{id}/status` (its last will is the
//! retained `offline`) and obeys `ROOT/{id}/commands` (see [`device`]). ROOT
//! is `--prefix` (default `fleet`). Ids are a short random run tag and a
//! number (`k7q2-01`), so simulators running at the same time on one broker
//! never share a device (or an MQTT client id).
//!
//! The connection settings are `bridge serve`'s: the same URL rules, TLS
//! (system roots or `--mqtt-ca`, a client certificate with `--mqtt-cert` and
//! `--mqtt-key`, as AWS IoT Core wants), username and `BRIDGE_MQTT_PASSWORD`,
//! resolved by [`Settings::resolve`] and turned into rumqttc options by the
//! server's own [`mqtt_options`]. On AWS IoT Core the certificate's policy
//! must allow `iot:Connect` for the ids (with the `iot:ConnectAttributes`
//! condition allowing `LastWill`), `iot:Publish` and `iot:RetainPublish` on
//! `ROOT/*/status`, `iot:Publish` on `ROOT/*/telemetry`, `iot:Subscribe` on
//! `ROOT/*/commands` and `iot:Receive` on them.

mod device;
mod sensors;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::MqttOptions;
use tokio_util::sync::CancellationToken;

use crate::config::{Broker, ServeArgs, Settings};
use crate::server::mqtt::mqtt_options;

pub use device::{Command, Topics, REBOOT_PAUSE};
pub use sensors::{Rng, Sensors};

/// Devices `bridge serve --demo` runs.
pub const DEMO_DEVICES: usize = 12;
/// The run tag of the demo devices (`demo-01` ...): one embedded broker
/// holds one demo.
pub const DEMO_TAG: &str = "demo";
/// The default topic root.
pub const DEFAULT_ROOT: &str = "fleet";
/// Most devices one simulator runs (each is a connection and a file
/// descriptor).
pub const MAX_DEVICES: u32 = 10_000;
/// Most telemetry messages a second one device sends.
pub const MAX_RATE: f64 = 100.0;
/// New connections a second, so a large fleet does not storm the broker
/// (AWS IoT Core limits connects per account and second).
const CONNECTS_PER_SEC: f64 = 100.0;
/// Letters of a run tag: lowercase, digits, no look-alikes (i, l, o, u).
const TAG_ALPHABET: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// `bridge simulate` flags.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Each device publishes JSON telemetry to PREFIX/{id}/telemetry, a retained \
\"online\" to PREFIX/{id}/status (its last will: a retained \"offline\"), and obeys \
PREFIX/{id}/commands: {\"led\":\"on\"|\"off\"} (reflected in its telemetry) and \
{\"reboot\":true} (offline for 2 s). Ids are a random run tag and a number, e.g. k7q2-01. \
The MQTT password, if any, comes from BRIDGE_MQTT_PASSWORD."
)]
pub struct SimulateArgs {
    /// The broker: mqtt://HOST:PORT or mqtts://HOST:PORT (TLS, e.g. an AWS IoT Core endpoint).
    #[arg(long, value_name = "URL")]
    pub mqtt_url: String,

    /// Number of devices, each its own MQTT connection.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_DEVICES as i64))]
    pub devices: u32,

    /// Telemetry messages per second, per device.
    #[arg(long, value_name = "PER_SEC", default_value_t = 1.0)]
    pub rate: f64,

    /// Topic root of the devices' topics.
    #[arg(long, value_name = "ROOT", default_value = DEFAULT_ROOT)]
    pub prefix: String,

    /// MQTT username (the password comes from BRIDGE_MQTT_PASSWORD).
    #[arg(long, value_name = "NAME")]
    pub mqtt_username: Option<String>,

    /// PEM file of the CA that signs the broker's certificate (mqtts) [default: system roots].
    #[arg(long, value_name = "FILE")]
    pub mqtt_ca: Option<std::path::PathBuf>,

    /// PEM client certificate for mqtts (e.g. an AWS IoT device certificate).
    #[arg(long, value_name = "FILE")]
    pub mqtt_cert: Option<std::path::PathBuf>,

    /// PEM private key of --mqtt-cert.
    #[arg(long, value_name = "FILE")]
    pub mqtt_key: Option<std::path::PathBuf>,
}

/// A short random run tag, e.g. `k7q2`.
pub fn run_tag() -> String {
    let mut rng = Rng::seeded(u64::from(std::process::id()));
    (0..4)
        .map(|_| TAG_ALPHABET[(rng.next_u64() % TAG_ALPHABET.len() as u64) as usize] as char)
        .collect()
}

/// The ids of `count` devices of run `tag`: `tag-01` ... (numbers as wide
/// as the largest, at least two digits).
pub fn device_ids(tag: &str, count: usize) -> Vec<String> {
    let width = count.to_string().len().max(2);
    (1..=count).map(|n| format!("{tag}-{n:0width$}")).collect()
}

/// Checks a topic root against the channel rules, with the longest id and
/// topic that go under it.
fn check_root(root: &str, longest_id: &str) -> Result<(), String> {
    if root.is_empty() || crate::channel::has_wildcards(root) || root.starts_with('$') {
        return Err(format!(
            "--prefix {root:?}: expected a topic without wildcards that does not start with $"
        ));
    }
    let topic = Topics::new(root, longest_id).telemetry;
    crate::channel::validate_topic(&topic).map_err(|e| format!("--prefix {root:?}: {topic}: {e}"))
}

/// A running fleet: its devices and how many are connected.
pub struct Fleet {
    pub ids: Vec<String>,
    pub online: Arc<AtomicUsize>,
    pub done: tokio::task::JoinHandle<()>,
}

/// Starts one device per id under topic root `root`, connecting with
/// `options` (client id and will are set per device). Each publishes
/// telemetry every `period`; all say goodbye when `stop` fires, after which
/// `done` ends.
pub fn start(
    options: MqttOptions,
    root: &str,
    ids: Vec<String>,
    period: Duration,
    stop: CancellationToken,
) -> Fleet {
    let online = Arc::new(AtomicUsize::new(0));
    let mut rng = Rng::seeded(ids.len() as u64);
    let mut tasks = tokio::task::JoinSet::new();
    for (n, id) in ids.iter().enumerate() {
        let device = device::Device {
            id: id.clone(),
            topics: Topics::new(root, id),
            options: options.clone(),
            period,
            start_after: Duration::from_secs_f64(n as f64 / CONNECTS_PER_SEC),
            stop: stop.clone(),
            online: online.clone(),
            rng: Rng::seeded(rng.next_u64()),
        };
        tasks.spawn(device.run());
    }
    let done = tokio::spawn(async move {
        while let Some(ended) = tasks.join_next().await {
            if let Err(e) = ended {
                tracing::error!("a simulated device failed: {e}");
            }
        }
    });
    Fleet { ids, online, done }
}

/// `bridge serve --demo`: twelve devices (`demo-01` ...) on the bridge's own
/// broker, one telemetry message a second each, under channel `fleet` (and
/// the bridge's topic prefix, if any).
pub fn demo(settings: &Settings, stop: CancellationToken) -> std::io::Result<Fleet> {
    let options = mqtt_options(settings, "demo", true)?;
    let prefix = crate::channel::Prefix::new(settings.prefix.as_deref())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let root = prefix.to_mqtt(DEFAULT_ROOT);
    Ok(start(
        options,
        &root,
        device_ids(DEMO_TAG, DEMO_DEVICES),
        Duration::from_secs(1),
        stop,
    ))
}

/// A checked `bridge simulate` command line, ready to run.
pub struct Plan {
    options: MqttOptions,
    root: String,
    ids: Vec<String>,
    period: Duration,
    /// The broker, as it may be shown.
    shown: String,
}

/// Checks the flags and the TLS files (`password` is `BRIDGE_MQTT_PASSWORD`).
pub fn plan(args: &SimulateArgs, password: Option<String>) -> Result<Plan, String> {
    if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= MAX_RATE) {
        return Err(format!(
            "--rate must be more than 0 and at most {MAX_RATE} messages a second (got {})",
            args.rate
        ));
    }
    let tag = run_tag();
    let ids = device_ids(&tag, args.devices as usize);
    check_root(&args.prefix, ids.last().expect("at least one device"))?;
    // bridge serve's MQTT settings, so the URL, TLS and credential rules are
    // the same.
    let serve = ServeArgs {
        mqtt_url: Some(args.mqtt_url.clone()),
        mqtt_username: args.mqtt_username.clone(),
        mqtt_ca: args.mqtt_ca.clone(),
        mqtt_cert: args.mqtt_cert.clone(),
        mqtt_key: args.mqtt_key.clone(),
        ..ServeArgs::default()
    };
    let settings = Settings::resolve(&serve, None, password).map_err(|e| e.to_string())?;
    let options = mqtt_options(&settings, &ids[0], true).map_err(|e| e.to_string())?;
    let shown = match &settings.broker {
        Broker::External { host, port, tls } => {
            format!("{}://{host}:{port}", if *tls { "mqtts" } else { "mqtt" })
        }
        Broker::Embedded(addr) => format!("mqtt://{addr}"),
    };
    Ok(Plan {
        options,
        root: args.prefix.clone(),
        ids,
        period: Duration::from_secs_f64(1.0 / args.rate),
        shown,
    })
}

/// `bridge simulate`: runs the fleet until Ctrl-C or SIGTERM, then takes
/// every device offline cleanly.
pub async fn run(plan: Plan) -> Result<(), String> {
    let Plan {
        options,
        root,
        ids,
        period,
        shown,
    } = plan;
    let stop = CancellationToken::new();
    let fleet = start(options, &root, ids, period, stop.clone());
    let (first, last) = (&fleet.ids[0], &fleet.ids[fleet.ids.len() - 1]);
    // Lines scripts (and the tests) read.
    println!(
        "simulating {} devices {first}..{last} on {shown} (topics {root}/{{id}}/telemetry, {root}/{{id}}/status, {root}/{{id}}/commands)",
        fleet.ids.len(),
    );
    let all_online = async {
        while fleet.online.load(Ordering::Relaxed) < fleet.ids.len() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("all {} devices online", fleet.ids.len());
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = crate::server::signal() => {}
        _ = all_online => {}
    }
    eprintln!("bridge: stopping: every device says offline and disconnects");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), fleet.done).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_tag_and_number() {
        assert_eq!(device_ids("k7q2", 3), ["k7q2-01", "k7q2-02", "k7q2-03"]);
        assert_eq!(device_ids("t", 100)[99], "t-100");
        assert_eq!(device_ids("t", 100)[0], "t-001");
    }

    #[test]
    fn run_tags_differ() {
        let tag = run_tag();
        assert_eq!(tag.len(), 4);
        assert!(tag.bytes().all(|b| TAG_ALPHABET.contains(&b)));
        let tags: std::collections::HashSet<String> = (0..50).map(|_| run_tag()).collect();
        assert!(tags.len() > 40, "{tags:?}");
    }

    #[test]
    fn roots() {
        assert!(check_root("fleet", "k7q2-01").is_ok());
        assert!(check_root("site/a/fleet", "k7q2-01").is_ok());
        for bad in [
            "",
            "fleet/+",
            "#",
            "$aws/things",
            "a/b/c/d/e/f/g",
            "fl\u{0}eet",
        ] {
            assert!(check_root(bad, "k7q2-01").is_err(), "{bad:?}");
        }
    }
}
