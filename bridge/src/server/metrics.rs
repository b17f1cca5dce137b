//! The server's counters and gauges, rendered at `GET /metrics` in the
//! Prometheus text format. One struct so every part of the server counts the
//! same way; handles are cheap clones of atomics.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// Why a message did not reach a client.
#[derive(Debug, Clone, Copy)]
pub enum DropReason {
    /// The connection's outbound queue was full (it is told with `lagged`).
    Lagged,
    /// The payload was over the payload limit.
    TooLarge,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub subscriptions: Gauge,
    pub broker_subscriptions: Gauge,
    pub broker_up: Gauge,
    pub broker_connects: Counter,
    pub mqtt_messages_in: Counter,
    pub mqtt_messages_unmatched: Counter,
    pub ws_publishes: Counter,
    pub deliveries: Counter,
    dropped_lagged: Counter,
    dropped_too_large: Counter,
    errors: Family<Labels, Counter>,
    pub auth_rejected: Counter,
    handshakes_refused: Family<Labels, Counter>,
    /// Connections closed because their socket accepted no data in time.
    pub stalled_closed: Counter,
    pub silent_closed: Counter,
    /// Times the broker was found to end the bridge's session again and
    /// again with nothing in flight (another client with its client id).
    pub broker_takeovers: Counter,
    pub latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("bridge");
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        let subscriptions = Gauge::default();
        registry.register(
            "subscriptions",
            "Filters held by WebSocket connections (a filter held by two connections counts twice)",
            subscriptions.clone(),
        );
        let broker_subscriptions = Gauge::default();
        registry.register(
            "broker_subscriptions",
            "Filters the bridge itself subscribes to at the broker (the disjoint cover)",
            broker_subscriptions.clone(),
        );
        let broker_up = Gauge::default();
        registry.register(
            "broker_up",
            "1 when the MQTT connection is up",
            broker_up.clone(),
        );
        let broker_connects = Counter::default();
        registry.register(
            "broker_connects",
            "MQTT connections established (the first one and every reconnect)",
            broker_connects.clone(),
        );
        let mqtt_messages_in = Counter::default();
        registry.register(
            "mqtt_messages_received",
            "Messages received from the broker",
            mqtt_messages_in.clone(),
        );
        let mqtt_messages_unmatched = Counter::default();
        registry.register(
            "mqtt_messages_unmatched",
            "Messages received from the broker that no connection wanted (a merged broker filter \
             is wider than the client filters it serves)",
            mqtt_messages_unmatched.clone(),
        );
        let ws_publishes = Counter::default();
        registry.register(
            "ws_publishes",
            "Publishes from WebSocket clients accepted by the broker",
            ws_publishes.clone(),
        );
        let deliveries = Counter::default();
        registry.register(
            "messages_delivered",
            "Message frames written to WebSocket connections",
            deliveries.clone(),
        );
        let dropped = Family::<Labels, Counter>::default();
        registry.register(
            "messages_dropped",
            "Messages not delivered to a connection, by reason",
            dropped.clone(),
        );
        let dropped_lagged = dropped.get_or_create_owned(&vec![("reason", "lagged")]);
        let dropped_too_large = dropped.get_or_create_owned(&vec![("reason", "too_large")]);
        let errors = Family::<Labels, Counter>::default();
        registry.register("errors", "Error frames sent, by code", errors.clone());
        let auth_rejected = Counter::default();
        registry.register(
            "auth_rejected",
            "WebSocket handshakes refused for a missing, bad or expired token",
            auth_rejected.clone(),
        );
        let handshakes_refused = Family::<Labels, Counter>::default();
        registry.register(
            "handshakes_refused",
            "WebSocket handshakes refused before auth, by reason (origin, capacity)",
            handshakes_refused.clone(),
        );
        let stalled_closed = Counter::default();
        registry.register(
            "stalled_closed",
            "Connections closed (1008) because their socket accepted no data in time",
            stalled_closed.clone(),
        );
        let silent_closed = Counter::default();
        registry.register(
            "silent_closed",
            "Connections closed (1001) because nothing, not even a pong, arrived from them \
             for three ping intervals",
            silent_closed.clone(),
        );
        let broker_takeovers = Counter::default();
        registry.register(
            "broker_takeovers",
            "Episodes of the broker ending the bridge's session again and again soon after \
             connecting with nothing in flight (another MQTT client with the same client id)",
            broker_takeovers.clone(),
        );
        let latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "delivery_latency_seconds",
            "From receiving a message from the broker to writing it to a WebSocket",
            latency.clone(),
        );
        Metrics {
            registry,
            connections,
            subscriptions,
            broker_subscriptions,
            broker_up,
            broker_connects,
            mqtt_messages_in,
            mqtt_messages_unmatched,
            ws_publishes,
            deliveries,
            dropped_lagged,
            dropped_too_large,
            errors,
            auth_rejected,
            handshakes_refused,
            stalled_closed,
            silent_closed,
            broker_takeovers,
            latency,
        }
    }

    pub fn dropped(&self, reason: DropReason, n: u64) {
        match reason {
            DropReason::Lagged => self.dropped_lagged.inc_by(n),
            DropReason::TooLarge => self.dropped_too_large.inc_by(n),
        };
    }

    pub fn handshakes_refused(&self, reason: &'static str) {
        self.handshakes_refused
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    pub fn error(&self, code: &'static str) {
        self.errors.get_or_create(&vec![("code", code)]).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
