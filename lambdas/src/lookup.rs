//! Who a device message goes to: the connections holding a filter that
//! matches its topic, read through a cache kept per fan-out environment.
//!
//! The filters to read are [`crate::store::lookup_keys`]: the topic, its
//! literal-prefix ancestors and the registered `+` filters that match it.
//! Every read is kept and reused for at most `max_age`
//! (`BRIDGE_LOOKUP_CACHE_MS`, default 1 s): a filter's rows, the registry's
//! version, and the registry. So however many messages a second an
//! environment handles, it reads any one DynamoDB partition at most once per
//! `max_age`: a hot channel, the `#` ancestor every topic has, and the
//! registry cost a bounded number of reads a second per environment, and no
//! single item is read once per message.
//!
//! Why an acked subscription still never misses a message: each entry is
//! stamped with the time its (strongly consistent) read was *sent*, and is
//! used only while younger than `max_age`. `ws-handler` sends a subscribe's
//! ack no earlier than `max_age` plus a margin after its last write returned
//! (the filter rows, and for a `+` filter the registry row with its version
//! bump). A message published after the client got that ack reaches a
//! fan-out whose every entry was read after that write: it sees the new
//! rows. (Durations are measured on each host's own clock, never compared
//! across hosts; see [`crate::clock`] for frozen environments.)
//!
//! The registry is re-read only when its version moved, and the version is
//! read *before* the rows: a row and the bump that announces it commit in one
//! transaction, so a read of the rows that starts after seeing a version sees
//! every row that version announced, even if it also sees later ones.
//!
//! Connections known gone (a post answered 410, a token that ended) are
//! remembered for `max_age`, so a cached list does not post to them again.
//! Entries older than `max_age` are never used and are dropped as the cache
//! grows: it holds what one environment read within the last `max_age`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::{Clock, Stamp};
use crate::store::{self, Store, StoreError, Subscriber};

/// Checking stale entries starts at this many.
const PRUNE_AT: usize = 1024;

/// A filter's subscribers as read.
type Rows = Arc<Vec<Subscriber>>;

#[derive(Debug, Clone)]
struct Registry {
    checked: Stamp,
    version: i64,
    filters: Arc<Vec<String>>,
}

#[derive(Debug, Default)]
struct Entries {
    rows: HashMap<String, (Stamp, Rows)>,
    gone: HashMap<String, Stamp>,
    prune_at: usize,
}

/// The connections a message goes to, one entry per connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// Filters looked up (the topic, its ancestors, matching registered filters).
    pub filters: usize,
    /// Connection id → the token's end its rows say (the latest when
    /// several rows disagree, `None` when any says it never ends).
    pub connections: BTreeMap<String, Option<i64>>,
}

/// The lookups of one fan-out environment.
#[derive(Debug)]
pub struct Lookups {
    store: Store,
    max_age: Duration,
    clock: Clock,
    entries: Mutex<Entries>,
    /// One registry check at a time per environment.
    registry: tokio::sync::Mutex<Option<Registry>>,
}

impl Lookups {
    pub fn new(store: Store, max_age: Duration, clock: Clock) -> Self {
        Lookups {
            store,
            max_age,
            clock,
            entries: Mutex::new(Entries {
                prune_at: PRUNE_AT,
                ..Entries::default()
            }),
            registry: tokio::sync::Mutex::new(None),
        }
    }

    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// The connections holding a filter that matches `topic` (`now`: seconds
    /// since the epoch, for the rows' TTL).
    pub async fn subscribers(&self, topic: &str, now: i64) -> Result<Found, StoreError> {
        let registry = self.registry(now).await?;
        let keys = store::lookup_keys(topic, &registry);
        let lists =
            futures_util::future::try_join_all(keys.iter().map(|k| self.rows(k, now))).await?;
        let stamp = self.clock.now();
        let entries = self.lock();
        let mut connections: BTreeMap<String, Option<i64>> = BTreeMap::new();
        for row in lists.iter().flat_map(|l| l.iter()) {
            let known_gone = entries
                .gone
                .get(&row.id)
                .is_some_and(|at| at.fresh(stamp, self.max_age));
            if known_gone {
                continue;
            }
            let end = connections
                .entry(row.id.clone())
                .or_insert(row.token_expires);
            *end = match (*end, row.token_expires) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        drop(entries);
        Ok(Found {
            filters: keys.len(),
            connections,
        })
    }

    /// Remembers that a connection is gone, so cached rows naming it are not
    /// used for it until they are re-read.
    pub fn forget(&self, id: &str) {
        if self.max_age.is_zero() {
            return;
        }
        let now = self.clock.now();
        self.lock().gone.insert(id.to_string(), now);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A filter's rows, from the cache while fresh.
    async fn rows(&self, mqtt: &str, now: i64) -> Result<Rows, StoreError> {
        let stamp = self.clock.now();
        if let Some((at, rows)) = self.lock().rows.get(mqtt) {
            if at.fresh(stamp, self.max_age) {
                return Ok(rows.clone());
            }
        }
        let rows: Rows = Arc::new(self.store.subscribers(mqtt, now).await?);
        if !self.max_age.is_zero() {
            let mut entries = self.lock();
            entries.rows.insert(mqtt.to_string(), (stamp, rows.clone()));
            if entries.rows.len() + entries.gone.len() >= entries.prune_at {
                let (fresh_now, max_age) = (self.clock.now(), self.max_age);
                entries
                    .rows
                    .retain(|_, (at, _)| at.fresh(fresh_now, max_age));
                entries.gone.retain(|_, at| at.fresh(fresh_now, max_age));
                entries.prune_at = PRUNE_AT.max(2 * (entries.rows.len() + entries.gone.len()));
            }
        }
        Ok(rows)
    }

    /// The registered filters: the version re-checked once per `max_age`,
    /// the rows re-read when it moved.
    async fn registry(&self, now: i64) -> Result<Arc<Vec<String>>, StoreError> {
        let mut cached = self.registry.lock().await;
        let stamp = self.clock.now();
        if let Some(r) = cached.as_ref() {
            if r.checked.fresh(stamp, self.max_age) {
                return Ok(r.filters.clone());
            }
        }
        let version = self.store.registry_version().await?;
        let filters = match cached.as_ref() {
            Some(r) if r.version == version => r.filters.clone(),
            _ if version == 0 => Arc::new(Vec::new()),
            _ => Arc::new(self.store.registered_filters(now).await?),
        };
        *cached = Some(Registry {
            checked: stamp,
            version,
            filters: filters.clone(),
        });
        Ok(filters)
    }
}
