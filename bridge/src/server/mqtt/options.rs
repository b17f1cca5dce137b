//! The rumqttc options the bridge connects with: broker address, TLS (system
//! roots or a given CA, client certificates for AWS IoT Core), login, keep
//! alive, session, and the largest packet accepted.

use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};

use crate::config::{Broker, Settings};

/// Largest MQTT packet accepted from the broker. Larger than any payload we
/// deliver: an oversize message is counted and skipped, never a reason to
/// drop the connection (the broker would redeliver it forever).
const MAX_INCOMING_PACKET: usize = 268_435_455;

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
