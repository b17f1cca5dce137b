//! A delivery in parts: what one `iot-fanout` invocation hands another.
//!
//! The topic rule invokes `iot-fanout` once per device message (the *root*
//! part, key `"0"`). When the message has more recipients than the part size
//! (`BRIDGE_FANOUT_PART_SIZE`), the root keeps the first chunk and hands each
//! other chunk to a parallel invocation of the same function (key `"0.1"`,
//! `"0.2"`, ...): API Gateway's `@connections` posts are signed and sent
//! by CPU that a Lambda environment has little of, so many environments post
//! at once. When an invocation's time budget runs out, or posts stay
//! throttled, it hands what is left on as one more part (its key plus `"+"`,
//! its `round` plus one).
//!
//! A part event carries the rule's event unchanged (so the part builds the
//! same frame and knows the message's id) and the connection ids it owes:
//! `{"part": {"key": "0.3", "round": 0, "message": {...}, "recipients": [...]}}`.
//! Chunks are cut by count and by size, so an event always fits Lambda's
//! asynchronous payload limit.

use serde::{Deserialize, Serialize};

use crate::fanout::RuleEvent;

/// The largest part event sent: Lambda takes up to 256 KB asynchronously
/// (1 MB since 2025), with room left for the envelope.
pub const MAX_EVENT_BYTES: usize = 250_000;

/// Hand-ons a part may take for throttled posts; after that they are failed.
pub const MAX_ROUNDS: u32 = 3;

/// The root part's key.
pub const ROOT: &str = "0";

/// The `part` field of an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// Unique within the message's delivery: the progress row's key.
    pub key: String,
    /// Hand-ons that led here.
    #[serde(default)]
    pub round: u32,
    /// The rule's event, as the root got it.
    pub message: RuleEvent,
    /// The connections this part posts to.
    pub recipients: Vec<String>,
}

/// A part event: `{"part": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartEvent {
    pub part: Part,
}

impl Part {
    /// The key of chunk `n` of this part.
    pub fn chunk_key(&self, n: usize) -> String {
        format!("{}.{n}", self.key)
    }

    /// What is left of this part, handed on.
    pub fn rest(&self, recipients: Vec<String>) -> Part {
        Part {
            key: format!("{}+", self.key),
            round: self.round + 1,
            message: self.message.clone(),
            recipients,
        }
    }
}

/// Cuts `ids` into chunks of at most `size` ids, each small enough that a
/// part event with `message` fits [`MAX_EVENT_BYTES`].
pub fn chunks(ids: Vec<String>, size: usize, message: &RuleEvent) -> Vec<Vec<String>> {
    let envelope = serde_json::to_string(message).map_or(0, |m| m.len()) + 200;
    let room = MAX_EVENT_BYTES.saturating_sub(envelope).max(1);
    let size = size.max(1);
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut bytes = 0;
    for id in ids {
        // An id costs its length plus quotes and a comma.
        let cost = id.len() + 3;
        match out.last_mut() {
            Some(chunk) if chunk.len() < size && bytes + cost <= room => {
                bytes += cost;
                chunk.push(id);
            }
            _ => {
                bytes = cost;
                out.push(vec![id]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload_len: usize) -> RuleEvent {
        RuleEvent {
            topic: "a/b".into(),
            payload: "A".repeat(payload_len),
            timestamp: Some(1),
            id: Some("m-1".into()),
        }
    }

    #[test]
    fn chunks_are_cut_by_count_and_by_size() {
        let ids: Vec<String> = (0..1_234).map(|i| format!("conn-{i:06}")).collect();
        let cut = chunks(ids.clone(), 500, &message(10));
        assert_eq!(
            cut.iter().map(Vec::len).collect::<Vec<_>>(),
            [500, 500, 234]
        );
        assert_eq!(cut.concat(), ids, "every id once, in order");
        // A payload near the frame limit leaves room for fewer ids.
        let ids: Vec<String> = (0..10_000).map(|i| format!("conn-{i:06}")).collect();
        let cut = chunks(ids.clone(), 20_000, &message(175_000));
        assert_eq!(cut.len(), 2, "140 KB of ids in chunks of about 75 KB");
        for chunk in &cut {
            let event = PartEvent {
                part: Part {
                    key: "0.1".into(),
                    round: 0,
                    message: message(175_000),
                    recipients: chunk.clone(),
                },
            };
            assert!(serde_json::to_string(&event).unwrap().len() <= MAX_EVENT_BYTES);
        }
        assert_eq!(cut.concat(), ids);
        assert!(chunks(Vec::new(), 500, &message(1)).is_empty());
    }

    #[test]
    fn keys_are_unique_along_a_delivery() {
        let root = Part {
            key: ROOT.into(),
            round: 0,
            message: message(1),
            recipients: vec![],
        };
        assert_eq!(root.chunk_key(3), "0.3");
        let rest = root.rest(vec!["a".into()]);
        assert_eq!((rest.key.as_str(), rest.round), ("0+", 1));
        assert_eq!(rest.rest(vec![]).key, "0++");
    }
}
