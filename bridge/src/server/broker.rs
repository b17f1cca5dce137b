//! The embedded MQTT broker (rumqttd) used when no `--mqtt-url` is given, so
//! `bridge serve` works with nothing else installed. It is a real broker on a
//! real port: devices connect with any MQTT client (`mosquitto_pub`, paho),
//! and the bridge itself connects to it like to any external broker, so the
//! same code path serves both.
//!
//! rumqttd binds inside its own thread and reports nothing back, so the port
//! is checked first (a port in use is a clear error that suggests
//! `--mqtt-url`), then readiness is probed by connecting.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

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
}

fn config(addr: SocketAddr, max_payload: usize) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: max_payload,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "embedded-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 1_000,
            // rumqttd keeps recent messages per filter in memory segments (a
            // segment may overflow by one message). A subscriber that falls
            // further behind than this skips ahead (logged by rumqttd's
            // `segments` module): about 9 MiB of history per busy filter.
            max_segment_size: 1024 * 1024,
            max_segment_count: 8,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    }
}

/// Starts the broker on `addr` in its own thread and waits until it listens.
pub fn start(addr: SocketAddr, max_payload: usize) -> Result<(), BrokerError> {
    match TcpListener::bind(addr) {
        Ok(probe) => drop(probe),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(BrokerError::InUse { addr })
        }
        Err(source) => return Err(BrokerError::Bind { addr, source }),
    }
    let cfg = config(addr, max_payload);
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(cfg);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|source| BrokerError::Bind { addr, source })?;
    // Wait until it accepts connections, so the bridge's first connect works.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        if Instant::now() > deadline {
            return Err(BrokerError::NotReady { addr });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
