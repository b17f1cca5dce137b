//! `ws-handler` in-process, with the event shapes API Gateway sends, against
//! moto's DynamoDB and the recording stand-in.

mod support;

use bridge::permissions::Permissions;
use serde_json::{json, Value};
use support::*;

fn code(reply: &Option<Value>) -> &str {
    reply
        .as_ref()
        .and_then(|r| r["code"].as_str())
        .unwrap_or_else(|| panic!("expected an error frame, got {reply:?}"))
}

#[tokio::test]
async fn connect_stores_permissions_and_echoes_protocol() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    let p = perms("user-1", &["fleet/+/telemetry"], &[]);
    let mut event = ws_event("$connect", "c1", None, Some(context_for(&p)));
    event["headers"]["Sec-WebSocket-Protocol"] = json!("bridge.v1, other");
    let r = handle(&h, event).await;
    assert_eq!(r.status_code, 200);
    assert_eq!(
        r.headers.get("sec-websocket-protocol").unwrap(),
        "bridge.v1"
    );
    let items = scan(&kit.ddb, &kit.table).await;
    assert_eq!(items.len(), 1);
    let meta = &items[0];
    assert_eq!(meta["pk"].as_s().unwrap(), "conn#c1");
    let stored: Permissions = serde_json::from_str(meta["perms"].as_s().unwrap()).unwrap();
    assert_eq!(stored, p);
    let ttl: i64 = meta["ttl"].as_n().unwrap().parse().unwrap();
    let now = now_secs();
    assert!(
        ttl > now + 7000 && ttl < now + 8000,
        "TTL about 2h10m ahead: {ttl}"
    );

    // Without an offered protocol, none is echoed.
    let event = ws_event("$connect", "c2", None, Some(context_for(&p)));
    let r = handle(&h, event).await;
    assert!(r.headers.get("sec-websocket-protocol").is_none());
}

#[tokio::test]
async fn connect_needs_the_authorizer_unless_auth_is_off() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    let event = ws_event("$connect", "c1", None, None);
    let r = handle(&h, event).await;
    assert_eq!(r.status_code, 403);
    // A context that is not our JSON string is refused too.
    let event = ws_event(
        "$connect",
        "c1",
        None,
        Some(json!({"permissions": {"subscribe": "all"}})),
    );
    let r = handle(&h, event).await;
    assert_eq!(r.status_code, 403);
    assert!(kit.keys().await.is_empty());

    let open = kit.handler(&[("BRIDGE_AUTH", "off")]);
    let event = ws_event("$connect", "c1", None, None);
    let r = handle(&open, event).await;
    assert_eq!(r.status_code, 200);
    let reply = send(
        &open,
        "c1",
        r#"{"action":"subscribe","channel":"any/#","id":1}"#,
    )
    .await;
    assert_eq!(reply, Some(json!({"type":"ack","id":1})));
    // Reserved channels still need the deployment to name them.
    let reply = send(
        &open,
        "c1",
        r#"{"action":"subscribe","channel":"$SYS/#","id":2}"#,
    )
    .await;
    assert_eq!(code(&reply), "invalid_channel");
}

#[tokio::test]
async fn every_bad_frame_gets_its_error_and_changes_nothing() {
    let kit = Kit::new().await;
    let h = kit.handler(&[("BRIDGE_MAX_SUBSCRIPTIONS", "2")]);
    let p = perms(
        "u",
        &["fleet/+/telemetry", "a/#", "b", "c"],
        &["fleet/+/commands"],
    );
    connect(&h, "c1", &p).await;
    send(&h, "c1", r#"{"action":"subscribe","channel":"a/#"}"#).await;
    send(&h, "c1", r#"{"action":"subscribe","channel":"b"}"#).await;
    let before = kit.keys().await;
    kit.standin.clear();
    let big = format!(
        r#"{{"action":"publish","channel":"fleet/d/commands","data":"{}","id":9}}"#,
        "x".repeat(131_073)
    );
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "bad_request"),
        ("[1,2]".into(), "bad_request"),
        ("42".into(), "bad_request"),
        ("".into(), "bad_request"),
        (r#"{"channel":"a"}"#.into(), "bad_request"),
        (r#"{"action":"dance","id":"x"}"#.into(), "bad_request"),
        (r#"{"action":"subscribe"}"#.into(), "bad_request"),
        (
            r#"{"action":"subscribe","channel":5}"#.into(),
            "bad_request",
        ),
        (
            r#"{"action":"subscribe","channel":"a/x","retained":"yes"}"#.into(),
            "bad_request",
        ),
        (
            r#"{"action":"publish","channel":"fleet/d/commands"}"#.into(),
            "bad_request",
        ),
        (
            r#"{"action":"publish","channel":"fleet/d/commands","data":1,"qos":2}"#.into(),
            "bad_request",
        ),
        (
            r#"{"action":"publish","channel":"fleet/d/commands","data":1,"retain":1}"#.into(),
            "bad_request",
        ),
        (
            r#"{"action":"publish","channel":"fleet/d/commands","data":1,"encoding":"hex"}"#.into(),
            "bad_request",
        ),
        (
            r#"{"action":"publish","channel":"fleet/d/commands","data":1,"encoding":"text"}"#
                .into(),
            "bad_request",
        ),
        (
            r#"{"action":"publish","channel":"fleet/d/commands","data":"!!","encoding":"base64"}"#
                .into(),
            "bad_request",
        ),
        (r#"{"action":"ping","id":1.5}"#.into(), "bad_request"),
        (
            format!(r#"{{"action":"ping","id":"{}"}}"#, "x".repeat(65)),
            "bad_request",
        ),
        (
            r#"{"action":"publish","channel":"fleet/+/commands","data":1,"id":2}"#.into(),
            "invalid_channel",
        ),
        (
            r#"{"action":"subscribe","channel":"a/#/b"}"#.into(),
            "invalid_channel",
        ),
        (
            r#"{"action":"subscribe","channel":""}"#.into(),
            "invalid_channel",
        ),
        (
            r#"{"action":"subscribe","channel":"a\u0000b"}"#.into(),
            "invalid_channel",
        ),
        (
            r#"{"action":"subscribe","channel":"1/2/3/4/5/6/7/8/9"}"#.into(),
            "invalid_channel",
        ),
        (
            format!(
                r#"{{"action":"subscribe","channel":"{}"}}"#,
                "x".repeat(257)
            ),
            "invalid_channel",
        ),
        (
            r#"{"action":"subscribe","channel":"$aws/things/x"}"#.into(),
            "invalid_channel",
        ),
        (
            r#"{"action":"subscribe","channel":"fleet/#","id":3}"#.into(),
            "forbidden",
        ),
        (
            r##"{"action":"subscribe","channel":"#"}"##.into(),
            "forbidden",
        ),
        (
            r#"{"action":"publish","channel":"fleet/d/telemetry","data":1}"#.into(),
            "forbidden",
        ),
        (
            r#"{"action":"subscribe","channel":"c"}"#.into(),
            "too_many_subscriptions",
        ),
        (big, "too_large"),
    ];
    for (frame, expected) in &cases {
        let reply = send(&h, "c1", frame).await;
        assert_eq!(code(&reply), *expected, "{frame:.80}");
        assert!(reply.as_ref().unwrap()["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // Errors echo a valid id.
    let reply = send(
        &h,
        "c1",
        r#"{"action":"subscribe","channel":"fleet/#","id":"s7"}"#,
    )
    .await
    .unwrap();
    assert_eq!(reply["id"], "s7");
    // A binary frame (API Gateway passes it base64-encoded).
    let mut event = ws_event("$default", "c1", Some("AAEC"), None);
    event["isBase64Encoded"] = json!(true);
    let r = handle(&h, event).await;
    let reply = body(&r).expect("an error frame");
    assert_eq!(reply["code"], "bad_request");
    // A message event without a body.
    let event = ws_event("$default", "c1", None, None);
    let r = handle(&h, event).await;
    assert_eq!(r.status_code, 200);

    assert_eq!(kit.keys().await, before, "bad frames change nothing");
    assert!(kit.standin.records().is_empty(), "bad frames call no API");
}

#[tokio::test]
async fn subscribe_unsubscribe_and_disconnect_keep_the_table_exact() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    connect(&h, "c1", &Permissions::allow_all()).await;
    for (frame, reply) in [
        (
            r#"{"action":"subscribe","channel":"fleet/+/t","id":1}"#,
            Some(json!({"type":"ack","id":1})),
        ),
        (
            r#"{"action":"subscribe","channel":"fleet/d1/t","id":"two"}"#,
            Some(json!({"type":"ack","id":"two"})),
        ),
        (
            r#"{"action":"subscribe","channel":"fleet/+/t","id":3}"#,
            Some(json!({"type":"ack","id":3})),
        ),
        (r#"{"action":"subscribe","channel":"x/#"}"#, None),
    ] {
        assert_eq!(send(&h, "c1", frame).await, reply, "{frame}");
    }
    assert_eq!(
        kit.keys().await,
        vec![
            "conn#c1|meta",
            "conn#c1|sub#fleet/+/t",
            "conn#c1|sub#fleet/d1/t",
            "conn#c1|sub#x/#",
            "filter#fleet/+/t|c1",
            "filter#fleet/d1/t|c1",
            "filter#x/#|c1",
            // Only `+` filters are registered: x/# is found as an ancestor.
            "wildcards|f#fleet/+/t",
            "wildcards|version",
        ]
    );
    let items = scan(&kit.ddb, &kit.table).await;
    let meta = items
        .iter()
        .find(|i| i["sk"].as_s().unwrap() == "meta")
        .unwrap();
    assert_eq!(meta["n"].as_n().unwrap(), "3");

    let reply = send(
        &h,
        "c1",
        r#"{"action":"unsubscribe","channel":"fleet/+/t","id":4}"#,
    )
    .await;
    assert_eq!(reply, Some(json!({"type":"ack","id":4})));
    // Not held: still an ack.
    let reply = send(
        &h,
        "c1",
        r#"{"action":"unsubscribe","channel":"nope/#","id":5}"#,
    )
    .await;
    assert_eq!(reply, Some(json!({"type":"ack","id":5})));
    assert_eq!(
        kit.keys().await,
        vec![
            "conn#c1|meta",
            "conn#c1|sub#fleet/d1/t",
            "conn#c1|sub#x/#",
            "filter#fleet/d1/t|c1",
            "filter#x/#|c1",
            "wildcards|version",
        ],
        "the unused wildcard left the registry"
    );

    // A second connection keeps x/+ registered when the first goes.
    send(&h, "c1", r#"{"action":"subscribe","channel":"x/+"}"#).await;
    connect(&h, "c2", &Permissions::allow_all()).await;
    send(&h, "c2", r#"{"action":"subscribe","channel":"x/+"}"#).await;
    let r = handle(&h, ws_event("$disconnect", "c1", None, None)).await;
    assert_eq!(r.status_code, 200);
    assert_eq!(
        kit.keys().await,
        vec![
            "conn#c2|meta",
            "conn#c2|sub#x/+",
            "filter#x/+|c2",
            "wildcards|f#x/+",
            "wildcards|version",
        ]
    );
    // A frame from a disconnected connection changes nothing.
    let reply = send(&h, "c1", r#"{"action":"subscribe","channel":"y","id":6}"#).await;
    assert_eq!(code(&reply), "unavailable");
    let r = handle(&h, ws_event("$disconnect", "c2", None, None)).await;
    assert_eq!(r.status_code, 200);
    assert_eq!(kit.keys().await, vec!["wildcards|version"]);
}

#[tokio::test]
async fn a_subscribe_racing_a_disconnect_leaves_no_orphans() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    // Started together, the disconnect's DeleteItem reaches the table before
    // any subscribe's transaction, so every subscribe loses and "no orphans"
    // would be trivial. The disconnect starts later each round (0 to 30 ms),
    // moving its delete across the subscribes: none, some, then all of them
    // commit first and leave rows for the disconnect to clean.
    let mut acks = 0;
    for round in 0..16u64 {
        let id = format!("r{round}");
        let delay = std::time::Duration::from_millis(2 * round);
        connect(&h, &id, &Permissions::allow_all()).await;
        let frames: Vec<String> = (0..4)
            .map(|i| format!(r#"{{"action":"subscribe","channel":"race/{i}/+","id":{i}}}"#))
            .collect();
        let disconnect = async {
            tokio::time::sleep(delay).await;
            handle(&h, ws_event("$disconnect", &id, None, None)).await
        };
        let subs = futures_util::future::join_all(frames.iter().map(|f| send(&h, &id, f)));
        let (replies, d) = tokio::join!(subs, disconnect);
        assert_eq!(d.status_code, 200);
        for r in replies.into_iter().flatten() {
            assert!(r["type"] == "ack" || r["code"] == "unavailable", "{r}");
            if r["type"] == "ack" {
                acks += 1;
            }
        }
        // Whatever won, nothing of the connection is left once both ended:
        // a subscribe that committed before the disconnect's read is cleaned
        // by it; one after it fails. Either way: no rows.
        let left: Vec<String> = kit
            .keys()
            .await
            .into_iter()
            .filter(|k| k.contains(&id))
            .collect();
        assert!(left.is_empty(), "orphans after round {round}: {left:?}");
    }
    assert!(acks > 0, "no subscribe won a race in 16 rounds");
}

#[tokio::test]
async fn subscription_limit_holds_under_concurrent_frames() {
    let kit = Kit::new().await;
    let h = kit.handler(&[("BRIDGE_MAX_SUBSCRIPTIONS", "3")]);
    connect(&h, "c1", &Permissions::allow_all()).await;
    let frames: Vec<String> = (0..8)
        .map(|i| format!(r#"{{"action":"subscribe","channel":"lim/{i}","id":{i}}}"#))
        .collect();
    let replies = futures_util::future::join_all(frames.iter().map(|f| send(&h, "c1", f))).await;
    let acks = replies
        .iter()
        .flatten()
        .filter(|r| r["type"] == "ack")
        .count();
    assert_eq!(acks, 3, "{replies:?}");
    for r in replies.iter().flatten().filter(|r| r["type"] == "error") {
        assert_eq!(r["code"], "too_many_subscriptions");
    }
    let subs = kit
        .keys()
        .await
        .iter()
        .filter(|k| k.starts_with("conn#c1|sub#"))
        .count();
    assert_eq!(subs, 3);
}

#[tokio::test]
async fn publish_goes_to_iot_with_qos_retain_and_the_encoded_payload() {
    let kit = Kit::new().await;
    let h = kit.handler(&[("BRIDGE_TOPIC_PREFIX", "tenant-a")]);
    connect(&h, "c1", &perms("u", &[], &["fleet/+/commands"])).await;
    let reply = send(
        &h,
        "c1",
        r#"{"action":"publish","channel":"fleet/dev-7/commands","data":{ "reboot" : true },"id":"c1"}"#,
    )
    .await;
    assert_eq!(reply, Some(json!({"type":"ack","id":"c1"})));
    send(&h, "c1", r#"{"action":"publish","channel":"fleet/d/commands","data":"h\u00e9","encoding":"text","qos":0,"retain":true}"#).await;
    send(&h, "c1", r#"{"action":"publish","channel":"fleet/d/commands","data":"AAEC/w==","encoding":"base64","id":3}"#).await;
    let p = kit.standin.publishes();
    assert_eq!(p.len(), 3);
    assert_eq!(p[0].topic().unwrap(), "tenant-a/fleet/dev-7/commands");
    assert_eq!(p[0].body, br#"{"reboot":true}"#);
    assert_eq!(p[0].query_param("qos").as_deref(), Some("1"));
    assert_ne!(p[0].query_param("retain").as_deref(), Some("true"));
    assert_eq!(p[1].body, "hé".as_bytes());
    assert_eq!(p[1].query_param("qos").as_deref(), Some("0"));
    assert_eq!(p[1].query_param("retain").as_deref(), Some("true"));
    assert_eq!(p[2].body, vec![0, 1, 2, 255]);

    // IoT Core failures become protocol errors; the connection stays.
    // (The SDK retries throttling and server errors itself: three tries.)
    for (statuses, expected) in [
        (&[503u16, 503, 503][..], "unavailable"),
        (&[429, 429, 429][..], "unavailable"),
        (&[413][..], "too_large"),
        (&[403][..], "internal"),
    ] {
        kit.standin.fail_publishes(statuses);
        let reply = send(
            &h,
            "c1",
            r#"{"action":"publish","channel":"fleet/d/commands","data":1,"id":9}"#,
        )
        .await;
        assert_eq!(code(&reply), expected, "{statuses:?}");
        assert_eq!(reply.unwrap()["id"], 9);
    }
    // A throttled try that succeeds on retry is acked.
    kit.standin.fail_publishes(&[429]);
    let reply = send(
        &h,
        "c1",
        r#"{"action":"publish","channel":"fleet/d/commands","data":1,"id":10}"#,
    )
    .await;
    assert_eq!(reply, Some(json!({"type":"ack","id":10})));
}

#[tokio::test]
async fn retained_replay_reads_iot_and_posts_before_the_ack() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    kit.standin
        .set_retained("fleet/d1/status", br#"{"up":true}"#);
    kit.standin.set_retained("fleet/d2/status", b"down");
    kit.standin.set_retained("fleet/d2/other", b"x");
    kit.standin.set_retained("$aws/things/t", b"reserved");
    connect(&h, "c1", &Permissions::allow_all()).await;

    let reply = send(
        &h,
        "c1",
        r#"{"action":"subscribe","channel":"fleet/d1/status","retained":true,"id":1}"#,
    )
    .await;
    assert_eq!(reply, Some(json!({"type":"ack","id":1})));
    assert_eq!(
        kit.standin.posted(),
        vec![(
            "c1".to_string(),
            json!({"type":"message","channel":"fleet/d1/status","data":{"up":true},"retained":true})
        )]
    );
    kit.standin.clear();
    let reply = send(
        &h,
        "c1",
        r#"{"action":"subscribe","channel":"+/+/status","retained":true,"id":2}"#,
    )
    .await;
    assert_eq!(reply, Some(json!({"type":"ack","id":2})));
    let mut posted = kit.standin.posted();
    posted.sort_by_key(|(_, f)| f["channel"].as_str().unwrap().to_string());
    assert_eq!(
        posted,
        vec![
            (
                "c1".to_string(),
                json!({"type":"message","channel":"fleet/d1/status","data":{"up":true},"retained":true})
            ),
            (
                "c1".to_string(),
                json!({"type":"message","channel":"fleet/d2/status","data":"down","encoding":"text","retained":true})
            ),
        ]
    );
    let listed = kit.standin.retained_listings();
    assert_eq!(listed, 1);
    // IoT Core unavailable: the subscribe fails with the request's id and is undone.
    let before = kit.keys().await;
    kit.standin.fail_publishes(&[503, 503, 503]);
    let reply = send(
        &h,
        "c1",
        r#"{"action":"subscribe","channel":"q/+","retained":true,"id":"r"}"#,
    )
    .await;
    assert_eq!(code(&reply), "unavailable");
    assert_eq!(reply.unwrap()["id"], "r");
    assert_eq!(kit.keys().await, before);
    // Without retained: true nothing is replayed; no retained message is fine.
    kit.standin.clear();
    let reply = send(
        &h,
        "c1",
        r#"{"action":"subscribe","channel":"fleet/#","id":3}"#,
    )
    .await;
    assert_eq!(reply, Some(json!({"type":"ack","id":3})));
    let reply = send(
        &h,
        "c1",
        r#"{"action":"subscribe","channel":"none/here","retained":true,"id":4}"#,
    )
    .await;
    assert_eq!(reply, Some(json!({"type":"ack","id":4})));
    assert!(kit.standin.posted().is_empty());
}

#[tokio::test]
async fn retained_messages_over_the_limits_are_skipped_not_truncated() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    // Within the payload limit, but its base64 frame is over API Gateway's 128 KB.
    kit.standin.set_retained("big/x", &vec![0xffu8; 120_000]);
    kit.standin.set_retained("big/y", b"small");
    connect(&h, "c1", &Permissions::allow_all()).await;
    let reply = send(
        &h,
        "c1",
        r#"{"action":"subscribe","channel":"big/+","retained":true,"id":1}"#,
    )
    .await;
    assert_eq!(reply, Some(json!({"type":"ack","id":1})));
    assert_eq!(
        kit.standin.posted(),
        vec![(
            "c1".to_string(),
            json!({"type":"message","channel":"big/y","data":"small","encoding":"text","retained":true})
        )]
    );
    // A retained message over the payload limit is not delivered either.
    kit.standin.clear();
    let strict = kit.handler(&[("BRIDGE_MAX_PAYLOAD_BYTES", "4")]);
    connect(&strict, "c2", &Permissions::allow_all()).await;
    let reply = send(
        &strict,
        "c2",
        r#"{"action":"subscribe","channel":"big/y","retained":true,"id":2}"#,
    )
    .await;
    assert_eq!(reply, Some(json!({"type":"ack","id":2})));
    assert!(kit.standin.posted().is_empty());
}

/// Subscribes a new connection to `channel` with `retained: true`: the reply.
async fn replay(h: &lambdas::handler::Handler, conn: &str, channel: &str) -> Value {
    connect(h, conn, &Permissions::allow_all()).await;
    let frame = format!(r#"{{"action":"subscribe","channel":"{channel}","retained":true,"id":1}}"#);
    send(h, conn, &frame).await.expect("a reply")
}

#[tokio::test]
async fn retained_replay_is_bounded_in_count_bytes_and_pages_and_says_what_it_left_out() {
    let kit = Kit::new().await;
    let posted_to = |conn: &str| -> Vec<Value> {
        kit.standin
            .posted()
            .into_iter()
            .filter(|(c, _)| c == conn)
            .map(|(_, f)| f)
            .collect()
    };
    // Count: at most BRIDGE_MAX_RETAINED, the first in topic order, then
    // `lagged` for the rest, then the ack.
    for i in 0..5 {
        kit.standin
            .set_retained(&format!("count/{i}"), format!("{i}").as_bytes());
    }
    let h = kit.handler(&[("BRIDGE_MAX_RETAINED", "3")]);
    let reply = replay(&h, "c1", "count/+").await;
    assert_eq!(reply, json!({"type":"ack","id":1}));
    let posts = posted_to("c1");
    assert_eq!(posts.len(), 4, "{posts:?}");
    let mut channels: Vec<&str> = posts[..3]
        .iter()
        .map(|f| f["channel"].as_str().unwrap())
        .collect();
    channels.sort();
    assert_eq!(channels, ["count/0", "count/1", "count/2"]);
    assert_eq!(posts[3], json!({"type":"lagged","dropped":2}));

    // Bytes: at most 1 MiB of payloads.
    let big = "x".repeat(100_000);
    for i in 0..12 {
        kit.standin
            .set_retained(&format!("bytes/{i:02}"), big.as_bytes());
    }
    let h = kit.handler(&[]);
    let reply = replay(&h, "c2", "bytes/#").await;
    assert_eq!(reply, json!({"type":"ack","id":1}));
    let posts = posted_to("c2");
    assert_eq!(posts.len(), 11, "10 messages of 100 KB, then lagged");
    assert_eq!(posts[10], json!({"type":"lagged","dropped":2}));

    // Pages: a filter that matches nothing in the first 25 pages (5,000
    // topics) of the account's list gets no replay, one `lagged`, the ack.
    for i in 0..5_200 {
        kit.standin.set_retained(&format!("a/{i:05}"), b"1");
    }
    kit.standin.set_retained("zz/1", b"late");
    kit.standin.clear();
    let reply = replay(&h, "c3", "zz/+").await;
    assert_eq!(reply, json!({"type":"ack","id":1}));
    assert_eq!(posted_to("c3"), [json!({"type":"lagged","dropped":1})]);
    let listed = kit.standin.retained_listings();
    assert_eq!(listed, 25);
    // The subscription itself holds: the next live message reaches it.
    assert!(kit.keys().await.contains(&"filter#zz/+|c3".to_string()));
}

#[tokio::test]
async fn retained_listing_stops_at_the_time_bound() {
    let kit = Kit::new().await;
    for i in 0..1_000 {
        kit.standin.set_retained(&format!("t/{i:04}"), b"1");
    }
    kit.standin
        .set_retained_delay(std::time::Duration::from_millis(100));
    let sdk = sdk(&kit.standin.url);
    let iot = lambdas::iot::Iot::new(lambdas::aws::iot_data(&sdk, &kit.calls));
    let mut limits = lambdas::iot::RetainedLimits::with_messages(10_000);
    limits.time = std::time::Duration::from_millis(250);
    let budget = lambdas::budget::Budget::unlimited().at_most(limits.time);
    let found = iot
        .retained_matching("t/+", &limits, &budget)
        .await
        .unwrap();
    assert!(found.listing_cut);
    assert!(found.messages.is_empty(), "no fetch starts after the bound");
    let listed = kit.standin.retained_listings();
    // Pages take 100 ms each: two or three start within 250 ms, never all five.
    assert!((2..=3).contains(&listed), "{listed} pages listed");
    assert_eq!(
        found.skipped,
        200 * listed,
        "the topics listed but not fetched"
    );
}

#[tokio::test]
async fn ping_needs_no_state() {
    // With auth off; with auth on, the token's end in the authorizer context
    // decides (tests/token_lifetime.rs).
    let kit = Kit::new().await;
    let h = kit.handler(&[("BRIDGE_AUTH", "off")]);
    let before = kit.calls.total("DynamoDB");
    assert_eq!(
        send(&h, "never-connected", r#"{"action":"ping","id":9}"#).await,
        Some(json!({"type":"pong","id":9}))
    );
    assert_eq!(
        send(&h, "x", r#"{"action":"ping"}"#).await,
        Some(json!({"type":"pong"}))
    );
    assert_eq!(kit.calls.total("DynamoDB"), before);
}

#[tokio::test]
async fn events_from_the_crate_fixtures_parse_and_are_handled() {
    let kit = Kit::new().await;
    let h = kit.handler(&[("BRIDGE_AUTH", "off")]);
    // aws_lambda_events' own fixture for $disconnect.
    let disconnect = json!({
      "headers": {"Host": "abcd1234.execute-api.us-east-1.amazonaws.com", "x-api-key": "", "X-Forwarded-For": "", "x-restapi": ""},
      "multiValueHeaders": {"Host": ["abcd1234.execute-api.us-east-1.amazonaws.com"], "x-api-key": [""], "X-Forwarded-For": [""], "x-restapi": [""]},
      "requestContext": {"routeKey": "$disconnect", "disconnectStatusCode": 1005, "eventType": "DISCONNECT",
        "extendedRequestId": "ABCD1234=", "requestTime": "09/Feb/2024:18:23:28 +0000", "messageDirection": "IN",
        "disconnectReason": "Client-side close frame status not set", "stage": "prod", "connectedAt": 1707503007396i64,
        "requestTimeEpoch": 1707503008941i64, "identity": {"sourceIp": "192.0.2.1"}, "requestId": "ABCD1234=",
        "domainName": "abcd1234.execute-api.us-east-1.amazonaws.com", "connectionId": "AAAA1234=", "apiId": "abcd1234"},
      "isBase64Encoded": false
    });
    connect(&h, "AAAA1234=", &Permissions::allow_all()).await;
    send(&h, "AAAA1234=", r#"{"action":"subscribe","channel":"a/+"}"#).await;
    let r = handle(&h, disconnect).await;
    assert_eq!(r.status_code, 200);
    assert_eq!(kit.keys().await, vec!["wildcards|version"]);
    // An event without a connection id is an error, not a panic.
    let mut e = ws_event("$default", "x", Some("{}"), None);
    e["requestContext"]
        .as_object_mut()
        .unwrap()
        .remove("connectionId");
    assert!(h.handle(serde_json::from_value(e).unwrap()).await.is_err());
}
