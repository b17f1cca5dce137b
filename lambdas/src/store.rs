//! The subscription store: one DynamoDB table (`pk`, `sk`, TTL attribute
//! `ttl`), defined once in `infra/template.yaml`.
//!
//! | row | `pk` | `sk` | other attributes |
//! |---|---|---|---|
//! | a connection | `conn#{id}` | `meta` | `perms` (JSON), `exp` (the token's end), `sub`, `n` (filters held), `connected_at` |
//! | a filter it holds | `conn#{id}` | `sub#{channel}` | `mqtt` (the broker filter) |
//! | a filter's connection | `filter#{mqtt}` | `{id}` | `exp` (the token's end, a copy) |
//! | a registered `+` filter | `wildcards` | `f#{mqtt}` | `stamp` |
//! | the registry's version | `wildcards` | `version` | `v` |
//! | what a delivery part still owes | `sent#{message id}` | `{part key}` | `left` (connection ids) |
//!
//! One query reads a connection (its permissions and filters), one query a
//! filter's connections. The fan-out never scans and never enumerates the
//! wildcard combinations of a topic: for a message on topic T it queries the
//! rows of T itself, of T's literal-prefix ancestors (`#`, `a/#`, `a/b/#`
//! for `a/b`: [`lookup_keys`]), and of the registered filters that match T.
//! Only filters with a `+` level are registered ([`registered`]); a
//! per-user `users/{sub}/#` is an ancestor of its topics and never touches
//! the registry. The fan-out matches the topic against the registry in
//! memory with the core's [`bridge::channel::matches`].
//!
//! No single item is read per message: each fan-out environment keeps every
//! read (a filter's rows, the registry and its version) for at most the
//! lookup cache's age (1 s by default), so a partition is read at most once
//! per that age per environment, whatever the message rate
//! ([`crate::lookup`], which also says why an acked subscribe is never
//! missed: `ws-handler` acks it only once every cached read is younger than
//! its writes). The registry's version item is written once per *new*
//! registered filter, not per subscribe.
//!
//! Races, each with its outcome:
//!
//! * subscribe vs. `$disconnect`: a subscribe is one transaction conditioned
//!   on the connection row, and `$disconnect` deletes that row first, then
//!   the rest found by a consistent read; the subscribe either lands before
//!   that read (and is cleaned) or fails. Never an orphan.
//! * concurrent subscribes on one connection: the filter count on the
//!   connection row, incremented in the transaction, holds the limit.
//! * registration vs. release of a `+` filter: its registry row is written
//!   after the filter rows (with a version bump in the same transaction when
//!   the row is new), and deleted only if no filter row exists and nobody
//!   re-registered it meanwhile (`stamp`, conditioned delete). A release
//!   never bumps the version: a fan-out that still queries a released
//!   filter finds no rows.
//! * a fan-out reading the registry while a filter registers: it reads the
//!   version first and the rows after (see [`crate::lookup`]); a row
//!   committed with a bump it has seen is in its read of the rows.
//! * a fan-out using cached rows while connections subscribe, unsubscribe or
//!   go: a subscribe is acked only once no cached read predates it; an
//!   unsubscribed or closed connection may still be posted a message for up
//!   to the cache's age (a post to a closed connection is answered 410 and
//!   costs nothing else).
//! * `auth` vs. the fan-out: see Token lifetime below.
//! * a delivery part retried by Lambda: an invocation that gives up after
//!   posting writes what it still owes (`sent#` row) before failing; its
//!   retry reads it and posts only that (see [`crate::fanout`]).
//!
//! Token lifetime: the connection row holds the token's end (`exp`, seconds
//! since the epoch; absent with auth off), and each of its filter rows a copy,
//! so the fan-out sees it without reading connection rows. An `auth` request
//! writes the connection row first, then the copies; a subscribe racing it
//! may write a copy with the old end. So a copy is only ever trusted to say
//! "still valid": when it says expired, the fan-out reads the connection row
//! (one consistent read, once per connection that ends) before closing it.
//!
//! Every row carries a TTL (API Gateway closes a connection after 2 hours;
//! a progress row lives an hour); TTL deletion is lazy, so reads ignore rows
//! past their TTL.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, TransactWriteItem, WriteRequest};
use aws_sdk_dynamodb::Client;
use bridge::auth::Credentials;
use bridge::channel;
use bridge::permissions::Permissions;

const PK: &str = "pk";
const SK: &str = "sk";
const TTL: &str = "ttl";
/// The token's end, on connection and filter rows.
const EXP: &str = "exp";
const META: &str = "meta";
const REGISTRY_PK: &str = "wildcards";
const VERSION_SK: &str = "version";
/// DynamoDB's batch write limit.
const BATCH: usize = 25;
/// The connections a progress row still owes.
const LEFT: &str = "left";
/// What a progress row may hold of connection ids (an item holds 400 KB).
const MAX_PROGRESS_BYTES: usize = 350_000;

/// A store request failed.
#[derive(Debug, thiserror::Error)]
#[error("DynamoDB {operation} failed: {message}")]
pub struct StoreError {
    pub operation: &'static str,
    pub message: String,
}

impl StoreError {
    fn new(operation: &'static str, e: impl std::error::Error) -> Self {
        StoreError {
            operation,
            message: DisplayErrorContext(e).to_string(),
        }
    }

    fn msg(operation: &'static str, message: impl Into<String>) -> Self {
        StoreError {
            operation,
            message: message.into(),
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// What the store knows about one live connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub perms: Permissions,
    /// Client channel names of the filters held (the form
    /// [`bridge::session::decide_request`] takes).
    pub held: BTreeSet<String>,
    /// When its rows expire (seconds since the epoch).
    pub expires: i64,
    /// When its token ends (seconds since the epoch); `None` with auth off.
    pub token_expires: Option<i64>,
}

impl Connection {
    /// Whether its token has ended at `now`.
    pub fn token_expired(&self, now: i64) -> bool {
        self.token_expires.is_some_and(|at| now >= at)
    }
}

/// A connection holding a filter, as the filter's row names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    pub id: String,
    /// The token's end as the row last heard it (see the module doc).
    pub token_expires: Option<i64>,
}

/// How a subscribe ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    Added,
    /// The connection already held the filter (a concurrent frame added it).
    AlreadyHeld,
    /// The connection is at its limit (a concurrent frame took the last slot).
    TooMany,
    /// The connection is gone (disconnected or expired).
    Gone,
}

pub fn conn_pk(id: &str) -> String {
    format!("conn#{id}")
}

pub fn filter_pk(mqtt: &str) -> String {
    format!("filter#{mqtt}")
}

fn sub_sk(channel: &str) -> String {
    format!("sub#{channel}")
}

fn registry_sk(mqtt: &str) -> String {
    format!("f#{mqtt}")
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn get_s<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> Option<&'a str> {
    item.get(name)?.as_s().ok().map(String::as_str)
}

fn get_n(item: &HashMap<String, AttributeValue>, name: &str) -> Option<i64> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

/// A row is live until its TTL has passed; a row without one never expires.
fn live(item: &HashMap<String, AttributeValue>, now: i64) -> bool {
    get_n(item, TTL).is_none_or(|t| t >= now)
}

/// The DynamoDB table.
#[derive(Debug, Clone)]
pub struct Store {
    client: Client,
    table: String,
}

impl Store {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Store {
            client,
            table: table.into(),
        }
    }

    fn key(&self, pk: String, sk: String) -> HashMap<String, AttributeValue> {
        HashMap::from([(PK.to_string(), s(pk)), (SK.to_string(), s(sk))])
    }

    /// One row, read consistently.
    async fn get(&self, pk: String, sk: String) -> Result<Option<HashMap<String, AttributeValue>>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(self.key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| StoreError::new("GetItem", e))?;
        Ok(out.item)
    }

    // ---- connections ----

    /// Stores a new connection (`$connect`).
    pub async fn put_connection(
        &self,
        id: &str,
        credentials: &Credentials,
        connected_at_ms: i64,
        expires: i64,
    ) -> Result<()> {
        let perms = &credentials.perms;
        let perms_json = serde_json::to_string(perms)
            .map_err(|e| StoreError::msg("PutItem", format!("permissions: {e}")))?;
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(PK, s(conn_pk(id)))
            .item(SK, s(META))
            .item("perms", s(perms_json))
            .item("n", n(0))
            .item("connected_at", n(connected_at_ms))
            .item(TTL, n(expires));
        if let Some(at) = credentials.expires_at {
            put = put.item(EXP, n(secs(at)));
        }
        if let Some(sub) = &perms.subject {
            put = put.item("sub", s(sub.clone()));
        }
        put.send()
            .await
            .map_err(|e| StoreError::new("PutItem", e))?;
        Ok(())
    }

    /// Reads a connection: its permissions and the filters it holds. `None`
    /// when it is unknown or expired.
    pub async fn load_connection(&self, id: &str, now: i64) -> Result<Option<Connection>> {
        let items = self.query_all(conn_pk(id), None).await?;
        let Some(meta) = items
            .iter()
            .find(|i| get_s(i, SK) == Some(META) && live(i, now))
        else {
            return Ok(None);
        };
        let perms: Permissions = get_s(meta, "perms")
            .and_then(|p| serde_json::from_str(p).ok())
            .ok_or_else(|| {
                StoreError::msg(
                    "Query",
                    format!("connection {id} has unreadable permissions"),
                )
            })?;
        let expires = get_n(meta, TTL).unwrap_or(i64::MAX);
        let token_expires = get_n(meta, EXP);
        let held = items
            .iter()
            .filter(|i| live(i, now))
            .filter_map(|i| Some(get_s(i, SK)?.strip_prefix("sub#")?.to_string()))
            .collect();
        Ok(Some(Connection {
            perms,
            held,
            expires,
            token_expires,
        }))
    }

    /// A connection's token end, read consistently: `None` when the
    /// connection is gone, `Some(None)` when its token has no end (auth off).
    pub async fn token_expiry(&self, id: &str, now: i64) -> Result<Option<Option<i64>>> {
        let meta = self.get(conn_pk(id), META.to_string()).await?;
        Ok(meta.filter(|m| live(m, now)).map(|m| get_n(&m, EXP)))
    }

    /// Replaces a connection's credentials (`auth`): the connection row,
    /// then the copy of the token's end on the row of each filter it holds
    /// (`mqtt`: their broker filters). Returns false when the connection is
    /// gone.
    pub async fn update_credentials(
        &self,
        id: &str,
        credentials: &Credentials,
        mqtt: &[String],
    ) -> Result<bool> {
        let perms_json = serde_json::to_string(&credentials.perms)
            .map_err(|e| StoreError::msg("UpdateItem", format!("permissions: {e}")))?;
        let exp = credentials.expires_at.map(|at| n(secs(at)));
        let conn = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(self.key(conn_pk(id), META.to_string())))
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":perms", s(perms_json));
        let conn = match exp.clone() {
            Some(exp) => conn
                .update_expression("SET perms = :perms, #exp = :exp")
                .expression_attribute_names("#exp", EXP)
                .expression_attribute_values(":exp", exp),
            None => conn
                .update_expression("SET perms = :perms REMOVE #exp")
                .expression_attribute_names("#exp", EXP),
        };
        match conn.send().await {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                return Ok(false)
            }
            Err(e) => return Err(StoreError::new("UpdateItem", e)),
        }
        for filter in mqtt {
            let row = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(self.key(filter_pk(filter), id.to_string())))
                .condition_expression("attribute_exists(pk)")
                .expression_attribute_names("#exp", EXP);
            let row = match exp.clone() {
                Some(exp) => row
                    .update_expression("SET #exp = :exp")
                    .expression_attribute_values(":exp", exp),
                None => row.update_expression("REMOVE #exp"),
            };
            match row.send().await {
                Ok(_) => {}
                // Unsubscribed meanwhile: nothing to update.
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|se| se.is_conditional_check_failed_exception()) => {}
                Err(e) => return Err(StoreError::new("UpdateItem", e)),
            }
        }
        Ok(true)
    }

    /// Every row in a partition, with consistent reads.
    async fn query_all(
        &self,
        pk: String,
        projection: Option<&str>,
    ) -> Result<Vec<HashMap<String, AttributeValue>>> {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let mut q = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(pk.clone()))
                .consistent_read(true)
                .set_exclusive_start_key(start.take());
            if let Some(p) = projection {
                q = q.projection_expression(p);
                if p.contains("#ttl") {
                    q = q.expression_attribute_names("#ttl", TTL);
                }
                if p.contains("#exp") {
                    q = q.expression_attribute_names("#exp", EXP);
                }
            }
            let page = q.send().await.map_err(|e| StoreError::new("Query", e))?;
            out.extend(page.items.unwrap_or_default());
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(out),
            }
        }
    }

    /// Deletes every row of a connection (`$disconnect`, or a post answered
    /// 410 Gone). The connection row goes first, so a racing subscribe fails.
    /// Returns the number of filters it held.
    pub async fn remove_connection(&self, id: &str, now: i64) -> Result<usize> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(self.key(conn_pk(id), META.to_string())))
            .send()
            .await
            .map_err(|e| StoreError::new("DeleteItem", e))?;
        let items = self.query_all(conn_pk(id), None).await?;
        let mut deletes = Vec::new();
        let mut wildcards = Vec::new();
        let mut held = 0;
        for item in &items {
            let Some(sk) = get_s(item, SK) else { continue };
            deletes.push(self.key(conn_pk(id), sk.to_string()));
            if let Some(mqtt) = get_s(item, "mqtt") {
                held += 1;
                deletes.push(self.key(filter_pk(mqtt), id.to_string()));
                if registered(mqtt) {
                    wildcards.push(mqtt.to_string());
                }
            }
        }
        self.delete_keys(deletes).await?;
        for mqtt in wildcards {
            self.release_wildcard(&mqtt, now).await?;
        }
        Ok(held)
    }

    async fn delete_keys(&self, keys: Vec<HashMap<String, AttributeValue>>) -> Result<()> {
        for chunk in keys.chunks(BATCH) {
            let mut requests: Vec<WriteRequest> = chunk
                .iter()
                .map(|key| {
                    DeleteRequest::builder()
                        .set_key(Some(key.clone()))
                        .build()
                        .map(|d| WriteRequest::builder().delete_request(d).build())
                        .map_err(|e| StoreError::new("BatchWriteItem", e))
                })
                .collect::<Result<_>>()?;
            let mut attempt = 0;
            while !requests.is_empty() {
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, requests)
                    .send()
                    .await
                    .map_err(|e| StoreError::new("BatchWriteItem", e))?;
                requests = out
                    .unprocessed_items
                    .and_then(|mut u| u.remove(&self.table))
                    .unwrap_or_default();
                attempt += 1;
                if !requests.is_empty() {
                    if attempt >= 8 {
                        return Err(StoreError::msg(
                            "BatchWriteItem",
                            format!("{} deletes still unprocessed", requests.len()),
                        ));
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
        Ok(())
    }

    // ---- subscriptions ----

    /// Adds `channel` (broker filter `mqtt`) to a connection that does not
    /// hold it yet, within `max` filters. A wildcard filter is then
    /// registered for `registry_ttl_secs`; if that fails, the subscription is
    /// taken back and the error returned.
    #[allow(clippy::too_many_arguments)]
    pub async fn subscribe(
        &self,
        id: &str,
        channel: &str,
        mqtt: &str,
        expires: i64,
        token_expires: Option<i64>,
        max: usize,
        now: i64,
        registry_ttl_secs: i64,
    ) -> Result<Subscribed> {
        let op = "TransactWriteItems";
        let build = |e: aws_sdk_dynamodb::error::BuildError| StoreError::new(op, e);
        let count = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(conn_pk(id), META.to_string())))
            .update_expression("SET #n = #n + :one")
            .condition_expression("attribute_exists(pk) AND #n < :max AND #ttl >= :now")
            .expression_attribute_names("#n", "n")
            .expression_attribute_names("#ttl", TTL)
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":max", n(max as i64))
            .expression_attribute_values(":now", n(now))
            .build()
            .map_err(build)?;
        let own = aws_sdk_dynamodb::types::Put::builder()
            .table_name(&self.table)
            .item(PK, s(conn_pk(id)))
            .item(SK, s(sub_sk(channel)))
            .item("mqtt", s(mqtt))
            .item(TTL, n(expires))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(build)?;
        let mut index = aws_sdk_dynamodb::types::Put::builder()
            .table_name(&self.table)
            .item(PK, s(filter_pk(mqtt)))
            .item(SK, s(id))
            .item(TTL, n(expires));
        if let Some(at) = token_expires {
            index = index.item(EXP, n(at));
        }
        let index = index.build().map_err(build)?;
        let items = vec![
            TransactWriteItem::builder().update(count).build(),
            TransactWriteItem::builder().put(own).build(),
            TransactWriteItem::builder().put(index).build(),
        ];
        let reasons = match self.transact(items).await? {
            None => {
                if registered(mqtt) {
                    if let Err(e) = self.register_wildcard(mqtt, now, registry_ttl_secs).await {
                        let _ = self.unsubscribe(id, channel, mqtt, now).await;
                        return Err(e);
                    }
                }
                return Ok(Subscribed::Added);
            }
            Some(reasons) => reasons,
        };
        let failed =
            |i: usize| reasons.get(i).map(String::as_str) == Some("ConditionalCheckFailed");
        let meta = self.get(conn_pk(id), META.to_string()).await?;
        Ok(match meta {
            Some(m) if live(&m, now) => {
                if failed(1) {
                    Subscribed::AlreadyHeld
                } else {
                    Subscribed::TooMany
                }
            }
            _ => Subscribed::Gone,
        })
    }

    /// Runs a transaction; `Some(reasons)` when it was cancelled by a
    /// condition (one reason code per item). Conflicts are retried.
    async fn transact(&self, items: Vec<TransactWriteItem>) -> Result<Option<Vec<String>>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .send()
                .await;
            let err = match result {
                Ok(_) => return Ok(None),
                Err(e) => e,
            };
            let reasons: Option<Vec<String>> = err
                .as_service_error()
                .and_then(|se| match se {
                    aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c) => Some(c),
                    _ => None,
                })
                .map(|c| {
                    c.cancellation_reasons()
                        .iter()
                        .map(|r| r.code().unwrap_or("None").to_string())
                        .collect()
                });
            match reasons {
                Some(r) if r.iter().any(|c| c == "TransactionConflict") && attempt < 5 => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Some(r) if r.iter().any(|c| c == "ConditionalCheckFailed") => return Ok(Some(r)),
                _ => return Err(StoreError::new("TransactWriteItems", err)),
            }
        }
    }

    /// Removes `channel` from a connection. Not holding it (any more) is fine.
    pub async fn unsubscribe(&self, id: &str, channel: &str, mqtt: &str, now: i64) -> Result<()> {
        let op = "TransactWriteItems";
        let build = |e: aws_sdk_dynamodb::error::BuildError| StoreError::new(op, e);
        let own = aws_sdk_dynamodb::types::Delete::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(conn_pk(id), sub_sk(channel))))
            .condition_expression("attribute_exists(pk)")
            .build()
            .map_err(build)?;
        let index = aws_sdk_dynamodb::types::Delete::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(filter_pk(mqtt), id.to_string())))
            .build()
            .map_err(build)?;
        let count = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(conn_pk(id), META.to_string())))
            .update_expression("SET #n = #n - :one")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#n", "n")
            .expression_attribute_values(":one", n(1))
            .build()
            .map_err(build)?;
        let items = vec![
            TransactWriteItem::builder().delete(own).build(),
            TransactWriteItem::builder().delete(index).build(),
            TransactWriteItem::builder().update(count).build(),
        ];
        // Cancelled means not held (any more) or the connection is gone.
        self.transact(items).await?;
        if registered(mqtt) {
            self.release_wildcard(mqtt, now).await?;
        }
        Ok(())
    }

    // ---- the wildcard registry ----

    /// Registers a wildcard filter in use, after its filter rows exist. The
    /// row expires no earlier than any connection subscribing now. A filter
    /// new to the registry (or expired there) bumps the version in the same
    /// transaction, so every fan-out cache re-reads the registry: the row and
    /// the bump never come apart.
    async fn register_wildcard(&self, mqtt: &str, now: i64, ttl_secs: i64) -> Result<()> {
        let key = self.key(REGISTRY_PK.into(), registry_sk(mqtt));
        let stamp = fastrand::u64(..).to_string();
        // The usual case: registered and live; extend it.
        let extended = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key.clone()))
            .update_expression("SET #ttl = :exp, stamp = :stamp")
            .condition_expression("#ttl >= :now")
            .expression_attribute_names("#ttl", TTL)
            .expression_attribute_values(":exp", n(now + ttl_secs))
            .expression_attribute_values(":stamp", s(stamp.clone()))
            .expression_attribute_values(":now", n(now))
            .send()
            .await;
        match extended {
            Ok(_) => return Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) => {}
            Err(e) => return Err(StoreError::new("UpdateItem", e)),
        }
        let op = "TransactWriteItems";
        let build = |e: aws_sdk_dynamodb::error::BuildError| StoreError::new(op, e);
        let row = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression("SET #ttl = :exp, stamp = :stamp")
            .expression_attribute_names("#ttl", TTL)
            .expression_attribute_values(":exp", n(now + ttl_secs))
            .expression_attribute_values(":stamp", s(stamp))
            .build()
            .map_err(build)?;
        let version = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table)
            .set_key(Some(self.key(REGISTRY_PK.into(), VERSION_SK.into())))
            .update_expression("ADD v :one")
            .expression_attribute_values(":one", n(1))
            .build()
            .map_err(build)?;
        let items = vec![
            TransactWriteItem::builder().update(row).build(),
            TransactWriteItem::builder().update(version).build(),
        ];
        match self.transact(items).await? {
            None => Ok(()),
            Some(reasons) => Err(StoreError::msg(op, format!("cancelled: {reasons:?}"))),
        }
    }

    /// Drops a wildcard filter from the registry when no connection holds it
    /// any more and nobody registered it again meanwhile.
    async fn release_wildcard(&self, mqtt: &str, now: i64) -> Result<()> {
        let Some(row) = self.get(REGISTRY_PK.into(), registry_sk(mqtt)).await? else {
            return Ok(());
        };
        let Some(stamp) = get_s(&row, "stamp").map(str::to_string) else {
            return Ok(());
        };
        let page = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", s(filter_pk(mqtt)))
            .consistent_read(true)
            .limit(BATCH as i32)
            .send()
            .await
            .map_err(|e| StoreError::new("Query", e))?;
        let in_use = page.items().iter().any(|i| live(i, now))
            || page.last_evaluated_key.is_some_and(|k| !k.is_empty());
        if in_use {
            return Ok(());
        }
        let deleted = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(self.key(REGISTRY_PK.into(), registry_sk(mqtt))))
            .condition_expression("stamp = :stamp")
            .expression_attribute_values(":stamp", s(stamp))
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(()),
            // Registered again meanwhile: it stays.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(StoreError::new("DeleteItem", e)),
        }
    }

    /// The registry's version (0 before the first registration), read
    /// consistently.
    pub async fn registry_version(&self) -> Result<i64> {
        let version = self.get(REGISTRY_PK.into(), VERSION_SK.into()).await?;
        Ok(version.as_ref().and_then(|i| get_n(i, "v")).unwrap_or(0))
    }

    /// The live registered filters, read consistently. Read it only after
    /// reading [`Self::registry_version`]: a row and the version bump that
    /// announced it commit together, so this read sees every row the version
    /// read announced (see the module doc).
    pub async fn registered_filters(&self, now: i64) -> Result<Vec<String>> {
        let items = self.query_all(REGISTRY_PK.into(), None).await?;
        Ok(items
            .iter()
            .filter(|item| live(item, now))
            .filter_map(|item| get_s(item, SK)?.strip_prefix("f#").map(str::to_string))
            .collect())
    }

    /// The live connections holding broker filter `mqtt`.
    pub async fn subscribers(&self, mqtt: &str, now: i64) -> Result<Vec<Subscriber>> {
        let items = self
            .query_all(filter_pk(mqtt), Some("sk, #ttl, #exp"))
            .await?;
        Ok(items
            .iter()
            .filter(|i| live(i, now))
            .filter_map(|i| {
                Some(Subscriber {
                    id: get_s(i, SK)?.to_string(),
                    token_expires: get_n(i, EXP),
                })
            })
            .collect())
    }

    // ---- delivery progress ----

    /// Records the connections a part of a message's delivery still owes
    /// (`left`), when an invocation gives up after posting some: its retry
    /// reads them back ([`Self::progress`]) instead of posting to everyone
    /// again. An empty `left` records a part that finished.
    pub async fn save_progress(
        &self,
        message: &str,
        part: &str,
        left: &[String],
        expires: i64,
    ) -> Result<()> {
        let bytes: usize = left.iter().map(|id| id.len() + 3).sum();
        if bytes > MAX_PROGRESS_BYTES {
            return Err(StoreError::msg(
                "PutItem",
                format!(
                    "{} connections left ({bytes} bytes) do not fit one progress row",
                    left.len()
                ),
            ));
        }
        self.client
            .put_item()
            .table_name(&self.table)
            .item(PK, s(progress_pk(message)))
            .item(SK, s(part))
            .item(
                LEFT,
                AttributeValue::L(left.iter().map(|id| s(id.clone())).collect()),
            )
            .item(TTL, n(expires))
            .send()
            .await
            .map_err(|e| StoreError::new("PutItem", e))?;
        Ok(())
    }

    /// What an earlier attempt of this part recorded as still owed, if it
    /// recorded anything. An eventually consistent read: Lambda retries a
    /// failed invocation a minute later at the earliest.
    pub async fn progress(
        &self,
        message: &str,
        part: &str,
        now: i64,
    ) -> Result<Option<Vec<String>>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(self.key(progress_pk(message), part.to_string())))
            .send()
            .await
            .map_err(|e| StoreError::new("GetItem", e))?;
        let Some(item) = out.item.filter(|i| live(i, now)) else {
            return Ok(None);
        };
        let left = item
            .get(LEFT)
            .and_then(|v| v.as_l().ok())
            .map(|l| l.iter().filter_map(|v| v.as_s().ok().cloned()).collect())
            .unwrap_or_default();
        Ok(Some(left))
    }
}

/// Whether the fan-out finds a filter's rows through the wildcard registry:
/// a filter with a `+` level. A topic is looked up as itself, and a
/// literal-prefix filter (`a/b/#`, `#`) as an ancestor of the topics it
/// matches ([`lookup_keys`]): neither is ever registered, so a per-user
/// `users/{sub}/#` never touches the registry.
pub fn registered(mqtt: &str) -> bool {
    mqtt.split('/').any(|level| level == "+")
}

/// The broker filters whose rows name the connections a message on `topic`
/// goes to: the topic itself, its literal-prefix ancestors (`#`, `a/#`,
/// `a/b/#` for `a/b`, as far as a filter may go), and the registered filters
/// (`registry`) that match it. Which filter matches is the core's rule
/// ([`bridge::channel::matches`]), so `#` is no ancestor of a `$` topic.
pub fn lookup_keys(topic: &str, registry: &[String]) -> Vec<String> {
    let mut keys = vec![topic.to_string()];
    let levels: Vec<&str> = topic.split('/').collect();
    for depth in 0..=levels.len() {
        let ancestor = match depth {
            0 => "#".to_string(),
            _ => format!("{}/#", levels[..depth].join("/")),
        };
        if channel::validate_filter(&ancestor).is_ok() && channel::matches(&ancestor, topic) {
            keys.push(ancestor);
        }
    }
    keys.extend(
        registry
            .iter()
            .filter(|f| channel::matches(f, topic))
            .cloned(),
    );
    keys
}

pub fn progress_pk(message: &str) -> String {
    format!("sent#{message}")
}

/// Seconds since the epoch as DynamoDB numbers hold them here.
fn secs(at: u64) -> i64 {
    i64::try_from(at).unwrap_or(i64::MAX)
}

/// Full-jitter exponential backoff: up to 50 ms × 2^attempt, at most 1 s.
pub fn backoff(attempt: u32) -> Duration {
    let cap = (50u64 << attempt.min(5)).min(1000);
    Duration::from_millis(fastrand::u64(cap / 4..=cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(filter_pk("a/#"), "filter#a/#");
        assert_eq!(conn_pk("X="), "conn#X=");
        assert_eq!(progress_pk("u-1"), "sent#u-1");
    }

    #[test]
    fn only_filters_with_a_plus_level_are_registered() {
        for f in ["a/+", "+", "+/b/#", "a/+/c"] {
            assert!(registered(f), "{f}");
        }
        for f in ["a", "a/b", "#", "a/#", "users/alice/#", "a+b/c#"] {
            assert!(!registered(f), "{f}");
        }
    }

    #[test]
    fn a_topic_is_looked_up_as_itself_its_ancestors_and_matching_registered_filters() {
        let registry = vec!["a/+".to_string(), "+/b/c".to_string(), "x/+".to_string()];
        assert_eq!(
            lookup_keys("a/b/c", &registry),
            ["a/b/c", "#", "a/#", "a/b/#", "a/b/c/#", "+/b/c"]
        );
        assert_eq!(
            lookup_keys("a/b", &registry),
            ["a/b", "#", "a/#", "a/b/#", "a/+"]
        );
        // `#` and `+` never match a `$` topic's first level.
        assert_eq!(
            lookup_keys("$aws/x", &["+/x".to_string()]),
            ["$aws/x", "$aws/#", "$aws/x/#"]
        );
        // Empty levels are levels.
        assert_eq!(
            lookup_keys("a//b", &[]),
            ["a//b", "#", "a/#", "a//#", "a//b/#"]
        );
        assert_eq!(lookup_keys("/a", &[]), ["/a", "#", "/#", "/a/#"]);
        // No ancestor deeper than a filter may be.
        let deep = "1/2/3/4/5/6/7/8";
        let keys = lookup_keys(deep, &[]);
        assert_eq!(keys.len(), 1 + 8, "{keys:?}");
        assert!(!keys.contains(&format!("{deep}/#")));
        // Every key matches the topic by the core's rule.
        for topic in ["a/b/c", "a/b", "$aws/x", "a//b", deep] {
            for key in lookup_keys(topic, &registry) {
                assert!(channel::matches(&key, topic), "{key} {topic}");
            }
        }
    }

    #[test]
    fn ttl_rule() {
        let mut item = HashMap::new();
        assert!(live(&item, 100));
        item.insert(TTL.to_string(), n(99));
        assert!(!live(&item, 100));
        item.insert(TTL.to_string(), n(100));
        assert!(live(&item, 100));
    }

    #[test]
    fn backoff_is_bounded() {
        for attempt in 0..20 {
            assert!(backoff(attempt) <= Duration::from_millis(1000));
        }
    }
}
