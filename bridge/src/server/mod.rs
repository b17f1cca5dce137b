//! `bridge serve`: the self-hosted deployment. It wires the parts together
//! and moves bytes; what a frame means is the core's decision
//! ([`crate::session`]).
//!
//! * [`broker`]: the embedded MQTT broker, when no external one is given;
//! * [`mqtt`]: the bridge's MQTT session and its broker subscriptions;
//! * [`retained`]: retained-message replay for `"retained": true`;
//! * [`hub`]: who holds which filter, and fan-out;
//! * [`http`]: accepting connections, with a header deadline;
//! * [`origin`]: which pages may open a WebSocket;
//! * [`ws`]: one WebSocket connection, over a [`socket`] whose writes have a
//!   deadline;
//! * [`metrics`]: the counters behind `GET /metrics`;
//! * [`web`]: the dashboard and the files it loads, served at `/`.
//!
//! With `--demo`, simulated devices ([`crate::simulate`]) run on the
//! embedded broker beside it.

pub mod broker;
pub mod http;
pub mod hub;
pub mod linger;
pub mod metrics;
pub mod mqtt;
pub mod origin;
pub mod retained;
pub mod socket;
pub mod tls;
pub mod web;
pub mod ws;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthSettings, Verifier};
use crate::channel::Prefix;
use crate::config::{AuthMode, Broker, Settings};
use crate::session::Policy;

/// What every connection shares.
pub struct App {
    pub link: Arc<mqtt::Link>,
    pub retained: Arc<retained::Retained>,
    pub metrics: Arc<metrics::Metrics>,
    pub verifier: Option<Verifier>,
    pub policy: Policy,
    pub origins: origin::Origins,
    pub outbound_queue: usize,
    pub outbound_bytes: usize,
    pub request_rate: f64,
    pub request_burst: f64,
    pub publish_rate: f64,
    pub publish_burst: f64,
    pub hard_frame_bytes: usize,
    pub write_timeout: Duration,
    /// WebSocket connections open (or being upgraded) and the cap.
    pub open_connections: AtomicUsize,
    pub max_connections: usize,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// Debug builds with BRIDGE_FAULT_INJECTION set: publishing to
    /// `fault-injection/panic` panics (tests the `internal` error path).
    #[cfg(debug_assertions)]
    pub fault_injection: bool,
    next_id: AtomicU64,
}

impl App {
    pub fn next_conn_id(&self) -> hub::ConnId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("MQTT settings: {0}")]
    Mqtt(std::io::Error),
    #[error("auth: {0}")]
    Auth(String),
    #[error("TLS: {0}")]
    Tls(String),
}

fn verifier(settings: &Settings) -> Result<Option<Verifier>, StartError> {
    let auth = AuthSettings {
        leeway_secs: settings.jwt_leeway,
        issuer: settings.jwt_issuer.clone(),
        audience: settings.jwt_audience.clone(),
    };
    match &settings.auth {
        AuthMode::Off => Ok(None),
        AuthMode::Secret(secret) => Verifier::hs256(secret.as_bytes(), auth)
            .map(Some)
            .map_err(|e| StartError::Auth(e.to_string())),
        AuthMode::Jwks(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| StartError::Auth(format!("{}: {e}", path.display())))?;
            Verifier::from_jwks_json(&text, auth)
                .map(Some)
                .map_err(|e| StartError::Auth(format!("{}: {e}", path.display())))
        }
    }
}

/// Runs the bridge until SIGTERM or Ctrl-C (or `stop`, for embedding).
pub async fn run(mut settings: Settings, stop: CancellationToken) -> Result<(), StartError> {
    let verifier = verifier(&settings)?;
    if let Broker::Embedded(addr) = settings.broker {
        let mut users = broker::Users::default();
        if let Some((name, password)) = &settings.embedded_user {
            users.add(name.clone(), password.expose())?;
        }
        let max_packet = settings
            .hard_frame_bytes
            .max(settings.limits.max_payload_bytes)
            + 1024;
        // With device logins, the bridge's own two connections use the one
        // the broker made up for this process.
        if let Some(login) = broker::start(addr, max_packet, users)? {
            settings.username = Some(login.username.clone());
            settings.password = Some(crate::config::Secret::new(login.password.clone()));
        }
        tracing::info!(%addr, "embedded MQTT broker listening (devices connect here)");
    }
    let tls = match &settings.tls {
        Some((cert, key)) => Some(tls::server_config(cert, key).map_err(StartError::Tls)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: settings.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| StartError::Listen {
        addr: settings.listen,
        source,
    })?;
    if verifier.is_none() && !local.ip().is_loopback() {
        tracing::warn!(
            %local,
            "auth is off and the bridge listens beyond loopback: anyone who can reach it may \
             subscribe and publish to every channel (set BRIDGE_JWT_SECRET or --jwks)"
        );
    }

    let prefix =
        Prefix::new(settings.prefix.as_deref()).map_err(|e| StartError::Auth(e.to_string()))?;
    let metrics = Arc::new(metrics::Metrics::new());
    let hub = Arc::new(hub::Hub::new(
        prefix.clone(),
        settings.limits.max_payload_bytes,
        metrics.clone(),
    ));
    let opts =
        mqtt::mqtt_options(&settings, &settings.client_id, false).map_err(StartError::Mqtt)?;
    let (link, eventloop) = mqtt::Link::new(opts, hub.clone(), metrics.clone());
    if matches!(settings.broker, Broker::Embedded(_)) {
        // In-process, every message is cheap to receive: one subscription to
        // `#`, and the hub's topic tree does the matching. The broker then
        // keeps no state per web client filter, however they churn.
        link.pin("#");
    }
    let fetch_id = format!("{}-r", settings.client_id);
    let opts = mqtt::mqtt_options(&settings, &fetch_id, true).map_err(StartError::Mqtt)?;
    let (fetcher, fetch_loop) = retained::Retained::new(opts, settings.outbound_bytes);
    let (stop_mqtt, stop_rx) = watch::channel(false);
    let link_task = tokio::spawn(mqtt::drive(link.clone(), eventloop, stop_rx.clone()));
    let fetch_task = tokio::spawn(mqtt::drive(fetcher.clone(), fetch_loop, stop_rx));
    // Clients connecting right at start-up should find the broker connected:
    // wait for the first CONNACK (the embedded broker must come up; an
    // external one may be down, then the bridge starts anyway, /healthz 503).
    let mut up = link.watch_up();
    let first_connect = tokio::time::timeout(Duration::from_secs(5), up.wait_for(|up| *up)).await;
    match (&settings.broker, first_connect) {
        (_, Ok(_)) => {}
        (Broker::Embedded(addr), Err(_)) => {
            return Err(StartError::Broker(broker::BrokerError::NotReady {
                addr: *addr,
            }))
        }
        (Broker::External { .. }, Err(_)) => {
            tracing::warn!(
                "the MQTT broker is not reachable yet; serving anyway (requests get `unavailable`)"
            )
        }
    }

    let app = Arc::new(App {
        link: link.clone(),
        retained: fetcher,
        metrics,
        verifier,
        policy: Policy {
            prefix,
            reserved: settings.reserved.clone(),
            limits: settings.limits,
            max_subscriptions: settings.max_subscriptions,
        },
        origins: origin::Origins::new(&settings.allowed_origins),
        outbound_queue: settings.outbound_queue,
        outbound_bytes: settings.outbound_bytes,
        request_rate: settings.request_rate,
        request_burst: settings.request_burst,
        publish_rate: settings.publish_rate,
        publish_burst: settings.publish_burst,
        hard_frame_bytes: settings.hard_frame_bytes,
        write_timeout: settings.write_timeout,
        open_connections: AtomicUsize::new(0),
        max_connections: connection_cap(settings.max_connections),
        shutdown: CancellationToken::new(),
        tracker: TaskTracker::new(),
        #[cfg(debug_assertions)]
        fault_injection: std::env::var_os("BRIDGE_FAULT_INJECTION").is_some(),
        next_id: AtomicU64::new(1),
    });
    let router = Router::new()
        .route("/ws", get(ws::upgrade))
        .merge(web::routes())
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .with_state(app.clone());

    match &settings.broker {
        Broker::Embedded(addr) => {
            tracing::info!(mqtt = %format!("mqtt://{addr}"), "MQTT side: embedded broker")
        }
        Broker::External { host, port, tls } => {
            let scheme = if *tls { "mqtts" } else { "mqtt" };
            tracing::info!(mqtt = %format!("{scheme}://{host}:{port}"), "MQTT side: external broker");
        }
    }
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    tracing::info!(
        auth = app.verifier.is_some(),
        "listening on {scheme}://{local}/ws"
    );
    // A line scripts can wait for.
    println!("bridge listening on {scheme}://{local}/ws");

    let demo = if settings.demo {
        let fleet =
            crate::simulate::demo(&settings, app.shutdown.clone()).map_err(StartError::Mqtt)?;
        tracing::info!(
            devices = fleet.ids.len(),
            "demo: simulated devices {}..{} publish under channel fleet/; open http://{local}/",
            fleet.ids[0],
            fleet.ids[fleet.ids.len() - 1],
        );
        Some(fleet)
    } else {
        None
    };

    let shutdown = app.shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = signal() => {}
        }
        tracing::info!("shutting down: closing WebSocket connections and the MQTT session");
        shutdown.cancel();
    });
    let header_timeout = settings.header_timeout;
    let send_buffer = (settings.send_buffer > 0).then_some(settings.send_buffer);
    match tls {
        Some(config) => {
            let listener =
                tls::TlsListener::new(listener, config, send_buffer).map_err(|source| {
                    StartError::Listen {
                        addr: local,
                        source,
                    }
                })?;
            http::serve(listener, router, header_timeout, app.shutdown.clone()).await
        }
        None => {
            let listener = linger::LingerListener {
                listener,
                send_buffer,
            };
            http::serve(listener, router, header_timeout, app.shutdown.clone()).await
        }
    }
    if let Some(fleet) = demo {
        // The demo devices say goodbye while the broker is still there.
        let _ = tokio::time::timeout(Duration::from_secs(3), fleet.done).await;
    }
    app.tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), app.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close within 5 s");
    }
    link.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), link_task).await;
    let _ = stop_mqtt.send(true);
    let _ = fetch_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// The connection cap, within what the open-files limit allows (each
/// connection is a file descriptor; some are kept for everything else).
fn connection_cap(wanted: usize) -> usize {
    const RESERVE: u64 = 256;
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            let fits = lim.rlim_cur.saturating_sub(RESERVE).max(RESERVE) as usize;
            if fits < wanted {
                tracing::warn!(
                    wanted,
                    cap = fits,
                    open_files = lim.rlim_cur,
                    "the open-files limit caps WebSocket connections lower than --max-connections"
                );
                return fits;
            }
        }
    }
    wanted
}

/// Ctrl-C or SIGTERM (also what ends `bridge simulate`).
pub(crate) async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn healthz(State(app): State<Arc<App>>) -> impl IntoResponse {
    if app.link.is_up() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "MQTT broker not connected\n",
        )
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
}
