//! A slow reader hurts only itself: one connection that never reads while
//! another receives a 20,000-message burst in full; the server's memory stays
//! bounded; the slow one is told exactly how many messages it lost.

use std::time::Duration;

use serde_json::{json, Value};
use tests::{stalled_ws, Backend, Setup};
use tokio_tungstenite::tungstenite::Message;

const BURST: usize = 20_000;
const PAYLOAD: usize = 2048;
/// Most messages the device may be ahead of the fast reader: well within
/// its queue's bounds (1,024 frames, 1 MiB: 256 frames of 2 KiB are 0.5 MiB).
const WINDOW: u64 = 256;

/// Both backends, one after the other: two 20,000-message bursts at once
/// would measure the 2-core machine, not the bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_hurts_only_itself() {
    slow_reader(Setup::new(Backend::Embedded)).await;
    slow_reader(Setup::new(Backend::Mosquitto)).await;
}

/// The counter in a burst message, found without parsing the whole frame.
fn counter(frame: &str) -> Option<u64> {
    let at = frame.find("\"n\":")? + 4;
    let digits: String = frame[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

async fn slow_reader(s: Setup) {
    use futures_util::{SinkExt, StreamExt};
    let mut slow = stalled_ws(&s.bridge.ws_url()).await;
    slow.send(Message::text(
        r#"{"action":"subscribe","channel":"burst/#","id":1}"#,
    ))
    .await
    .unwrap();
    let ack = slow.next().await.unwrap().unwrap();
    assert_eq!(ack.to_text().unwrap(), r#"{"type":"ack","id":1}"#);
    // From here on `slow` is not read until the burst is over.

    let mut fast = s.client().await;
    fast.subscribe("burst/+").await;
    let rss_before = s.bridge.rss_kib();

    let dev = s.device("burst").await;
    let filler = "x".repeat(PAYLOAD);
    // How far the fast reader has got. The device never runs more than
    // WINDOW messages ahead of it: a reader that keeps up (lags by less than
    // its queue, 1,024 frames and 1 MiB by default) must get everything, however busy
    // the machine is. The slow reader, meanwhile, falls 20,000 behind.
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = progress.clone();
    let reader = tokio::spawn(async move {
        for i in 0..BURST as u64 {
            let frame = fast.next_text().await;
            assert_eq!(
                counter(&frame),
                Some(i),
                "the fast reader lost or reordered a message: {frame:.80}"
            );
            seen.store(i + 1, std::sync::atomic::Ordering::Relaxed);
        }
        fast.expect_silence().await;
    });
    for i in 0..BURST as u64 {
        while i >= progress.load(std::sync::atomic::Ordering::Relaxed) + WINDOW
            && !reader.is_finished()
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let payload = json!({"n": i, "pad": filler}).to_string();
        dev.client
            .publish("burst/a", rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("fast reader timed out")
        .unwrap();

    // Memory stays bounded: the slow connection's queue is bounded (1,024
    // frames by default), far below the 42 MB the burst weighs (the embedded
    // broker, in the same process, keeps about 1 MiB per filter too).
    let rss_after = s.bridge.rss_kib();
    let grown = rss_after.saturating_sub(rss_before);
    eprintln!("server RSS {rss_before} KiB before the burst, {rss_after} KiB after");
    assert!(
        grown < 24 * 1024,
        "server memory grew by {grown} KiB during the burst"
    );

    // Now the slow reader reads: what it missed is reported with `lagged`,
    // and received + reported == sent. Nothing is lost silently.
    let mut received = 0usize;
    let mut dropped = 0usize;
    let mut last = None;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(2), slow.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = next else {
            break;
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        match v["type"].as_str() {
            Some("message") => {
                let n = v["data"]["n"].as_u64().unwrap();
                assert!(
                    last.is_none_or(|l| n > l),
                    "out of order: {n} after {last:?}"
                );
                last = Some(n);
                received += 1;
            }
            Some("lagged") => dropped += v["dropped"].as_u64().unwrap() as usize,
            _ => panic!("unexpected {v}"),
        }
    }
    assert!(
        dropped > 0,
        "the slow reader should have lost messages (received {received})"
    );
    assert_eq!(
        received + dropped,
        BURST,
        "received {received} + reported dropped {dropped}"
    );
    assert_eq!(
        s.bridge
            .metric("bridge_messages_dropped_total{reason=\"lagged\"}")
            .await as usize,
        dropped
    );
}
