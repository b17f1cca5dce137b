//! Fuzzes the frame parser and the decision on top of it: no input may
//! panic, and every answer is a well-formed frame with a protocol error code.
//!
//! Run from the repository root (cargo-fuzz needs nightly features;
//! RUSTC_BOOTSTRAP lets the stable toolchain use them):
//! `mkdir -p fuzz/corpus/frame && RUSTC_BOOTSTRAP=1 cargo fuzz run frame fuzz/corpus/frame fuzz/seeds/frame -- -max_total_time=300`
#![no_main]

use std::collections::BTreeSet;

use bridge::frame::{self, FrameLimits};
use bridge::permissions::{ChannelsClaim, Permissions};
use bridge::session::{decide, Action, Policy};
use libfuzzer_sys::fuzz_target;

const CODES: [&str; 8] = [
    "bad_request",
    "invalid_channel",
    "forbidden",
    "too_large",
    "too_many_subscriptions",
    "rate_limited",
    "unavailable",
    "internal",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let limits = FrameLimits { max_frame_bytes: 4096, max_payload_bytes: 1024 };
    let _ = frame::parse(text, &limits);
    let _ = frame::peek_id(text);
    let policy = Policy { limits, max_subscriptions: 3, ..Policy::default() };
    let held: BTreeSet<String> = ["a/#".to_string(), "b".to_string()].into();
    let perms = [
        Permissions::allow_all(),
        Permissions::from_claims(
            Some("u"),
            &ChannelsClaim { subscribe: vec!["a/+/x".into(), "u/{sub}/#".into()], publish: vec!["a/#".into()] },
        ),
    ];
    for p in &perms {
        match decide(text, p, &held, &policy, None) {
            Action::Refuse(e) => {
                let v: serde_json::Value = serde_json::from_str(&e.to_json()).expect("error frame is JSON");
                assert!(CODES.contains(&v["code"].as_str().unwrap()));
            }
            Action::Reply(Some(t)) => {
                serde_json::from_str::<serde_json::Value>(&t).expect("reply is JSON");
            }
            Action::Subscribe { channel, .. } | Action::Unsubscribe { channel, .. } => {
                assert!(bridge::channel::validate_filter(&channel).is_ok());
            }
            Action::Publish { channel, payload, .. } => {
                assert!(bridge::channel::validate_topic(&channel).is_ok());
                assert!(payload.len() <= 1024);
            }
            Action::Reply(None) => {}
        }
    }
    // Any payload becomes a valid message frame.
    let m = frame::message("a/b", data, false);
    serde_json::from_str::<serde_json::Value>(&m).expect("message frame is JSON");
});
