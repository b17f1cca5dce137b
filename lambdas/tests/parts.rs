//! `iot-fanout` in parts: a big fan-out split across parallel invocations,
//! the time budget that hands the rest on, and retries that re-post nothing
//! already posted. In-process functions against moto's DynamoDB and the
//! recording stand-in, which also plays Lambda's `Invoke` (it queues the
//! asynchronous invocations, and the test runs them, as Lambda would).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bridge::permissions::Permissions;
use lambdas::budget::Budget;
use lambdas::fanout::{Fanout, FanoutError, Report};
use serde_json::{json, Value};
use support::*;

/// `n` connections subscribed to `channel`: conn-000, conn-001, ...
async fn subscribers(kit: &Kit, channel: &str, n: usize) -> Vec<String> {
    use futures_util::stream::{self, StreamExt};
    let h = &kit.handler(&[]);
    let ids: Vec<String> = (0..n).map(|i| format!("conn-{i:03}")).collect();
    stream::iter(ids.iter())
        .for_each_concurrent(8, |id| async move {
            connect(h, id, &Permissions::allow_all()).await;
            let frame = format!(r#"{{"action":"subscribe","channel":"{channel}","id":1}}"#);
            assert_eq!(
                send(h, id, &frame).await,
                Some(json!({"type":"ack","id":1}))
            );
        })
        .await;
    ids
}

/// A fan-out that splits above `part_size` and hands parts to the stand-in.
fn fanout(kit: &Kit, part_size: &str, concurrency: &str) -> Fanout {
    let config = lambdas::config::FanoutConfig::from_env(&kit.env(&[
        ("BRIDGE_FANOUT_PART_SIZE", part_size),
        ("BRIDGE_FANOUT_CONCURRENCY", concurrency),
    ]))
    .unwrap();
    Fanout::new(
        config,
        kit.store(&kit.calls),
        kit.sender(&kit.calls),
        kit.calls.clone(),
    )
    .with_invoker(kit.invoker("iot-fanout", &kit.calls))
}

/// Runs the invocations queued at the stand-in, all at once, until none
/// is left (as Lambda runs asynchronous invocations): their reports.
async fn run_queued(kit: &Kit, f: &Fanout) -> Vec<Report> {
    let mut reports = Vec::new();
    loop {
        let queued = kit.standin.take_invocations();
        if queued.is_empty() {
            return reports;
        }
        let done = futures_util::future::join_all(queued.into_iter().map(|e| f.handle(e))).await;
        for r in done {
            reports.push(r.expect("a part succeeds"));
        }
    }
}

/// Posts per connection so far.
fn posts_per_connection(kit: &Kit) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (c, _) in kit.standin.posted() {
        *m.entry(c).or_insert(0) += 1;
    }
    m
}

fn each_once(ids: &[String]) -> BTreeMap<String, usize> {
    ids.iter().map(|id| (id.clone(), 1)).collect()
}

#[tokio::test]
async fn a_big_fanout_is_split_into_parts_each_posting_its_own() {
    let kit = Kit::new().await;
    let ids = subscribers(&kit, "dash", 35).await;
    let f = fanout(&kit, "10", "4");
    let root = f.handle(rule_event("dash", b"{\"v\":1}")).await.unwrap();
    assert_eq!(root.recipients, 35);
    assert_eq!(root.handed_off, 3, "{root:?}");
    assert_eq!(root.delivered, 10, "the root posts the first chunk itself");
    let dynamodb_before = kit.calls.total("DynamoDB");
    let parts = run_queued(&kit, &f).await;
    // A part looks nothing up: it reads only its own progress row.
    assert_eq!(kit.calls.total("DynamoDB") - dynamodb_before, 3);
    let mut keys: Vec<(String, usize)> = parts
        .iter()
        .map(|r| (r.part.clone(), r.delivered))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [("0.1".into(), 10), ("0.2".into(), 10), ("0.3".into(), 5)]
    );
    // Every connection once, with the same frame and message id.
    assert_eq!(posts_per_connection(&kit), each_once(&ids));
    for (_, frame) in kit.standin.posted() {
        assert_eq!(frame["mid"], RULE_ID);
        assert_eq!(frame["data"], json!({"v":1}));
    }
    assert!(parts.iter().all(|p| p.filters == 0), "{parts:?}");
    // The invocations were asynchronous `Invoke`s of this function, signed.
    let invokes: Vec<_> = kit
        .standin
        .records()
        .into_iter()
        .filter(|r| r.raw_path == "/2015-03-31/functions/iot-fanout/invocations")
        .collect();
    assert_eq!(invokes.len(), 3);
    for r in &invokes {
        assert_eq!(r.invocation_type.as_deref(), Some("Event"));
        let auth = r.authorization.as_deref().unwrap_or_default();
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=test/")
                && auth.contains("/us-east-1/lambda/aws4_request"),
            "{auth}"
        );
    }
    // Posts are signed for execute-api.
    let post = &kit.standin.posts()[0];
    assert!(
        post.authorization
            .as_deref()
            .unwrap_or_default()
            .contains("/us-east-1/execute-api/aws4_request"),
        "{:?}",
        post.authorization
    );
    // At or below the part size, nothing is split.
    kit.standin.clear();
    let f = fanout(&kit, "35", "4");
    let root = f.handle(rule_event("dash", b"2")).await.unwrap();
    assert_eq!((root.handed_off, root.delivered), (0, 35));
    assert!(kit.standin.take_invocations().is_empty());
}

#[tokio::test]
async fn the_time_budget_stops_posts_and_hands_the_rest_on() {
    let kit = Kit::new().await;
    let ids = subscribers(&kit, "slow", 60).await;
    kit.standin.set_delay(Duration::from_millis(100));
    let f = fanout(&kit, "0", "5");
    // 1 s to the deadline, 400 ms kept back: posts start for 600 ms.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(1);
    let budget = Budget::until(deadline, Duration::from_millis(400));
    let root = f
        .handle_within(rule_event("slow", b"1"), budget)
        .await
        .unwrap();
    assert!(
        Instant::now() < deadline,
        "ended {:?} after the start, past its deadline",
        started.elapsed()
    );
    assert!(root.handed_on > 0 && root.delivered > 0, "{root:?}");
    assert_eq!(root.delivered + root.handed_on, 60, "{root:?}");
    // The rest, handed on, is posted by the next invocation.
    kit.standin.set_delay(Duration::ZERO);
    let rest = run_queued(&kit, &f).await;
    assert_eq!(rest.len(), 1);
    assert_eq!(
        (rest[0].part.as_str(), rest[0].delivered),
        ("0+", root.handed_on)
    );
    assert_eq!(posts_per_connection(&kit), each_once(&ids));
}

#[tokio::test]
async fn a_part_that_fails_is_retried_without_reposting_what_it_posted() {
    let kit = Kit::new().await;
    let ids = subscribers(&kit, "room", 25).await;
    let f = fanout(&kit, "10", "2");
    let root = f.handle(rule_event("room", b"1")).await.unwrap();
    assert_eq!((root.handed_off, root.delivered), (2, 10));
    let mut queued = kit.standin.take_invocations();
    queued.sort_by_key(|e| e["part"]["key"].as_str().unwrap_or_default().to_string());
    let (first, second) = (queued[0].clone(), queued[1].clone());
    assert_eq!(first["part"]["key"], "0.1");
    // Part 0.1 runs out of time half way, and handing the rest on fails
    // (Lambda's Invoke answers 500, three times): the invocation fails,
    // after recording what it still owes.
    kit.standin.set_delay(Duration::from_millis(100));
    kit.standin.fail_invocations(&[500, 500, 500]);
    let budget = Budget::until(
        Instant::now() + Duration::from_millis(500),
        Duration::from_millis(200),
    );
    let err = f.handle_within(first.clone(), budget).await.unwrap_err();
    let FanoutError::Unfinished { left, recorded, .. } = &err else {
        panic!("{err}");
    };
    assert!(*left > 0 && *left < 10, "{err}");
    assert_eq!(*recorded, "recorded for the retry");
    let posted_before = kit.standin.posts().len();
    assert_eq!(
        posted_before,
        10 + (10 - left),
        "the root's 10 and part of 0.1"
    );
    // Lambda retries the same event: only what was left is posted.
    kit.standin.set_delay(Duration::ZERO);
    let retry = f.handle(first.clone()).await.unwrap();
    assert!(retry.resumed);
    assert_eq!(retry.delivered, *left);
    f.handle(second).await.unwrap();
    assert_eq!(posts_per_connection(&kit), each_once(&ids));
    // And a late duplicate of the event posts nothing again.
    let dup = f.handle(first).await.unwrap();
    assert!(dup.resumed);
    assert_eq!(dup.delivered, 0);
    assert_eq!(posts_per_connection(&kit), each_once(&ids));
}

#[tokio::test]
async fn a_root_that_fails_is_retried_without_reposting_what_it_posted() {
    let kit = Kit::new().await;
    let ids = subscribers(&kit, "room", 12).await;
    // No invoker (as outside Lambda): the rest cannot be handed on.
    let config =
        lambdas::config::FanoutConfig::from_env(&kit.env(&[("BRIDGE_FANOUT_CONCURRENCY", "2")]))
            .unwrap();
    let f = Fanout::new(
        config,
        kit.store(&kit.calls),
        kit.sender(&kit.calls),
        kit.calls.clone(),
    );
    kit.standin.set_delay(Duration::from_millis(100));
    let budget = Budget::until(
        Instant::now() + Duration::from_millis(600),
        Duration::from_millis(300),
    );
    let event = rule_event_with_id("room", b"1", "root-retry-1");
    let err = f.handle_within(event.clone(), budget).await.unwrap_err();
    assert!(err.to_string().contains("recorded for the retry"), "{err}");
    kit.standin.set_delay(Duration::ZERO);
    let retry = f.handle(event).await.unwrap();
    assert!(retry.resumed);
    assert_eq!(retry.filters, 0, "the retry looks nothing up");
    assert_eq!(posts_per_connection(&kit), each_once(&ids));
}

#[tokio::test]
async fn a_part_that_cannot_be_handed_off_is_posted_by_the_root() {
    let kit = Kit::new().await;
    let ids = subscribers(&kit, "room", 25).await;
    let f = fanout(&kit, "10", "8");
    // Lambda's Invoke fails: every try of both hand-offs answers 500.
    kit.standin.fail_invocations(&[500; 6]);
    let root = f.handle(rule_event("room", b"1")).await.unwrap();
    assert_eq!(root.handed_off, 0, "{root:?}");
    assert_eq!(root.delivered, 25, "the root posted both parts itself");
    assert!(kit.standin.take_invocations().is_empty());
    assert_eq!(posts_per_connection(&kit), each_once(&ids));
}

#[tokio::test]
async fn part_events_are_checked_like_rule_events() {
    let kit = Kit::new().await;
    let f = fanout(&kit, "10", "2");
    let part = |key: &str, topic: Value, recipients: Value| {
        json!({"part": {"key": key, "round": 0, "recipients": recipients,
            "message": {"topic": topic, "payload": "MQ==", "id": "p-1"}}})
    };
    for bad in [
        part("0", json!("a"), json!(["x"])),
        part("0.1", json!("a/+"), json!(["x"])),
        part("0.1", json!(7), json!(["x"])),
        part("0.1", json!("a"), json!([1, 2])),
        json!({"part": "nope"}),
    ] {
        let err = f.handle(bad.clone()).await.unwrap_err().to_string();
        assert!(err.contains("not a topic rule event"), "{bad}: {err}");
    }
    assert!(kit.standin.posted().is_empty());
}
