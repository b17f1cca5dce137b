//! The MQTT link: the bridge's one session with the broker.
//!
//! It owns three things:
//! * the **broker cover** ([`Cover`]): which filters the bridge subscribes to,
//!   kept pairwise disjoint so every message arrives once, and in step with
//!   the [`Hub`] index (both change only under this link's lock);
//! * **publishes** from web clients, acknowledged when the broker acknowledges
//!   them (PUBACK for QoS 1, written for QoS 0);
//! * the **connection's life**: QoS 1 persistent session (clean session off),
//!   reconnect with capped exponential backoff, resubscribe of the whole cover
//!   on every CONNACK, `unavailable` for requests while the broker is away.
//!
//! Beside it: [`correlator`] (which request a packet id belongs to),
//! [`connection`] (the event loop's task, [`Events`], reconnect backoff) and
//! [`options`] (what the bridge connects with). Incoming messages go straight
//! to [`Hub::deliver`], which never blocks.

mod connection;
mod correlator;
mod options;

pub use connection::{drive, Events, FLAPPING, STABLE};
pub use options::{mqtt_options, system_ca_bundle};

use correlator::Correlator;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS, Request,
    SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::{oneshot, watch};

use crate::cover::Cover;
use crate::server::hub::{Conn, ConnId, Hub};
use crate::server::metrics::Metrics;

/// How long a request may wait for the broker before the client is told
/// `unavailable`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Filters per SUBSCRIBE packet (AWS IoT Core accepts at most 8).
const FILTERS_PER_SUBSCRIBE: usize = 8;
/// Why the link could not carry out a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The broker is away or did not answer in time.
    #[error("{0}")]
    Unavailable(String),
    /// The broker refused the subscription.
    #[error("{0}")]
    Refused(String),
}

fn unavailable(why: &str) -> LinkError {
    LinkError::Unavailable(why.to_string())
}

type Reply = oneshot::Sender<Result<(), LinkError>>;

/// A SUBSCRIBE packet's filters and why they were sent.
#[derive(Debug)]
struct SubChunk {
    filters: Vec<String>,
    resync: bool,
}

/// A client filter waiting for the broker.
struct Waiter {
    filter: String,
    conn: Arc<Conn>,
    reply: Reply,
}

/// One round of new broker subscriptions.
struct Batch {
    /// The new element each waiting filter needs (filters not here were
    /// covered already).
    element_of: HashMap<String, String>,
    /// New elements and, once the SUBACK is in, whether the broker took them.
    results: BTreeMap<String, Option<bool>>,
    waiters: Vec<Waiter>,
    chunks_left: usize,
}

#[derive(Default)]
struct State {
    connected: bool,
    /// When the current session began.
    connected_at: Option<Instant>,
    /// Sessions in a row that the broker ended soon, with nothing in flight.
    quiet_drops: u32,
    committed: Cover,
    /// Filters subscribed at the broker and not confirmed unsubscribed.
    broker: BTreeSet<String>,
    queue: Vec<Waiter>,
    batch: Option<Batch>,
    publishes: Correlator<Reply>,
    collided: Option<(u16, Reply)>,
    subscribes: Correlator<SubChunk>,
    unsubscribes: Correlator<String>,
}

/// The bridge's MQTT session.
pub struct Link {
    client_id: String,
    state: Mutex<State>,
    client: AsyncClient,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    up: watch::Sender<bool>,
}
impl Link {
    /// Creates the link; [`drive`] must then poll the event loop.
    pub fn new(opts: MqttOptions, hub: Arc<Hub>, metrics: Arc<Metrics>) -> (Arc<Link>, EventLoop) {
        let client_id = opts.client_id();
        let (client, eventloop) = AsyncClient::new(opts, 4096);
        let (up, _) = watch::channel(false);
        let link = Arc::new(Link {
            client_id,
            state: Mutex::new(State::default()),
            client,
            hub,
            metrics,
            up,
        });
        (link, eventloop)
    }

    /// Subscribes to `filter` for good, before the first connect: client
    /// filters it covers need nothing more from the broker (see
    /// [`Cover::pin`]).
    pub fn pin(&self, filter: &str) {
        let mut st = self.state.lock();
        st.committed.pin(filter);
        self.metrics
            .broker_subscriptions
            .set(st.committed.len() as i64);
    }

    /// Whether the broker connection is up.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Watches the broker state (true = up).
    pub fn watch_up(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// Makes `conn` a holder of the broker filter `filter`, subscribing at the
    /// broker first when no broker filter covers it yet.
    pub async fn subscribe(&self, conn: &Arc<Conn>, filter: &str) -> Result<(), LinkError> {
        let rx = {
            let mut st = self.state.lock();
            if !st.connected {
                return Err(unavailable("the MQTT broker is not connected; retry later"));
            }
            if st.committed.element_for(filter).is_some() {
                st.committed.add(filter);
                self.hub.insert(filter, conn);
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            st.queue.push(Waiter {
                filter: filter.to_string(),
                conn: conn.clone(),
                reply: tx,
            });
            self.pump(&mut st);
            rx
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(unavailable("the MQTT link went away")),
            Err(_) => Err(unavailable(
                "the MQTT broker did not answer in time; retry later",
            )),
        }
    }

    /// `conn` no longer holds `filter`. Never waits for the broker.
    pub fn unsubscribe(&self, conn: ConnId, filter: &str) {
        let mut st = self.state.lock();
        self.release(&mut st, conn, filter);
    }

    /// A connection closed: let go of all its filters at once.
    pub fn drop_conn<'a>(&self, conn: ConnId, filters: impl IntoIterator<Item = &'a String>) {
        let mut st = self.state.lock();
        for filter in filters {
            self.release(&mut st, conn, filter);
        }
    }

    fn release(&self, st: &mut State, conn: ConnId, filter: &str) {
        if self.hub.remove(filter, conn) == Some(0) {
            let change = st.committed.remove(filter);
            for element in change.unsubscribe {
                self.send_unsubscribe(st, element);
            }
            self.metrics
                .broker_subscriptions
                .set(st.committed.len() as i64);
        }
    }

    /// Hands a publish to the broker now (so publishes keep their order) and
    /// returns the wait for its acknowledgement.
    pub fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
    ) -> Result<impl Future<Output = Result<(), LinkError>> + Send + 'static, LinkError> {
        let mut st = self.state.lock();
        if !st.connected {
            return Err(unavailable("the MQTT broker is not connected; retry later"));
        }
        let qos = if qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let (tx, rx) = oneshot::channel();
        // Queue the reply before the request: the event loop may report the
        // request at once.
        st.publishes.fifo.push_back(tx);
        if self
            .client
            .try_publish(topic, qos, retain, payload)
            .is_err()
        {
            st.publishes.fifo.pop_back();
            return Err(unavailable("the bridge's MQTT queue is full; retry later"));
        }
        Ok(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(unavailable("the MQTT link went away")),
                Err(_) => Err(unavailable(
                    "the MQTT broker did not acknowledge in time; the message may or may not have been published",
                )),
            }
        })
    }

    /// Unsubscribes everything and says goodbye to the broker, so a
    /// persistent session left behind queues nothing.
    pub async fn shutdown(&self) {
        {
            let mut st = self.state.lock();
            let all: Vec<String> = st.broker.iter().cloned().collect();
            for filter in all {
                self.send_unsubscribe(&mut st, filter);
            }
            st.connected = false;
            for w in std::mem::take(&mut st.queue) {
                let _ = w
                    .reply
                    .send(Err(unavailable("the bridge is shutting down")));
            }
        }
        let _ = self.client.disconnect().await;
    }

    // ---- a new session (called through `Events`) ----

    fn on_connack(&self, session_present: bool) {
        let mut st = self.state.lock();
        st.connected = true;
        st.connected_at = Some(Instant::now());
        self.metrics.broker_connects.inc();
        self.metrics.broker_up.set(1);
        tracing::info!(session_present, "connected to the MQTT broker");
        for reply in st.publishes.connected(session_present) {
            let _ = reply.send(Err(unavailable(
                "the MQTT connection was lost before the broker acknowledged",
            )));
        }
        if let Some((_, reply)) = st.collided.take() {
            let _ = reply.send(Err(unavailable(
                "the MQTT connection was lost before the broker acknowledged",
            )));
        }
        st.subscribes.connected(session_present);
        for filter in st.unsubscribes.connected(session_present) {
            st.broker.insert(filter);
        }
        // Resubscribe the whole cover; drop what the broker may still hold.
        let elements: Vec<String> = st.committed.elements();
        for chunk in elements.chunks(FILTERS_PER_SUBSCRIBE) {
            self.send_subscribe(&mut st, chunk.to_vec(), true);
        }
        let stale: Vec<String> = st
            .broker
            .iter()
            .filter(|f| !elements.contains(f))
            .cloned()
            .collect();
        for filter in stale {
            self.send_unsubscribe(&mut st, filter);
        }
        self.up.send_replace(true);
        self.pump(&mut st);
    }

    // ---- the subscription rounds ----

    /// Starts a round for the queued filters if none is running.
    fn pump(&self, st: &mut State) {
        if st.batch.is_some() || !st.connected || st.queue.is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut st.queue);
        let plan = st.committed.plan(waiters.iter().map(|w| w.filter.as_str()));
        let element_of: HashMap<String, String> = plan
            .new
            .iter()
            .flat_map(|(e, members)| members.iter().map(move |m| (m.clone(), e.clone())))
            .collect();
        let new: Vec<String> = plan.new.into_iter().map(|(e, _)| e).collect();
        let chunks: Vec<Vec<String>> = new
            .chunks(FILTERS_PER_SUBSCRIBE)
            .map(<[String]>::to_vec)
            .collect();
        st.batch = Some(Batch {
            element_of,
            results: new.iter().map(|e| (e.clone(), None)).collect(),
            waiters,
            chunks_left: chunks.len(),
        });
        if chunks.is_empty() {
            self.finish_batch(st);
            return;
        }
        for chunk in chunks {
            if !self.send_subscribe(st, chunk, false) {
                let batch = st.batch.take().expect("just set");
                for w in batch.waiters {
                    let _ = w.reply.send(Err(unavailable(
                        "the bridge's MQTT queue is full; retry later",
                    )));
                }
                return;
            }
        }
    }

    fn send_subscribe(&self, st: &mut State, filters: Vec<String>, resync: bool) -> bool {
        let request = filters
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        st.subscribes.fifo.push_back(SubChunk {
            filters: filters.clone(),
            resync,
        });
        if self.client.try_subscribe_many(request).is_err() {
            st.subscribes.fifo.pop_back();
            tracing::error!(?filters, "could not queue a SUBSCRIBE");
            return false;
        }
        true
    }

    fn send_unsubscribe(&self, st: &mut State, filter: String) {
        if !st.connected {
            // Done on the next CONNACK (it unsubscribes what is not in the cover).
            return;
        }
        st.unsubscribes.fifo.push_back(filter.clone());
        if self.client.try_unsubscribe(filter.clone()).is_err() {
            st.unsubscribes.fifo.pop_back();
            tracing::warn!(
                filter,
                "could not queue an UNSUBSCRIBE; retried on reconnect"
            );
        }
    }

    fn on_suback(&self, st: &mut State, chunk: SubChunk, ok: Vec<bool>) {
        for (filter, ok) in chunk
            .filters
            .iter()
            .zip(ok.iter().copied().chain(std::iter::repeat(false)))
        {
            if ok {
                st.broker.insert(filter.clone());
            } else {
                tracing::error!(filter, "the MQTT broker refused the subscription");
            }
            if chunk.resync {
                continue;
            }
            match st.batch.as_mut() {
                Some(batch) if batch.results.contains_key(filter) => {
                    batch.results.insert(filter.clone(), Some(ok));
                }
                // A round abandoned when the connection dropped, answered by
                // a resumed session: not wanted any more.
                _ => {
                    if ok && !st.committed.contains(filter) {
                        self.send_unsubscribe(st, filter.clone());
                    }
                }
            }
        }
        if chunk.resync {
            return;
        }
        let done = match st.batch.as_mut() {
            Some(batch) if chunk.filters.iter().any(|f| batch.results.contains_key(f)) => {
                batch.chunks_left -= 1;
                batch.chunks_left == 0
            }
            _ => false,
        };
        if done {
            self.finish_batch(st);
        }
    }

    fn finish_batch(&self, st: &mut State) {
        let Some(batch) = st.batch.take() else { return };
        let mut replaced = Vec::new();
        for (element, ok) in &batch.results {
            if *ok == Some(true) {
                let members = batch
                    .waiters
                    .iter()
                    .filter(|w| batch.element_of.get(&w.filter) == Some(element))
                    .map(|w| w.filter.clone());
                replaced.extend(st.committed.install(element, members));
            }
        }
        for w in batch.waiters {
            let element = batch.element_of.get(&w.filter).map(String::as_str);
            let refused = element
                .and_then(|e| batch.results.get(e))
                .is_some_and(|r| *r != Some(true));
            if refused {
                let _ = w.reply.send(Err(LinkError::Refused(format!(
                    "the MQTT broker refused the subscription to {:?}",
                    element.unwrap_or_default()
                ))));
                continue;
            }
            if st.committed.element_for(&w.filter).is_none() {
                // Its element was released while the round ran: next round.
                st.queue.push(w);
                continue;
            }
            st.committed.add(&w.filter);
            if w.reply.send(Ok(())).is_ok() {
                self.hub.insert(&w.filter, &w.conn);
            } else if self.hub.holders(&w.filter) == 0 {
                // The client gave up waiting: nobody holds it.
                for e in st.committed.remove(&w.filter).unsubscribe {
                    self.send_unsubscribe(st, e);
                }
            }
        }
        for element in replaced {
            self.send_unsubscribe(st, element);
        }
        self.metrics
            .broker_subscriptions
            .set(st.committed.len() as i64);
        self.pump(st);
    }
}
/// The link's side of its MQTT connection's events (called by the poll task).
impl Events for Link {
    fn on_event(&self, event: Event) {
        match event {
            // Retained copies sent because of a (re)subscription are not live
            // messages; retained replay is the fetcher's job.
            Event::Incoming(Incoming::Publish(p)) if !p.retain => {
                self.metrics.mqtt_messages_in.inc();
                self.hub.deliver(&p.topic, &p.payload, Instant::now());
            }
            Event::Incoming(Incoming::ConnAck(ack)) => self.on_connack(ack.session_present),
            Event::Incoming(Incoming::PubAck(ack)) => {
                let mut st = self.state.lock();
                if let Some(reply) = st.publishes.acked(ack.pkid) {
                    self.metrics.ws_publishes.inc();
                    let _ = reply.send(Ok(()));
                }
            }
            Event::Incoming(Incoming::SubAck(ack)) => {
                let mut st = self.state.lock();
                if let Some(chunk) = st.subscribes.acked(ack.pkid) {
                    let ok = ack
                        .return_codes
                        .iter()
                        .map(|c| matches!(c, SubscribeReasonCode::Success(_)));
                    self.on_suback(&mut st, chunk, ok.collect());
                }
            }
            Event::Incoming(Incoming::UnsubAck(ack)) => {
                let mut st = self.state.lock();
                if let Some(filter) = st.unsubscribes.acked(ack.pkid) {
                    if !st.committed.contains(&filter) {
                        st.broker.remove(&filter);
                    }
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let mut st = self.state.lock();
                if let Some((id, _)) = &st.collided {
                    if *id == pkid && !st.publishes.inflight.contains_key(&pkid) {
                        let (_, reply) = st.collided.take().expect("checked");
                        st.publishes.inflight.insert(pkid, reply);
                        return;
                    }
                }
                if let Some(reply) = st.publishes.sent(pkid) {
                    self.metrics.ws_publishes.inc();
                    let _ = reply.send(Ok(()));
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                let mut st = self.state.lock();
                if let Some(reply) = st.publishes.fifo.pop_front() {
                    st.collided = Some((pkid, reply));
                }
            }
            Event::Outgoing(Outgoing::Subscribe(pkid)) => {
                self.state.lock().subscribes.sent(pkid);
            }
            Event::Outgoing(Outgoing::Unsubscribe(pkid)) => {
                self.state.lock().unsubscribes.sent(pkid);
            }
            _ => {}
        }
    }

    fn on_error(
        &self,
        eventloop: &mut EventLoop,
        error: &ConnectionError,
        attempt: u32,
        lasted: Option<Duration>,
    ) {
        // Events rumqttc produced but has not returned yet are taken now, so
        // the correlators know exactly what was sent.
        let stale: Vec<Event> = eventloop.state.events.drain(..).collect();
        for event in stale {
            self.on_event(event);
        }
        // The publishes that were on the wire: rumqttc keeps them to re-send
        // on the next session. A broker that dropped the session because of
        // one of them would drop it again after every reconnect, for ever, so
        // they are never re-sent: their clients are told, and may retry.
        let mut suspects: Vec<(String, usize)> = Vec::new();
        eventloop.pending.retain(|r| match r {
            Request::Publish(p) if p.pkid != 0 => {
                suspects.push((p.topic.clone(), p.payload.len()));
                false
            }
            _ => true,
        });
        let mut st = self.state.lock();
        let was_up = st.connected;
        st.connected = false;
        self.up.send_replace(false);
        self.metrics.broker_up.set(0);
        let in_flight = !st.publishes.inflight.is_empty()
            || !st.subscribes.inflight.is_empty()
            || !st.unsubscribes.inflight.is_empty()
            || st.batch.is_some();
        for (_, reply) in st.publishes.inflight.drain() {
            let _ = reply.send(Err(unavailable(
                "the MQTT broker closed the bridge's connection before acknowledging this \
                 publish; it was not re-sent (it may or may not have been published)",
            )));
        }
        if let Some((topic, bytes)) = suspects.first() {
            tracing::warn!(
                %error,
                publishes = suspects.len(),
                first_topic = %topic,
                first_bytes = bytes,
                "the MQTT broker closed the connection with publishes in flight; they are not \
                 re-sent (their clients get `unavailable`)"
            );
        } else if was_up {
            tracing::warn!(%error, "MQTT connection lost; reconnecting");
        } else if attempt == 1 || attempt.is_multiple_of(30) {
            tracing::warn!(%error, attempt, "cannot connect to the MQTT broker; retrying");
        } else {
            tracing::debug!(%error, attempt, "MQTT connect failed");
        }
        // A session the broker ends again and again soon after CONNACK, with
        // nothing of ours in flight: most likely another client with our id
        // (two nodes with the same --mqtt-client-id take the session from
        // each other). `drive` backs off; say what it is, once.
        match lasted {
            Some(t) if t < STABLE && !in_flight && suspects.is_empty() => {
                st.quiet_drops += 1;
                if st.quiet_drops == FLAPPING {
                    self.metrics.broker_takeovers.inc();
                    tracing::error!(
                        client_id = %self.client_id,
                        "the MQTT broker closed the bridge's session {FLAPPING} times in a row \
                         soon after connecting, with no request in flight: another MQTT client \
                         is probably connected with the same client id. Give every bridge node \
                         its own --mqtt-client-id. Reconnecting with a longer backoff."
                    );
                }
            }
            Some(t) if t >= STABLE => st.quiet_drops = 0,
            _ => {}
        }
        // What rumqttc still holds for the next session (never sent).
        let count_pending =
            |f: fn(&Request) -> bool| eventloop.pending.iter().filter(|r| f(r)).count();
        st.publishes.lost(
            0,
            count_pending(|r| matches!(r, Request::Publish(p) if p.pkid == 0)),
        );
        st.subscribes
            .lost(0, count_pending(|r| matches!(r, Request::Subscribe(_))));
        st.unsubscribes
            .lost(0, count_pending(|r| matches!(r, Request::Unsubscribe(_))));
        // Waiting subscribers are told now rather than left hanging.
        if let Some(batch) = st.batch.take() {
            for w in batch.waiters {
                let _ = w.reply.send(Err(unavailable(
                    "the MQTT connection was lost; retry later",
                )));
            }
        }
        for w in std::mem::take(&mut st.queue) {
            let _ = w.reply.send(Err(unavailable(
                "the MQTT connection was lost; retry later",
            )));
        }
    }
}
