//! The idle-memory scenario: M connections, each with one acknowledged
//! subscription (one channel for all, or one each), and the server's
//! resident memory before and after: KiB per idle connection.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::cli::{IdleTopics, MqttClient, Opts, Target};
use crate::connect::{self, Role};
use crate::procs::{self, TempDir};
use crate::report::thousands;
use crate::servers::{self, Servers};

/// One idle-memory result.
pub struct IdleRow {
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

pub fn topics_label(t: IdleTopics) -> &'static str {
    match t {
        IdleTopics::Shared => "one channel for all",
        IdleTopics::Distinct => "one channel each",
        IdleTopics::Both => "both",
    }
}

pub async fn idle(
    opts: &Opts,
    target: Target,
    topics: IdleTopics,
    dir: &TempDir,
) -> Result<IdleRow, String> {
    let tag = match topics {
        IdleTopics::Distinct => "idle-distinct",
        _ => "idle-shared",
    };
    let args = servers::throughput_bridge_args(opts);
    let mut servers = Servers::start(opts, target, dir, tag, &args).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before: Vec<u64> = servers.procs().iter().map(|p| p.rss_kib()).collect();
    let n = opts.idle_connections;
    let channel = move |i: usize| match topics {
        IdleTopics::Distinct => format!("bench/idle/{i}"),
        _ => "bench/idle".to_string(),
    };
    let setup_start = Instant::now();
    let subs = connect::open_subscribers(opts, target, &servers, n, &channel, Role::Idle).await?;
    let (ok, err) = (subs.connected, subs.first_error.clone());
    let setup_secs = setup_start.elapsed().as_secs_f64();
    eprintln!("  settling {:.0} s", opts.settle.as_secs_f64());
    tokio::time::sleep(opts.settle).await;
    let alive = servers.check_alive();
    let rss_after: Vec<u64> = servers.procs().iter().map(|p| p.rss_kib()).collect();
    let hwm: Vec<u64> = servers.procs().iter().map(|p| p.hwm_kib()).collect();
    let still_open = subs.still_open();
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
    subs.close().await;
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

/// The idle-memory section of the report.
pub fn section(opts: &Opts, rows: &[IdleRow]) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        return out;
    }
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
    for r in rows {
        let per = (r.rss_after_kib as f64 - r.rss_before_kib as f64) / r.connected.max(1) as f64;
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
    let notes: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.notes
                .iter()
                .map(move |n| format!("- {}, {}: {n}", r.target.label(), topics_label(r.topics)))
        })
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(out, "\nNotes:\n{}", notes.join("\n"));
    }
    out
}
