//! `iot-fanout` in-process, with the topic rule's output as the event,
//! against moto's DynamoDB and the recording stand-in.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use bridge::permissions::Permissions;
use serde_json::{json, Value};
use support::*;

async fn subscribe(h: &lambdas::handler::Handler, conn: &str, filters: &[&str]) {
    connect(h, conn, &Permissions::allow_all()).await;
    for f in filters {
        let reply = send(
            h,
            conn,
            &format!(r#"{{"action":"subscribe","channel":"{f}","id":1}}"#),
        )
        .await;
        assert_eq!(reply, Some(json!({"type":"ack","id":1})), "{f}");
    }
}

fn per_connection(posted: &[(String, Value)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (c, _) in posted {
        *m.entry(c.clone()).or_insert(0) += 1;
    }
    m
}

#[tokio::test]
async fn one_copy_per_connection_whatever_overlaps() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    subscribe(&h, "a", &["fleet/#", "fleet/d1/t"]).await;
    subscribe(&h, "b", &["fleet/+/t"]).await;
    subscribe(&h, "c", &["+/d1/t", "+/+/+"]).await;
    subscribe(&h, "d", &["fleet/d2/t", "other/#"]).await;
    let f = kit.fanout(&[]);
    let report = f
        .handle(rule_event("fleet/d1/t", br#"{"temp":21.5}"#))
        .await
        .unwrap();
    let posted = kit.standin.posted();
    assert_eq!(
        per_connection(&posted),
        BTreeMap::from([("a".into(), 1), ("b".into(), 1), ("c".into(), 1)])
    );
    for (_, frame) in &posted {
        assert_eq!(
            frame,
            &json!({"type":"message","channel":"fleet/d1/t","data":{"temp":21.5},"mid":RULE_ID})
        );
    }
    assert_eq!(
        (
            report.recipients,
            report.delivered,
            report.gone,
            report.failed
        ),
        (3, 3, 0, 0)
    );
    // The topic itself, its literal-prefix ancestors (#, fleet/#, fleet/d1/#,
    // fleet/d1/t/#) and the registered `+` filters that match it (fleet/+/t,
    // +/d1/t, +/+/+): no scan, no enumeration.
    assert_eq!(report.filters, 1 + 4 + 3);

    kit.standin.clear();
    let report = f
        .handle(rule_event("fleet/d2/t", b"\xff\x00"))
        .await
        .unwrap();
    let posted = kit.standin.posted();
    assert_eq!(
        per_connection(&posted),
        BTreeMap::from([
            ("a".into(), 1),
            ("b".into(), 1),
            ("c".into(), 1),
            ("d".into(), 1)
        ])
    );
    for (_, frame) in &posted {
        assert_eq!(
            frame,
            &json!({"type":"message","channel":"fleet/d2/t","data":"/wA=","encoding":"base64","mid":RULE_ID})
        );
    }
    assert_eq!(report.delivered, 4);

    // A topic nobody wants: no post.
    kit.standin.clear();
    let report = f
        .handle(rule_event("nobody/here/at/all", b"1"))
        .await
        .unwrap();
    assert_eq!(report.recipients, 0);
    assert!(kit.standin.posted().is_empty());
}

#[tokio::test]
async fn only_plus_filters_are_registered_and_each_is_seen_once_acked() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    let f = kit.fanout(&[]);
    subscribe(&h, "a", &["x/+"]).await;
    f.handle(rule_event("x/1", b"1")).await.unwrap();
    assert_eq!(kit.standin.posted().len(), 1);
    // A literal-prefix filter is found as an ancestor of the topic: never
    // registered, so a per-user filter leaves the registry alone.
    subscribe(&h, "b", &["#", "users/b/#"]).await;
    let registry: Vec<String> = kit
        .keys()
        .await
        .into_iter()
        .filter(|k| k.starts_with("wildcards|"))
        .collect();
    assert_eq!(registry, ["wildcards|f#x/+", "wildcards|version"]);
    kit.standin.clear();
    f.handle(rule_event("x/2", b"2")).await.unwrap();
    assert_eq!(
        per_connection(&kit.standin.posted()),
        BTreeMap::from([("a".into(), 1), ("b".into(), 1)])
    );
    kit.standin.clear();
    f.handle(rule_event("users/b/inbox", b"3")).await.unwrap();
    assert_eq!(
        per_connection(&kit.standin.posted()),
        BTreeMap::from([("b".into(), 1)])
    );
    // Without a cache: the registry's version and the message's progress
    // row (what an earlier attempt left, if any), then one Query per filter.
    let before = kit.calls.snapshot();
    let report = f.handle(rule_event("x/3", b"3")).await.unwrap();
    let after = kit.calls.snapshot();
    let delta = |op: &str| {
        let n = |m: &BTreeMap<(String, String), u64>| {
            m.get(&("DynamoDB".into(), op.into())).copied().unwrap_or(0)
        };
        n(&after) - n(&before)
    };
    assert_eq!(delta("GetItem"), 2);
    assert_eq!(delta("Query"), 5, "x/3, #, x/#, x/3/# and x/+");
    assert_eq!(report.dynamodb_requests, 7);
    // Unsubscribed everywhere, released and re-added: seen again.
    send(&h, "b", r##"{"action":"unsubscribe","channel":"#"}"##).await;
    send(&h, "a", r#"{"action":"unsubscribe","channel":"x/+"}"#).await;
    kit.standin.clear();
    f.handle(rule_event("x/4", b"4")).await.unwrap();
    assert!(kit.standin.posted().is_empty());
    send(&h, "a", r#"{"action":"subscribe","channel":"x/+"}"#).await;
    kit.standin.clear();
    f.handle(rule_event("x/5", b"5")).await.unwrap();
    assert_eq!(
        per_connection(&kit.standin.posted()),
        BTreeMap::from([("a".into(), 1)])
    );
}

/// A fan-out whose lookup cache ages by `clock`.
fn fanout_on(kit: &Kit, cache_ms: &str, clock: lambdas::clock::Clock) -> lambdas::fanout::Fanout {
    let config =
        lambdas::config::FanoutConfig::from_env(&kit.env(&[("BRIDGE_LOOKUP_CACHE_MS", cache_ms)]))
            .unwrap();
    lambdas::fanout::Fanout::with_clock(
        config,
        kit.store(&kit.calls),
        kit.sender(&kit.calls),
        kit.calls.clone(),
        clock,
    )
}

#[tokio::test]
async fn the_fanout_reuses_its_reads_for_at_most_the_cache_age() {
    let kit = Kit::new().await;
    // A handler without the wait: it writes the rows and acks at once.
    let h = kit.handler(&[]);
    let clock = lambdas::clock::Clock::manual(1_000_000);
    let f = fanout_on(&kit, "1000", clock.clone());
    subscribe(&h, "a", &["room", "x/+"]).await;
    f.handle(rule_event("room", b"1")).await.unwrap();
    assert_eq!(per_connection(&kit.standin.posted()).len(), 1);
    // New rows while the fan-out's reads are younger than its cache age:
    // it does not see them (which is why ws-handler's ack waits)...
    subscribe(&h, "b", &["room", "y/+"]).await;
    for step in [0, 999] {
        clock.advance(std::time::Duration::from_millis(step));
        kit.standin.clear();
        f.handle(rule_event("room", b"2")).await.unwrap();
        f.handle(rule_event("y/1", b"2")).await.unwrap();
        assert_eq!(
            per_connection(&kit.standin.posted()),
            BTreeMap::from([("a".into(), 1)]),
            "{step} ms"
        );
    }
    // ...and sees them once its reads are that old.
    clock.advance(std::time::Duration::from_millis(1));
    kit.standin.clear();
    f.handle(rule_event("room", b"3")).await.unwrap();
    f.handle(rule_event("y/1", b"3")).await.unwrap();
    assert_eq!(
        per_connection(&kit.standin.posted()),
        BTreeMap::from([("a".into(), 1), ("b".into(), 2)])
    );
    // Within the cache age, messages cost no lookup at all: each reads
    // only its own progress row.
    let before = kit.calls.snapshot();
    for _ in 0..20 {
        f.handle(rule_event("room", b"4")).await.unwrap();
    }
    let after = kit.calls.snapshot();
    let delta = |op: &str| {
        let n = |m: &BTreeMap<(String, String), u64>| {
            m.get(&("DynamoDB".into(), op.into())).copied().unwrap_or(0)
        };
        n(&after) - n(&before)
    };
    assert_eq!((delta("Query"), delta("GetItem")), (0, 20));
}

#[tokio::test]
async fn an_acked_subscription_is_never_missed_by_a_caching_fanout() {
    let kit = Kit::new().await;
    let cache = [("BRIDGE_LOOKUP_CACHE_MS", "300")];
    let h = kit.handler(&cache);
    let f = kit.fanout(&cache);
    subscribe(&h, "a", &["room"]).await;
    f.handle(rule_event("room", b"1")).await.unwrap();
    f.handle(rule_event("z/1", b"1")).await.unwrap();
    // The fan-out now holds reads of `room`, the registry and z/1's filters.
    // Whatever the filter, a message sent once the ack is in reaches it.
    for (conn, channel, topic) in [
        ("b", "room", "room"),
        ("c", "z/+", "z/1"),
        ("d", "z/#", "z/1"),
    ] {
        connect(&h, conn, &Permissions::allow_all()).await;
        let started = std::time::Instant::now();
        let reply = send(
            &h,
            conn,
            &format!(r#"{{"action":"subscribe","channel":"{channel}","id":1}}"#),
        )
        .await;
        assert_eq!(reply, Some(json!({"type":"ack","id":1})));
        assert!(
            started.elapsed() >= std::time::Duration::from_millis(350),
            "the ack waited for the cache: {:?}",
            started.elapsed()
        );
        kit.standin.clear();
        f.handle(rule_event(topic, b"2")).await.unwrap();
        assert!(
            per_connection(&kit.standin.posted()).contains_key(conn),
            "{conn} missed {topic}"
        );
    }
    // A refused subscribe, or one without an id, does not wait.
    let started = std::time::Instant::now();
    send(&h, "b", r#"{"action":"subscribe","channel":"q"}"#).await;
    let reply = send(
        &h,
        "b",
        r#"{"action":"subscribe","channel":"a/#/b","id":2}"#,
    )
    .await;
    assert_eq!(reply.unwrap()["code"], "invalid_channel");
    assert!(started.elapsed() < std::time::Duration::from_millis(300));
}

#[tokio::test]
async fn each_partition_is_read_at_most_once_per_cache_age_per_environment() {
    use support::capacity::Recorder;
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    subscribe(&h, "a", &["fleet/+/t", "fleet/#"]).await;
    subscribe(&h, "b", &["fleet/d1/t"]).await;
    let clock = lambdas::clock::Clock::manual(1_000_000);
    let recorder = Recorder::new(clock.clone());
    let config =
        lambdas::config::FanoutConfig::from_env(&kit.env(&[("BRIDGE_LOOKUP_CACHE_MS", "1000")]))
            .unwrap();
    let f = lambdas::fanout::Fanout::with_clock(
        config,
        kit.recorded_store(&recorder),
        kit.sender(&kit.calls),
        kit.calls.clone(),
        clock.clone(),
    );
    // Two simulated seconds of 100 messages a second over 10 topics.
    for i in 0..200 {
        let id = format!("00000000-0000-4000-8000-{i:012}");
        f.handle(rule_event_with_id(
            &format!("fleet/d{}/t", i % 10),
            b"1",
            &id,
        ))
        .await
        .unwrap();
        clock.advance(std::time::Duration::from_millis(10));
    }
    let per_partition = recorder.per_partition();
    // Each message reads its own progress row, once.
    let progress: Vec<usize> = per_partition
        .iter()
        .filter(|(pk, _)| pk.starts_with("sent#"))
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(progress, vec![1; 200]);
    let lookups: BTreeMap<&String, &usize> = per_partition
        .iter()
        .filter(|(pk, _)| pk.starts_with("filter#"))
        .collect();
    for (pk, n) in &lookups {
        assert!(**n <= 2, "{pk} read {n} times in 2 s: {lookups:?}");
    }
    for pk in [
        "filter##",
        "filter#fleet/#",
        "filter#fleet/+/t",
        "filter#fleet/d1/t",
    ] {
        assert_eq!(per_partition[pk], 2, "{pk}");
    }
    // The registry: its version checked once a second, its rows read once.
    assert_eq!(per_partition["wildcards"], 3);
    assert_eq!(recorder.hottest_per_second(), Some(("wildcards".into(), 2)));
    // Each read is billed: an empty partition is still one read unit
    // (strongly consistent), an absent progress row half of one.
    let (read, write) = recorder.units();
    assert_eq!(write, 0.0);
    assert_eq!(read, (recorder.billed().len() - 200) as f64 + 200.0 * 0.5);
}

#[test]
fn the_recorder_bills_as_dynamodb_does() {
    use aws_sdk_dynamodb::types::AttributeValue;
    use support::capacity::{item_size, read_units, write_units};
    let item = std::collections::HashMap::from([
        ("pk".to_string(), AttributeValue::S("filter#a/b".into())),
        ("sk".to_string(), AttributeValue::S("conn-1".into())),
        ("ttl".to_string(), AttributeValue::N("1700000000".into())),
    ]);
    // "pk" + 10, "sk" + 6, "ttl" + (10 digits / 2 + 1)
    assert_eq!(item_size(&item), 12 + 8 + 9);
    assert_eq!(read_units(0, true), 1.0);
    assert_eq!(read_units(4096, true), 1.0);
    assert_eq!(read_units(4097, true), 2.0);
    assert_eq!(read_units(4097, false), 1.0);
    assert_eq!(write_units(1024), 1.0);
    assert_eq!(write_units(1025), 2.0);
}

#[tokio::test]
async fn gone_connections_are_removed_throttled_posts_retried_and_handed_on() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    for c in ["ok1", "gone", "slow", "ok2"] {
        subscribe(&h, c, &["t/+"]).await;
    }
    subscribe(&h, "busy", &["t/1"]).await;
    kit.standin.set_gone("gone");
    kit.standin.throttle("slow", 2);
    kit.standin.throttle("busy", 100);
    let f = kit
        .fanout(&[])
        .with_invoker(kit.invoker("iot-fanout", &kit.calls));
    let report = f.handle(rule_event("t/1", b"hello")).await.unwrap();
    assert_eq!(report.recipients, 5);
    assert_eq!(report.delivered, 3, "{report:?}");
    assert_eq!(report.gone, 1);
    assert_eq!(report.failed, 0);
    assert_eq!(
        report.handed_on, 1,
        "busy stays throttled: handed on, not lost"
    );
    let attempts = |c: &str| {
        kit.standin
            .posts()
            .iter()
            .filter(|r| r.connection().as_deref() == Some(c))
            .count()
    };
    assert_eq!(attempts("slow"), 3, "two 429s, then delivered");
    assert_eq!(attempts("busy") as u32, lambdas::sender::MAX_ATTEMPTS);
    assert_eq!(
        report.throttled,
        2 + u64::from(lambdas::sender::MAX_ATTEMPTS)
    );
    assert_eq!(attempts("ok1"), 1);
    let keys = kit.keys().await;
    assert!(!keys.iter().any(|k| k.contains("gone")), "{keys:?}");
    assert!(keys.contains(&"filter#t/+|ok1".to_string()));
    // The part handed on: busy alone, one round later.
    let parts = kit.standin.take_invocations();
    assert_eq!(parts.len(), 1);
    let part = &parts[0]["part"];
    assert_eq!(
        (
            part["key"].clone(),
            part["round"].clone(),
            part["recipients"].clone()
        ),
        (json!("0+"), json!(1), json!(["busy"]))
    );
    let invoke = kit
        .standin
        .records()
        .into_iter()
        .find(|r| r.raw_path == "/2015-03-31/functions/iot-fanout/invocations")
        .expect("an Invoke");
    assert_eq!(invoke.invocation_type.as_deref(), Some("Event"));
    // Lambda runs it once the throttling is over: busy gets the message.
    kit.standin.clear();
    kit.standin.throttle("busy", 0);
    let report = f.handle(parts[0].clone()).await.unwrap();
    assert_eq!((report.part.as_str(), report.delivered), ("0+", 1));
    assert_eq!(kit.standin.posted()[0].0, "busy");
    // The next message does not try the gone connection.
    kit.standin.clear();
    let report = f.handle(rule_event("t/1", b"again")).await.unwrap();
    assert_eq!((report.recipients, report.delivered), (4, 4));
}

#[tokio::test]
async fn oversize_and_bad_events_are_refused_with_a_reason() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    subscribe(&h, "a", &["big/#"]).await;
    let f = kit.fanout(&[]);
    // A payload within IoT Core's 128 KB whose frame is over API Gateway's 128 KB.
    let report = f
        .handle(rule_event("big/x", &vec![0xffu8; 120_000]))
        .await
        .unwrap();
    assert!(
        report.refused.as_deref().unwrap().contains("API Gateway"),
        "{report:?}"
    );
    assert_eq!(report.delivered, 0);
    // Over the configured payload limit.
    let small = kit.fanout(&[("BRIDGE_MAX_PAYLOAD_BYTES", "10")]);
    let report = small
        .handle(rule_event("big/x", b"12345678901"))
        .await
        .unwrap();
    assert!(report.refused.as_deref().unwrap().contains("limit"));
    assert!(
        kit.standin.posted().is_empty(),
        "never truncated, never posted"
    );
    // Exactly at the limit goes through.
    let report = small
        .handle(rule_event("big/x", b"1234567890"))
        .await
        .unwrap();
    assert_eq!(report.delivered, 1);

    for bad in [
        json!({"payload": "AA=="}),
        json!({"topic": "a", "payload": "!!!"}),
        json!({"topic": 5, "payload": ""}),
        json!({"topic": "a/+", "payload": ""}),
        json!("a string"),
    ] {
        let err = f.handle(bad.clone()).await.unwrap_err().to_string();
        assert!(err.contains("not a topic rule event"), "{bad}: {err}");
    }
    // Optional fields may be missing.
    let report = f
        .handle(json!({"topic": "big/y", "payload": "MQ=="}))
        .await
        .unwrap();
    assert_eq!(report.delivered, 1);
}

#[tokio::test]
async fn the_prefix_is_stripped_and_topics_outside_it_ignored() {
    let kit = Kit::new().await;
    let h = kit.handler(&[("BRIDGE_TOPIC_PREFIX", "t1")]);
    subscribe(&h, "a", &["fleet/+"]).await;
    assert!(kit
        .keys()
        .await
        .contains(&"filter#t1/fleet/+|a".to_string()));
    let f = kit.fanout(&[("BRIDGE_TOPIC_PREFIX", "t1")]);
    f.handle(rule_event("t1/fleet/d", b"1")).await.unwrap();
    assert_eq!(
        kit.standin.posted(),
        vec![(
            "a".to_string(),
            json!({"type":"message","channel":"fleet/d","data":1,"mid":RULE_ID})
        )]
    );
    kit.standin.clear();
    let report = f.handle(rule_event("fleet/d", b"1")).await.unwrap();
    assert!(report.refused.is_some());
    assert!(kit.standin.posted().is_empty());
}

#[tokio::test]
async fn expired_rows_are_ignored() {
    use aws_sdk_dynamodb::types::AttributeValue as A;
    let kit = Kit::new().await;
    let past = (now_secs() - 10).to_string();
    // A connection whose $disconnect was missed: its rows are past their TTL
    // but DynamoDB has not deleted them yet.
    for (pk, sk) in [
        ("filter#e/1", "stale"),
        ("filter#e/+", "stale"),
        ("wildcards", "f#e/+"),
    ] {
        kit.ddb
            .put_item()
            .table_name(&kit.table)
            .item("pk", A::S(pk.into()))
            .item("sk", A::S(sk.into()))
            .item("ttl", A::N(past.clone()))
            .send()
            .await
            .unwrap();
    }
    kit.ddb
        .put_item()
        .table_name(&kit.table)
        .item("pk", A::S("wildcards".into()))
        .item("sk", A::S("version".into()))
        .item("v", A::N("1".into()))
        .send()
        .await
        .unwrap();
    let f = kit.fanout(&[]);
    let report = f.handle(rule_event("e/1", b"1")).await.unwrap();
    // e/1, #, e/# and e/1/#: the expired registration of e/+ is not used.
    assert_eq!((report.filters, report.recipients), (4, 0), "{report:?}");
    // And the handler does not count them as held.
    let h = kit.handler(&[]);
    subscribe(&h, "live", &["e/+"]).await;
    let report = f.handle(rule_event("e/1", b"1")).await.unwrap();
    assert_eq!(report.recipients, 1);
    assert_eq!(kit.standin.posted()[0].0, "live");
}

#[tokio::test]
async fn posts_run_concurrently_within_the_bound() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    for i in 0..40 {
        subscribe(&h, &format!("c{i}"), &["load"]).await;
    }
    kit.standin.set_delay(Duration::from_millis(100));
    let f = kit.fanout(&[("BRIDGE_FANOUT_CONCURRENCY", "10")]);
    let started = std::time::Instant::now();
    let report = f.handle(rule_event("load", b"1")).await.unwrap();
    let took = started.elapsed();
    assert_eq!(report.delivered, 40);
    // 40 posts of 100 ms, 10 at a time: about 400 ms, far from 4 s.
    assert!(
        took >= Duration::from_millis(390),
        "{took:?}: more than 10 at once"
    );
    assert!(
        took < Duration::from_millis(2500),
        "{took:?}: not concurrent"
    );
}
