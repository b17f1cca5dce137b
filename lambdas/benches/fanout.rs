//! The fan-out benchmark and the size and init-time measurement, on the
//! built binaries.
//!
//! `cargo bench -p lambdas --bench fanout --profile lambda` measures the
//! binaries as `infra/deploy.sh` builds them (the workspace's `lambda`
//! profile); without `--profile` it measures the release profile.
//!
//! 1. Size and init time: each binary's size on disk, and the time from
//!    process start to its first `/next` request under a local Lambda Runtime
//!    API (median of 5), against the budget (8 MB, 15 ms).
//! 2. Fan-out: 500, 5,000 and 20,000 connections subscribed to a channel
//!    (the rows the fan-out reads, in the store's format, in moto's
//!    DynamoDB); the `@connections` stand-in answers each post after 20 ms;
//!    one device message through a pool of `iot-fanout` processes that runs
//!    asynchronous invocations as Lambda does (each part in an idle process,
//!    [`support::pool`]). Reported per message, as the median of 3: wall
//!    time (from handing the rule's event in to the last part's end), CPU
//!    per post (all processes), invocations, the root's lookup time and the
//!    wall time after it (moto answers a 5,000-row query in about 1.7 s, a
//!    20,000-row one in about 6 s, where DynamoDB returns up to 1 MB a page;
//!    the time after the lookup is what the fan-out itself takes), and the
//!    cost per million device messages by the README's formula. Run with
//!    `BRIDGE_FANOUT_PART_SIZE` at its default (500) and at 0 (one
//!    invocation posts everything: what the fan-out did before it split).
//!    The lookup cache is off, so every message reads its channel's rows.
//!
//! Needs moto's server: `pip install 'moto[server]'`. Stock moto copies the
//! whole table in every transaction and scans it in every query, which makes
//! the seeding quadratic and the lookups slow; run with the benches' own
//! `moto_server` first on PATH (same answers, see its header):
//! `PATH=$PWD/lambdas/benches/moto:$PATH cargo bench -p lambdas --bench …`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::Value;
use support::pool::FunctionPool;
use support::*;

const SIZES: [usize; 3] = [500, 5_000, 20_000];
const POST_DELAY: Duration = Duration::from_millis(20);
const RUNS: usize = 3;
/// Processes in the pool: a 20,000-recipient message needs 40.
const POOL: usize = 44;
/// What a deployed binary may weigh, and take to start.
const MAX_BYTES: u64 = 8_000_000;
const MAX_INIT: Duration = Duration::from_millis(15);
/// `FanoutMemorySize`'s default, for the cost.
const MEMORY_GB: f64 = 1.0;

fn bin(name: &str) -> &'static str {
    match name {
        "ws-handler" => env!("CARGO_BIN_EXE_ws-handler"),
        "ws-authorizer" => env!("CARGO_BIN_EXE_ws-authorizer"),
        _ => env!("CARGO_BIN_EXE_iot-fanout"),
    }
}

fn channel(n: usize) -> String {
    format!("bench/n{n}")
}

/// A connection id shaped like API Gateway's (16 characters, ending in `=`).
fn connection(n: usize, i: usize) -> String {
    format!("B{n:05}{i:09}=")
}

/// The README's formula, in dollars per million device messages: IoT Core
/// (message, rule, action), Lambda requests and duration, DynamoDB reads,
/// API Gateway messages out.
fn cost_per_million(invocations: f64, duration_ms: f64, read_units: f64, recipients: f64) -> f64 {
    1.30 + 0.20 * invocations
        + 0.000_013_333_4 * MEMORY_GB * duration_ms / 1000.0 * 1e6
        + 0.125 * read_units
        + 1.00 * recipients
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    // cargo bench passes --bench; nothing else to parse.
    let moto = moto();
    let standin = StandIn::start().await;
    let ddb = aws_sdk_dynamodb::Client::new(&sdk(&moto.endpoint));
    let table = create_table(&ddb).await;
    let mut env = aws_env(&moto.endpoint, &standin);
    env.push(("TABLE_NAME".into(), table.clone()));
    env.push((
        "BRIDGE_JWT_SECRET".into(),
        "a-bench-secret-of-32-bytes-or-more".into(),
    ));

    // target/<profile>/<binary>: the profile these binaries were built with.
    let profile = std::path::Path::new(bin("ws-handler"))
        .parent()
        .and_then(|d| d.file_name())
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "binaries of profile {profile:?}: size, and init time (process start to first /next), median of 5 \
         (budget {} MB, {} ms):",
        MAX_BYTES / 1_000_000,
        MAX_INIT.as_millis()
    );
    for name in ["ws-handler", "ws-authorizer", "iot-fanout"] {
        let size = std::fs::metadata(bin(name)).map(|m| m.len()).unwrap_or(0);
        let mut times = Vec::new();
        for _ in 0..5 {
            let mut p = LambdaProcess::start(bin(name), name, &env).await;
            times.push(p.init_time().await);
        }
        times.sort();
        let over = |over: bool, what: &str| {
            if over {
                format!("  OVER the {what} budget")
            } else {
                String::new()
            }
        };
        println!(
            "  {name:<14} {:>5.2} MB {:>7.1} ms   (min {:.1}, max {:.1}){}{}",
            size as f64 / 1e6,
            ms(times[2]),
            ms(times[0]),
            ms(times[4]),
            over(size > MAX_BYTES, "size"),
            over(times[2] > MAX_INIT, "init"),
        );
    }

    // The subscribers of each channel: their filter rows, as the store
    // writes them (the fan-out reads nothing else of a connection).
    let seeding = Instant::now();
    let expires = (now_secs() + 7800).to_string();
    let mut items = Vec::new();
    let mut row_bytes = 0;
    for n in SIZES {
        for i in 0..n {
            let item = HashMap::from([
                (
                    "pk".to_string(),
                    AttributeValue::S(lambdas::store::filter_pk(&channel(n))),
                ),
                ("sk".to_string(), AttributeValue::S(connection(n, i))),
                ("ttl".to_string(), AttributeValue::N(expires.clone())),
            ]);
            row_bytes = support::capacity::item_size(&item);
            items.push(item);
        }
    }
    let rows = items.len();
    put_items(&ddb, &table, items).await;
    println!(
        "\nseeded {rows} subscriber rows ({row_bytes} bytes each) in {:.0} s",
        seeding.elapsed().as_secs_f64()
    );

    standin.set_delay(POST_DELAY);
    println!(
        "\nfan-out: one device message, each post answered after {} ms, 128 posts in flight per invocation, \
         a pool of {POOL} iot-fanout processes on this machine's {} cores; median of {RUNS}:",
        POST_DELAY.as_millis(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  {:>11} {:>9} {:>10} {:>10} {:>16} {:>11} {:>12} {:>14}",
        "subscribers",
        "part size",
        "wall (ms)",
        "lookup ms",
        "after lookup ms",
        "CPU / post",
        "invocations",
        "$ / M messages"
    );
    for part_size in ["500", "0"] {
        let mut env = env.clone();
        env.push(("BRIDGE_FANOUT_PART_SIZE".into(), part_size.into()));
        env.push(("BRIDGE_LOOKUP_CACHE_MS".into(), "0".into()));
        let pool = FunctionPool::start(bin("iot-fanout"), "iot-fanout", &env, POOL).await;
        standin.forward_invocations(pool.inbox());
        for n in SIZES {
            let (mut walls, mut cpus, mut invocations, mut lookups, mut afters, mut costs) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for run in 0..RUNS {
                standin.clear();
                let cpu_before = pool.cpu_time();
                let id = format!("00000000-0000-4000-8000-{n:06}{run:06}");
                let done = pool
                    .run(
                        rule_event_with_id(&channel(n), br#"{"temp":21.5}"#, &id),
                        Duration::from_secs(300),
                    )
                    .await;
                let cpu = pool.cpu_time() - cpu_before;
                let reports: Vec<Value> = done
                    .answers
                    .iter()
                    .map(|a| a.clone().expect("every invocation succeeds"))
                    .collect();
                let delivered: u64 = reports
                    .iter()
                    .map(|r| r["delivered"].as_u64().unwrap())
                    .sum();
                let posts = standin.posts().len();
                assert_eq!(delivered, n as u64, "every subscriber once: {reports:?}");
                assert_eq!(posts, n, "no post lost, none twice");
                let root = reports
                    .iter()
                    .find(|r| r["part"] == "0")
                    .expect("the root's report");
                let duration_ms: f64 = reports
                    .iter()
                    .map(|r| r["duration_ms"].as_f64().unwrap())
                    .sum();
                let parts = reports.len() as f64;
                // Lookup reads (cache off): the registry's version, the
                // channel's rows, its 3 ancestors (empty); one progress row
                // per invocation (eventually consistent).
                let read_units = 1.0 + ((n * row_bytes).div_ceil(4096)) as f64 + 3.0 + 0.5 * parts;
                let wall_ms = done.wall.as_secs_f64() * 1000.0;
                let lookup_ms = root["lookup_ms"].as_f64().unwrap_or(0.0);
                walls.push(wall_ms);
                afters.push(wall_ms - lookup_ms);
                cpus.push(cpu.as_secs_f64() * 1000.0 / n as f64);
                invocations.push(parts);
                lookups.push(lookup_ms);
                costs.push(cost_per_million(parts, duration_ms, read_units, n as f64));
            }
            println!(
                "  {n:>11} {part_size:>9} {:>10.0} {:>10.0} {:>16.0} {:>8.3} ms {:>12.0} {:>14.0}",
                median(walls),
                median(lookups),
                median(afters),
                median(cpus),
                median(invocations),
                median(costs)
            );
        }
    }
    println!(
        "\n(lower bound for one invocation, 128 in flight: {} ms per 5,000 posts; \
         API Gateway's account throttle, 10,000 posts/s: 500 ms per 5,000)",
        POST_DELAY.as_millis() * 5_000_u128.div_ceil(128)
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
