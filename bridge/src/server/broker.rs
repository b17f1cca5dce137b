//! The embedded MQTT broker (rmqtt) used when no `--mqtt-url` is given, so
//! `bridge serve` works with nothing else installed. It is a real broker on a
//! real port: devices connect with any MQTT 3.1, 3.1.1 or 5 client
//! (`mosquitto_pub`, paho), and the bridge itself connects to it like to any
//! external broker, so the same code path serves both.
//!
//! rmqtt replaced rumqttd after measuring both against Mosquitto: rumqttd
//! refuses a CONNECT with keep alive 0 (legal in MQTT 3.1.1), cannot
//! subscribe to `$` topics, keeps a log per topic and per filter for good and
//! loses most messages on a `#` subscription across many topics. rmqtt
//! speaks MQTT 3.1.1 as Mosquitto does on all of these, with less memory per
//! device connection (about 18 KiB, rumqttd 45 KiB).
//!
//! It runs on a thread of its own with its own single-threaded Tokio runtime
//! (like a separate Mosquitto process: the bridge's runtime never waits on
//! it). [`start`] returns once the port is bound, so the bridge's first
//! connect finds it; a port in use is a clear error that suggests
//! `--mqtt-url`.
//!
//! What this module adds to rmqtt: the listener's limits ([`listener`]), an
//! in-memory retained store with bounds ([`retain`], rmqtt's own stores none
//! without a plugin) and optional device username/password ([`auth`]).

mod auth;
mod retain;

use std::net::SocketAddr;
use std::time::Duration;

use rmqtt::context::ServerContext;
use rmqtt::net::{Builder, Listener};
use rmqtt::server::MqttServer;

pub use auth::{Login, Users};

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot start the embedded MQTT broker on {addr}: the address is already in use \
         (is another MQTT broker running there?). Connect to that broker with \
         --mqtt-url mqtt://{addr}, or pick another address with --embedded-broker"
    )]
    InUse { addr: SocketAddr },
    #[error("cannot start the embedded MQTT broker on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the embedded MQTT broker on {addr} did not come up within 10 s")]
    NotReady { addr: SocketAddr },
    #[error("embedded MQTT broker user {user:?}: the password is empty")]
    EmptyPassword { user: String },
}

/// Most device connections at once (the bridge's own two included).
const MAX_CONNECTIONS: usize = 10_010;
/// A connection that sends no CONNECT within this is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// QoS 1/2 messages sent to one client and not yet acknowledged.
const MAX_INFLIGHT: u16 = 100;
/// Messages queued for one client (a slow reader, or a persistent session
/// while its client is away) beyond which new ones are dropped, as
/// Mosquitto's `max_queued_messages` default.
const MAX_QUEUED: usize = 1_000;

/// Starts the broker on `addr` in its own thread and returns once it listens.
///
/// `max_packet` bounds every MQTT packet (payload, topic and headers).
/// `users`: the username/password pairs devices must connect with; empty
/// means anonymous devices, which draws a warning when `addr` is not a
/// loopback address.
///
/// Returns the login the bridge's own MQTT connections must use when `users`
/// is not empty (a user made up for this process, with a random password),
/// `None` when devices are anonymous.
pub fn start(
    addr: SocketAddr,
    max_packet: usize,
    users: Users,
) -> Result<Option<Login>, BrokerError> {
    if users.is_empty() && !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "the embedded MQTT broker listens beyond loopback and devices need no credentials: \
             anyone who can reach it may publish and subscribe to every topic \
             (give devices a username and password, or listen on 127.0.0.1)"
        );
    }
    let (users, login) = users.with_bridge_login();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(source) => {
                    let _ = ready_tx.send(Err(BrokerError::Bind { addr, source }));
                    return;
                }
            };
            runtime.block_on(async move {
                let bound = serve(addr, max_packet, users).await;
                let server = match bound {
                    Ok(server) => {
                        let _ = ready_tx.send(Ok(()));
                        server
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if let Err(e) = server.run().await {
                    tracing::error!(error = %e, "embedded MQTT broker stopped");
                }
            });
        })
        .map_err(|source| BrokerError::Bind { addr, source })?;
    match ready_rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(())) => Ok(login),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(BrokerError::NotReady { addr }),
    }
}

/// Builds the broker and binds its listener (not yet accepting).
async fn serve(
    addr: SocketAddr,
    max_packet: usize,
    users: Users,
) -> Result<MqttServer, BrokerError> {
    // The busy check refuses CONNECTs while the host's load average is high:
    // a busy build machine would lock every device out.
    let scx = ServerContext::new().busy_check_enable(false).build().await;
    *scx.extends.retain_mut().await = Box::new(retain::Store::default());
    let anonymous = users.is_empty();
    if !anonymous {
        auth::install(&scx, users).await;
    }
    let listener = listener(addr, max_packet, anonymous)?;
    Ok(MqttServer::new(scx).listener(listener).build())
}

fn listener(addr: SocketAddr, max_packet: usize, anonymous: bool) -> Result<Listener, BrokerError> {
    let bound = Builder::new()
        .name("embedded")
        .laddr(addr)
        // As std's TcpListener: a restart binds even with connections of the
        // previous process in TIME_WAIT.
        .reuseaddr(Some(true))
        .nodelay(true)
        .max_connections(MAX_CONNECTIONS)
        .handshake_timeout(HANDSHAKE_TIMEOUT)
        .max_packet_size(u32::try_from(max_packet).unwrap_or(u32::MAX))
        .allow_anonymous(anonymous)
        // MQTT 3.1.1 §3.1.2.10: keep alive 0 turns the mechanism off.
        .allow_zero_keepalive(true)
        .max_inflight(std::num::NonZeroU16::new(MAX_INFLIGHT).expect("non-zero"))
        .max_mqueue_len(MAX_QUEUED)
        .bind()
        .and_then(|l| l.tcp());
    bound.map_err(|e| match e.downcast::<std::io::Error>() {
        Ok(io) if io.kind() == std::io::ErrorKind::AddrInUse => BrokerError::InUse { addr },
        Ok(source) => BrokerError::Bind { addr, source },
        Err(other) => BrokerError::Bind {
            addr,
            source: std::io::Error::other(other.to_string()),
        },
    })
}

#[cfg(test)]
mod tests;
