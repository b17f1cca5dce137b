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
            &json!({"type":"message","channel":"fleet/d1/t","data":{"temp":21.5}})
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
    // The topic itself plus the wildcard filters that match it: no scan, no enumeration.
    assert_eq!(report.filters, 1 + 4);

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
            &json!({"type":"message","channel":"fleet/d2/t","data":"/wA=","encoding":"base64"})
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
async fn the_registry_cache_never_misses_an_acked_filter() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    let f = kit.fanout(&[]);
    subscribe(&h, "a", &["x/+"]).await;
    f.handle(rule_event("x/1", b"1")).await.unwrap();
    assert_eq!(kit.standin.posted().len(), 1);
    // A new wildcard filter, acked: the very next message reaches it.
    subscribe(&h, "b", &["#"]).await;
    kit.standin.clear();
    f.handle(rule_event("x/2", b"2")).await.unwrap();
    assert_eq!(
        per_connection(&kit.standin.posted()),
        BTreeMap::from([("a".into(), 1), ("b".into(), 1)])
    );
    // Unchanged registry: one GetItem for its version and one Query per filter.
    let before = kit.calls.snapshot();
    let report = f.handle(rule_event("x/3", b"3")).await.unwrap();
    let after = kit.calls.snapshot();
    let delta = |op: &str| {
        after
            .get(&("DynamoDB".into(), op.into()))
            .copied()
            .unwrap_or(0)
            - before
                .get(&("DynamoDB".into(), op.into()))
                .copied()
                .unwrap_or(0)
    };
    assert_eq!(delta("GetItem"), 1);
    assert_eq!(delta("Query"), 3, "x/3, x/+ and #");
    assert_eq!(report.dynamodb_requests, 4);
    // Unsubscribed everywhere, released and re-added: seen again.
    send(&h, "b", r##"{"action":"unsubscribe","channel":"#"}"##).await;
    kit.standin.clear();
    f.handle(rule_event("x/4", b"4")).await.unwrap();
    assert_eq!(
        per_connection(&kit.standin.posted()),
        BTreeMap::from([("a".into(), 1)])
    );
    send(&h, "b", r##"{"action":"subscribe","channel":"#"}"##).await;
    kit.standin.clear();
    f.handle(rule_event("x/5", b"5")).await.unwrap();
    assert_eq!(
        per_connection(&kit.standin.posted()),
        BTreeMap::from([("a".into(), 1), ("b".into(), 1)])
    );
}

#[tokio::test]
async fn gone_connections_are_removed_throttled_posts_retried_failures_isolated() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    for c in ["ok1", "gone", "slow", "ok2"] {
        subscribe(&h, c, &["t/+"]).await;
    }
    subscribe(&h, "busy", &["t/1"]).await;
    kit.standin.set_gone("gone");
    kit.standin.throttle("slow", 2);
    kit.standin.throttle("busy", 100);
    let f = kit.fanout(&[]);
    let report = f.handle(rule_event("t/1", b"hello")).await.unwrap();
    assert_eq!(report.recipients, 5);
    assert_eq!(report.delivered, 3, "{report:?}");
    assert_eq!(report.gone, 1);
    assert_eq!(report.failed, 1, "busy stays throttled past the retries");
    let attempts = |c: &str| {
        kit.standin
            .posts()
            .iter()
            .filter(|r| r.connection().as_deref() == Some(c))
            .count()
    };
    assert_eq!(attempts("slow"), 3, "two 429s, then delivered");
    assert_eq!(attempts("busy") as u32, lambdas::sender::MAX_ATTEMPTS);
    assert_eq!(attempts("ok1"), 1);
    let keys = kit.keys().await;
    assert!(!keys.iter().any(|k| k.contains("gone")), "{keys:?}");
    assert!(keys.contains(&"filter#t/+|ok1".to_string()));
    // The next message does not try the gone connection.
    kit.standin.clear();
    kit.standin.throttle("busy", 0);
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
            json!({"type":"message","channel":"fleet/d","data":1})
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
    assert_eq!((report.filters, report.recipients), (1, 0), "{report:?}");
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
