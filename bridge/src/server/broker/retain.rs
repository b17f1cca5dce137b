//! The embedded broker's retained messages: in memory, never expiring (as
//! Mosquitto's), bounded in count and bytes so that devices publishing
//! retained messages to ever new topics cannot take the host's memory.
//!
//! rmqtt leaves retained messages to a plugin (its built-in store keeps
//! nothing); this is that store, on rmqtt's own topic tree, so wildcard and
//! `$` matching follow its rules (a filter starting with a wildcard never
//! matches a topic starting with `$`).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rmqtt::retain::{RetainStorage, RetainTree};
use rmqtt::topic::Topic;
use rmqtt::types::{Retain, TopicFilter, TopicName};

/// Most retained topics kept.
const MAX_MESSAGES: usize = 100_000;
/// Most bytes (topics and payloads) kept.
const MAX_BYTES: usize = 256 * 1024 * 1024;

pub struct Store(Mutex<Inner>);

impl Default for Store {
    fn default() -> Store {
        Store::with_limits(MAX_MESSAGES, MAX_BYTES)
    }
}

impl Store {
    pub fn with_limits(max_messages: usize, max_bytes: usize) -> Store {
        Store(Mutex::new(Inner {
            max_messages,
            max_bytes,
            tree: RetainTree::default(),
            count: 0,
            bytes: 0,
            most: 0,
            warned: false,
        }))
    }
}

struct Inner {
    max_messages: usize,
    max_bytes: usize,
    tree: RetainTree<Retain>,
    count: usize,
    bytes: usize,
    most: usize,
    /// Logged that the store is full (again once it had room).
    warned: bool,
}

fn size(topic: &str, retain: &Retain) -> usize {
    topic.len() + retain.publish.payload.len()
}

impl Inner {
    /// Stores, replaces or (empty payload) clears the message of `topic`.
    /// Returns false when the new one did not fit: then the topic keeps no
    /// retained message (an older one would be stale).
    fn set(&mut self, name: &str, topic: &Topic, retain: Retain) -> bool {
        if let Some(old) = self.tree.remove(topic) {
            self.count -= 1;
            self.bytes -= size(name, &old);
        }
        if retain.publish.payload.is_empty() {
            return true;
        }
        let new = size(name, &retain);
        if self.count >= self.max_messages || self.bytes + new > self.max_bytes {
            return false;
        }
        self.tree.insert(topic, retain);
        self.count += 1;
        self.bytes += new;
        self.most = self.most.max(self.count);
        true
    }
}

#[async_trait]
impl RetainStorage for Store {
    fn enable(&self) -> bool {
        true
    }

    async fn set(
        &self,
        name: &TopicName,
        retain: Retain,
        _expiry: Option<Duration>,
    ) -> rmqtt::Result<()> {
        let topic = Topic::from_str(name)?;
        let mut inner = self.0.lock();
        if inner.set(name, &topic, retain) {
            if inner.count < inner.max_messages && inner.bytes < inner.max_bytes / 2 {
                inner.warned = false;
            }
        } else if !inner.warned {
            inner.warned = true;
            tracing::warn!(
                topic = %name,
                messages = inner.count,
                bytes = inner.bytes,
                "the embedded MQTT broker's retained store is full ({} messages or {} bytes): \
                 new retained messages are delivered but not kept",
                inner.max_messages,
                inner.max_bytes,
            );
        }
        Ok(())
    }

    async fn get(&self, filter: &TopicFilter) -> rmqtt::Result<Vec<(TopicName, Retain)>> {
        let filter = Topic::from_str(filter)?;
        let found = self.0.lock().tree.matches(&filter);
        Ok(found
            .into_iter()
            .map(|(topic, retain)| (TopicName::from(topic.to_string()), retain))
            .collect())
    }

    async fn count(&self) -> isize {
        self.0.lock().count as isize
    }

    async fn max(&self) -> isize {
        self.0.lock().most as isize
    }
}
