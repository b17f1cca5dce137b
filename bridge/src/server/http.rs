//! The HTTP server under `bridge serve`: accepts connections and serves the
//! router on each, with the limits `axum::serve` cannot set.
//!
//! * A request must complete its headers within `header_timeout`, or its TCP
//!   connection is closed: half-open requests (slowloris) would otherwise
//!   hold the bridge's file descriptors and buffers for ever. hyper enforces
//!   it only with a timer, which `axum::serve` does not give it. The same
//!   deadline covers an idle keep-alive connection waiting for its next
//!   request.
//! * Request heads are bounded in bytes ([`MAX_HEAD_BYTES`]).
//! * Connections still speaking HTTP (not yet upgraded to a WebSocket, or
//!   idle between keep-alive requests) are bounded in number
//!   ([`MAX_HTTP_CONNECTIONS`]): beyond it the oldest is closed. The header
//!   timeout bounds how long a half-open request lasts, this how many there
//!   are, so their memory (some 40 KiB each) is bounded whatever an attacker
//!   opens; evicting the oldest rather than refusing the newest keeps honest
//!   handshakes, which finish in milliseconds, served during such a flood. The
//!   connection cap (`--max-connections`) counts WebSockets, after this.
//! * HTTP/1.1 only: the WebSocket upgrade, `/healthz`, `/metrics`, the page.
//!
//! When `stop` fires, nothing new is accepted and each HTTP connection ends
//! after its current request. Upgraded WebSockets belong to their connection
//! tasks, which close on the same signal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::serve::Listener;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Most bytes of a request head (request line and headers) read before the
/// request is refused (hyper's smallest allowed buffer is 8 KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most connections in their HTTP phase at once; the oldest is closed to
/// make room.
pub const MAX_HTTP_CONNECTIONS: usize = 512;
/// How long open HTTP connections get to finish when the server stops.
const DRAIN: Duration = Duration::from_secs(5);

/// The connections in their HTTP phase, oldest first, each with the token
/// that closes it.
#[derive(Clone, Default)]
struct HttpPhase(Arc<parking_lot::Mutex<BTreeMap<u64, CancellationToken>>>);

impl HttpPhase {
    /// Registers connection `id`, closing the oldest beyond the bound.
    fn enter(&self, id: u64) -> CancellationToken {
        let evict = CancellationToken::new();
        let mut open = self.0.lock();
        open.insert(id, evict.clone());
        while open.len() > MAX_HTTP_CONNECTIONS {
            if let Some((_, oldest)) = open.pop_first() {
                tracing::debug!("closed the oldest HTTP connection: too many open");
                oldest.cancel();
            }
        }
        evict
    }

    fn leave(&self, id: u64) {
        self.0.lock().remove(&id);
    }
}

/// Serves `router` on `listener` until `stop` fires.
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    L: Listener,
{
    let connections = TaskTracker::new();
    let http_phase = HttpPhase::default();
    let mut next_id = 0u64;
    loop {
        let (io, _peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        let service = router
            .clone()
            .map_request(|req: axum::http::Request<Incoming>| req.map(Body::new));
        let service = TowerToHyperService::new(service);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(MAX_HEAD_BYTES);
        let stop = stop.clone();
        next_id += 1;
        let id = next_id;
        let evicted = http_phase.enter(id);
        let http_phase = http_phase.clone();
        connections.spawn(async move {
            let conn = builder
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "HTTP connection ended");
                    }
                }
                _ = evicted.cancelled() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn).await;
                }
            }
            // Upgraded (the WebSocket lives on in its own task) or closed.
            http_phase.leave(id);
        });
    }
    connections.close();
    let _ = tokio::time::timeout(DRAIN, connections.wait()).await;
}
