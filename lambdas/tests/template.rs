//! infra/template.yaml against the code: every variable the functions read is
//! set, the IAM actions are exactly the AWS calls the code makes (observed by
//! running every path of the functions), the rule's SQL selects exactly the
//! fields `iot-fanout` reads, the routes are the ones `ws-handler` handles.

mod support;

use std::collections::{BTreeMap, BTreeSet};

use bridge::permissions::Permissions;
use lambdas::calls::{iam_actions, Calls};
use lambdas::config::{AuthorizerConfig, FanoutConfig, HandlerConfig};
use serde_yaml::Value as Y;
use support::*;

/// A value without its CloudFormation tag (`!Ref`, `!Sub`, `!GetAtt`, ...).
fn untag(v: &Y) -> (Option<String>, &Y) {
    match v {
        Y::Tagged(t) => (Some(t.tag.to_string()), &t.value),
        other => (None, other),
    }
}

fn resource<'a>(t: &'a Y, name: &str) -> &'a Y {
    let r = &t["Resources"][name];
    assert!(!r.is_null(), "the template has no resource {name}");
    r
}

/// (logical id, binary name, variables it reads)
fn functions() -> Vec<(&'static str, &'static str, &'static [&'static str])> {
    vec![
        ("HandlerFunction", "ws-handler", HandlerConfig::VARS),
        (
            "AuthorizerFunction",
            "ws-authorizer",
            AuthorizerConfig::VARS,
        ),
        ("FanoutFunction", "iot-fanout", FanoutConfig::VARS),
    ]
}

#[test]
fn every_variable_the_functions_read_is_set() {
    let t = template();
    for (logical, _, vars) in functions() {
        let set = &resource(&t, logical)["Properties"]["Environment"]["Variables"];
        let names: BTreeSet<&str> = set
            .as_mapping()
            .unwrap()
            .keys()
            .filter_map(|k| k.as_str())
            .collect();
        for var in vars {
            assert!(names.contains(var), "{logical} does not set {var}");
        }
        // ws-handler verifies tokens too (the `auth` action), with the authorizer's settings.
        let also: &[&str] = if logical == "HandlerFunction" {
            AuthorizerConfig::VARS
        } else {
            &[]
        };
        for name in &names {
            assert!(
                vars.contains(name) || also.contains(name) || name.starts_with("AWS_ENDPOINT_URL_"),
                "{logical} sets {name}, which nothing reads"
            );
        }
    }
    // The handler checks tokens exactly as the authorizer does: the same
    // variables, from the same parameters.
    let vars = |f: &str| resource(&t, f)["Properties"]["Environment"]["Variables"].clone();
    let (handler, authorizer) = (vars("HandlerFunction"), vars("AuthorizerFunction"));
    for var in AuthorizerConfig::VARS {
        assert!(
            !authorizer[var].is_null(),
            "the authorizer does not set {var}"
        );
        assert_eq!(
            handler[var], authorizer[var],
            "ws-handler's {var} differs from ws-authorizer's"
        );
    }
    // The handler publishes through this account's IoT data endpoint.
    let h = &resource(&t, "HandlerFunction")["Properties"]["Environment"]["Variables"];
    let (tag, v) = untag(&h["AWS_ENDPOINT_URL_IOT_DATA_PLANE"]);
    assert_eq!(
        (tag.as_deref(), v.as_str()),
        (Some("!Sub"), Some("https://${IotDataEndpoint}"))
    );
    // The management endpoint is the stage's execute-api URL, never a custom domain.
    for f in ["HandlerFunction", "FanoutFunction"] {
        let (_, v) =
            untag(&resource(&t, f)["Properties"]["Environment"]["Variables"]["WEBSOCKET_ENDPOINT"]);
        assert_eq!(
            v.as_str(),
            Some(
                "https://${WebSocketApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}/${StageName}"
            )
        );
    }
}

#[test]
fn functions_are_the_binaries_on_provided_al2023() {
    let t = template();
    assert_eq!(
        t["Parameters"]["Architecture"]["Default"].as_str(),
        Some("arm64")
    );
    for (logical, bin, _) in functions() {
        let p = &resource(&t, logical)["Properties"];
        assert_eq!(p["Runtime"].as_str(), Some("provided.al2023"), "{logical}");
        assert_eq!(p["Handler"].as_str(), Some("bootstrap"));
        assert_eq!(
            p["CodeUri"].as_str(),
            Some(format!("build/{bin}/").as_str())
        );
        let (tag, arch) = untag(&p["Architectures"][0]);
        assert_eq!(
            (tag.as_deref(), arch.as_str()),
            (Some("!Ref"), Some("Architecture"))
        );
        let (_, group) = untag(&p["LoggingConfig"]["LogGroup"]);
        let group = resource(&t, group.as_str().unwrap());
        let (_, retention) = untag(&group["Properties"]["RetentionInDays"]);
        assert_eq!(retention.as_str(), Some("LogRetentionDays"));
        assert!(std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("src/bin/{bin}.rs"))
            .exists());
    }
}

#[test]
fn the_table_is_on_demand_with_ttl_recovery_and_encryption() {
    let t = template();
    let p = &resource(&t, "ConnectionsTable")["Properties"];
    assert_eq!(p["BillingMode"].as_str(), Some("PAY_PER_REQUEST"));
    assert_eq!(
        p["TimeToLiveSpecification"]["AttributeName"].as_str(),
        Some("ttl")
    );
    assert_eq!(
        p["TimeToLiveSpecification"]["Enabled"].as_bool(),
        Some(true)
    );
    assert_eq!(
        p["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"].as_bool(),
        Some(true)
    );
    assert_eq!(p["SSESpecification"]["SSEEnabled"].as_bool(), Some(true));
}

/// Splits a SELECT list on the commas outside parentheses.
fn top_level_fields(select: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in select.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(select[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(select[start..].trim());
    out
}

#[test]
fn the_rule_selects_exactly_what_the_fanout_reads() {
    let t = template();
    let rule = &resource(&t, "FanoutRule")["Properties"]["TopicRulePayload"];
    assert_eq!(rule["AwsIotSqlVersion"].as_str(), Some("2016-03-23"));
    let (_, sql) = untag(&rule["Sql"]);
    let sql = sql.as_str().unwrap();
    let select = sql
        .strip_prefix("SELECT ")
        .and_then(|s| s.split(" FROM ").next())
        .expect("SELECT ... FROM ...");
    let fields: BTreeMap<&str, &str> = top_level_fields(select)
        .into_iter()
        .map(|f| {
            let (expr, alias) = f.rsplit_once(" AS ").expect("every field is aliased");
            (alias.trim(), expr.trim())
        })
        .collect();
    assert_eq!(
        fields.keys().copied().collect::<BTreeSet<_>>(),
        lambdas::fanout::RULE_FIELDS
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(fields["topic"], "topic()");
    assert_eq!(fields["payload"], "encode(*, 'base64')");
    assert_eq!(fields["timestamp"], "timestamp()");
    assert_eq!(fields["id"], "newuuid()");
    assert!(sql.ends_with(" FROM '${TopicFilter}'"), "{sql}");
    let (_, target) = untag(&rule["Actions"][0]["Lambda"]["FunctionArn"]);
    assert_eq!(target.as_str(), Some("FanoutFunction.Arn"));
    assert!(
        !rule["ErrorAction"].is_null(),
        "the rule has an error action"
    );
    let perm = &resource(&t, "FanoutInvokePermission")["Properties"];
    assert_eq!(perm["Principal"].as_str(), Some("iot.amazonaws.com"));
}

#[tokio::test]
async fn the_routes_are_the_ones_the_handler_handles() {
    let t = template();
    let api = &resource(&t, "WebSocketApi")["Properties"];
    assert_eq!(api["ProtocolType"].as_str(), Some("WEBSOCKET"));
    assert_eq!(
        api["RouteSelectionExpression"].as_str(),
        Some("$request.body.action")
    );
    let mut routes = BTreeMap::new();
    for (name, r) in t["Resources"].as_mapping().unwrap() {
        if r["Type"].as_str() == Some("AWS::ApiGatewayV2::Route") {
            let p = &r["Properties"];
            let (_, target) = untag(&p["Target"]);
            assert_eq!(target.as_str(), Some("integrations/${HandlerIntegration}"));
            routes.insert(
                p["RouteKey"].as_str().unwrap().to_string(),
                (name.as_str().unwrap(), p.clone()),
            );
        }
    }
    assert_eq!(
        routes.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["$connect", "$default", "$disconnect"]
    );
    // $connect sits behind the REQUEST authorizer (unless auth is off).
    let (tag, v) = untag(&routes["$connect"].1["AuthorizationType"]);
    assert_eq!(tag.as_deref(), Some("!If"));
    assert_eq!(v[1].as_str(), Some("CUSTOM"));
    let auth = &resource(&t, "ConnectAuthorizer")["Properties"];
    assert_eq!(auth["AuthorizerType"].as_str(), Some("REQUEST"));
    // $default answers through a route response (acks, pongs, errors).
    assert_eq!(
        routes["$default"].1["RouteResponseSelectionExpression"].as_str(),
        Some("$default")
    );
    let rr = &resource(&t, "DefaultRouteResponse")["Properties"];
    let (_, route_id) = untag(&rr["RouteId"]);
    assert_eq!(route_id.as_str(), Some(routes["$default"].0));
    // The handler answers each of them (and nothing else is routed to it).
    let kit = Kit::new().await;
    let h = kit.handler(&[("BRIDGE_AUTH", "off")]);
    for route in routes.keys() {
        let r = handle(
            &h,
            ws_event(route, "r1", Some(r#"{"action":"ping"}"#), None),
        )
        .await;
        assert_eq!(r.status_code, 200, "{route}");
    }
    let stage = &resource(&t, "Stage")["Properties"];
    assert!(!stage["DefaultRouteSettings"]["ThrottlingRateLimit"].is_null());
    assert!(!stage["AccessLogSettings"]["DestinationArn"].is_null());
    let (_, url) = untag(&t["Outputs"]["WebSocketUrl"]["Value"]);
    assert!(url
        .as_str()
        .unwrap()
        .starts_with("wss://${WebSocketApi}.execute-api."));
}

/// action -> resources granted to a function's role.
fn granted(t: &Y, function: &str) -> BTreeMap<String, Vec<String>> {
    let (_, role) = untag(&resource(t, function)["Properties"]["Role"]);
    let role = role.as_str().unwrap().trim_end_matches(".Arn");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for policy in resource(t, role)["Properties"]["Policies"]
        .as_sequence()
        .unwrap()
    {
        for st in policy["PolicyDocument"]["Statement"].as_sequence().unwrap() {
            assert_eq!(st["Effect"].as_str(), Some("Allow"));
            let actions: Vec<String> = match &st["Action"] {
                Y::Sequence(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
                a => vec![a.as_str().unwrap().to_string()],
            };
            let resources: Vec<String> = match untag(&st["Resource"]) {
                (_, Y::Sequence(r)) => r.iter().map(|x| format!("{:?}", untag(x).1)).collect(),
                (Some(tag), r) => vec![format!("{tag} {}", r.as_str().unwrap_or_default())],
                (None, r) => vec![r.as_str().unwrap().to_string()],
            };
            for a in actions {
                out.entry(a).or_default().extend(resources.clone());
            }
        }
    }
    out
}

fn needed(calls: &Calls) -> BTreeSet<String> {
    calls
        .snapshot()
        .keys()
        .flat_map(|(service, op)| iam_actions(service, op))
        .collect()
}

#[tokio::test]
async fn iam_grants_exactly_the_calls_the_code_makes() {
    let kit = Kit::new().await;
    let handler_calls = Calls::new();
    let fanout_calls = Calls::new();
    let h = kit.handler_with(&[("BRIDGE_MAX_SUBSCRIPTIONS", "3")], &handler_calls);
    let f = kit.fanout_with(&[], &fanout_calls);
    kit.standin.set_retained("t/1", b"r");
    // Every path of the handler that calls AWS.
    connect(&h, "a", &Permissions::allow_all()).await;
    connect(&h, "b", &Permissions::allow_all()).await;
    for frame in [
        r#"{"action":"subscribe","channel":"t/+","retained":true}"#,
        r#"{"action":"subscribe","channel":"t/1","retained":true}"#,
        r#"{"action":"subscribe","channel":"u/#"}"#,
        r#"{"action":"publish","channel":"t/1","data":1}"#,
        r#"{"action":"unsubscribe","channel":"u/#"}"#,
    ] {
        let r = send(&h, "a", frame).await;
        assert!(r.is_none(), "{frame}: {r:?}");
    }
    send(&h, "b", r#"{"action":"subscribe","channel":"t/+"}"#).await;
    // The subscription limit under concurrency takes the store's read path.
    let frames: Vec<String> = (0..3)
        .map(|i| format!(r#"{{"action":"subscribe","channel":"v/{i}"}}"#))
        .collect();
    futures_util::future::join_all(frames.iter().map(|fr| send(&h, "a", fr))).await;
    // Every path of the fan-out: registry, lookups, posts, a gone connection.
    kit.standin.set_gone("b");
    let report = f.handle(rule_event("t/1", b"m")).await.unwrap();
    assert_eq!((report.delivered, report.gone), (1, 1));
    let r = handle(&h, ws_event("$disconnect", "a", None, None)).await;
    assert_eq!(r.status_code, 200);

    let t = template();
    for (function, calls) in [
        ("HandlerFunction", &handler_calls),
        ("FanoutFunction", &fanout_calls),
        ("AuthorizerFunction", &Calls::new()),
    ] {
        let needed = needed(calls);
        let granted = granted(&t, function);
        let aws_granted: BTreeSet<String> = granted
            .keys()
            .filter(|a| !a.starts_with("logs:") && !a.starts_with("sqs:"))
            .cloned()
            .collect();
        assert_eq!(
            aws_granted, needed,
            "{function}: granted (left) vs called (right)"
        );
        for (action, resources) in &granted {
            for r in resources {
                if r == "*" {
                    assert_eq!(
                        action, "iot:ListRetainedMessages",
                        "{function}: {action} on *"
                    );
                }
            }
        }
    }
    // The table actions are on this stack's table; posts on this stage's connections.
    let g = granted(&t, "FanoutFunction");
    assert_eq!(g["dynamodb:Query"], vec!["!GetAtt ConnectionsTable.Arn"]);
    assert!(g["execute-api:ManageConnections"][0]
        .contains("${WebSocketApi}/${StageName}/POST/@connections/*"));
}
