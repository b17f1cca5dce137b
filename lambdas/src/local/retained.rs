//! The broker's retained messages, as IoT Core's `GetRetainedMessage` and
//! `ListRetainedMessages` read them.
//!
//! An MQTT 5 session subscribes to `#` with *retain as published*: it gets
//! every retained message when it subscribes (and again after a reconnect),
//! then every later publish with its retain flag as the publisher set it.
//! A retained publish sets its topic's entry, an empty one removes it. So
//! the mirror follows the broker's retained store, whoever published (a
//! device, a web client through the IoT Data Plane). `#` does not match
//! `$`-topics, which are not mirrored.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use tokio::sync::mpsc;

use crate::local::broker::{self, BrokerUrl, Note};

/// One retained message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    pub payload: Bytes,
    pub qos: u8,
    /// When it was last set, ms since the epoch.
    pub modified: i64,
    pub user_properties: Vec<(String, String)>,
}

/// The retained messages by topic.
#[derive(Default)]
pub struct Mirror {
    map: Mutex<BTreeMap<String, Retained>>,
}

impl Mirror {
    /// Follows the broker's retained messages (waits for the subscription).
    pub async fn follow(url: &BrokerUrl) -> Result<Arc<Mirror>, String> {
        let mirror: Arc<Mirror> = Arc::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut filter = Filter::new("#", QoS::AtLeastOnce);
        filter.preserve_retain = true;
        filter.retain_forward_rule = RetainForwardRule::OnEverySubscribe;
        let m = mirror.clone();
        tokio::spawn(async move {
            while let Some(note) = rx.recv().await {
                match note {
                    // The broker sends them all again.
                    Note::Connected => m.map.lock().unwrap().clear(),
                    Note::Message(msg) if msg.retain => {
                        m.set(&msg.topic, msg.payload, msg.qos, msg.user_properties)
                    }
                    Note::Message(_) => {}
                }
            }
        });
        broker::subscribe(url, "retained", vec![filter], tx).await?;
        Ok(mirror)
    }

    /// A retained publish: sets the topic's message, or removes it when
    /// the payload is empty.
    pub fn set(
        &self,
        topic: &str,
        payload: Bytes,
        qos: u8,
        user_properties: Vec<(String, String)>,
    ) {
        let mut map = self.map.lock().unwrap();
        if payload.is_empty() {
            map.remove(topic);
        } else {
            map.insert(
                topic.to_string(),
                Retained {
                    payload,
                    qos,
                    modified: crate::now_millis(),
                    user_properties,
                },
            );
        }
    }

    pub fn get(&self, topic: &str) -> Option<Retained> {
        self.map.lock().unwrap().get(topic).cloned()
    }

    /// Up to `max` (topic, message) after `after`, in topic order, and
    /// whether more follow.
    pub fn page(&self, after: Option<&str>, max: usize) -> (Vec<(String, Retained)>, bool) {
        let map = self.map.lock().unwrap();
        let mut items = map
            .range::<str, _>((
                after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
                std::ops::Bound::Unbounded,
            ))
            .map(|(k, v)| (k.clone(), v.clone()));
        let page: Vec<_> = items.by_ref().take(max).collect();
        let more = items.next().is_some();
        (page, more)
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_remove_and_pages() {
        let m = Mirror::default();
        for t in ["b", "a", "c"] {
            m.set(t, Bytes::from_static(b"x"), 1, vec![]);
        }
        m.set("d", Bytes::from_static(b"y"), 0, vec![]);
        m.set("d", Bytes::new(), 0, vec![]);
        assert_eq!(m.len(), 3);
        let (page, more) = m.page(None, 2);
        assert_eq!(
            page.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(more);
        let (page, more) = m.page(Some("b"), 2);
        assert_eq!(
            page.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert!(!more);
    }
}
