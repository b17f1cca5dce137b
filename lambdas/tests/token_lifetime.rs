//! Token lifetime on AWS (PROTOCOL.md, v1.1): the token's `exp` holds for the
//! connection's whole life. `ws-handler` serves no frame after it (the
//! connection is told `token_expired` and closed), `iot-fanout` never posts
//! to such a connection (it is told, closed and its rows deleted), and the
//! `auth` action replaces the token within the rules. In-process handlers
//! against moto's DynamoDB and the recording stand-in.

mod support;

use serde_json::{json, Value};
use support::*;

/// The authorizer context for a token of `subject` ending at `exp`.
fn context(subject: &str, subscribe: &[&str], exp: i64) -> Value {
    let p = perms(subject, subscribe, &[]);
    let mut c = context_for(&p);
    c["expires"] = json!(exp.to_string());
    c
}

async fn connect_until(h: &lambdas::handler::Handler, id: &str, subscribe: &[&str], exp: i64) {
    let r = handle(
        h,
        ws_event("$connect", id, None, Some(context("alice", subscribe, exp))),
    )
    .await;
    assert_eq!(r.status_code, 200);
}

fn token(subject: &str, subscribe: &[&str], exp: i64) -> String {
    hs256_token(
        KIT_SECRET,
        json!({"sub": subject, "exp": exp, "channels": {"subscribe": subscribe}}),
    )
}

fn auth(token: &str) -> String {
    json!({"action": "auth", "token": token, "id": "a"}).to_string()
}

/// DELETEs of `@connections/{id}` the stand-in received.
fn closed(kit: &Kit) -> Vec<String> {
    kit.standin
        .records()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .filter_map(|r| r.connection())
        .collect()
}

fn told_expired(kit: &Kit, id: &str) -> bool {
    kit.standin
        .posted()
        .iter()
        .any(|(c, f)| c == id && f["type"] == "error" && f["code"] == "token_expired")
}

#[tokio::test]
async fn no_frame_is_served_after_the_token_ends() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    let now = now_secs();
    connect_until(&h, "c1", &["a/#"], now + 2).await;
    assert_eq!(
        send(&h, "c1", r#"{"action":"subscribe","channel":"a/b","id":1}"#).await,
        Some(json!({"type":"ack","id":1}))
    );
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    // A subscribe after the end: no answer, told once, closed, rows gone.
    let reply = send(&h, "c1", r#"{"action":"subscribe","channel":"a/c","id":2}"#).await;
    assert_eq!(reply, None);
    assert!(told_expired(&kit, "c1"));
    assert_eq!(closed(&kit), ["c1"]);
    assert!(kit.keys().await.is_empty(), "{:?}", kit.keys().await);
    // Pings need no state while the token the authorizer saw is valid...
    let ping = |id: &str, exp: i64| {
        ws_event(
            "$default",
            id,
            Some(r#"{"action":"ping","id":3}"#),
            Some(context("alice", &["a/#"], exp)),
        )
    };
    connect_until(&h, "c2", &["a/#"], now + 600).await;
    let calls = kit.calls.total("DynamoDB");
    let r = handle(&h, ping("c2", now + 600)).await;
    assert_eq!(body(&r), Some(json!({"type":"pong","id":3})));
    assert_eq!(kit.calls.total("DynamoDB"), calls, "a ping reads nothing");
    // ...but after its end, a ping is not served either.
    connect_until(&h, "c3", &["a/#"], now - 1).await;
    let r = handle(&h, ping("c3", now - 1)).await;
    assert_eq!(body(&r), None);
    assert_eq!(closed(&kit), ["c1", "c3"]);
}

#[tokio::test]
async fn auth_replaces_the_token_within_the_rules() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    let now = now_secs();
    connect_until(&h, "c1", &["fleet/#"], now + 600).await;
    assert_eq!(
        send(
            &h,
            "c1",
            r#"{"action":"subscribe","channel":"fleet/+/t","id":1}"#
        )
        .await,
        Some(json!({"type":"ack","id":1}))
    );
    let code = |r: Option<Value>| r.unwrap()["code"].as_str().unwrap().to_string();
    // Another subject, a bad signature, an expired token, no token: refused.
    let refused = [
        token("mallory", &["fleet/#"], now + 900),
        hs256_token(
            "another-secret-0123456789abcdef0123",
            json!({"sub":"alice","exp":now+900}),
        ),
        token("alice", &["fleet/#"], now - 5),
        String::new(),
    ];
    for t in &refused {
        assert_eq!(code(send(&h, "c1", &auth(t)).await), "unauthorized");
    }
    // A token that no longer allows a held filter: forbidden.
    let narrower = token("alice", &["other/#"], now + 900);
    assert_eq!(code(send(&h, "c1", &auth(&narrower)).await), "forbidden");
    // Nothing changed: the old end is still stored.
    let exp_of = |items: &Vec<
        std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>,
    >,
                  pk: &str| {
        items
            .iter()
            .find(|i| i["pk"].as_s().unwrap() == pk)
            .and_then(|i| i.get("exp"))
            .map(|v| v.as_n().unwrap().parse::<i64>().unwrap())
    };
    let items = scan(&kit.ddb, &kit.table).await;
    assert_eq!(exp_of(&items, "conn#c1"), Some(now + 600));
    // A good one: ack, and the connection and its filter rows carry the new end.
    let fresh = token("alice", &["fleet/+/t", "users/alice/#"], now + 3600);
    assert_eq!(
        send(&h, "c1", &auth(&fresh)).await,
        Some(json!({"type":"ack","id":"a"}))
    );
    let items = scan(&kit.ddb, &kit.table).await;
    assert_eq!(exp_of(&items, "conn#c1"), Some(now + 3600));
    assert_eq!(exp_of(&items, "filter#fleet/+/t"), Some(now + 3600));
    // The new permissions hold: a channel the old token did not allow.
    assert_eq!(
        send(
            &h,
            "c1",
            r#"{"action":"subscribe","channel":"users/alice/x","id":2}"#
        )
        .await,
        Some(json!({"type":"ack","id":2}))
    );
}

#[tokio::test]
async fn with_auth_off_auth_is_acknowledged_and_changes_nothing() {
    let kit = Kit::new().await;
    let h = kit.handler(&[("BRIDGE_AUTH", "off")]);
    let r = handle(&h, ws_event("$connect", "c1", None, None)).await;
    assert_eq!(r.status_code, 200);
    assert_eq!(
        send(&h, "c1", &auth("anything")).await,
        Some(json!({"type":"ack","id":"a"}))
    );
}

#[tokio::test]
async fn the_fanout_never_posts_to_an_expired_connection() {
    let kit = Kit::new().await;
    let h = kit.handler(&[]);
    let f = kit.fanout(&[]);
    let now = now_secs();
    connect_until(&h, "live", &["t/#"], now + 600).await;
    connect_until(&h, "ending", &["t/#"], now + 2).await;
    connect_until(&h, "renewed", &["t/#"], now + 2).await;
    for id in ["live", "ending", "renewed"] {
        assert_eq!(
            send(&h, id, r#"{"action":"subscribe","channel":"t/x","id":1}"#).await,
            Some(json!({"type":"ack","id":1}))
        );
    }
    // `renewed` sends a fresh token before its end.
    let fresh = token("alice", &["t/#"], now + 3600);
    assert_eq!(
        send(&h, "renewed", &auth(&fresh)).await,
        Some(json!({"type":"ack","id":"a"}))
    );
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    kit.standin.clear();
    let report = f.handle(rule_event("t/x", b"42")).await.unwrap();
    assert_eq!(report.expired, 1, "{report:?}");
    assert_eq!(report.delivered, 2, "{report:?}");
    let messages: Vec<String> = kit
        .standin
        .posted()
        .into_iter()
        .filter(|(_, f)| f["type"] == "message")
        .map(|(c, _)| c)
        .collect();
    assert!(messages.contains(&"live".to_string()) && messages.contains(&"renewed".to_string()));
    assert!(!messages.contains(&"ending".to_string()), "{messages:?}");
    assert!(told_expired(&kit, "ending"));
    assert_eq!(closed(&kit), ["ending"]);
    // Its rows are gone: the next message does not even look at it.
    assert!(!kit.keys().await.iter().any(|k| k.contains("ending")));
    kit.standin.clear();
    let report = f.handle(rule_event("t/x", b"43")).await.unwrap();
    assert_eq!((report.recipients, report.expired), (2, 0), "{report:?}");
}
