//! Delivery: wildcards, exactly one copy per connection with overlapping
//! filters (on one connection and across connections), order, own-message
//! echo, web to web and web to device through the broker. On AWS (aws-local)
//! too, where messages may arrive in any order (aws_local.rs).

use serde_json::{json, Value};
use tests::{all_backends, all_backends_and_aws, both_backends, both_backends_and_aws, Setup};

fn data(messages: Vec<Value>) -> Vec<Value> {
    messages.into_iter().map(|m| m["data"].clone()).collect()
}

all_backends_and_aws!(wildcards, |s: Setup| async move {
    let mut c = s.client().await;
    c.subscribe("fleet/+/telemetry").await;
    c.subscribe("site/#").await;
    let mut dev = s.device("dev-7").await;
    for (topic, wanted) in [
        ("fleet/dev-7/telemetry", true),
        ("fleet/dev-7/x/telemetry", false),
        ("fleet/telemetry", false),
        ("site", true), // `#` matches the parent level too
        ("site/a/b/c", true),
        ("sites/a", false),
    ] {
        dev.publish(topic, format!("\"{topic}\""), 1, false).await;
        if wanted {
            let m = c.next_message().await;
            assert_eq!(m["channel"], topic);
            assert_eq!(m["data"], topic);
        }
    }
    c.expect_silence().await;
});

all_backends_and_aws!(protocol_example, |s: Setup| async move {
    // The example at the end of PROTOCOL.md, frame for frame.
    let mut c = s.client().await;
    c.send_text(r#"{"action":"subscribe","channel":"fleet/+/telemetry","id":1}"#)
        .await;
    assert_eq!(c.next_json().await, json!({"type":"ack","id":1}));
    let mut dev = s.device("dev-7").await;
    dev.subscribe("fleet/+/commands").await;
    dev.publish("fleet/dev-7/telemetry", r#"{"temp":21.5}"#, 1, false)
        .await;
    assert_eq!(
        c.next_json().await,
        json!({"type":"message","channel":"fleet/dev-7/telemetry","data":{"temp":21.5}})
    );
    c.send_text(
        r#"{"action":"publish","channel":"fleet/dev-7/commands","data":{"reboot":true},"id":"c1"}"#,
    )
    .await;
    assert_eq!(c.next_json().await, json!({"type":"ack","id":"c1"}));
    let p = dev.next_publish().await;
    assert_eq!(p.topic, "fleet/dev-7/commands");
    assert_eq!(p.payload.as_ref(), br#"{"reboot":true}"#);
    assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
    c.send_text(r#"{"action":"publish","channel":"fleet/+/commands","data":1,"id":2}"#)
        .await;
    let e = c.next_json().await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["id"], 2);
    assert_eq!(e["code"], "invalid_channel");
    assert_eq!(e["message"], "a publish topic cannot contain wildcards");
});

all_backends_and_aws!(one_copy_on_one_connection, |s: Setup| async move {
    let mut c = s.client().await;
    c.subscribe("fleet/#").await;
    c.subscribe("fleet/d1/t").await;
    c.subscribe("fleet/+/t").await;
    c.subscribe("+/d1/+").await;
    let mut dev = s.device("d1").await;
    for i in 0..20 {
        dev.publish("fleet/d1/t", i.to_string(), 1, false).await;
    }
    let got = data(c.next_messages(20).await);
    s.assert_same_messages(got, (0..20).map(|i| json!(i)).collect());
    c.expect_silence().await;
    // Dropping some of the overlapping filters leaves exactly one copy.
    c.unsubscribe("fleet/#").await;
    c.unsubscribe("+/d1/+").await;
    dev.publish("fleet/d1/t", "99", 1, false).await;
    assert_eq!(c.next_message().await["data"], 99);
    c.expect_silence().await;
    c.unsubscribe("fleet/d1/t").await;
    c.unsubscribe("fleet/+/t").await;
    dev.publish("fleet/d1/t", "100", 1, false).await;
    c.expect_silence().await;
});

all_backends_and_aws!(one_copy_across_connections, |s: Setup| async move {
    let mut a = s.client().await;
    let mut b = s.client().await;
    let mut d = s.client().await;
    a.subscribe("fleet/+/t").await;
    b.subscribe("+/d1/t").await;
    d.subscribe("fleet/d1/t").await;
    d.subscribe("#").await;
    let mut dev = s.device("d1").await;
    dev.publish("fleet/d1/t", "1", 1, false).await;
    dev.publish("fleet/d2/t", "2", 1, false).await;
    dev.publish("other/d1/t", "3", 1, false).await;
    dev.publish("x/y/z", "4", 1, false).await;
    s.assert_same_messages(data(a.next_messages(2).await), vec![json!(1), json!(2)]);
    s.assert_same_messages(data(b.next_messages(2).await), vec![json!(1), json!(3)]);
    s.assert_same_messages(
        data(d.next_messages(4).await),
        (1..=4).map(|i| json!(i)).collect(),
    );
    a.expect_silence().await;
    b.expect_silence().await;
    d.expect_silence().await;
    // One connection leaving does not disturb the others.
    drop(a);
    dev.publish("fleet/d1/t", "5", 1, false).await;
    assert_eq!(b.next_message().await["data"], 5);
    assert_eq!(d.next_message().await["data"], 5);
    b.expect_silence().await;
    d.expect_silence().await;
});

// Not on AWS: it does not keep order (aws_local.rs).
all_backends!(order_of_a_thousand, |s: Setup| async move {
    let mut c = s.client().await;
    c.subscribe("seq/+").await;
    let mut other = s.client().await;
    other.subscribe("seq/#").await;
    let mut dev = s.device("seq").await;
    for i in 0..1000 {
        dev.publish("seq/a", i.to_string(), 1, false).await;
    }
    for i in 0..1000 {
        assert_eq!(
            c.next_message().await["data"],
            i,
            "connection 1, message {i}"
        );
        assert_eq!(
            other.next_message().await["data"],
            i,
            "connection 2, message {i}"
        );
    }
});

all_backends_and_aws!(own_message_echo_and_web_to_web, |s: Setup| async move {
    let mut a = s.client().await;
    let mut b = s.client().await;
    a.subscribe("chat/#").await;
    b.subscribe("chat/room").await;
    a.publish("chat/room", json!({"from":"a","text":"hi"}))
        .await;
    // The publisher receives its own message, as an MQTT client does.
    let ma = a.next_message().await;
    let mb = b.next_message().await;
    assert_eq!(ma, mb);
    assert_eq!(ma["data"], json!({"from":"a","text":"hi"}));
    a.expect_silence().await;
    b.expect_silence().await;
});

// Not on RabbitMQ: it keeps the order of one client's publishes per QoS only
// (what MQTT 3.1.1 §4.6 [MQTT-4.6.0-6] asks: "for the same Topic and QoS"), and
// lets QoS 0 overtake QoS 1 (seen with RabbitMQ 3.10 and a raw-socket client,
// without the bridge). Not on AWS: API Gateway invokes the handler for each
// frame on its own, concurrently (aws_local.rs).
both_backends!(web_publishes_keep_their_order, |s: Setup| async move {
    let mut a = s.client().await;
    let mut dev = s.device("d").await;
    dev.subscribe("w/#").await;
    // Pipelined: 200 publishes without waiting for acks.
    for i in 0..200 {
        a.send(json!({"action":"publish","channel":"w/x","data":i,"id":i,"qos": i % 2}))
            .await;
    }
    let mut acks = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let f = a.next_json().await;
        assert_eq!(f["type"], "ack", "{f}");
        acks.insert(f["id"].as_u64().unwrap());
    }
    assert_eq!(acks.len(), 200);
    for i in 0..200 {
        assert_eq!(
            dev.next_publish().await.payload.as_ref(),
            i.to_string().as_bytes()
        );
    }
});

all_backends_and_aws!(many_subscribers_one_channel, |s: Setup| async move {
    let mut clients = Vec::new();
    for _ in 0..50 {
        let mut c = s.client().await;
        c.subscribe("fan/out").await;
        clients.push(c);
    }
    let mut dev = s.device("d").await;
    for i in 0..10 {
        dev.publish("fan/out", i.to_string(), 0, false).await;
    }
    for c in &mut clients {
        let got = data(c.next_messages(10).await);
        s.assert_same_messages(got, (0..10).map(|i| json!(i)).collect());
    }
});

// Not on RabbitMQ: `mosquitto_pub` names the broker topic itself, and a
// RabbitMQ setup's topics live under its own prefix (the tests share one node).
both_backends_and_aws!(
    the_embedded_or_external_broker_is_reachable_by_mosquitto_clients,
    |s: Setup| async move {
        // An ordinary command-line MQTT client, not ours.
        let mut c = s.client().await;
        c.subscribe("cli/t").await;
        let status = std::process::Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &s.bridge.mqtt_port.to_string(),
                "-t",
                "cli/t",
                "-m",
                "{\"ok\":true}",
                "-q",
                "1",
            ])
            .status()
            .expect("mosquitto_pub (Debian package mosquitto-clients) must be installed");
        assert!(status.success());
        assert_eq!(c.next_message().await["data"], json!({"ok":true}));
    }
);
