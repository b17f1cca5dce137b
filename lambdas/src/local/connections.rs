//! The live WebSocket connections, by connection id: what API Gateway knows
//! of each (when and from where it connected, its authorizer context, when
//! it was last active) and the way to it (a queue the connection's writer
//! drains onto the socket).
//!
//! A connection is here from the end of its handshake until it closes, for
//! whatever reason; `@connections` calls for an id that is not here answer
//! `410 Gone`. Each connection's queued bytes are bounded: beyond the bound
//! a post is refused as API Gateway refuses one when "the WebSocket client
//! side buffer is full" (`429 LimitExceededException`), and the connection
//! stays.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::local::events::Handshake;

/// What the writer of a connection sends.
#[derive(Debug)]
pub enum Outbound {
    Text(Bytes),
    Binary(Bytes),
    /// A close frame with this code and reason; the writer stops after it.
    Close(u16, &'static str),
}

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The connection no longer exists (410).
    Gone,
    /// Its queue is full (429).
    Full,
}

/// One live connection.
pub struct Connection {
    pub handshake: Handshake,
    /// `requestContext.authorizer` of its events, if it had an authorizer.
    pub authorizer: Option<Value>,
    last_active: AtomicI64,
    queued: AtomicUsize,
    /// Whether the last post found the queue full (said once per episode).
    full: std::sync::atomic::AtomicBool,
    limit: usize,
    tx: mpsc::UnboundedSender<Outbound>,
    /// Set once to the close code the server chose (DeleteConnection and
    /// the limits), so the reader stops.
    closing: watch::Sender<Option<(u16, &'static str)>>,
}

impl Connection {
    /// A connection and the receiving end of its queue.
    pub fn new(
        handshake: Handshake,
        authorizer: Option<Value>,
        limit: usize,
    ) -> (Arc<Connection>, mpsc::UnboundedReceiver<Outbound>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let now = crate::now_millis();
        let conn = Connection {
            handshake,
            authorizer,
            last_active: AtomicI64::new(now),
            queued: AtomicUsize::new(0),
            full: std::sync::atomic::AtomicBool::new(false),
            limit,
            tx,
            closing: watch::channel(None).0,
        };
        (Arc::new(conn), rx)
    }

    pub fn id(&self) -> &str {
        &self.handshake.connection_id
    }

    /// Queues a data frame, within the connection's bound.
    pub fn send(&self, frame: Outbound) -> Result<(), SendError> {
        let size = match &frame {
            Outbound::Text(b) | Outbound::Binary(b) => b.len(),
            Outbound::Close(..) => 0,
        };
        let before = self.queued.fetch_add(size, Ordering::AcqRel);
        if before > 0 && before + size > self.limit {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            if !self.full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    connection = %self.id(),
                    queued = before,
                    "the WebSocket client side buffer is full: posts answer 429"
                );
            }
            return Err(SendError::Full);
        }
        self.full.store(false, Ordering::Relaxed);
        self.tx.send(frame).map_err(|_| {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            SendError::Gone
        })?;
        self.touch();
        Ok(())
    }

    /// The writer wrote `size` bytes of the queue.
    pub fn written(&self, size: usize) {
        self.queued.fetch_sub(size, Ordering::AcqRel);
    }

    /// Closes the connection from the server side with `code`.
    pub fn close(&self, code: u16, reason: &'static str) {
        self.closing.send_if_modified(|c| {
            let first = c.is_none();
            if first {
                *c = Some((code, reason));
            }
            first
        });
    }

    /// Resolves with the server's close code once [`close`](Self::close) was called.
    pub async fn closed(&self) -> (u16, &'static str) {
        let mut rx = self.closing.subscribe();
        let chosen = rx.wait_for(Option::is_some).await.ok().and_then(|v| *v);
        match chosen {
            Some(code) => code,
            None => std::future::pending().await,
        }
    }

    /// Data went either way: the idle timer starts again.
    pub fn touch(&self) {
        self.last_active
            .store(crate::now_millis(), Ordering::Relaxed);
    }

    pub fn last_active(&self) -> i64 {
        self.last_active.load(Ordering::Relaxed)
    }
}

/// Every live connection.
#[derive(Default)]
pub struct Connections {
    map: Mutex<HashMap<String, Arc<Connection>>>,
}

impl Connections {
    pub fn insert(&self, conn: Arc<Connection>) {
        self.map.lock().unwrap().insert(conn.id().to_string(), conn);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Connection>> {
        self.map.lock().unwrap().get(id).cloned()
    }

    /// Takes a connection out: from now on it is gone.
    pub fn remove(&self, id: &str) -> Option<Arc<Connection>> {
        self.map.lock().unwrap().remove(id)
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
