//! Retained-message replay for `subscribe` with `"retained": true`.
//!
//! The broker sends retained messages only to a *new* subscription, and the
//! main link's subscriptions are shared by every connection (a second client
//! subscribing to `fleet/#` creates nothing new at the broker). So retained
//! messages are fetched on a second, clean-session MQTT connection: subscribe
//! to the filter, collect what arrives with the retain flag until the broker
//! has been quiet for a moment, unsubscribe. Fetches run one at a time on that
//! connection, so what arrives belongs to the fetch under way.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, QoS, SubscribeReasonCode,
};
use tokio::sync::{mpsc, oneshot};

use crate::channel;
use crate::server::mqtt::{Events, LinkError};

/// Quiet time after which the retained messages are taken to be complete.
const QUIET: Duration = Duration::from_millis(100);
/// Longest a fetch collects.
const MAX_COLLECT: Duration = Duration::from_secs(2);
/// Most retained messages replayed for one subscribe.
pub const MAX_RETAINED: usize = 10_000;

#[derive(Default)]
struct Fetch {
    connected: bool,
    filter: Option<String>,
    suback: Option<oneshot::Sender<bool>>,
    found: Option<mpsc::UnboundedSender<(String, Bytes)>>,
}

/// The retained-message fetcher.
pub struct Retained {
    client: AsyncClient,
    one_at_a_time: tokio::sync::Mutex<()>,
    state: Mutex<Fetch>,
}

impl Retained {
    pub fn new(opts: MqttOptions) -> (Arc<Retained>, EventLoop) {
        let (client, eventloop) = AsyncClient::new(opts, 64);
        let r = Retained {
            client,
            one_at_a_time: tokio::sync::Mutex::new(()),
            state: Mutex::new(Fetch::default()),
        };
        (Arc::new(r), eventloop)
    }

    /// The retained messages on topics `filter` (a broker filter) matches, as
    /// (topic, payload), one per topic.
    pub async fn fetch(&self, filter: &str) -> Result<Vec<(String, Bytes)>, LinkError> {
        let _turn = self.one_at_a_time.lock().await;
        // Right after start-up or a reconnect, give the connection a moment.
        for _ in 0..50 {
            if self.state.lock().connected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (sub_tx, sub_rx) = oneshot::channel();
        let (found_tx, mut found_rx) = mpsc::unbounded_channel();
        {
            let mut st = self.state.lock();
            if !st.connected {
                return Err(LinkError::Unavailable(
                    "the MQTT broker is not connected; retry later".into(),
                ));
            }
            st.filter = Some(filter.to_string());
            st.suback = Some(sub_tx);
            st.found = Some(found_tx);
        }
        let result = self.collect(filter, sub_rx, &mut found_rx).await;
        {
            let mut st = self.state.lock();
            st.filter = None;
            st.suback = None;
            st.found = None;
        }
        let _ = self.client.try_unsubscribe(filter);
        result
    }

    async fn collect(
        &self,
        filter: &str,
        suback: oneshot::Receiver<bool>,
        found: &mut mpsc::UnboundedReceiver<(String, Bytes)>,
    ) -> Result<Vec<(String, Bytes)>, LinkError> {
        if self.client.try_subscribe(filter, QoS::AtMostOnce).is_err() {
            return Err(LinkError::Unavailable(
                "the retained-message fetcher is busy".into(),
            ));
        }
        match tokio::time::timeout(Duration::from_secs(5), suback).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                return Err(LinkError::Refused(format!(
                    "the MQTT broker refused the subscription to {filter:?}"
                )))
            }
            _ => {
                return Err(LinkError::Unavailable(
                    "the MQTT broker did not answer in time; retry later".into(),
                ))
            }
        }
        let deadline = Instant::now() + MAX_COLLECT;
        let mut messages = BTreeMap::new();
        loop {
            let wait = QUIET.min(deadline.saturating_duration_since(Instant::now()));
            match tokio::time::timeout(wait, found.recv()).await {
                Ok(Some((topic, payload))) => {
                    if messages.len() < MAX_RETAINED || messages.contains_key(&topic) {
                        messages.insert(topic, payload);
                    }
                }
                _ => break,
            }
        }
        if messages.len() >= MAX_RETAINED {
            tracing::warn!(filter, limit = MAX_RETAINED, "retained replay truncated");
        }
        Ok(messages.into_iter().collect())
    }

    fn on_event(&self, event: Event) {
        let mut st = self.state.lock();
        match event {
            Event::Incoming(Incoming::ConnAck(_)) => st.connected = true,
            Event::Incoming(Incoming::SubAck(ack)) => {
                let ok = ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                if let Some(tx) = st.suback.take() {
                    let _ = tx.send(ok);
                }
            }
            Event::Incoming(Incoming::Publish(p)) if p.retain => {
                if let (Some(filter), Some(tx)) = (&st.filter, &st.found) {
                    if channel::matches(filter, &p.topic) {
                        let _ = tx.send((p.topic, p.payload));
                    }
                }
            }
            _ => {}
        }
    }
}

impl Events for Retained {
    fn on_event(&self, event: Event) {
        Retained::on_event(self, event);
    }
    fn on_error(&self, _: &EventLoop, error: &ConnectionError, _: u32) {
        self.state.lock().connected = false;
        tracing::debug!(%error, "retained fetcher: MQTT connection failed");
    }
}
