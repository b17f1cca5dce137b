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
//! 2. Fan-out: 5,000 connections subscribed to one channel (rows in moto's
//!    DynamoDB, in the store's format); the `@connections` stand-in answers
//!    each post after 20 ms; one device message through the `iot-fanout`
//!    binary. Reported: the invocation's duration (as the Runtime API sees
//!    it, and as the function's EMF line says), posts, and the DynamoDB
//!    requests it made (from its EMF line, counted by the SDK interceptor).
//!
//! Needs moto's server: `pip install 'moto[server]'`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use support::*;

const SUBSCRIBERS: usize = 5_000;
const POST_DELAY: Duration = Duration::from_millis(20);
const CHANNEL: &str = "fleet/d1/telemetry";
/// What a deployed binary may weigh, and take to start.
const MAX_BYTES: u64 = 8_000_000;
const MAX_INIT: Duration = Duration::from_millis(15);

fn bin(name: &str) -> &'static str {
    match name {
        "ws-handler" => env!("CARGO_BIN_EXE_ws-handler"),
        "ws-authorizer" => env!("CARGO_BIN_EXE_ws-authorizer"),
        _ => env!("CARGO_BIN_EXE_iot-fanout"),
    }
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

    // 5,000 subscribers of one channel, written as the store writes them.
    let expires = (now_secs() + 7800).to_string();
    let mut requests: Vec<WriteRequest> = Vec::new();
    for i in 0..SUBSCRIBERS {
        let id = format!("conn-{i:05}");
        let rows = [
            (lambdas::store::conn_pk(&id), "meta".to_string()),
            (lambdas::store::conn_pk(&id), format!("sub#{CHANNEL}")),
            (lambdas::store::filter_pk(CHANNEL), id.clone()),
        ];
        for (pk, sk) in rows {
            let mut put = PutRequest::builder()
                .item("pk", AttributeValue::S(pk))
                .item("sk", AttributeValue::S(sk.clone()))
                .item("ttl", AttributeValue::N(expires.clone()));
            if sk == "meta" {
                put = put
                    .item(
                        "perms",
                        AttributeValue::S(
                            r#"{"subject":null,"subscribe":"all","publish":"all"}"#.into(),
                        ),
                    )
                    .item("n", AttributeValue::N("1".into()));
            } else if sk.starts_with("sub#") {
                put = put.item("mqtt", AttributeValue::S(CHANNEL.into()));
            }
            requests.push(
                WriteRequest::builder()
                    .put_request(put.build().unwrap())
                    .build(),
            );
        }
    }
    let seeding = Instant::now();
    for chunk in requests.chunks(25) {
        ddb.batch_write_item()
            .request_items(&table, chunk.to_vec())
            .send()
            .await
            .expect("seed");
    }
    println!(
        "\nseeded {SUBSCRIBERS} subscribers ({} rows) in {:.1} s",
        requests.len(),
        seeding.elapsed().as_secs_f64()
    );

    standin.set_delay(POST_DELAY);
    for concurrency in [128usize, 512] {
        let mut env = env.clone();
        env.push(("BRIDGE_FANOUT_CONCURRENCY".into(), concurrency.to_string()));
        let fanout = LambdaProcess::start(bin("iot-fanout"), "iot-fanout", &env).await;
        println!(
            "\nfan-out: {SUBSCRIBERS} subscribers on one channel, each post answered after {} ms, BRIDGE_FANOUT_CONCURRENCY={concurrency}",
            POST_DELAY.as_millis()
        );
        for run in 1..=3 {
            standin.clear();
            let cpu_before = fanout.cpu_time();
            let started = Instant::now();
            let report = fanout
                .invoke(rule_event(CHANNEL, br#"{"temp":21.5}"#))
                .await
                .expect("the fan-out succeeds");
            let wall = started.elapsed();
            let cpu = fanout.cpu_time() - cpu_before;
            let posts = standin.posts().len();
            let emf = fanout.metrics().last().cloned().unwrap_or_default();
            println!(
                "  run {run}: invocation {:.0} ms (EMF Duration {} ms, CPU {:.0} ms), delivered {} of {posts} posts, DynamoDB requests {}",
                ms(wall),
                emf["Duration"],
                ms(cpu),
                report["delivered"],
                emf["DynamoDbRequests"]
            );
            assert_eq!(report["delivered"].as_u64(), Some(SUBSCRIBERS as u64));
        }
        let ideal = POST_DELAY * (SUBSCRIBERS as u32).div_ceil(concurrency as u32);
        println!(
            "  (lower bound with {concurrency} posts in flight: {} ms)",
            ideal.as_millis()
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
