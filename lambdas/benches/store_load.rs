//! The subscription store under load: a workload replayed against DynamoDB
//! in moto, every request billed by the recorder in `tests/support/capacity.rs`
//! (read and write units as DynamoDB counts them, per partition key).
//!
//! `cargo bench -p lambdas --bench store_load`
//!
//! The workload: 1,000 devices (100 sites × 10) each publishing once a second
//! to `fleet/s{site}/d{dev}/telemetry`, so 1,000 device messages a second,
//! and 5,000 subscribed connections: 2,000 watch one device each (its exact
//! topic, two per device), 500 watch a site (`fleet/s{site}/+/telemetry`, a
//! registered `+` filter, five per site), 2,500 are users' tabs holding their
//! per-user `users/u{i}/#` (900 users). That is 1,000 distinct wildcard
//! filters (100 `+` filters, 900 literal-prefix ones) and 7 connections per
//! device message. Meanwhile 10 connections a second reconnect and
//! resubscribe (disconnect, connect, subscribe: `ws-handler`'s writes).
//!
//! Time is simulated (a manual clock, 1 ms per message): moto is far slower
//! than DynamoDB, and what counts is which requests the code makes, not how
//! fast moto answers. The messages go round-robin to 100 fan-out
//! environments (`FanoutReservedConcurrency`'s default), each with its own
//! lookup cache: the worst case for the cache, as no environment sees the
//! same device twice a second. Reported for the cache off
//! (`BRIDGE_LOOKUP_CACHE_MS=0`) and at its default (1000): requests, read and
//! write units per device message, and the hottest partition key's requests
//! in one second, after a first second that warms the caches.
//!
//! Needs moto's server: `pip install 'moto[server]'`. Stock moto copies the
//! whole table in every transaction and scans it in every query, which makes
//! the seeding quadratic and the lookups slow; run with the benches' own
//! `moto_server` first on PATH (same answers, see its header):
//! `PATH=$PWD/lambdas/benches/moto:$PATH cargo bench -p lambdas --bench …`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bridge::auth::Credentials;
use futures_util::stream::{self, StreamExt};
use lambdas::clock::Clock;
use support::capacity::{Billed, Recorder};
use support::*;

const SITES: usize = 100;
const DEVICES_PER_SITE: usize = 10;
const DEVICES: usize = SITES * DEVICES_PER_SITE;
const WATCHERS_PER_DEVICE: usize = 2;
const DASHBOARDS_PER_SITE: usize = 5;
const USERS: usize = 900;
const USER_TABS: usize = 2_500;
const ENVIRONMENTS: usize = 100;
const SECONDS: usize = 3;
const RECONNECTS_PER_SECOND: usize = 10;

fn device_topic(device: usize) -> String {
    format!(
        "fleet/s{}/d{}/telemetry",
        device / DEVICES_PER_SITE,
        device % DEVICES_PER_SITE
    )
}

/// Every connection and the filters it holds.
fn connections() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for d in 0..DEVICES {
        for w in 0..WATCHERS_PER_DEVICE {
            out.push((format!("watch-{d}-{w}"), device_topic(d)));
        }
    }
    for site in 0..SITES {
        for n in 0..DASHBOARDS_PER_SITE {
            out.push((
                format!("site-{site}-{n}"),
                format!("fleet/s{site}/+/telemetry"),
            ));
        }
    }
    for tab in 0..USER_TABS {
        out.push((format!("tab-{tab}"), format!("users/u{}/#", tab % USERS)));
    }
    out
}

async fn connect_and_subscribe(store: &lambdas::store::Store, id: &str, filter: &str) {
    let now = now_secs();
    let expires = now + 7800;
    store
        .put_connection(id, &Credentials::anonymous(), now_millis(), expires)
        .await
        .expect("connect");
    let added = store
        .subscribe(id, filter, filter, expires, None, 100, now, 7800)
        .await
        .expect("subscribe");
    assert_eq!(added, lambdas::store::Subscribed::Added, "{id} {filter}");
}

struct Figures {
    messages: usize,
    requests: f64,
    read_units: f64,
    write_units: f64,
    hottest: (String, usize),
    /// The next hottest keys after it.
    runners_up: Vec<(String, usize)>,
}

/// Steady state: requests after the first (cache-warming) second.
fn figures(billed: &[Billed], start_ms: i64, messages: usize) -> Figures {
    let steady: Vec<&Billed> = billed
        .iter()
        .filter(|b| b.at_ms >= start_ms + 1000)
        .collect();
    let mut per_second: BTreeMap<(String, i64), usize> = BTreeMap::new();
    for b in &steady {
        for pk in &b.partitions {
            *per_second
                .entry((pk.clone(), (b.at_ms - start_ms) / 1000))
                .or_insert(0) += 1;
        }
    }
    // Each key at its busiest second, hottest first.
    let mut busiest: BTreeMap<String, usize> = BTreeMap::new();
    for ((pk, _), n) in per_second {
        let top = busiest.entry(pk).or_insert(0);
        *top = (*top).max(n);
    }
    let mut ranked: Vec<(String, usize)> = busiest.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut ranked = ranked.into_iter();
    let hottest = ranked.next().unwrap_or_default();
    let runners_up = ranked.take(3).collect();
    Figures {
        messages,
        requests: steady.len() as f64,
        read_units: steady.iter().map(|b| b.read_units).sum(),
        write_units: steady.iter().map(|b| b.write_units).sum(),
        hottest,
        runners_up,
    }
}

#[tokio::main]
async fn main() {
    let kit = Kit::new().await;
    let seeding = Instant::now();
    let setup = kit.store(&kit.calls);
    let all = connections();
    stream::iter(all.iter())
        .for_each_concurrent(8, |(id, filter)| {
            let setup = &setup;
            async move { connect_and_subscribe(setup, id, filter).await }
        })
        .await;
    let wildcards: std::collections::BTreeSet<&str> = all
        .iter()
        .map(|(_, f)| f.as_str())
        .filter(|f| f.contains('+') || f.contains('#'))
        .collect();
    println!(
        "seeded {} connections, {} distinct wildcard filters ({} registered), in {:.0} s",
        all.len(),
        wildcards.len(),
        wildcards
            .iter()
            .filter(|f| lambdas::store::registered(f))
            .count(),
        seeding.elapsed().as_secs_f64()
    );
    println!(
        "\nreplay: {DEVICES} device messages/s for {SECONDS} s over {ENVIRONMENTS} fan-out environments, \
         {RECONNECTS_PER_SECOND} reconnects/s; figures for the {} s after the first:",
        SECONDS - 1
    );
    println!(
        "  lookup cache          requests    read u.   write u.  subscribe  hottest key   (its key)\n  \
                             / message  / message  / message  w.u. each   requests/s"
    );
    for cache_ms in ["0", "1000"] {
        kit.standin.clear();
        let start_ms = 2_000_000_000_000i64;
        let clock = Clock::manual(start_ms as u64);
        let fanout_bill = Recorder::new(clock.clone());
        let handler_bill = Recorder::new(clock.clone());
        let config = lambdas::config::FanoutConfig::from_env(
            &kit.env(&[("BRIDGE_LOOKUP_CACHE_MS", cache_ms), ("BRIDGE_AUTH", "off")]),
        )
        .unwrap();
        let store = kit.recorded_store(&fanout_bill);
        let envs: Vec<lambdas::fanout::Fanout> = (0..ENVIRONMENTS)
            .map(|_| {
                lambdas::fanout::Fanout::with_clock(
                    config.clone(),
                    store.clone(),
                    kit.sender(&kit.calls),
                    kit.calls.clone(),
                    clock.clone(),
                )
            })
            .collect();
        let handler_store = kit.recorded_store(&handler_bill);
        let mut reconnects = 0;
        let started = Instant::now();
        for second in 0..SECONDS {
            for m in 0..DEVICES {
                let n = second * DEVICES + m;
                let report = envs[n % ENVIRONMENTS]
                    .handle(rule_event_with_id(
                        &device_topic((m * 7) % DEVICES),
                        b"{\"t\":21.5}",
                        // Each message its own id, as the rule's newuuid()
                        // gives: the progress rows are keyed by it.
                        &format!("00000000-0000-4000-8000-{n:012}"),
                    ))
                    .await
                    .expect("fan-out");
                assert!(report.delivered >= WATCHERS_PER_DEVICE, "{report:?}");
                if m % (DEVICES / RECONNECTS_PER_SECOND) == 0 {
                    // One of the connections reconnects (a new id) and resubscribes.
                    let (old, filter) = &all[(reconnects * 97) % all.len()];
                    handler_store
                        .remove_connection(old, now_secs())
                        .await
                        .expect("disconnect");
                    connect_and_subscribe(&handler_store, old, filter).await;
                    reconnects += 1;
                }
                clock.advance(Duration::from_millis(1));
            }
        }
        let messages = (SECONDS - 1) * DEVICES;
        let f = figures(&fanout_bill.billed(), start_ms, messages);
        let h = figures(&handler_bill.billed(), start_ms, messages);
        let subscribes = (SECONDS - 1) * RECONNECTS_PER_SECOND;
        println!(
            "  {:<22} {:>10.2} {:>10.2} {:>10.3} {:>10.1} {:>12}   {} ({:.0} s)",
            format!("{cache_ms} ms"),
            f.requests / f.messages as f64,
            f.read_units / f.messages as f64,
            f.write_units / f.messages as f64,
            h.write_units / subscribes as f64,
            f.hottest.1,
            f.hottest.0,
            started.elapsed().as_secs_f64()
        );
        let next: Vec<String> = f
            .runners_up
            .iter()
            .map(|(key, n)| format!("{key} ({n}/s)"))
            .collect();
        println!("  {:<22} next hottest: {}", "", next.join(", "));
        let reads: f64 = h.read_units / subscribes as f64;
        println!(
            "  {:<22} handler per reconnect: {:.1} requests, {:.1} read units; hottest key of the handler: {} ({}/s)",
            "",
            h.requests / subscribes as f64,
            reads,
            h.hottest.0,
            h.hottest.1
        );
    }
}
