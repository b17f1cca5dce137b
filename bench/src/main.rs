//! `bench`: the channel bridge's load tool (a program, not a timed test).
//!
//! It measures, on this machine, for the self-hosted `bridge serve` and side
//! by side for Mosquitto's own WebSocket listener (MQTT over WebSocket
//! clients, same tool, same device):
//!
//! * **fan-out**: one channel, N WebSocket subscribers (default 1,000), one
//!   MQTT device publishing 256-byte messages at fixed offered rates and as
//!   fast as the broker takes them; deliveries per second, publish-to-receive
//!   latency p50/p99, lost messages and `lagged` notices;
//! * **idle memory**: M connections (default 10,000), each with one
//!   subscription, and the server's resident memory (VmRSS) before and after:
//!   KiB per idle connection.
//!
//! It builds nothing: it runs `target/release/bridge` (next to its own
//! executable, or `--bridge PATH`) and `/usr/sbin/mosquitto`, each on free
//! ports of 127.0.0.1, and stops them when done. Results are printed as
//! markdown tables at the end, with the command line that produced them.
//!
//! Modules: [`procs`] (servers, /proc), [`device`] (the MQTT publisher),
//! [`clients`] (the subscribers), [`stats`] (counting), [`payload`].

mod clients;
mod device;
mod payload;
mod procs;
mod rawmqtt;
mod stats;

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use rumqttc::QoS;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use crate::clients::{BridgeSub, MqttSub, MqttTransport};
use crate::device::{Device, DeviceConfig, Rate};
use crate::procs::{BrokerMode, MosquittoPorts, Proc, TempDir};
use crate::rawmqtt::RawMqttSub;
use crate::stats::{Clock, Recorder};

/// The channel (MQTT topic) of the fan-out scenario.
const TOPIC: &str = "bench/t";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
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
    fn label(self) -> &'static str {
        match self {
            Target::Bridge => "bridge (embedded broker)",
            Target::BridgeMosquitto => "bridge + Mosquitto broker",
            Target::Mosquitto => "Mosquitto WebSocket listener",
            Target::MosquittoTcp => "Mosquitto MQTT/TCP (reference)",
        }
    }

    /// Runs `bridge serve`.
    fn needs_bridge(self) -> bool {
        matches!(self, Target::Bridge | Target::BridgeMosquitto)
    }

    /// Runs a Mosquitto (as the bridge's broker or as the server measured).
    fn needs_mosquitto(self) -> bool {
        matches!(
            self,
            Target::BridgeMosquitto | Target::Mosquitto | Target::MosquittoTcp
        )
    }

    fn tag(self) -> &'static str {
        match self {
            Target::Bridge => "bridge",
            Target::BridgeMosquitto => "bridge-mosquitto",
            Target::Mosquitto => "mosquitto",
            Target::MosquittoTcp => "mosquitto-tcp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MqttClient {
    Raw,
    Rumqttc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Fanout,
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IdleTopics {
    /// Every idle connection subscribes to one channel `bench/idle`.
    Shared,
    /// Connection i subscribes to its own channel `bench/idle/i`.
    Distinct,
    /// Both, one after the other.
    Both,
}

/// Fan-out throughput and latency, and idle memory per connection, of the
/// channel bridge and of Mosquitto's WebSocket listener.
#[derive(Debug, Parser)]
#[command(
    name = "bench",
    after_help = "Build first: cargo build --release -p bridge && cargo build --release -p bench. \
Then: target/release/bench --quick (about 2 minutes), or target/release/bench for the full run \
(1,000 subscribers, 10,000 idle connections). See bench/README.md for the method."
)]
struct Cli {
    /// A short run: 100 subscribers, 1,000 idle connections, 3 s phases
    /// (explicit options still win).
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

    /// WebSocket subscribers on the fan-out channel [default: 1000; --quick: 100].
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
struct Opts {
    targets: Vec<Target>,
    scenarios: Vec<Scenario>,
    subscribers: usize,
    payload: usize,
    rates: Vec<Rate>,
    duration: Duration,
    drain_timeout: Duration,
    device_qos: QoS,
    sub_qos: QoS,
    mqtt_client: MqttClient,
    idle_connections: usize,
    idle_topics: Vec<IdleTopics>,
    settle: Duration,
    outbound_queue: usize,
    bridge_log: String,
    concurrency: usize,
    bridge: PathBuf,
    mosquitto: PathBuf,
}

fn qos(n: u8) -> QoS {
    if n == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

impl Opts {
    fn resolve(cli: Cli) -> Result<Opts, String> {
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
            bridge_log: cli.bridge_log,
            concurrency: cli.connect_concurrency.max(1),
            bridge,
            mosquitto: cli.mosquitto,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let keep_logs = cli.keep_logs;
    let opts = match Opts::resolve(cli) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On Ctrl-C or SIGTERM the run is dropped, which stops the servers.
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(opts, keep_logs) => r,
            s = interrupted() => Err(format!("interrupted by {s}; servers stopped")),
        }
    });
    // Subscriber tasks still hold sockets: do not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One fan-out phase's result.
struct FanoutRow {
    target: Target,
    rate: Rate,
    subscribers: usize,
    published: u64,
    publish_secs: f64,
    received: u64,
    deliveries_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    lost: i64,
    lagged_frames: u64,
    lagged_dropped: u64,
    cpu: String,
    notes: Vec<String>,
}

/// One idle-memory result.
struct IdleRow {
    target: Target,
    topics: IdleTopics,
    wanted: usize,
    connected: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    /// Seconds from the first connect to the last subscription acknowledged.
    setup_secs: f64,
    notes: Vec<String>,
}

async fn run(opts: Opts, keep_logs: bool) -> Result<(), String> {
    // Checked here once for every server started below.
    if opts.targets.iter().any(|t| t.needs_bridge()) {
        procs::check_executable(&opts.bridge, "the bridge binary", procs::BRIDGE_HINT)?;
    }
    if opts.targets.iter().any(|t| t.needs_mosquitto()) {
        procs::check_executable(&opts.mosquitto, "mosquitto", procs::MOSQUITTO_HINT)?;
    }
    let fd_limit = procs::raise_fd_limit();
    let load_before = loadavg();
    if load_before
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        .is_some_and(|l| l > 0.5)
    {
        eprintln!(
            "bench: warning: load average {load_before}: something else is using the CPU; \
             figures will be lower and noisier than on a quiet machine"
        );
    }
    let mut dir = TempDir::new()?;
    dir.keep = keep_logs;
    // Scenarios run one after the other: the largest one counts.
    let needed = opts
        .scenarios
        .iter()
        .map(|s| match s {
            Scenario::Fanout => opts.subscribers,
            Scenario::Idle => opts.idle_connections,
        })
        .max()
        .unwrap_or(0);
    eprintln!(
        "bench: file limit {fd_limit}; logs in {}{}",
        dir.path.display(),
        if keep_logs { " (kept)" } else { "" }
    );
    if (fd_limit as usize) < needed + 100 {
        eprintln!(
            "bench: warning: the open-file limit ({fd_limit}) is below the {needed} connections \
             asked for; expect failures (raise the hard limit, e.g. `ulimit -Hn`)"
        );
    }
    let mut fanout_rows = Vec::new();
    let mut idle_rows = Vec::new();
    let mut failures = Vec::new();
    for &target in &opts.targets {
        if opts.scenarios.contains(&Scenario::Fanout) {
            eprintln!("\n== fan-out: {} ==", target.label());
            match fanout(&opts, target, &dir).await {
                Ok(rows) => fanout_rows.extend(rows),
                Err(e) => {
                    eprintln!("bench: fan-out against {} failed: {e}", target.label());
                    failures.push(format!("fan-out, {}: {e}", target.label()));
                }
            }
        }
        if opts.scenarios.contains(&Scenario::Idle) {
            for &topics in &opts.idle_topics {
                eprintln!(
                    "\n== idle memory: {}, {} ==",
                    target.label(),
                    topics_label(topics)
                );
                match idle(&opts, target, topics, &dir).await {
                    Ok(row) => idle_rows.push(row),
                    Err(e) => {
                        eprintln!("bench: idle memory against {} failed: {e}", target.label());
                        failures.push(format!("idle, {}: {e}", target.label()));
                    }
                }
            }
        }
    }
    print!(
        "{}",
        report(&opts, &fanout_rows, &idle_rows, &failures, &load_before)
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} part(s) failed (see above)", failures.len()))
    }
}

/// The servers of one scenario run; dropped = stopped.
struct Servers {
    // Field order is drop order: the bridge stops before its broker.
    bridge: Option<(Proc, SocketAddr)>,
    mosquitto: Option<(Proc, MosquittoPorts)>,
    /// Where the device publishes (MQTT over TCP).
    broker_port: u16,
}

impl Servers {
    async fn start(
        opts: &Opts,
        target: Target,
        dir: &TempDir,
        tag: &str,
    ) -> Result<Servers, String> {
        let tag = format!("{}-{tag}", target.tag());
        // Mosquitto first: it is the bridge's broker when both run.
        let mosquitto = if target.needs_mosquitto() {
            Some(
                procs::start_mosquitto(
                    &opts.mosquitto,
                    target == Target::Mosquitto,
                    opts.outbound_queue,
                    &dir.path,
                    &tag,
                )
                .await?,
            )
        } else {
            None
        };
        let broker_port = match &mosquitto {
            Some((_, ports)) => ports.mqtt,
            None => procs::free_port()?,
        };
        // The bridge prints its listening line once its own MQTT link is in:
        // with the embedded broker, the broker is up then.
        let bridge = if target.needs_bridge() {
            let broker = if mosquitto.is_some() {
                BrokerMode::External(broker_port)
            } else {
                BrokerMode::Embedded(broker_port)
            };
            Some(procs::start_bridge(
                &opts.bridge,
                &broker,
                opts.outbound_queue,
                &opts.bridge_log,
                &dir.path,
                &tag,
            )?)
        } else {
            None
        };
        Ok(Servers {
            bridge,
            mosquitto,
            broker_port,
        })
    }

    fn procs(&self) -> Vec<&Proc> {
        self.bridge
            .iter()
            .map(|(p, _)| p)
            .chain(self.mosquitto.iter().map(|(p, _)| p))
            .collect()
    }

    fn check_alive(&mut self) -> Result<(), String> {
        if let Some((p, _)) = &mut self.bridge {
            p.check_alive()?;
        }
        if let Some((p, _)) = &mut self.mosquitto {
            p.check_alive()?;
        }
        Ok(())
    }

    /// Stops the servers (bridge first) and says how long each took.
    fn stop(self) -> String {
        let Servers {
            bridge, mosquitto, ..
        } = self;
        tokio::task::block_in_place(|| {
            let mut out = Vec::new();
            if let Some((p, _)) = bridge {
                out.push(p.stop());
            }
            if let Some((p, _)) = mosquitto {
                out.push(p.stop());
            }
            out.join("; ")
        })
    }

    async fn bridge_metrics(&self) -> Option<String> {
        let (_, addr) = self.bridge.as_ref()?;
        procs::http_get(*addr, "/metrics").await.ok()
    }
}

/// How long one connect + subscribe may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Opens `n` connections, `concurrency` at a time. `connect(i)` connects and
/// subscribes (within [`SETUP_TIMEOUT`] from taking its turn), and returns
/// the future that then runs the connection.
/// Returns the running tasks, how many connected and the first error.
async fn open_many<F, Fut, R>(
    n: usize,
    concurrency: usize,
    what: &str,
    connect: F,
) -> (Vec<JoinHandle<()>>, usize, Option<String>)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<R, String>> + Send + 'static,
    R: Future<Output = ()> + Send + 'static,
{
    let sem = Arc::new(Semaphore::new(concurrency));
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let fut = connect(i);
        let sem = sem.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let connected = tokio::time::timeout(SETUP_TIMEOUT, fut)
                .await
                .unwrap_or_else(|_| {
                    Err(format!("connect + subscribe took over {SETUP_TIMEOUT:?}"))
                });
            match connected {
                Ok(run) => {
                    drop(permit);
                    let _ = tx.send(Ok(()));
                    drop(tx);
                    run.await;
                }
                Err(e) => {
                    drop(permit);
                    let _ = tx.send(Err(e));
                }
            }
        }));
    }
    drop(tx);
    let started = Instant::now();
    let (mut ok, mut failed, mut first_err) = (0usize, 0usize, None);
    let step = (n / 10).max(1);
    while let Some(r) = rx.recv().await {
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                first_err.get_or_insert(e);
            }
        }
        let done = ok + failed;
        if done.is_multiple_of(step) || done == n {
            eprintln!(
                "  {what}: {ok} connected, {failed} failed ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    (tasks, ok, first_err)
}

/// A connected subscriber's work, until the connection ends or is aborted.
type Running = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where MQTT subscribers of `target` connect.
fn mqtt_endpoint(target: Target, ports: &MosquittoPorts) -> Result<(MqttTransport, u16), String> {
    match target {
        Target::MosquittoTcp => Ok((MqttTransport::Tcp, ports.mqtt)),
        _ => ports
            .ws
            .map(|ws| (MqttTransport::WebSocket, ws))
            .ok_or_else(|| "Mosquitto has no WebSocket listener".to_string()),
    }
}

fn abort_all(tasks: &[JoinHandle<()>]) {
    for t in tasks {
        t.abort();
    }
}

async fn fanout(opts: &Opts, target: Target, dir: &TempDir) -> Result<Vec<FanoutRow>, String> {
    let mut servers = Servers::start(opts, target, dir, "fanout").await?;
    let clock = Clock::new();
    let n = opts.subscribers;
    let recorders: Vec<Recorder> = (0..n).map(|_| Recorder::new(clock.clone())).collect();
    let (tasks, ok, err) = match (&servers.bridge, &servers.mosquitto) {
        (Some((_, addr)), _) => {
            let addr = *addr;
            open_many(n, opts.concurrency, "subscribers", |i| {
                let rec = recorders[i].clone();
                async move {
                    let sub = BridgeSub::connect(addr, TOPIC, 64 * 1024).await?;
                    Ok(sub.receive(rec))
                }
            })
            .await
        }
        (None, Some((_, ports))) => {
            let (transport, port) = mqtt_endpoint(target, ports)?;
            let (qos, client) = (opts.sub_qos, opts.mqtt_client);
            open_many(n, opts.concurrency, "subscribers", |i| {
                let rec = recorders[i].clone();
                async move {
                    let id = format!("bench-sub-{i}");
                    let run: Running = match client {
                        MqttClient::Raw => {
                            let ws = transport == MqttTransport::WebSocket;
                            let sub =
                                RawMqttSub::connect(ws, port, &id, TOPIC, qos as u8, 64 * 1024)
                                    .await?;
                            Box::pin(sub.receive(rec))
                        }
                        MqttClient::Rumqttc => {
                            let sub = MqttSub::connect(transport, port, &id, TOPIC, qos).await?;
                            Box::pin(sub.receive(rec))
                        }
                    };
                    Ok(run)
                }
            })
            .await
        }
        (None, None) => return Err("no server".into()),
    };
    let result = fanout_phases(opts, target, &mut servers, &clock, &recorders, ok, err).await;
    abort_all(&tasks);
    for t in tasks {
        let _ = t.await;
    }
    drop(servers);
    result
}

async fn fanout_phases(
    opts: &Opts,
    target: Target,
    servers: &mut Servers,
    clock: &Arc<Clock>,
    recorders: &[Recorder],
    connected: usize,
    first_err: Option<String>,
) -> Result<Vec<FanoutRow>, String> {
    let n = recorders.len();
    if connected < n {
        return Err(format!(
            "only {connected} of {n} subscribers connected; first error: {}",
            first_err.unwrap_or_default()
        ));
    }
    let device = Device::start(
        DeviceConfig {
            port: servers.broker_port,
            topic: TOPIC.to_string(),
            qos: opts.device_qos,
            payload_size: opts.payload,
        },
        clock.clone(),
    )
    .await?;

    // Warm-up (run 0): checks the path end to end, not reported.
    let warm = run_phase(
        opts,
        servers,
        &device,
        clock,
        recorders,
        0,
        Rate::Fixed(50.0),
        Duration::from_secs(1),
    )
    .await?;
    let expected = warm.published.count * n as u64;
    if warm.summary.received < expected {
        return Err(format!(
            "warm-up: {} of {expected} messages arrived (subscribers ended: {}, first reason: {}; \
             other frames: {}, first: {})",
            warm.summary.received,
            warm.summary.ended,
            warm.summary.first_end.as_deref().unwrap_or("-"),
            warm.summary.other_frames,
            warm.summary.first_other.as_deref().unwrap_or("-"),
        ));
    }
    eprintln!("  warm-up: {expected} of {expected} messages arrived");

    let mut rows = Vec::new();
    for (i, &rate) in opts.rates.iter().enumerate() {
        let run = (i + 1) as u32;
        eprintln!(
            "  phase {run}: {} msg/s x {n} subscribers for {:.0} s",
            rate,
            opts.duration.as_secs_f64()
        );
        let r = run_phase(
            opts,
            servers,
            &device,
            clock,
            recorders,
            run,
            rate,
            opts.duration,
        )
        .await?;
        let s = &r.summary;
        let expected = r.published.count * n as u64;
        let span_us = s.last_us.saturating_sub(r.published.first_us).max(1);
        let q = |q: f64| s.hist.value_at_quantile(q) as f64 / 1000.0;
        let mut notes = r.notes;
        if s.reordered > 0 {
            notes.push(format!("{} out of order", s.reordered));
        }
        if s.ended > 0 {
            notes.push(format!(
                "{} subscribers disconnected: {}",
                s.ended,
                s.first_end.as_deref().unwrap_or("-")
            ));
        }
        if s.other_frames > 0 {
            notes.push(format!(
                "{} unexpected frames, first: {}",
                s.other_frames,
                s.first_other.as_deref().unwrap_or("-")
            ));
        }
        if let Some(e) = device.error() {
            notes.push(e);
        }
        let row = FanoutRow {
            target,
            rate,
            subscribers: n,
            published: r.published.count,
            publish_secs: r.published.elapsed.as_secs_f64(),
            received: s.received,
            deliveries_per_sec: s.received as f64 / (span_us as f64 / 1e6),
            p50_ms: q(0.50),
            p99_ms: q(0.99),
            max_ms: s.hist.max() as f64 / 1000.0,
            lost: expected as i64 - s.received as i64,
            lagged_frames: s.lagged_frames,
            lagged_dropped: s.lagged_dropped,
            cpu: r.cpu,
            notes,
        };
        eprintln!(
            "    published {} ({:.0}/s), received {} of {expected}, {:.0} deliveries/s, \
             p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, lost {}, lagged {} ({} dropped); CPU {}",
            row.published,
            row.published as f64 / row.publish_secs.max(1e-9),
            row.received,
            row.deliveries_per_sec,
            row.p50_ms,
            row.p99_ms,
            row.max_ms,
            row.lost,
            row.lagged_frames,
            row.lagged_dropped,
            row.cpu
        );
        rows.push(row);
        servers.check_alive()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(device);
    if let Some(last) = rows.last_mut() {
        for p in servers.procs() {
            last.notes.push(format!(
                "{} peak RSS over the whole fan-out run: {:.0} MiB",
                p.name,
                p.hwm_kib() as f64 / 1024.0
            ));
        }
    }
    Ok(rows)
}

/// CPU seconds used so far by the servers and by the bench itself.
struct CpuSnapshot {
    at: Instant,
    servers: Vec<f64>,
    bench: f64,
}

impl CpuSnapshot {
    fn take(servers: &Servers) -> Self {
        CpuSnapshot {
            at: Instant::now(),
            servers: servers.procs().iter().map(|p| p.cpu_secs()).collect(),
            bench: procs::cpu_secs(None),
        }
    }
}

struct PhaseResult {
    published: device::Published,
    summary: stats::Summary,
    cpu: String,
    notes: Vec<String>,
}

#[allow(clippy::too_many_arguments)]
async fn run_phase(
    opts: &Opts,
    servers: &mut Servers,
    device: &Device,
    clock: &Arc<Clock>,
    recorders: &[Recorder],
    run: u32,
    rate: Rate,
    duration: Duration,
) -> Result<PhaseResult, String> {
    clock.phase.store(run, Ordering::Relaxed);
    let metrics_before = servers.bridge_metrics().await;
    let acked_before = device.acked.load(Ordering::Relaxed);
    let start = CpuSnapshot::take(servers);
    let published = device.phase(run, rate, duration).await?;

    // Drain: until everything arrived, or nothing more arrives for a while.
    // CPU is counted from the first publish to the last progress seen, so a
    // backlog delivered after the device stopped is included.
    let mut end = CpuSnapshot::take(servers);
    let expected = published.count * recorders.len() as u64;
    let mut last = 0;
    loop {
        let got = stats::received(recorders, run);
        if got > last {
            last = got;
            end = CpuSnapshot::take(servers);
        }
        if got >= expected || end.at.elapsed() >= opts.drain_timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let late `lagged` notices arrive before counting.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let summary = stats::summarize(recorders, run);

    let window = end.at.duration_since(start.at).as_secs_f64().max(1e-9);
    let mut cpu = String::new();
    for (i, p) in servers.procs().iter().enumerate() {
        let pct = (end.servers[i] - start.servers[i]) / window * 100.0;
        let _ = write!(cpu, "{} {pct:.0}%, ", p.name);
    }
    let _ = write!(
        cpu,
        "bench {:.0}%",
        (end.bench - start.bench) / window * 100.0
    );
    let mut notes = Vec::new();
    let acked = device.acked.load(Ordering::Relaxed) - acked_before;
    if acked < published.count {
        notes.push(format!(
            "the broker acknowledged {acked} of {} publishes",
            published.count
        ));
    }
    if let (Some(before), Some(after)) = (metrics_before, servers.bridge_metrics().await) {
        let d = |name: &str| procs::metric(&after, name) - procs::metric(&before, name);
        let dropped = d("bridge_messages_dropped_total{reason=\"lagged\"}");
        let received = d("bridge_mqtt_messages_received_total");
        if received + 0.5 < published.count as f64 {
            notes.push(format!(
                "bridge got {received:.0} of {} from the broker",
                published.count
            ));
        }
        if dropped > 0.0 {
            notes.push(format!("bridge dropped {dropped:.0} (queue full)"));
        }
    }
    Ok(PhaseResult {
        published,
        summary,
        cpu,
        notes,
    })
}

fn topics_label(t: IdleTopics) -> &'static str {
    match t {
        IdleTopics::Shared => "one channel for all",
        IdleTopics::Distinct => "one channel each",
        IdleTopics::Both => "both",
    }
}

async fn idle(
    opts: &Opts,
    target: Target,
    topics: IdleTopics,
    dir: &TempDir,
) -> Result<IdleRow, String> {
    let tag = match topics {
        IdleTopics::Distinct => "idle-distinct",
        _ => "idle-shared",
    };
    let mut servers = Servers::start(opts, target, dir, tag).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before: Vec<u64> = servers.procs().iter().map(|p| p.rss_kib()).collect();
    let n = opts.idle_connections;
    let channel = move |i: usize| match topics {
        IdleTopics::Distinct => format!("bench/idle/{i}"),
        _ => "bench/idle".to_string(),
    };
    let setup_start = Instant::now();
    let (tasks, ok, err) = match (&servers.bridge, &servers.mosquitto) {
        (Some((_, addr)), _) => {
            let addr = *addr;
            open_many(n, opts.concurrency, "idle connections", |i| {
                let ch = channel(i);
                async move {
                    let sub = BridgeSub::connect(addr, &ch, 4 * 1024).await?;
                    Ok(sub.idle())
                }
            })
            .await
        }
        (None, Some((_, ports))) => {
            let (transport, port) = mqtt_endpoint(target, ports)?;
            let (qos, client) = (opts.sub_qos, opts.mqtt_client);
            open_many(n, opts.concurrency, "idle connections", |i| {
                let ch = channel(i);
                async move {
                    let id = format!("bench-idle-{i}");
                    let run: Running = match client {
                        MqttClient::Raw => {
                            let ws = transport == MqttTransport::WebSocket;
                            let sub = RawMqttSub::connect(ws, port, &id, &ch, qos as u8, 4 * 1024)
                                .await?;
                            Box::pin(sub.idle())
                        }
                        MqttClient::Rumqttc => {
                            let sub = MqttSub::connect(transport, port, &id, &ch, qos).await?;
                            Box::pin(sub.idle())
                        }
                    };
                    Ok(run)
                }
            })
            .await
        }
        (None, None) => return Err("no server".into()),
    };
    let setup_secs = setup_start.elapsed().as_secs_f64();
    eprintln!("  settling {:.0} s", opts.settle.as_secs_f64());
    tokio::time::sleep(opts.settle).await;
    let alive = servers.check_alive();
    let rss_after: Vec<u64> = servers.procs().iter().map(|p| p.rss_kib()).collect();
    let hwm: Vec<u64> = servers.procs().iter().map(|p| p.hwm_kib()).collect();
    let still_open = tasks.iter().filter(|t| !t.is_finished()).count();
    let mut notes = Vec::new();
    if let Some(e) = err {
        notes.push(format!("{} of {n} failed to connect, first: {e}", n - ok));
    }
    if still_open < ok {
        notes.push(format!("{} connections closed while idle", ok - still_open));
    }
    if let Some(text) = servers.bridge_metrics().await {
        let c = procs::metric(&text, "bridge_connections");
        let s = procs::metric(&text, "bridge_subscriptions");
        let b = procs::metric(&text, "bridge_broker_subscriptions");
        notes.push(format!(
            "bridge metrics: {c:.0} connections, {s:.0} subscriptions, {b:.0} broker subscriptions"
        ));
    }
    // The bridge's own process comes first; with an external broker, the
    // broker's share is noted.
    let names: Vec<&str> = servers.procs().iter().map(|p| p.name).collect();
    for (i, name) in names.iter().enumerate().skip(1) {
        notes.push(format!(
            "{name}: RSS {} -> {} KiB ({:+.2} KiB per connection)",
            rss_before[i],
            rss_after[i],
            (rss_after[i] as f64 - rss_before[i] as f64) / ok.max(1) as f64
        ));
    }
    notes.push(format!("{} peak RSS {} KiB", names[0], hwm[0]));
    eprintln!(
        "  {} connected; {} RSS {} KiB -> {} KiB: {:.2} KiB per connection",
        ok,
        names[0],
        rss_before[0],
        rss_after[0],
        (rss_after[0] as f64 - rss_before[0] as f64) / ok.max(1) as f64
    );
    // Clients go first: the servers see every connection close.
    let closing = Instant::now();
    abort_all(&tasks);
    for t in tasks {
        let _ = t.await;
    }
    alive?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stop = servers.stop();
    notes.push(format!(
        "after the clients closed ({:.1} s ago): {stop}",
        closing.elapsed().as_secs_f64()
    ));
    Ok(IdleRow {
        target,
        topics,
        setup_secs,
        wanted: n,
        connected: ok,
        rss_before_kib: rss_before[0],
        rss_after_kib: rss_after[0],
        notes,
    })
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} cores ({model}), Linux {}", kernel.trim())
}

fn version(bin: &std::path::Path, arg: &str) -> String {
    std::process::Command::new(bin)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

fn thousands(n: f64) -> String {
    let n = n.round() as i64;
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

async fn interrupted() -> &'static str {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// The 1-, 5- and 15-minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn report(
    opts: &Opts,
    fanout: &[FanoutRow],
    idle: &[IdleRow],
    failures: &[String],
    load_before: &str,
) -> String {
    let mut out = String::new();
    let args: Vec<String> = std::env::args().collect();
    let _ = writeln!(out, "\n# Channel bridge benchmark\n");
    let _ = writeln!(out, "Command: `{}`  ", args.join(" "));
    let _ = writeln!(out, "Machine: {}  ", machine());
    if opts.targets.iter().any(|t| t.needs_bridge()) {
        let _ = writeln!(
            out,
            "Bridge: {} ({})  ",
            opts.bridge.display(),
            version(&opts.bridge, "--version")
        );
    }
    if opts.targets.iter().any(|t| t.needs_mosquitto()) {
        let _ = writeln!(
            out,
            "Mosquitto: {} ({})  ",
            opts.mosquitto.display(),
            version(&opts.mosquitto, "-h")
        );
    }
    let _ = writeln!(
        out,
        "Load average before the run: {load_before}; after: {}. The servers and the load \
         tool share this machine's cores (anything else running skews the figures): CPU \
         shares below are per process over the phase, 100% = one core.",
        loadavg()
    );
    if !fanout.is_empty() {
        let n = fanout[0].subscribers;
        let _ = writeln!(
            out,
            "\n## Fan-out: one channel, {} subscribers, {}-byte device messages\n",
            thousands(n as f64),
            opts.payload
        );
        let _ = writeln!(
            out,
            "One MQTT device (rumqttc, TCP, QoS {}) publishes for {:.0} s per phase at the offered \
             rate (`max`: as fast as the broker acknowledges); each message goes to every \
             subscriber. Bridge subscribers speak the JSON protocol over WebSocket; Mosquitto's \
             are MQTT-over-WebSocket clients ({}, QoS {}; plain MQTT over TCP in the \
             reference rows). Latency is publish (device) to \
             receive (subscriber), on one clock. Per-connection queues: the bridge runs with \
             --outbound-queue {q}, Mosquitto with max_queued_messages {q}.\n",
            opts.device_qos as u8,
            opts.duration.as_secs_f64(),
            match opts.mqtt_client {
                MqttClient::Raw => "a minimal MQTT 3.1.1 client on tokio-tungstenite",
                MqttClient::Rumqttc => "rumqttc",
            },
            opts.sub_qos as u8,
            q = opts.outbound_queue
        );
        let _ = writeln!(
            out,
            "| server | offered msg/s | published msg/s | deliveries/s | p50 ms | p99 ms | max ms | lost | lagged (dropped) | CPU |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for r in fanout {
            let offered = match r.rate {
                Rate::Fixed(x) => format!(
                    "{} (x{} = {})",
                    thousands(x),
                    thousands(r.subscribers as f64),
                    thousands(x * r.subscribers as f64)
                ),
                Rate::Max => "max".to_string(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} |",
                r.target.label(),
                offered,
                thousands(r.published as f64 / r.publish_secs.max(1e-9)),
                thousands(r.deliveries_per_sec),
                ms(r.p50_ms),
                ms(r.p99_ms),
                ms(r.max_ms),
                thousands(r.lost as f64),
                thousands(r.lagged_frames as f64),
                thousands(r.lagged_dropped as f64),
                r.cpu
            );
        }
        let notes: Vec<String> = fanout
            .iter()
            .flat_map(|r| {
                r.notes
                    .iter()
                    .map(move |n| format!("- {}, {} msg/s: {n}", r.target.label(), r.rate))
            })
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(out, "\nNotes:\n{}", notes.join("\n"));
        }
    }
    if !idle.is_empty() {
        let _ = writeln!(
            out,
            "\n## Idle memory: {} connections, one subscription each\n",
            thousands(opts.idle_connections as f64)
        );
        let _ = writeln!(
            out,
            "Server resident memory (VmRSS) before the connections and {:.0} s after the last \
             one subscribed; bridge connections are JSON-protocol WebSockets, Mosquitto's are \
             MQTT-over-WebSocket clients ({}; plain MQTT over TCP in the reference \
             row).\n",
            opts.settle.as_secs_f64(),
            match opts.mqtt_client {
                MqttClient::Raw => "minimal MQTT client",
                MqttClient::Rumqttc => "rumqttc",
            }
        );
        let _ = writeln!(
            out,
            "| server | channels | connections | connect + subscribe time | RSS before | RSS after | KiB per idle connection |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
        for r in idle {
            let per =
                (r.rss_after_kib as f64 - r.rss_before_kib as f64) / r.connected.max(1) as f64;
            let conns = if r.connected == r.wanted {
                thousands(r.connected as f64)
            } else {
                format!(
                    "{} of {}",
                    thousands(r.connected as f64),
                    thousands(r.wanted as f64)
                )
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1} s | {:.1} MiB | {:.1} MiB | {:.1} |",
                r.target.label(),
                topics_label(r.topics),
                conns,
                r.setup_secs,
                r.rss_before_kib as f64 / 1024.0,
                r.rss_after_kib as f64 / 1024.0,
                per
            );
        }
        let notes: Vec<String> = idle
            .iter()
            .flat_map(|r| {
                r.notes.iter().map(move |n| {
                    format!("- {}, {}: {n}", r.target.label(), topics_label(r.topics))
                })
            })
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(out, "\nNotes:\n{}", notes.join("\n"));
        }
    }
    if !failures.is_empty() {
        let _ = writeln!(out, "\n## Failed\n");
        for f in failures {
            let _ = writeln!(out, "- {f}");
        }
    }
    out
}
