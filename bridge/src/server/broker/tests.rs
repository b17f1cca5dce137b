//! The embedded broker over real sockets, with rumqttc as the device: what
//! the bridge's command line cannot reach yet (device credentials) and the
//! retained store's bounds. The MQTT 3.1.1 behaviour devices see is tested
//! black-box in `tests/tests/embedded_broker.rs`.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use rmqtt::retain::RetainStorage;
use rmqtt::types::{ClientId, From, Id, Publish, Retain, TopicFilter, TopicName};
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, Incoming, MqttOptions};

use super::*;

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Connects with these credentials and returns the broker's CONNACK code.
async fn connack(addr: SocketAddr, login: Option<(&str, &str)>) -> ConnectReturnCode {
    let mut opts = MqttOptions::new("unit-device", addr.ip().to_string(), addr.port());
    if let Some((user, password)) = login {
        opts.set_credentials(user, password);
    }
    let (_client, mut eventloop) = AsyncClient::new(opts, 10);
    let polled = tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
        .await
        .expect("no CONNACK within 10 s");
    match polled {
        Ok(Event::Incoming(Incoming::ConnAck(ack))) => ack.code,
        Err(ConnectionError::ConnectionRefused(code)) => code,
        other => panic!("expected a CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn a_port_in_use_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let err = start(addr, 4096, Users::default()).unwrap_err();
    assert!(matches!(err, BrokerError::InUse { .. }), "{err:?}");
    assert!(err.to_string().contains("--mqtt-url"), "{err}");
}

#[tokio::test]
async fn without_users_devices_connect_anonymously() {
    let addr = free_addr();
    assert!(start(addr, 4096, Users::default()).unwrap().is_none());
    assert_eq!(connack(addr, None).await, ConnectReturnCode::Success);
}

#[tokio::test]
async fn with_users_only_the_right_password_connects() {
    let addr = free_addr();
    let mut users = Users::default();
    users.add("sensor", "right horse").unwrap();
    let login = start(addr, 4096, users)
        .unwrap()
        .expect("a login for the bridge");

    assert_eq!(
        connack(addr, Some(("sensor", "right horse"))).await,
        ConnectReturnCode::Success
    );
    assert_eq!(
        connack(addr, Some(("sensor", "wrong horse"))).await,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        connack(addr, Some(("nobody", "right horse"))).await,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(connack(addr, None).await, ConnectReturnCode::NotAuthorized);
    // The bridge's own connections.
    assert_eq!(
        connack(addr, Some((&login.username, &login.password))).await,
        ConnectReturnCode::Success
    );
}

#[test]
fn an_empty_password_is_refused() {
    let err = Users::default().add("sensor", "").unwrap_err();
    assert!(matches!(err, BrokerError::EmptyPassword { .. }), "{err:?}");
}

#[test]
fn passwords_never_show_in_debug() {
    let mut users = Users::default();
    users.add("sensor", "right horse").unwrap();
    let (users, login) = users.with_bridge_login();
    let login = login.unwrap();
    let printed = format!("{users:?} {login:?}");
    assert!(printed.contains("sensor"), "{printed}");
    assert!(!printed.contains("right horse"), "{printed}");
    assert!(!printed.contains(&login.password), "{printed}");
    // Each process makes up its own.
    let (_, other) = Users::default().with_bridge_login();
    assert!(other.is_none());
    let mut again = Users::default();
    again.add("sensor", "x").unwrap();
    let (_, again) = again.with_bridge_login();
    assert_ne!(again.unwrap().password, login.password);
}

fn retained(topic: &str, payload: &[u8]) -> Retain {
    let publish = rmqtt::codec::types::Publish {
        dup: false,
        retain: true,
        qos: rmqtt::codec::types::QoS::AtMostOnce,
        topic: topic.into(),
        packet_id: None,
        payload: payload.to_vec().into(),
        properties: None,
    };
    Retain {
        msg_id: None,
        from: From::from_custom(Id::new(0, 0, None, None, ClientId::from("t"), None)),
        publish: Publish::from(publish),
    }
}

async fn kept(store: &retain::Store, filter: &str) -> Vec<String> {
    let mut topics: Vec<String> = store
        .get(&TopicFilter::from(filter))
        .await
        .unwrap()
        .into_iter()
        .map(|(t, _)| t.to_string())
        .collect();
    topics.sort();
    topics
}

#[tokio::test]
async fn the_retained_store_is_bounded_in_count_and_bytes() {
    // Two messages, 20 bytes of topic and payload.
    let store = retain::Store::with_limits(2, 20);
    for topic in ["a/1", "a/2", "a/3"] {
        store
            .set(&TopicName::from(topic), retained(topic, b"x"), None)
            .await
            .unwrap();
    }
    assert_eq!(kept(&store, "a/#").await, ["a/1", "a/2"]);
    // Clearing makes room; replacing counts the new size only.
    store
        .set(&TopicName::from("a/1"), retained("a/1", b""), None)
        .await
        .unwrap();
    store
        .set(&TopicName::from("a/3"), retained("a/3", b"x"), None)
        .await
        .unwrap();
    assert_eq!(kept(&store, "a/#").await, ["a/2", "a/3"]);
    assert_eq!(store.count().await, 2);
    // Too big for what is left: the topic keeps nothing (no stale message).
    store
        .set(&TopicName::from("a/3"), retained("a/3", &[b'y'; 20]), None)
        .await
        .unwrap();
    assert_eq!(kept(&store, "a/#").await, ["a/2"]);
}

#[tokio::test]
async fn retained_wildcards_skip_dollar_topics() {
    let store = retain::Store::default();
    for topic in ["$x/y", "x/y"] {
        store
            .set(&TopicName::from(topic), retained(topic, b"v"), None)
            .await
            .unwrap();
    }
    assert_eq!(kept(&store, "#").await, ["x/y"]);
    assert_eq!(kept(&store, "+/y").await, ["x/y"]);
    assert_eq!(kept(&store, "$x/#").await, ["$x/y"]);
}
