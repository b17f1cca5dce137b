//! The abuse scenario (issue 7, PROTOCOL.md "What a server promises under
//! abuse"): the honest fan-out (N subscribers of one channel, a device at
//! 100 msg/s) beside, in turn, each [`Attack`], every row against freshly
//! started servers with the bridge's default limits.
//!
//! Per row: what the honest subscribers got ([`Delivery`]: deliveries/s,
//! losses, latency), the bridge's peak resident memory over the row, what
//! the attacker got, and what the bridge counted (`/metrics` before and
//! after, and sampled while the attack runs). The goal, checked against the
//! baseline row of the same server: honest clients keep at least 95 % of
//! their delivery rate, lose nothing, and the peak RSS stays under
//! 2 × baseline + 64 MiB.
//!
//! The attacks: [`slow_readers`], [`slow_requests`], [`flood`] (request
//! floods and poison names), each on its own thread ([`attacker`]).

mod attacker;
mod flood;
mod slow_readers;
mod slow_requests;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::cli::{AbuseOpts, Attack, Opts, Target};
use crate::device::Rate;
use crate::fanout::{self, Audience, Delivery};
use crate::procs::{self, TempDir};
use crate::report::{ms, thousands};
use crate::servers::Servers;
use attacker::{Attacker, Outcome};

/// The goal's allowance over twice the baseline's peak RSS.
const RSS_ALLOWANCE_KIB: u64 = 64 * 1024;
/// Share of the baseline delivery rate the honest clients must keep.
const RATE_GOAL: f64 = 0.95;
/// How long an attack may take to be in place.
const SETUP: Duration = Duration::from_secs(60);

/// One row: one attack (or none) beside the honest fan-out.
pub struct AbuseRow {
    target: Target,
    attack: Attack,
    subscribers: usize,
    delivery: Delivery,
    /// The bridge's RSS when the attack started, and its peak from then on.
    rss_start_kib: u64,
    rss_peak_kib: u64,
    /// What the attacker got (`None`: the baseline).
    attacker: Option<String>,
    /// Share of one core the attacker's thread used.
    attacker_cpu: f64,
    /// What the bridge counted during the row.
    server: String,
    notes: Vec<String>,
}

/// Connections the scenario opens beyond the honest subscribers, at most.
pub fn connections(a: &AbuseOpts) -> usize {
    a.slow_readers.max(a.slow_requests).max(a.flooders) + 1
}

fn attack_label(a: Attack) -> &'static str {
    match a {
        Attack::Baseline => "none (baseline)",
        Attack::SlowReaders => "slow readers",
        Attack::SlowRequests => "slow HTTP requests",
        Attack::Flood => "subscribe/unsubscribe/ping flood",
        Attack::Poison => "poison-name publisher",
    }
}

fn attack_tag(a: Attack) -> &'static str {
    match a {
        Attack::Baseline => "baseline",
        Attack::SlowReaders => "slow-readers",
        Attack::SlowRequests => "slow-requests",
        Attack::Flood => "flood",
        Attack::Poison => "poison",
    }
}

/// The bridge's settings: its defaults, but for the timeouts when asked.
fn bridge_args(a: &AbuseOpts) -> Vec<String> {
    let mut args = Vec::new();
    if let Some(s) = a.write_timeout {
        args.extend(["--write-timeout".to_string(), s.to_string()]);
    }
    if let Some(s) = a.header_timeout {
        args.extend(["--header-timeout".to_string(), s.to_string()]);
    }
    args
}

/// Every row of the scenario against `target`, and the rows that failed.
pub async fn abuse(opts: &Opts, target: Target, dir: &TempDir) -> (Vec<AbuseRow>, Vec<String>) {
    let (mut rows, mut failed) = (Vec::new(), Vec::new());
    for &attack in &opts.abuse.attacks {
        eprintln!("  -- attack: {} --", attack_label(attack));
        match row(opts, target, dir, attack).await {
            Ok(row) => rows.push(row),
            Err(e) => {
                eprintln!("bench: {}: {e}", attack_label(attack));
                failed.push(format!("{}: {e}", attack_label(attack)));
            }
        }
    }
    (rows, failed)
}

async fn row(
    opts: &Opts,
    target: Target,
    dir: &TempDir,
    attack: Attack,
) -> Result<AbuseRow, String> {
    let a = &opts.abuse;
    let tag = format!("abuse-{}", attack_tag(attack));
    let mut servers = Servers::start(opts, target, dir, &tag, &bridge_args(a)).await?;
    let addr = servers
        .bridge_addr()
        .ok_or("the abuse scenario needs a bridge")?;
    let audience = Audience::open(opts, target, &servers).await?;
    let result = measure(opts, target, &mut servers, addr, attack, &audience).await;
    audience.close().await;
    let stop = servers.stop();
    let mut row = result?;
    row.notes.push(format!("servers: {stop}"));
    Ok(row)
}

async fn measure(
    opts: &Opts,
    target: Target,
    servers: &mut Servers,
    addr: SocketAddr,
    attack: Attack,
    audience: &Audience,
) -> Result<AbuseRow, String> {
    let a = &opts.abuse;
    let device = fanout::start_device(opts, servers, audience).await?;
    let n = audience.recorders.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_start_kib = servers.procs()[0].rss_kib();
    for p in servers.procs() {
        p.reset_peak()?;
    }
    let before = servers.bridge_metrics().await.unwrap_or_default();
    let sampler = Sampler::start(addr);

    let duration = match attack {
        Attack::SlowReaders => a.slow_reader_duration,
        _ => a.duration,
    };
    let mut attacker = start_attack(attack, addr, a)?;
    if let Some(att) = &mut attacker {
        att.ready(SETUP).await?;
    }
    eprintln!(
        "  honest: {} msg/s x {} subscribers for {:.0} s{}",
        a.rate,
        n,
        duration.as_secs_f64(),
        if attack == Attack::Baseline {
            String::new()
        } else {
            format!(", beside the {}", attack_label(attack))
        }
    );
    let rate = Rate::Fixed(a.rate);
    let delivery = fanout::measure_phase(opts, servers, &device, audience, 1, rate, duration).await;
    let outcome = match attacker {
        Some(att) => Some(att.stop().await?),
        None => None,
    };
    let delivery = delivery?;
    let samples = sampler.stop().await;
    let after = servers.bridge_metrics().await.unwrap_or_default();
    let peaks: Vec<(&str, u64)> = servers
        .procs()
        .iter()
        .map(|p| (p.name, p.hwm_kib()))
        .collect();
    servers.check_alive()?;
    drop(device);

    let mut notes = Vec::new();
    let still_open = audience.subs.still_open();
    if still_open < n {
        notes.push(format!(
            "{} honest subscribers were disconnected",
            n - still_open
        ));
    }
    for (name, peak) in peaks.iter().skip(1) {
        notes.push(format!("{name} peak RSS {:.1} MiB", *peak as f64 / 1024.0));
    }
    let server = server_counts(&before, &after, &samples, attack);
    let (attacker, attacker_cpu) = match outcome {
        Some((Outcome { summary, notes: n }, cpu)) => {
            notes.extend(n);
            (Some(summary), cpu)
        }
        None => (None, 0.0),
    };
    eprintln!(
        "    bridge RSS {:.1} MiB at the start, peak {:.1} MiB; attacker: {}; bridge counted: {server}",
        rss_start_kib as f64 / 1024.0,
        peaks[0].1 as f64 / 1024.0,
        attacker.as_deref().unwrap_or("-")
    );
    Ok(AbuseRow {
        target,
        attack,
        subscribers: n,
        delivery,
        rss_start_kib,
        rss_peak_kib: peaks[0].1,
        attacker,
        attacker_cpu,
        server,
        notes,
    })
}

fn start_attack(
    attack: Attack,
    addr: SocketAddr,
    a: &AbuseOpts,
) -> Result<Option<Attacker>, String> {
    let tag = attack_tag(attack);
    let attacker = match attack {
        Attack::Baseline => return Ok(None),
        Attack::SlowReaders => {
            let n = a.slow_readers;
            Attacker::start(tag, move |s| slow_readers::run(addr, n, s))
        }
        Attack::SlowRequests => {
            let n = a.slow_requests;
            Attacker::start(tag, move |s| slow_requests::run(addr, n, s))
        }
        Attack::Flood => {
            let n = a.flooders;
            Attacker::start(tag, move |s| flood::subscribe_flood(addr, n, s))
        }
        Attack::Poison => Attacker::start(tag, move |s| flood::poison(addr, s)),
    };
    attacker.map(Some)
}

/// One reading of the bridge's gauges while the attack runs.
struct Sample {
    /// Seconds since the sampler started.
    at: f64,
    /// Open WebSocket connections (a gauge).
    connections: f64,
}

/// Reads `/metrics` twice a second until stopped.
struct Sampler {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(addr: SocketAddr) -> Sampler {
        let (stop, mut stop_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => return samples,
                }
                if let Ok(text) = procs::http_get(addr, "/metrics").await {
                    samples.push(Sample {
                        at: started.elapsed().as_secs_f64(),
                        connections: procs::metric(&text, "bridge_connections"),
                    });
                }
            }
        });
        Sampler { stop, task }
    }

    async fn stop(self) -> Vec<Sample> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

/// What the bridge counted between `before` and `after`, for the table.
fn server_counts(before: &str, after: &str, samples: &[Sample], attack: Attack) -> String {
    let d = |name: &str| procs::metric(after, name) - procs::metric(before, name);
    let mut parts = Vec::new();
    let mut count = |what: &str, n: f64| {
        if n > 0.0 {
            parts.push(format!("{what} {}", thousands(n)));
        }
    };
    count(
        "closed for not reading (1008)",
        d("bridge_stalled_closed_total"),
    );
    count(
        "dropped for slow queues (lagged)",
        d("bridge_messages_dropped_total{reason=\"lagged\"}"),
    );
    count(
        "rate_limited",
        d("bridge_errors_total{code=\"rate_limited\"}"),
    );
    count(
        "invalid_channel",
        d("bridge_errors_total{code=\"invalid_channel\"}"),
    );
    count(
        "too_many_subscriptions",
        d("bridge_errors_total{code=\"too_many_subscriptions\"}"),
    );
    count(
        "handshakes refused at the cap",
        d("bridge_handshakes_refused_total{reason=\"capacity\"}"),
    );
    count(
        "MQTT session re-established",
        d("bridge_broker_connects_total"),
    );
    if attack == Attack::SlowReaders {
        parts.extend(closes(samples));
    }
    if parts.is_empty() {
        "nothing".to_string()
    } else {
        parts.join("; ")
    }
}

/// Connections the bridge closed while the attack ran, whatever the reason
/// (from the `bridge_connections` gauge: its peak, and when it fell back),
/// in seconds since the sampling began.
fn closes(samples: &[Sample]) -> Option<String> {
    let (at_peak, peak) = samples
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.connections.total_cmp(&b.1.connections))?;
    let end = samples.last()?.connections;
    let closed = peak.connections - end;
    if closed < 1.0 {
        return None;
    }
    let later = &samples[at_peak..];
    let first = later.iter().find(|s| s.connections < peak.connections)?;
    let last = later.iter().find(|s| s.connections <= end)?;
    Some(format!(
        "{} connections closed, {:.0}–{:.0} s after the attack began",
        thousands(closed),
        first.at,
        last.at
    ))
}

/// The abuse section of the report: one table, the goals checked against
/// each server's baseline row.
pub fn section(opts: &Opts, rows: &[AbuseRow]) -> String {
    let mut out = String::new();
    let Some(first) = rows.first() else {
        return out;
    };
    let a = &opts.abuse;
    let _ = writeln!(
        out,
        "\n## Under abuse: {} honest subscribers of one channel at {} msg/s, one attacker at a time\n",
        thousands(first.subscribers as f64),
        a.rate
    );
    let timeouts = match (a.write_timeout, a.header_timeout) {
        (None, None) => "the bridge's defaults for every limit (write timeout 30 s, header \
                         timeout 10 s, 1 MiB / 1,024 frames per connection queue, 200 requests/s \
                         with bursts of 400, 100 publishes/s)"
            .to_string(),
        (w, h) => format!(
            "the bridge's defaults but for SHORTENED timeouts: --write-timeout {} s, \
             --header-timeout {} s",
            w.map_or("30 (default)".into(), |s| s.to_string()),
            h.map_or("10 (default)".into(), |s| s.to_string())
        ),
    };
    let _ = writeln!(
        out,
        "Each row starts the servers afresh: {} JSON-protocol subscribers, a device \
         publishing {}-byte messages (QoS {}) for {:.0} s ({:.0} s in the slow-reader row: \
         see below) while the attacker runs (from before the first publish to after the last \
         delivery). Bridge run with {timeouts}. \
         Attackers: {} slow readers (4 KiB receive buffer, never read), {} slow HTTP requests \
         (4 bytes a second, reopened when closed), {} flooding connections (at most 128 \
         requests unanswered each), one poison-name connection (same pace). RSS: the \
         bridge process (with the embedded broker when used), VmRSS when the attack started \
         and its peak (VmHWM, reset then) over the row. Goals against the same server's \
         baseline: deliveries/s ≥ {:.0} %, nothing lost, peak RSS < 2 × baseline + 64 MiB.\n",
        thousands(first.subscribers as f64),
        opts.payload,
        opts.device_qos as u8,
        a.duration.as_secs_f64(),
        a.slow_reader_duration.as_secs_f64(),
        a.slow_readers,
        a.slow_requests,
        a.flooders,
        RATE_GOAL * 100.0,
    );
    let _ = writeln!(
        out,
        "| server | attacker | honest deliveries/s (of baseline) | honest lost | p50 / p99 ms | bridge RSS start → peak | what the attacker got | bridge counted | goals |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---|---|---|");
    for r in rows {
        let baseline = rows
            .iter()
            .find(|b| b.target == r.target && b.attack == Attack::Baseline);
        let d = &r.delivery;
        let share =
            baseline.map(|b| d.deliveries_per_sec / b.delivery.deliveries_per_sec.max(1e-9));
        let honest_lost = d.lost.max(0) as u64;
        let mut missed = Vec::new();
        if let Some(s) = share {
            if s < RATE_GOAL {
                missed.push(format!("rate {:.1} % of baseline", s * 100.0));
            }
        }
        if honest_lost > 0 || d.ended > 0 {
            missed.push(format!(
                "{} lost, {} disconnected",
                thousands(honest_lost as f64),
                d.ended
            ));
        }
        let limit = baseline.map(|b| 2 * b.rss_peak_kib + RSS_ALLOWANCE_KIB);
        if let Some(limit) = limit {
            if r.rss_peak_kib >= limit {
                missed.push(format!(
                    "RSS {:.0} MiB ≥ {:.0} MiB",
                    r.rss_peak_kib as f64 / 1024.0,
                    limit as f64 / 1024.0
                ));
            }
        }
        let goals = match (missed.is_empty(), baseline.is_some()) {
            (true, true) => "met".to_string(),
            (true, false) => "no baseline".to_string(),
            (false, _) => format!("**missed**: {}", missed.join("; ")),
        };
        let attacker = match &r.attacker {
            Some(s) => format!("{s} (attacker thread {:.0} % of a core)", r.attacker_cpu),
            None => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} ({}) | {} | {} / {} | {:.1} → {:.1} MiB | {} | {} | {} |",
            r.target.label(),
            attack_label(r.attack),
            thousands(d.deliveries_per_sec),
            share.map_or("-".into(), |s| format!("{:.1} %", s * 100.0)),
            thousands(d.lost as f64),
            ms(d.p50_ms),
            ms(d.p99_ms),
            r.rss_start_kib as f64 / 1024.0,
            r.rss_peak_kib as f64 / 1024.0,
            attacker,
            r.server,
            goals
        );
    }
    let notes: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            let head = format!("{}, {}", r.target.label(), attack_label(r.attack));
            let cpu = format!("- {head}: CPU {}", r.delivery.cpu);
            std::iter::once(cpu).chain(
                r.delivery
                    .notes
                    .iter()
                    .chain(&r.notes)
                    .map(move |n| format!("- {head}: {n}")),
            )
        })
        .collect();
    let _ = writeln!(out, "\nNotes:\n{}", notes.join("\n"));
    out
}
