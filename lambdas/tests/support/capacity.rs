//! A DynamoDB request recorder: an SDK interceptor that notes, for every
//! request a client sends, the partition keys it touches and the read and
//! write units DynamoDB would bill for it, stamped with a [`Clock`] (the
//! replay's simulated one, or the system's).
//!
//! Units follow DynamoDB's rules ("DynamoDB read and write operations"): a
//! strongly consistent read is 1 unit per started 4 KB of the items read
//! (0.5 eventually consistent), a `Query` or `GetItem` that finds nothing
//! still 1 (0.5); a write is 1 unit per started 1 KB of the item, a
//! transactional write twice that. Item size is the sum of attribute name
//! and value sizes (a number counts as its digits halved plus one). A query
//! with a projection is billed for the whole item: the recorder adds back the
//! partition key, which the store's projections leave out (its other rows'
//! attributes are all projected).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemInput;
use aws_sdk_dynamodb::operation::delete_item::DeleteItemInput;
use aws_sdk_dynamodb::operation::get_item::{GetItemInput, GetItemOutput};
use aws_sdk_dynamodb::operation::put_item::PutItemInput;
use aws_sdk_dynamodb::operation::query::{QueryInput, QueryOutput};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsInput;
use aws_sdk_dynamodb::operation::update_item::UpdateItemInput;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    AfterDeserializationInterceptorContextRef, BeforeSerializationInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};
use lambdas::clock::Clock;

/// One request as DynamoDB would bill it.
#[derive(Debug, Clone, PartialEq)]
pub struct Billed {
    pub operation: &'static str,
    /// The partition keys (`pk`) it touches.
    pub partitions: Vec<String>,
    pub read_units: f64,
    pub write_units: f64,
    /// When it was sent, on the recorder's clock (ms).
    pub at_ms: i64,
}

/// What the request side knew, kept for the response side.
#[derive(Debug, Clone)]
struct Pending {
    operation: &'static str,
    partitions: Vec<String>,
    consistent: bool,
    write_units: f64,
    at_ms: i64,
}

impl Storable for Pending {
    type Storer = StoreReplace<Self>;
}

/// Everything recorded.
#[derive(Debug, Clone)]
pub struct Recorder {
    clock: Clock,
    log: Arc<Mutex<Vec<Billed>>>,
}

impl Recorder {
    pub fn new(clock: Clock) -> Recorder {
        Recorder {
            clock,
            log: Arc::default(),
        }
    }

    pub fn interceptor(&self) -> RecordingInterceptor {
        RecordingInterceptor {
            recorder: self.clone(),
        }
    }

    pub fn billed(&self) -> Vec<Billed> {
        self.log.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
    }

    /// Requests per partition key.
    pub fn per_partition(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for b in self.billed() {
            for pk in b.partitions {
                *out.entry(pk).or_insert(0) += 1;
            }
        }
        out
    }

    /// The most requests one partition key got within one second of the
    /// recorder's clock: (key, requests).
    pub fn hottest_per_second(&self) -> Option<(String, usize)> {
        let mut counts: HashMap<(String, i64), usize> = HashMap::new();
        for b in self.billed() {
            for pk in b.partitions {
                *counts.entry((pk, b.at_ms.div_euclid(1000))).or_insert(0) += 1;
            }
        }
        counts
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0 .0.cmp(&a.0 .0)))
            .map(|((pk, _), n)| (pk, n))
    }

    /// (read units, write units) in all.
    pub fn units(&self) -> (f64, f64) {
        self.billed().iter().fold((0.0, 0.0), |(r, w), b| {
            (r + b.read_units, w + b.write_units)
        })
    }
}

/// The SDK side of [`Recorder`]; add it to a DynamoDB client's config.
#[derive(Debug, Clone)]
pub struct RecordingInterceptor {
    recorder: Recorder,
}

fn s(v: &AttributeValue) -> Option<&str> {
    v.as_s().ok().map(String::as_str)
}

/// DynamoDB's size of a value.
fn value_size(v: &AttributeValue) -> usize {
    match v {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => n.trim_start_matches('-').len().div_ceil(2) + 1,
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::L(l) => 3 + l.iter().map(|v| value_size(v) + 1).sum::<usize>(),
        AttributeValue::M(m) => {
            3 + m
                .iter()
                .map(|(k, v)| k.len() + value_size(v) + 1)
                .sum::<usize>()
        }
        AttributeValue::Ss(v) => v.iter().map(|s| s.len()).sum(),
        AttributeValue::Ns(v) => v.iter().map(|n| n.len().div_ceil(2) + 1).sum(),
        _ => 1,
    }
}

/// DynamoDB's size of an item.
pub fn item_size(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter().map(|(k, v)| k.len() + value_size(v)).sum()
}

pub fn write_units(bytes: usize) -> f64 {
    bytes.div_ceil(1024).max(1) as f64
}

pub fn read_units(bytes: usize, consistent: bool) -> f64 {
    let chunks = bytes.div_ceil(4096).max(1) as f64;
    if consistent {
        chunks
    } else {
        chunks / 2.0
    }
}

fn pk_of(item: &HashMap<String, AttributeValue>) -> Option<String> {
    item.get("pk").and_then(s).map(str::to_string)
}

/// What a request touches and writes, from its typed input.
fn pending(
    input: &aws_smithy_runtime_api::client::interceptors::context::Input,
    at_ms: i64,
) -> Option<Pending> {
    let p = |operation, partitions: Vec<String>, consistent, write_units| Pending {
        operation,
        partitions,
        consistent,
        write_units,
        at_ms,
    };
    if let Some(i) = input.downcast_ref::<GetItemInput>() {
        let pk = i.key().and_then(pk_of).into_iter().collect();
        return Some(p("GetItem", pk, i.consistent_read() == Some(true), 0.0));
    }
    if let Some(i) = input.downcast_ref::<QueryInput>() {
        let pk = i
            .expression_attribute_values()
            .and_then(|v| v.get(":pk"))
            .and_then(s)
            .map(str::to_string)
            .into_iter()
            .collect();
        return Some(p("Query", pk, i.consistent_read() == Some(true), 0.0));
    }
    if let Some(i) = input.downcast_ref::<PutItemInput>() {
        let item = i.item().cloned().unwrap_or_default();
        let pk = pk_of(&item).into_iter().collect();
        return Some(p("PutItem", pk, true, write_units(item_size(&item))));
    }
    if let Some(i) = input.downcast_ref::<UpdateItemInput>() {
        let pk = i.key().and_then(pk_of).into_iter().collect();
        return Some(p("UpdateItem", pk, true, 1.0));
    }
    if let Some(i) = input.downcast_ref::<DeleteItemInput>() {
        let pk = i.key().and_then(pk_of).into_iter().collect();
        return Some(p("DeleteItem", pk, true, 1.0));
    }
    if let Some(i) = input.downcast_ref::<BatchWriteItemInput>() {
        let mut pks = Vec::new();
        let mut units = 0.0;
        for requests in i.request_items().map(|m| m.values()).into_iter().flatten() {
            for r in requests {
                if let Some(put) = r.put_request() {
                    pks.extend(pk_of(put.item()));
                    units += write_units(item_size(put.item()));
                } else if let Some(del) = r.delete_request() {
                    pks.extend(pk_of(del.key()));
                    units += 1.0;
                }
            }
        }
        return Some(p("BatchWriteItem", pks, true, units));
    }
    if let Some(i) = input.downcast_ref::<TransactWriteItemsInput>() {
        let mut pks = Vec::new();
        let mut units = 0.0;
        for item in i.transact_items() {
            if let Some(put) = item.put() {
                pks.extend(pk_of(put.item()));
                units += 2.0 * write_units(item_size(put.item()));
            } else if let Some(u) = item.update() {
                pks.extend(pk_of(u.key()));
                units += 2.0;
            } else if let Some(d) = item.delete() {
                pks.extend(pk_of(d.key()));
                units += 2.0;
            } else if let Some(c) = item.condition_check() {
                pks.extend(pk_of(c.key()));
                units += 2.0;
            }
        }
        return Some(p("TransactWriteItems", pks, true, units));
    }
    None
}

impl Intercept for RecordingInterceptor {
    fn name(&self) -> &'static str {
        "RecordingInterceptor"
    }

    fn read_before_serialization(
        &self,
        context: &BeforeSerializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(p) = pending(context.input(), self.recorder.clock.now().wall_ms()) {
            cfg.interceptor_state().store_put(p);
        }
        Ok(())
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(p) = cfg.load::<Pending>().cloned() else {
            return Ok(());
        };
        let Ok(output) = context.output_or_error() else {
            return Ok(());
        };
        let pk_back = |item: &HashMap<String, AttributeValue>| match item.contains_key("pk") {
            true => 0,
            false => p.partitions.first().map_or(0, |pk| 2 + pk.len()),
        };
        let read = if let Some(o) = output.downcast_ref::<QueryOutput>() {
            let bytes = o.items().iter().map(|i| item_size(i) + pk_back(i)).sum();
            read_units(bytes, p.consistent)
        } else if let Some(o) = output.downcast_ref::<GetItemOutput>() {
            read_units(o.item().map_or(0, item_size), p.consistent)
        } else {
            0.0
        };
        self.recorder.log.lock().unwrap().push(Billed {
            operation: p.operation,
            partitions: p.partitions,
            read_units: read,
            write_units: p.write_units,
            at_ms: p.at_ms,
        });
        Ok(())
    }
}
