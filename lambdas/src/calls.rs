//! Counts the AWS requests the functions make, and says which IAM permissions
//! each one needs.
//!
//! An SDK interceptor on every client: each HTTP attempt (retries included)
//! is recorded before it is sent, as a [`Call`]: the operation plus whatever
//! in the request decides its permissions (the HTTP method, the retain flag
//! of an IoT publish, the item kinds of a DynamoDB transaction), read from
//! the request itself, so the record is the call *as the code made it*. The
//! fan-out reports its DynamoDB requests per invocation from it (EMF), the
//! benchmark reads it, and the template test maps every call seen to the IAM
//! permissions AWS documents for it ([`iam_permissions`]) and compares them
//! with what `infra/template.yaml` grants.
//!
//! A [`Call`] never holds ids, topics or payloads: a warm function records a
//! handful of kinds however many requests it makes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, Metadata};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// One kind of AWS request, as the code made it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Call {
    /// The SDK's service name, e.g. `DynamoDB`, `IoT Data Plane`.
    pub service: String,
    /// The operation, e.g. `Publish`.
    pub operation: String,
    /// The HTTP method it was sent with (`POST`, `DELETE`, ...).
    pub method: String,
    /// What else in the request decides its permissions, sorted: `retain`
    /// for an IoT Data Plane `Publish` with the retain flag; the item kinds
    /// of a DynamoDB `TransactWriteItems` (`ConditionCheck`, `Delete`, `Put`,
    /// `Update`), or `unreadable` when its body could not be read.
    pub facets: Vec<String>,
}

impl Call {
    /// The call a request makes (`service` and `operation` from the SDK's metadata).
    pub fn of_request(service: &str, operation: &str, request: &HttpRequest) -> Call {
        let facets = match (service, operation) {
            ("IoT Data Plane", "Publish") => {
                if query_flag(request.uri(), "retain") {
                    vec!["retain".to_string()]
                } else {
                    Vec::new()
                }
            }
            ("DynamoDB", "TransactWriteItems") => transaction_item_kinds(request.body().bytes()),
            _ => Vec::new(),
        };
        Call {
            service: service.to_string(),
            operation: operation.to_string(),
            method: request.method().to_string(),
            facets,
        }
    }
}

/// Whether the URI's query sets `name=true` (how the IoT Data Plane API
/// carries the retain flag: `POST /topics/{topic}?qos=0&retain=true`).
fn query_flag(uri: &str, name: &str) -> bool {
    let Some((_, query)) = uri.split_once('?') else {
        return false;
    };
    query.split('&').any(|kv| {
        kv.split_once('=')
            .is_some_and(|(k, v)| k == name && v.eq_ignore_ascii_case("true"))
    })
}

/// The item kinds of a `TransactWriteItems` body
/// (`{"TransactItems": [{"Put": {...}}, {"Update": {...}}]}`), sorted;
/// `["unreadable"]` when the body is not that.
fn transaction_item_kinds(body: Option<&[u8]>) -> Vec<String> {
    let unreadable = || vec!["unreadable".to_string()];
    let Some(value) = body.and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok()) else {
        return unreadable();
    };
    let Some(items) = value["TransactItems"].as_array() else {
        return unreadable();
    };
    let mut kinds = BTreeSet::new();
    for item in items {
        match item.as_object() {
            Some(o) if !o.is_empty() => kinds.extend(o.keys().cloned()),
            _ => return unreadable(),
        }
    }
    if kinds.is_empty() {
        return unreadable();
    }
    kinds.into_iter().collect()
}

/// Requests recorded per kind of call.
#[derive(Debug, Clone, Default)]
pub struct Calls {
    counts: Arc<Mutex<BTreeMap<Call, u64>>>,
}

impl Calls {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a request sent outside an SDK client (see [`crate::signed`]),
    /// as the interceptor records an SDK client's.
    pub fn record_request(&self, service: &str, operation: &str, request: &HttpRequest) {
        self.record(Call::of_request(service, operation, request));
    }

    fn record(&self, call: Call) {
        if let Ok(mut counts) = self.counts.lock() {
            *counts.entry(call).or_insert(0) += 1;
        }
    }

    /// Requests so far per (service, operation), e.g. `("DynamoDB", "Query")`.
    pub fn snapshot(&self) -> BTreeMap<(String, String), u64> {
        let mut out = BTreeMap::new();
        if let Ok(counts) = self.counts.lock() {
            for (call, n) in counts.iter() {
                *out.entry((call.service.clone(), call.operation.clone()))
                    .or_insert(0) += n;
            }
        }
        out
    }

    /// Every kind of call made so far.
    pub fn kinds(&self) -> BTreeSet<Call> {
        self.counts
            .lock()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Requests made to one service so far.
    pub fn total(&self, service: &str) -> u64 {
        self.counts.lock().map_or(0, |c| {
            c.iter()
                .filter(|(call, _)| call.service == service)
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
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(meta) = cfg.load::<Metadata>() {
            self.calls.record(Call::of_request(
                meta.service(),
                meta.name(),
                context.request(),
            ));
        }
        Ok(())
    }
}

/// What an IAM policy must allow for a call: one action on one kind of resource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Permission {
    pub action: String,
    pub resource: Resource,
}

/// The resource an action is authorized against.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// The table the request names (`arn:…:dynamodb:…:table/NAME`).
    Table,
    /// The MQTT topic the request names (`arn:…:iot:…:topic/NAME`).
    Topic,
    /// A connection of the stage, under the request's HTTP method
    /// (`arn:…:execute-api:…:API/STAGE/METHOD/@connections/ID`).
    Connection { method: String },
    /// The function that makes the call (an asynchronous invoke of itself:
    /// `arn:…:lambda:…:function:NAME`).
    Function,
    /// An action without resource-level permissions: only `"*"` grants it.
    Any,
    /// A call this mapping does not know: nothing grants it, so a test that
    /// compares grants with calls fails until the mapping learns the call.
    Unknown,
}

fn permission(action: &str, resource: Resource) -> Permission {
    Permission {
        action: action.to_string(),
        resource,
    }
}

/// Every IAM permission AWS documents for a call:
///
/// * DynamoDB: the operation's own action on the table; a
///   `TransactWriteItems` is authorized per item: `PutItem`, `UpdateItem`,
///   `DeleteItem`, `ConditionCheckItem` ("Using IAM with DynamoDB
///   transactions");
/// * IoT Data Plane: `iot:Publish` on the topic, plus `iot:RetainPublish`
///   when the retain flag is set; `iot:GetRetainedMessage` on the topic;
///   `iot:ListRetainedMessages`, which has no resource-level permissions
///   ("AWS IoT Core policy actions", "Retained message policy examples");
/// * `@connections`: `execute-api:ManageConnections` on
///   `API/STAGE/METHOD/@connections/ID`, METHOD being the request's (POST to
///   post, DELETE to close, GET to read);
/// * Lambda `Invoke` (the fan-out handing a part to itself):
///   `lambda:InvokeFunction` on the function.
///
/// Anything else maps to [`Resource::Unknown`].
pub fn iam_permissions(call: &Call) -> Vec<Permission> {
    let op = call.operation.as_str();
    match call.service.as_str() {
        "DynamoDB" => match op {
            "TransactWriteItems" => call
                .facets
                .iter()
                .map(|kind| match kind.as_str() {
                    "Put" => permission("dynamodb:PutItem", Resource::Table),
                    "Update" => permission("dynamodb:UpdateItem", Resource::Table),
                    "Delete" => permission("dynamodb:DeleteItem", Resource::Table),
                    "ConditionCheck" => permission("dynamodb:ConditionCheckItem", Resource::Table),
                    other => permission(
                        &format!("dynamodb:TransactWriteItems({other})"),
                        Resource::Unknown,
                    ),
                })
                .collect(),
            "GetItem" | "PutItem" | "UpdateItem" | "DeleteItem" | "Query" | "Scan"
            | "BatchGetItem" | "BatchWriteItem" => {
                vec![permission(&format!("dynamodb:{op}"), Resource::Table)]
            }
            _ => vec![permission(&format!("dynamodb:{op}"), Resource::Unknown)],
        },
        "IoT Data Plane" => match op {
            "Publish" => {
                let mut out = vec![permission("iot:Publish", Resource::Topic)];
                if call.facets.iter().any(|f| f == "retain") {
                    out.push(permission("iot:RetainPublish", Resource::Topic));
                }
                out
            }
            "GetRetainedMessage" => vec![permission("iot:GetRetainedMessage", Resource::Topic)],
            "ListRetainedMessages" => vec![permission("iot:ListRetainedMessages", Resource::Any)],
            _ => vec![permission(&format!("iot:{op}"), Resource::Unknown)],
        },
        "ApiGatewayManagementApi" => match op {
            "PostToConnection" | "DeleteConnection" | "GetConnection" => vec![permission(
                "execute-api:ManageConnections",
                Resource::Connection {
                    method: call.method.clone(),
                },
            )],
            _ => vec![permission(&format!("execute-api:{op}"), Resource::Unknown)],
        },
        "Lambda" => match op {
            "Invoke" => vec![permission("lambda:InvokeFunction", Resource::Function)],
            _ => vec![permission(&format!("lambda:{op}"), Resource::Unknown)],
        },
        service => vec![permission(&format!("{service}:{op}"), Resource::Unknown)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_types::body::SdkBody;

    fn request(method: &str, uri: &str, body: &str) -> HttpRequest {
        let mut req = HttpRequest::new(SdkBody::from(body.to_string()));
        req.set_method(method).unwrap();
        req.set_uri(uri).unwrap();
        req
    }

    fn actions(call: &Call) -> Vec<String> {
        iam_permissions(call)
            .into_iter()
            .map(|p| p.action)
            .collect()
    }

    #[test]
    fn a_retained_publish_needs_retain_publish() {
        let plain = Call::of_request(
            "IoT Data Plane",
            "Publish",
            &request("POST", "https://iot/topics/a%2Fb?qos=1&retain=false", "x"),
        );
        assert_eq!(actions(&plain), ["iot:Publish"]);
        let retained = Call::of_request(
            "IoT Data Plane",
            "Publish",
            &request("POST", "https://iot/topics/a%2Fb?qos=0&retain=true", "x"),
        );
        assert_eq!(retained.facets, ["retain"]);
        assert_eq!(actions(&retained), ["iot:Publish", "iot:RetainPublish"]);
        assert!(iam_permissions(&retained)
            .iter()
            .all(|p| p.resource == Resource::Topic));
        // A topic named like the flag is not the flag.
        let tricky = Call::of_request(
            "IoT Data Plane",
            "Publish",
            &request("POST", "https://iot/topics/retain%3Dtrue?qos=0", "x"),
        );
        assert!(tricky.facets.is_empty());
    }

    #[test]
    fn a_transaction_needs_each_item_kind() {
        let body = r#"{"TransactItems":[{"Update":{"TableName":"t"}},{"Put":{"TableName":"t"}},
            {"Put":{"TableName":"t"}},{"ConditionCheck":{"TableName":"t"}}]}"#;
        let call = Call::of_request(
            "DynamoDB",
            "TransactWriteItems",
            &request("POST", "https://ddb/", body),
        );
        assert_eq!(call.facets, ["ConditionCheck", "Put", "Update"]);
        assert_eq!(
            actions(&call),
            [
                "dynamodb:ConditionCheckItem",
                "dynamodb:PutItem",
                "dynamodb:UpdateItem"
            ]
        );
        // A body that cannot be read maps to nothing a policy can grant.
        let call = Call::of_request(
            "DynamoDB",
            "TransactWriteItems",
            &request("POST", "https://ddb/", "not json"),
        );
        assert!(iam_permissions(&call)
            .iter()
            .all(|p| p.resource == Resource::Unknown));
    }

    #[test]
    fn connections_are_authorized_per_method() {
        for (op, method) in [
            ("PostToConnection", "POST"),
            ("DeleteConnection", "DELETE"),
            ("GetConnection", "GET"),
        ] {
            let call = Call::of_request(
                "ApiGatewayManagementApi",
                op,
                &request(method, "https://api/prod/@connections/abc%3D", ""),
            );
            assert_eq!(
                iam_permissions(&call),
                [Permission {
                    action: "execute-api:ManageConnections".into(),
                    resource: Resource::Connection {
                        method: method.into()
                    }
                }]
            );
        }
    }

    #[test]
    fn unknown_calls_are_never_granted() {
        let call = Call::of_request(
            "DynamoDB",
            "TransactGetItems",
            &request("POST", "https://ddb/", "{}"),
        );
        assert_eq!(iam_permissions(&call)[0].resource, Resource::Unknown);
        let call = Call::of_request("S3", "GetObject", &request("GET", "https://s3/k", ""));
        assert_eq!(iam_permissions(&call)[0].resource, Resource::Unknown);
    }

    #[test]
    fn counts_stay_per_operation() {
        let calls = Calls::new();
        for uri in ["https://iot/topics/a?retain=true", "https://iot/topics/b"] {
            calls.record(Call::of_request(
                "IoT Data Plane",
                "Publish",
                &request("POST", uri, ""),
            ));
        }
        assert_eq!(calls.kinds().len(), 2);
        assert_eq!(
            calls.snapshot(),
            BTreeMap::from([(("IoT Data Plane".into(), "Publish".into()), 2)])
        );
        assert_eq!(calls.total("IoT Data Plane"), 2);
    }
}
