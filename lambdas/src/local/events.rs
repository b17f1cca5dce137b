//! The events API Gateway sends a WebSocket API's functions, in the shapes
//! AWS sends them (those of `aws_lambda_events`' fixtures): the REQUEST
//! authorizer's event for `$connect` (with `methodArn`), and the Lambda
//! proxy events of `$connect`, `$disconnect` (with `disconnectStatusCode` and
//! `disconnectReason`) and of every message.
//!
//! `requestContext.authorizer` carries the authorizer's `principalId` and its
//! context, every value as a string, as later routes see them.

use serde_json::{json, Map, Value};

use crate::local::{ids, time};

/// The request that opened a connection, as API Gateway saw it.
#[derive(Debug, Clone)]
pub struct Handshake {
    pub connection_id: String,
    pub api_id: String,
    pub stage: String,
    pub region: String,
    pub account: String,
    /// The `Host` the client used.
    pub domain: String,
    pub source_ip: String,
    pub user_agent: Option<String>,
    /// (name, value) in the order sent; names as HTTP/1 delivers them.
    pub headers: Vec<(String, String)>,
    /// (name, value), decoded.
    pub query: Vec<(String, String)>,
    pub connected_at: i64,
}

impl Handshake {
    /// `arn:aws:execute-api:{region}:{account}:{api}/{stage}/$connect`.
    pub fn method_arn(&self) -> String {
        format!(
            "arn:aws:execute-api:{}:{}:{}/{}/$connect",
            self.region, self.account, self.api_id, self.stage
        )
    }

    fn identity(&self) -> Value {
        let mut id = json!({"sourceIp": self.source_ip});
        if let Some(ua) = &self.user_agent {
            id["userAgent"] = json!(ua);
        }
        id
    }

    /// `requestContext` for an event of this connection.
    fn context(&self, route: &str, event_type: &str, authorizer: Option<&Value>) -> Value {
        let now = crate::now_millis();
        let mut ctx = json!({
            "routeKey": route,
            "eventType": event_type,
            "extendedRequestId": ids::gateway_id(),
            "requestTime": time::request_time(now),
            "messageDirection": "IN",
            "stage": self.stage,
            "connectedAt": self.connected_at,
            "requestTimeEpoch": now,
            "identity": self.identity(),
            "requestId": ids::gateway_id(),
            "domainName": self.domain,
            "connectionId": self.connection_id,
            "apiId": self.api_id,
        });
        if let Some(a) = authorizer {
            ctx["authorizer"] = a.clone();
        }
        ctx
    }

    /// The REQUEST authorizer's event.
    pub fn authorizer_event(&self) -> Value {
        let (headers, multi_headers) = single_and_multi(&self.headers);
        let (query, multi_query) = single_and_multi(&self.query);
        json!({
            "type": "REQUEST",
            "methodArn": self.method_arn(),
            "headers": headers,
            "multiValueHeaders": multi_headers,
            "queryStringParameters": query,
            "multiValueQueryStringParameters": multi_query,
            "stageVariables": {},
            "requestContext": self.context("$connect", "CONNECT", None),
        })
    }

    /// `$connect`'s event.
    pub fn connect_event(&self, authorizer: Option<&Value>) -> Value {
        let (headers, multi_headers) = single_and_multi(&self.headers);
        let mut event = json!({
            "headers": headers,
            "multiValueHeaders": multi_headers,
            "requestContext": self.context("$connect", "CONNECT", authorizer),
            "isBase64Encoded": false,
        });
        if !self.query.is_empty() {
            let (query, multi_query) = single_and_multi(&self.query);
            event["queryStringParameters"] = query;
            event["multiValueQueryStringParameters"] = multi_query;
        }
        event
    }

    /// A message's event, for the route `route`.
    pub fn message_event(&self, route: &str, body: &str, authorizer: Option<&Value>) -> Value {
        let mut ctx = self.context(route, "MESSAGE", authorizer);
        ctx["messageId"] = json!(ids::gateway_id());
        json!({
            "requestContext": ctx,
            "body": body,
            "isBase64Encoded": false,
        })
    }

    /// `$disconnect`'s event.
    pub fn disconnect_event(&self, status: u16, reason: &str, authorizer: Option<&Value>) -> Value {
        let mut ctx = self.context("$disconnect", "DISCONNECT", authorizer);
        ctx["disconnectStatusCode"] = json!(status);
        ctx["disconnectReason"] = json!(reason);
        json!({
            "headers": {"Host": self.domain},
            "multiValueHeaders": {"Host": [self.domain]},
            "requestContext": ctx,
            "isBase64Encoded": false,
        })
    }
}

/// `requestContext.authorizer` from an authorizer's answer: `principalId`
/// and every context value, as strings.
pub fn authorizer_context(principal: &str, context: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    out.insert("principalId".into(), json!(principal));
    for (k, v) in context {
        let text = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out.insert(k.clone(), Value::String(text));
    }
    Value::Object(out)
}

/// Name-value pairs as API Gateway gives them twice over: the last value of
/// each name (`headers`, `queryStringParameters`) and every value in order
/// (`multiValueHeaders`, `multiValueQueryStringParameters`).
fn single_and_multi(pairs: &[(String, String)]) -> (Value, Value) {
    let mut single = Map::new();
    let mut multi: Map<String, Value> = Map::new();
    for (k, v) in pairs {
        single.insert(k.clone(), json!(v));
        match multi.get_mut(k) {
            Some(Value::Array(a)) => a.push(json!(v)),
            _ => {
                multi.insert(k.clone(), json!([v]));
            }
        }
    }
    (Value::Object(single), Value::Object(multi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lambda_events::apigw::{
        ApiGatewayCustomAuthorizerRequestTypeRequest, ApiGatewayWebsocketProxyRequest,
    };

    fn handshake() -> Handshake {
        Handshake {
            connection_id: "L0SM9cOFvHcCIhw=".into(),
            api_id: "awslocal00".into(),
            stage: "prod".into(),
            region: "us-east-1".into(),
            account: "123456789012".into(),
            domain: "127.0.0.1:8080".into(),
            source_ip: "127.0.0.1".into(),
            user_agent: Some("test".into()),
            headers: vec![
                ("host".into(), "127.0.0.1:8080".into()),
                ("sec-websocket-protocol".into(), "chat".into()),
                ("x-twice".into(), "a".into()),
                ("x-twice".into(), "b".into()),
            ],
            query: vec![("token".into(), "t.o.k".into())],
            connected_at: 1_707_503_007_396,
        }
    }

    #[test]
    fn the_events_parse_as_the_functions_parse_them() {
        let h = handshake();
        let a: ApiGatewayCustomAuthorizerRequestTypeRequest =
            serde_json::from_value(h.authorizer_event()).unwrap();
        assert_eq!(
            a.method_arn.as_deref(),
            Some("arn:aws:execute-api:us-east-1:123456789012:awslocal00/prod/$connect")
        );
        assert_eq!(a.query_string_parameters.first("token"), Some("t.o.k"));
        assert_eq!(a.multi_value_headers.get_all("x-twice").iter().count(), 2);

        let ctx = authorizer_context(
            "user-1",
            json!({"permissions": "{\"s\":[]}", "expires": 17, "flag": true})
                .as_object()
                .unwrap(),
        );
        assert_eq!(ctx["expires"], "17");
        assert_eq!(ctx["flag"], "true");
        let c: ApiGatewayWebsocketProxyRequest =
            serde_json::from_value(h.connect_event(Some(&ctx))).unwrap();
        assert_eq!(c.request_context.route_key.as_deref(), Some("$connect"));
        assert_eq!(c.request_context.connected_at, 1_707_503_007_396);
        assert_eq!(
            c.request_context.authorizer.fields["permissions"],
            "{\"s\":[]}"
        );
        assert_eq!(c.request_context.authorizer.fields["principalId"], "user-1");
        let m: ApiGatewayWebsocketProxyRequest = serde_json::from_value(h.message_event(
            "$default",
            "{\"action\":\"ping\"}",
            Some(&ctx),
        ))
        .unwrap();
        assert_eq!(m.body.as_deref(), Some("{\"action\":\"ping\"}"));
        assert!(m.request_context.message_id.is_some());
        let d: ApiGatewayWebsocketProxyRequest = serde_json::from_value(h.disconnect_event(
            1005,
            "Client-side close frame status not set",
            None,
        ))
        .unwrap();
        assert_eq!(d.request_context.disconnect_status_code, Some(1005));
        assert_eq!(d.request_context.event_type.as_deref(), Some("DISCONNECT"));
    }
}
