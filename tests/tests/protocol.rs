//! Every rule and error code of PROTOCOL.md, over a real WebSocket, against
//! the embedded broker, a real Mosquitto, RabbitMQ, and the AWS deployment
//! (aws-local) where the rule holds there (its differences are in
//! aws_local.rs). After every error the connection must keep working.

use base64::Engine;
use serde_json::{json, Value};
use tests::{
    all_backends, all_backends_and_aws, both_backends, both_backends_and_aws, Backend, Client,
    Frame, Opts, Setup, QUIET,
};

all_backends_and_aws!(ping_and_ids, |s: Setup| async move {
    let mut c = s.client().await;
    c.send(json!({"action":"ping"})).await;
    assert_eq!(c.next_json().await, json!({"type":"pong"}));
    c.send(json!({"action":"ping","id":"abc"})).await;
    assert_eq!(c.next_json().await, json!({"type":"pong","id":"abc"}));
    c.send(json!({"action":"ping","id":-7})).await;
    assert_eq!(c.next_json().await, json!({"type":"pong","id":-7}));
    let max = "é".repeat(64);
    c.send(json!({"action":"ping","id":max})).await;
    assert_eq!(c.next_json().await, json!({"type":"pong","id":max}));
    // Ids are echoed as given on acks too.
    c.send(json!({"action":"subscribe","channel":"a/b","id":"s-1"}))
        .await;
    assert_eq!(c.next_json().await, json!({"type":"ack","id":"s-1"}));
    c.send(json!({"action":"subscribe","channel":"a/c","id":18446744073709551615u64}))
        .await;
    assert_eq!(
        c.next_json().await,
        json!({"type":"ack","id":18446744073709551615u64})
    );
    // A request without id takes effect without an ack.
    c.send(json!({"action":"subscribe","channel":"a/d"})).await;
    c.expect_silence().await;
});

async fn bad(c: &mut Client, text: &str) {
    c.send_text(text).await;
    let reply = c.next_json().await;
    assert_eq!(reply["type"], "error", "{text} -> {reply}");
    assert_eq!(reply["code"], "bad_request", "{text} -> {reply}");
    c.assert_alive().await;
}

all_backends_and_aws!(bad_requests, |s: Setup| async move {
    let mut c = s.client().await;
    for text in [
        "not json",
        "{\"action\":",
        "[1,2,3]",
        "\"subscribe\"",
        "42",
        "null",
        r#"{"channel":"a"}"#,
        r#"{"action":"dance","channel":"a"}"#,
        r#"{"action":7}"#,
        r#"{"action":"subscribe"}"#,
        r#"{"action":"subscribe","channel":7}"#,
        r#"{"action":"subscribe","channel":"a","retained":"yes"}"#,
        r#"{"action":"subscribe","channel":"a","retained":null}"#,
        r#"{"action":"unsubscribe"}"#,
        r#"{"action":"publish","channel":"a"}"#,
        r#"{"action":"publish","data":1}"#,
        r#"{"action":"publish","channel":"a","data":1,"qos":2}"#,
        r#"{"action":"publish","channel":"a","data":1,"qos":-1}"#,
        r#"{"action":"publish","channel":"a","data":1,"qos":"1"}"#,
        r#"{"action":"publish","channel":"a","data":1,"qos":0.5}"#,
        r#"{"action":"publish","channel":"a","data":1,"retain":"true"}"#,
        r#"{"action":"publish","channel":"a","data":1,"retain":1}"#,
        r#"{"action":"publish","channel":"a","data":1,"encoding":"hex"}"#,
        r#"{"action":"publish","channel":"a","data":1,"encoding":7}"#,
        r#"{"action":"publish","channel":"a","data":{"x":1},"encoding":"text"}"#,
        r#"{"action":"publish","channel":"a","data":12,"encoding":"base64"}"#,
        r#"{"action":"publish","channel":"a","data":"not base64!","encoding":"base64"}"#,
        r#"{"action":"publish","channel":"a","data":[1e999]}"#,
        r#"{"action":"ping","id":1.5}"#,
        r#"{"action":"ping","id":null}"#,
        r#"{"action":"ping","id":true}"#,
        r#"{"action":"ping","id":[1]}"#,
    ] {
        bad(&mut c, text).await;
    }
    let long_id = format!(r#"{{"action":"ping","id":"{}"}}"#, "x".repeat(65));
    bad(&mut c, &long_id).await;
    if s.backend == Backend::AwsLocal {
        return; // API Gateway closes on binary frames: aws_local.rs
    }
    // Binary frames are refused with an error, the connection stays.
    c.send_binary(vec![1, 2, 3]).await;
    let reply = c.next_json().await;
    assert_eq!(reply["code"], "bad_request", "{reply}");
    c.assert_alive().await;
});

all_backends_and_aws!(errors_echo_a_valid_id, |s: Setup| async move {
    let mut c = s.client().await;
    c.send_text(r#"{"action":"dance","id":"d1"}"#).await;
    let reply = c.next_json().await;
    assert_eq!(
        (reply["code"].as_str(), reply["id"].as_str()),
        (Some("bad_request"), Some("d1"))
    );
    c.send_text(r#"{"action":"publish","channel":"a/+","data":1,"id":2}"#)
        .await;
    let reply = c.next_json().await;
    assert_eq!(reply["code"], "invalid_channel");
    assert_eq!(reply["id"], 2);
    // An invalid id cannot be echoed.
    c.send_text(r#"{"action":"ping","id":{"a":1}}"#).await;
    let reply = c.next_json().await;
    assert_eq!(reply["code"], "bad_request");
    assert!(reply.get("id").is_none(), "{reply}");
});

// Not on RabbitMQ: the test checks the exact limits (256 bytes, 8 levels), and
// a RabbitMQ setup's topic prefix (the tests share one node) counts against them.
both_backends_and_aws!(invalid_channels, |s: Setup| async move {
    let mut c = s.client().await;
    let too_long = "x".repeat(257);
    let cases: Vec<Value> = vec![
        json!({"action":"publish","channel":"fleet/+/commands","data":1}),
        json!({"action":"publish","channel":"fleet/#","data":1}),
        json!({"action":"publish","channel":"","data":1}),
        json!({"action":"publish","channel":"a\u{0}b","data":1}),
        json!({"action":"publish","channel":too_long,"data":1}),
        json!({"action":"publish","channel":"1/2/3/4/5/6/7/8/9","data":1}),
        json!({"action":"subscribe","channel":"a/#/b"}),
        json!({"action":"subscribe","channel":"a/b#"}),
        json!({"action":"subscribe","channel":"a+/b"}),
        json!({"action":"subscribe","channel":""}),
        json!({"action":"subscribe","channel":"1/2/3/4/5/6/7/8/#"}),
        json!({"action":"subscribe","channel":too_long}),
        json!({"action":"unsubscribe","channel":"#/a"}),
        // Reserved names are refused unless the deployment names them.
        json!({"action":"subscribe","channel":"$SYS/#"}),
        json!({"action":"subscribe","channel":"$aws/things/x/shadow/update"}),
        json!({"action":"publish","channel":"$aws/things/x/shadow/update","data":1}),
    ];
    for case in cases {
        c.expect_error(case, "invalid_channel").await;
        c.assert_alive().await;
    }
    // The limits themselves are fine: 256 bytes, 8 levels.
    c.subscribe(&"y".repeat(256)).await;
    c.subscribe("1/2/3/4/5/6/7/8").await;
    c.subscribe("1/2/3/4/5/6/7/#").await;
});

// Not on RabbitMQ: its tests share one node, each under a topic prefix, and
// under a prefix a `$` channel is no longer a `$` topic at the broker. On AWS
// the deployment names them too (ReservedChannels), and its topic rule's
// filter (TopicFilter, `#` by default, which no `$` topic matches) must cover
// them for device messages to reach web clients.
both_backends_and_aws!(
    reserved_channels_named_by_the_deployment,
    Opts::default()
        .args(["--reserved-channel", "$app/#"])
        .aws_args([
            "--parameter",
            "ReservedChannels=$app/#",
            "--parameter",
            "TopicFilter=$app/#",
        ]),
    |s: Setup| async move {
        let mut c = s.client().await;
        c.subscribe("$app/#").await;
        c.expect_error(
            json!({"action":"subscribe","channel":"$aws/x"}),
            "invalid_channel",
        )
        .await;
        // `#` never matches `$` topics, so a `$` message reaches only `$app/#`.
        let mut other = s.client().await;
        other.subscribe("#").await;
        let mut dev = s.device("d").await;
        dev.publish("$app/test", "1", 1, false).await;
        assert_eq!(c.next_message().await["channel"], "$app/test");
        other.expect_silence().await;
        // And a web client may publish there.
        c.publish("$app/web", json!(2)).await;
        assert_eq!(c.next_message().await["channel"], "$app/web");
    }
);

// Not on AWS: the limits are bridge flags and it reads /metrics; AWS's own
// limits are in aws_local.rs.
// Not on RabbitMQ: the retained part replays `big/r/+`, and RabbitMQ does not
// send retained messages to a filter with a wildcard (documented,
// https://www.rabbitmq.com/mqtt.html#retained).
both_backends!(
    too_large,
    Opts::default().args([
        "--max-frame-bytes",
        "4096",
        "--max-payload-bytes",
        "1000",
        "--hard-frame-bytes",
        "65536"
    ]),
    |s: Setup| async move {
        let mut c = s.client().await;
        let mut dev = s.device("d").await;
        dev.subscribe("big/#").await;
        // Over the frame limit: error, connection stays.
        let pad = "x".repeat(5000);
        c.send_text(&format!(r#"{{"action":"ping","id":"p","pad":"{pad}"}}"#))
            .await;
        let reply = c.next_json().await;
        assert_eq!(
            (reply["code"].as_str(), reply["id"].as_str()),
            (Some("too_large"), Some("p")),
            "{reply}"
        );
        c.assert_alive().await;
        // Decoded payload over the limit (the frame itself is small enough).
        let data = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 1001]);
        c.expect_error(
            json!({"action":"publish","channel":"big/a","data":data,"encoding":"base64"}),
            "too_large",
        )
        .await;
        let text = "t".repeat(1001);
        c.expect_error(
            json!({"action":"publish","channel":"big/a","data":text,"encoding":"text"}),
            "too_large",
        )
        .await;
        dev.expect_silence().await;
        // Exactly at the limit is fine.
        let data = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 1000]);
        let reply = c
            .request(json!({"action":"publish","channel":"big/a","data":data,"encoding":"base64"}))
            .await;
        assert_eq!(reply["type"], "ack", "{reply}");
        assert_eq!(dev.next_publish().await.payload.len(), 1000);
        // A device message over the payload limit is not delivered (and counted).
        c.subscribe("big/#").await;
        dev.publish("big/b", vec![1u8; 2000], 1, false).await;
        dev.next_publish().await;
        c.expect_silence().await;
        let too_large = "bridge_messages_dropped_total{reason=\"too_large\"}";
        assert_eq!(s.bridge.metric(too_large).await, 1.0);
        // Nor is a retained one, live or replayed; the others still are.
        dev.publish("big/r/large", vec![1u8; 2000], 1, true).await;
        dev.next_publish().await;
        dev.publish("big/r/small", "ok", 1, true).await;
        dev.next_publish().await;
        assert_eq!(c.next_message().await["channel"], "big/r/small");
        let mut late = s.client().await;
        late.send(json!({"action":"subscribe","channel":"big/r/+","retained":true,"id":"r"}))
            .await;
        assert_eq!(
            late.next_json().await,
            json!({"type":"message","channel":"big/r/small","data":"ok","encoding":"text","retained":true})
        );
        assert_eq!(late.next_json().await, json!({"type":"ack","id":"r"}));
        assert_eq!(s.bridge.metric(too_large).await, 3.0);
        // Over the hard cap: closed with 1009.
        let huge = "z".repeat(70_000);
        c.send_text(&format!(r#"{{"action":"ping","pad":"{huge}"}}"#))
            .await;
        assert_eq!(c.expect_close().await, Some(1009));
    }
);

// Not on AWS: API Gateway closes at 32 KB frames (aws_local.rs).
all_backends!(default_limits, |s: Setup| async move {
    // Defaults: 128 KiB frames and payloads answered, 1 MiB hard cap.
    let mut c = s.client().await;
    let pad = "x".repeat(128 * 1024 + 10);
    c.send_text(&format!(r#"{{"action":"ping","id":1,"pad":"{pad}"}}"#))
        .await;
    assert_eq!(c.next_json().await["code"], "too_large");
    c.assert_alive().await;
    let pad = "x".repeat(1024 * 1024 + 10);
    c.send_text(&format!(r#"{{"action":"ping","pad":"{pad}"}}"#))
        .await;
    assert_eq!(c.expect_close().await, Some(1009));
});

all_backends_and_aws!(
    subscription_limit,
    Opts::default()
        .args(["--max-subscriptions", "3"])
        .aws_args(["--parameter", "MaxSubscriptions=3"]),
    |s: Setup| async move {
        let mut c = s.client().await;
        c.subscribe("a").await;
        c.subscribe("b").await;
        c.subscribe("c/#").await;
        c.expect_error(
            json!({"action":"subscribe","channel":"d"}),
            "too_many_subscriptions",
        )
        .await;
        c.assert_alive().await;
        // Re-subscribing a held filter is not a new subscription.
        c.subscribe("a").await;
        c.unsubscribe("b").await;
        c.subscribe("d").await;
        // The refused filter was not subscribed.
        let mut dev = s.device("d").await;
        c.expect_error(
            json!({"action":"subscribe","channel":"e"}),
            "too_many_subscriptions",
        )
        .await;
        dev.publish("e", "1", 1, false).await;
        dev.publish("d", "2", 1, false).await;
        let m = c.next_message().await;
        assert_eq!(m["channel"], "d");
    }
);

// Not on AWS: it has no per-connection request rate (aws_local.rs).
all_backends!(
    rate_limit,
    Opts::default().args(["--publish-rate", "1", "--publish-burst", "3"]),
    |s: Setup| async move {
        let mut c = s.client().await;
        let mut dev = s.device("d").await;
        dev.subscribe("r").await;
        for i in 0..3 {
            c.publish("r", json!(i)).await;
        }
        let reply = c
            .expect_error(
                json!({"action":"publish","channel":"r","data":3}),
                "rate_limited",
            )
            .await;
        assert!(reply["message"].as_str().unwrap().contains("dropped"));
        for i in 0..3 {
            assert_eq!(
                dev.next_publish().await.payload.as_ref(),
                i.to_string().as_bytes()
            );
        }
        dev.expect_silence().await;
        c.assert_alive().await;
        // The bucket refills.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        c.publish("r", json!(4)).await;
        assert_eq!(dev.next_publish().await.payload.as_ref(), b"4");
    }
);

all_backends_and_aws!(unsubscribe_semantics, |s: Setup| async move {
    let mut c = s.client().await;
    let mut dev = s.device("d").await;
    // Not held: not an error.
    c.unsubscribe("never/held").await;
    c.subscribe("u/+").await;
    dev.publish("u/1", "1", 1, false).await;
    assert_eq!(c.next_message().await["data"], 1);
    // The same filter string stops it; a different one that would match does not.
    c.unsubscribe("u/1").await;
    dev.publish("u/1", "2", 1, false).await;
    assert_eq!(c.next_message().await["data"], 2);
    c.unsubscribe("u/+").await;
    dev.publish("u/1", "3", 1, false).await;
    c.expect_silence().await;
});

all_backends_and_aws!(publish_encodings, |s: Setup| async move {
    let mut c = s.client().await;
    let mut dev = s.device("d").await;
    dev.subscribe("enc/#").await;
    let cases = [
        (
            json!({"action":"publish","channel":"enc/j","data":42,"encoding":"json"}),
            b"42".to_vec(),
        ),
        (
            json!({"action":"publish","channel":"enc/j","data":"quoted"}),
            br#""quoted""#.to_vec(),
        ),
        (
            json!({"action":"publish","channel":"enc/j","data":null}),
            b"null".to_vec(),
        ),
        (
            json!({"action":"publish","channel":"enc/t","data":"héllo \"x\"","encoding":"text"}),
            "héllo \"x\"".as_bytes().to_vec(),
        ),
        (
            json!({"action":"publish","channel":"enc/b","data":"AAEC/w==","encoding":"base64"}),
            vec![0, 1, 2, 255],
        ),
        (
            json!({"action":"publish","channel":"enc/b","data":"","encoding":"base64"}),
            vec![],
        ),
    ];
    for (req, payload) in cases {
        let reply = c.request(req.clone()).await;
        assert_eq!(reply["type"], "ack", "{req} -> {reply}");
        let p = dev.next_publish().await;
        assert_eq!(p.payload.as_ref(), payload.as_slice(), "{req}");
    }
    // Compact JSON text, keys in the order given.
    c.send_text(r#"{"action":"publish","channel":"enc/j","data":{ "temp" : 21.5, "tags": ["a", "b"] },"id":0}"#).await;
    assert_eq!(c.next_json().await["type"], "ack");
    assert_eq!(
        dev.next_publish().await.payload.as_ref(),
        br#"{"temp":21.5,"tags":["a","b"]}"#
    );
    // JSON numbers keep their exact text.
    c.send_text(r#"{"action":"publish","channel":"enc/n","data":[1.50, 1e3, 12345678901234567890123],"id":1}"#).await;
    assert_eq!(c.next_json().await["type"], "ack");
    assert_eq!(
        dev.next_publish().await.payload.as_ref(),
        b"[1.50,1e3,12345678901234567890123]"
    );
});

all_backends_and_aws!(message_encodings, |s: Setup| async move {
    let mut c = s.client().await;
    c.subscribe("m/#").await;
    let mut dev = s.device("d").await;
    let cases: Vec<(Vec<u8>, Value)> = vec![
        (
            br#"{"temp":21.5}"#.to_vec(),
            json!({"type":"message","channel":"m/x","data":{"temp":21.5}}),
        ),
        (
            b"42".to_vec(),
            json!({"type":"message","channel":"m/x","data":42}),
        ),
        (
            br#""quoted""#.to_vec(),
            json!({"type":"message","channel":"m/x","data":"quoted"}),
        ),
        (
            b"null".to_vec(),
            json!({"type":"message","channel":"m/x","data":null}),
        ),
        (
            b"hello".to_vec(),
            json!({"type":"message","channel":"m/x","data":"hello","encoding":"text"}),
        ),
        (
            b"".to_vec(),
            json!({"type":"message","channel":"m/x","data":"","encoding":"text"}),
        ),
        // Valid JSON syntax that strict parsers refuse travels as text.
        (
            b"1e999".to_vec(),
            json!({"type":"message","channel":"m/x","data":"1e999","encoding":"text"}),
        ),
        (
            vec![0xff, 0x00, 0x10],
            json!({"type":"message","channel":"m/x","data":"/wAQ","encoding":"base64"}),
        ),
    ];
    for (payload, expected) in cases {
        dev.publish("m/x", payload.clone(), 1, false).await;
        assert_eq!(c.next_message().await, expected, "payload {payload:?}");
    }
});

// Not on RabbitMQ: it does not send retained messages to a filter with a
// wildcard (documented, https://www.rabbitmq.com/mqtt.html#retained), so the
// `retained: true` replay for `ret/#` is empty there.
both_backends_and_aws!(retained_messages, |s: Setup| async move {
    // Sees the device's messages delivered before anyone else subscribes (on
    // AWS a message is delivered to whoever subscribed when its fan-out
    // runs, which may be after its publisher's PUBACK).
    let mut watcher = s.client().await;
    watcher.subscribe("#").await;
    let mut dev = s.device("d").await;
    dev.publish("ret/a", r#"{"v":1}"#, 1, true).await;
    dev.publish("ret/b", "two", 1, true).await;
    dev.publish("ret/a", r#"{"v":2}"#, 1, true).await; // replaces v1
    dev.publish("other/x", "3", 1, true).await;
    watcher.next_messages(4).await;
    // Without retained: true, nothing is replayed.
    let mut plain = s.client().await;
    plain.subscribe("ret/#").await;
    plain.expect_silence().await;
    // With it: each matching retained message once, marked, then the ack.
    let mut c = s.client().await;
    c.send(json!({"action":"subscribe","channel":"ret/#","retained":true,"id":"r"}))
        .await;
    let mut got = vec![c.next_message().await, c.next_message().await];
    assert_eq!(c.next_json().await, json!({"type":"ack","id":"r"}));
    got.sort_by_key(|m| m["channel"].as_str().unwrap().to_string());
    assert_eq!(
        got,
        vec![
            json!({"type":"message","channel":"ret/a","data":{"v":2},"retained":true}),
            json!({"type":"message","channel":"ret/b","data":"two","encoding":"text","retained":true}),
        ]
    );
    c.expect_silence().await;
    // Also when another connection already holds the same filter, and for a topic filter.
    let mut again = s.client().await;
    let reply = again
        .request(json!({"action":"subscribe","channel":"ret/#","retained":true}))
        .await;
    assert_eq!(reply["type"], "ack");
    assert_eq!(again.next_message().await["retained"], true);
    assert_eq!(again.next_message().await["retained"], true);
    again.expect_silence().await;
    let mut one = s.client().await;
    let reply = one
        .request(json!({"action":"subscribe","channel":"ret/b","retained":true}))
        .await;
    assert_eq!(reply["type"], "ack");
    assert_eq!(one.next_message().await["channel"], "ret/b");
    // Live messages after that are not marked retained, even if published with retain.
    dev.publish("ret/b", "live", 1, true).await;
    let m = one.next_message().await;
    assert_eq!(
        m,
        json!({"type":"message","channel":"ret/b","data":"live","encoding":"text"})
    );
    // A retained message on a topic nobody else matched is not replayed to plain subscribers.
    plain.next_message().await; // the live one
    plain.expect_silence().await;
});

all_backends_and_aws!(web_publish_qos_and_retain, |s: Setup| async move {
    let mut c = s.client().await;
    let mut dev = s.device("d").await;
    dev.subscribe("q/#").await;
    let reply = c
        .request(json!({"action":"publish","channel":"q/0","data":1,"qos":0}))
        .await;
    assert_eq!(reply["type"], "ack");
    let p = dev.next_publish().await;
    assert_eq!(p.payload.as_ref(), b"1");
    let reply = c.request(json!({"action":"publish","channel":"q/r","data":"keep","encoding":"text","retain":true})).await;
    assert_eq!(reply["type"], "ack");
    dev.next_publish().await;
    // The retained message is there for a later subscriber.
    let mut late = s.client().await;
    let reply = late
        .request(json!({"action":"subscribe","channel":"q/r","retained":true}))
        .await;
    assert_eq!(reply["type"], "ack");
    assert_eq!(
        late.next_message().await,
        json!({"type":"message","channel":"q/r","data":"keep","encoding":"text","retained":true})
    );
    // A plain MQTT subscriber sees the retain flag too.
    let mut dev2 = s.device("d2").await;
    dev2.subscribe("q/r").await;
    let p = dev2.next_publish().await;
    assert!(p.retain);
});

all_backends_and_aws!(connection_survives_every_error, |s: Setup| async move {
    let mut c = s.client().await;
    c.subscribe("alive/#").await;
    for text in [
        "x",
        "{}",
        r#"{"action":"publish","channel":"a/#","data":1}"#,
    ] {
        c.send_text(text).await;
        assert_eq!(c.next_json().await["type"], "error");
    }
    if s.backend != Backend::AwsLocal {
        // API Gateway closes on binary frames: aws_local.rs
        c.send_binary(vec![0]).await;
        assert_eq!(c.next_json().await["type"], "error");
    }
    let mut dev = s.device("d").await;
    dev.publish("alive/1", "1", 1, false).await;
    assert_eq!(c.next_message().await["channel"], "alive/1");
    match c.next_within(QUIET).await {
        None => {}
        Some(Frame::Json(v)) => panic!("unexpected {v}"),
        Some(Frame::Close(code)) => panic!("closed with {code:?}"),
    }
});

/// `internal`: a bug is contained to its connection, logged with the same
/// reference the client gets. Debug builds have a fault-injection switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_error_is_contained_and_correlated() {
    let s = Setup::with(
        tests::Backend::Embedded,
        Opts::default().env("BRIDGE_FAULT_INJECTION", "1"),
    );
    let mut other = s.client().await;
    other.subscribe("still/here").await;
    let mut c = s.client().await;
    let reply = c
        .request(json!({"action":"publish","channel":"fault-injection/panic","data":1}))
        .await;
    assert_eq!(reply["code"], "internal", "{reply}");
    let message = reply["message"].as_str().unwrap();
    let reference = message
        .split("reference ")
        .nth(1)
        .unwrap()
        .trim_end_matches(')');
    assert_eq!(c.expect_close().await, Some(1011));
    assert!(
        s.bridge.logs().contains(reference),
        "the log has no {reference}:\n{}",
        s.bridge.logs()
    );
    // Everyone else carries on.
    let mut dev = s.device("d").await;
    dev.publish("still/here", "1", 1, false).await;
    assert_eq!(other.next_message().await["data"], 1);
}
