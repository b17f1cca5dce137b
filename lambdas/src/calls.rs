//! Counts the AWS requests the functions make, per service and operation.
//!
//! An SDK interceptor on every client: each HTTP attempt (retries included)
//! is counted before it is sent. The fan-out reports its DynamoDB requests
//! per invocation from it (EMF), the benchmark reads it, and the template
//! test compares the operations seen with the IAM actions the template grants.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// Request counts keyed by (service, operation), e.g. `("DynamoDB", "Query")`.
#[derive(Debug, Clone, Default)]
pub struct Calls {
    counts: Arc<Mutex<BTreeMap<(String, String), u64>>>,
}

impl Calls {
    pub fn new() -> Self {
        Self::default()
    }

    fn record(&self, service: &str, operation: &str) {
        if let Ok(mut counts) = self.counts.lock() {
            *counts
                .entry((service.to_string(), operation.to_string()))
                .or_insert(0) += 1;
        }
    }

    /// Everything counted so far.
    pub fn snapshot(&self) -> BTreeMap<(String, String), u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Requests made to one service so far.
    pub fn total(&self, service: &str) -> u64 {
        self.counts.lock().map_or(0, |c| {
            c.iter()
                .filter(|((s, _), _)| s == service)
                .map(|(_, n)| n)
                .sum()
        })
    }

    /// The interceptor to install on a client.
    pub fn interceptor(&self) -> CountingInterceptor {
        CountingInterceptor {
            calls: self.clone(),
        }
    }
}

/// The SDK side of [`Calls`].
#[derive(Debug, Clone)]
pub struct CountingInterceptor {
    calls: Calls,
}

impl Intercept for CountingInterceptor {
    fn name(&self) -> &'static str {
        "CountingInterceptor"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(meta) = cfg.load::<Metadata>() {
            self.calls.record(meta.service(), meta.name());
        }
        Ok(())
    }
}

/// The IAM actions an SDK operation needs. DynamoDB transactions are
/// authorized per item: the store's transactions update, put and delete
/// (no `ConditionCheck` items), so `TransactWriteItems` maps to those.
pub fn iam_actions(service: &str, operation: &str) -> Vec<String> {
    match (service, operation) {
        ("DynamoDB", "TransactWriteItems") => vec![
            "dynamodb:PutItem".into(),
            "dynamodb:UpdateItem".into(),
            "dynamodb:DeleteItem".into(),
        ],
        ("DynamoDB", op) => vec![format!("dynamodb:{op}")],
        ("IoT Data Plane", op) => vec![format!("iot:{op}")],
        ("ApiGatewayManagementApi", _) => vec!["execute-api:ManageConnections".into()],
        (s, op) => vec![format!("{s}:{op}")],
    }
}
