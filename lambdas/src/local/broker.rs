//! The MQTT broker at `--mqtt-url` as IoT Core's message side: MQTT 5
//! sessions of aws-local's own (client ids `aws-local-PID-ROLE`), each kept
//! up with reconnects.
//!
//! * [`Publisher`]: IoT Data Plane `Publish` calls become publishes with
//!   their qos and retain; a call returns once the broker took the message
//!   (PUBACK for QoS 1, written for QoS 0), as IoT Core answers once it
//!   accepted it. rumqttc does not say which request a packet id belongs to;
//!   requests are matched to ids in the order rumqttc handles them. A lost
//!   connection fails every call in flight (`503`) and starts a fresh
//!   session, so nothing is published twice behind a caller's back.
//! * [`subscribe`]: a session holding some filters, resubscribed on every
//!   CONNACK, that hands every message it receives to a channel (the topic
//!   rule, the retained-message mirror).
//!
//! Each session's event loop is polled in a task of its own and talked to
//! over channels (see FIELD-NOTES on rumqttc).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::Outgoing;
use tokio::sync::{mpsc, oneshot, watch};

/// How long a publish may wait for the broker.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long aws-local waits for the broker at start.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Largest packet accepted from the broker.
const MAX_PACKET: u32 = 268_435_455;

/// Where the broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        write!(f, "mqtt://{}:{}", self.host, self.port)
    }
}

/// `mqtt://[user[:password]@]host[:port]` (port 1883 by default).
pub fn parse_url(url: &str) -> Result<BrokerUrl, String> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or_else(|| format!("--mqtt-url {url:?}: expected mqtt://HOST:PORT"))?;
    let rest = rest.trim_end_matches('/');
    let (auth, hostport) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let (username, password) = match auth {
        Some(a) => match a.split_once(':') {
            Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
            None => (Some(a.to_string()), None),
        },
        None => (None, None),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h.trim_start_matches('[').trim_end_matches(']').to_string(),
            p.parse::<u16>()
                .map_err(|_| format!("--mqtt-url: {p:?} is not a port"))?,
        ),
        _ => (hostport.to_string(), 1883),
    };
    if host.is_empty() || host.contains('/') {
        return Err(format!("--mqtt-url {url:?}: no host"));
    }
    Ok(BrokerUrl {
        host,
        port,
        username,
        password,
    })
}

fn options(url: &BrokerUrl, role: &str) -> MqttOptions {
    let mut o = MqttOptions::new(
        format!("aws-local-{}-{role}", std::process::id()),
        url.host.clone(),
        url.port,
    );
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_start(true);
    o.set_max_packet_size(Some(MAX_PACKET));
    if let Some(user) = &url.username {
        o.set_credentials(user.clone(), url.password.clone().unwrap_or_default());
    }
    o
}

/// Why a publish did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("the broker is not connected")]
    Unavailable,
    #[error("the broker did not answer within {PUBLISH_TIMEOUT:?}")]
    Timeout,
    #[error("the broker refused the message: {0}")]
    Refused(String),
    #[error("not a valid topic name")]
    Topic,
}

type Reply = oneshot::Sender<Result<(), PublishError>>;

#[derive(Default)]
struct Shared {
    client: Option<AsyncClient>,
    /// Calls handed to rumqttc, not yet given a packet id.
    fifo: VecDeque<(QoS, Reply)>,
    /// QoS 1 calls waiting for their PUBACK.
    acks: HashMap<u16, Reply>,
}

impl Shared {
    fn fail_all(&mut self) {
        for (_, r) in self.fifo.drain(..) {
            let _ = r.send(Err(PublishError::Unavailable));
        }
        for (_, r) in self.acks.drain() {
            let _ = r.send(Err(PublishError::Unavailable));
        }
    }
}

/// Publishes for the IoT Data Plane.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Mutex<Shared>>,
    /// Holds the order of the FIFO and rumqttc's request queue together.
    turn: Arc<tokio::sync::Mutex<()>>,
    connected: watch::Receiver<bool>,
}

impl Publisher {
    /// Connects (waiting up to [`CONNECT_TIMEOUT`] for the first CONNACK).
    pub async fn connect(url: &BrokerUrl) -> Result<Publisher, String> {
        let shared: Arc<Mutex<Shared>> = Arc::default();
        let (tx, connected) = watch::channel(false);
        tokio::spawn(drive_publisher(url.clone(), shared.clone(), tx));
        let p = Publisher {
            shared,
            turn: Arc::default(),
            connected,
        };
        let mut rx = p.connected.clone();
        let up = tokio::time::timeout(CONNECT_TIMEOUT, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok());
        match up {
            true => Ok(p),
            _ => Err(format!(
                "cannot reach the MQTT broker at {url} within {CONNECT_TIMEOUT:?} \
                 (start one, e.g. `mosquitto -p {}`, or pass --mqtt-url)",
                url.port
            )),
        }
    }

    /// Publishes and waits until the broker took the message.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: u8,
        retain: bool,
        properties: PublishProperties,
    ) -> Result<(), PublishError> {
        let qos = if qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let (tx, rx) = oneshot::channel();
        {
            let _turn = self.turn.lock().await;
            let client = {
                let mut s = self.shared.lock().unwrap();
                let client = s.client.clone().ok_or(PublishError::Unavailable)?;
                s.fifo.push_back((qos, tx));
                client
            };
            if let Err(e) = client
                .publish_with_properties(topic, qos, retain, payload, properties)
                .await
            {
                self.shared.lock().unwrap().fifo.pop_back();
                return Err(match e {
                    rumqttc::v5::ClientError::Request(_) => PublishError::Topic,
                    _ => PublishError::Unavailable,
                });
            }
        }
        match tokio::time::timeout(PUBLISH_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PublishError::Unavailable),
            Err(_) => Err(PublishError::Timeout),
        }
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }
}

async fn drive_publisher(
    url: BrokerUrl,
    shared: Arc<Mutex<Shared>>,
    connected: watch::Sender<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        // A fresh session each time: nothing of the last one is resent.
        let (client, mut events) = AsyncClient::new(options(&url, "iot"), 1000);
        let mut up = false;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    up = true;
                    backoff = Duration::from_millis(100);
                    shared.lock().unwrap().client = Some(client.clone());
                    connected.send_replace(true);
                    tracing::info!(broker = %url, "connected (publisher)");
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let mut s = shared.lock().unwrap();
                    if let Some((qos, reply)) = s.fifo.pop_front() {
                        if qos == QoS::AtMostOnce {
                            let _ = reply.send(Ok(()));
                        } else {
                            s.acks.insert(pkid, reply);
                        }
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    use rumqttc::v5::mqttbytes::v5::PubAckReason;
                    if let Some(reply) = shared.lock().unwrap().acks.remove(&ack.pkid) {
                        let result = match ack.reason {
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => Ok(()),
                            other => Err(PublishError::Refused(format!("{other:?}"))),
                        };
                        let _ = reply.send(result);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    {
                        let mut s = shared.lock().unwrap();
                        s.client = None;
                        s.fail_all();
                    }
                    connected.send_replace(false);
                    if up {
                        tracing::warn!(broker = %url, error = %e, "lost the broker (publisher); reconnecting");
                    } else {
                        tracing::debug!(broker = %url, error = %e, "cannot connect (publisher)");
                    }
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A received message.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub user_properties: Vec<(String, String)>,
}

/// What a session says besides messages.
#[derive(Debug, Clone)]
pub enum Note {
    /// A CONNACK: the filters were asked for again (and retained messages
    /// will follow, for filters that want them).
    Connected,
    Message(Message),
}

/// A session (`role` names it in the client id and logs) holding `filters`,
/// resubscribed on every CONNACK; what it receives goes to `tx`. Resolves
/// once the first SUBACK arrived, or fails after [`CONNECT_TIMEOUT`].
pub async fn subscribe(
    url: &BrokerUrl,
    role: &str,
    filters: Vec<Filter>,
    tx: mpsc::UnboundedSender<Note>,
) -> Result<(), String> {
    let (ready_tx, mut ready) = watch::channel(false);
    tokio::spawn(drive_subscriber(
        url.clone(),
        role.to_string(),
        filters,
        tx,
        ready_tx,
    ));
    let up = tokio::time::timeout(CONNECT_TIMEOUT, ready.wait_for(|r| *r))
        .await
        .is_ok_and(|r| r.is_ok());
    match up {
        true => Ok(()),
        _ => Err(format!(
            "the MQTT broker at {url} did not take the {role} subscription within {CONNECT_TIMEOUT:?}"
        )),
    }
}

async fn drive_subscriber(
    url: BrokerUrl,
    role: String,
    filters: Vec<Filter>,
    tx: mpsc::UnboundedSender<Note>,
    ready: watch::Sender<bool>,
) {
    let (client, mut events): (AsyncClient, EventLoop) =
        AsyncClient::new(options(&url, &role), 100);
    let mut backoff = Duration::from_millis(100);
    let mut up = false;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                up = true;
                backoff = Duration::from_millis(100);
                if tx.send(Note::Connected).is_err() {
                    return;
                }
                if let Err(e) = client.try_subscribe_many(filters.clone()) {
                    tracing::error!(%role, error = %e, "cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as R;
                let refused = ack.return_codes.iter().any(|c| !matches!(c, R::Success(_)));
                if refused {
                    tracing::error!(%role, codes = ?ack.return_codes, "the broker refused a subscription");
                }
                ready.send_replace(true);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let message = Message {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload.clone(),
                    qos: p.qos as u8,
                    retain: p.retain,
                    user_properties: p
                        .properties
                        .as_ref()
                        .map(|pr| pr.user_properties.clone())
                        .unwrap_or_default(),
                };
                if tx.send(Note::Message(message)).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if up {
                    tracing::warn!(broker = %url, %role, error = %e, "lost the broker; reconnecting");
                    up = false;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 1884));
        let u = parse_url("mqtt://broker").unwrap();
        assert_eq!(u.port, 1883);
        let u = parse_url("mqtt://me:secret@h:1").unwrap();
        assert_eq!(u.username.as_deref(), Some("me"));
        assert!(!u.to_string().contains("secret"));
        assert!(parse_url("http://h:1").is_err());
        assert!(parse_url("mqtt://h:x").is_err());
        assert!(parse_url("mqtt://").is_err());
    }
}
