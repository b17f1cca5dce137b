//! The fan-out scenario: one channel ([`TOPIC`]), N subscribers, one device
//! publishing at each offered rate in turn; deliveries per second, latency,
//! losses and CPU per phase.
//!
//! Its parts are shared with the abuse scenario, which runs the same honest
//! fan-out beside an attacker: [`start_device`] (device + warm-up check),
//! [`measure_phase`] (one phase, drained and counted) and [`Delivery`] (what
//! the subscribers experienced).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::{MqttClient, Opts, Target};
use crate::connect::{self, Role, Subscribers};
use crate::device::{Device, DeviceConfig, Rate};
use crate::procs::{self, TempDir};
use crate::report::{counted, ms, thousands};
use crate::servers::{self, Servers};
use crate::stats::{self, Clock, Recorder};

/// The channel (MQTT topic) of the fan-out.
pub const TOPIC: &str = "bench/t";

/// What the subscribers experienced in one phase.
pub struct Delivery {
    pub published: u64,
    pub publish_secs: f64,
    pub received: u64,
    pub deliveries_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Deliveries expected (published × subscribers) that did not arrive.
    pub lost: i64,
    pub lagged_frames: u64,
    pub lagged_dropped: u64,
    /// Subscribers whose connection had ended by the end of the phase.
    pub ended: usize,
    /// CPU share of each server and of the bench over the phase.
    pub cpu: String,
    pub notes: Vec<String>,
}

/// One fan-out phase's result.
pub struct FanoutRow {
    target: Target,
    rate: Rate,
    subscribers: usize,
    delivery: Delivery,
}

/// The subscribers of [`TOPIC`] (`--subscribers` of them), each with its
/// recorder, on one clock.
pub struct Audience {
    pub clock: Arc<Clock>,
    pub recorders: Vec<Recorder>,
    pub subs: Subscribers,
}

impl Audience {
    /// Connects and subscribes them all (to the bridge when one runs, else
    /// to Mosquitto's listener).
    pub async fn open(opts: &Opts, target: Target, servers: &Servers) -> Result<Audience, String> {
        let clock = Clock::new();
        let n = opts.subscribers;
        let recorders: Vec<Recorder> = (0..n).map(|_| Recorder::new(clock.clone())).collect();
        let subs = connect::open_subscribers(
            opts,
            target,
            servers,
            n,
            &|_| TOPIC.to_string(),
            Role::Receive(&recorders),
        )
        .await?;
        Ok(Audience {
            clock,
            recorders,
            subs,
        })
    }

    /// Closes every subscriber's connection.
    pub async fn close(self) {
        self.subs.close().await;
    }
}

pub async fn fanout(opts: &Opts, target: Target, dir: &TempDir) -> Result<Vec<FanoutRow>, String> {
    let args = servers::throughput_bridge_args(opts);
    let mut servers = Servers::start(opts, target, dir, "fanout", &args).await?;
    let audience = Audience::open(opts, target, &servers).await?;
    let result = phases(opts, target, &mut servers, &audience).await;
    audience.close().await;
    drop(servers);
    result
}

async fn phases(
    opts: &Opts,
    target: Target,
    servers: &mut Servers,
    audience: &Audience,
) -> Result<Vec<FanoutRow>, String> {
    let device = start_device(opts, servers, audience).await?;
    let n = audience.recorders.len();
    let mut rows = Vec::new();
    for (i, &rate) in opts.rates.iter().enumerate() {
        let run = (i + 1) as u32;
        eprintln!(
            "  phase {run}: {} msg/s x {n} subscribers for {:.0} s",
            rate,
            opts.duration.as_secs_f64()
        );
        let delivery =
            measure_phase(opts, servers, &device, audience, run, rate, opts.duration).await?;
        rows.push(FanoutRow {
            target,
            rate,
            subscribers: n,
            delivery,
        });
        servers.check_alive()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(device);
    if let Some(last) = rows.last_mut() {
        for p in servers.procs() {
            last.delivery.notes.push(format!(
                "{} peak RSS over the whole fan-out run: {:.0} MiB",
                p.name,
                p.hwm_kib() as f64 / 1024.0
            ));
        }
    }
    Ok(rows)
}

/// Checks that every subscriber connected, starts the device (publishing
/// [`TOPIC`] to the broker) and checks the path end to end with a 1-second
/// warm-up (run 0, not reported): every message must reach every subscriber.
pub async fn start_device(
    opts: &Opts,
    servers: &mut Servers,
    audience: &Audience,
) -> Result<Device, String> {
    let (n, subs) = (audience.recorders.len(), &audience.subs);
    if subs.connected < n {
        return Err(format!(
            "only {} of {n} subscribers connected; first error: {}",
            subs.connected,
            subs.first_error.as_deref().unwrap_or_default()
        ));
    }
    let device = Device::start(
        DeviceConfig {
            port: servers.broker_port,
            topic: TOPIC.to_string(),
            qos: opts.device_qos,
            payload_size: opts.payload,
        },
        audience.clock.clone(),
    )
    .await?;
    let warm = Duration::from_secs(1);
    let d = measure_phase(opts, servers, &device, audience, 0, Rate::Fixed(50.0), warm).await?;
    let expected = d.published * n as u64;
    if d.lost > 0 {
        return Err(format!(
            "warm-up: {} of {expected} messages arrived ({})",
            d.received,
            d.notes.join("; ")
        ));
    }
    eprintln!("  warm-up: {expected} of {expected} messages arrived");
    Ok(device)
}

/// Runs phase `run` (the device publishing at `rate` for `duration`), waits
/// for the deliveries and counts them.
pub async fn measure_phase(
    opts: &Opts,
    servers: &mut Servers,
    device: &Device,
    audience: &Audience,
    run: u32,
    rate: Rate,
    duration: Duration,
) -> Result<Delivery, String> {
    let recorders = &audience.recorders;
    audience.clock.phase.store(run, Ordering::Relaxed);
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
    let s = stats::summarize(recorders, run);

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
    let span_us = s.last_us.saturating_sub(published.first_us).max(1);
    let q = |q: f64| s.hist.value_at_quantile(q) as f64 / 1000.0;
    if s.reordered > 0 {
        notes.push(format!("{} out of order", s.reordered));
    }
    notes.extend(counted(
        s.ended as u64,
        "subscribers disconnected",
        s.first_end.as_deref(),
    ));
    notes.extend(counted(
        s.other_frames,
        "unexpected frames",
        s.first_other.as_deref(),
    ));
    if let Some(e) = device.error() {
        notes.push(e);
    }
    let d = Delivery {
        published: published.count,
        publish_secs: published.elapsed.as_secs_f64(),
        received: s.received,
        deliveries_per_sec: s.received as f64 / (span_us as f64 / 1e6),
        p50_ms: q(0.50),
        p99_ms: q(0.99),
        max_ms: s.hist.max() as f64 / 1000.0,
        lost: expected as i64 - s.received as i64,
        lagged_frames: s.lagged_frames,
        lagged_dropped: s.lagged_dropped,
        ended: s.ended,
        cpu,
        notes,
    };
    eprintln!(
        "    published {} ({:.0}/s), received {} of {expected}, {:.0} deliveries/s, \
         p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms, lost {}, lagged {} ({} dropped); CPU {}",
        d.published,
        d.published as f64 / d.publish_secs.max(1e-9),
        d.received,
        d.deliveries_per_sec,
        d.p50_ms,
        d.p99_ms,
        d.max_ms,
        d.lost,
        d.lagged_frames,
        d.lagged_dropped,
        d.cpu
    );
    Ok(d)
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

/// The fan-out section of the report.
pub fn section(opts: &Opts, rows: &[FanoutRow]) -> String {
    let mut out = String::new();
    let Some(first) = rows.first() else {
        return out;
    };
    let _ = writeln!(
        out,
        "\n## Fan-out: one channel, {} subscribers, {}-byte device messages\n",
        thousands(first.subscribers as f64),
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
    for r in rows {
        let d = &r.delivery;
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
            thousands(d.published as f64 / d.publish_secs.max(1e-9)),
            thousands(d.deliveries_per_sec),
            ms(d.p50_ms),
            ms(d.p99_ms),
            ms(d.max_ms),
            thousands(d.lost as f64),
            thousands(d.lagged_frames as f64),
            thousands(d.lagged_dropped as f64),
            d.cpu
        );
    }
    let notes: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.delivery
                .notes
                .iter()
                .map(move |n| format!("- {}, {} msg/s: {n}", r.target.label(), r.rate))
        })
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(out, "\nNotes:\n{}", notes.join("\n"));
    }
    out
}
