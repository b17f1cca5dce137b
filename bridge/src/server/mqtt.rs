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
//! rumqttc does not say which request a packet id belongs to, so requests are
//! matched to ids by order: rumqttc handles requests in the order they were
//! queued and reports each with an `Outgoing` event carrying its id
//! (`Correlator`). On a lost connection it keeps the unsent ones for the next
//! session and drops them if the broker has no session for us; the
//! correlator mirrors exactly that.
//!
//! The event loop is polled in its own task ([`drive`]); incoming messages go
//! straight to [`Hub::deliver`], which never blocks.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS, Request,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{oneshot, watch};

use crate::config::{Broker, Settings};
use crate::cover::Cover;
use crate::server::hub::{Conn, ConnId, Hub};
use crate::server::metrics::Metrics;

/// How long a request may wait for the broker before the client is told
/// `unavailable`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Filters per SUBSCRIBE packet (AWS IoT Core accepts at most 8).
const FILTERS_PER_SUBSCRIBE: usize = 8;
/// A session that lasted this long was not flapping: the backoff starts over.
pub const STABLE: Duration = Duration::from_secs(10);
/// Sessions in a row shorter than [`STABLE`] after which the broker is taken
/// to be flapping (and, with nothing in flight, a client-id collision).
pub const FLAPPING: u32 = 3;
/// Longest wait between reconnects...
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// ...and while flapping.
const MAX_BACKOFF_FLAPPING: Duration = Duration::from_secs(60);
/// Largest MQTT packet accepted from the broker. Larger than any payload we
/// deliver: an oversize message is counted and skipped, never a reason to
/// drop the connection (the broker would redeliver it forever).
const MAX_INCOMING_PACKET: usize = 268_435_455;

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

/// Matches requests handed to rumqttc with the packet ids rumqttc gives them.
#[derive(Debug)]
struct Correlator<T> {
    /// Requests queued in rumqttc, in order, not yet given an id.
    fifo: VecDeque<T>,
    /// Requests sent, by packet id, awaiting their ack.
    inflight: HashMap<u16, T>,
    /// After a lost connection: `fifo` positions of requests that rumqttc
    /// holds for the next session and drops if the session is gone.
    at_risk: std::ops::Range<usize>,
}

impl<T> Default for Correlator<T> {
    fn default() -> Self {
        Correlator {
            fifo: VecDeque::new(),
            inflight: HashMap::new(),
            at_risk: 0..0,
        }
    }
}

impl<T> Correlator<T> {
    /// An `Outgoing` event: the oldest queued request got `pkid` (0 for QoS 0,
    /// which needs no ack and is returned to be resolved now). An id already
    /// in flight is a retransmission and takes nothing from the queue.
    fn sent(&mut self, pkid: u16) -> Option<T> {
        if pkid != 0 && self.inflight.contains_key(&pkid) {
            return None;
        }
        let t = self.fifo.pop_front()?;
        self.at_risk = self.at_risk.start.saturating_sub(1)..self.at_risk.end.saturating_sub(1);
        if pkid == 0 {
            return Some(t);
        }
        self.inflight.insert(pkid, t);
        None
    }

    fn acked(&mut self, pkid: u16) -> Option<T> {
        self.inflight.remove(&pkid)
    }

    /// The connection was lost: `stale` requests have events still to come,
    /// the next `pending` ones wait in rumqttc for the next session.
    fn lost(&mut self, stale: usize, pending: usize) {
        self.at_risk = stale..stale + pending;
    }

    /// CONNACK: without a session, what rumqttc held back and what was in
    /// flight is gone; returned so the callers can be told.
    fn connected(&mut self, session_present: bool) -> Vec<T> {
        let mut gone = Vec::new();
        if !session_present {
            let end = self.at_risk.end.min(self.fifo.len());
            let start = self.at_risk.start.min(end);
            gone.extend(self.fifo.drain(start..end));
            gone.extend(self.inflight.drain().map(|(_, t)| t));
        }
        self.at_risk = 0..0;
        gone
    }
}

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

/// rumqttc options for the main link (and, with another id, the retained
/// fetcher).
pub fn mqtt_options(
    settings: &Settings,
    client_id: &str,
    clean_session: bool,
) -> std::io::Result<MqttOptions> {
    let (host, port, tls) = match &settings.broker {
        Broker::Embedded(addr) => (addr.ip().to_string(), addr.port(), false),
        Broker::External { host, port, tls } => (host.clone(), *port, *tls),
    };
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(settings.keep_alive_secs));
    opts.set_clean_session(clean_session);
    opts.set_max_packet_size(
        MAX_INCOMING_PACKET,
        settings.limits.max_payload_bytes + 1024,
    );
    opts.set_inflight(100);
    if let Some(user) = &settings.username {
        let password = settings.password.as_ref().map_or("", |p| p.expose());
        opts.set_credentials(user.clone(), password);
    }
    if tls {
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
        };
        let client_auth = match (&settings.cert, &settings.key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        let ca = match &settings.ca {
            Some(p) => Some(read(p)?),
            None => system_ca_bundle(),
        };
        let transport = match ca {
            Some(ca) => Transport::tls_with_config(TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth,
            }),
            None if client_auth.is_none() => Transport::tls_with_default_config(),
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no CA bundle found on this system; pass --mqtt-ca",
                ))
            }
        };
        opts.set_transport(transport);
    }
    Ok(opts)
}

/// The system's CA bundle (Debian/Ubuntu, Amazon Linux/RHEL, Alpine paths).
pub fn system_ca_bundle() -> Option<Vec<u8>> {
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ]
    .iter()
    .find_map(|p| std::fs::read(p).ok())
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

/// What an MQTT connection's events go to (the link, the retained fetcher).
pub trait Events: Send + Sync + 'static {
    fn on_event(&self, event: Event);
    /// The connection failed (`attempt` counts failures since the last
    /// CONNACK; `lasted` is how long the session had been up, if it was).
    /// The event loop is given so that requests rumqttc would re-send can be
    /// taken out.
    fn on_error(
        &self,
        eventloop: &mut EventLoop,
        error: &ConnectionError,
        attempt: u32,
        lasted: Option<Duration>,
    );
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

/// The wait before reconnecting: capped exponential backoff (100 ms to 10 s),
/// started over only by a session that lasted, and capped at a minute while
/// sessions keep ending soon after they begin (flapping).
#[derive(Debug)]
struct Backoff {
    next: Duration,
    short_sessions: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    fn new() -> Self {
        Backoff {
            next: Self::FIRST,
            short_sessions: 0,
        }
    }

    /// The wait after a failure; `lasted` is how long the session had been up.
    fn after(&mut self, lasted: Option<Duration>) -> Duration {
        match lasted {
            Some(t) if t >= STABLE => {
                self.next = Self::FIRST;
                self.short_sessions = 0;
            }
            Some(_) => self.short_sessions += 1,
            None => {}
        }
        let cap = if self.short_sessions >= FLAPPING {
            MAX_BACKOFF_FLAPPING
        } else {
            MAX_BACKOFF
        };
        let wait = self.next.min(cap);
        self.next = (self.next * 2).min(cap);
        wait
    }
}

/// Polls an event loop until `stop` fires or the session says goodbye,
/// reconnecting with [`Backoff`] (plus up to 100 ms of jitter).
pub async fn drive<E: Events>(
    events: Arc<E>,
    mut eventloop: EventLoop,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new();
    let mut attempt = 0u32;
    let mut up_since: Option<Instant> = None;
    loop {
        let polled = tokio::select! {
            polled = eventloop.poll() => polled,
            _ = stop.changed() => break,
        };
        match polled {
            Ok(event) => {
                if matches!(event, Event::Incoming(Incoming::ConnAck(_))) {
                    attempt = 0;
                    up_since = Some(Instant::now());
                }
                let disconnect = matches!(event, Event::Outgoing(Outgoing::Disconnect));
                events.on_event(event);
                if disconnect {
                    break;
                }
            }
            Err(error) => {
                attempt += 1;
                let lasted = up_since.take().map(|t| t.elapsed());
                events.on_error(&mut eventloop, &error, attempt, lasted);
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let jitter = Duration::from_millis(u64::from(nanos % 100));
                tokio::select! {
                    _ = tokio::time::sleep(backoff.after(lasted) + jitter) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlator_orders_and_survives_a_lost_session() {
        let mut c = Correlator::<u32>::default();
        c.fifo.extend([1, 2, 3, 4]);
        assert_eq!(c.sent(0), Some(1)); // QoS 0: resolved at once
        assert_eq!(c.sent(7), None); // 2 in flight as 7
        assert_eq!(c.sent(7), None); // retransmission: nothing taken
        assert_eq!(c.fifo.len(), 2);
        // Lost: one stale event (3) to come, one request (4) held back.
        c.lost(1, 1);
        c.fifo.push_back(5); // queued in the race window
        let gone = c.connected(false);
        assert_eq!(gone.len(), 2); // 4 and the in-flight 2
        assert!(gone.contains(&4) && gone.contains(&2));
        assert_eq!(c.sent(0), Some(3));
        assert_eq!(c.sent(0), Some(5));
    }

    #[test]
    fn backoff_grows_starts_over_after_a_stable_session_and_caps_when_flapping() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new();
        // The broker is down: 100 ms, 200 ms, ... up to 10 s.
        let waits: Vec<Duration> = (0..10).map(|_| b.after(None)).collect();
        assert_eq!(waits[..3], [ms(100), ms(200), ms(400)]);
        assert_eq!(waits[9], MAX_BACKOFF);
        // A session that lasted: from the start again.
        assert_eq!(b.after(Some(STABLE)), ms(100));
        // Sessions that keep ending at once: the wait keeps growing (a CONNACK
        // does not start it over), past 10 s once it is flapping.
        let mut last = Duration::ZERO;
        for _ in 0..12 {
            last = b.after(Some(ms(50)));
        }
        assert_eq!(last, MAX_BACKOFF_FLAPPING);
    }

    #[test]
    fn correlator_keeps_everything_with_a_session() {
        let mut c = Correlator::<u32>::default();
        c.fifo.extend([1, 2]);
        c.sent(3);
        c.lost(0, 1);
        assert!(c.connected(true).is_empty());
        assert_eq!(c.sent(3), None); // retransmitted
        assert_eq!(c.acked(3), Some(1));
        assert_eq!(c.sent(0), Some(2));
    }
}
