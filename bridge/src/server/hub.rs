//! The hub: which connection holds which filter, and fan-out of one broker
//! message to every connection that wants it.
//!
//! * A topic tree indexes filters by level, so a message costs one walk of
//!   its levels, not a scan of every filter.
//! * A connection matched by several of its filters gets one copy (the
//!   broker sends one copy per message, see [`crate::cover`]; the hub
//!   de-duplicates per connection).
//! * The frame is serialized once and shared (`Utf8Bytes` is
//!   reference-counted) by every recipient's queue.
//! * Each connection has a queue bounded in frames *and* bytes; when it is
//!   full the message is dropped *for that connection only*, counted, and the
//!   connection is told with a `lagged` frame. The hub never waits.
//!
//! Only [`crate::server::mqtt::Link`] changes the index (it keeps the broker
//! cover in step); deliveries only read it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use tokio::sync::mpsc;
use tungstenite::Utf8Bytes;

use crate::channel::{self, Prefix};
use crate::frame;
use crate::server::metrics::{DropReason, Metrics};
use crate::session::{self, Undeliverable};

pub type ConnId = u64;

/// One broker message, serialized once and shared by every recipient.
#[derive(Debug)]
pub struct Delivery {
    /// The `message` frame.
    pub frame: Utf8Bytes,
    /// When the broker's message arrived (for the latency histogram).
    pub at: Instant,
}

/// What a connection's writer receives. Two words: queue slots are
/// allocated per connection, so they stay small.
#[derive(Debug)]
pub enum Outbound {
    Message(Arc<Delivery>),
    /// `dropped` messages were lost before the next one.
    Lagged(u64),
}

/// The hub's handle on one connection.
#[derive(Debug)]
pub struct Conn {
    pub id: ConnId,
    tx: mpsc::Sender<Outbound>,
    /// Messages dropped and not yet reported with `lagged`.
    dropped: AtomicU64,
    /// Bytes of the frames in the queue.
    queued_bytes: AtomicUsize,
    /// Most bytes the queue may hold.
    max_bytes: usize,
}

impl Conn {
    /// A connection whose queue (`tx`'s capacity in frames) holds at most
    /// `max_bytes` of frames.
    pub fn new(id: ConnId, tx: mpsc::Sender<Outbound>, max_bytes: usize) -> Self {
        Conn {
            id,
            tx,
            dropped: AtomicU64::new(0),
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
        }
    }

    /// Queues a frame without waiting. When messages were dropped before it,
    /// a `lagged` notice goes first, so the client sees where the gap is.
    /// Returns false when the queue is full, in frames or bytes (the message
    /// is dropped).
    fn offer(&self, delivery: &Arc<Delivery>) -> bool {
        let len = delivery.frame.len();
        // Reserve the bytes first: the writer may take the frame at once.
        let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before + len <= self.max_bytes {
            if self.dropped.load(Ordering::Relaxed) == 0 {
                if self
                    .tx
                    .try_send(Outbound::Message(delivery.clone()))
                    .is_ok()
                {
                    return true;
                }
            } else if let Ok(mut permits) = self.tx.try_reserve_many(2) {
                let n = self.dropped.swap(0, Ordering::Relaxed);
                if n > 0 {
                    if let Some(p) = permits.next() {
                        p.send(Outbound::Lagged(n));
                    }
                }
                if let Some(p) = permits.next() {
                    p.send(Outbound::Message(delivery.clone()));
                    return true;
                }
            }
        }
        self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
        self.dropped.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// The writer took a frame of `len` bytes off the queue.
    pub fn dequeued(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
    }

    /// Counts `n` messages lost for this connection outside the queue (a
    /// retained replay over the bound), to be reported with `lagged`.
    pub fn lost(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes the count of dropped messages not yet reported (for the writer
    /// to send `lagged` when its queue runs empty).
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// Connections holding the filter that ends at this node.
    holders: Vec<Arc<Conn>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.holders.is_empty()
    }

    /// Collects the holder lists of every filter that matches `levels`.
    fn collect<'a>(
        &'a self,
        levels: &[&str],
        root_of_reserved: bool,
        out: &mut Vec<&'a [Arc<Conn>]>,
    ) {
        if !root_of_reserved {
            if let Some(hash) = self.children.get("#") {
                out.push(&hash.holders);
            }
        }
        match levels.split_first() {
            None => out.push(&self.holders),
            Some((level, rest)) => {
                if let Some(child) = self.children.get(*level) {
                    child.collect(rest, false, out);
                }
                if !root_of_reserved {
                    if let Some(child) = self.children.get("+") {
                        child.collect(rest, false, out);
                    }
                }
            }
        }
    }

    /// Returns whether `conn` was added (false: it held the filter already).
    fn insert(&mut self, levels: &[&str], conn: &Arc<Conn>) -> bool {
        match levels.split_first() {
            None => {
                if self.holders.iter().any(|c| c.id == conn.id) {
                    return false;
                }
                self.holders.push(conn.clone());
                true
            }
            Some((level, rest)) => self
                .children
                .entry((*level).into())
                .or_default()
                .insert(rest, conn),
        }
    }

    /// Returns how many connections still hold the filter, or `None` when
    /// `conn` did not hold it.
    fn remove(&mut self, levels: &[&str], conn: ConnId) -> Option<usize> {
        match levels.split_first() {
            None => {
                let i = self.holders.iter().position(|c| c.id == conn)?;
                self.holders.swap_remove(i);
                Some(self.holders.len())
            }
            Some((level, rest)) => {
                let child = self.children.get_mut(*level)?;
                let left = child.remove(rest, conn);
                if child.is_empty() {
                    self.children.remove(*level);
                }
                left
            }
        }
    }

    fn holders(&self, levels: &[&str]) -> usize {
        match levels.split_first() {
            None => self.holders.len(),
            Some((level, rest)) => self.children.get(*level).map_or(0, |c| c.holders(rest)),
        }
    }
}

/// The subscription index and fan-out.
pub struct Hub {
    root: RwLock<Node>,
    prefix: Prefix,
    max_payload: usize,
    metrics: Arc<Metrics>,
}

/// What one broker message did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fanout {
    pub queued: usize,
    pub dropped: usize,
}

impl Hub {
    pub fn new(prefix: Prefix, max_payload: usize, metrics: Arc<Metrics>) -> Self {
        Hub {
            root: RwLock::new(Node::default()),
            prefix,
            max_payload,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Adds `conn` as a holder of `filter` (a broker filter). Returns false
    /// when it held it already.
    pub fn insert(&self, filter: &str, conn: &Arc<Conn>) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let added = self.root.write().insert(&levels, conn);
        if added {
            self.metrics.subscriptions.inc();
        }
        added
    }

    /// Removes `conn` from `filter`. Returns how many still hold it, or
    /// `None` when it did not.
    pub fn remove(&self, filter: &str, conn: ConnId) -> Option<usize> {
        let levels: Vec<&str> = filter.split('/').collect();
        let left = self.root.write().remove(&levels, conn);
        if left.is_some() {
            self.metrics.subscriptions.dec();
        }
        left
    }

    /// How many connections hold `filter`.
    pub fn holders(&self, filter: &str) -> usize {
        let levels: Vec<&str> = filter.split('/').collect();
        self.root.read().holders(&levels)
    }

    /// Delivers one broker message to every connection holding a matching
    /// filter, once each.
    pub fn deliver(&self, topic: &str, payload: &[u8], at: Instant) -> Fanout {
        let verdict = session::deliverable(&self.prefix, self.max_payload, topic, payload.len());
        if verdict == Err(Undeliverable::OutsidePrefix) {
            self.metrics.mqtt_messages_unmatched.inc();
            return Fanout::default();
        }
        let levels: Vec<&str> = topic.split('/').collect();
        let root = self.root.read();
        let mut lists: Vec<&[Arc<Conn>]> = Vec::new();
        root.collect(&levels, channel::is_reserved(topic), &mut lists);
        lists.retain(|l| !l.is_empty());
        if lists.is_empty() {
            self.metrics.mqtt_messages_unmatched.inc();
            return Fanout::default();
        }
        let recipients: Vec<&Arc<Conn>> = if lists.len() == 1 {
            lists[0].iter().collect()
        } else {
            let mut all: Vec<&Arc<Conn>> = lists.iter().flat_map(|l| l.iter()).collect();
            all.sort_unstable_by_key(|c| c.id);
            all.dedup_by_key(|c| c.id);
            all
        };
        let channel = match verdict {
            Ok(channel) => channel,
            Err(reason) => {
                self.metrics
                    .dropped(DropReason::TooLarge, recipients.len() as u64);
                tracing::warn!(
                    topic,
                    %reason,
                    recipients = recipients.len(),
                    "message not delivered"
                );
                return Fanout {
                    queued: 0,
                    dropped: recipients.len(),
                };
            }
        };
        let delivery = Arc::new(Delivery {
            frame: frame::message(channel, payload, false).into(),
            at,
        });
        let mut fanout = Fanout::default();
        for conn in recipients {
            if conn.offer(&delivery) {
                fanout.queued += 1;
            } else {
                fanout.dropped += 1;
            }
        }
        if fanout.dropped > 0 {
            self.metrics
                .dropped(DropReason::Lagged, fanout.dropped as u64);
        }
        fanout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: ConnId, cap: usize) -> (Arc<Conn>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(cap);
        (Arc::new(Conn::new(id, tx, usize::MAX / 2)), rx)
    }

    fn hub() -> Hub {
        Hub::new(Prefix::default(), 1024, Arc::new(Metrics::new()))
    }

    fn drain(rx: &mut mpsc::Receiver<Outbound>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(o) = rx.try_recv() {
            out.push(match o {
                Outbound::Message(d) => d.frame.to_string(),
                Outbound::Lagged(n) => format!("lagged {n}"),
            });
        }
        out
    }

    #[test]
    fn one_copy_with_overlapping_filters() {
        let hub = hub();
        let (a, mut ra) = conn(1, 16);
        let (b, mut rb) = conn(2, 16);
        hub.insert("fleet/#", &a);
        hub.insert("fleet/d1/t", &a);
        hub.insert("fleet/+/t", &b);
        hub.insert("+/d1/t", &b);
        let f = hub.deliver("fleet/d1/t", b"1", Instant::now());
        assert_eq!(
            f,
            Fanout {
                queued: 2,
                dropped: 0
            }
        );
        assert_eq!(drain(&mut ra).len(), 1);
        assert_eq!(drain(&mut rb).len(), 1);
        assert_eq!(
            hub.deliver("other", b"1", Instant::now()),
            Fanout::default()
        );
    }

    #[test]
    fn reserved_topics_skip_root_wildcards() {
        let hub = hub();
        let (a, mut ra) = conn(1, 16);
        hub.insert("#", &a);
        hub.insert("+/x", &a);
        hub.deliver("$SYS/x", b"1", Instant::now());
        assert!(drain(&mut ra).is_empty());
        hub.insert("$SYS/#", &a);
        hub.deliver("$SYS/x", b"1", Instant::now());
        assert_eq!(drain(&mut ra).len(), 1);
    }

    #[test]
    fn hash_matches_parent() {
        let hub = hub();
        let (a, mut ra) = conn(1, 16);
        hub.insert("a/#", &a);
        hub.deliver("a", b"1", Instant::now());
        hub.deliver("a/b/c", b"1", Instant::now());
        hub.deliver("b", b"1", Instant::now());
        assert_eq!(drain(&mut ra).len(), 2);
    }

    #[test]
    fn full_queue_drops_and_reports_lagged() {
        let hub = hub();
        let (a, mut ra) = conn(1, 2);
        hub.insert("t", &a);
        for i in 0..5 {
            hub.deliver("t", format!("{i}").as_bytes(), Instant::now());
        }
        assert_eq!(drain(&mut ra).len(), 2);
        hub.deliver("t", b"5", Instant::now());
        let got = drain(&mut ra);
        assert_eq!(got[0], "lagged 3");
        assert!(got[1].contains("\"data\":5"));
    }

    #[test]
    fn queue_is_bounded_in_bytes() {
        let hub = hub();
        let (tx, mut rx) = mpsc::channel(100);
        let frame_len = frame::message("t", b"0123456789", false).len();
        let a = Arc::new(Conn::new(1, tx, 3 * frame_len));
        hub.insert("t", &a);
        for _ in 0..5 {
            hub.deliver("t", b"0123456789", Instant::now());
        }
        // Three fit in the bytes, two are lost.
        let got = drain(&mut rx);
        assert_eq!(got.len(), 3);
        // Taking them off the queue frees the bytes: the next one gets in,
        // after the `lagged` notice.
        a.dequeued(3 * frame_len);
        hub.deliver("t", b"0123456789", Instant::now());
        let got = drain(&mut rx);
        assert_eq!(got[0], "lagged 2");
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn insert_remove_counts() {
        let hub = hub();
        let (a, _ra) = conn(1, 2);
        let (b, _rb) = conn(2, 2);
        assert!(hub.insert("x/+", &a));
        assert!(!hub.insert("x/+", &a));
        assert!(hub.insert("x/+", &b));
        assert_eq!(hub.holders("x/+"), 2);
        assert_eq!(hub.remove("x/+", 1), Some(1));
        assert_eq!(hub.remove("x/+", 1), None);
        assert_eq!(hub.remove("x/+", 2), Some(0));
        assert_eq!(hub.holders("x/+"), 0);
        assert!(hub.root.read().is_empty());
    }

    #[test]
    fn oversize_payload_is_counted_not_delivered() {
        let hub = Hub::new(Prefix::default(), 4, Arc::new(Metrics::new()));
        let (a, mut ra) = conn(1, 4);
        hub.insert("t", &a);
        assert_eq!(hub.deliver("t", b"12345", Instant::now()).dropped, 1);
        assert!(drain(&mut ra).is_empty());
    }
}
