//! An idle connection keeps no large buffer, whatever large frames it read
//! or was sent before (issue 7).
//!
//! * A frame over the frame limit but under the hard cap is answered with
//!   `too_large` and the connection stays open (PROTOCOL.md). Reading it
//!   takes a buffer as large as the frame: if the connection kept it, an
//!   attacker with N connections would pin N times the hard cap by sending
//!   one such frame on each.
//! * Writing a message takes a buffer as large as its frame: if every
//!   subscriber kept it, one large publish would pin its size once per
//!   subscriber.
//!
//! Each test also checks that the connections still work afterwards. Only
//! one backend: the broker plays no part in a connection's buffers.

use std::time::Duration;

use serde_json::json;
use tests::{Backend, Client, Setup};

const CONNECTIONS: usize = 100;

/// The bridge's resident memory now, with the clients idle for a moment.
async fn rss_when_idle(s: &Setup) -> u64 {
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.bridge.rss_kib()
}

/// `n` connected clients that have each made a request.
async fn clients(s: &Setup, n: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for _ in 0..n {
        let mut c = s.client().await;
        c.assert_alive().await;
        clients.push(c);
    }
    clients
}

/// Every client can still make requests, subscribe and get messages.
async fn all_still_work(s: &Setup, clients: &mut [Client]) {
    for c in clients.iter_mut() {
        c.assert_alive().await;
        c.subscribe("still/working").await;
    }
    let mut publisher = s.client().await;
    publisher.publish("still/working", json!("yes")).await;
    for c in clients.iter_mut() {
        let m = c.next_message().await;
        assert_eq!(
            (&m["channel"], &m["data"]),
            (&json!("still/working"), &json!("yes"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_near_the_hard_cap_leaves_no_read_buffer() {
    /// Near the 1 MiB hard cap, far over the 128 KiB frame limit.
    const FRAME: usize = 900 * 1024;
    /// The frames themselves are 90 MiB.
    const MAX_GROWTH_MIB: u64 = 10;
    let s = Setup::new(Backend::Embedded);
    let mut clients = clients(&s, CONNECTIONS).await;
    let rss_before = rss_when_idle(&s).await;

    // One after the other (what the bridge keeps, not what the allocator
    // keeps after many at once), each sends one large frame and, right
    // behind it, a ping whose bytes may reach the bridge together with the
    // large frame's last ones.
    let pad = "x".repeat(FRAME);
    let large = format!(r#"{{"action":"ping","id":"large","pad":"{pad}"}}"#);
    for c in &mut clients {
        c.send_text(&large).await;
        c.send(json!({"action":"ping","id":"after"})).await;
        let refused = c.next_json().await;
        assert_eq!(refused["code"], "too_large", "{refused}");
        assert_eq!(refused["id"], "large", "{refused}");
        assert_eq!(c.next_json().await, json!({"type":"pong","id":"after"}));
    }

    let rss_idle = rss_when_idle(&s).await;
    let grown_mib = rss_idle.saturating_sub(rss_before) / 1024;
    eprintln!(
        "RSS {rss_before} KiB before, {rss_idle} KiB with {CONNECTIONS} idle connections \
         after one {FRAME}-byte frame each (+{grown_mib} MiB)"
    );
    assert!(
        grown_mib < MAX_GROWTH_MIB,
        "{CONNECTIONS} idle connections kept {grown_mib} MiB after one {FRAME}-byte frame each"
    );
    all_still_work(&s, &mut clients).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_leaves_no_write_buffer_in_its_subscribers() {
    const SUBSCRIBERS: usize = 2 * CONNECTIONS;
    /// Within the 128 KiB frame and payload limits.
    const PAYLOAD: usize = 120 * 1024;
    /// The message is 24 MiB in all.
    const MAX_GROWTH_MIB: u64 = 6;
    let s = Setup::new(Backend::Embedded);
    let mut subscribers = clients(&s, SUBSCRIBERS).await;
    for c in &mut subscribers {
        c.subscribe("large").await;
    }
    let mut publisher = s.client().await;
    publisher.assert_alive().await;
    let rss_before = rss_when_idle(&s).await;

    let data = "y".repeat(PAYLOAD);
    publisher.publish("large", json!(data)).await;
    for c in &mut subscribers {
        let m = c.next_message().await;
        assert_eq!(m["data"].as_str().map(str::len), Some(PAYLOAD));
    }

    let rss_idle = rss_when_idle(&s).await;
    let grown_mib = rss_idle.saturating_sub(rss_before) / 1024;
    eprintln!(
        "RSS {rss_before} KiB before, {rss_idle} KiB with {SUBSCRIBERS} idle subscribers \
         after one {PAYLOAD}-byte message (+{grown_mib} MiB)"
    );
    assert!(
        grown_mib < MAX_GROWTH_MIB,
        "{SUBSCRIBERS} idle subscribers kept {grown_mib} MiB after one {PAYLOAD}-byte message"
    );
    all_still_work(&s, &mut subscribers).await;
}
