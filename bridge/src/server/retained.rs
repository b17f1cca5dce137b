//! Retained-message replay for `subscribe` with `"retained": true`.
//!
//! The broker sends retained messages only to a *new* subscription, and the
//! main link's subscriptions are shared by every connection (a second client
//! subscribing to `fleet/#` creates nothing new at the broker). So retained
//! messages are fetched on a second, clean-session MQTT connection: subscribe
//! to the filter, collect what arrives with the retain flag until the broker
//! has been quiet for a moment, unsubscribe.
//!
//! Bounded, and shared:
//! * fetches of different filters run at once on that connection (a retained
//!   message goes to every fetch whose filter matches it); fetches of the same
//!   filter at the same time are one fetch whose result every asker shares;
//! * a fetch keeps at most [`MAX_RETAINED`] messages and `max_bytes` of
//!   payload (the connection's outbound bound: a replay counts against it);
//!   what does not fit is counted in [`RetainedSet::overflow`], so the client
//!   can be told with `lagged`;
//! * a fetch collects for at most [`MAX_COLLECT`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS,
    SubscribeReasonCode,
};
use tokio::sync::{oneshot, Notify};

use crate::channel;
use crate::server::mqtt::{Events, LinkError};

/// Quiet time after which the retained messages are taken to be complete.
const QUIET: Duration = Duration::from_millis(100);
/// Longest a fetch collects.
const MAX_COLLECT: Duration = Duration::from_secs(2);
/// Longest the broker may take to answer the SUBSCRIBE.
const SUBACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Most retained messages replayed for one subscribe.
pub const MAX_RETAINED: usize = 10_000;

/// What one fetch found: (topic, payload) in topic order, one per topic.
#[derive(Debug, Default)]
pub struct RetainedSet {
    pub messages: Vec<(String, Bytes)>,
    /// Retained messages that matched but did not fit the bounds.
    pub overflow: u64,
}

type Answer = Result<Arc<RetainedSet>, LinkError>;

enum Started {
    New(Arc<Notify>, oneshot::Receiver<bool>),
    Joined(oneshot::Receiver<Answer>),
    Err(LinkError),
}

/// One filter being fetched.
struct Fetch {
    found: BTreeMap<String, Bytes>,
    bytes: usize,
    overflow: u64,
    /// Wakes the fetching task when something arrives.
    arrived: Arc<Notify>,
    suback: Option<oneshot::Sender<bool>>,
    /// Askers who joined while it ran.
    joined: Vec<oneshot::Sender<Answer>>,
}

#[derive(Default)]
struct State {
    connected: bool,
    fetches: HashMap<String, Fetch>,
    /// Filters whose SUBSCRIBE has not been given a packet id yet, in order.
    unsent: VecDeque<String>,
    /// SUBSCRIBEs in flight by packet id.
    inflight: HashMap<u16, String>,
}

/// The retained-message fetcher.
pub struct Retained {
    client: AsyncClient,
    max_bytes: usize,
    state: Mutex<State>,
}

impl Retained {
    /// A fetcher keeping at most `max_bytes` of payload per fetch.
    pub fn new(opts: MqttOptions, max_bytes: usize) -> (Arc<Retained>, EventLoop) {
        let (client, eventloop) = AsyncClient::new(opts, 256);
        let r = Retained {
            client,
            max_bytes,
            state: Mutex::new(State::default()),
        };
        (Arc::new(r), eventloop)
    }

    /// The retained messages on topics `filter` (a broker filter) matches.
    pub async fn fetch(&self, filter: &str) -> Answer {
        // Right after start-up or a reconnect, give the connection a moment.
        for _ in 0..50 {
            if self.state.lock().connected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = match self.start(filter) {
            Started::Err(e) => return Err(e),
            Started::Joined(rx) => {
                return match tokio::time::timeout(SUBACK_TIMEOUT + MAX_COLLECT * 2, rx).await {
                    Ok(Ok(answer)) => answer,
                    _ => Err(unavailable()),
                };
            }
            Started::New(arrived, suback) => (arrived, suback),
        };
        let (arrived, suback) = started;
        let outcome = self.collect(filter, suback, &arrived).await;
        let fetch = self.state.lock().fetches.remove(filter);
        let _ = self.client.try_unsubscribe(filter);
        let answer = match (outcome, fetch) {
            (Ok(()), Some(fetch)) => {
                if fetch.overflow > 0 {
                    tracing::warn!(
                        filter,
                        kept = fetch.found.len(),
                        overflow = fetch.overflow,
                        "retained replay truncated"
                    );
                }
                let set = Arc::new(RetainedSet {
                    messages: fetch.found.into_iter().collect(),
                    overflow: fetch.overflow,
                });
                for tx in fetch.joined {
                    let _ = tx.send(Ok(set.clone()));
                }
                Ok(set)
            }
            (Ok(()), None) => Err(unavailable()),
            (Err(e), fetch) => {
                for tx in fetch.into_iter().flat_map(|f| f.joined) {
                    let _ = tx.send(Err(e.clone()));
                }
                Err(e)
            }
        };
        answer
    }

    /// Joins a fetch of `filter` under way, or starts one.
    fn start(&self, filter: &str) -> Started {
        let mut st = self.state.lock();
        if !st.connected {
            return Started::Err(unavailable());
        }
        if let Some(running) = st.fetches.get_mut(filter) {
            let (tx, rx) = oneshot::channel();
            running.joined.push(tx);
            return Started::Joined(rx);
        }
        if self.client.try_subscribe(filter, QoS::AtMostOnce).is_err() {
            return Started::Err(LinkError::Unavailable(
                "the retained-message fetcher is busy; retry later".into(),
            ));
        }
        st.unsent.push_back(filter.to_string());
        let arrived = Arc::new(Notify::new());
        let (tx, rx) = oneshot::channel();
        st.fetches.insert(
            filter.to_string(),
            Fetch {
                found: BTreeMap::new(),
                bytes: 0,
                overflow: 0,
                arrived: arrived.clone(),
                suback: Some(tx),
                joined: Vec::new(),
            },
        );
        Started::New(arrived, rx)
    }

    async fn collect(
        &self,
        filter: &str,
        suback: oneshot::Receiver<bool>,
        arrived: &Notify,
    ) -> Result<(), LinkError> {
        match tokio::time::timeout(SUBACK_TIMEOUT, suback).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                return Err(LinkError::Refused(format!(
                    "the MQTT broker refused the subscription to {filter:?}"
                )))
            }
            Ok(Err(_)) => return Err(unavailable()),
            Err(_) => {
                return Err(LinkError::Unavailable(
                    "the MQTT broker did not answer in time; retry later".into(),
                ))
            }
        }
        let deadline = Instant::now() + MAX_COLLECT;
        loop {
            let wait = QUIET.min(deadline.saturating_duration_since(Instant::now()));
            if wait.is_zero()
                || tokio::time::timeout(wait, arrived.notified())
                    .await
                    .is_err()
            {
                return Ok(());
            }
        }
    }
}

fn unavailable() -> LinkError {
    LinkError::Unavailable("the MQTT broker is not connected; retry later".into())
}

impl Events for Retained {
    fn on_event(&self, event: Event) {
        let mut st = self.state.lock();
        match event {
            Event::Incoming(Incoming::ConnAck(_)) => st.connected = true,
            Event::Outgoing(Outgoing::Subscribe(pkid)) => {
                if let Some(filter) = st.unsent.pop_front() {
                    st.inflight.insert(pkid, filter);
                }
            }
            Event::Incoming(Incoming::SubAck(ack)) => {
                let ok = ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                if let Some(filter) = st.inflight.remove(&ack.pkid) {
                    if let Some(tx) = st.fetches.get_mut(&filter).and_then(|f| f.suback.take()) {
                        let _ = tx.send(ok);
                    }
                }
            }
            Event::Incoming(Incoming::Publish(p)) if p.retain => {
                let max_bytes = self.max_bytes;
                for (filter, fetch) in st.fetches.iter_mut() {
                    if !channel::matches(filter, &p.topic) {
                        continue;
                    }
                    let before = fetch.found.get(&p.topic).map_or(0, Bytes::len);
                    let fits = fetch.bytes - before + p.payload.len() <= max_bytes
                        && (before > 0 || fetch.found.len() < MAX_RETAINED);
                    if fits {
                        fetch.bytes = fetch.bytes - before + p.payload.len();
                        fetch.found.insert(p.topic.clone(), p.payload.clone());
                    } else if before == 0 {
                        fetch.overflow += 1;
                    }
                    fetch.arrived.notify_one();
                }
            }
            _ => {}
        }
    }
    fn on_error(&self, _: &mut EventLoop, error: &ConnectionError, _: u32, _: Option<Duration>) {
        let mut st = self.state.lock();
        st.connected = false;
        // Fetches under way fail (their SUBSCRIBE dies with the connection).
        st.unsent.clear();
        st.inflight.clear();
        for fetch in st.fetches.values_mut() {
            fetch.suback.take();
        }
        tracing::debug!(%error, "retained fetcher: MQTT connection failed");
    }
}
