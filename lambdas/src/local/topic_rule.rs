//! IoT Core's topic rules: the rule's SQL read once, its `FROM` filter
//! subscribed on the broker (a session of its own, taking no retained
//! messages: a rule fires on publishes, not on replays), and for every
//! message the event its `SELECT` builds, handed to the rule's functions as
//! an asynchronous invocation (queued, run by several processes at once,
//! retried: [`crate::local::pool::Pool::invoke_async`]).
//!
//! The SQL aws-local evaluates (version 2016-03-23): `SELECT` items `*`
//! (the JSON payload's fields), `topic()`, `topic(N)`, `encode(*, 'base64')`,
//! `timestamp()`, `newuuid()`, each but `*` with `AS name`, then
//! `FROM 'filter'`. Anything else (a `WHERE` clause, another function) is
//! refused at start with what it was, never ignored.

use std::sync::Arc;

use base64::Engine;
use rumqttc::v5::mqttbytes::v5::{Filter, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::local::broker::{self, BrokerUrl, Note};
use crate::local::ids;
use crate::local::pool::Pool;

/// One `SELECT` item.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    /// `*`: the payload's JSON fields.
    Star,
    Topic,
    /// `topic(N)`: the Nth level, from 1.
    TopicLevel(usize),
    Base64Payload,
    Timestamp,
    NewUuid,
}

/// A rule's SQL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sql {
    items: Vec<(Item, Option<String>)>,
    /// The `FROM` filter.
    pub filter: String,
}

/// Splits at `sep` outside quotes and parentheses.
fn split_top(s: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let (mut depth, mut quoted, mut cur) = (0i32, false, String::new());
    for c in s.chars() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            c if c == sep && !quoted && depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts
}

/// The byte offset of keyword `kw` (as a whole word, any case) outside quotes.
fn keyword(s: &str, kw: &str) -> Option<usize> {
    let lower = s.to_ascii_lowercase();
    let mut quoted = false;
    let bytes = lower.as_bytes();
    for (i, c) in lower.char_indices() {
        if c == '\'' {
            quoted = !quoted;
        }
        if quoted || !lower[i..].starts_with(kw) {
            continue;
        }
        let before = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        let after = bytes
            .get(i + kw.len())
            .is_none_or(|b| !b.is_ascii_alphanumeric());
        if before && after {
            return Some(i);
        }
    }
    None
}

impl Sql {
    pub fn parse(sql: &str) -> Result<Sql, String> {
        let s = sql.trim();
        let select = keyword(s, "select")
            .filter(|i| *i == 0)
            .ok_or("a rule's SQL starts with SELECT")?;
        let from = keyword(s, "from").ok_or("no FROM")?;
        let list = &s[select + 6..from];
        let rest = s[from + 4..].trim();
        let (filter, tail) = match rest.strip_prefix('\'') {
            Some(r) => {
                let end = r
                    .find('\'')
                    .ok_or("FROM's topic filter has no closing quote")?;
                (r[..end].to_string(), r[end + 1..].trim())
            }
            None => return Err("FROM takes a quoted topic filter".into()),
        };
        if !tail.is_empty() {
            return Err(format!(
                "aws-local does not evaluate {tail:?} (only SELECT ... FROM '...')"
            ));
        }
        bridge::channel::validate_filter(&filter).map_err(|e| format!("FROM '{filter}': {e}"))?;
        let mut items = Vec::new();
        for raw in split_top(list, ',') {
            let raw = raw.trim();
            let (expr, alias) = match keyword(raw, "as") {
                Some(i) => (raw[..i].trim(), Some(raw[i + 2..].trim().to_string())),
                None => (raw, None),
            };
            let compact: String = expr
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect::<String>()
                .to_ascii_lowercase();
            let item = match compact.as_str() {
                "*" => Item::Star,
                "topic()" => Item::Topic,
                "encode(*,'base64')" => Item::Base64Payload,
                "timestamp()" => Item::Timestamp,
                "newuuid()" => Item::NewUuid,
                c if c.starts_with("topic(") && c.ends_with(')') => Item::TopicLevel(
                    c[6..c.len() - 1]
                        .parse()
                        .ok()
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| format!("{expr}: topic(N) takes a level from 1"))?,
                ),
                _ => {
                    return Err(format!(
                        "aws-local does not evaluate {expr:?} (it evaluates *, topic(), topic(N), \
                         encode(*, 'base64'), timestamp(), newuuid())"
                    ))
                }
            };
            if item != Item::Star && alias.as_deref().is_none_or(str::is_empty) {
                return Err(format!("{expr}: give it a name with AS"));
            }
            items.push((item, alias));
        }
        Ok(Sql { items, filter })
    }

    /// The event for one message, or why the rule does not fire for it
    /// (`SELECT *` of a payload that is not a JSON object).
    pub fn event(&self, topic: &str, payload: &[u8]) -> Result<Value, String> {
        let mut out = Map::new();
        for (item, alias) in &self.items {
            let value = match item {
                Item::Star => {
                    match serde_json::from_slice::<Value>(payload) {
                        Ok(Value::Object(m)) => out.extend(m),
                        _ => return Err("SELECT * needs a JSON object payload".into()),
                    }
                    continue;
                }
                Item::Topic => Value::String(topic.to_string()),
                Item::TopicLevel(n) => match topic.split('/').nth(n - 1) {
                    Some(level) => Value::String(level.to_string()),
                    None => continue, // undefined: left out, as IoT does
                },
                Item::Base64Payload => {
                    Value::String(base64::engine::general_purpose::STANDARD.encode(payload))
                }
                Item::Timestamp => Value::from(crate::now_millis()),
                Item::NewUuid => Value::String(ids::uuid()),
            };
            if let Some(name) = alias {
                out.insert(name.clone(), value);
            }
        }
        Ok(Value::Object(out))
    }
}

/// Runs a rule: subscribes to its filter and invokes `functions` for every
/// message (waits for the subscription).
pub async fn run(
    name: &str,
    sql: Sql,
    url: &BrokerUrl,
    functions: Vec<Arc<Pool>>,
) -> Result<(), String> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut filter = Filter::new(sql.filter.clone(), QoS::AtLeastOnce);
    filter.retain_forward_rule = RetainForwardRule::Never;
    let rule = name.to_string();
    tokio::spawn(async move {
        while let Some(note) = rx.recv().await {
            let Note::Message(msg) = note else { continue };
            match sql.event(&msg.topic, &msg.payload) {
                Ok(event) => {
                    for f in &functions {
                        f.invoke_async(event.clone(), format!("rule {rule}, topic {}", msg.topic));
                    }
                }
                Err(why) => tracing::info!(%rule, topic = %msg.topic, "not fired: {why}"),
            }
        }
    });
    broker::subscribe(
        url,
        &format!("rule-{}", name.to_ascii_lowercase()),
        vec![filter],
        tx,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_templates_sql() {
        let sql = Sql::parse(
            "SELECT topic() AS topic, encode(*, 'base64') AS payload, timestamp() AS timestamp, newuuid() AS id FROM '#'",
        )
        .unwrap();
        assert_eq!(sql.filter, "#");
        let e = sql.event("a/b", &[0, 1, 2]).unwrap();
        assert_eq!(e["topic"], "a/b");
        assert_eq!(e["payload"], "AAEC");
        assert!(e["timestamp"].as_i64().unwrap() > 1_700_000_000_000);
        assert_eq!(e["id"].as_str().unwrap().len(), 36);
        // The fan-out reads exactly these fields.
        let mut keys: Vec<_> = e.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        let mut wanted: Vec<_> = crate::fanout::RULE_FIELDS
            .iter()
            .map(|s| s.to_string())
            .collect();
        wanted.sort();
        assert_eq!(keys, wanted);
    }

    #[test]
    fn star_levels_and_refusals() {
        let sql = Sql::parse("select *, topic(2) as device from 'fleet/+/t'").unwrap();
        let e = sql.event("fleet/d7/t", br#"{"temp":21}"#).unwrap();
        assert_eq!(e, serde_json::json!({"temp": 21, "device": "d7"}));
        assert!(sql.event("fleet/d7/t", b"not json").is_err());
        for bad in [
            "SELECT * FROM '#' WHERE temp > 1",
            "SELECT clientid() AS c FROM '#'",
            "SELECT topic() FROM '#'",
            "SELECT * FROM '#/a'",
            "SELECT * FROM #",
            "DELETE FROM '#'",
        ] {
            assert!(Sql::parse(bad).is_err(), "{bad}");
        }
    }
}
