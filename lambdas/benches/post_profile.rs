//! Where a post's CPU goes: `iot-fanout` run under callgrind (valgrind),
//! which counts instructions, the same on every run, where timings on a
//! shared 2-core machine wander.
//!
//! `PROFILE_BINARY=path/to/iot-fanout cargo bench -p lambdas --bench post_profile`
//!
//! Two processes each fan one message out: to 10 connections and to 1,010.
//! Their instruction counts differ by 1,000 posts (start-up, the lookup's
//! fixed part and the EMF line cancel out), which gives one post's cost in
//! instructions. Release binaries are stripped: for a breakdown by
//! function, build one with symbols
//! (`CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
//! cargo build --release -p lambdas --bin iot-fanout`), pass it as
//! `PROFILE_BINARY`, and read the files this prints with
//! `callgrind_annotate --inclusive=yes FILE`.
//!
//! Needs valgrind (`apt-get install valgrind`) and moto's server
//! (`pip install 'moto[server]'`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use support::*;

/// (channel, subscribers)
const RUNS: [(&str, usize); 2] = [("profile/small", 10), ("profile/big", 1_010)];

/// The instructions callgrind counted (`summary:` or `totals:` line).
fn instructions(file: &str) -> u64 {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}"));
    text.lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("summary: ")
                .or_else(|| l.strip_prefix("totals: "))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{file}: no instruction total"))
}

#[tokio::main]
async fn main() {
    if std::process::Command::new("valgrind")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("valgrind is not on PATH: install it with `apt-get install valgrind`");
    }
    let binary = std::env::var("PROFILE_BINARY")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_iot-fanout").to_string());
    let moto = moto();
    let standin = StandIn::start().await;
    let ddb = aws_sdk_dynamodb::Client::new(&sdk(&moto.endpoint));
    let table = create_table(&ddb).await;
    let mut env = aws_env(&moto.endpoint, &standin);
    env.push(("TABLE_NAME".into(), table.clone()));
    env.push(("BRIDGE_LOOKUP_CACHE_MS".into(), "0".into()));
    env.push(("BRIDGE_FANOUT_PART_SIZE".into(), "0".into()));
    let expires = (now_secs() + 7800).to_string();
    let mut items = Vec::new();
    for (channel, n) in RUNS {
        for i in 0..n {
            let item = HashMap::from([
                (
                    "pk".to_string(),
                    AttributeValue::S(lambdas::store::filter_pk(channel)),
                ),
                (
                    "sk".to_string(),
                    AttributeValue::S(format!("P{n:05}{i:09}=")),
                ),
                ("ttl".to_string(), AttributeValue::N(expires.clone())),
            ]);
            items.push(item);
        }
    }
    put_items(&ddb, &table, items).await;
    println!("profiling {binary}");
    let mut counts = Vec::new();
    for (channel, n) in RUNS {
        let out = format!("/tmp/callgrind.iot-fanout.{n}.{}", std::process::id());
        let out_arg = format!("--callgrind-out-file={out}");
        let mut p = LambdaProcess::start_wrapped(
            &["valgrind", "--tool=callgrind", "--quiet", &out_arg],
            &binary,
            "iot-fanout",
            &env,
        )
        .await;
        p.init_time().await;
        standin.clear();
        let report = p
            .invoke(rule_event(channel, br#"{"temp":21.5}"#))
            .await
            .expect("the fan-out succeeds");
        assert_eq!(report["delivered"].as_u64(), Some(n as u64), "{report}");
        p.shutdown().await.expect("the function exits");
        let ir = instructions(&out);
        println!("  {n:>5} posts: {ir:>14} instructions  ({out})");
        counts.push((n, ir));
    }
    let ((n0, ir0), (n1, ir1)) = (counts[0], counts[1]);
    println!(
        "one post: {:.0} instructions",
        (ir1 - ir0) as f64 / (n1 - n0) as f64
    );
}
